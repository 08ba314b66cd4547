//! `adapter_config.json`: the fields that decide what a merge means, and the refusals.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::pattern::Patterns;
use crate::error::{Error, Result};

/// The parts of a PEFT `LoraConfig` that change merged values.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub alpha_pattern: Patterns<f64>,
    pub rank_pattern: Patterns<usize>,
    /// `target_modules` as written: a list of names, a regex string, or absent.
    pub target_modules: Option<Value>,
    pub base_model_name_or_path: Option<String>,
    pub use_dora: bool,
    /// `trainable_token_indices`: a list (for the input embedding) or {module: list}.
    pub trainable_token_indices: Option<Value>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    alpha_pattern: Option<Map<String, Value>>,
    #[serde(default)]
    rank_pattern: Option<Map<String, Value>>,
    #[serde(default)]
    target_modules: Option<Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    layer_replication: Option<Value>,
    #[serde(default)]
    init_lora_weights: Option<Value>,
    #[serde(default)]
    alora_invocation_tokens: Option<Value>,
    #[serde(default)]
    use_qalora: bool,
    #[serde(default)]
    arrow_config: Option<Value>,
    // `lora_bias` and `modules_to_save` are only type-checked: the saved tensors are what
    // counts (`lora_B.bias`, `modules_to_save.*` keys).
    #[serde(default)]
    #[allow(dead_code)]
    lora_bias: bool,
    #[serde(default)]
    #[allow(dead_code)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    trainable_token_indices: Option<Value>,
    #[serde(default)]
    bias: Option<String>,
}

fn default_r() -> usize {
    8
}

