//! Mounts the system manages: mount(8) with the `mount.lorafs` helper (`mount -t lorafs`, an
//! fstab line), and systemd's readiness protocol. Mounted tests, as in `mount`: as root they
//! run (LORAFS_REQUIRE_MOUNT=1 makes skipping a failure).

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::mount::{can_mount, is_mounted};

/// Where mount(8) looks for the helper of `-t lorafs`.
const HELPER: &str = "/sbin/mount.lorafs";

/// Tests run on parallel threads and the helper's path is one for the machine: one test at
/// a time has it.
static HELPER_LOCK: Mutex<()> = Mutex::new(());

/// `/sbin/mount.lorafs` as a link to the lorafs under test, for the life of the guard. The
/// link is made only where nothing is (symlink(2) fails on anything there) and removed only
/// if this guard made it and it still is that link. Anything else at that path fails the
/// test, untouched, except a link to this very binary, which is used and left.
struct HelperLink {
    created: bool,
    _lock: MutexGuard<'static, ()>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let lock = HELPER_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let target = lorafs_bin();
        let created = match std::os::unix::fs::symlink(&target, HELPER) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let found = std::fs::read_link(HELPER).ok();
                assert!(
                    found.as_deref() == Some(target.as_path()),
                    "{HELPER} exists ({}) and is not a link to {}: the test will not touch \
                     it; run where mount.lorafs is not installed, or link it to this binary",
                    found.map_or("not a link".into(), |t| format!("-> {}", t.display())),
                    target.display()
                );
                false
            }
            Err(e) => panic!("cannot link {HELPER} to {}: {e}", target.display()),
        };
        HelperLink {
            created,
            _lock: lock,
        }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if self.created && std::fs::read_link(HELPER).ok() == Some(lorafs_bin()) {
            let _ = std::fs::remove_file(HELPER);
        }
    }
}

/// A mount point that is unmounted (lazily) on drop if a failed test left it mounted.
struct MountPoint(PathBuf);

impl MountPoint {
    fn new(path: &Path) -> MountPoint {
        std::fs::create_dir_all(path).unwrap();
        MountPoint(path.canonicalize().unwrap())
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A base, adapters `a` (q_proj) and `b` (attention), and what `lorafs materialize` writes.
struct Fixture {
    tmp: tempfile::TempDir,
    base: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let (tmp, spec, base, a) = small_model();
        let b = tmp.path().join("b");
        let mut b_spec = AdapterSpec::new(&spec, 4, "self_attn");
        b_spec.seed = 3;
        write_adapter(&b, &b_spec);
        Fixture { tmp, base, a, b }
    }

    /// The files `lorafs materialize` writes for these `--adapter` arguments.
    fn materialized(&self, adapters: &[String]) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        let dir = tempfile::Builder::new()
            .prefix("out")
            .tempdir_in(self.tmp.path())
            .unwrap();
        let out = dir.path().join("merged");
        let mut args: Vec<OsString> =
            vec!["materialize".into(), (&self.base).into(), (&out).into()];
        for a in adapters {
            args.extend(["--adapter".into(), a.into()]);
        }
        let (ok, _, err) = run_lorafs(&args);
        assert!(ok, "{err}");
        read_tree(&out)
    }
}

/// The pid of the server of the mount at `mnt`, from its stats file.
fn server_pid(mnt: &Path) -> i32 {
    let stats = std::fs::read_to_string(mnt.join(".lorafs-stats")).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stats}"))
}

