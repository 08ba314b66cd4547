//! The transports: whichever carries the requests (FUSE over io_uring where the kernel
//! offers it, `/dev/fuse` always), the mount serves the same bytes; the one asked for is
//! the one serving; without the kernel's ring, `auto` falls back with one log line and
//! `uring` is refused. scripts/test.sh runs this suite with the fuse module's
//! `enable_uring` as found (off by default) and again with it on, so both branches run.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;
use crate::mount::{can_mount, is_mounted, mountinfo_line, MountGuard};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel offers FUSE over io_uring to the mounts made now.
fn uring_offered() -> bool {
    std::fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "Y")
}

fn transport_of(mountpoint: &Path) -> String {
    let stats = std::fs::read_to_string(mountpoint.join(".lorafs-stats")).unwrap();
    let line = stats.lines().find_map(|l| l.strip_prefix("transport "));
    line.expect("a transport line").to_string()
}

/// `lorafs mount --foreground`, once the mount is there, its log (stderr, at info level)
/// written to `log`: every line it logs, from the start.
fn mount_in_foreground(
    base: &Path,
    mnt: &Path,
    adapter: &Path,
    extra: &[&str],
    log: &Path,
) -> std::process::Child {
    let mut extra = extra.to_vec();
    extra.push("--foreground");
    let child = Command::new(lorafs_bin())
        .arg("mount")
        .arg(base)
        .arg(mnt)
        .args(mount_args(adapter, &extra))
        .env("LORAFS_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mount did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Unmount a foreground mount (SIGTERM): its log.
fn stop(mut child: std::process::Child, log: &Path) -> String {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(log).unwrap()
}

fn names_in(dir: &Path) -> Vec<OsString> {
    let entries = std::fs::read_dir(dir).unwrap();
    let mut names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
    names.sort();
    names
}

fn mount_args(adapter: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--adapter".into(), adapter.into()];
    args.extend(["--warm", "never", "--cache-size", "256KiB"].map(OsString::from));
    args.extend(extra.iter().map(OsString::from));
    args
}

#[test]
fn every_transport_here_serves_the_materialized_bytes() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let out = tmp.path().join("materialized");
    let args: [&std::ffi::OsStr; 5] = [
        "materialize".as_ref(),
        base.as_ref(),
        out.as_ref(),
        "--adapter".as_ref(),
        adapter.as_ref(),
    ];
    let (ok, _, err) = run_lorafs(args);
    assert!(ok, "{err}");
    let expected = read_tree(&out);
    let mut transports = vec!["dev"];
    if uring_offered() {
        transports.push("uring");
    } else {
        eprintln!("FUSE over io_uring not offered here ({ENABLE_URING} is not Y): dev only");
    }
    for transport in transports {
        let mnt = tmp.path().join(format!("mnt-{transport}"));
        let extra = ["--transport", transport, "--threads", "3"];
        let guard = MountGuard::new(&base, &mnt, &mount_args(&adapter, &extra));
        let m = &guard.mountpoint;
        assert_eq!(transport_of(m), transport);
        assert!(read_tree(m) == expected, "{transport}: whole files");
        let (rel, want) = (expected.iter())
            .max_by_key(|(_, b)| b.len())
            .expect("files");
        let file = std::fs::File::open(m.join(rel)).unwrap();
        // SAFETY: the mapped file is read-only and does not change while mounted.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(map[..] == want[..], "{transport}: mmap of {rel:?}");
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (file, want) = (&file, want);
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..100 {
                        let start = rng.random_range(0..want.len());
                        let mut buf = vec![0u8; rng.random_range(1..300_000)];
                        let n = file.read_at(&mut buf, start as u64).unwrap();
                        assert!(n > 0 && buf[..n] == want[start..start + n], "{transport}");
                    }
                });
            }
        });
        assert_eq!(names_in(m), names_in(&out), "{transport}: listing");
    }
}

