//! Hostile and wrong adapters: refused from their headers and config before any factor is
//! read, in bounded memory and time, never merged into Inf/NaN or in the wrong layout.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use safetensors::Dtype;
use serde_json::{json, Value};

use crate::common::*;
use crate::features::write_gpt2;

const P: &str = "base_model.model.";
const Q: &str = "model.layers.0.self_attn.q_proj";

/// `lorafs inspect BASE --adapter ADAPTER` with its address space limited to 1 GiB must
/// fail within seconds, its message holding each of `wants`.
fn inspect_is_refused_in_bounded_memory(base: &Path, adapter: &Path, wants: &[&str]) {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(lorafs_bin());
    command
        .arg("inspect")
        .arg(base)
        .arg("--adapter")
        .arg(adapter);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let (ok, _, err) = output_of(&mut command);
    let took = start.elapsed();
    assert!(!ok, "accepted");
    for want in wants {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// An adapter whose F32 tensors are declared in the header but never written: the file is
/// sparse, its apparent size what the header says.
fn sparse_adapter(dir: &Path, tensors: &[(String, [usize; 2])]) {
    write_config(
        dir,
        &json!({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj"]}),
    );
    let mut header = serde_json::Map::new();
    let mut pos = 0u64;
    for (name, shape) in tensors {
        let len = (shape[0] * shape[1] * 4) as u64;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + len]}),
        );
        pos += len;
    }
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&text);
    let path = dir.join("adapter_model.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(bytes.len() as u64 + pos).unwrap();
}

#[test]
fn a_huge_declared_factor_is_refused_from_the_header_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    // lora_A of 16 × 2^27 F32: 8 GiB declared, 4 KiB on disk (the issue's case).
    let a_key = format!("{P}{Q}.lora_A.weight");
    sparse_adapter(
        &adapter,
        &[
            (a_key.clone(), [16, 1 << 27]),
            (format!("{P}{Q}.lora_B.weight"), [spec.hidden, 16]),
        ],
    );
    inspect_is_refused_in_bounded_memory(
        &base,
        &adapter,
        &["adapter_model.safetensors", &a_key, "shape does not fit"],
    );
}

/// Physical memory of this machine, bytes.
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    pages as u64 * size as u64
}

#[test]
fn factors_that_fit_but_exceed_memory_are_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    // A rank so large that A (r × h) and B (h × r) in f32 outgrow the machine, while the
    // delta still fits q_proj (h × h).
    let h = spec.hidden;
    let r = (physical_memory() / (2 * h as u64 * 4) + 1) as usize;
    sparse_adapter(
        &adapter,
        &[
            (format!("{P}{Q}.lora_A.weight"), [r, h]),
            (format!("{P}{Q}.lora_B.weight"), [h, r]),
        ],
    );
    inspect_is_refused_in_bounded_memory(
        &base,
        &adapter,
        &["adapter_model.safetensors", "more than this machine's"],
    );
}

