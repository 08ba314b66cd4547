//! The vocabulary keys on small hand-made tokenizers. The comparison with the converter
//! itself, on trained and real vocabularies, is in the end-to-end tests.

use super::class::{self, TokenizerClass};
use super::sentencepiece::{parse_model, Piece};
use super::special::{SpecialVocab, DEFAULT_TYPES};
use super::*;
use crate::gguf::Array;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod tokenizer;

/// A model directory in memory.
struct MemFiles(HashMap<String, Vec<u8>>, PathBuf);

impl MemFiles {
    fn new(files: &[(&str, Vec<u8>)]) -> MemFiles {
        let map = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        MemFiles(map, PathBuf::from("/models/m"))
    }
}

impl ModelFiles for MemFiles {
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(name).cloned())
    }
    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = format!("{dir}/");
        Ok(self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(str::to_string)
            .collect())
    }
    fn root(&self) -> &Path {
        &self.1
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A `ModelProto` with these pieces and a trainer spec without byte fallback.
fn model_proto(pieces: &[(&str, f32, i32)]) -> Vec<u8> {
    model_proto_with(pieces, false)
}

fn model_proto_with(pieces: &[(&str, f32, i32)], byte_fallback: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (text, score, kind) in pieces {
        let mut piece = Vec::new();
        field_bytes(1, text.as_bytes(), &mut piece);
        varint(2 << 3 | 5, &mut piece);
        piece.extend_from_slice(&score.to_le_bytes());
        if *kind != 1 {
            varint(3 << 3, &mut piece);
            varint(*kind as u64, &mut piece);
        }
        field_bytes(1, &piece, &mut out);
    }
    // TrainerSpec: model_type (3) = 1, then byte_fallback (35, a two-byte key).
    let spec = [0x18, 1, 0x98, 0x02, u8::from(byte_fallback)];
    field_bytes(2, &spec, &mut out);
    out
}

const PIECES: [(&str, f32, i32); 6] = [
    ("<unk>", 0.0, 2),
    ("<s>", 0.0, 3),
    ("</s>", 0.0, 3),
    ("\u{2581}a", -1.5, 1),
    ("<tool>", 0.0, 4),
    ("<gone>", 0.0, 5),
];

fn vocab_of(files: &MemFiles, config: serde_json::Value, family: VocabFamily) -> Result<Metadata> {
    let mut meta = Metadata::new();
    vocab_metadata(files, &config, family, &mut meta)?;
    Ok(meta)
}

fn keys(meta: &Metadata) -> Vec<&str> {
    meta.entries().iter().map(|(k, _)| k.as_str()).collect()
}

fn texts(meta: &Metadata, key: &str) -> Vec<String> {
    match meta.get(key) {
        Some(Value::Array(Array::Text(v))) => v.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

fn ints(meta: &Metadata, key: &str) -> Vec<i32> {
    match meta.get(key) {
        Some(Value::Array(Array::I32(v))) => v.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn protobuf_pieces_are_read_with_their_scores_and_types() {
    let pieces = parse_model(&model_proto(&PIECES)).unwrap();
    assert_eq!(pieces.len(), 6);
    assert_eq!(
        pieces[3],
        Piece {
            text: "\u{2581}a".into(),
            score: -1.5,
            kind: 1
        }
    );
    assert_eq!(pieces[5].kind, 5);
    let odd = parse_model(&model_proto(&[("<unk>", 0.0, 2), ("a", 0.0, 9)])).unwrap();
    assert_eq!(
        odd[1].kind, 1,
        "an unknown type value leaves the piece NORMAL"
    );
}

#[test]
fn hostile_protobuf_gives_errors() {
    let good = model_proto(&PIECES);
    for cut in 1..good.len() {
        // Every truncation is either an error or (at a field boundary) fewer pieces.
        if let Ok(pieces) = parse_model(&good[..cut]) {
            assert!(pieces.len() <= PIECES.len());
        }
    }
    let mut huge = Vec::new();
    varint(1 << 3 | 2, &mut huge);
    varint(u64::MAX >> 1, &mut huge);
    assert!(parse_model(&huge).unwrap_err().contains("past the end"));
    assert!(parse_model(&[0x0b]).unwrap_err().contains("wire type"));
    assert!(parse_model(&[0xff; 11]).unwrap_err().contains("varint"));
    assert!(parse_model(&[]).unwrap_err().contains("no pieces"));
    let no_unknown = model_proto(&[("a", 0.0, 1)]);
    assert!(parse_model(&no_unknown)
        .unwrap_err()
        .contains("unknown piece"));
    let twice = model_proto(&[("<unk>", 0.0, 2), ("a", 0.0, 1), ("a", 0.0, 1)]);
    assert!(parse_model(&twice).unwrap_err().contains("twice"));
    let mut bad_utf8 = Vec::new();
    let mut piece = Vec::new();
    field_bytes(1, &[0xff, 0xfe], &mut piece);
    field_bytes(1, &piece, &mut bad_utf8);
    assert!(parse_model(&bad_utf8).unwrap_err().contains("UTF-8"));
}

#[test]
fn byte_pieces_need_byte_fallback_and_all_256() {
    let names: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
    let mut pieces: Vec<(&str, f32, i32)> = vec![("<unk>", 0.0, 2)];
    pieces.extend(names.iter().map(|n| (n.as_str(), 0.0, 6)));
    let parsed = parse_model(&model_proto_with(&pieces, true)).unwrap();
    assert_eq!(parsed[1].kind, 6);
    let err = parse_model(&model_proto_with(&pieces, false)).unwrap_err();
    assert!(err.contains("without byte fallback"), "{err}");
    let err = parse_model(&model_proto_with(&pieces[..200], true)).unwrap_err();
    assert!(err.contains("199 byte pieces"), "{err}");
    let err = parse_model(&model_proto_with(
        &[("<unk>", 0.0, 2), ("<0xzz>", 0.0, 6)],
        true,
    ))
    .unwrap_err();
    assert!(err.contains("not <0xHH>"), "{err}");
}

#[test]
fn random_bytes_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let good = model_proto(&PIECES);
    for _ in 0..2000 {
        let mut bytes = good.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] = rng.random();
        }
        let _ = parse_model(&bytes);
    }
}

#[test]
fn a_bad_tokenizer_model_is_an_error_naming_the_file() {
    let files = MemFiles::new(&[("tokenizer.model", vec![0x0a, 0x7f])]);
    let err = vocab_of(&files, json!({}), VocabFamily::Llama).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("/models/m/tokenizer.model: "), "{text}");
    assert!(text.contains("not a SentencePiece model"), "{text}");
}

#[test]
fn sentencepiece_types_padding_and_added_tokens() {
    let files = MemFiles::new(&[
        ("tokenizer.model", model_proto(&PIECES)),
        (
            "added_tokens.json",
            br#"{"<extra>": 6, "<far>": 99}"#.to_vec(),
        ),
        (
            "tokenizer_config.json",
            json!({
                "add_prefix_space": false,
                "add_bos_token": true,
                "bos_token": "<s>",
                "added_tokens_decoder": {
                    "7": {"content": "<|im_start|>", "special": false},
                    "8": {"content": "my\u{2581}word", "special": false},
                },
            })
            .to_string()
            .into_bytes(),
        ),
    ]);
    let config = json!({"vocab_size": 10, "bos_token_id": 1, "eos_token_id": [2, 3]});
    let meta = vocab_of(&files, config, VocabFamily::Llama).unwrap();
    assert_eq!(
        keys(&meta),
        [
            "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.add_bos_token",
        ]
    );
    assert_eq!(
        texts(&meta, "tokenizer.ggml.tokens"),
        [
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}a",
            "<tool>",
            "<gone>",
            "<extra>",
            "<|im_start|>",
            "my word",
            "[PAD9]"
        ]
    );
    // USER_DEFINED pieces of the model count as NORMAL; added ones as USER_DEFINED, or
    // CONTROL when they look special.
    assert_eq!(
        ints(&meta, "tokenizer.ggml.token_type"),
        [2, 3, 3, 1, 1, 5, 4, 3, 4, 5]
    );
    let Some(Value::Array(Array::F32(scores))) = meta.get("tokenizer.ggml.scores") else {
        panic!()
    };
    assert_eq!(scores[3], -1.5);
    assert_eq!(&scores[6..], [-1000.0, -1000.0, -1000.0, -10000.0]);
    assert_eq!(
        meta.get("tokenizer.ggml.bos_token_id"),
        Some(&Value::U32(1))
    );
    assert_eq!(
        meta.get("tokenizer.ggml.add_space_prefix"),
        Some(&Value::Bool(false))
    );
}

