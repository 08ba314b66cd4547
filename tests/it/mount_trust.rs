//! Mounted tests of what the mount promises beyond its bytes: it never lets anyone read more
//! than the sources let them, its stats file never hides a base file, and `mount` returns
//! however much the server logs first.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;

use crate::common::*;
use crate::mount::{can_mount, MountGuard};

const NOBODY: &str = "65534";

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `cat PATH` as user and group nobody, without supplementary groups: its bytes, or the
/// error `cat` printed.
fn read_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "cat",
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

fn assert_denied(path: &Path, what: &str) {
    match read_as_nobody(path) {
        Ok(_) => panic!("{what}: nobody read {}", path.display()),
        Err(err) => assert!(err.contains("Permission denied"), "{what}: {err}"),
    }
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
