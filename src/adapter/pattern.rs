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

/// The regex a key is compiled into: PEFT's `(.*\.)?({key})$` under `re.match`.
const PREFIX: &str = r"^(?:.*\.)?(?:";
const SUFFIX: &str = ")$";

/// What is wrong with `key`, in one line: the `regex` crate's syntax error is a diagram of
/// several lines (the pattern, a caret under the fault, the error), so the pattern is parsed
/// again with `regex-syntax` (the parser `regex` uses, with the same defaults) for the
/// error's kind and position alone.
fn problem(key: &str, pattern: &str, err: regex::Error) -> String {
    let diagram = match err {
        regex::Error::Syntax(diagram) => diagram,
        other => return other.to_string(),
    };
    let (kind, span) = match regex_syntax::Parser::new().parse(pattern) {
        Err(regex_syntax::Error::Parse(e)) => (e.kind().to_string(), *e.span()),
        Err(regex_syntax::Error::Translate(e)) => (e.kind().to_string(), *e.span()),
        // Parsed here (another regex-syntax version?): the diagram's last line names it.
        Ok(_) | Err(_) => {
            let last = diagram.lines().last().unwrap_or_default();
            return last.strip_prefix("error: ").unwrap_or(last).to_string();
        }
    };
    // The position in the key, when the fault is in the key rather than in what wraps it.
    match span.start.offset.checked_sub(PREFIX.len()) {
        Some(at) if at < key.len() => {
            let character = key.get(..at).map_or(0, |k| k.chars().count()) + 1;
            format!("{kind} (at character {character})")
        }
        _ => kind,
    }
}

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
            let pattern = format!("{PREFIX}{key}{SUFFIX}");
            let regex = RegexBuilder::new(&pattern)
                .size_limit(REGEX_BYTES)
                .dfa_size_limit(DFA_BYTES)
                .build()
                .map_err(|e| {
                    let problem = problem(&key, &pattern, e);
                    Error::config(
                        path,
                        format!("{field}: key {key:?} is not a valid regex: {problem}"),
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

    fn error(json: &str) -> String {
        let raw: super::super::json::PatternEntries = serde_json::from_str(json).unwrap();
        let path = Path::new("adapter_config.json");
        match Patterns::parse(path, "rank_pattern", raw.0, Number::as_u64) {
            Ok(_) => panic!("{json} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_invalid_key_is_one_line_naming_the_problem() {
        let message = error(r#"{"q_proj": 2, "layers.(1": 4}"#);
        assert!(
            message.contains("adapter_config.json")
                && message.contains("rank_pattern: key \"layers.(1\" is not a valid regex")
                // The key's `(` takes the wrapping group's `)`: the fault has no place
                // in the key, so none is given.
                && message.ends_with(": unclosed group"),
            "{message}"
        );
        let message = error(r#"{"a[z-a]": 4}"#);
        assert!(
            message.ends_with(
                "invalid character class range, the start must be <= the end (at character 3)"
            ),
            "{message}"
        );
        // A fault found only after parsing (translation).
        let message = error(r#"{"\\p{Nope}": 4}"#);
        assert!(
            message.ends_with(": Unicode property not found (at character 1)"),
            "{message}"
        );
        let message = error(r#"{"*_proj": 4}"#);
        assert!(
            message.ends_with(": repetition operator missing expression (at character 1)"),
            "{message}"
        );
        for message in [message, error(r#"{"é)(?": 4}"#)] {
            assert!(
                !message.contains('\n') && !message.contains('^'),
                "{message}"
            );
        }
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