#[test]
fn without_the_kernels_ring_auto_falls_back_in_one_log_line_and_uring_is_refused() {
    if !can_mount() {
        return;
    }
    if uring_offered() {
        eprintln!(
            "skipping: this kernel offers FUSE over io_uring ({ENABLE_URING} is Y); \
             scripts/test.sh's pass with it off runs this test"
        );
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let log = tmp.path().join("mount.log");
    let mnt = tmp.path().join("auto");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let child = mount_in_foreground(&base, &mnt, &adapter, &["--transport", "auto"], &log);
    assert_eq!(transport_of(&mnt), "dev");
    let text = stop(child, &log);
    let said = text
        .lines()
        .filter(|l| l.contains("io_uring"))
        .collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "one line about the ring: {text}");
    assert!(
        said[0].contains("not used") && said[0].contains("/dev/fuse"),
        "{text}"
    );

    let mnt = tmp.path().join("uring");
    std::fs::create_dir(&mnt).unwrap();
    let mut args = vec![OsString::from("mount"), base.into(), mnt.clone().into()];
    args.extend(mount_args(&adapter, &["--transport", "uring"]));
    let (ok, _, err) = run_lorafs(&args);
    assert!(!ok, "--transport uring without the kernel's ring must fail");
    assert!(
        err.contains("io_uring unavailable") && err.contains("enable_uring"),
        "{err}"
    );
    assert!(!is_mounted(&mnt.canonicalize().unwrap()), "nothing mounted");
}

#[test]
fn with_the_kernels_ring_auto_uses_it() {
    if !can_mount() {
        return;
    }
    if !uring_offered() {
        eprintln!(
            "skipping: this kernel does not offer FUSE over io_uring ({ENABLE_URING} is not \
             Y); scripts/test.sh's pass with it on runs this test"
        );
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let extra = ["--transport", "auto"];
    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &mount_args(&adapter, &extra),
    );
    assert_eq!(transport_of(&guard.mountpoint), "uring");
}

/// Also: what a background server logs while it starts is in its `--log-file`.
#[test]
fn max_background_is_asked_of_the_kernel() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let log = tmp.path().join("mount.log");
    let log_arg = log.to_str().unwrap();
    let extra = ["--max-background", "17", "--log-file", log_arg];
    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &mount_args(&adapter, &extra),
    );
    assert!(std::fs::read(guard.mountpoint.join("config.json")).is_ok());
    drop(guard);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("kernel accepted max_background 17"), "{text}");
    assert!(text.contains("mounted "), "{text}");
    let (ok, _, err) = run_lorafs(["mount", "b", "m", "--max-background", "0"]);
    assert!(!ok && err.contains("max-background"), "{err}");
}

/// The case that must not happen: a signal unmounting someone else's filesystem. One
/// mounted over the lorafs mount is on top at the path, where `umount(path)` would remove
/// it; the server leaves it alone and serves on, and unmounts its own once it is gone.
#[test]
fn a_signal_never_unmounts_a_filesystem_mounted_over_the_mount() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let mut transports = vec!["dev"];
    if uring_offered() {
        transports.push("uring");
    }
    for transport in transports {
        let log = tmp.path().join(format!("{transport}.log"));
        let mnt = tmp.path().join(format!("mnt-{transport}"));
        std::fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let extra = ["--transport", transport];
        let mut child = mount_in_foreground(&base, &mnt, &adapter, &extra, &log);
        let _cleanup = Cleanup {
            pid: child.id(),
            mountpoint: mnt.clone(),
        };
        let cover = Command::new("mount")
            .args(["-t", "tmpfs", "lorafs-test-cover"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(cover.success(), "{transport}: tmpfs over the mount");
        let top = || top_fstype(&mnt);
        assert_eq!(top(), "tmpfs");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            top(),
            "tmpfs",
            "{transport}: the covering mount was unmounted"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "{transport}: server gone"
        );
        assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
        assert!(
            std::fs::read(mnt.join("config.json")).is_ok(),
            "{transport}: serves on"
        );
        let text = stop(child, &log);
        assert!(
            text.contains("not unmounting") && text.contains("covered"),
            "{text}"
        );
        assert!(!is_mounted(&mnt), "{transport}: its own mount unmounted");
    }
}

/// Should the test fail midway: the server killed and whatever is left at the mount point
/// detached, so that the test ends instead of waiting on them.
struct Cleanup {
    pid: u32,
    mountpoint: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for _ in 0..2 {
            if is_mounted(&self.mountpoint) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is the test's child
        // (reaped by `stop` when the test passes, so then already gone).
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
    }
}

/// The type of the filesystem on top at `path`.
fn top_fstype(path: &Path) -> String {
    let line = mountinfo_line(path).expect("mounted");
    let after = line.split(" - ").nth(1).unwrap();
    after.split(' ').next().unwrap().to_string()
}
