//! The tiny base model the adapter targets run against, and its shards for the index target.
//!
//! Llama-shaped, one layer, with the tensors that lead the planner down its rarer paths: a
//! bias (lora_B.bias), an I8 tensor (quantized bases are refused), an empty tensor, and a
//! zero-byte tensor whose dimensions multiply past `usize` once the leading 0 is set aside.

use std::path::Path;

use crate::json::J;
use crate::st::{Entry, StFile};

pub const HIDDEN: u64 = 8;
pub const VOCAB: u64 = 10;

/// (name, dtype, shape) of every base tensor.
pub const TENSORS: [(&str, &str, &[u64]); 11] = [
    ("model.embed_tokens.weight", "BF16", &[VOCAB, HIDDEN]),
    ("model.layers.0.self_attn.q_proj.weight", "BF16", &[8, 8]),
    ("model.layers.0.self_attn.q_proj.bias", "BF16", &[8]),
    ("model.layers.0.self_attn.k_proj.weight", "F16", &[4, 8]),
    ("model.layers.0.mlp.down_proj.weight", "F32", &[8, 12]),
    ("model.layers.0.input_layernorm.weight", "BF16", &[8]),
    ("model.norm.weight", "BF16", &[8]),
    ("lm_head.weight", "BF16", &[VOCAB, HIDDEN]),
    ("model.quant.weight", "I8", &[8, 8]),
    ("model.zero.weight", "BF16", &[0, 8]),
    ("model.odd.weight", "BF16", &[0, 1 << 32, 1 << 32]),
];

/// Modules an adapter key may name: (module, out features, in features). The last one is
/// not in the base.
pub const MODULES: [(&str, u64, u64); 11] = [
    ("model.layers.0.self_attn.q_proj", 8, 8),
    ("model.layers.0.self_attn.k_proj", 4, 8),
    ("model.layers.0.mlp.down_proj", 8, 12),
    ("model.embed_tokens", VOCAB, HIDDEN),
    ("lm_head", VOCAB, HIDDEN),
    ("model.layers.0.input_layernorm", 1, 8),
    ("model.norm", 1, 8),
    ("model.quant", 8, 8),
    ("model.zero", 0, 8),
    ("model.odd", 0, 1 << 32),
    ("model.layers.1.self_attn.q_proj", 8, 8),
];

pub fn llama_config() -> J {
    J::obj(vec![
        ("architectures", J::Arr(vec![J::str("LlamaForCausalLM")])),
        ("model_type", J::str("llama")),
        ("hidden_size", J::num(HIDDEN)),
        ("vocab_size", J::num(VOCAB)),
        ("tie_word_embeddings", J::Raw("false".into())),
    ])
}

/// Bytes of all the base tensors' data (an honest index's `total_size`).
pub fn data_bytes() -> u64 {
    TENSORS
        .iter()
        .map(|(_, dtype, dims)| {
            let bytes = if *dtype == "I8" {
                1
            } else if *dtype == "F32" {
                4
            } else {
                2
            };
            dims.iter().product::<u64>() * bytes
        })
        .sum()
}

/// Shard `i` of `n`, named as `save_pretrained` names them.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Write the base tensors into `n` shards, tensor `t` into shard `shard_of[t] % n` (all of
/// them into one file when `shard_of` is empty), and `config` as `config.json`.
pub fn write(dir: &Path, n: usize, shard_of: &[usize], config: Option<&J>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut shards: Vec<Vec<Entry>> = vec![Vec::new(); n];
    for (t, (name, dtype, dims)) in TENSORS.iter().enumerate() {
        let s = shard_of.get(t).map_or(0, |s| s % n);
        shards[s].push(Entry::plain(name, dtype, dims));
    }
    for (i, entries) in shards.into_iter().enumerate() {
        StFile::valid(entries, i as u64 + 1).write(&dir.join(shard_name(i, n)))?;
    }
    if let Some(config) = config {
        std::fs::write(dir.join("config.json"), config.render())?;
    }
    Ok(())
}