#[test]
fn a_smaller_configured_vocabulary_cuts_the_pieces() {
    let files = MemFiles::new(&[("tokenizer.model", model_proto(&PIECES))]);
    let meta = vocab_of(
        &files,
        json!({"vocab_size": 4, "eos_token_id": 5}),
        VocabFamily::Qwen,
    )
    .unwrap();
    assert_eq!(texts(&meta, "tokenizer.ggml.tokens").len(), 4);
    // The eos id is past the vocabulary: skipped, as the converter does.
    assert!(meta.get("tokenizer.ggml.eos_token_id").is_none());
    let err = vocab_of(&files, json!({"vocab_size": 1u64 << 40}), VocabFamily::Qwen).unwrap_err();
    assert!(err.to_string().contains("not a vocabulary size"), "{err}");
}

#[test]
fn a_config_without_vocab_size_pads_to_the_class_default() {
    // transformers' LlamaConfig gives 32000, which the converter pads the pieces to; a
    // model type lorafs does not know leaves the pieces as they are.
    let files = MemFiles::new(&[("tokenizer.model", model_proto(&PIECES))]);
    let meta = vocab_of(&files, json!({"model_type": "llama"}), VocabFamily::Llama).unwrap();
    let tokens = texts(&meta, "tokenizer.ggml.tokens");
    assert_eq!(
        (tokens.len(), tokens[31_999].as_str()),
        (32_000, "[PAD31999]")
    );
    let meta = vocab_of(&files, json!({"model_type": "other"}), VocabFamily::Llama).unwrap();
    assert_eq!(texts(&meta, "tokenizer.ggml.tokens").len(), PIECES.len());
}

