//! Mounted tests of what the mount promises beyond its bytes: it never lets anyone read more
//! than the sources let them, its stats file never hides a base file, and `mount` returns
//! however much the server logs first.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;

use crate::common::*;
use crate::mount::{can_mount, mountinfo_line, MountGuard};

const NOBODY: &str = "65534";

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `PROGRAM PATH` as user and group nobody, whose only supplementary groups are `groups`:
/// its output, or the error it printed.
fn as_nobody(groups: &[u32], program: &str, path: &Path) -> Result<Vec<u8>, String> {
    let groups = match groups {
        [] => "--clear-groups".to_string(),
        _ => format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            &groups,
            program,
        ])
        .arg(path)
        .output()
        .expect("setpriv (util-linux) runs");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `cat PATH` as user and group nobody, without supplementary groups.
fn read_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    as_nobody(&[], "cat", path)
}

fn assert_refused(result: Result<Vec<u8>, String>, path: &Path, what: &str) {
    match result {
        Ok(_) => panic!("{what}: nobody read {}", path.display()),
        Err(err) => assert!(err.contains("Permission denied"), "{what}: {err}"),
    }
}

fn assert_denied(path: &Path, what: &str) {
    assert_refused(read_as_nobody(path), path, what);
}

/// Nobody cannot list the directory `path`.
fn assert_unlisted(path: &Path, what: &str) {
    assert_refused(as_nobody(&[], "ls", path), path, what);
}

/// (mode bits, uid, gid) as `stat` shows them.
fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn the_mount_serves_its_sources_modes_and_owners_and_the_kernel_enforces_them() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // tempdirs are 0700: open the way for nobody, as a shared directory would be.
    chmod(tmp.path(), 0o755);
    let spec = BaseSpec::default();
    let (base, adapter, outside) = (
        tmp.path().join("base"),
        tmp.path().join("adapter"),
        tmp.path().join("outside"),
    );
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, ""));
    std::fs::create_dir(&outside).unwrap();
    let file = |dir: &Path, name: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{name}\n")).unwrap();
        chmod(&path, mode);
        path
    };
    chmod(&base, 0o755);
    chmod(&base.join("config.json"), 0o644);
    file(&base, "secret.txt", 0o600);
    file(&base, "run.sh", 0o777);
    let notes = base.join("extra/nested/notes.txt");
    std::os::unix::fs::chown(&notes, Some(1234), Some(5678)).unwrap();
    chmod(&notes, 0o640);
    std::fs::create_dir(base.join("private")).unwrap();
    file(&base.join("private"), "inside.txt", 0o644);
    chmod(&base.join("private"), 0o700);
    // Links out of the base, as a Hugging Face snapshot's into blobs/: the target counts.
    let hidden = file(&outside, "hidden.txt", 0o600);
    let shown = file(&outside, "shown.txt", 0o644);
    std::os::unix::fs::symlink(&hidden, base.join("linked-hidden.txt")).unwrap();
    std::os::unix::fs::symlink(&shown, base.join("linked-shown.txt")).unwrap();
    // The adapter's tokenizer replaces the base's (0644): the adapter file's mode counts.
    file(&adapter, "tokenizer.json", 0o600);

    let mnt = tmp.path().join("mnt");
    let adapter_args: Vec<OsString> =
        vec!["--adapter".into(), adapter.into(), "--allow-other".into()];
    let guard = MountGuard::new(&base, &mnt, &adapter_args);
    let m = &guard.mountpoint;

    assert_eq!(
        read_as_nobody(&m.join("config.json")).as_deref(),
        Ok(&std::fs::read(base.join("config.json")).unwrap()[..]),
        "a 0644 file is readable by others"
    );
    assert_eq!(
        read_as_nobody(&m.join("linked-shown.txt")).as_deref(),
        Ok(&b"shown.txt\n"[..]),
        "a link to a 0644 file is followed"
    );
    assert_denied(&m.join("secret.txt"), "a 0600 base file");
    assert_denied(&m.join("linked-hidden.txt"), "a link to a 0600 file");
    assert_denied(&m.join("tokenizer.json"), "an adapter's 0600 tokenizer");
    assert_denied(&m.join("private/inside.txt"), "a file in a 0700 directory");
    assert_denied(&m.join(".lorafs-stats"), "the stats file");

    assert_eq!(
        owner_and_mode(m),
        (0o555, 0, 0),
        "the root: the base directory's"
    );
    assert_eq!(owner_and_mode(&m.join("secret.txt")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("run.sh")), (0o555, 0, 0));
    assert_eq!(owner_and_mode(&m.join("linked-hidden.txt")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("tokenizer.json")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("private")), (0o500, 0, 0));
    assert_eq!(
        owner_and_mode(&m.join("extra/nested/notes.txt")),
        (0o440, 1234, 5678)
    );
    assert_eq!(owner_and_mode(&m.join(".lorafs-stats")), (0o400, 0, 0));
    assert!(
        std::fs::read_to_string(m.join(".lorafs-stats"))
            .unwrap()
            .contains("panics_caught 0\n"),
        "the mounting user reads the stats"
    );
}

