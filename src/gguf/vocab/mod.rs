//! The `tokenizer.*` keys of the GGUF view: what llama.cpp's `convert_hf_to_gguf.py` writes
//! in `set_vocab` for a model family, with the same keys, value types, values and order.
//!
//! The converter has three ways to read a vocabulary, tried in this order for Llama:
//! [`sentencepiece`] (`tokenizer.model`), [`llama_hf`] (a `tokenizer.json` BPE with byte
//! fallback, as transformers saves a Llama/Mistral SentencePiece tokenizer) and [`gpt2`]
//! (a byte-level BPE `tokenizer.json`, named by its pre-tokenizer hash). Each ends with
//! [`special`], the converter's `SpecialVocab`: merges, special token ids, the add-bos/eos
//! flags and the chat template.

mod class;
mod gpt2;
mod hf_tokenizer;
mod llama_hf;
mod memo;
mod named;
mod pre_hashes;
mod sentencepiece;
mod special;
mod tokenizer_json;

use super::arch::hparams::fill_class_defaults;
use super::{Metadata, ModelFiles, Value};
use crate::{Error, Result};
use serde_json::{Map, Value as Json};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tokenizer_json::TokenizerJson;

/// The tokenizer's settings file (special tokens, flags, chat template).
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// How a model family sets its vocabulary (the converter's `set_vocab` of its model class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabFamily {
    /// `LlamaModel.set_vocab` (Llama, Mistral and their relatives).
    Llama,
    /// `Qwen2Model.set_vocab` (Qwen2, Qwen3).
    Qwen,
}

/// The converter's token types (`gguf.TokenType`, the same numbers as SentencePiece's).
pub(crate) mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Appends the `tokenizer.*` keys of `files` to `meta`, as the converter's `set_vocab` for
/// `family` does. `config` is the model's `config.json`. The keys of a directory whose files
/// read the same as one of the last few are not computed again (see [`memo`]).
pub fn vocab_metadata(
    files: &dyn ModelFiles,
    config: &Json,
    family: VocabFamily,
    meta: &mut Metadata,
) -> Result<()> {
    let keys = memo::MEMO.get_or_compute(files, config, family, |files| {
        let mut keys = Metadata::new();
        compute(files, config, family, &mut keys)?;
        Ok(keys)
    })?;
    for (key, value) in keys.entries() {
        meta.set(key.clone(), value.clone());
    }
    Ok(())
}

/// The keys `vocab_metadata` appends, computed.
fn compute(
    files: &dyn ModelFiles,
    config: &Json,
    family: VocabFamily,
    meta: &mut Metadata,
) -> Result<()> {
    let dir = Dir::new(files, config)?;
    match family {
        VocabFamily::Llama => llama_vocab(&dir, meta),
        VocabFamily::Qwen => {
            if dir.has("tokenizer.model")? {
                sentencepiece::set_vocab(&dir, meta)
            } else {
                gpt2::set_vocab(&dir, meta)
            }
        }
    }
}

