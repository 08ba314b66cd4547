//! PEFT's `alpha_pattern` / `rank_pattern` lookup.
//!
//! PEFT (`utils/other.py`, `get_pattern_key`) takes the FIRST key, in the order the JSON
//! file lists them, for which `re.match(rf"(.*\.)?({key})$", module_name)` succeeds: the key
//! must match a whole dotted suffix of the module name.

use std::path::Path;

use regex::{Regex, RegexBuilder};
use serde_json::Number;

use super::json::PatternValue;
use crate::error::{Error, Result};

/// Bytes a pattern's compiled regex and its lazy DFA may take: a module-name pattern needs a
/// few KiB; a hostile one is refused (compile) or falls back to a slower search (DFA).
const REGEX_BYTES: usize = 1 << 20;
const DFA_BYTES: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct Patterns<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T> Patterns<T> {
    /// Compile `field`'s entries (in file order); `value` reads an entry's number.
    pub fn parse(
        path: &Path,
        field: &str,
        raw: Vec<(String, PatternValue)>,
        value: impl Fn(&Number) -> Option<T>,
    ) -> Result<Patterns<T>> {
        let mut entries = Vec::new();
        for (key, v) in raw {
            let regex = RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .size_limit(REGEX_BYTES)
                .dfa_size_limit(DFA_BYTES)
                .build()
                .map_err(|e| {
                    Error::config(
                        path,
                        format!("{field}: key {key:?} is not a valid regex: {e}"),
                    )
                })?;
            let v = v.0.as_ref().and_then(&value).ok_or_else(|| {
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
        let raw: super::super::json::PatternEntries = serde_json::from_str(json).unwrap();
        Patterns::parse(Path::new("x"), "alpha_pattern", raw.0, Number::as_f64).unwrap()
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
