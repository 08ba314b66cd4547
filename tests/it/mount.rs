//! Mounted tests: they really mount (root and /dev/fuse, as in CI). Without them they say
//! why they skip, unless LORAFS_REQUIRE_MOUNT=1 (set by .ci/run), which makes that a failure.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use crate::common::*;

pub(crate) fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    if root && fuse {
        return true;
    }
    let why = if root {
        "/dev/fuse cannot be opened"
    } else {
        "not running as root"
    };
    assert!(
        std::env::var_os("LORAFS_REQUIRE_MOUNT").is_none(),
        "mounted tests required, but {why}"
    );
    eprintln!("skipping mounted test: {why}");
    false
}

pub(crate) fn is_mounted(path: &Path) -> bool {
    mountinfo_line(path).is_some()
}

/// The `/proc/self/mountinfo` line of the mount on top at `path` (the last one there).
pub(crate) fn mountinfo_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(path));
    line.map(str::to_string)
}

/// A mounted lorafs; unmounts on drop, even when the test fails.
pub(crate) struct MountGuard {
    pub(crate) mountpoint: PathBuf,
}

impl MountGuard {
    pub(crate) fn new(base: &Path, mountpoint: &Path, extra: &[OsString]) -> MountGuard {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut args: Vec<OsString> = vec!["mount".into(), base.into(), mountpoint.into()];
        args.extend(extra.iter().cloned());
        let out = Command::new(lorafs_bin()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mountpoint = mountpoint.canonicalize().unwrap();
        assert!(
            is_mounted(&mountpoint),
            "mounted once `lorafs mount` returned"
        );
        MountGuard { mountpoint }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !is_mounted(&self.mountpoint) {
            return; // unmounted by the test itself
        }
        let ok = Command::new(lorafs_bin())
            .arg("unmount")
            .arg(&self.mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    base: PathBuf,
    adapter_args: Vec<OsString>,
    expected: std::collections::BTreeMap<PathBuf, Vec<u8>>,
}

/// The shared fixture, or `None` (the test then passes without mounting, having said why)
/// when this process cannot mount.
fn setup() -> Option<Setup> {
    if !can_mount() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype: Dtype::F16,
        shards: 2,
        hidden: 96,
        kv: 48,
        inter: 900,
        ..BaseSpec::default()
    };
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 8, ""));
    let mut b = AdapterSpec::new(&spec, 4, "self_attn");
    b.seed = 3;
    write_adapter(&tmp.path().join("b"), &b);
    let adapter_args: Vec<OsString> = vec![
        "--adapter".into(),
        tmp.path().join("a").into(),
        "--adapter".into(),
        format!("{}:0.5", tmp.path().join("b").display()).into(),
    ];
    let out = tmp.path().join("materialized");
    let mut args: Vec<OsString> = vec![
        "materialize".into(),
        base.clone().into(),
        out.clone().into(),
    ];
    args.extend(adapter_args.iter().cloned());
    let (ok, _, err) = run_lorafs(&args);
    assert!(ok, "{err}");
    let expected = read_tree(&out);
    Some(Setup {
        tmp,
        base,
        adapter_args,
        expected,
    })
}

fn args(s: &Setup, extra: &[&str]) -> Vec<OsString> {
    let mut v = s.adapter_args.clone();
    v.extend(extra.iter().map(OsString::from));
    v
}

/// Read a whole file with `read` calls of `chunk` bytes.
fn read_sequential(path: &Path, chunk: usize) -> Vec<u8> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn mounted_files_equal_materialized_files() {
    let Some(s) = setup() else { return };
    let mnt = s.tmp.path().join("mnt");
    let guard = MountGuard::new(&s.base, &mnt, &args(&s, &["--cache-size", "1MiB"]));
    let mounted = read_tree(&guard.mountpoint);
    assert_eq!(
        mounted.keys().collect::<Vec<_>>(),
        s.expected.keys().collect::<Vec<_>>()
    );
    for (rel, want) in &s.expected {
        let path = guard.mountpoint.join(rel);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            want.len() as u64,
            "{rel:?}: stat size"
        );
        assert!(&mounted[rel] == want, "{rel:?}: whole-file read");
        for chunk in [1, 4097, 65_537, 1_000_003] {
            if chunk == 1 && want.len() > 100_000 {
                continue;
            }
            assert!(
                read_sequential(&path, chunk) == *want,
                "{rel:?}: reads of {chunk} bytes"
            );
        }
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the mapped file is read-only and does not change while mounted.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(map[..] == want[..], "{rel:?}: mmap");
    }
}