/// `LlamaModel.set_vocab`.
fn llama_vocab(dir: &Dir, meta: &mut Metadata) -> Result<()> {
    if dir.has("tekken.json")? && !dir.has("tokenizer.json")? {
        return Err(dir.unsupported(
            "tekken.json",
            "a Mistral Tekken tokenizer (converted by the converter through mistral_common)",
        ));
    }
    if let Some(tokenizer_config) = dir.json_object(TOKENIZER_CONFIG)? {
        if let Some(prefix) = tokenizer_config.get("add_prefix_space") {
            if !prefix.is_null() {
                meta.set(
                    "tokenizer.ggml.add_space_prefix",
                    Value::Bool(truthy(prefix)),
                );
            }
        }
        if tokenizer_config.get("tokenizer_class") == Some(&Json::from("HybridDNATokenizer")) {
            return Err(dir.unsupported(TOKENIZER_CONFIG, "a HybridDNATokenizer"));
        }
    }
    if dir.has("tokenizer.model")? {
        sentencepiece::set_vocab(dir, meta)?;
    } else if llama_hf::applies(dir)? {
        llama_hf::set_vocab(dir, meta)?;
    } else {
        gpt2::set_vocab(dir, meta)?;
    }
    let vocab_size = dir.hparams.get("vocab_size").and_then(Json::as_i64);
    // CodeLlama: the converter reloads the special tokens with the infill types and fixed
    // ids; of those only `eot` has a GGUF key, the rest are dropped with a warning.
    if vocab_size == Some(32016) {
        let mut special =
            special::SpecialVocab::load(dir, false, &["prefix", "suffix", "middle", "eot"], None)?;
        for (kind, id) in [("prefix", 32007), ("suffix", 32008), ("middle", 32009)] {
            special.set_special_token(dir, "config.json", kind, &Json::from(id))?;
        }
        special.set_special_token(dir, "config.json", "eot", &Json::from(32010))?;
        special.add_to(meta);
    }
    // Granite's small models.
    if vocab_size == Some(49152) {
        meta.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

/// Python's truth value of a JSON value (`if value:`).
pub(crate) fn truthy(value: &Json) -> bool {
    match value {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// The converter's `does_token_look_special`.
pub(crate) fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// The model directory as the vocabulary code reads it: its files and its hyperparameters
/// (`config.json` with its `text_config` moved to the root, as the converter's `hparams`).
pub(crate) struct Dir<'a> {
    files: &'a dyn ModelFiles,
    /// `config.json` as it is (`SpecialVocab` reads it so).
    config: &'a Json,
    /// The converter's `self.hparams`.
    hparams: Map<String, Json>,
    /// The JSON files parsed so far.
    parsed: RefCell<HashMap<String, Option<Rc<Json>>>>,
    /// `tokenizer.json` once parsed (often 10–20 MB, and read by more than one step).
    tokenizer: RefCell<Option<Option<Rc<TokenizerJson>>>>,
}

impl<'a> Dir<'a> {
    fn new(files: &'a dyn ModelFiles, config: &'a Json) -> Result<Dir<'a>> {
        let Some(root) = config.as_object() else {
            return Err(Error::config(
                files.root().join("config.json"),
                "not a JSON object",
            ));
        };
        let mut hparams = root.clone();
        if let Some(Json::Object(text)) = root.get("text_config") {
            hparams.extend(text.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        // The converter reads the config through transformers, whose class fills missing
        // keys (a missing `vocab_size` is the class's, which the vocabulary is padded to).
        if let Some(model_type) = root.get("model_type").and_then(Json::as_str) {
            fill_class_defaults(model_type, &mut hparams);
        }
        Ok(Dir {
            files,
            config,
            hparams,
            parsed: RefCell::default(),
            tokenizer: RefCell::default(),
        })
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.files.root().join(name)
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.files.read(name)
    }

    fn has(&self, name: &str) -> Result<bool> {
        Ok(self.read(name)?.is_some())
    }

    /// A JSON file, or `None` if it is absent (parsed once). `tokenizer.json` has a parse of
    /// its own: [`Dir::tokenizer_json`].
    fn json(&self, name: &str) -> Result<Option<Rc<Json>>> {
        debug_assert_ne!(name, hf_tokenizer::TOKENIZER_JSON);
        if let Some(parsed) = self.parsed.borrow().get(name) {
            return Ok(parsed.clone());
        }
        let parsed = (self.parse(name, |bytes| serde_json::from_slice(bytes))?).map(Rc::new);
        (self.parsed.borrow_mut()).insert(name.to_string(), parsed.clone());
        Ok(parsed)
    }

    /// `tokenizer.json`, or `None` if it is absent (parsed once).
    fn tokenizer_json(&self) -> Result<Option<Rc<TokenizerJson>>> {
        if let Some(parsed) = self.tokenizer.borrow().as_ref() {
            return Ok(parsed.clone());
        }
        let parsed = (self.parse(hf_tokenizer::TOKENIZER_JSON, TokenizerJson::parse)?).map(Rc::new);
        *self.tokenizer.borrow_mut() = Some(parsed.clone());
        Ok(parsed)
    }

    /// File `name` read with `parse`, or `None` if it is absent; a parse error names the file.
    fn parse<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&[u8]) -> serde_json::Result<T>,
    ) -> Result<Option<T>> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        parse(&bytes).map(Some).map_err(|source| Error::Json {
            path: self.path(name),
            source,
        })
    }

    /// A JSON file that must hold an object (the converter calls `.get` on it).
    fn json_object(&self, name: &str) -> Result<Option<Map<String, Json>>> {
        match self.json(name)?.as_deref() {
            None => Ok(None),
            Some(Json::Object(map)) => Ok(Some(map.clone())),
            Some(_) => Err(Error::config(self.path(name), "not a JSON object")),
        }
    }

    /// A file content that is not what the converter expects (where it would fail too).
    fn bad(&self, name: &str, what: impl Into<String>) -> Error {
        Error::config(self.path(name), what)
    }

    /// The refusal of a tokenizer lorafs does not convert, with the way out.
    fn unsupported(&self, name: &str, what: &str) -> Error {
        Error::no_gguf(
            self.path(name),
            format!(
                "lorafs does not convert {what} to GGUF; where llama.cpp's convert_hf_to_gguf.py \
                 converts it, run it on the mounted merged directory instead"
            ),
        )
    }
}

#[cfg(test)]
mod tests;
