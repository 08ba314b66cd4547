//! The output of `materialize`: nothing is deleted that lorafs did not create, interrupted
//! runs leave nothing behind, and the output keeps the source's permission bits.

use std::ffi::OsStr;
use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A base (`base`) and an adapter (`a`) under `dir`; returns their paths.
fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let (base, adapter) = (dir.join("base"), dir.join("a"));
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 2, "q_proj"));
    (base, adapter)
}

/// A base whose materialize takes long enough to act during the run: a 1 GiB sparse
/// pass-through file (cheap to create, written out in full).
fn slow_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let (base, adapter) = inputs(dir);
    let big = std::fs::File::create(base.join("extra/big.bin")).unwrap();
    big.set_len(1 << 30).unwrap();
    (base, adapter)
}

/// `lorafs materialize BASE OUT --adapter A [--force]`, run from `cwd`.
fn materialize_cmd(
    cwd: &Path,
    base: &Path,
    out: impl AsRef<OsStr>,
    a: &Path,
    force: bool,
) -> Command {
    let mut command = Command::new(lorafs_bin());
    command
        .arg("materialize")
        .arg(base)
        .arg(out)
        .arg("--adapter")
        .arg(a)
        .current_dir(cwd);
    if force {
        command.arg("--force");
    }
    command
}

fn materialize_from(
    cwd: &Path,
    base: &Path,
    out: impl AsRef<OsStr>,
    a: &Path,
    force: bool,
) -> (bool, String, String) {
    output_of(&mut materialize_cmd(cwd, base, out, a, force))
}

/// Names in `dir` that a run of lorafs would use (`.OUT.lorafs-...`).
fn run_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".lorafs-"))
        .collect();
    names.sort();
    names
}

/// Nothing of a run (temporary tree, owner file) is left in `dir`.
fn assert_no_run_files(dir: &Path) {
    let left = run_files(dir);
    assert!(left.is_empty(), "{left:?}");
}

/// Wait until the temporary directory of `child`, a run writing `dir/out`, appears (one
/// not in `before`, the [`run_files`] of `dir` before it started); returns it.
fn wait_for_run_dir(dir: &Path, before: &[String], child: &mut Child) -> PathBuf {
    let start = Instant::now();
    loop {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".out.lorafs-")
                && entry.file_type().unwrap().is_dir()
                && !before.contains(&name)
            {
                return entry.path();
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("lorafs ended ({status}) before its temporary directory was seen");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no run directory"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn kill(child: &Child, signal: i32) {
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn the_current_directory_and_its_ancestors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let cwd = tmp.path().join("work/sub");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(cwd.join("mine.txt"), b"keep me").unwrap();
    std::fs::write(tmp.path().join("work/also-mine.txt"), b"keep me too").unwrap();
    let before = read_tree(&tmp.path().join("work"));
    for (out, what) in [
        (".", "is the current directory"),
        ("./", "is the current directory"),
        ("../sub", "is the current directory"),
        ("..", "is an ancestor of the current directory"),
        ("../", "is an ancestor of the current directory"),
        ("../../work", "is an ancestor of the current directory"),
    ] {
        let (ok, _, err) = materialize_from(&cwd, &base, out, &a, true);
        assert!(!ok && err.contains(what), "{out}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            read_tree(&tmp.path().join("work")) == before,
            "{out}: files intact"
        );
        for dir in [&cwd, &tmp.path().join("work"), &tmp.path().to_path_buf()] {
            assert!(run_files(dir).is_empty(), "{out}: nothing left in {dir:?}");
        }
    }
}

#[test]
fn symbolic_links_are_never_written_through_or_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let real = tmp.path().join("real");
    std::fs::create_dir_all(real.join("deeper")).unwrap();
    std::fs::write(real.join("data.txt"), b"not lorafs's").unwrap();
    std::fs::write(tmp.path().join("file.txt"), b"a file").unwrap();
    symlink(&real, tmp.path().join("link")).unwrap();
    symlink(real.join("deeper"), tmp.path().join("deep-link")).unwrap();
    symlink(tmp.path().join("file.txt"), tmp.path().join("file-link")).unwrap();
    let before = read_tree(&real);
    for (out, what) in [
        ("link/", "is a symbolic link"),
        ("link", "is a symbolic link"),
        ("link/.", "is a symbolic link"),
        ("file-link", "is a symbolic link"),
        ("link/out", "a symbolic link"),
        ("link/deeper/../out", "a symbolic link"),
        ("deep-link/../out", "has `..` after a symbolic link"),
    ] {
        for force in [false, true] {
            let (ok, _, err) = materialize_from(tmp.path(), &base, out, &a, force);
            assert!(!ok && err.contains(what), "{out}: {err}");
            assert!(
                read_tree(&real) == before,
                "{out}: the link's target intact"
            );
            assert!(
                !real.join("out").exists(),
                "{out}: nothing written through the link"
            );
            assert!(!tmp.path().join("out").exists(), "{out}");
            assert!(run_files(tmp.path()).is_empty() && run_files(&real).is_empty());
        }
    }
    assert!(tmp.path().join("link").is_symlink() && tmp.path().join("file-link").is_symlink());
    assert_eq!(
        std::fs::read(tmp.path().join("file.txt")).unwrap(),
        b"a file"
    );
    // `..` after a real directory means what it says.
    let (ok, _, err) = materialize_from(tmp.path(), &base, "real/deeper/../../out", &a, false);
    assert!(ok, "{err}");
    assert!(tmp.path().join("out/model.safetensors").exists());
}