/// Wait for process `pid` (not a child of this one) to end; a zombie counts as ended.
fn assert_exits(pid: i32) {
    let start = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if matches!(state, None | Some("Z") | Some("X")) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server {pid} still running after the unmount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `command`: (success, stdout + stderr).
fn run(command: &mut Command) -> (bool, String) {
    let (ok, out, err) = output_of(command);
    (ok, out + &err)
}

fn mount_cmd() -> Command {
    Command::new("mount")
}

/// `umount MNT` must end the server.
fn umount_ends_the_server(mnt: &Path) {
    let pid = server_pid(mnt);
    // Right after mounting, the background warm-up looks files up through the mount point
    // (so the kernel knows their inodes): for that instant the mount is busy, as it is for
    // any reader. Retry on "busy" for a few seconds, as a user would; any other failure,
    // or busy for longer, fails the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (ok, out) = loop {
        let (ok, out) = run(Command::new("umount").arg(mnt));
        if ok || !out.contains("busy") || std::time::Instant::now() > deadline {
            break (ok, out);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(ok, "umount {}: {out}", mnt.display());
    assert!(!is_mounted(mnt));
    assert_exits(pid);
}

#[test]
fn mount_t_lorafs_with_adapter_options_then_umount() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let expected = f.materialized(&[format!("{}:0.5", f.a.display())]);
    let _helper = HelperLink::install();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    let options = format!(
        "adapter={}:0.5,cache_size=1MiB,warm=never,nofail,_netdev,x-systemd.requires=x.mount",
        f.a.display()
    );
    let (ok, out) = run(mount_cmd()
        .args(["-t", "lorafs"])
        .arg(&f.base)
        .arg(&mnt.0)
        .args(["-o", &options]));
    assert!(ok, "mount -t lorafs: {out}");
    assert!(is_mounted(&mnt.0), "mounted once mount(8) returned");
    assert!(
        read_tree(&mnt.0) == expected,
        "the mount serves the merged model"
    );
    umount_ends_the_server(&mnt.0);
}

#[test]
fn fstab_lines_mount_with_quoted_view_specs_and_mount_a_is_idempotent() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let (a, b) = (f.a.display(), f.b.display());
    let single = f.materialized(&[format!("{a}:0.5")]);
    let mix = f.materialized(&[format!("{a}:0.5"), b.to_string()]);
    let _helper = HelperLink::install();
    let one = MountPoint::new(&f.tmp.path().join("one"));
    let views = MountPoint::new(&f.tmp.path().join("views"));
    let fstab = f.tmp.path().join("fstab");
    let base = f.base.canonicalize().unwrap();
    let base = base.display();
    // The first line is mounted by name only (noauto); the second, whose source carries the
    // `lorafs:` prefix the kernel shows, by `mount -a`.
    std::fs::write(
        &fstab,
        format!(
            "# lorafs mounts\n\
             {base} {} lorafs adapter={a}:0.5,cache_size=1MiB,ro,noauto,nofail,x-systemd.automount 0 0\n\
             lorafs:{base} {} lorafs view=\"mix={a}:0.5,{b}\",view=one={a}:0.5,factor_cache=64MiB,defaults 0 0\n",
            one.0.display(),
            views.0.display()
        ),
    )
    .unwrap();
    let (ok, out) = run(mount_cmd().arg("-T").arg(&fstab).arg(&one.0));
    assert!(
        ok,
        "mount -T {} {}: {out}",
        fstab.display(),
        one.0.display()
    );
    let (ok, out) = run(mount_cmd().arg("-a").arg("-T").arg(&fstab));
    assert!(ok, "mount -a -T {}: {out}", fstab.display());
    assert!(
        is_mounted(&views.0),
        "mount -a mounts the line without noauto"
    );
    let server = server_pid(&views.0);
    let (ok, out) = run(mount_cmd().arg("-a").arg("-T").arg(&fstab));
    assert!(ok, "mount -a again: {out}");
    assert_eq!(
        server_pid(&views.0),
        server,
        "mount -a leaves a mounted line alone"
    );
    assert!(read_tree(&one.0) == single, "adapter= line");
    assert!(read_tree(&views.0.join("mix")) == mix, "quoted view spec");
    assert!(read_tree(&views.0.join("one")) == single, "second view");
    umount_ends_the_server(&one.0);
    umount_ends_the_server(&views.0);
}