/// The memory check counts `V` as the kernels keep it, in 64-column panels: for the 77
/// columns of down_proj, 128 floats per rank. Factors whose f32 copies fit the machine but
/// whose packed `V` does not are refused before reading, instead of read until the memory
/// runs out.
#[test]
fn the_memory_check_counts_the_packed_factors() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("a"));
    let spec = BaseSpec::default();
    write_base(&base, &spec);
    let (h, inter) = (spec.hidden, spec.inter);
    assert!(inter > 64 && inter < 128, "one full panel and a padded one");
    // f32 A and B: r·(inter + h)·4 bytes, below the memory; packed: r·(128 + h)·4, above.
    let r = (physical_memory() / ((inter + h + 25) as u64 * 4)) as usize;
    assert!((r * (inter + h) * 4) as u64 <= physical_memory());
    assert!((r * (128 + h) * 4) as u64 > physical_memory());
    let m = "model.layers.0.mlp.down_proj";
    sparse_adapter(
        &adapter,
        &[
            (format!("{P}{m}.lora_A.weight"), [r, inter]),
            (format!("{P}{m}.lora_B.weight"), [h, r]),
        ],
    );
    inspect_is_refused_in_bounded_memory(
        &base,
        &adapter,
        &["adapter_model.safetensors", "more than this machine's"],
    );
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("adapter_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[test]
fn scales_that_are_not_finite_in_f32_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let adapter = tmp.path().join("a");
    let arg = |suffix: &str| OsString::from(format!("{}{suffix}", adapter.display()));
    let cases: Vec<(Value, &str)> = vec![
        (json!({"lora_alpha": 1e308}), ""),
        (json!({"lora_alpha": -1e40}), ""),
        (json!({"alpha_pattern": {"q_proj": 1e300}}), ""),
        // alpha/r = 2.5e38 is finite, alpha/√r = 5e38 is not.
        (json!({"use_rslora": true, "lora_alpha": 1e39}), ""),
        (json!({}), ":1e39"),
    ];
    for (edit, weight) in cases {
        write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
        edit_config(&adapter, |c| {
            for (k, v) in edit.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        refused(
            tmp.path(),
            &[arg(weight)],
            &["adapter_config.json", Q, "is not a finite f32"],
        );
    }
    // 1e999 is not a number serde_json reads as infinity: the JSON is refused.
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "self_attn.q_proj"));
    let path = adapter.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"lora_alpha\": 8.0", "\"lora_alpha\": 1e999");
    std::fs::write(&path, text).unwrap();
    refused(
        tmp.path(),
        &[arg("")],
        &["adapter_config.json", "invalid JSON"],
    );
}

#[test]
fn a_weight_that_rounds_to_zero_in_f32_is_a_zero_delta() {
    let (tmp, _, base, adapter) = small_model();
    let out = tmp.path().join("out");
    let (ok, _, err) = run_lorafs([
        "materialize".as_ref(),
        base.as_os_str(),
        out.as_os_str(),
        "--adapter".as_ref(),
        format!("{}:1e-50", adapter.display()).as_ref(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        read_safetensors(&out.join("model.safetensors")),
        read_safetensors(&base.join("model.safetensors"))
    );
}

#[test]
fn factors_that_fit_a_linear_layer_only_transposed_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    // k_proj is (kv, h) = (24, 48): factors for a (48, 24) delta fit it only transposed.
    let k = "model.layers.0.self_attn.k_proj";
    let mut a = AdapterSpec::new(&spec, 4, "layers.0.self_attn.k_proj");
    a.modules = vec![(k.to_string(), spec.hidden, spec.kv)];
    let adapter = tmp.path().join("a");
    write_adapter(&adapter, &a);
    refused(
        tmp.path(),
        &[adapter.into()],
        &[
            "adapter_model.safetensors",
            &format!("{k}.lora_A.weight"),
            "fits only transposed; PEFT refuses this adapter for a Linear layer",
        ],
    );
}

#[test]
fn gpt2_conv1d_factors_that_fit_only_untransposed_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let h = 16;
    write_gpt2(&tmp.path().join("base"), h, 50);
    // c_fc is stored (h, 4h): a delta B@A of (h, 4h) fits it only as a Linear would.
    let m = "transformer.h.0.mlp.c_fc";
    let adapter = tmp.path().join("a");
    write_config(
        &adapter,
        &json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_fc"],
            "fan_in_fan_out": true}),
    );
    write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[
            tensor(&format!("{P}{m}.lora_A.weight"), &[2, 4 * h]),
            tensor(&format!("{P}{m}.lora_B.weight"), &[h, 2]),
        ],
    );
    refused(
        tmp.path(),
        &[adapter.into()],
        &[
            &format!("{m}.lora_A.weight"),
            "fits only untransposed; PEFT refuses this adapter for a GPT-2 Conv1D layer",
        ],
    );
}

fn tensor(name: &str, shape: &[usize]) -> Tensor {
    Tensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        values: vec![0.25; shape.iter().product()],
    }
}