fn special(files: &MemFiles, load_merges: bool) -> Result<SpecialVocab> {
    let config = json!({"pad_token_id": 0});
    let dir = Dir::new(files, &config)?;
    SpecialVocab::load(&dir, load_merges, &DEFAULT_TYPES, Some(100))
}

#[test]
fn merges_as_strings_and_as_pairs() {
    let strings = json!({"model": {"merges": ["a b", "ab c"]}}).to_string();
    let files = MemFiles::new(&[("tokenizer.json", strings.into_bytes())]);
    assert_eq!(special(&files, true).unwrap().merges, ["a b", "ab c"]);
    assert!(special(&files, false).unwrap().merges.is_empty());
    let pairs = json!({"model": {"merges": [["a", "b"], [" x", "y "]]}}).to_string();
    let files = MemFiles::new(&[("tokenizer.json", pairs.into_bytes())]);
    assert_eq!(
        special(&files, true).unwrap().merges,
        ["a b", "\u{120}x y\u{120}"]
    );
    let bad = json!({"model": {"merges": [1, 2]}}).to_string();
    let files = MemFiles::new(&[("tokenizer.json", bad.into_bytes())]);
    assert!(special(&files, true).is_err());
    let txt = b"#version: 0.2\na b\n\nbad line here\nab c\n".to_vec();
    let files = MemFiles::new(&[("merges.txt", txt)]);
    assert_eq!(special(&files, true).unwrap().merges, ["a b", "ab c"]);
}

#[test]
fn special_tokens_from_the_template_post_processor_and_config() {
    let tokenizer = json!({
        "added_tokens": [{"id": 5, "content": "<bos>"}, {"id": 6, "content": "<eos>"}],
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>"}}, {"Sequence": {"id": "A"}}],
            "pair": []},
    });
    let config = json!({"bos_token": "<bos>", "eos_token": {"content": "<eos>"},
        "add_eos_token": true, "chat_template": [{"name": "default", "template": "T"},
        {"name": "tool use", "template": "U"}]});
    let files = MemFiles::new(&[
        ("tokenizer.json", tokenizer.to_string().into_bytes()),
        ("tokenizer_config.json", config.to_string().into_bytes()),
    ]);
    let mut meta = Metadata::new();
    special(&files, false).unwrap().add_to(&mut meta);
    assert_eq!(
        meta.entries(),
        [
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(5)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(6)),
            ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)),
            (
                "tokenizer.chat_template.tool_use".into(),
                Value::Text("U".into())
            ),
            (
                "tokenizer.chat_templates".into(),
                Value::Array(Array::Text(vec!["tool_use".into()]))
            ),
            ("tokenizer.chat_template".into(), Value::Text("T".into())),
        ]
    );
}