#[test]
fn random_preads_from_many_threads() {
    let Some(s) = setup() else { return };
    let mnt = s.tmp.path().join("mnt");
    let guard = MountGuard::new(
        &s.base,
        &mnt,
        &args(
            &s,
            &[
                "--cache-size",
                "256KiB",
                "--threads",
                "4",
                "--warm",
                "never",
            ],
        ),
    );
    std::thread::scope(|scope| {
        for t in 0..6u64 {
            let (expected, root) = (&s.expected, &guard.mountpoint);
            scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let files: Vec<_> = expected.iter().filter(|(_, b)| !b.is_empty()).collect();
                for _ in 0..200 {
                    let (rel, want) = files[rng.random_range(0..files.len())];
                    let file = std::fs::File::open(root.join(rel)).unwrap();
                    let start = rng.random_range(0..want.len());
                    let mut buf = vec![0u8; rng.random_range(1..200_000)];
                    let n = file.read_at(&mut buf, start as u64).unwrap();
                    assert!(
                        n > 0 && buf[..n] == want[start..start + n],
                        "{rel:?} at {start}"
                    );
                }
            });
        }
    });
}

#[test]
fn tiny_and_zero_caches_still_return_correct_bytes() {
    let Some(s) = setup() else { return };
    for (i, size) in ["0", "3000"].into_iter().enumerate() {
        let mnt = s.tmp.path().join(format!("mnt{i}"));
        let guard = MountGuard::new(&s.base, &mnt, &args(&s, &["--cache-size", size]));
        assert!(
            read_tree(&guard.mountpoint) == s.expected,
            "cache size {size}"
        );
        let stats = std::fs::read_to_string(guard.mountpoint.join(".lorafs-stats")).unwrap();
        let cached: usize = stats
            .lines()
            .find_map(|l| l.strip_prefix("cache_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no cache_bytes in {stats}"));
        assert!(cached <= size.parse().unwrap(), "{stats}");
        assert!(stats.contains("bytes_merged "), "{stats}");
    }
}

/// The stats file's counter `key`.
fn counter(mnt: &Path, key: &str) -> u64 {
    let stats = std::fs::read_to_string(mnt.join(".lorafs-stats")).unwrap();
    (stats.lines())
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
}

/// Mount options for watching the base read-ahead with a read-ahead budget of `budget`:
/// no warm-up, a small block cache.
fn read_ahead_options(budget: &str) -> Vec<&str> {
    vec![
        "--base-read-ahead",
        budget,
        "--warm",
        "never",
        "--cache-size",
        "1MiB",
        // The kernel's 128 KiB: these files are a few MiB, and reads of 4 MiB would leave
        // nothing ahead to read.
        "--read-ahead-kb",
        "0",
    ]
}

#[test]
fn sequential_readers_take_the_base_from_read_ahead_and_get_the_same_bytes() {
    let Some(s) = setup() else { return };
    for (i, (budget, direct)) in [("2MiB", "always"), ("2MiB", "never"), ("0", "always")]
        .into_iter()
        .enumerate()
    {
        let mnt = s.tmp.path().join(format!("mnt{i}"));
        let mut extra = read_ahead_options(budget);
        extra.extend(["--direct-io", direct]);
        let guard = MountGuard::new(&s.base, &mnt, &args(&s, &extra));
        for (rel, want) in &s.expected {
            let path = guard.mountpoint.join(rel);
            assert!(read_sequential(&path, 65_536) == *want, "{rel:?} {extra:?}");
        }
        let (staged, served) = (
            counter(&guard.mountpoint, "read_ahead_staged"),
            counter(&guard.mountpoint, "read_ahead_served"),
        );
        let held = counter(&guard.mountpoint, "read_ahead_bytes");
        if budget == "0" || direct == "never" {
            // Through the page cache the kernel reads the base ahead; lorafs does not.
            assert_eq!((staged, served, held), (0, 0, 0), "{extra:?}");
        } else {
            // Readers took most of what was read ahead, and no more than was read.
            assert!(
                served > 0 && served <= staged,
                "{staged} {served} {extra:?}"
            );
            assert!(held <= 2 << 20, "{held} {extra:?}");
        }
    }
}