/// Mounts made by a test; unmounted on drop, even when the test fails.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    /// Mount `args` at `at` (`mount ARGS... AT`), or None (with the reason) when this machine
    /// cannot mount (not root).
    fn mount(&mut self, args: &[&OsStr], at: &Path) -> Option<()> {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount").args(args).arg(at).status().unwrap();
        if !status.success() {
            assert!(
                std::env::var_os("LORAFS_REQUIRE_MOUNT").is_none(),
                "mount {args:?} {at:?} failed"
            );
            eprintln!("skipping: cannot mount here ({status})");
            return None;
        }
        self.0.push(at.to_path_buf());
        Some(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let _ = Command::new("umount").arg(at).status();
        }
    }
}

#[test]
fn mount_points_are_refused_and_keep_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let mut mounts = Mounts(Vec::new());
    let tmpfs = ["-t".as_ref(), "tmpfs".as_ref(), "none".as_ref()];
    // A filesystem of its own, a bind mount of a directory of the same filesystem, and a
    // directory with a mount point inside.
    let (own, bound, source) = (
        tmp.path().join("own"),
        tmp.path().join("bound"),
        tmp.path().join("source"),
    );
    let (outer, inner) = (tmp.path().join("outer"), tmp.path().join("outer/inner"));
    std::fs::create_dir_all(&source).unwrap();
    let bind = ["--bind".as_ref(), source.as_os_str()];
    if mounts.mount(&tmpfs, &own).is_none()
        || mounts.mount(&bind, &bound).is_none()
        || mounts.mount(&tmpfs, &inner).is_none()
    {
        return;
    }
    for dir in [&own, &bound, &inner] {
        std::fs::write(dir.join("precious.txt"), b"not lorafs's").unwrap();
    }
    for (out, what) in [
        (&own, "is a mount point"),
        (&bound, "is a mount point"),
        (&outer, "contains a mount point"),
    ] {
        let (ok, _, err) = materialize_from(tmp.path(), &base, out, &a, true);
        assert!(!ok && err.contains(what), "{out:?}: {err}");
        assert!(run_files(tmp.path()).is_empty());
    }
    for dir in [&own, &bound, &inner] {
        assert_eq!(
            std::fs::read(dir.join("precious.txt")).unwrap(),
            b"not lorafs's"
        );
    }
    // Writing into a new directory inside a mount point is fine.
    let (ok, _, err) = materialize_from(tmp.path(), &base, own.join("merged"), &a, false);
    assert!(ok, "{err}");
}

#[test]
fn an_output_created_during_the_run_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = slow_inputs(tmp.path());
    let out = tmp.path().join("out");
    let before = run_files(tmp.path());
    let mut child = materialize_cmd(tmp.path(), &base, &out, &a, false)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_run_dir(tmp.path(), &before, &mut child);
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("theirs.txt"), b"someone else's").unwrap();
    let result = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success() && err.contains("was created by someone else"),
        "{err}"
    );
    assert_eq!(read_tree(&out).len(), 1, "their directory left as it was");
    assert_eq!(
        std::fs::read(out.join("theirs.txt")).unwrap(),
        b"someone else's"
    );
    assert_no_run_files(tmp.path());
}