#[test]
fn only_the_vocabulary_tensors_may_change_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let (h, v) = (spec.hidden, spec.vocab);
    let adapter = tmp.path().join("a");
    let q_key = format!("{Q}.base_layer.weight");
    let cases: Vec<(Vec<Tensor>, Vec<&str>)> = vec![
        // A projection with one more row, as if it were a vocabulary.
        (
            vec![tensor(&format!("{P}{q_key}"), &[h + 1, h])],
            vec![&q_key, "[49, 48]", "[48, 48]"],
        ),
        // The input embedding resized but lm_head left at the old size.
        (
            vec![tensor(
                &format!("{P}model.embed_tokens.weight"),
                &[v + 3, h],
            )],
            vec!["model.embed_tokens.weight", "`lm_head.weight` keeps 101"],
        ),
        // Embedding and head resized to different sizes.
        (
            vec![
                tensor(&format!("{P}model.embed_tokens.weight"), &[v + 3, h]),
                tensor(&format!("{P}lm_head.weight"), &[v + 4, h]),
            ],
            vec!["lm_head.weight", "from 101 to 105", "from 101 to 104"],
        ),
    ];
    for (tensors, mut expect) in cases {
        write_config(
            &adapter,
            &json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}),
        );
        write_safetensors(&adapter.join("adapter_model.safetensors"), &tensors);
        expect.push("adapter_model.safetensors");
        refused(tmp.path(), &[adapter.clone().into()], &expect);
    }
}

#[test]
fn hostile_tables_are_refused_with_the_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let h = spec.hidden;
    let adapter = tmp.path().join("a");
    let emb = "model.embed_tokens.token_adapter.trainable_tokens_delta";
    let cases: Vec<(Value, Vec<Tensor>, &str)> = vec![
        // One factor under two keys (with and without the PEFT prefix).
        (
            json!({}),
            vec![
                tensor(&format!("{P}{Q}.lora_A.weight"), &[4, h]),
                tensor(&format!("{Q}.lora_A.weight"), &[4, h]),
                tensor(&format!("{P}{Q}.lora_B.weight"), &[h, 4]),
            ],
            "is already the lora_A of this module",
        ),
        // A token id listed twice.
        (
            json!({"trainable_token_indices": [3, 7, 3]}),
            vec![tensor(&format!("{P}{emb}"), &[3, h])],
            "lists token 3 twice",
        ),
        // A token id past the vocabulary: no allocation follows from its size.
        (
            json!({"trainable_token_indices": [u64::MAX]}),
            vec![tensor(&format!("{P}{emb}"), &[1, h])],
            "out of range",
        ),
    ];
    for (extra, tensors, expect) in cases {
        let mut config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        write_config(&adapter, &config);
        write_safetensors(&adapter.join("adapter_model.safetensors"), &tensors);
        refused(
            tmp.path(),
            &[adapter.clone().into()],
            &["adapter_model.safetensors", expect],
        );
    }
}

#[test]
fn an_oversized_adapter_config_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec::default();
    write_base(&tmp.path().join("base"), &spec);
    let adapter = tmp.path().join("a");
    write_adapter(&adapter, &AdapterSpec::new(&spec, 4, "q_proj"));
    // A huge trainable_token_indices list: 5 MiB of ids.
    let ids = vec!["1"; 5 << 19].join(",");
    let text = format!(r#"{{"peft_type": "LORA", "r": 4, "trainable_token_indices": [{ids}]}}"#);
    std::fs::write(adapter.join("adapter_config.json"), text).unwrap();
    refused(
        tmp.path(),
        &[adapter.into()],
        &["adapter_config.json", "larger than 4 MiB"],
    );
}

#[test]
fn an_index_total_size_that_would_overflow_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        shards: 2,
        ..BaseSpec::default()
    };
    let base = tmp.path().join("base");
    write_base(&base, &spec);
    let index = base.join("model.safetensors.index.json");
    let mut json: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    json["metadata"]["total_size"] = json!(i64::MAX);
    std::fs::write(&index, json.to_string()).unwrap();
    // A resized vocabulary adds bytes to the model: total_size + delta overflows an i64.
    let (h, v) = (spec.hidden, spec.vocab + 8);
    let adapter = tmp.path().join("a");
    write_config(
        &adapter,
        &json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}),
    );
    write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[
            tensor(&format!("{P}model.embed_tokens.weight"), &[v, h]),
            tensor(&format!("{P}lm_head.weight"), &[v, h]),
        ],
    );
    refused(
        tmp.path(),
        &[adapter.into()],
        &["model.safetensors.index.json", "total_size", "overflows"],
    );
}
