//! `adapter_config.json`: the fields that decide what a merge means, and the refusals.

use std::path::Path;

use serde::Deserialize;
use serde_json::Number;

use super::json::{IsSet, PatternEntries, TargetModules, Text, TokenIndices};
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
    pub target_modules: TargetModules,
    pub base_model_name_or_path: Option<String>,
    pub use_dora: bool,
    /// `trainable_token_indices`: a list (for the input embedding) or {module: list}.
    pub trainable_token_indices: TokenIndices,
}

/// The config as read: every field lorafs looks at, in a compact form (see `json.rs`);
/// other fields are skipped unread.
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
    alpha_pattern: PatternEntries,
    #[serde(default)]
    rank_pattern: PatternEntries,
    #[serde(default)]
    target_modules: TargetModules,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    layer_replication: IsSet,
    #[serde(default)]
    init_lora_weights: Text,
    #[serde(default)]
    alora_invocation_tokens: IsSet,
    #[serde(default)]
    use_qalora: bool,
    #[serde(default)]
    arrow_config: IsSet,
    #[serde(default)]
    use_kasa: IsSet,
    #[serde(default)]
    kasa_config: IsSet,
    #[serde(default)]
    use_bdlora: IsSet,
    #[serde(default)]
    velora_config: IsSet,
    #[serde(default)]
    monteclora_config: IsSet,
    // `lora_bias` and `modules_to_save` are only type-checked: the saved tensors are what
    // counts (`lora_B.bias`, `modules_to_save.*` keys).
    #[serde(default)]
    #[allow(dead_code)]
    lora_bias: bool,
    #[serde(default)]
    #[allow(dead_code)]
    modules_to_save: IsSet,
    #[serde(default)]
    trainable_token_indices: TokenIndices,
    #[serde(default)]
    bias: Option<String>,
}

fn default_r() -> usize {
    8
}

/// The largest `adapter_config.json` read. Real ones are a few KiB (a long
/// `trainable_token_indices` list, a few hundred KiB); the cap bounds a hostile one.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The config's bytes, refused past [`MAX_CONFIG_BYTES`] before they are read whole.
fn read_capped(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = crate::baseio::open_regular(path)?;
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
    Ok(bytes)
}

/// Parse the config: a JSON object whose fields have the types PEFT writes.
fn parse(path: &Path, bytes: &[u8]) -> Result<Raw> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(Error::config(path, "expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|source| match source.classify() {
        serde_json::error::Category::Data => Error::config(path, source.to_string()),
        serde_json::error::Category::Io
        | serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof => Error::Json {
            path: path.to_path_buf(),
            source,
        },
    })
}

