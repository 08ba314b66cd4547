//! SentencePiece `tokenizer.model`: the converter's `_set_vocab_sentencepiece` and
//! `_create_vocab_sentencepiece`.
//!
//! The file is a protobuf `ModelProto`; only its `pieces` (field 1: a `SentencePiece` with
//! `piece` = 1, `score` = 2, `type` = 3) matter here, so a small decoder of those fields
//! reads it rather than a protobuf code generator. Every length is checked against the
//! bytes left, so a hostile file gives an error, never a panic or an allocation larger than
//! the file.

use super::special::{SpecialVocab, DEFAULT_TYPES};
use super::{looks_special, token_type, truthy, Dir, TOKENIZER_CONFIG};
use crate::gguf::{Array, Metadata, Value};
use crate::Result;
use serde_json::Value as Json;

/// One piece of the model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub text: String,
    pub score: f32,
    /// The SentencePiece type (`NORMAL` = 1 ... `BYTE` = 6), as in the file.
    pub kind: i32,
}

/// The pieces of a `ModelProto`; `Err` says what is wrong.
pub(crate) fn parse_model(bytes: &[u8]) -> std::result::Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut byte_fallback = false;
    let mut reader = Reader { bytes, pos: 0 };
    while !reader.done() {
        match reader.key()? {
            (1, 2) => pieces.push(parse_piece(reader.bytes()?)?),
            (2, 2) => byte_fallback = parse_byte_fallback(reader.bytes()?)?,
            (_, wire) => reader.skip(wire)?,
        }
    }
    validate(&pieces, byte_fallback)?;
    Ok(pieces)
}

/// `TrainerSpec.byte_fallback` (field 35), which decides whether byte pieces are allowed.
fn parse_byte_fallback(bytes: &[u8]) -> std::result::Result<bool, String> {
    let mut byte_fallback = false;
    let mut reader = Reader { bytes, pos: 0 };
    while !reader.done() {
        match reader.key()? {
            (35, 0) => byte_fallback = reader.varint()? != 0,
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok(byte_fallback)
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<Piece, String> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: token_type::NORMAL,
    };
    let mut reader = Reader { bytes, pos: 0 };
    while !reader.done() {
        match reader.key()? {
            (1, 2) => {
                piece.text = String::from_utf8(reader.bytes()?.to_vec())
                    .map_err(|_| "a piece is not valid UTF-8".to_string())?;
            }
            (2, 5) => piece.score = f32::from_le_bytes(reader.fixed::<4>()?),
            // `type` is a proto2 enum: SentencePiece's protobuf runtime keeps a value it does
            // not know as an unknown field, leaving the type NORMAL.
            (3, 0) => {
                let kind = reader.varint()?;
                if (1..=6).contains(&kind) {
                    piece.kind = kind as i32;
                }
            }
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok(piece)
}

/// What SentencePiece itself checks when it loads a model (`InitializePieces`), where the
/// converter would fail.
fn validate(pieces: &[Piece], byte_fallback: bool) -> std::result::Result<(), String> {
    if pieces.is_empty() {
        return Err("the model has no pieces".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut unknowns = 0;
    let mut bytes = 0;
    for (id, piece) in pieces.iter().enumerate() {
        if piece.text.is_empty() {
            return Err(format!("piece {id} is empty"));
        }
        if !seen.insert(piece.text.as_str()) {
            return Err(format!("piece {id} ({:?}) is defined twice", piece.text));
        }
        unknowns += usize::from(piece.kind == token_type::UNKNOWN);
        if piece.kind == token_type::BYTE {
            if !byte_fallback {
                return Err(format!("byte piece {id} without byte fallback"));
            }
            if !is_byte_piece(&piece.text) {
                return Err(format!("byte piece {id} ({:?}) is not <0xHH>", piece.text));
            }
            bytes += 1;
        }
    }
    if unknowns != 1 {
        return Err("the model must define exactly one unknown piece".into());
    }
    if byte_fallback && bytes != 256 {
        return Err(format!("byte fallback with {bytes} byte pieces, not 256"));
    }
    Ok(())
}

/// `<0xHH>` with two upper-case hex digits, as SentencePiece writes (and parses) them.
fn is_byte_piece(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && b.starts_with(b"<0x")
        && b[5] == b'>'
        && b[3..5]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
}

struct Reader<'b> {
    bytes: &'b [u8],
    pos: usize,
}

impl<'b> Reader<'b> {
    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn key(&mut self) -> std::result::Result<(u64, u8), String> {
        let key = self.varint()?;
        Ok((key >> 3, (key & 7) as u8))
    }

    fn take(&mut self, len: u64) -> std::result::Result<&'b [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if len > left {
            return Err(format!("a field of {len} bytes runs past the end"));
        }
        let slice = &self.bytes[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(slice)
    }

    fn bytes(&mut self) -> std::result::Result<&'b [u8], String> {
        let len = self.varint()?;
        self.take(len)
    }

    fn fixed<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self
            .take(N as u64)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn skip(&mut self, wire: u8) -> std::result::Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            other => Err(format!("unsupported protobuf wire type {other}")),
        }
    }
}