#[test]
fn a_negative_special_token_id_is_an_error_naming_its_file() {
    // `"pad_token_id": -1` in config.json (some converted Llama checkpoints): the converter
    // raises on it; the error names config.json, not the tokenizer files.
    let files = MemFiles::new(&[]);
    let config = json!({"pad_token_id": -1});
    let dir = Dir::new(&files, &config).unwrap();
    let err = SpecialVocab::load(&dir, false, &DEFAULT_TYPES, Some(100))
        .err()
        .expect("a negative id is refused");
    let msg = err.to_string();
    assert!(msg.contains("/models/m/config.json"), "{msg}");
    assert!(msg.contains("pad: -1"), "{msg}");
    // The same id found in tokenizer.json's added tokens names tokenizer.json.
    let tokenizer = json!({"added_tokens": [{"id": -2, "content": "<pad>"}]}).to_string();
    let tc = json!({"pad_token": "<pad>"}).to_string();
    let files = MemFiles::new(&[
        ("tokenizer.json", tokenizer.into_bytes()),
        ("tokenizer_config.json", tc.into_bytes()),
    ]);
    let config = json!({});
    let dir = Dir::new(&files, &config).unwrap();
    let err = SpecialVocab::load(&dir, false, &DEFAULT_TYPES, Some(100))
        .err()
        .expect("a negative id is refused");
    assert!(
        err.to_string().contains("/models/m/tokenizer.json"),
        "{err}"
    );
}

/// A byte-level BPE tokenizer.json with three tokens and one merge.
fn tiny_bpe() -> Vec<u8> {
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 4, "content": "<|end|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}
    })
    .to_string()
    .into_bytes()
}

