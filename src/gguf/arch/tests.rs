//! Plans of small hand-made configs. The same plans were compared, key by key and tensor by
//! tensor, with the pinned converter's output on tiny transformers models (see docs/GGUF.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::gguf::Value;

/// Model files held in memory.
struct Files(HashMap<&'static str, String>, PathBuf);

impl ModelFiles for Files {
    fn read(&self, name: &str) -> crate::Result<Option<Vec<u8>>> {
        Ok(self.0.get(name).map(|s| s.clone().into_bytes()))
    }
    fn list(&self, _dir: &str) -> crate::Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn root(&self) -> &Path {
        &self.1
    }
}

fn files(config: serde_json::Value) -> Files {
    Files(
        HashMap::from([("config.json", config.to_string())]),
        PathBuf::from("/m"),
    )
}

fn llama_config() -> serde_json::Value {
    serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000})
}

fn t(name: &str, part: &str, shape: &[u64]) -> SourceTensor {
    SourceTensor {
        name: name.into(),
        part: part.into(),
        shape: shape.to_vec(),
        dtype: DType::BF16,
    }
}

fn layer(b: u32, part: &str, qkv_bias: bool) -> Vec<SourceTensor> {
    let p = |s: &str| format!("model.layers.{b}.{s}");
    let mut v = vec![
        t(&p("input_layernorm.weight"), part, &[64]),
        t(&p("post_attention_layernorm.weight"), part, &[64]),
        t(&p("self_attn.q_proj.weight"), part, &[64, 64]),
        t(&p("self_attn.k_proj.weight"), part, &[32, 64]),
        t(&p("self_attn.v_proj.weight"), part, &[32, 64]),
        t(&p("self_attn.o_proj.weight"), part, &[64, 64]),
        t(&p("mlp.gate_proj.weight"), part, &[128, 64]),
        t(&p("mlp.up_proj.weight"), part, &[128, 64]),
        t(&p("mlp.down_proj.weight"), part, &[64, 128]),
        t(&p("self_attn.rotary_emb.inv_freq"), part, &[8]),
    ];
    if qkv_bias {
        v.push(t(&p("self_attn.q_proj.bias"), part, &[64]));
    }
    v
}

fn names(plan: &ArchPlan) -> Vec<&str> {
    plan.tensors.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn llama_order_names_types_and_permutation() {
    // Given in scrambled order across two parts: the plan sorts by part, then name.
    let mut tensors = layer(1, "model-00002.safetensors", false);
    tensors.extend(layer(0, "model-00001.safetensors", false));
    tensors.push(t(
        "model.embed_tokens.weight",
        "model-00001.safetensors",
        &[1000, 64],
    ));
    tensors.push(t("model.norm.weight", "model-00002.safetensors", &[64]));
    tensors.push(t("lm_head.weight", "model-00002.safetensors", &[1000, 64]));
    let plan = plan(&files(llama_config()), &tensors, OutType::Q8_0, "Tiny").unwrap();
    let n = names(&plan);
    // `model.embed_tokens` sorts before `model.layers`, `lm_head` first in its part.
    assert_eq!(
        &n[..3],
        [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.ffn_down.weight"
        ]
    );
    assert_eq!(&n[10..12], ["output.weight", "blk.1.attn_norm.weight"]);
    assert_eq!(n[n.len() - 1], "output_norm.weight");
    assert_eq!(n.len(), 2 * 9 + 3, "inv_freq is skipped");
    let by = |name: &str| plan.tensors.iter().find(|t| t.name == name).unwrap();
    assert_eq!(by("blk.0.attn_norm.weight").ty, GgmlType::F32);
    assert_eq!(by("blk.0.ffn_down.weight").ty, GgmlType::Q8_0);
    let perm = |name: &str| match &by(name).data {
        TensorData::Model { permute, .. } => *permute,
        TensorData::Computed(_) => panic!("computed"),
    };
    assert_eq!(perm("blk.1.attn_q.weight"), Some(Permute { heads: 4 }));
    assert_eq!(perm("blk.1.attn_k.weight"), Some(Permute { heads: 2 }));
    assert_eq!(perm("blk.1.attn_v.weight"), None);
    assert_eq!(plan.vocab, VocabFamily::Llama);
}

#[test]
fn llama_metadata_keys_and_types() {
    let tensors = layer(0, "model.safetensors", false);
    let plan = plan(&files(llama_config()), &tensors, OutType::F16, "Tiny").unwrap();
    let keys: Vec<&str> = plan
        .metadata
        .entries()
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.type",
            "general.name",
            "general.size_label",
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.attention.key_length",
            "llama.attention.value_length",
            "general.file_type",
            "llama.vocab_size",
            "llama.rope.dimension_count",
            "general.quantization_version",
        ]
    );
    let get = |k: &str| plan.metadata.get(k).unwrap().clone();
    assert_eq!(
        get("llama.context_length"),
        Value::U32(2048),
        "LlamaConfig's default"
    );
    assert_eq!(get("llama.rope.freq_base"), Value::F32(10000.0));
    assert_eq!(
        get("llama.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-6)
    );
    assert_eq!(get("llama.rope.dimension_count"), Value::U32(16));
    assert_eq!(get("general.file_type"), Value::U32(1));
    assert_eq!(get("general.size_label"), Value::Text("37K".into()));
}

