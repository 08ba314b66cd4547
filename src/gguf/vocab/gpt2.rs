//! Byte-level BPE `tokenizer.json`: the converter's `_set_vocab_gpt2`, `get_vocab_base` and
//! `get_vocab_base_pre`.
//!
//! The converter reads the tokenizer through transformers' `AutoTokenizer`, which for a
//! `tokenizer.json` is the Hugging Face `tokenizers` library; lorafs loads the same file with
//! the same library (its Rust crate, [`hf_tokenizer`](super::hf_tokenizer)) so that
//! vocabulary, added tokens and the encoding of the pre-tokenizer check text are the ones the
//! converter sees.

use super::hf_tokenizer::{HfTokenizer, TOKENIZER_JSON};
use super::sentencepiece::set_token_arrays;
use super::special::{SpecialVocab, DEFAULT_TYPES};
use super::{looks_special, pre_hashes, token_type, Dir, TOKENIZER_CONFIG};
use crate::gguf::{Metadata, Value};
use crate::Result;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// `_set_vocab_gpt2`.
pub(crate) fn set_vocab(dir: &Dir, meta: &mut Metadata) -> Result<()> {
    let tokenizer = HfTokenizer::load(dir)?;
    // In the converter's order: the size check, the pre-tokenizer, the tokens.
    let (vocab, vocab_size) = sized_vocab(dir, &tokenizer)?;
    let pre = pre_tokenizer_name(dir, &tokenizer)?;
    let (tokens, types) = vocab_base(dir, &tokenizer, &vocab, vocab_size)?;
    meta.set("tokenizer.ggml.model", Value::Text("gpt2".into()));
    meta.set("tokenizer.ggml.pre", Value::Text(pre.into()));
    set_token_arrays(meta, tokens, None, types);
    SpecialVocab::load(dir, true, &DEFAULT_TYPES, None)?.add_to(meta);
    Ok(())
}

/// The converter's pre-tokenizer check text (`chktxt` of `get_vocab_base_pre`).
pub(crate) const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// The `chkhsh` of a tokenizer: the sha256 of Python's `str()` of the ids of the check text.
pub(crate) fn check_hash(dir: &Dir, tokenizer: &HfTokenizer) -> Result<String> {
    let ids = tokenizer.encode(dir, CHECK_TEXT, true)?;
    let text = format!(
        "[{}]",
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `get_vocab_base_pre`: the name llama.cpp gives the pre-tokenizer, or the refusal.
fn pre_tokenizer_name(dir: &Dir, tokenizer: &HfTokenizer) -> Result<&'static str> {
    let hash = check_hash(dir, tokenizer)?;
    pre_hashes::name_of(&hash).ok_or_else(|| {
        crate::Error::no_gguf(
            dir.path(TOKENIZER_JSON),
            format!(
                "its BPE pre-tokenizer (check hash {hash}) is not one llama.cpp knows, and \
                 llama.cpp's convert_hf_to_gguf.py refuses it too; to convert it anyway, add \
                 the hash to get_vocab_base_pre() in that converter and run it on the mounted \
                 merged directory"
            ),
        )
    })
}

/// The tokenizer's vocabulary and the model's vocabulary size, which must hold every id.
fn sized_vocab(dir: &Dir, tokenizer: &HfTokenizer) -> Result<(HashMap<String, u32>, usize)> {
    let vocab = tokenizer.vocab();
    let vocab_size = match dir.hparams.get("vocab_size") {
        None => vocab.len(),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= i32::MAX as u64)
            .map(|n| n as usize)
            .ok_or_else(|| {
                dir.bad(
                    "config.json",
                    format!("vocab_size {v} is not a vocabulary size"),
                )
            })?,
    };
    if let Some(max) = vocab.values().max() {
        if *max as usize >= vocab_size {
            return Err(dir.bad(
                "config.json",
                format!("vocab_size {vocab_size} is not above the tokenizer's largest id {max}"),
            ));
        }
    }
    Ok((vocab, vocab_size))
}

/// `get_vocab_base`: every id below the vocabulary size, holes as unused `[PAD{i}]`.
fn vocab_base(
    dir: &Dir,
    tokenizer: &HfTokenizer,
    vocab: &HashMap<String, u32>,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>)> {
    let mut reverse: Vec<Option<&str>> = vec![None; vocab_size];
    for (token, id) in vocab {
        reverse[*id as usize] = Some(token);
    }
    let added = tokenizer.tokenizer.get_added_tokens_decoder();
    let added_contents: std::collections::HashSet<&str> =
        added.values().map(|t| t.content.as_str()).collect();
    let clean_up = decode_cleans_up(dir, tokenizer)?;
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (i, token) in reverse.iter().enumerate() {
        let Some(token) = token else {
            tokens.push(format!("[PAD{i}]"));
            types.push(token_type::UNUSED);
            continue;
        };
        let mut token = token.to_string();
        if !added_contents.contains(token.as_str()) {
            tokens.push(token);
            types.push(token_type::NORMAL);
            continue;
        }
        let Some(info) = added.get(&(i as u32)) else {
            return Err(dir.bad(
                TOKENIZER_JSON,
                format!("token {i} ({token:?}) is also an added token with another id"),
            ));
        };
        if !info.normalized {
            let ids = tokenizer.encode(dir, &token, false)?;
            token = tokenizer.decode(dir, &ids)?;
            if clean_up {
                token = clean_up_tokenization(&token);
            }
        }
        if info.special || looks_special(&token) {
            types.push(token_type::CONTROL);
        } else {
            token = token.replace('\u{2581}', " ");
            types.push(token_type::USER_DEFINED);
        }
        tokens.push(token);
    }
    Ok((tokens, types))
}

/// Whether transformers' `decode` cleans up the spaces of its text: when the tokenizer
/// config asks for it, except for BPE models unless forced.
fn decode_cleans_up(dir: &Dir, tokenizer: &HfTokenizer) -> Result<bool> {
    let Some(config) = dir.json_object(TOKENIZER_CONFIG)? else {
        return Ok(false);
    };
    let flag = |key: &str| config.get(key).is_some_and(super::truthy);
    let is_bpe = matches!(
        tokenizer.tokenizer.get_model(),
        tokenizers::ModelWrapper::BPE(_)
    );
    Ok(flag("clean_up_tokenization_spaces")
        && (!is_bpe
            || flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |text, (from, to)| text.replace(from, to))
}