/// A temporary directory holding a default base at `base/`, both open to everyone (0755),
/// or `None` where mounting is impossible.
fn open_base() -> Option<(tempfile::TempDir, PathBuf)> {
    if !can_mount() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let base = tmp.path().join("base");
    write_base(&base, &BaseSpec::default());
    chmod(&base, 0o755);
    Some((tmp, base))
}

/// `dir/name` holding its name and a newline, with `mode`.
fn write_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{name}\n")).unwrap();
    chmod(&path, mode);
    path
}

/// `--adapter DIR --allow-other` with a fresh adapter for the default base in `dir`.
fn shared_adapter_args(dir: &Path) -> Vec<OsString> {
    let adapter = dir.join("adapter");
    write_adapter(&adapter, &AdapterSpec::new(&BaseSpec::default(), 4, ""));
    vec!["--adapter".into(), adapter.into(), "--allow-other".into()]
}

#[test]
fn a_base_inside_a_closed_directory_is_closed_through_the_mount() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    // A base that is open itself (0755, 0644 files), in root's 0700 home.
    let home = tmp.path().join("home");
    let base = home.join("base");
    write_base(&base, &BaseSpec::default());
    chmod(&base, 0o755);
    chmod(&base.join("config.json"), 0o644);
    chmod(&home, 0o700);
    assert_denied(&base.join("config.json"), "the source itself");

    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &shared_adapter_args(tmp.path()),
    );
    let m = &guard.mountpoint;
    assert_unlisted(m, "the root of a base in a 0700 directory");
    assert_denied(
        &m.join("config.json"),
        "a 0644 file of a base in a 0700 directory",
    );
    assert_eq!(
        owner_and_mode(m),
        (0o500, 0, 0),
        "the root: the base's 0755, less what its 0700 parent keeps out"
    );
    assert_eq!(
        owner_and_mode(&m.join("config.json")),
        (0o444, 0, 0),
        "a file: its own mode (the root keeps others out)"
    );
    assert!(
        std::fs::read(m.join("config.json")).is_ok(),
        "root reads it, as it reads the source"
    );
}

#[test]
fn links_into_closed_directories_are_closed_through_the_mount() {
    let Some((tmp, base)) = open_base() else {
        return;
    };
    let dir = |path: PathBuf, mode: u32, group: Option<u32>| {
        std::fs::create_dir_all(&path).unwrap();
        std::os::unix::fs::chown(&path, None, group).unwrap();
        chmod(&path, mode);
        path
    };
    // Targets outside the base: 0644 files in an open directory, in a closed one, in a
    // directory of a closed one, and a 0640 file of group 5678 in a 0750 directory of it.
    let open = dir(tmp.path().join("open"), 0o755, None);
    let closed = dir(tmp.path().join("closed"), 0o700, None);
    let closed_sub = dir(closed.join("sub"), 0o755, None);
    let team = dir(tmp.path().join("team"), 0o750, Some(5678));
    let link = |target: &Path, name: &str| {
        std::os::unix::fs::symlink(target, base.join(name)).unwrap();
    };
    link(&write_file(&open, "open.txt", 0o644), "linked-open.txt");
    link(
        &write_file(&closed, "closed.txt", 0o644),
        "linked-closed.txt",
    );
    write_file(&closed_sub, "deep.txt", 0o644);
    link(&closed_sub, "linked-dir");
    let shared = write_file(&team, "team.txt", 0o640);
    std::os::unix::fs::chown(&shared, None, Some(5678)).unwrap();
    link(&shared, "linked-team.txt");
    // A link inside the base into the base's own 0700 directory.
    let private = dir(base.join("private"), 0o700, None);
    write_file(&private, "inside.txt", 0o644);
    link(Path::new("private/inside.txt"), "linked-private.txt");

    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &shared_adapter_args(tmp.path()),
    );
    let m = &guard.mountpoint;
    assert_eq!(
        read_as_nobody(&m.join("linked-open.txt")).as_deref(),
        Ok(&b"open.txt\n"[..]),
        "a link to a 0644 file in an open directory is followed"
    );
    assert_denied(&m.join("linked-closed.txt"), "a link into a 0700 directory");
    assert_denied(
        &m.join("linked-private.txt"),
        "a link into the base's 0700 directory",
    );
    assert_unlisted(&m.join("linked-dir"), "a link to a directory in a 0700 one");
    assert_denied(
        &m.join("linked-dir/deep.txt"),
        "a file below a link into a 0700 directory",
    );
    assert_denied(
        &m.join("linked-team.txt"),
        "a link to a group's file, not in the group",
    );
    assert_eq!(
        as_nobody(&[5678], "cat", &m.join("linked-team.txt")).as_deref(),
        Ok(&b"team.txt\n"[..]),
        "a member of the group reads its file in its 0750 directory"
    );

    assert_eq!(owner_and_mode(&m.join("linked-open.txt")), (0o444, 0, 0));
    assert_eq!(owner_and_mode(&m.join("linked-closed.txt")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("linked-private.txt")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("linked-dir")), (0o500, 0, 0));
    assert_eq!(
        owner_and_mode(&m.join("linked-dir/deep.txt")),
        (0o444, 0, 0)
    );
    assert_eq!(owner_and_mode(&m.join("linked-team.txt")), (0o440, 0, 5678));
}

