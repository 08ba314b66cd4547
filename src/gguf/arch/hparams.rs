//! The converter's view of `config.json`: which architecture class converts the model, and
//! the hyperparameters as `AutoConfig.from_pretrained(dir).to_dict()` gives them under the
//! pinned transformers (5.x): the config class's defaults fill missing keys, and the RoPE
//! settings are gathered into one `rope_parameters` dict.

use serde_json::{Map, Value as Json};

use super::Family;

/// The architectures lorafs's GGUF view converts, with the converter class that handles each
/// (only names whose conversion is the same code path as the plain Llama/Qwen2/Qwen3 class).
pub const SUPPORTED: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("LLaMAForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("Qwen3ForCausalLM", Family::Qwen3),
];

/// The `model_type`s whose transformers config class defaults are reproduced below.
const MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// The hyperparameters, as a JSON object, and the architecture named in `config.json`.
pub struct Hparams {
    pub arch: String,
    pub map: Map<String, Json>,
}

impl Hparams {
    pub fn get(&self, key: &str) -> Option<&Json> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The first of `keys` present (the converter's `find_hparam(keys, optional=True)`).
    pub fn find(&self, keys: &[&str]) -> Option<&Json> {
        keys.iter().find_map(|k| self.map.get(*k))
    }

    pub fn rope(&self) -> &Map<String, Json> {
        static EMPTY: std::sync::OnceLock<Map<String, Json>> = std::sync::OnceLock::new();
        match self.map.get("rope_parameters") {
            Some(Json::Object(m)) => m,
            _ => EMPTY.get_or_init(Map::new),
        }
    }
}

/// Reads `config.json` the way the converter's `load_hparams` + `TextModel.__init__` do for
/// the supported model types. `Err` carries a one-line reason.
pub fn load(config: &[u8]) -> Result<Hparams, String> {
    let raw: Json = serde_json::from_slice(config).map_err(|e| format!("invalid JSON: {e}"))?;
    let Json::Object(mut raw) = raw else {
        return Err("not a JSON object".into());
    };
    let arch = raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .ok_or("no `architectures` entry")?
        .to_string();
    if !SUPPORTED.iter().any(|(name, _)| *name == arch) {
        return Err(format!("architecture {arch}"));
    }
    if raw.contains_key("text_config") {
        return Err(format!("{arch} has a `text_config` (a multimodal model)"));
    }
    let model_type = raw.get("model_type").and_then(Json::as_str).unwrap_or("");
    if !MODEL_TYPES.contains(&model_type) {
        return Err(format!(
            "{arch} with model_type `{model_type}` (lorafs reproduces the config defaults of {})",
            MODEL_TYPES.join(", ")
        ));
    }
    let model_type = model_type.to_string();
    let local_theta = [
        "local_rope_theta",
        "rope_local_theta",
        "rope_theta_local",
        "swa_rope_theta",
        "rope_local_base_freq",
    ];
    if let Some(key) = local_theta.iter().find(|k| raw.contains_key(**k)) {
        return Err(format!("a sliding-window RoPE base (`{key}`)"));
    }
    // The raw keys that transformers consumes into `rope_parameters` rather than keeping.
    // An empty `rope_scaling` counts as none, as in transformers; a null `rope_theta` is
    // kept null (the converter then writes no RoPE base).
    let rope_scaling = (raw.remove("rope_scaling"))
        .filter(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()));
    let rope_theta = raw.remove("rope_theta");
    let partial = raw.remove("partial_rotary_factor").filter(|v| !v.is_null());
    let mut map = raw;
    fill_class_defaults(&model_type, &mut map);
    post_init(&model_type, &mut map)?;
    let rope = standardize_rope(&map, rope_scaling, rope_theta, partial)?;
    map.insert("rope_parameters".into(), Json::Object(rope));
    Ok(Hparams { arch, map })
}

/// The keys of `map` (a `config.json`) that the config class of `model_type` gives a default
/// to, filled where missing, as transformers fills them (nothing for a model type lorafs does
/// not reproduce). A key given as null stays null: transformers passes `None` on, and the
/// converter leaves out what it would have written from it (but for what `post_init`
/// derives).
pub fn fill_class_defaults(model_type: &str, map: &mut Map<String, Json>) {
    if MODEL_TYPES.contains(&model_type) {
        for (key, value) in class_defaults(model_type) {
            map.entry(key).or_insert(value);
        }
    }
}