#[test]
fn bad_options_mount_nothing_and_say_why() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let _helper = HelperLink::install();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    let mount = |flags: &[&str], options: String| {
        run(mount_cmd()
            .args(["-t", "lorafs"])
            .args(flags)
            .arg(&f.base)
            .arg(&mnt.0)
            .args(["-o", &options]))
    };
    let a = f.a.display();
    let refused = |(ok, out): (bool, String), expect: &str| {
        assert!(!ok, "accepted: {out}");
        assert!(out.contains(expect), "{expect:?} not in {out}");
        assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
        assert!(!is_mounted(&mnt.0), "nothing mounted: {out}");
    };
    refused(
        mount(&[], format!("adapter={a},cache=1GiB")),
        "unknown mount option \"cache=1GiB\"",
    );
    refused(
        mount(&[], format!("adapter={a},cache_size=12parsecs")),
        "12parsecs",
    );
    // mount(8) drops an option with an unbalanced quote before the helper sees it; the
    // helper run by hand refuses it.
    refused(
        run(Command::new(HELPER)
            .arg(&f.base)
            .arg(&mnt.0)
            .args(["-o", &format!("adapter={a},view=\"x={a}")])),
        "unbalanced double quote",
    );
    let missing = f.tmp.path().join("nope");
    refused(
        mount(&[], format!("adapter={}", missing.display())),
        "No such file",
    );
    // -f checks the inputs as a mount would, and mounts nothing.
    refused(
        mount(&["-f"], format!("adapter={}", missing.display())),
        "No such file",
    );
    let (ok, out) = mount(&["-f"], format!("adapter={a}"));
    assert!(ok && !is_mounted(&mnt.0), "fake mount: {out}");
    // Sloppy: an unknown option is skipped.
    let (ok, out) = mount(&["-s"], format!("adapter={a},cache=1GiB"));
    assert!(ok, "sloppy mount: {out}");
    umount_ends_the_server(&mnt.0);
}

/// A datagram socket standing in for systemd's notification socket.
struct FakeSystemd {
    socket: UnixDatagram,
}

impl FakeSystemd {
    fn bind(path: &Path) -> FakeSystemd {
        let socket = UnixDatagram::bind(path).unwrap();
        FakeSystemd { socket }
    }

    /// The next message, or `None` after `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                // A signal caught by this test process interrupts the wait; it is not a
                // message: wait on.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("notify socket: {e} ({:?})", e.kind()),
            }
        }
    }
}

/// `lorafs mount --foreground` with NOTIFY_SOCKET=`notify_socket`.
fn foreground_mount(f: &Fixture, mnt: &Path, notify_socket: &str) -> Child {
    Command::new(lorafs_bin())
        .arg("mount")
        .arg(&f.base)
        .arg(mnt)
        .arg("--adapter")
        .arg(&f.a)
        .args(["--foreground", "--warm", "never"])
        .env("NOTIFY_SOCKET", notify_socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Wait for READY=1 and check that the mount serves when it arrives.
fn ready_means_serving(systemd: &FakeSystemd, mnt: &Path, expected: &[u8]) {
    let message = systemd
        .next(Duration::from_secs(30))
        .expect("no READY=1 within 30 s");
    assert!(message.starts_with("READY=1\n"), "{message:?}");
    assert!(message.contains("\nSTATUS=serving "), "{message:?}");
    assert!(is_mounted(mnt), "mounted when READY=1 arrives");
    let config = std::fs::read(mnt.join("config.json")).unwrap();
    assert_eq!(config, expected, "the mount serves when READY=1 arrives");
}

fn wait_success(child: &mut Child) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the foreground server did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit: {status}");
}

#[test]
fn systemd_hears_ready_when_the_mount_serves_and_stopping_on_sigterm() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let config = std::fs::read(f.base.join("config.json")).unwrap();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    let path = f.tmp.path().join("notify");
    let systemd = FakeSystemd::bind(&path);
    let mut child = foreground_mount(&f, &mnt.0, path.to_str().unwrap());
    ready_means_serving(&systemd, &mnt.0, &config);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let message = systemd.next(Duration::from_secs(20));
    let message = message.expect("no STOPPING=1 after SIGTERM");
    assert!(message.starts_with("STOPPING=1\n"), "{message:?}");
    wait_success(&mut child);
    assert!(!is_mounted(&mnt.0), "unmounted on SIGTERM");
    assert_eq!(
        systemd.next(Duration::from_millis(200)),
        None,
        "nothing more"
    );
}