/// `_set_vocab_sentencepiece`.
pub(crate) fn set_vocab(dir: &Dir, meta: &mut Metadata) -> Result<()> {
    let (tokens, scores, types) = create_vocab(dir)?;
    let n_vocab = tokens.len();
    meta.set("tokenizer.ggml.model", Value::Text("llama".into()));
    meta.set("tokenizer.ggml.pre", Value::Text("default".into()));
    set_token_arrays(meta, tokens, Some(scores), types);
    SpecialVocab::load(dir, false, &DEFAULT_TYPES, Some(n_vocab))?.add_to(meta);
    Ok(())
}

/// The token list, scores and types (each skipped when empty, as `add_array` does).
pub(crate) fn set_token_arrays(
    meta: &mut Metadata,
    tokens: Vec<String>,
    scores: Option<Vec<f32>>,
    types: Vec<i32>,
) {
    if !tokens.is_empty() {
        meta.set("tokenizer.ggml.tokens", Value::Array(Array::Text(tokens)));
    }
    if let Some(scores) = scores.filter(|s| !s.is_empty()) {
        meta.set("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    }
    if !types.is_empty() {
        meta.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    }
}

type Vocab = (Vec<String>, Vec<f32>, Vec<i32>);

/// `_create_vocab_sentencepiece`: the pieces, padded or cut to the configured vocabulary
/// size, then overridden by `added_tokens.json` and `tokenizer_config.json`.
fn create_vocab(dir: &Dir) -> Result<Vocab> {
    let name = "tokenizer.model";
    let bytes = dir
        .read(name)?
        .expect("caller checked that the file exists");
    let pieces = parse_model(&bytes)
        .map_err(|what| dir.bad(name, format!("not a SentencePiece model: {what}")))?;
    let vocab_size = configured_vocab_size(dir)?.unwrap_or(pieces.len());
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![token_type::UNUSED; vocab_size];
    for (id, piece) in pieces.iter().enumerate().take(vocab_size) {
        tokens[id] = piece.text.clone();
        scores[id] = piece.score;
        types[id] = match piece.kind {
            token_type::UNKNOWN | token_type::CONTROL | token_type::UNUSED | token_type::BYTE => {
                piece.kind
            }
            _ => token_type::NORMAL,
        };
    }
    if let Some(added) = dir.json_object("added_tokens.json")? {
        for (text, id) in &added {
            let id = token_id(dir, "added_tokens.json", id)?;
            if id < vocab_size {
                tokens[id] = text.clone();
                scores[id] = -1000.0;
                types[id] = token_type::USER_DEFINED;
            }
        }
    }
    if let Some(config) = dir.json_object(TOKENIZER_CONFIG)? {
        let decoder = config.get("added_tokens_decoder").cloned();
        if let Some(Json::Object(decoder)) = decoder {
            for (key, data) in &decoder {
                let file = TOKENIZER_CONFIG;
                let id: usize = key.trim().parse().map_err(|_| {
                    dir.bad(file, format!("added token id {key:?} is not a number"))
                })?;
                let Some(content) = data.get("content").and_then(Json::as_str) else {
                    return Err(dir.bad(file, format!("added token {id} has no content")));
                };
                if id >= vocab_size {
                    continue;
                }
                let special = data.get("special").is_some_and(truthy);
                if special || looks_special(content) {
                    types[id] = token_type::CONTROL;
                    tokens[id] = content.to_string();
                } else {
                    types[id] = token_type::USER_DEFINED;
                    tokens[id] = content.replace('\u{2581}', " ");
                }
                scores[id] = -1000.0;
            }
        }
    }
    Ok((tokens, scores, types))
}

/// A token id in a JSON file (a non-negative integer).
fn token_id(dir: &Dir, file: &str, value: &Json) -> Result<usize> {
    value
        .as_u64()
        .and_then(|id| usize::try_from(id).ok())
        .ok_or_else(|| {
            dir.bad(
                file,
                format!("token id {value} is not a non-negative integer"),
            )
        })
}

/// The vocabulary size of the config (`vocab_size_per_layer_input`, else `vocab_size`), if it
/// sets a non-zero one: the converter pads the pieces to it, or cuts them.
pub(crate) fn configured_vocab_size(dir: &Dir) -> Result<Option<usize>> {
    let key = ["vocab_size_per_layer_input", "vocab_size"]
        .into_iter()
        .find(|k| dir.hparams.contains_key(*k));
    let Some(key) = key else { return Ok(None) };
    let value = &dir.hparams[key];
    if !truthy(value) {
        return Ok(None);
    }
    match value.as_u64() {
        // Token ids are 32-bit signed in llama.cpp; a larger size is a broken config (and
        // would make this allocate without bound).
        Some(n) if n <= i32::MAX as u64 => Ok(Some(n as usize)),
        _ => Err(dir.bad(
            "config.json",
            format!("{key} {value} is not a vocabulary size"),
        )),
    }
}