/// The defaults of the config classes' fields that the conversion reads (transformers 5.x
/// `LlamaConfig`, `MistralConfig`, `Qwen2Config`, `Qwen3Config`).
fn class_defaults(model_type: &str) -> Vec<(&'static str, Json)> {
    let (vocab, hidden, ff, layers, heads, max_pos) = match model_type {
        "llama" => (32000, 4096, 11008, 32, 32, 2048),
        "mistral" => (32000, 4096, 14336, 32, 32, 4096 * 32),
        _ => (151936, 4096, 22016, 32, 32, 32768),
    };
    let mut d = vec![
        ("vocab_size", Json::from(vocab)),
        ("hidden_size", Json::from(hidden)),
        ("intermediate_size", Json::from(ff)),
        ("num_hidden_layers", Json::from(layers)),
        ("num_attention_heads", Json::from(heads)),
        ("max_position_embeddings", Json::from(max_pos)),
        ("rms_norm_eps", Json::from(1e-6)),
    ];
    match model_type {
        "mistral" => d.push(("num_key_value_heads", Json::from(8))),
        "qwen2" | "qwen3" => d.push(("num_key_value_heads", Json::from(32))),
        _ => {}
    }
    if model_type == "qwen3" {
        d.push(("head_dim", Json::from(128)));
    }
    d
}

/// The classes' `__post_init__`: Llama and Mistral derive `head_dim`; all default the KV head
/// count to the head count when it is null.
fn post_init(model_type: &str, map: &mut Map<String, Json>) -> Result<(), String> {
    let int = |map: &Map<String, Json>, k: &str| {
        map.get(k)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("`{k}` is not a non-negative integer"))
    };
    let heads = int(map, "num_attention_heads")?;
    if heads == 0 {
        return Err("`num_attention_heads` is 0".into());
    }
    if matches!(model_type, "llama" | "mistral") && map.get("head_dim").is_none_or(Json::is_null) {
        let hidden = int(map, "hidden_size")?;
        map.insert("head_dim".into(), Json::from(hidden / heads));
    }
    if map.get("num_key_value_heads").is_none_or(Json::is_null) {
        map.insert("num_key_value_heads".into(), Json::from(heads));
    }
    Ok(())
}

/// transformers' `convert_rope_params_to_dict` + `standardize_rope_params` for a config whose
/// RoPE settings are one dict (not one per layer type).
fn standardize_rope(
    map: &Map<String, Json>,
    rope_scaling: Option<Json>,
    rope_theta: Option<Json>,
    partial: Option<Json>,
) -> Result<Map<String, Json>, String> {
    let given = rope_scaling.or_else(|| map.get("rope_parameters").cloned());
    let mut rope = match given {
        None | Some(Json::Null) => Map::new(),
        Some(Json::Object(m)) => m,
        Some(_) => return Err("`rope_parameters` is not an object".into()),
    };
    if rope.contains_key("full_attention") || rope.contains_key("sliding_attention") {
        return Err("RoPE parameters per layer type".into());
    }
    // transformers' `default_theta`, 10000.0 for these classes, where the key is missing.
    let theta = rope_theta.unwrap_or(Json::from(10000.0));
    rope.entry("rope_theta").or_insert(theta);
    if let Some(p) = partial {
        rope.entry("partial_rotary_factor").or_insert(p);
    }
    let ty = rope.get("type").cloned().unwrap_or(Json::from("default"));
    rope.entry("rope_type").or_insert(ty);
    let scaled = matches!(
        rope.get("rope_type").and_then(Json::as_str),
        Some("llama3" | "yarn" | "longrope")
    );
    // A top-level `original_max_position_embeddings` is not one of these classes' fields:
    // transformers stores it only after standardizing, which so takes the context length.
    if scaled {
        if let Some(max) = map.get("max_position_embeddings") {
            rope.entry("original_max_position_embeddings")
                .or_insert(max.clone());
        }
    }
    // `TextModel.__init__` mirrors a top-level `original_max_position_embeddings` for any type.
    if let Some(orig) = map.get("original_max_position_embeddings") {
        rope.entry("original_max_position_embeddings")
            .or_insert(orig.clone());
    }
    Ok(rope)
}