#[test]
fn force_replaces_a_directory_or_file_and_leaves_nothing_beside() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let outside = tmp.path().join("outside.txt");
    std::fs::write(&outside, b"linked to, not removed").unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("old/read-only")).unwrap();
    std::fs::write(out.join("old/read-only/stale.bin"), b"stale").unwrap();
    chmod(&out.join("old/read-only"), 0o555);
    symlink(&outside, out.join("old/link")).unwrap();
    symlink(tmp.path(), out.join("dir-link")).unwrap();
    let (ok, _, err) = materialize_from(tmp.path(), &base, &out, &a, true);
    assert!(ok, "{err}");
    assert!(!out.join("old").exists() && !out.join("dir-link").exists());
    assert!(out.join("model.safetensors").exists());
    assert_eq!(std::fs::read(&outside).unwrap(), b"linked to, not removed");
    assert!(base.join("model.safetensors").exists() && a.exists());
    assert_no_run_files(tmp.path());

    let file_out = tmp.path().join("file-out");
    std::fs::write(&file_out, b"a file").unwrap();
    let (ok, _, err) = materialize_from(tmp.path(), &base, &file_out, &a, true);
    assert!(ok && file_out.join("config.json").exists(), "{err}");
    assert_no_run_files(tmp.path());
}

#[test]
fn force_never_replaces_anything_but_a_directory_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let fifo = tmp.path().join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let (ok, _, err) = materialize_from(tmp.path(), &base, &fifo, &a, true);
    assert!(
        !ok && err.contains("neither a directory nor a regular file"),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    let file = tmp.path().join("file");
    std::fs::write(&file, b"a file").unwrap();
    let (ok, _, err) = materialize_from(tmp.path(), &base, "file/", &a, true);
    assert!(!ok && err.contains("trailing `/`"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"a file");
    assert!(run_files(tmp.path()).is_empty());
}

#[test]
fn a_missing_parent_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    let (ok, _, err) = materialize_from(tmp.path(), &base, "no/such/out", &a, false);
    assert!(
        !ok && err.contains("parent directory no/such does not exist"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn signals_stop_the_run_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = slow_inputs(tmp.path());
    for (signal, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
        // Any signal whose default action ends the process, not only those three.
        (libc::SIGUSR1, "SIGUSR1"),
        (
            libc::SIGRTMIN() + 3,
            &format!("signal {}", libc::SIGRTMIN() + 3),
        ),
    ] {
        let out = tmp.path().join("out");
        let before = run_files(tmp.path());
        let mut child = materialize_cmd(tmp.path(), &base, &out, &a, false)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_run_dir(tmp.path(), &before, &mut child);
        kill(&child, signal);
        let result = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(128 + signal), "{name}: {err}");
        assert!(err.contains(&format!("interrupted by {name}")), "{err}");
        assert!(!out.exists(), "{name}");
        assert!(
            run_files(tmp.path()).is_empty(),
            "{name}: {:?}",
            run_files(tmp.path())
        );
    }
}

/// A child process killed (SIGKILL) and reaped on drop, even when the test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_run_is_removed_by_the_next_one_and_nothing_else_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = slow_inputs(tmp.path());
    let out = tmp.path().join("out");
    let start = || {
        let before = run_files(tmp.path());
        let mut child = materialize_cmd(tmp.path(), &base, &out, &a, false)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let dir = wait_for_run_dir(tmp.path(), &before, &mut child);
        (Running(child), dir)
    };
    let owner = |dir: &Path| PathBuf::from(format!("{}.owner", dir.display()));
    // A run that is still going (stopped), one killed, and names that only look like a run's.
    let (stopped, stopped_dir) = start();
    kill(&stopped.0, libc::SIGSTOP);
    let (mut killed, killed_dir) = start();
    kill(&killed.0, libc::SIGKILL);
    killed.0.wait().unwrap();
    assert!(killed_dir.exists() && owner(&killed_dir).exists());
    // A killed run's names whose marker another user owns (as one planted beside OUT by
    // someone who may write there would be): never acted on.
    let (mut foreign, foreign_dir) = start();
    kill(&foreign.0, libc::SIGKILL);
    foreign.0.wait().unwrap();
    std::os::unix::fs::lchown(owner(&foreign_dir), Some(65534), Some(65534)).unwrap();
    let unmarked = tmp.path().join(".out.lorafs-ABCDEFGHIJ");
    std::fs::create_dir(&unmarked).unwrap();
    std::fs::write(unmarked.join("someone's.txt"), b"x").unwrap();
    let bad_marker = tmp.path().join(".out.lorafs-KLMNOPQRST");
    std::fs::create_dir(&bad_marker).unwrap();
    std::fs::write(owner(&bad_marker), b"lorafs materialize run v1\npid 1\n").unwrap();

    let (small_base, small_a) = inputs(&tmp.path().join("small"));
    let (ok, _, err) = materialize_from(tmp.path(), &small_base, &out, &small_a, false);
    assert!(ok, "{err}");
    assert!(
        !killed_dir.exists() && !owner(&killed_dir).exists(),
        "the killed run's files are removed"
    );
    assert!(
        stopped_dir.exists() && owner(&stopped_dir).exists(),
        "a running run's files are kept"
    );
    assert!(unmarked.join("someone's.txt").exists() && bad_marker.exists());
    assert!(
        foreign_dir.exists() && owner(&foreign_dir).exists(),
        "another user's marker is not acted on"
    );
    std::fs::remove_dir_all(&foreign_dir).unwrap();
    std::fs::remove_file(owner(&foreign_dir)).unwrap();

    drop(stopped);
    let (ok, _, err) = materialize_from(tmp.path(), &small_base, &out, &small_a, true);
    assert!(ok, "{err}");
    assert!(
        !stopped_dir.exists() && !owner(&stopped_dir).exists(),
        "removed once its process is gone"
    );
    assert_eq!(
        run_files(tmp.path()),
        [
            ".out.lorafs-ABCDEFGHIJ",
            ".out.lorafs-KLMNOPQRST",
            ".out.lorafs-KLMNOPQRST.owner"
        ]
    );
}

