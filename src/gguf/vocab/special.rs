//! The converter's `SpecialVocab` (gguf-py `vocab.py`): BPE merges, special token ids, the
//! add-bos/eos/sep flags, the chat template and the normalizer flags, read from
//! `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`/`.json` and
//! `config.json`, and written in the order of its `add_to_gguf`.
//!
//! The reading mirrors the converter's Python statement by statement, truthiness included
//! (`if not special_bos`), since its odd cases decide the values.

use super::{truthy, Dir};
use crate::gguf::{Array, Metadata, Value};
use crate::Result;
use serde_json::{Map, Value as Json};

/// What `add_to_gguf` writes.
pub(crate) struct SpecialVocab {
    types: Vec<String>,
    n_vocab: Option<usize>,
    load_merges: bool,
    pub(crate) merges: Vec<String>,
    /// `special_token_ids`, in insertion order (a Python dict).
    ids: Vec<(String, u32)>,
    /// `add_special_token`, in insertion order.
    add: Vec<(String, bool)>,
    chat_template: Option<Json>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
}

/// The special token types with a `GGUFWriter.add_{type}_token_id` method, and their keys.
const ID_KEYS: [(&str, &str); 8] = [
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
];

/// The types with a `GGUFWriter.add_add_{type}_token` method, and their keys.
const ADD_KEYS: [(&str, &str); 3] = [
    ("bos", "tokenizer.ggml.add_bos_token"),
    ("eos", "tokenizer.ggml.add_eos_token"),
    ("sep", "tokenizer.ggml.add_sep_token"),
];

/// The default `special_token_types`.
pub(crate) const DEFAULT_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// `d.get(key, {}).get(inner)` on JSON: `None` where Python would find nothing.
fn get2<'j>(value: &'j Json, key: &str, inner: &str) -> Option<&'j Json> {
    value.get(key).and_then(|v| v.get(inner))
}

/// A value that is Python-truthy, else `None` (the walrus `if x := ...:`).
fn truthy_value(value: Option<&Json>) -> Option<Json> {
    value.filter(|v| truthy(v)).cloned()
}

/// `x in (a, b)` with `None` for unset names.
fn in_pair(x: &Json, a: &Option<Json>, b: &Option<Json>) -> bool {
    a.as_ref() == Some(x) || b.as_ref() == Some(x)
}

impl SpecialVocab {
    pub(crate) fn load(
        dir: &Dir,
        load_merges: bool,
        types: &[&str],
        n_vocab: Option<usize>,
    ) -> Result<SpecialVocab> {
        let mut vocab = SpecialVocab {
            types: types.iter().map(|t| t.to_string()).collect(),
            n_vocab,
            load_merges,
            merges: Vec::new(),
            ids: Vec::new(),
            add: Vec::new(),
            chat_template: None,
            lowercase: None,
            strip_accents: None,
        };
        vocab.load_tokenizer_json(dir)?;
        vocab.load_config_json(dir)?;
        if vocab.load_merges && vocab.merges.is_empty() {
            vocab.load_merges_txt(dir)?;
        }
        Ok(vocab)
    }