#[test]
fn a_merged_file_is_open_only_to_those_who_may_read_the_adapter() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let spec = BaseSpec::default();
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    chmod(&base, 0o755);
    chmod(&base.join("config.json"), 0o644);
    chmod(&base.join("model.safetensors"), 0o644);
    // (what, the adapter's parent directory's mode, its weights file's mode, nobody reads
    // the merged file)
    let cases = [
        ("an adapter in a 0700 directory", 0o700, 0o644, false),
        ("an adapter whose weights are 0600", 0o755, 0o600, false),
        ("an adapter open to all", 0o755, 0o644, true),
    ];
    for (i, (what, dir_mode, weights_mode, readable)) in cases.into_iter().enumerate() {
        let parent = tmp.path().join(format!("adapter-{i}"));
        let adapter = parent.join("adapter");
        write_adapter(&adapter, &AdapterSpec::new(&spec, 4, ""));
        chmod(&adapter, 0o755);
        chmod(&adapter.join("adapter_config.json"), 0o644);
        chmod(&adapter.join("adapter_model.safetensors"), weights_mode);
        chmod(&parent, dir_mode);
        // One merged model at the root, a named view, a catalog view: the same narrowing.
        let forms: [(&str, Vec<OsString>, &str); 3] = [
            (
                "--adapter",
                vec!["--adapter".into(), adapter.clone().into()],
                "",
            ),
            (
                "--view",
                vec!["--view".into(), format!("v={}", adapter.display()).into()],
                "v",
            ),
            (
                "--catalog",
                vec!["--catalog".into(), parent.clone().into()],
                "adapter",
            ),
        ];
        for (form, mut args, dir) in forms {
            args.push("--allow-other".into());
            let mnt = tmp
                .path()
                .join(format!("mnt-{i}-{}", form.trim_start_matches('-')));
            let guard = MountGuard::new(&base, &mnt, &args);
            let m = guard.mountpoint.join(dir);
            let what = format!("{what} ({form})");
            assert_eq!(
                read_as_nobody(&m.join("config.json")).as_deref(),
                Ok(&std::fs::read(base.join("config.json")).unwrap()[..]),
                "{what}: a file the adapter does not change stays readable"
            );
            let merged = m.join("model.safetensors");
            if readable {
                assert_eq!(
                    read_as_nobody(&merged).as_deref(),
                    Ok(&std::fs::read(&merged).unwrap()[..]),
                    "{what}"
                );
                assert_eq!(owner_and_mode(&merged), (0o444, 0, 0), "{what}");
            } else {
                assert_denied(&merged, &what);
                assert_eq!(owner_and_mode(&merged), (0o400, 0, 0), "{what}");
            }
        }
    }
}