/// Drop the base's safetensors files from the page cache; false where the filesystem keeps
/// them there whatever (tmpfs: its pages are the files).
fn evict_weights(base: &Path) -> bool {
    for entry in std::fs::read_dir(base).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let file = std::fs::File::open(&path).unwrap();
            file.sync_all().unwrap();
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
    }
    rustix::fs::statfs(base).unwrap().f_type != libc::TMPFS_MAGIC
}

#[test]
fn auto_reads_a_base_out_of_the_page_cache_around_it_and_a_cached_one_through_it() {
    let Some(s) = setup() else { return };
    let extra = read_ahead_options("2MiB");
    for (i, cold) in [true, false].into_iter().enumerate() {
        if cold && !evict_weights(&s.base) {
            eprintln!("skipping the cold half: the base is on tmpfs, always in the page cache");
            continue;
        }
        if !cold {
            read_tree(&s.base); // into the page cache
        }
        let mnt = s.tmp.path().join(format!("mnt{i}"));
        let guard = MountGuard::new(&s.base, &mnt, &args(&s, &extra));
        for (rel, want) in &s.expected {
            let path = guard.mountpoint.join(rel);
            assert!(
                read_sequential(&path, 65_536) == *want,
                "{rel:?} cold={cold}"
            );
        }
        // Only O_DIRECT reads stage the base ahead (see the test above).
        let staged = counter(&guard.mountpoint, "read_ahead_staged");
        assert_eq!(staged > 0, cold, "staged {staged} bytes, cold={cold}");
    }
}

#[test]
fn the_mount_is_read_only_and_the_base_untouched() {
    let Some(s) = setup() else { return };
    let before = read_tree(&s.base);
    let mnt = s.tmp.path().join("mnt");
    let guard = MountGuard::new(&s.base, &mnt, &args(&s, &[]));
    let m = &guard.mountpoint;
    let erofs = |r: std::io::Result<()>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    };
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("config.json"))
            .map(drop),
        "open for writing",
    );
    erofs(std::fs::write(m.join("new.txt"), b"x"), "create");
    erofs(
        std::fs::rename(m.join("config.json"), m.join("c.json")),
        "rename",
    );
    erofs(std::fs::remove_file(m.join("config.json")), "unlink");
    erofs(std::fs::create_dir(m.join("d")), "mkdir");
    use std::os::unix::fs::PermissionsExt;
    erofs(
        std::fs::set_permissions(
            m.join("config.json"),
            std::fs::Permissions::from_mode(0o777),
        ),
        "chmod",
    );
    drop(guard);
    assert!(read_tree(&s.base) == before, "base files untouched");
}

#[test]
fn sigterm_unmounts_a_foreground_mount() {
    let Some(s) = setup() else { return };
    let mnt = s.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let mut child = Command::new(lorafs_bin())
        .arg("mount")
        .arg(&s.base)
        .arg(&mnt)
        .args(args(&s, &["--foreground"]))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(&mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mount did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::fs::read(mnt.join("config.json")).is_ok());
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(!is_mounted(&mnt), "no mount left behind");
}

#[test]
fn bad_mount_points_and_inputs_mount_nothing() {
    let Some(s) = setup() else { return };
    let mount = |base: &Path, mnt: &Path, adapters: Vec<OsString>| {
        let mut v: Vec<OsString> = vec!["mount".into(), base.into(), mnt.into()];
        v.extend(adapters);
        run_lorafs(v)
    };
    let (ok, _, err) = mount(
        &s.base,
        &s.tmp.path().join("missing"),
        s.adapter_args.clone(),
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
    let full = s.tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"").unwrap();
    let (ok, _, err) = mount(&s.base, &full, s.adapter_args.clone());
    assert!(!ok && err.contains("not empty"), "{err}");

    let mnt = s.tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (ok, _, err) = mount(
        &s.base,
        &mnt,
        vec!["--adapter".into(), s.tmp.path().join("nope").into()],
    );
    assert!(
        !ok && err.contains("nope") && err.contains("No such file"),
        "{err}"
    );
    assert!(
        !is_mounted(&mnt.canonicalize().unwrap()),
        "a bad adapter mounts nothing"
    );

    let guard = MountGuard::new(&s.base, &mnt, &s.adapter_args);
    let (ok, _, err) = mount(&s.base, &mnt, s.adapter_args.clone());
    assert!(!ok && err.contains("already a mount point"), "{err}");
    // `unmount` names the directory a path ends in: `mnt/..` is the directory above.
    let (ok, _, err) = run_lorafs(["unmount".as_ref(), mnt.join("..").as_os_str()]);
    let above = s.tmp.path().canonicalize().unwrap();
    assert!(
        !ok && err.contains(&format!("{} is not mounted", above.display())),
        "{err}"
    );
    // A link to the mount point unmounts it.
    let link = s.tmp.path().join("link");
    std::os::unix::fs::symlink("mnt", &link).unwrap();
    let (ok, _, err) = run_lorafs(["unmount".as_ref(), link.as_os_str()]);
    assert!(ok, "{err}");
    assert!(!is_mounted(&mnt.canonicalize().unwrap()));
    drop(guard);
    let (ok, _, err) = run_lorafs(["unmount".as_ref(), mnt.as_os_str()]);
    assert!(!ok && err.contains("not mounted"), "{err}");
}