#[test]
fn an_unknown_pre_tokenizer_hash_is_refused_with_the_way_out() {
    let files = MemFiles::new(&[("tokenizer.json", tiny_bpe())]);
    let err = vocab_of(&files, json!({"vocab_size": 8}), VocabFamily::Qwen).unwrap_err();
    assert!(matches!(err, Error::NoGguf { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("/models/m/tokenizer.json: no GGUF view: "),
        "{text}"
    );
    assert!(text.contains("not one llama.cpp knows"), "{text}");
    assert!(
        text.contains("convert_hf_to_gguf.py refuses it too"),
        "{text}"
    );
    assert!(
        text.contains("run it on the mounted merged directory"),
        "{text}"
    );
}

#[test]
fn no_tokenizer_and_other_kinds_are_refused_by_name() {
    let files = MemFiles::new(&[]);
    let err = vocab_of(&files, json!({}), VocabFamily::Llama).unwrap_err();
    assert!(matches!(err, Error::NoGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("convert_hf_to_gguf.py"), "{err}");
    let files = MemFiles::new(&[("tekken.json", b"{}".to_vec())]);
    let err = vocab_of(&files, json!({}), VocabFamily::Llama).unwrap_err();
    assert!(err.to_string().contains("Tekken"), "{err}");
}

#[test]
fn llama_hf_takes_byte_fallback_bpe_only() {
    let with = |model: serde_json::Value, decoder: serde_json::Value| {
        let json = json!({"model": model, "decoder": decoder}).to_string();
        let files = MemFiles::new(&[("tokenizer.json", json.into_bytes())]);
        let config = json!({});
        let dir = Dir::new(&files, &config).unwrap();
        llama_hf::applies(&dir)
    };
    let seq = json!({"type": "Sequence"});
    assert!(with(json!({"type": "BPE", "byte_fallback": true}), seq.clone()).unwrap());
    assert!(!with(json!({"type": "BPE", "byte_fallback": false}), seq.clone()).unwrap());
    assert!(!with(
        json!({"type": "BPE", "ignore_merges": true, "byte_fallback": false}),
        seq.clone()
    )
    .unwrap());
    assert!(!with(json!({"type": "Unigram"}), seq.clone()).unwrap());
    assert!(!with(json!({"type": "BPE", "byte_fallback": true}), json!(null)).unwrap());
    assert!(with(json!({"byte_fallback": true}), seq).is_err());
}

#[test]
fn the_check_text_is_the_converters() {
    // sha256 of the UTF-8 of `chktxt` in the pinned converter's `get_vocab_base_pre`.
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(gpt2::CHECK_TEXT.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hash,
        "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
    );
}

#[test]
fn looks_special_follows_the_converter() {
    for token in [
        "<|im_start|>",
        "<pad>",
        "<unused12>",
        "<\u{ff5c}begin\u{ff5c}>",
    ] {
        assert!(looks_special(token), "{token}");
    }
    for token in ["<s>", "hello", "<|open"] {
        assert!(!looks_special(token), "{token}");
    }
}

/// The keys of `files` through `memo`, counting the computations in `computed`.
fn memo_keys(memo: &memo::Memo, files: &MemFiles, computed: &std::cell::Cell<usize>) -> Metadata {
    try_memo_keys(memo, files, computed).unwrap()
}

fn try_memo_keys(
    memo: &memo::Memo,
    files: &MemFiles,
    computed: &std::cell::Cell<usize>,
) -> Result<Metadata> {
    let config = json!({"vocab_size": 10});
    let keys = memo.get_or_compute(files, &config, VocabFamily::Llama, |f| {
        computed.set(computed.get() + 1);
        let mut meta = Metadata::new();
        super::compute(f, &config, VocabFamily::Llama, &mut meta)?;
        Ok(meta)
    })?;
    Ok((*keys).clone())
}

fn spm_files(root: &str, extra: &[(&str, Vec<u8>)]) -> MemFiles {
    let mut files = MemFiles::new(&[("tokenizer.model", model_proto(&PIECES))]);
    files.1 = PathBuf::from(root);
    for (name, bytes) in extra {
        files.0.insert(name.to_string(), bytes.clone());
    }
    files
}

#[test]
fn the_keys_of_files_that_read_the_same_are_computed_once() {
    let memo = memo::Memo::new();
    let computed = std::cell::Cell::new(0);
    let first = memo_keys(&memo, &spm_files("/views/a", &[]), &computed);
    // Another directory (another view) with the same files: kept keys.
    assert_eq!(
        memo_keys(&memo, &spm_files("/views/b", &[]), &computed),
        first
    );
    assert_eq!(computed.get(), 1);
    // A file read before changes, one absent appears, a listing changes: computed again.
    let config = |v: &str| json!({"bos_token": v}).to_string().into_bytes();
    let changed = [
        ("tokenizer_config.json", config("<s>")),
        ("tokenizer_config.json", config("</s>")),
        ("added_tokens.json", br#"{"<x>": 6}"#.to_vec()),
        ("chat_template.jinja", b"C".to_vec()),
        // (listed only beside a chat_template.jinja)
        ("additional_chat_templates/t.jinja", b"T".to_vec()),
    ];
    let mut want = 1;
    for (i, file) in changed.iter().enumerate() {
        let files = spm_files("/views/c", &changed[..=i]);
        memo_keys(&memo, &files, &computed);
        want += 1;
        assert_eq!(computed.get(), want, "after {}", file.0);
        memo_keys(&memo, &files, &computed);
        assert_eq!(computed.get(), want, "again after {}", file.0);
    }
    // Four kept: the first set of files was the least recently used, and is gone.
    assert!(want > 4);
    memo_keys(&memo, &spm_files("/views/a", &[]), &computed);
    assert_eq!(computed.get(), want + 1);
}

#[test]
fn an_error_is_not_kept() {
    let memo = memo::Memo::new();
    let computed = std::cell::Cell::new(0);
    let broken = MemFiles::new(&[("tokenizer.model", b"\xff\xff".to_vec())]);
    for _ in 0..2 {
        assert!(try_memo_keys(&memo, &broken, &computed).is_err());
    }
    assert_eq!(computed.get(), 2);
}