/// The largest `adapter_config.json` read. Real ones are a few KiB (a long
/// `trainable_token_indices` list, a few hundred KiB); a parsed JSON value takes several
/// times its text, so a cap keeps a hostile config's memory bounded.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The config's JSON, refused past [`MAX_CONFIG_BYTES`] before it is read whole.
fn read_capped(path: &Path) -> Result<Value> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::config(
            path,
            format!(
                "larger than {} MiB; an adapter config is a few KiB",
                MAX_CONFIG_BYTES >> 20
            ),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl AdapterConfig {
    /// Read and check `adapter_config.json`; refuse what cannot be merged into a dense base.
    pub fn load(path: &Path) -> Result<AdapterConfig> {
        let value = read_capped(path)?;
        if !value.is_object() {
            return Err(Error::config(path, "expected a JSON object"));
        }
        let raw = Raw::deserialize(&value).map_err(|e| Error::config(path, e.to_string()))?;
        let refuse = |what: String| Err(Error::unsupported(path, what));

        match raw.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => {
                return refuse(format!(
                    "peft_type is {other}; lorafs merges LoRA adapters only (peft_type \"LORA\")"
                ))
            }
            None => {
                return Err(Error::config(
                    path,
                    "no `peft_type`; is this a PEFT adapter_config.json?",
                ))
            }
        }
        if is_set(raw.alora_invocation_tokens.as_ref()) {
            return refuse(
                "aLoRA (alora_invocation_tokens) activates only after the invocation tokens, \
                 so it has no merged equivalent"
                    .into(),
            );
        }
        if is_set(raw.arrow_config.as_ref()) {
            return refuse(
                "Arrow routing picks adapters per token, so it has no merged equivalent".into(),
            );
        }
        if raw.use_qalora {
            return refuse("QALoRA adapters need a quantized base; merge them with PEFT".into());
        }
        if value.get("use_kasa").and_then(Value::as_bool) == Some(true)
            || is_set(value.get("kasa_config"))
        {
            return refuse(
                "KaSA modifies the base weights' singular values; lorafs does not merge it".into(),
            );
        }
        if is_set(raw.layer_replication.as_ref()) {
            return refuse(
                "layer_replication changes the number of layers, not their values".into(),
            );
        }
        if let Some(Value::String(init)) = &raw.init_lora_weights {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "lora_ga", "loftq"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                return refuse(format!(
                    "init_lora_weights is \"{init}\": this adapter expects a modified base model; \
                     convert it to a plain LoRA first (PEFT's `path_initial_model_for_weight_conversion`)"
                ));
            }
        }
        for (field, name) in [
            ("use_bdlora", "BD-LoRA (use_bdlora)"),
            ("velora_config", "VeLoRA (velora_config)"),
            ("monteclora_config", "MonteCLoRA (monteclora_config)"),
        ] {
            if is_set(value.get(field)) {
                return refuse(format!(
                    "{name} is a LoRA variant lorafs does not merge; merge it with PEFT"
                ));
            }
        }
        if let Some(indices) = &raw.trainable_token_indices {
            if is_set(Some(indices)) && token_lists(indices).is_none() {
                return Err(Error::config(
                    path,
                    "trainable_token_indices must be a list of token ids or an object {module: [ids]}",
                ));
            }
        }
        if let Some(other) = raw.bias.as_deref() {
            if !matches!(other, "none" | "all" | "lora_only") {
                return Err(Error::config(
                    path,
                    format!("bias is {other:?}; expected \"none\", \"all\" or \"lora_only\""),
                ));
            }
        }
        if raw.r == 0 {
            return Err(Error::config(path, "r is 0"));
        }
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        let alpha_pattern =
            Patterns::parse(path, "alpha_pattern", raw.alpha_pattern, |v| v.as_f64())?;
        let rank_pattern = Patterns::parse(path, "rank_pattern", raw.rank_pattern, |v| {
            v.as_u64().and_then(|r| usize::try_from(r).ok())
        })?;
        Ok(AdapterConfig {
            r: raw.r,
            lora_alpha,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            alpha_pattern,
            rank_pattern,
            target_modules: raw.target_modules,
            base_model_name_or_path: raw.base_model_name_or_path,
            use_dora: raw.use_dora,
            trainable_token_indices: raw.trainable_token_indices.filter(|v| is_set(Some(v))),
        })
    }

    /// `lora_alpha` for a module (PEFT: `alpha_pattern` first match, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .lookup(module)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// The configured rank for a module (`rank_pattern` first match, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern.lookup(module).copied().unwrap_or(self.r)
    }

    /// PEFT's scaling for a module whose factors have rank `r` (tuners/lora/layer.py).
    pub fn scale_for(&self, module: &str, r: usize) -> f64 {
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The token ids whose rows `module` replaces (PEFT `trainable_token_indices`): a plain
    /// list applies to the input embedding (the only module PEFT then wraps), an object maps
    /// module-name patterns (matched like target modules: the key equals the name or a dotted
    /// suffix of it) to lists.
    pub fn token_indices_for(&self, module: &str) -> Option<Vec<usize>> {
        let value = self.trainable_token_indices.as_ref()?;
        match value {
            Value::Array(_) => token_list(value),
            Value::Object(map) => map.iter().find_map(|(k, v)| {
                let matches = module == k || module.ends_with(&format!(".{k}"));
                if matches {
                    token_list(v)
                } else {
                    None
                }
            }),
            _ => None,
        }
    }

    /// `target_modules` for display.
    pub fn target_modules_display(&self) -> String {
        match &self.target_modules {
            None | Some(Value::Null) => "(not set)".into(),
            Some(Value::String(s)) => format!("regex {s:?}"),
            Some(Value::Array(items)) => {
                let mut names: Vec<String> = items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect();
                names.sort();
                names.join(", ")
            }
            Some(other) => other.to_string(),
        }
    }
}

fn token_list(value: &Value) -> Option<Vec<usize>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// Whether `trainable_token_indices` has one of its two valid forms.
fn token_lists(value: &Value) -> Option<()> {
    match value {
        Value::Array(_) => token_list(value).map(|_| ()),
        Value::Object(map) => map.values().try_for_each(|v| token_list(v).map(|_| ())),
        _ => None,
    }
}

fn is_set(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}