#[test]
fn llama3_rope_freqs_come_first() {
    let mut config = llama_config();
    config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "original_max_position_embeddings": 64, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
    config["rope_theta"] = serde_json::json!(500000.0);
    let plan = plan(
        &files(config),
        &layer(0, "model.safetensors", false),
        OutType::F16,
        "x",
    )
    .unwrap();
    let first = &plan.tensors[0];
    assert_eq!(
        (first.name.as_str(), first.shape.as_slice(), first.ty),
        ("rope_freqs.weight", &[8u64][..], GgmlType::F32)
    );
    let TensorData::Computed(f) = &first.data else {
        panic!("not computed")
    };
    assert_eq!(f[0], 1.0, "high frequencies are not scaled");
    assert_eq!(f[7], 8.0, "low frequencies are scaled by the factor");
    assert_eq!(
        plan.metadata.get("llama.rope.freq_base"),
        Some(&Value::F32(500000.0))
    );
    assert!(plan.metadata.get("llama.rope.scaling.type").is_none());
}

#[test]
fn qwen2_biases_f32_no_permutation() {
    let mut config = llama_config();
    config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    config["model_type"] = serde_json::json!("qwen2");
    let plan = plan(
        &files(config),
        &layer(0, "model.safetensors", true),
        OutType::Bf16,
        "x",
    )
    .unwrap();
    let q = plan
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.ty, GgmlType::Bf16);
    assert!(matches!(q.data, TensorData::Model { permute: None, .. }));
    let bias = plan
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.bias")
        .unwrap();
    assert_eq!(bias.ty, GgmlType::F32);
    assert_eq!(plan.vocab, VocabFamily::Qwen);
    assert!(plan.metadata.get("qwen2.vocab_size").is_none());
    assert!(
        plan.metadata.get("qwen2.attention.key_length").is_none(),
        "Qwen2Config has no head_dim"
    );
}

#[test]
fn q8_0_falls_back_to_f16_for_short_rows() {
    assert_eq!(
        tensors::tensor_type("blk.0.ffn_down.weight", &[64, 80], OutType::Q8_0),
        GgmlType::F16
    );
    assert_eq!(
        tensors::tensor_type("blk.0.ffn_up.weight", &[80, 64], OutType::Q8_0),
        GgmlType::Q8_0
    );
}

#[test]
fn permute_source_rows_match_the_reshape() {
    // numpy: arange(24).reshape(3, 2, 4).swapaxes(1, 2).reshape(24)
    let expect = [
        0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15, 16, 20, 17, 21, 18, 22, 19, 23,
    ];
    let p = Permute { heads: 3 };
    let got: Vec<u64> = (0..24).map(|r| p.source_row(r, 24)).collect();
    assert_eq!(got, expect);
}

#[test]
fn size_labels() {
    assert_eq!(keys::size_label(45_000), "45K");
    assert_eq!(keys::size_label(1_235_814_400), "1.2B");
    assert_eq!(keys::size_label(7_241_732_096), "7.2B");
    assert_eq!(keys::size_label(8_030_261_248), "8.0B");
    assert_eq!(keys::size_label(124_000_000), "124M");
}