/// Give `path` an ACL that refuses user `uid` everything and leaves its mode as it is
/// (`setfacl -m u:UID:- PATH`), in the kernel's `system.posix_acl_access` format.
fn refuse_by_acl(path: &Path, uid: u32) {
    let mode = std::fs::metadata(path).unwrap().mode();
    const ANY: u32 = u32::MAX;
    // (tag, permission bits, id): owner, the named user, group, mask, other.
    let entries = [
        (0x01u16, (mode >> 6) & 7, ANY),
        (0x02, 0, uid),
        (0x04, (mode >> 3) & 7, ANY),
        (0x10, (mode >> 3) & 7, ANY),
        (0x20, mode & 7, ANY),
    ];
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        acl.extend(tag.to_le_bytes());
        acl.extend((perm as u16).to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    rustix::fs::setxattr(
        path,
        "system.posix_acl_access",
        &acl,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().mode(), mode);
}

#[test]
fn an_acl_that_refuses_a_user_refuses_them_through_the_mount() {
    let Some((tmp, base)) = open_base() else {
        return;
    };
    let plain = write_file(&base, "plain.txt", 0o644);
    let refused = write_file(&base, "refused.txt", 0o644);
    refuse_by_acl(&refused, 65534);
    // A link to a 0644 file in a 0755 directory whose ACL refuses nobody.
    let dir = tmp.path().join("acl-dir");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let target = write_file(&dir, "target.txt", 0o644);
    refuse_by_acl(&dir, 65534);
    std::os::unix::fs::symlink(&target, base.join("linked.txt")).unwrap();
    assert_denied(&refused, "the source file itself");
    assert_denied(&target, "the link's target itself");

    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &shared_adapter_args(tmp.path()),
    );
    let m = &guard.mountpoint;
    assert_eq!(
        read_as_nobody(&m.join("plain.txt")).as_deref(),
        Ok(&std::fs::read(&plain).unwrap()[..]),
        "a 0644 file without an ACL"
    );
    assert_denied(
        &m.join("refused.txt"),
        "a 0644 file whose ACL refuses nobody",
    );
    assert_denied(
        &m.join("linked.txt"),
        "a link into a directory whose ACL refuses nobody",
    );
    assert_eq!(owner_and_mode(&m.join("plain.txt")), (0o444, 0, 0));
    assert_eq!(owner_and_mode(&m.join("refused.txt")), (0o400, 0, 0));
    assert_eq!(owner_and_mode(&m.join("linked.txt")), (0o400, 0, 0));
}

#[test]
fn a_base_file_named_like_the_stats_file_is_served_as_is() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, ""));
    std::fs::write(base.join(".lorafs-stats"), b"the model's own file\n").unwrap();
    let guard = MountGuard::new(
        &base,
        &tmp.path().join("mnt"),
        &["--adapter".into(), adapter.into()],
    );
    let served = read_tree(&guard.mountpoint);
    assert_eq!(
        served.get(Path::new(".lorafs-stats")).map(|b| &b[..]),
        Some(&b"the model's own file\n"[..]),
        "listed and served with its bytes"
    );
}

/// A script the base lets run runs from the mount (its mode is kept), but not from a mount
/// with `--noexec` (fstab `noexec`), which the kernel shows in the mount's options.
#[test]
fn noexec_keeps_what_the_base_lets_run_from_running() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    std::fs::write(base.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    chmod(&base.join("run.sh"), 0o755);
    for noexec in [false, true] {
        let mut args: Vec<OsString> = vec!["--adapter".into(), adapter.clone().into()];
        if noexec {
            args.push("--noexec".into());
        }
        let guard = MountGuard::new(&base, &tmp.path().join("mnt"), &args);
        let script = guard.mountpoint.join("run.sh");
        let ran = Command::new(&script).output();
        let line = mountinfo_line(&guard.mountpoint).expect("the mount is in mountinfo");
        let options = line.split(' ').nth(5).unwrap();
        assert_eq!(
            options.split(',').any(|o| o == "noexec"),
            noexec,
            "{options}"
        );
        match ran {
            Ok(out) if !noexec => assert_eq!(out.stdout, b"ran\n"),
            Err(e) if noexec => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied),
            other => panic!(
                "noexec {noexec}: running {} gave {other:?}",
                script.display()
            ),
        }
    }
}

/// A base of many layers and an adapter whose config says r=3 on every module while its
/// factors have rank 2: one warning per module, far more than a pipe holds.
fn noisy_inputs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let spec = BaseSpec {
        dtype: Dtype::F16,
        layers: 100,
        hidden: 8,
        kv: 8,
        inter: 8,
        vocab: 16,
        ..BaseSpec::default()
    };
    let (base, adapter) = (dir.join("base"), dir.join("adapter"));
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 2, ""));
    let config_path = adapter.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["r"] = 3.into();
    write_config(&adapter, &config);
    (base, adapter)
}

