//! The metadata keys before `tokenizer.*`, in the converter's order: `general.*` from the
//! writer and `gguf.Metadata`, the architecture's `set_gguf_parameters`, then
//! `general.quantization_version`.

use serde_json::{Map, Value as Json};

use super::hparams::Hparams;
use super::Family;
use crate::gguf::card::Card;
use crate::gguf::{Metadata, OutType, Value};

/// `GGML_QUANT_VERSION` of gguf-py.
const QUANT_VERSION: u32 = 2;

/// `general.*` before the architecture's keys, as `set_gguf_meta_model` writes them:
/// architecture, type, the sampling defaults of `generation_config.json` (`sampling`, from
/// [`sampling`]), the name (the card's, else `model_name`), the card's authorship fields, the
/// size label (the card's, else computed), then the card's license, sources, base models,
/// datasets, tags and languages. An error for a card value the converter fails on.
pub fn general(
    md: &mut Metadata,
    arch: &str,
    sampling: Vec<(String, Value)>,
    model_name: &str,
    total_params: u64,
    card: &Card,
) -> Result<(), String> {
    md.set("general.architecture", Value::Text(arch.into()));
    md.set("general.type", Value::Text("model".into()));
    for (key, value) in sampling {
        md.set(key, value);
    }
    let computed = (total_params > 0).then(|| size_label(total_params));
    card.write_names(md, model_name, computed)?;
    card.write_rest(md)
}

/// `Metadata.load`'s sampling fields from `generation_config.json`, as the writer's
/// `add_sampling_*` write them: int32 or float32 (a JSON boolean as 1 or 0, as Python's
/// `struct` packs it), `sequence` a string unless empty (`add_string` skips those); null or
/// missing, nothing. An error for a value the writer fails on (a float where it packs an
/// int32, a string where it packs a number, a number where it writes a string).
pub fn sampling(gen: &Map<String, Json>) -> Result<Vec<(String, Value)>, String> {
    let keys: [(&str, &[&str], bool); 12] = [
        ("sequence", &["sequence"], false),
        ("top_k", &["top_k"], true),
        ("top_p", &["top_p"], false),
        ("min_p", &["min_p"], false),
        ("xtc_probability", &["xtc_probability"], false),
        ("xtc_threshold", &["xtc_threshold"], false),
        ("temp", &["temperature"], false),
        ("penalty_last_n", &["penalty_last_n"], true),
        (
            "penalty_repeat",
            &["penalty_repeat", "repetition_penalty"],
            false,
        ),
        ("mirostat", &["mirostat"], true),
        ("mirostat_tau", &["mirostat_tau"], false),
        ("mirostat_eta", &["mirostat_eta"], false),
    ];
    let mut out = Vec::new();
    for (key, sources, int) in keys {
        // `gen.get(a, gen.get(b, None))`: a present key wins even when it is null.
        let Some((source, v)) = sources.iter().find_map(|s| gen.get(*s).map(|v| (s, v))) else {
            continue;
        };
        let bad = |want: &str| format!("`{source}` is {v}, not {want}");
        let value = match (v, key, int) {
            (Json::Null, ..) => continue,
            (Json::String(s), "sequence", _) if s.is_empty() => continue,
            (Json::String(s), "sequence", _) => Value::Text(s.clone()),
            (_, "sequence", _) => return Err(bad("a string")),
            (&Json::Bool(b), _, true) => Value::I32(i32::from(b)),
            (&Json::Bool(b), _, false) => Value::F32(f32::from(u8::from(b))),
            (v, _, true) => {
                let i = v.as_i64().and_then(|i| i32::try_from(i).ok());
                Value::I32(i.ok_or_else(|| bad("a 32-bit integer"))?)
            }
            (v, _, false) => {
                let f = v.as_f64().map(|f| f as f32).filter(|f| f.is_finite());
                Value::F32(f.ok_or_else(|| bad("a number"))?)
            }
        };
        out.push((format!("general.sampling.{key}"), value));
    }
    Ok(out)
}

/// gguf-py's `size_label` / `model_weight_count_rounded_notation` for a dense model.
pub fn size_label(params: u64) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python's round() rounds half to even; the digit count decides the decimals shown.
    let whole = format!("{}", scaled.round_ties_even() as u64);
    let digits = whole.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `TextModel.set_gguf_parameters` and the family's additions, then the quantization version.
pub fn parameters(
    md: &mut Metadata,
    hp: &Hparams,
    family: Family,
    arch: &str,
    out: OutType,
) -> Result<(), String> {
    let key = |k: &str| format!("{arch}.{k}");
    sizes(md, hp, &key)?;
    if hp.map.get("is_causal") == Some(&Json::Bool(false)) {
        md.set(key("attention.causal"), Value::Bool(false));
    }
    rope_scaling(md, hp.rope(), &key)?;
    if let Some(theta) = hp.rope().get("rope_theta").filter(|v| !v.is_null()) {
        md.set(
            key("rope.freq_base"),
            Value::F32(float(theta, "rope_theta")?),
        );
    }
    epsilons(md, hp, &key)?;
    if let Some(head_dim) = hp.get("head_dim") {
        let head_dim = as_u32(head_dim, "head_dim")?;
        md.set(key("attention.key_length"), Value::U32(head_dim));
        md.set(key("attention.value_length"), Value::U32(head_dim));
    }
    md.set("general.file_type", Value::U32(out.file_type()));
    if family == Family::Llama {
        let vocab = hp.get("vocab_size").ok_or("no `vocab_size`")?;
        md.set(key("vocab_size"), Value::U32(as_u32(vocab, "vocab_size")?));
        md.set(key("rope.dimension_count"), Value::U32(rope_dim(hp)?));
    }
    md.set("general.quantization_version", Value::U32(QUANT_VERSION));
    Ok(())
}

