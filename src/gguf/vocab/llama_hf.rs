//! A Llama-style SentencePiece tokenizer saved as `tokenizer.json` only (a BPE with byte
//! fallback, as transformers saves `LlamaTokenizerFast`): the converter's
//! `_set_vocab_llama_hf` through gguf-py's `LlamaHfVocab`.

use super::class::TokenizerClass;
use super::hf_tokenizer::{HfTokenizer, TOKENIZER_JSON};
use super::sentencepiece::set_token_arrays;
use super::special::{SpecialVocab, DEFAULT_TYPES};
use super::{token_type, truthy, Dir, TOKENIZER_CONFIG};
use crate::gguf::{Metadata, Value};
use crate::Result;
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet};

/// Whether `LlamaHfVocab` takes this directory: a `tokenizer.json` BPE with byte fallback
/// and a `Sequence` decoder. Where the converter's check raises `FileNotFoundError` or
/// `TypeError` (Llama 3, a missing file, a `null` decoder) it falls back to the BPE path:
/// `false`; where it raises anything else, the conversion fails: an error.
pub(crate) fn applies(dir: &Dir) -> Result<bool> {
    let Some(file) = dir.tokenizer_json()? else {
        return Ok(false);
    };
    let json = &file.outline;
    let missing = |what: &str| dir.bad(TOKENIZER_JSON, format!("no {what}"));
    let model = json.get("model").ok_or_else(|| missing("model"))?;
    let kind = model.get("type").ok_or_else(|| missing("model.type"))?;
    let is_bpe = kind == &Json::from("BPE");
    let flag = |key: &str, default: bool| model.get(key).map_or(default, truthy);
    let is_llama3 = is_bpe && flag("ignore_merges", false) && !flag("byte_fallback", true);
    if is_llama3 || !is_bpe || !flag("byte_fallback", false) {
        return Ok(false);
    }
    let decoder = json.get("decoder").ok_or_else(|| missing("decoder"))?;
    if decoder.is_null() {
        return Ok(false);
    }
    let decoder_type = decoder.get("type").ok_or_else(|| missing("decoder.type"))?;
    Ok(decoder_type == &Json::from("Sequence"))
}

/// `_set_vocab_llama_hf`.
pub(crate) fn set_vocab(dir: &Dir, meta: &mut Metadata) -> Result<()> {
    let tokenizer = HfTokenizer::load(dir)?;
    let vocab = tokenizer.vocab();
    let base_size = tokenizer.tokenizer.get_vocab_size(false);
    // `get_added_vocab()`, sorted by id: those past the base vocabulary come after it.
    let mut added: Vec<(u32, String)> = tokenizer
        .tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, token)| (id, token.content))
        .collect();
    added.sort();
    let added: Vec<String> = added
        .into_iter()
        .filter(|(id, _)| *id as usize >= base_size)
        .map(|(_, text)| text)
        .collect();
    let specials = special_tokens(dir, &vocab, tokenizer.class)?;
    let special_ids: HashSet<u32> = specials.values().copied().collect();
    let mut reverse: HashMap<u32, &str> = HashMap::new();
    for (text, id) in &vocab {
        reverse.insert(*id, text);
    }
    let mut tokens = Vec::with_capacity(base_size + added.len());
    let mut types = Vec::with_capacity(base_size + added.len());
    for id in 0..base_size as u32 {
        let Some(text) = reverse.get(&id) else {
            return Err(dir.bad(TOKENIZER_JSON, format!("no token has id {id}")));
        };
        types.push(if is_byte_token(text) {
            token_type::BYTE
        } else if special_ids.contains(&id) {
            token_type::CONTROL
        } else {
            token_type::NORMAL
        });
        tokens.push(text.to_string());
    }
    for text in added {
        types.push(if specials.contains_key(&text) {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        });
        tokens.push(text);
    }
    let scores = vec![-1000.0f32; tokens.len()];
    let n_vocab = tokens.len();
    meta.set("tokenizer.ggml.model", Value::Text("llama".into()));
    meta.set("tokenizer.ggml.pre", Value::Text("default".into()));
    set_token_arrays(meta, tokens, Some(scores), types);
    SpecialVocab::load(dir, false, &DEFAULT_TYPES, Some(n_vocab))?.add_to(meta);
    Ok(())
}

/// `<0xHH>`, a byte-fallback token.
fn is_byte_token(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && b.starts_with(b"<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// transformers' `all_special_tokens` with their ids: the named special tokens of
/// `tokenizer_config.json` (else `special_tokens_map.json`; the tokenizer class's defaults
/// where neither names one) and its extra special tokens.
fn special_tokens(
    dir: &Dir,
    vocab: &HashMap<String, u32>,
    class: TokenizerClass,
) -> Result<HashMap<String, u32>> {
    let config = match dir.json_object(TOKENIZER_CONFIG)? {
        Some(config) => Some(config),
        None => dir.json_object("special_tokens_map.json")?,
    };
    let mut config = config.unwrap_or_default();
    for (key, token) in class.default_tokens() {
        config.entry(*key).or_insert_with(|| Json::from(*token));
    }
    let content = |value: &Json| match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    };
    let mut names: Vec<String> = DEFAULT_TYPES
        .iter()
        .filter_map(|kind| config.get(&format!("{kind}_token")).and_then(content))
        .collect();
    for key in ["extra_special_tokens", "additional_special_tokens"] {
        if let Some(Json::Array(list)) = config.get(key) {
            names.extend(list.iter().filter_map(content));
        }
    }
    names
        .into_iter()
        .map(|name| match vocab.get(&name) {
            Some(id) => Ok((name, *id)),
            None => Err(dir.bad(
                TOKENIZER_CONFIG,
                format!("special token {name:?} is not in the vocabulary"),
            )),
        })
        .collect()
}