#[test]
fn the_output_keeps_the_source_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = inputs(tmp.path());
    chmod(&base.join("config.json"), 0o600);
    chmod(&base.join("extra/empty.txt"), 0o640);
    // A file the adapter brings (its tokenizer) has the adapter file's bits.
    std::fs::write(a.join("tokenizer.json"), b"{}").unwrap();
    chmod(&a.join("tokenizer.json"), 0o660);
    chmod(&base.join("model.safetensors"), 0o444);
    // The merged file is also no more open than the adapter's files (see
    // `guarantees::a_materialized_merged_file_is_no_more_open_than_its_adapter`).
    chmod(&a.join("adapter_model.safetensors"), 0o644);
    // A linked file (as in a Hugging Face snapshot): the target's bits count, not the link's.
    let blob = tmp.path().join("blob");
    std::fs::write(&blob, b"linked\n").unwrap();
    chmod(&blob, 0o604);
    symlink(&blob, base.join("extra/linked.txt")).unwrap();
    chmod(&base.join("extra/nested/notes.txt"), 0o620);
    // A source in another group than the copy's: that group's members were others to it.
    std::os::unix::fs::chown(base.join("extra/nested/notes.txt"), None, Some(5678)).unwrap();
    chmod(&base.join("extra/nested/notes.txt"), 0o654);
    chmod(&base.join("extra/nested"), 0o555);
    chmod(&base.join("extra"), 0o750);
    chmod(&base, 0o751);
    let out = tmp.path().join("out");
    let (ok, _, err) = materialize_from(tmp.path(), &base, &out, &a, false);
    assert!(ok, "{err}");
    for (rel, want) in [
        ("config.json", 0o600),
        ("extra/empty.txt", 0o640),
        ("tokenizer.json", 0o660),
        ("model.safetensors", 0o444),
        ("extra/linked.txt", 0o604),
        ("extra/nested", 0o555),
        ("extra/nested/notes.txt", 0o644),
        ("extra", 0o750),
        ("", 0o751),
    ] {
        assert_eq!(
            mode(&out.join(rel)),
            want,
            "{rel}: {:o}",
            mode(&out.join(rel))
        );
    }
    assert!(!std::fs::symlink_metadata(out.join("extra/linked.txt"))
        .unwrap()
        .is_symlink());
    // A read-only output is replaced like any other.
    let (ok, _, err) = materialize_from(tmp.path(), &base, &out, &a, true);
    assert!(ok, "{err}");
    assert!(run_files(tmp.path()).is_empty());
}

#[test]
fn a_crash_between_the_two_renames_of_force_puts_the_old_output_back() {
    // Where the filesystem cannot exchange two names, `--force` moves OUT aside, then the new
    // tree in. A crash between the two leaves OUT missing and the old one aside: the next
    // run puts it back. The state is made from a killed run plus the old OUT moved aside.
    let tmp = tempfile::tempdir().unwrap();
    let (base, a) = slow_inputs(tmp.path());
    let out = tmp.path().join("out");
    let before = run_files(tmp.path());
    let mut child = materialize_cmd(tmp.path(), &base, &out, &a, false)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_dir = wait_for_run_dir(tmp.path(), &before, &mut child);
    kill(&child, libc::SIGKILL);
    child.wait().unwrap();
    let aside = PathBuf::from(format!("{}.old", run_dir.display()));
    std::fs::create_dir(&aside).unwrap();
    std::fs::write(aside.join("old.txt"), b"the old output").unwrap();

    let (ok, _, err) = materialize_from(tmp.path(), &base, &out, &a, false);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(out.join("old.txt")).unwrap(),
        b"the old output"
    );
    assert_no_run_files(tmp.path());
}