    /// `add_to_gguf`.
    pub(crate) fn add_to(&self, meta: &mut Metadata) {
        if !self.merges.is_empty() {
            meta.set(
                "tokenizer.ggml.merges",
                Value::Array(Array::Text(self.merges.clone())),
            );
        }
        for (kind, id) in &self.ids {
            if let Some((_, key)) = ID_KEYS.iter().find(|(k, _)| k == kind) {
                meta.set(*key, Value::U32(*id));
            }
        }
        for (kind, flag) in &self.add {
            if let Some((_, key)) = ADD_KEYS.iter().find(|(k, _)| k == kind) {
                meta.set(*key, Value::Bool(*flag));
            }
        }
        if let Some(template) = &self.chat_template {
            add_chat_template(meta, template);
        }
        if let Some(flag) = self.lowercase {
            meta.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(flag));
        }
        if let Some(flag) = self.strip_accents {
            meta.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(flag));
        }
    }

    fn set_add(&mut self, kind: &str, flag: bool) {
        match self.add.iter_mut().find(|(k, _)| k == kind) {
            Some(entry) => entry.1 = flag,
            None => self.add.push((kind.to_string(), flag)),
        }
    }

    fn set_add_default(&mut self, kind: &str, flag: bool) {
        if !self.add.iter().any(|(k, _)| k == kind) {
            self.add.push((kind.to_string(), flag));
        }
    }

    /// `_set_special_token`: the first id of a type wins; ids past the vocabulary are
    /// skipped; a value that is not an integer is ignored. `file` is where the id was read
    /// (for the error on a negative or oversized one).
    pub(crate) fn set_special_token(
        &mut self,
        dir: &Dir,
        file: &str,
        kind: &str,
        id: &Json,
    ) -> Result<()> {
        let Some(id) = id.as_i64().or_else(|| id.as_u64().map(|_| i64::MAX)) else {
            return Ok(());
        };
        if id < 0 {
            return Err(dir.bad(
                file,
                format!(
                    "invalid value for special token type {kind}: {id} (llama.cpp's \
                     convert_hf_to_gguf.py fails on it too)"
                ),
            ));
        }
        if self.n_vocab.is_none_or(|n| (id as u64) < n as u64) {
            if self.ids.iter().any(|(k, _)| k == kind) {
                return Ok(());
            }
            let id = u32::try_from(id).map_err(|_| {
                dir.bad(
                    file,
                    format!("special token {kind} id {id} does not fit in 32 bits"),
                )
            })?;
            self.ids.push((kind.to_string(), id));
        }
        Ok(())
    }

    fn load_merges_txt(&mut self, dir: &Dir) -> Result<()> {
        let Some(bytes) = dir.read("merges.txt")? else {
            return Ok(());
        };
        let text = String::from_utf8(bytes).map_err(|_| dir.bad("merges.txt", "not UTF-8"))?;
        let mut lines = text.lines().peekable();
        if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
            lines.next();
        }
        self.merges = lines
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let parts: Vec<&str> = l.split_whitespace().collect();
                (parts.len() == 2).then(|| format!("{} {}", parts[0], parts[1]))
            })
            .collect();
        Ok(())
    }

    fn load_config_json(&mut self, dir: &Dir) -> Result<()> {
        let types = self.types.clone();
        for kind in &types {
            let key = format!("{kind}_token_id");
            let mut id = dir.config.get(&key).cloned().unwrap_or(Json::Null);
            if id.is_null() {
                if let Some(text) = dir.config.get("text_config") {
                    id = text.get(&key).cloned().unwrap_or(Json::Null);
                }
            }
            self.set_special_token(dir, "config.json", kind, &id)?;
        }
        Ok(())
    }
}

/// `GGUFWriter.add_chat_template`: a string, or a list of named templates.
fn add_chat_template(meta: &mut Metadata, template: &Json) {
    let value = match template {
        Json::String(text) => text.clone(),
        Json::Array(choices) => {
            let mut default = None;
            let mut names: Vec<String> = Vec::new();
            for choice in choices {
                let name: String = choice
                    .get("name")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                let Some(text) = choice.get("template").filter(|t| !t.is_null()) else {
                    continue;
                };
                let text = text.as_str().unwrap_or_default().to_string();
                if name.is_empty() {
                    continue;
                }
                if name == "default" {
                    default = Some(text);
                } else {
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                    set_string(meta, &format!("tokenizer.chat_template.{name}"), text);
                }
            }
            // The converter lists the names from a Python set, whose order depends on the
            // interpreter's string hashing; sorted is one of its possible orders.
            names.sort();
            if !names.is_empty() {
                meta.set("tokenizer.chat_templates", Value::Array(Array::Text(names)));
            }
            match default {
                Some(text) => text,
                None => return,
            }
        }
        _ => return,
    };
    set_string(meta, "tokenizer.chat_template", value);
}

/// `GGUFWriter.add_string`, which skips an empty string.
fn set_string(meta: &mut Metadata, key: &str, value: String) {
    if !value.is_empty() {
        meta.set(key, Value::Text(value));
    }
}

mod from_tokenizer;

/// `tokenizer_config.json`'s content of a `{type}_token` entry: a string or an
/// AddedToken-like object's `content`.
fn token_content(entry: Option<&Json>) -> Option<String> {
    match entry? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The `tokenizer_config.json` map that the converter mutates while reading.
type Config = Option<Map<String, Json>>;