#[test]
fn refusals_name_the_architecture_and_the_converter() {
    let mut config = llama_config();
    config["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
    config["model_type"] = serde_json::json!("mixtral");
    let err = plan(&files(config), &[], OutType::F16, "x")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MixtralForCausalLM") || err.contains("mixtral"),
        "{err}"
    );
    assert!(err.contains("convert_hf_to_gguf.py"), "{err}");
    assert!(err.contains("LlamaForCausalLM"), "{err}");

    let mut config = llama_config();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    let err = plan(&files(config), &[], OutType::F16, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("GPT2LMHeadModel"), "{err}");

    let mut config = llama_config();
    config["num_local_experts"] = serde_json::json!(8);
    let err = plan(&files(config), &[], OutType::F16, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("experts"), "{err}");

    let unmapped = [t(
        "model.layers.0.self_attn.q_norm.weight",
        "model.safetensors",
        &[16],
    )];
    let err = plan(&files(llama_config()), &unmapped, OutType::F16, "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("q_norm"), "{err}");
}

/// The metadata of an F16 plan of `files` with a llama layer's tensors (the keys tested
/// here read only the files).
fn metadata_of_files(files: &Files) -> crate::Result<crate::gguf::Metadata> {
    let tensors = layer(0, "model.safetensors", false);
    plan(files, &tensors, OutType::F16, "Tiny").map(|p| p.metadata)
}

fn metadata_of(config: serde_json::Value) -> crate::gguf::Metadata {
    metadata_of_files(&files(config)).unwrap()
}

fn with(mut config: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let map = config.as_object_mut().unwrap();
    map.extend(extra.as_object().unwrap().clone());
    config
}

#[test]
fn null_settings_are_not_the_class_defaults() {
    // As transformers passes a null on and the pinned converter then writes: compared with
    // it on tiny models (a tester-style sweep of 2026-12-07).
    let md = metadata_of(with(
        llama_config(),
        serde_json::json!({"num_key_value_heads": null, "max_position_embeddings": null,
            "rms_norm_eps": null, "rope_theta": null}),
    ));
    let get = |k: &str| md.get(k).cloned();
    assert_eq!(
        get("llama.attention.head_count_kv"),
        Some(Value::U32(4)),
        "the head count"
    );
    for absent in [
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
    ] {
        assert_eq!(get(absent), None, "{absent}");
    }
    // Missing rather than null: the class defaults.
    let mut config = llama_config();
    config
        .as_object_mut()
        .unwrap()
        .remove("num_key_value_heads");
    let md = metadata_of(config);
    assert_eq!(
        md.get("llama.attention.head_count_kv"),
        Some(&Value::U32(4))
    );
    assert_eq!(md.get("llama.context_length"), Some(&Value::U32(2048)));
}

#[test]
fn an_empty_rope_scaling_is_none_and_a_top_level_original_context_is_not_read() {
    let md = metadata_of(with(
        llama_config(),
        serde_json::json!({"rope_scaling": {},
            "rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
    ));
    assert_eq!(
        md.get("llama.rope.scaling.type"),
        Some(&Value::Text("linear".into()))
    );
    assert_eq!(md.get("llama.rope.scaling.factor"), Some(&Value::F32(2.0)));
    let yarn = |inside: Option<u32>| {
        let mut rope = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        if let Some(orig) = inside {
            rope["original_max_position_embeddings"] = orig.into();
        }
        let config = with(
            llama_config(),
            serde_json::json!({"rope_parameters": rope, "max_position_embeddings": 2048,
                "original_max_position_embeddings": 128}),
        );
        metadata_of(config)
            .get("llama.rope.scaling.original_context_length")
            .cloned()
    };
    assert_eq!(yarn(None), Some(Value::U32(2048)), "the context length");
    assert_eq!(
        yarn(Some(256)),
        Some(Value::U32(256)),
        "the RoPE settings' own"
    );
}

#[test]
fn sampling_keys_are_written_as_the_converters_writer_packs_them() {
    let with_gen = |gen: serde_json::Value| {
        let mut f = files(llama_config());
        f.0.insert("generation_config.json", gen.to_string());
        metadata_of_files(&f)
    };
    let md = with_gen(serde_json::json!({"top_k": true, "temperature": false,
        "repetition_penalty": 1.1, "sequence": "", "top_p": null, "mirostat": 2}))
    .unwrap();
    let get = |k: &str| md.get(&format!("general.sampling.{k}")).cloned();
    assert_eq!(
        get("top_k"),
        Some(Value::I32(1)),
        "a boolean packed as an int32"
    );
    assert_eq!(get("temp"), Some(Value::F32(0.0)));
    assert_eq!(get("penalty_repeat"), Some(Value::F32(1.1)));
    assert_eq!(get("mirostat"), Some(Value::I32(2)));
    assert_eq!(
        (get("sequence"), get("top_p")),
        (None, None),
        "empty and null: not written"
    );
    // Where the writer's `struct.pack` fails, the converter fails: refused, naming the file.
    for (gen, why) in [
        (
            serde_json::json!({"top_k": 40.0}),
            "`top_k` is 40.0, not a 32-bit integer",
        ),
        (
            serde_json::json!({"top_p": "0.9"}),
            "`top_p` is \"0.9\", not a number",
        ),
        (
            serde_json::json!({"sequence": 3}),
            "`sequence` is 3, not a string",
        ),
    ] {
        let err = with_gen(gen).unwrap_err().to_string();
        assert!(err.starts_with("/m/generation_config.json"), "{err}");
        assert!(err.contains(why), "{why:?} not in {err}");
    }
}