/// The block count and the model's sizes, each from the first of the converter's names
/// for it that the config has (all but the block count optional).
fn sizes(md: &mut Metadata, hp: &Hparams, key: &dyn Fn(&str) -> String) -> Result<(), String> {
    let block_count = uint(
        hp,
        &["n_layers", "num_hidden_layers", "n_layer", "num_layers"],
    )?
    .ok_or("no layer count (`num_hidden_layers`)")?;
    md.set(key("block_count"), Value::U32(block_count));
    let optional_u32 = [
        (
            "context_length",
            &[
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ][..],
        ),
        ("embedding_length", &["hidden_size", "n_embd", "dim"]),
        (
            "feed_forward_length",
            &[
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
        ),
        (
            "attention.head_count",
            &["num_attention_heads", "n_head", "n_heads"],
        ),
        (
            "attention.head_count_kv",
            &["num_key_value_heads", "n_kv_heads"],
        ),
    ];
    for (name, keys) in optional_u32 {
        if let Some(v) = uint(hp, keys)? {
            md.set(key(name), Value::U32(v));
        }
    }
    Ok(())
}

/// The norms' epsilons: RMS norm's, then layer norm's, where the config gives them.
fn epsilons(md: &mut Metadata, hp: &Hparams, key: &dyn Fn(&str) -> String) -> Result<(), String> {
    if let Some(eps) = hp
        .find(&["rms_norm_eps", "norm_eps"])
        .filter(|v| !v.is_null())
    {
        md.set(
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(float(eps, "rms_norm_eps")?),
        );
    }
    if let Some(eps) = hp
        .find(&["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])
        .filter(|v| !v.is_null())
    {
        md.set(
            key("attention.layer_norm_epsilon"),
            Value::F32(float(eps, "layer_norm_eps")?),
        );
    }
    Ok(())
}

/// The RoPE head dimension: `head_dim`, else hidden size / head count.
pub fn rope_dim(hp: &Hparams) -> Result<u32, String> {
    if let Some(d) = hp.get("head_dim") {
        return as_u32(d, "head_dim");
    }
    let hidden = as_u32(
        hp.get("hidden_size").ok_or("no `hidden_size`")?,
        "hidden_size",
    )?;
    let heads = as_u32(
        hp.get("num_attention_heads")
            .ok_or("no `num_attention_heads`")?,
        "num_attention_heads",
    )?;
    Ok(hidden / heads.max(1))
}

/// The `rope.scaling.*` keys of `TextModel.set_gguf_parameters`.
fn rope_scaling(
    md: &mut Metadata,
    rope: &Map<String, Json>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    let Some(ty) = rope.get("rope_type").and_then(Json::as_str) else {
        return Ok(());
    };
    let factor = rope.get("factor").filter(|v| !v.is_null());
    match (ty, factor) {
        ("linear", Some(f)) => {
            md.set(key("rope.scaling.type"), Value::Text("linear".into()));
            md.set(key("rope.scaling.factor"), Value::F32(float(f, "factor")?));
        }
        ("yarn", Some(f)) => {
            md.set(key("rope.scaling.type"), Value::Text("yarn".into()));
            md.set(key("rope.scaling.factor"), Value::F32(float(f, "factor")?));
            let orig = rope
                .get("original_max_position_embeddings")
                .ok_or("yarn RoPE without `original_max_position_embeddings`")?;
            md.set(
                key("rope.scaling.original_context_length"),
                Value::U32(as_u32(orig, "original_max_position_embeddings")?),
            );
            let optional = [
                (
                    "rope.scaling.yarn_ext_factor",
                    &["extrapolation_factor"][..],
                ),
                (
                    "rope.scaling.yarn_attn_factor",
                    &["attention_factor", "attn_factor"],
                ),
                ("rope.scaling.yarn_beta_fast", &["beta_fast"]),
                ("rope.scaling.yarn_beta_slow", &["beta_slow"]),
            ];
            for (name, sources) in optional {
                // `rope.get(a, rope.get(b))` then `is not None`: a present null hides the second.
                if let Some(v) = sources
                    .iter()
                    .find_map(|s| rope.get(*s))
                    .filter(|v| !v.is_null())
                {
                    md.set(key(name), Value::F32(float(v, name)?));
                }
            }
        }
        ("su" | "longrope", _) => md.set(key("rope.scaling.type"), Value::Text("longrope".into())),
        _ => {}
    }
    Ok(())
}

fn uint(hp: &Hparams, keys: &[&str]) -> Result<Option<u32>, String> {
    match hp.find(keys) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => as_u32(v, keys[0]).map(Some),
    }
}

fn as_u32(v: &Json, what: &str) -> Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("`{what}` is {v}, not a 32-bit unsigned integer"))
}

fn float(v: &Json, what: &str) -> Result<f32, String> {
    v.as_f64()
        .map(|f| f as f32)
        .ok_or_else(|| format!("`{what}` is {v}, not a number"))
}
