//! The special tokens that `tokenizer_config.json` names (`bos_token`, `pad_token`, ...,
//! `extra_special_tokens`), as transformers applies them to a `tokenizer.json` it loads.
//!
//! The converter reads a `tokenizer.json` through `AutoTokenizer`, and transformers' tokenizer
//! `__init__` appends every named special token that the tokenizer does not have yet as a new
//! special added token (ids from the end of the vocabulary up, in the order of its named-token
//! table, then the extra tokens). The converter then writes those tokens as control tokens
//! where `config.json`'s vocabulary size leaves room for them. lorafs does the same with the
//! same library.
//!
//! A named token that `tokenizer.json` lists as an added token that is *not* special is a case
//! where transformers' tokenizer classes disagree (some make it special, some normalize it
//! differently): lorafs refuses it rather than guess.

use super::Dir;
use crate::Result;
use serde_json::{Map, Value as Json};
use std::collections::HashSet;
use tokenizers::{AddedToken, Tokenizer};

const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
const NAMED: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Appends to `tokenizer` the named special tokens it lacks, as transformers does: in its
/// order, each once, as special added tokens. `Err` if a named token is an added token that
/// is not special (see the module's comment).
pub(super) fn add_named_tokens(dir: &Dir, tokenizer: &mut Tokenizer) -> Result<()> {
    let Some(config) = dir.json_object(TOKENIZER_CONFIG)? else {
        return Ok(());
    };
    let added = tokenizer.get_added_tokens_decoder();
    let mut known: HashSet<String> = added.values().map(|t| t.content.clone()).collect();
    let mut missing = Vec::new();
    for (key, content) in named_tokens(&config) {
        if let Some(token) = added.values().find(|t| t.content == content) {
            if !token.special {
                return Err(dir.unsupported(
                    TOKENIZER_CONFIG,
                    &format!(
                        "a tokenizer that names {content:?} its {key} while tokenizer.json's \
                         added token {content:?} is not marked special"
                    ),
                ));
            }
        }
        if known.insert(content.clone()) {
            missing.push(AddedToken::from(content, true));
        }
    }
    if !missing.is_empty() {
        tokenizer.add_tokens(missing).map_err(|e| {
            dir.bad(
                TOKENIZER_CONFIG,
                format!("its special tokens cannot be added to tokenizer.json's: {e}"),
            )
        })?;
    }
    Ok(())
}

/// (the key naming it, the token) for each named special token of `tokenizer_config.json`:
/// the standard names in transformers' order, then other `*_token` keys with a string value
/// (transformers' model-specific tokens), then the `extra_special_tokens` (formerly
/// `additional_special_tokens`) list.
fn named_tokens(config: &Map<String, Json>) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    for key in NAMED {
        if let Some(content) = config.get(*key).and_then(token_content) {
            tokens.push((key.to_string(), content));
        }
    }
    for (key, value) in config {
        if key.ends_with("_token") && !NAMED.contains(&key.as_str()) {
            if let Json::String(content) = value {
                tokens.push((key.clone(), content.clone()));
            }
        }
    }
    let extra = config
        .get("extra_special_tokens")
        .or_else(|| config.get("additional_special_tokens"));
    let extra: Vec<&Json> = match extra {
        Some(Json::Array(list)) => list.iter().collect(),
        Some(Json::Object(map)) => map.values().collect(),
        _ => Vec::new(),
    };
    for value in extra {
        if let Some(content) = token_content(value) {
            tokens.push(("extra special token".to_string(), content));
        }
    }
    tokens
}

/// A token as `tokenizer_config.json` gives it: a string or an `AddedToken` object.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        Json::Object(map) => map
            .get("content")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        _ => None,
    }
}
