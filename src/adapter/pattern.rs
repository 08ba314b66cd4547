//! PEFT's `alpha_pattern` / `rank_pattern` lookup.
//!
//! PEFT (`utils/other.py`, `get_pattern_key`) takes the FIRST key, in the order the JSON
//! file lists them, for which `re.match(rf"(.*\.)?({key})$", module_name)` succeeds: the key
//! must match a whole dotted suffix of the module name.

use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Patterns<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T> Patterns<T> {
    pub fn parse(
        path: &Path,
        field: &str,
        map: Option<Map<String, Value>>,
        value: impl Fn(&Value) -> Option<T>,
    ) -> Result<Patterns<T>> {
        let mut entries = Vec::new();
        for (key, v) in map.unwrap_or_default() {
            let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                Error::config(
                    path,
                    format!("{field}: key {key:?} is not a valid regex: {e}"),
                )
            })?;
            let v = value(&v).ok_or_else(|| {
                Error::config(path, format!("{field}: value for {key:?} is not a number"))
            })?;
            entries.push((key, regex, v));
        }
        Ok(Patterns { entries })
    }

    pub fn lookup(&self, module: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map(|(_, _, v)| v)
    }

    pub fn keys(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(k, _, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(json: &str) -> Patterns<f64> {
        let map: Map<String, Value> = serde_json::from_str(json).unwrap();
        Patterns::parse(Path::new("x"), "alpha_pattern", Some(map), |v| v.as_f64()).unwrap()
    }

    #[test]
    fn first_matching_key_in_file_order_wins() {
        let p = patterns(r#"{"q_proj": 1, "model.layers.3.self_attn.q_proj": 2}"#);
        assert_eq!(p.lookup("model.layers.3.self_attn.q_proj"), Some(&1.0));
        let p = patterns(r#"{"model.layers.3.self_attn.q_proj": 2, "q_proj": 1}"#);
        assert_eq!(p.lookup("model.layers.3.self_attn.q_proj"), Some(&2.0));
    }

    #[test]
    fn keys_match_whole_dotted_suffixes_only() {
        let p = patterns(r#"{"proj": 1, "layers\\.1\\..*v_proj": 3}"#);
        assert_eq!(p.lookup("model.layers.0.self_attn.q_proj"), None);
        assert_eq!(p.lookup("model.layers.1.self_attn.v_proj"), Some(&3.0));
        assert_eq!(p.lookup("model.layers.11.self_attn.v_proj"), None);
        assert_eq!(patterns(r#"{"q_proj": 5}"#).lookup("q_proj"), Some(&5.0));
    }
}
