//! `lorafs view`: what the command refuses before it reaches a server. The control channel
//! itself is tested in `src/control/tests.rs` against a served fake registry.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::*;
use crate::mount::{can_mount, MountGuard};

/// The `lorafs: error:` line of a failed run.
fn error_of(args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_lorafs(args);
    assert!(!ok, "lorafs {args:?} succeeded: {stdout}");
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {stderr}");
    line.strip_prefix("lorafs: error: ")
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
        .to_string()
}

#[test]
fn a_directory_that_is_not_a_mount_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    for args in [
        vec!["view", "ls", dir],
        vec!["view", "ls", "--json", dir],
        vec!["view", "rm", dir, "chat"],
    ] {
        assert_eq!(
            error_of(&args),
            format!("{dir} is not a lorafs mount (nothing is mounted there)")
        );
    }
    assert_eq!(
        error_of(&["view", "ls", "/proc"]),
        "/proc is not a lorafs mount (it is a proc mount)"
    );
}

#[test]
fn names_and_specs_are_checked_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let adapter = tmp.path().join("lora");
    std::fs::create_dir(&adapter).unwrap();
    let adapter = adapter.to_str().unwrap();
    let trailing_comma = format!("{adapter},");
    let infinite = format!("{adapter}:inf");
    let cases = [
        (vec!["add", dir, "../up", adapter], "starting with '.'"),
        (vec!["set", dir, "a b", adapter], "a character other than"),
        (vec!["rm", dir, "a//b"], "an empty component"),
        (vec!["add", dir, "ok", ""], "empty view spec"),
        (vec!["add", dir, "ok", &trailing_comma], "empty adapter"),
        (vec!["add", dir, "ok", &infinite], "not a finite"),
        (vec!["set", dir, "ok", "/no/such/lora:0.5"], "/no/such/lora"),
    ];
    for (args, what) in cases {
        let args = [&["view"][..], &args].concat();
        let error = error_of(&args);
        assert!(error.contains(what), "lorafs {args:?}: {error}");
    }
    // A good name and spec get as far as the mount point.
    let error = error_of(&["view", "add", dir, "ok", &format!("{adapter}:0.5")]);
    assert!(error.ends_with("is not a lorafs mount (nothing is mounted there)"));
}

#[test]
fn only_the_user_who_mounted_or_root_may_use_the_views() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let adapter_args: Vec<OsString> = vec!["--adapter".into(), adapter.clone().into()];
    let guard = MountGuard::new(&base, &tmp.path().join("mnt"), &adapter_args);
    let mnt = guard.mountpoint.to_str().unwrap();
    let as_nobody = |args: &[&str]| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(lorafs_bin())
            .args(args);
        output_of(&mut command)
    };
    let (ok, _, stderr) = as_nobody(&["view", "ls", mnt]);
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "lorafs: error: permission denied: only the user who mounted {mnt} (uid 0) or \
             root may list its views"
        )
    );
    let spec = adapter.to_str().unwrap();
    let (ok, _, stderr) = as_nobody(&["view", "add", mnt, "x", spec]);
    assert!(!ok);
    assert!(
        stderr.contains("(uid 0) or root may change its views"),
        "{stderr}"
    );
}

/// `view ls` on a mount of one merged model: nothing to list, said on stderr (text) or an
/// empty array (JSON), and success; changing views is refused.
#[test]
fn a_mount_without_views_lists_none_and_says_so() {
    if !can_mount() {
        return;
    }
    let (tmp, _spec, base, adapter) = small_model();
    let adapter_args: Vec<OsString> = vec!["--adapter".into(), adapter.clone().into()];
    let guard = MountGuard::new(&base, &tmp.path().join("mnt"), &adapter_args);
    let mnt = guard.mountpoint.to_str().unwrap();
    let (ok, stdout, stderr) = run_lorafs(["view", "ls", mnt]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "lorafs: {mnt} was mounted without views (--view/--views/--catalog): no views to \
             list\n"
        )
    );
    let (ok, stdout, stderr) = run_lorafs(["view", "ls", "--json", mnt]);
    assert!(ok, "{stderr}");
    assert_eq!((stdout.as_str(), stderr.as_str()), ("[]\n", ""));
    assert_eq!(
        error_of(&["view", "rm", mnt, "x"]),
        format!("{mnt} was mounted without views (--view/--views/--catalog)")
    );
}
