//! Cases found by an independent hostile review after the "Trust" work: each test is one
//! input that broke a guarantee of docs/SAFETY.md, checked to hold now.

use std::ffi::OsString;
use std::path::Path;

use safetensors::Dtype;
use serde_json::json;

use crate::common::*;

const Q: &str = "model.layers.0.self_attn.q_proj";

/// Rewrite one tensor of an adapter's weights file with `values`.
fn set_values(adapter: &Path, key: &str, values: impl Fn(usize) -> f64) {
    let path = adapter.join("adapter_model.safetensors");
    let tensors = read_safetensors(&path)
        .into_iter()
        .map(|(name, (dtype, shape, old))| Tensor {
            values: if name == key {
                (0..old.len()).map(&values).collect()
            } else {
                old
            },
            name,
            dtype,
            shape,
        })
        .collect::<Vec<_>>();
    write_safetensors(&path, &tensors);
}

#[test]
fn finite_scales_and_factors_whose_delta_overflows_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let spec = BaseSpec {
            dtype,
            ..BaseSpec::default()
        };
        write_base(&tmp.path().join("base"), &spec);
        let adapter = tmp.path().join("a");
        let arg = |suffix: &str| OsString::from(format!("{}{suffix}", adapter.display()));
        let fresh = || write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
        let expect = ["adapter_model.safetensors", Q, "can reach", "Inf or NaN"];
        // Weights whose scale is a finite f32 but whose delta is beyond F16 (the refusal of
        // a scale that is not finite, `A:1e39`, left every weight below it to merge as Inf).
        if dtype == Dtype::F16 {
            for weight in [":1e30", ":1e6"] {
                fresh();
                refused(tmp.path(), &[arg(weight)], &expect);
            }
        }
        // Finite factors near the f32 limit with alternating signs: Inf - Inf = NaN in f32.
        fresh();
        let big = |i: usize| if i.is_multiple_of(2) { 3e38 } else { -3e38 };
        set_values(
            &adapter,
            &format!("base_model.model.{Q}.lora_A.weight"),
            big,
        );
        set_values(
            &adapter,
            &format!("base_model.model.{Q}.lora_B.weight"),
            big,
        );
        refused(tmp.path(), &[arg("")], &expect);
        // Two adapters each within bounds, whose summed delta is not.
        if dtype == Dtype::F16 {
            fresh();
            let other = tmp.path().join("b");
            write_adapter(&other, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
            let both = format!("{}:3e4", other.display());
            refused(tmp.path(), &[arg(":3e4"), both.into()], &expect);
        }
    }
}

#[test]
fn factors_holding_nan_or_inf_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let adapter = tmp.path().join("a");
    for (value, shown) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
        (-f64::INFINITY, "-inf"),
    ] {
        write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
        let key = format!("base_model.model.{Q}.lora_B.weight");
        set_values(&adapter, &key, |i| if i == 5 { value } else { 0.01 });
        refused(
            tmp.path(),
            &[adapter.clone().into()],
            &[&key, &format!("value 5 is {shown}"), "not finite"],
        );
    }
}

#[test]
fn trainable_token_rows_beyond_the_dtype_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        dtype: Dtype::F16,
        ..BaseSpec::default()
    };
    write_base(&tmp.path().join("base"), &spec);
    let adapter = tmp.path().join("a");
    write_config(
        &adapter,
        &json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                "trainable_token_indices": {"embed_tokens": [3]}}),
    );
    let key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
    let h = spec.hidden;
    write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[Tensor {
            name: key.into(),
            dtype: Dtype::F32,
            shape: vec![1, h],
            // Finite in f32, Inf in F16.
            values: (0..h).map(|j| if j == 2 { 1e6 } else { 0.5 }).collect(),
        }],
    );
    refused(
        tmp.path(),
        &[adapter.into()],
        &[key, "token row 3, value 2", "Inf"],
    );
}

/// `lorafs inspect BASE --adapter A`: (success, stderr, time taken).
fn inspect(base: &Path, adapter: &Path) -> (bool, String, std::time::Duration) {
    let start = std::time::Instant::now();
    let (ok, _, err) = run_lorafs([
        "inspect".as_ref(),
        base.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
    ]);
    (ok, err, start.elapsed())
}

