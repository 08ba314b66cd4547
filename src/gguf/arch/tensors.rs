//! The tensor list of the GGUF file: the converter's order, its names for the Hugging Face
//! tensors, the Q/K row permutation, the element type rules and the generated `rope_freqs`.

use std::collections::HashSet;

use super::{Family, Permute, PlannedTensor, SourceTensor, TensorData};
use crate::gguf::{GgmlType, OutType};

/// Q8_0 quantizes rows in blocks of 32 values (`GGML_QUANT_SIZES[Q8_0]`); the converter falls
/// back to F16 for a tensor whose last dimension is not a multiple of it.
const Q8_0_BLOCK: u64 = 32;

/// Name prefixes and substrings `TextModel.filter_tensors` drops as multimodal tensors.
const SKIP_PREFIXES: &[&str] = &[
    "mlp",
    "vit.",
    "vpm.",
    "siglip2.",
    "conformer.",
    "merger.",
    "resampler.",
    "sound_encoder.",
    "sound_projection.",
    "speech_embeddings.",
];
const SKIP_PARTS: &[&str] = &[
    "visual.",
    "vision.",
    "audio.",
    "talker.",
    "vision_",
    "audio_",
    "token2wav.",
    "code2wav.",
    "projector.",
    "pre_mm_projector_norm",
    "image_newline",
    "view_seperator",
    "patch_embed",
    "patch_embedding",
    "patch_merger.",
    "patch_merge_mlp.",
    "model.connector.",
];
/// Tensors the converter drops without mapping (`prepare_tensors`).
const UNUSED_SUFFIXES: &[&str] = &[
    ".attention.masked_bias",
    ".attention.bias",
    ".rotary_emb.inv_freq",
];

/// What the tensor plan needs of the hyperparameters.
pub struct TensorParams {
    pub family: Family,
    pub block_count: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
}

/// The source tensors in the converter's order: parts by name, then tensors by name within a
/// part (`SafetensorsLocal` sorts them), the first of a repeated name winning (a dict).
pub fn source_order(tensors: &[SourceTensor]) -> Vec<&SourceTensor> {
    let mut sorted: Vec<&SourceTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| (&a.part, &a.name).cmp(&(&b.part, &b.name)));
    let mut seen = HashSet::new();
    sorted.retain(|t| seen.insert(t.name.as_str()));
    sorted
}

/// The name after the converter's renames (`language_model.`, Llama's `text_model.`), or
/// `None` for a tensor it skips.
pub fn filtered_name(family: Family, name: &str) -> Option<String> {
    if SKIP_PREFIXES.iter().any(|p| name.starts_with(p))
        || SKIP_PARTS.iter().any(|p| name.contains(p))
    {
        return None;
    }
    let mut name = name.to_string();
    if family == Family::Llama {
        name = name.replace("text_model.", "");
    }
    if name.ends_with("e_score_correction_bias") {
        name = name.replace("e_score_correction_bias", "e_score_correction.bias");
    }
    name = name.replace("language_model.", "");
    if UNUSED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return None;
    }
    Some(name)
}

/// The GGUF name of a Hugging Face tensor (gguf-py's `TensorNameMap` for these
/// architectures), or `None` if the converter cannot map it.
pub fn gguf_name(family: Family, name: &str, block_count: u64) -> Option<String> {
    let (stem, suffix) = [".weight", ".bias"]
        .iter()
        .find_map(|s| name.strip_suffix(s).map(|stem| (stem, *s)))?;
    let global = match stem {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(format!("{g}{suffix}"));
    }
    let rest = stem.strip_prefix("model.layers.")?;
    let (bid_text, layer) = rest.split_once('.')?;
    // The converter's map lists `blk.{bid}` for bid in 0..block_count, spelled in decimal.
    let bid: u64 = bid_text.parse().ok().filter(|b| *b < block_count)?;
    if bid.to_string() != bid_text {
        return None;
    }
    let short = match layer {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "self_attn.q_norm" if family == Family::Qwen3 => "attn_q_norm",
        "self_attn.k_norm" if family == Family::Qwen3 => "attn_k_norm",
        _ => return None,
    };
    Some(format!("blk.{bid}.{short}{suffix}"))
}

/// The row permutation `LlamaModel.modify_tensors` applies to this tensor, if any.
pub fn permutation(params: &TensorParams, name: &str) -> Option<Permute> {
    if params.family != Family::Llama {
        return None;
    }
    if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
        Some(Permute {
            heads: params.n_head,
        })
    } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
        Some(Permute {
            heads: params.n_head_kv,
        })
    } else {
        None
    }
}

/// The element type `prepare_tensors` gives a tensor.
pub fn tensor_type(gguf_name: &str, shape: &[u64], out: OutType) -> GgmlType {
    if shape.len() <= 1 || gguf_name.ends_with("_norm.weight") || !gguf_name.ends_with(".weight") {
        return GgmlType::F32;
    }
    let ty = out.tensor_type();
    if ty == GgmlType::Q8_0 && shape.last().is_none_or(|n| n % Q8_0_BLOCK != 0) {
        return GgmlType::F16;
    }
    ty
}

/// The llama3 RoPE frequency factors of `LlamaModel.generate_extra_tensors`, in the same f32
/// arithmetic as its torch code (a Python float meeting an f32 tensor is rounded to f32).
pub fn llama3_rope_factors(
    rope: &serde_json::Map<String, serde_json::Value>,
    dim: u64,
) -> Vec<f32> {
    let get = |k: &str, d: f64| rope.get(k).and_then(serde_json::Value::as_f64).unwrap_or(d);
    let base = get("rope_theta", 10000.0) as f32;
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    let old_ctx = get("original_max_position_embeddings", 8192.0);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            let wavelen = two_pi / freq;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if (wavelen as f64) > low_wavelen {
                factor as f32
            } else {
                let smooth = (old_ctx as f32 / wavelen - low as f32) / ((high - low) as f32);
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

/// The planned tensors: the generated ones first, then the model's in source order.
pub fn plan_tensors(
    params: &TensorParams,
    tensors: &[SourceTensor],
    rope_factors: Option<Vec<f32>>,
    out: OutType,
) -> Result<Vec<PlannedTensor>, String> {
    let mut planned = Vec::new();
    if let Some(factors) = rope_factors {
        planned.push(PlannedTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![factors.len() as u64],
            ty: GgmlType::F32,
            data: TensorData::Computed(factors),
        });
    }
    for t in source_order(tensors) {
        let Some(name) = filtered_name(params.family, &t.name) else {
            continue;
        };
        let gguf = gguf_name(params.family, &name, params.block_count)
            .ok_or_else(|| format!("tensor `{}` has no GGUF name for this architecture", t.name))?;
        let permute = permutation(params, &name);
        if let Some(p) = &permute {
            check_permutable(&t.name, &t.shape, p.heads)?;
        }
        planned.push(PlannedTensor {
            ty: tensor_type(&gguf, &t.shape, out),
            name: gguf,
            shape: t.shape.clone(),
            data: TensorData::Model {
                source: t.name.clone(),
                permute,
            },
        });
    }
    Ok(planned)
}

/// The permutation reshapes the rows into (heads, 2, rows / heads / 2): it needs rows to be a
/// multiple of 2 × heads (the converter would fail on the reshape otherwise).
fn check_permutable(name: &str, shape: &[u64], heads: u64) -> Result<(), String> {
    match shape.first() {
        Some(rows) if heads > 0 && rows % (2 * heads) == 0 => Ok(()),
        _ => Err(format!(
            "tensor `{name}` of shape {shape:?} cannot be split into {heads} heads of two halves"
        )),
    }
}