#[test]
fn mount_returns_when_the_server_logs_more_than_a_pipe_holds_before_it_is_ready() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = noisy_inputs(tmp.path());
    let (ok, _, warnings) = run_lorafs([
        "inspect".as_ref(),
        base.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
    ]);
    assert!(ok, "{warnings}");
    assert!(
        warnings.len() > 64 << 10,
        "the inputs log only {} bytes of warnings",
        warnings.len()
    );

    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut mount = Command::new(lorafs_bin())
        .arg("mount")
        .arg(&base)
        .arg(&mnt)
        .arg("--adapter")
        .arg(&adapter)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Unmounts whatever happens below.
    let guard = MountGuard {
        mountpoint: mnt.canonicalize().unwrap(),
    };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = mount.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            mount.kill().unwrap();
            mount.wait().unwrap();
            panic!("`lorafs mount` hangs: its server blocked writing to stderr");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "mount: {status}");
    assert_eq!(
        std::fs::read(guard.mountpoint.join("config.json")).unwrap(),
        std::fs::read(base.join("config.json")).unwrap()
    );
}

/// Kill the background servers whose command line names `mnt` (a server that never got
/// ready has no stats file to give its pid).
fn kill_servers_of(mnt: &Path) {
    let needle = mnt.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|arg| arg == needle) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_log_file_that_cannot_be_opened_fails_the_mount_at_once() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let (base, adapter, mnt) = (
        tmp.path().join("base"),
        tmp.path().join("adapter"),
        tmp.path().join("mnt"),
    );
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, ""));
    std::fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::symlink(&mnt, tmp.path().join("link")).unwrap();
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let cases = [
        (mnt.join("log.txt"), "is inside the mount point"),
        (tmp.path().join("link/log.txt"), "is inside the mount point"),
        // Opening a FIFO nobody reads used to block for ever after mounting.
        (fifo, "cannot open log file"),
        (tmp.path().join("missing/log.txt"), "cannot open log file"),
    ];
    for (log, why) in cases {
        let mut mount = Command::new(lorafs_bin())
            .arg("mount")
            .arg(&base)
            .arg(&mnt)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--log-file")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while mount.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                // The server waits on a lookup in its own mount that it will never serve.
                kill_servers_of(&mnt);
                mount.kill().unwrap();
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
                panic!("{}: `lorafs mount` hangs", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = mount.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: mounted", log.display());
        assert!(
            err.contains(why) && err.contains(&*log.to_string_lossy()),
            "{}: {err}",
            log.display()
        );
        assert!(!crate::mount::is_mounted(&mnt.canonicalize().unwrap()));
        assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0, "{err}");
    }
}

#[test]
fn a_source_closed_by_chmod_after_mounting_is_not_served_from_the_page_cache() {
    let Some((tmp, base)) = open_base() else {
        return;
    };
    let notes = write_file(&base, "notes.txt", 0o644);
    let args = shared_adapter_args(tmp.path());
    let weights = tmp.path().join("adapter/adapter_model.safetensors");
    for (path, mode) in [
        (base.join("config.json"), 0o644),
        (base.join("model.safetensors"), 0o644),
        (tmp.path().join("adapter"), 0o755),
        (tmp.path().join("adapter/adapter_config.json"), 0o644),
        (weights.clone(), 0o644),
    ] {
        chmod(&path, mode);
    }
    let guard = MountGuard::new(&base, &tmp.path().join("mnt"), &args);
    let (m_notes, m_model) = (
        guard.mountpoint.join("notes.txt"),
        guard.mountpoint.join("model.safetensors"),
    );
    // Read whole, so that the kernel's page cache holds both files.
    let merged = std::fs::read(&m_model).unwrap();
    assert_eq!(read_as_nobody(&m_notes).unwrap(), b"notes.txt\n");
    assert_eq!(read_as_nobody(&m_model).unwrap(), merged);

    // Their owners close them; the served modes are those stat'ed at mount time.
    chmod(&notes, 0o600);
    chmod(&weights, 0o600);
    for path in [&m_notes, &m_model] {
        match read_as_nobody(path) {
            Ok(_) => panic!("nobody read {} once its source was 0600", path.display()),
            Err(err) => assert!(err.contains("Input/output error"), "{err}"),
        }
        let err = std::fs::read(path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}", path.display());
    }
    assert_eq!(
        std::fs::read(guard.mountpoint.join("config.json")).unwrap(),
        std::fs::read(base.join("config.json")).unwrap(),
        "files whose sources did not change are still served"
    );
}