impl AdapterConfig {
    /// Read and check `adapter_config.json`; refuse what cannot be merged into a dense base.
    pub fn load(path: &Path) -> Result<AdapterConfig> {
        let raw = parse(path, &read_capped(path)?)?;
        refusals(path, &raw)?;
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
        let alpha_pattern =
            Patterns::parse(path, "alpha_pattern", raw.alpha_pattern.0, Number::as_f64)?;
        let rank_pattern = Patterns::parse(path, "rank_pattern", raw.rank_pattern.0, |v| {
            v.as_u64().and_then(|r| usize::try_from(r).ok())
        })?;
        Ok(AdapterConfig {
            r: raw.r,
            lora_alpha: raw.lora_alpha.unwrap_or(8.0),
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            alpha_pattern,
            rank_pattern,
            target_modules: raw.target_modules,
            base_model_name_or_path: raw.base_model_name_or_path,
            use_dora: raw.use_dora,
            trainable_token_indices: raw.trainable_token_indices,
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
        match &self.trainable_token_indices {
            TokenIndices::Unset => None,
            TokenIndices::List(ids) => Some(ids.clone()),
            TokenIndices::Modules(map) => map.iter().find_map(|(k, ids)| {
                let matches = module == k
                    || module
                        .strip_suffix(k.as_str())
                        .is_some_and(|rest| rest.ends_with('.'));
                matches.then(|| ids.clone())
            }),
        }
    }

    /// `target_modules` for display.
    pub fn target_modules_display(&self) -> String {
        match &self.target_modules {
            TargetModules::Unset => "(not set)".into(),
            TargetModules::Regex(s) => format!("regex {s:?}"),
            TargetModules::Names(names) => {
                let mut names = names.clone();
                names.sort();
                names.join(", ")
            }
            TargetModules::Other(text) => text.clone(),
        }
    }
}

/// Adapters whose merge is not a plain LoRA delta on a dense base.
fn refusals(path: &Path, raw: &Raw) -> Result<()> {
    let refuse = |what: &str| Err(Error::unsupported(path, what));
    match raw.peft_type.as_deref() {
        Some("LORA") => {}
        Some(other) => {
            return refuse(&format!(
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
    if raw.alora_invocation_tokens.0 {
        return refuse(
            "aLoRA (alora_invocation_tokens) activates only after the invocation tokens, \
             so it has no merged equivalent",
        );
    }
    if raw.arrow_config.0 {
        return refuse("Arrow routing picks adapters per token, so it has no merged equivalent");
    }
    if raw.use_qalora {
        return refuse("QALoRA adapters need a quantized base; merge them with PEFT");
    }
    if raw.use_kasa.0 || raw.kasa_config.0 {
        return refuse("KaSA modifies the base weights' singular values; lorafs does not merge it");
    }
    if raw.layer_replication.0 {
        return refuse("layer_replication changes the number of layers, not their values");
    }
    if let Some(init) = &raw.init_lora_weights.0 {
        let lower = init.to_ascii_lowercase();
        if ["pissa", "olora", "corda", "lora_ga", "loftq"]
            .iter()
            .any(|p| lower.starts_with(p))
        {
            return refuse(&format!(
                "init_lora_weights is \"{init}\": this adapter expects a modified base model; \
                 convert it to a plain LoRA first (PEFT's `path_initial_model_for_weight_conversion`)"
            ));
        }
    }
    for (set, name) in [
        (raw.use_bdlora, "BD-LoRA (use_bdlora)"),
        (raw.velora_config, "VeLoRA (velora_config)"),
        (raw.monteclora_config, "MonteCLoRA (monteclora_config)"),
    ] {
        if set.0 {
            return refuse(&format!(
                "{name} is a LoRA variant lorafs does not merge; merge it with PEFT"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<AdapterConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, text).unwrap();
        AdapterConfig::load(&path)
    }

    #[test]
    fn an_infinite_alpha_cannot_be_written_in_json() {
        let err = load(r#"{"peft_type": "LORA", "lora_alpha": 1e999}"#).unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");
    }

    #[test]
    fn fields_keep_their_meaning_in_the_compact_form() {
        let c = load(
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 16, "unknown": [[1, {"x": 2}]],
                "target_modules": ["v_proj", "q_proj"], "layer_replication": null,
                "init_lora_weights": true, "use_kasa": false,
                "alpha_pattern": {"q_proj": 32}, "rank_pattern": {},
                "trainable_token_indices": {"embed_tokens": [5, 7]}}"#,
        )
        .unwrap();
        assert_eq!(c.target_modules_display(), "q_proj, v_proj");
        assert_eq!(c.alpha_for("model.layers.0.self_attn.q_proj"), 32.0);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.token_indices_for("model.embed_tokens"), Some(vec![5, 7]));
        assert_eq!(c.token_indices_for("model.my_embed_tokens"), None);
        let refused = load(r#"{"peft_type": "LORA", "layer_replication": [[0, 1]]}"#);
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("layer_replication"));
        let bad = load(r#"{"peft_type": "LORA", "trainable_token_indices": [1, -2]}"#);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("trainable_token_indices"));
        let not_object = load("[1]").unwrap_err().to_string();
        assert!(
            not_object.contains("expected a JSON object"),
            "{not_object}"
        );
    }

    #[test]
    fn pattern_keys_are_bounded() {
        let keys: Vec<String> = (0..=crate::adapter::json::MAX_PATTERN_KEYS)
            .map(|i| format!("\"k{i}\": 1"))
            .collect();
        let text = format!(
            r#"{{"peft_type": "LORA", "alpha_pattern": {{{}}}}}"#,
            keys.join(",")
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("more than 4096 keys"), "{err}");
    }
}