#[test]
fn a_base_whose_links_reach_a_directory_twice_is_refused_at_once() {
    use std::os::unix::fs::symlink;
    let (tmp, _, base, adapter) = small_model();
    // Two links per level to the next level: 2^24 paths to one file, no loop, each path
    // within the kernel's 40 links. The walk followed every path: minutes and gigabytes.
    let levels = 24;
    for i in 0..levels {
        let dir = base.join(format!("d/{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["x", "y"] {
            symlink(format!("../{}", i + 1), dir.join(name)).unwrap();
        }
    }
    std::fs::create_dir_all(base.join(format!("d/{levels}"))).unwrap();
    std::fs::write(base.join(format!("d/{levels}/f")), b"x").unwrap();
    let (ok, err, took) = inspect(&base, &adapter);
    assert!(
        !ok && err.contains("again (through a symbolic link)"),
        "{err}"
    );
    assert!(took.as_secs() < 10, "{took:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(base.join("d")).unwrap();
    // A link to the base itself, deep down: refused naming the base, not after 32 levels.
    std::fs::create_dir_all(base.join("sub/deeper")).unwrap();
    symlink("../..", base.join("sub/deeper/up")).unwrap();
    let (ok, err, _) = inspect(&base, &adapter);
    assert!(
        !ok && err.contains("sub/deeper/up: is the directory"),
        "{err}"
    );
    // A link to a directory outside the base, reached once, is still followed.
    std::fs::remove_file(base.join("sub/deeper/up")).unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    symlink(&outside, base.join("sub/deeper/up")).unwrap();
    let (ok, err, _) = inspect(&base, &adapter);
    assert!(ok, "{err}");
}

#[test]
fn a_full_or_closed_stdout_is_an_error_or_nothing_never_a_panic() {
    use std::process::{Command, Stdio};
    let (tmp, _, base, adapter) = small_model();
    let inspect = || {
        let mut command = Command::new(lorafs_bin());
        command.args(["inspect".as_ref(), base.as_os_str(), "--adapter".as_ref()]);
        command.arg(&adapter).stderr(Stdio::piped());
        command
    };
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = inspect().stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write to stdout: No space left"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // A reader that closed its end before lorafs writes (`| head -c0`): quiet success.
    let mut child = inspect().stdout(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "{:?} {err}",
        out.status
    );
    // And an error with stderr full: exit code 1, no abort.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let status = Command::new(lorafs_bin())
        .args(["inspect".as_ref(), tmp.path().join("missing").as_os_str()])
        .args(["--adapter".as_ref(), adapter.as_os_str()])
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

#[test]
fn an_output_name_up_to_the_filesystem_limit_is_written() {
    let (tmp, _, base, adapter) = small_model();
    // Names of 231 to 255 bytes failed: the run's `.NAME.lorafs-ID.owner` was too long.
    for n in [231, 255] {
        let out = tmp.path().join("o".repeat(n));
        let (ok, _, err) = run_lorafs([
            "materialize".as_ref(),
            base.as_os_str(),
            out.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
        ]);
        assert!(ok, "{n}: {err}");
        assert!(out.join("model.safetensors").is_file());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "nothing beside OUT: {names:?}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn a_dora_row_whose_merged_norm_is_zero_is_refused_not_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    let (h, i) = (spec.hidden, spec.inter);
    let m = "model.layers.0.mlp.down_proj"; // (h, i)
                                            // Row 3 of W is zero (a pruned row), and so is row 3 of B: W + ΔW is zero there.
    let path = base.join("model.safetensors");
    let tensors: Vec<Tensor> = read_safetensors(&path)
        .into_iter()
        .map(|(name, (dtype, shape, mut values))| {
            if name == format!("{m}.weight") {
                values[3 * i..4 * i].fill(0.0);
            }
            Tensor {
                name,
                dtype,
                shape,
                values,
            }
        })
        .collect();
    write_safetensors(&path, &tensors);
    let adapter = tmp.path().join("a");
    write_config(
        &adapter,
        &json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true,
                "target_modules": ["down_proj"]}),
    );
    let p = format!("base_model.model.{m}");
    let tensor = |name: String, shape: Vec<usize>, values: Vec<f64>| Tensor {
        name,
        dtype: Dtype::F32,
        shape,
        values,
    };
    let b = (0..h * 4)
        .map(|k| if k / 4 == 3 { 0.0 } else { 0.1 })
        .collect();
    write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[
            tensor(format!("{p}.lora_A.weight"), vec![4, i], vec![0.2; 4 * i]),
            tensor(format!("{p}.lora_B.weight"), vec![h, 4], b),
            tensor(format!("{p}.lora_magnitude_vector"), vec![h], vec![1.0; h]),
        ],
    );
    // PEFT merges row 3 into NaN (m / 0 · 0); lorafs wrote the same with exit code 0.
    let out = tmp.path().join("out");
    let (ok, _, err) = run_lorafs([
        "materialize".as_ref(),
        base.as_os_str(),
        out.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
    ]);
    assert!(!ok, "accepted");
    assert!(
        err.contains(&format!("`{m}.weight`: row 3: W + ΔW is all zeros")),
        "{err}"
    );
    assert!(!out.exists());
}

/// Run `lorafs inspect BASE --adapter A` for at most 20 s: (success, stderr); a run still
/// going then is killed and reported as a hang.
fn inspect_within(base: &Path, adapter: &Path) -> (bool, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(lorafs_bin())
        .args(["inspect".as_ref(), base.as_os_str(), "--adapter".as_ref()])
        .arg(adapter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() > 20 {
            child.kill().unwrap();
            child.wait().unwrap();
            return (false, "hung (killed after 20 s)".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().success(), err)
}

#[test]
fn inputs_that_are_fifos_devices_or_huge_are_refused_not_read_without_end() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    let fifo = |path: &Path| {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    let not_regular = "is not a regular file";
    // Each file in turn: a FIFO (the open blocked for ever), a link to /dev/zero (read
    // without end: 3 GB in 3 s for config.json), or, for the base's JSON, a sparse 100 GB.
    for (in_base, name) in [
        (true, "config.json"),
        (false, "adapter_config.json"),
        (false, "adapter_model.safetensors"),
    ] {
        for kind in ["fifo", "device", "huge"] {
            write_base(&base, &spec);
            write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
            let path = if in_base { &base } else { &adapter }.join(name);
            std::fs::remove_file(&path).unwrap();
            let expect = match kind {
                "fifo" => {
                    fifo(&path);
                    not_regular
                }
                "device" => {
                    symlink("/dev/zero", &path).unwrap();
                    not_regular
                }
                _ if in_base => {
                    let file = std::fs::File::create(&path).unwrap();
                    file.set_len(100 << 30).unwrap();
                    "larger than 64 MiB"
                }
                _ => continue,
            };
            let (ok, err) = inspect_within(&base, &adapter);
            assert!(!ok, "{name} {kind}: accepted");
            assert!(
                err.contains(name) && err.contains(expect),
                "{name} {kind}: {err}"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_base_linking_into_proc_or_sys_is_refused() {
    // `/proc/kcore` claims terabytes; other such files hold kernel state, not model data.
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
    for target in [
        "/proc/self/status",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ] {
        if !Path::new(target).is_file() {
            eprintln!("{target} is not on this machine: that case is not checked");
            continue;
        }
        let link = base.join("notes.txt");
        std::os::unix::fs::symlink(target, &link).unwrap();
        let (ok, err) = inspect_within(&base, &adapter);
        assert!(
            !ok && err.contains("notes.txt") && err.contains("kernel pseudo filesystem"),
            "{target}: {err}"
        );
        std::fs::remove_file(&link).unwrap();
    }
    let (ok, err) = inspect_within(&base, &adapter);
    assert!(ok, "{err}");
}

#[test]
fn a_materialized_merged_file_is_no_more_open_than_its_adapter() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    chmod(&base.join("model.safetensors"), 0o644);
    chmod(&base.join("config.json"), 0o644);
    // The merged weights hold the adapter's delta: they were written 0644 from a 0600 adapter.
    for (weights, config, want) in [
        (0o600, 0o644, 0o600),
        (0o640, 0o644, 0o640),
        (0o644, 0o640, 0o640),
        (0o644, 0o644, 0o644),
    ] {
        chmod(&adapter.join("adapter_model.safetensors"), weights);
        chmod(&adapter.join("adapter_config.json"), config);
        let out = tmp.path().join("out");
        let (ok, _, err) = run_lorafs([
            "materialize".as_ref(),
            base.as_os_str(),
            out.as_os_str(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--force".as_ref(),
        ]);
        assert!(ok, "{err}");
        let got = mode(&out.join("model.safetensors"));
        assert_eq!(got, want, "{weights:o} {config:o}: {got:o}");
        // A file the adapters do not touch keeps the base file's bits.
        assert_eq!(mode(&out.join("config.json")), 0o644);
    }
}