#[test]
fn warm_up_fills_the_page_cache_with_the_merged_bytes() {
    let Some(s) = setup() else { return };
    // Asked for; and by default for a base out of the page cache, which `--direct-io auto`
    // then reads around it (the test above): a small model is warmed however its base is
    // read.
    for (i, (extra, cold)) in [(&["--warm", "always"][..], false), (&[][..], true)]
        .into_iter()
        .enumerate()
    {
        if cold && !evict_weights(&s.base) {
            eprintln!("skipping the cold mount: the base is on tmpfs, always in the page cache");
            continue;
        }
        let mnt = s.tmp.path().join(format!("mnt{i}"));
        let guard = MountGuard::new(&s.base, &mnt, &args(&s, extra));
        let total: u64 = s.expected.values().map(|b| b.len() as u64).sum();
        let start = Instant::now();
        while counter(&guard.mountpoint, "bytes_read") < total {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "warm-up did not finish ({extra:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let warmed = counter(&guard.mountpoint, "bytes_read");
        assert!(
            read_tree(&guard.mountpoint) == s.expected,
            "warmed pages hold the merged bytes ({extra:?})"
        );
        assert_eq!(
            counter(&guard.mountpoint, "bytes_read"),
            warmed,
            "every read was served from the page cache ({extra:?})"
        );
    }
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped) within `within`.
fn exits_within(pid: u32, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next());
                if matches!(state, Some("Z" | "X")) {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A loaded model keeps the mount's files mapped: a plain `unmount` is refused as busy,
/// `unmount --lazy` detaches the mount at once, the file still reads its merged bytes, and
/// the server exits once the file is closed.
#[test]
fn a_busy_mount_is_refused_then_detached_lazily() {
    let Some(s) = setup() else { return };
    let mnt = s.tmp.path().join("mnt");
    let guard = MountGuard::new(&s.base, &mnt, &s.adapter_args);
    let stats = std::fs::read_to_string(guard.mountpoint.join(".lorafs-stats")).unwrap();
    let pid: u32 = stats
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .unwrap()
        .parse()
        .unwrap();
    let (rel, want) = s.expected.iter().max_by_key(|(_, b)| b.len()).unwrap();
    let file = std::fs::File::open(guard.mountpoint.join(rel)).unwrap();

    let (ok, _, err) = run_lorafs(["unmount".as_ref(), guard.mountpoint.as_os_str()]);
    assert!(
        !ok && err.contains("busy") && err.contains("--lazy"),
        "{err}"
    );
    assert!(is_mounted(&guard.mountpoint));

    let lazy = [
        "unmount".as_ref(),
        guard.mountpoint.as_os_str(),
        "--lazy".as_ref(),
    ];
    let (ok, _, err) = run_lorafs(lazy);
    assert!(ok, "{err}");
    assert!(!is_mounted(&guard.mountpoint), "detached at once");
    let mut got = vec![0u8; want.len()];
    file.read_exact_at(&mut got, 0).unwrap();
    assert!(&got == want, "an open file still reads the merged bytes");
    assert!(
        !exits_within(pid, Duration::from_millis(300)),
        "the server serves the open file"
    );
    drop(file);
    assert!(
        exits_within(pid, Duration::from_secs(10)),
        "the server exits once the last file is closed"
    );
}
