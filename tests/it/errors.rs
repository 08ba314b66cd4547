//! Bad input: one clear message naming the file (and tensor), a non-zero exit, nothing at OUT.

use std::path::Path;

use safetensors::Dtype;
use serde_json::json;

use crate::common::*;

/// Make a valid base + adapter, break them with `mutate`, run `materialize`, and check that
/// it fails with a message containing every string of `expect`, leaving nothing at OUT.
fn fails(mutate: impl FnOnce(&Path, &Path), expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = (
        tmp.path().join("base"),
        tmp.path().join("a"),
        tmp.path().join("out"),
    );
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn"));
    mutate(&base, &adapter);
    let (ok, _, err) = run_lorafs([
        "materialize".as_ref(),
        base.as_os_str(),
        out.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
    ]);
    assert!(!ok, "materialize should fail");
    for e in expect {
        assert!(err.contains(e), "message should contain {e:?}: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing at OUT");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "base" && name != "a")
        .collect();
    assert!(leftovers.is_empty(), "nothing left behind: {leftovers:?}");
}

fn set_header(file: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

fn adapter_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[test]
fn missing_base_directory() {
    fails(
        |base, _| std::fs::remove_dir_all(base).unwrap(),
        &["base", "No such file"],
    );
}

#[test]
fn missing_adapter_config() {
    fails(
        |_, a| std::fs::remove_file(a.join("adapter_config.json")).unwrap(),
        &["adapter_config.json", "No such file"],
    );
}

#[test]
fn bad_json() {
    fails(
        |_, a| std::fs::write(a.join("adapter_config.json"), b"{\"r\": 4,").unwrap(),
        &["adapter_config.json", "invalid JSON"],
    );
}

#[test]
fn truncated_safetensors() {
    fails(
        |base, _| {
            let f = base.join("model.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            std::fs::write(&f, &bytes[..200]).unwrap();
        },
        &[
            "model.safetensors",
            "corrupt safetensors",
            "runs past the end",
        ],
    );
}

#[test]
fn data_past_the_end_of_the_file() {
    fails(
        |base, _| {
            set_header(&base.join("model.safetensors"), |h| {
                // Grow the last tensor past the end of the file, shape and offsets alike.
                let last = h
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
                    .map(|(k, _)| k.clone())
                    .unwrap();
                let t = h[&last].as_object_mut().unwrap();
                let start = t["data_offsets"][0].as_u64().unwrap();
                let end = t["data_offsets"][1].as_u64().unwrap();
                t["data_offsets"] = json!([start, end + 64]);
                t["shape"] = json!([(end - start + 64) / 2]);
            })
        },
        &["model.safetensors", "do not end at the end of the file"],
    );
}

#[test]
fn shape_that_does_not_match_offsets() {
    fails(
        |base, _| {
            set_header(&base.join("model.safetensors"), |h| {
                h["model.norm.weight"]["shape"] = json!([47]);
            })
        },
        &[
            "model.safetensors",
            "model.norm.weight",
            "do not match its shape",
        ],
    );
}

#[test]
fn tensor_named_twice_in_a_header() {
    fails(
        |base, _| {
            // Hand-written: a JSON object cannot hold the key twice once parsed.
            let file = base.join("model.safetensors");
            let bytes = std::fs::read(&file).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
            let mut json = text
                .trim_end()
                .replace("\"lm_head.weight\"", "\"model.norm.weight\"")
                .into_bytes();
            while !json.len().is_multiple_of(8) {
                json.push(b' ');
            }
            let mut out = (json.len() as u64).to_le_bytes().to_vec();
            out.extend(json);
            out.extend(&bytes[8 + n..]);
            std::fs::write(&file, out).unwrap();
        },
        &[
            "model.safetensors",
            "tensor `model.norm.weight` appears twice in the header",
        ],
    );
}

/// Only spaces may follow the header's JSON (the writer's padding), as the safetensors
/// crate's own reader requires: the header is parsed as it is read, and the parser stops
/// at the first byte that is not JSON.
#[test]
fn bytes_after_the_header_json() {
    fails(
        |base, _| {
            let file = base.join("model.safetensors");
            let bytes = std::fs::read(&file).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
            let mut json = format!("{}\0", text.trim_end()).into_bytes();
            while !json.len().is_multiple_of(8) {
                json.push(b' ');
            }
            let mut out = (json.len() as u64).to_le_bytes().to_vec();
            out.extend(json);
            out.extend(&bytes[8 + n..]);
            std::fs::write(&file, out).unwrap();
        },
        &["model.safetensors", "header JSON: trailing characters"],
    );
}

#[test]
fn adapter_key_without_base_tensor() {
    fails(
        |_, a| {
            let spec = BaseSpec {
                layers: 3,
                ..BaseSpec::default()
            };
            write_adapter(a, &AdapterSpec::new(&spec, 4, "layers.2.self_attn.q_proj"));
        },
        &[
            "adapter_model.safetensors",
            "model.layers.2.self_attn.q_proj.lora_A.weight",
            "does not have",
        ],
    );
}

#[test]
fn shape_that_does_not_fit() {
    fails(
        |_, a| {
            let spec = BaseSpec {
                hidden: 40,
                ..BaseSpec::default()
            };
            write_adapter(a, &AdapterSpec::new(&spec, 4, "layers.0.mlp.up_proj"));
        },
        &[
            "model.layers.0.mlp.up_proj.lora_A.weight",
            "shape does not fit",
            "[77, 48]",
        ],
    );
}

#[test]
fn unsupported_factor_dtype() {
    fails(
        |_, a| {
            let spec = BaseSpec::default();
            let mut s = AdapterSpec::new(&spec, 4, "layers.0.self_attn.q_proj");
            s.dtype = Dtype::I32;
            write_adapter(a, &s);
        },
        &[
            "adapter_model.safetensors",
            "self_attn.q_proj.lora_",
            "dtype I32 is not supported",
        ],
    );
}

#[test]
fn quantized_base_tensor() {
    fails(
        |base, _| {
            let mut tensors = write_base(base, &BaseSpec::default());
            for t in &mut tensors {
                if t.name.ends_with("q_proj.weight") {
                    t.dtype = Dtype::I8;
                }
            }
            write_safetensors(&base.join("model.safetensors"), &tensors);
        },
        &[
            "model.safetensors",
            "q_proj.weight",
            "dtype I8 cannot take a LoRA delta",
        ],
    );
}

#[test]
fn peft_type_other_than_lora() {
    fails(
        |_, a| adapter_config(a, |c| c["peft_type"] = json!("IA3")),
        &["adapter_config.json", "peft_type is IA3"],
    );
}

#[test]
fn pickle_adapter() {
    fails(
        |_, a| {
            std::fs::remove_file(a.join("adapter_model.safetensors")).unwrap();
            std::fs::write(a.join("adapter_model.bin"), b"\x80\x02pickle").unwrap();
        },
        &["adapter_model.bin", "pickle"],
    );
}

#[test]
fn refused_adapter_features() {
    for (field, value, message) in [
        ("use_dora", json!(true), "DoRA"),
        ("layer_replication", json!([[0, 1]]), "layer_replication"),
        ("init_lora_weights", json!("pissa_niter_4"), "modified base"),
        ("alora_invocation_tokens", json!([1, 2]), "aLoRA"),
    ] {
        fails(
            |_, a| adapter_config(a, |c| c[field] = value),
            &["adapter_config.json", message],
        );
    }
}

#[test]
fn output_inside_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    write_adapter(&tmp.path().join("a"), &AdapterSpec::new(&spec, 2, "q_proj"));
    let before = read_tree(&tmp.path().join("base"));
    for out in [tmp.path().join("base/merged"), tmp.path().join("base")] {
        let (ok, _, err) = run_lorafs([
            "materialize".as_ref(),
            tmp.path().join("base").as_os_str(),
            out.as_os_str(),
            "--adapter".as_ref(),
            tmp.path().join("a").as_os_str(),
            "--force".as_ref(),
        ]);
        assert!(!ok, "{out:?}");
        assert!(err.contains("input"), "{err}");
    }
    assert!(
        read_tree(&tmp.path().join("base")) == before,
        "base untouched"
    );
}

#[test]
fn repo_ids_resolve_in_the_local_cache_only() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    let cache = tmp.path().join("hub");
    // The cache layout: refs/main holds the commit; snapshots/COMMIT holds links to blobs.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = cache.join("models--org--tiny-llama/snapshots").join(commit);
    let blobs = cache.join("models--org--tiny-llama/blobs");
    write_base(&tmp.path().join("real"), &spec);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    for (rel, _) in read_tree(&tmp.path().join("real")) {
        let blob = blobs.join(rel.to_string_lossy().replace('/', "_"));
        std::fs::rename(tmp.path().join("real").join(&rel), &blob).unwrap();
        std::fs::create_dir_all(snap.join(&rel).parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(&rel)).unwrap();
    }
    std::fs::create_dir_all(cache.join("models--org--tiny-llama/refs")).unwrap();
    std::fs::write(cache.join("models--org--tiny-llama/refs/main"), commit).unwrap();
    let adapter_snap = cache.join("models--org--tiny-lora/snapshots/feedface00");
    write_adapter(&adapter_snap, &AdapterSpec::new(&spec, 2, "q_proj"));

    let run = |base: &str, adapter: &str| {
        output_of(
            std::process::Command::new(lorafs_bin())
                .args(["inspect", base, "--adapter", adapter])
                .env("HF_HUB_CACHE", &cache)
                .current_dir(tmp.path()),
        )
    };
    for base in [
        "org/tiny-llama",
        "org/tiny-llama@main",
        &format!("org/tiny-llama@{}", &commit[..10]),
    ] {
        let (ok, out, err) = run(base, "org/tiny-lora@feedface00:0.5");
        assert!(ok, "{base}: {err}");
        assert!(
            out.contains(&format!("snapshots/{commit}")) && out.contains("weight 0.5"),
            "{out}"
        );
    }
    let (ok, _, err) = run("org/missing", "org/tiny-lora@feedface00");
    assert!(
        !ok && err.contains("org/missing") && err.contains("never downloads"),
        "{err}"
    );
    let (ok, _, err) = run("org/tiny-llama@v2", "org/tiny-lora@feedface00");
    assert!(
        !ok && err.contains("revision \"v2\"") && err.contains(commit),
        "{err}"
    );
}