#[test]
fn systemd_hears_stopping_when_the_mount_is_unmounted_from_outside() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let config = std::fs::read(f.base.join("config.json")).unwrap();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    // An abstract socket, as systemd's own (`@/org/freedesktop/systemd1/notify`).
    let name = format!("lorafs-test-notify-{}", std::process::id());
    let socket = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    let systemd = FakeSystemd { socket };
    let mut child = foreground_mount(&f, &mnt.0, &format!("@{name}"));
    ready_means_serving(&systemd, &mnt.0, &config);
    let (ok, out) = run(Command::new("umount").arg(&mnt.0));
    assert!(ok, "umount: {out}");
    let message = systemd.next(Duration::from_secs(20));
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.starts_with("STOPPING=1\n")),
        "{message:?}"
    );
    wait_success(&mut child);
}

#[test]
fn a_background_server_never_notifies() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    let path = f.tmp.path().join("notify");
    let systemd = FakeSystemd::bind(&path);
    let (ok, out) = run(Command::new(lorafs_bin())
        .arg("mount")
        .arg(&f.base)
        .arg(&mnt.0)
        .arg("--adapter")
        .arg(&f.a)
        .env("NOTIFY_SOCKET", &path));
    assert!(ok && is_mounted(&mnt.0), "{out}");
    assert_eq!(
        systemd.next(Duration::from_millis(500)),
        None,
        "READY=1 from a background server"
    );
    umount_ends_the_server(&mnt.0);
    assert_eq!(
        systemd.next(Duration::from_millis(200)),
        None,
        "STOPPING=1 from a background server"
    );
}

#[test]
fn mount_n_mounts_in_another_mount_namespace() {
    if !can_mount() {
        return;
    }
    let f = Fixture::new();
    let expected = f.materialized(&[f.a.display().to_string()]);
    let _helper = HelperLink::install();
    let mnt = MountPoint::new(&f.tmp.path().join("mnt"));
    // A process in a mount namespace of its own, which the mount must go to.
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "120"])
        .spawn()
        .unwrap();
    let holder_pid = holder.id().to_string();
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let start = Instant::now();
    while std::fs::read_link(format!("/proc/{holder_pid}/ns/mnt"))
        .ok()
        .as_ref()
        == Some(&own_ns)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "unshare did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let in_namespace = |command: &[&str], path: &Path| {
        run(Command::new("nsenter")
            .args(["-t", &holder_pid, "-m"])
            .args(command)
            .arg(path))
    };
    let (ok, out) = run(mount_cmd()
        .args(["-N", &holder_pid, "-t", "lorafs"])
        .arg(&f.base)
        .arg(&mnt.0)
        .args(["-o", &format!("adapter={}", f.a.display())]));
    let served = ok.then(|| in_namespace(&["cat"], &mnt.0.join("config.json")));
    let stats = ok.then(|| in_namespace(&["cat"], &mnt.0.join(".lorafs-stats")));
    let unmounted = ok.then(|| in_namespace(&["umount"], &mnt.0));
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(ok, "mount -N: {out}");
    assert!(!is_mounted(&mnt.0), "not in this namespace");
    let (ok, config) = served.unwrap();
    assert!(ok, "read in the namespace: {config}");
    assert_eq!(config.as_bytes(), &expected[Path::new("config.json")][..]);
    let (ok, out) = unmounted.unwrap();
    assert!(ok, "umount in the namespace: {out}");
    let (_, stats) = stats.unwrap();
    let pid = stats.lines().find_map(|l| l.strip_prefix("pid "));
    assert_exits(pid.and_then(|p| p.parse().ok()).expect(&stats));
}
