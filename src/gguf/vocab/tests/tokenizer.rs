//! Loading a `tokenizer.json` as transformers does: the library's reading, the tokenizer
//! classes, and the tokens the settings add.

use super::*;

/// `tiny_bpe` with a normalizer, a post-processor and added tokens of every kind: one the
/// model has, two it does not (one normalized), in an order unlike their ids.
fn tiny_bpe_with_added_tokens() -> serde_json::Value {
    let mut tokenizer: serde_json::Value = serde_json::from_slice(&tiny_bpe()).unwrap();
    let token = |id: u32, content: &str, normalized: bool, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": normalized, "special": special})
    };
    tokenizer["added_tokens"] = json!([
        token(5, "<|start|>", false, true),
        token(2, "ab", false, true),
        token(4, "<|end|>", false, true),
        token(6, "Word", true, false),
    ]);
    tokenizer["normalizer"] = json!({"type": "Lowercase"});
    tokenizer["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|start|>": {"id": "<|start|>", "ids": [5], "tokens": ["<|start|>"]}}});
    tokenizer
}

/// `hf_tokenizer::deserialize` of this file's text.
fn read_ours(json: &serde_json::Value) -> serde_json::Result<tokenizers::Tokenizer> {
    let file = TokenizerJson::parse(json.to_string().as_bytes()).unwrap();
    hf_tokenizer::deserialize(&file, TokenizerClass::File)
}

#[test]
fn a_bpe_tokenizer_reads_as_the_library_reads_it() {
    use serde::Deserialize;
    let json = tiny_bpe_with_added_tokens();
    let ours = read_ours(&json).unwrap();
    let library = tokenizers::Tokenizer::deserialize(&json).unwrap();
    // The serialization holds everything: model, added tokens with their ids, the rest.
    assert_eq!(
        ours.to_string(false).unwrap(),
        library.to_string(false).unwrap()
    );
    for text in ["ab<|end|>aab Word word", "", "<|start|>b"] {
        let ids = |t: &tokenizers::Tokenizer| t.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids(&ours), ids(&library), "{text:?}");
    }
    assert_eq!(ours.get_vocab(true), library.get_vocab(true));
    // What the library refuses, so does this: an added token without an id, a bad model.
    let mut no_id = json.clone();
    no_id["added_tokens"][1]
        .as_object_mut()
        .unwrap()
        .remove("id");
    assert!(tokenizers::Tokenizer::deserialize(&no_id).is_err());
    assert!(read_ours(&no_id).is_err());
    let mut bad_merge = json.clone();
    bad_merge["model"]["merges"] = json!(["a c"]);
    assert!(tokenizers::Tokenizer::deserialize(&bad_merge).is_err());
    assert!(read_ours(&bad_merge).is_err());
    let mut bad_version = json;
    bad_version["version"] = json!("2.0");
    assert!(read_ours(&bad_version).is_err());
}

/// `tiny_bpe` loaded with this `tokenizer_config.json`, as `HfTokenizer::load` gives it.
fn loaded_with(config: serde_json::Value, end_special: bool) -> Result<hf_tokenizer::HfTokenizer> {
    loaded_with_files(config, end_special, &[])
}

/// The same with other files of the tokenizer's.
fn loaded_with_files(
    config: serde_json::Value,
    end_special: bool,
    others: &[(&str, serde_json::Value)],
) -> Result<hf_tokenizer::HfTokenizer> {
    let mut tokenizer: serde_json::Value = serde_json::from_slice(&tiny_bpe()).unwrap();
    tokenizer["added_tokens"][0]["special"] = json!(end_special);
    let mut files = vec![
        ("tokenizer.json", tokenizer.to_string().into_bytes()),
        ("tokenizer_config.json", config.to_string().into_bytes()),
    ];
    files.extend(
        others
            .iter()
            .map(|(name, v)| (*name, v.to_string().into_bytes())),
    );
    loaded_in(json!({}), &files)
}

/// `tokenizer.json` and the other files loaded for a model of this `config.json`.
fn loaded_in(
    model_config: serde_json::Value,
    files: &[(&str, Vec<u8>)],
) -> Result<hf_tokenizer::HfTokenizer> {
    let files = MemFiles::new(files);
    let dir = Dir::new(&files, &model_config).unwrap();
    hf_tokenizer::HfTokenizer::load(&dir)
}

fn class_of(model_config: serde_json::Value, settings: serde_json::Value) -> TokenizerClass {
    let files = MemFiles::new(&[("tokenizer_config.json", settings.to_string().into_bytes())]);
    class::resolve(&Dir::new(&files, &model_config).unwrap()).unwrap()
}

#[test]
fn the_tokenizer_class_is_the_one_transformers_picks() {
    let check = |model_config: serde_json::Value, settings: serde_json::Value, want| {
        let got = class_of(model_config.clone(), settings.clone());
        assert_eq!(got, want, "{model_config} {settings}");
    };
    let model = |model_type: &str| json!({ "model_type": model_type });
    let class = |name: &str| json!({ "tokenizer_class": name });
    let qwen2 = TokenizerClass::Qwen2 {
        add_prefix_space: false,
    };
    let gpt2 = TokenizerClass::Gpt2 {
        add_prefix_space: false,
    };
    let file = TokenizerClass::File;
    // transformers takes Qwen2Tokenizer for any qwen2 model
    check(model("qwen2"), class("TokenizersBackend"), qwen2);
    check(model("qwen2"), class("GPT2Tokenizer"), qwen2);
    check(model("qwen2"), json!({}), qwen2);
    // and for llama and qwen3 ones whose settings (or config.json) name it, or GPT2Tokenizer
    check(model("qwen3"), class("Qwen2TokenizerFast"), qwen2);
    check(model("llama"), class("Qwen2Tokenizer"), qwen2);
    let named_in_config = json!({"model_type": "llama", "tokenizer_class": "Qwen2Tokenizer"});
    check(named_in_config, json!({}), qwen2);
    check(model("llama"), class("GPT2TokenizerFast"), gpt2);
    check(model("qwen3"), class("GPT2Tokenizer"), gpt2);
    check(model("qwen3"), class("TokenizersBackend"), file);
    check(model("llama"), class("PreTrainedTokenizerFast"), file);
    // a mistral model's registered class wins
    check(model("mistral"), class("Qwen2Tokenizer"), file);
    check(model("mistral"), class("GPT2Tokenizer"), file);
    // remote code is not run
    let remote = json!({"auto_map": {"AutoTokenizer": ["a.B", null]}});
    check(model("qwen2"), remote, file);
    let prefix = TokenizerClass::Qwen2 {
        add_prefix_space: true,
    };
    check(model("qwen2"), json!({"add_prefix_space": true}), prefix);
    check(model("llama"), class("BloomTokenizerFast"), file);
    check(model("mistral"), class("GPTNeoXTokenizerFast"), file);
}

#[test]
fn a_mistral_tokenizer_transformers_patches_is_refused() {
    let resolve = |version: Option<&str>, settings: serde_json::Value| {
        let files = MemFiles::new(&[("tokenizer_config.json", settings.to_string().into_bytes())]);
        let mut model_config = json!({ "model_type": "mistral" });
        if let Some(v) = version {
            model_config["transformers_version"] = json!(v);
        }
        class::resolve(&Dir::new(&files, &model_config).unwrap())
    };
    let fix = json!({ "fix_mistral_regex": true });
    for version in [Some("4.57.1"), None, Some("5.0.0rc1"), Some("5.0.0.dev0")] {
        let err = resolve(version, fix.clone()).unwrap_err().to_string();
        assert!(err.contains("fix_mistral_regex"), "{version:?}: {err}");
    }
    for version in [
        Some("5.0.0"),
        Some("5.24.0"),
        Some("5.0.0.post1"),
        Some("10.1"),
    ] {
        assert_eq!(resolve(version, fix.clone()).unwrap(), TokenizerClass::File);
    }
    let off = json!({ "fix_mistral_regex": false });
    assert_eq!(resolve(Some("4.57.1"), off).unwrap(), TokenizerClass::File);
    assert_eq!(
        resolve(Some("4.57.1"), json!({})).unwrap(),
        TokenizerClass::File
    );
}

#[test]
fn a_class_lorafs_does_not_model_is_refused_by_name() {
    for (model_type, name) in [
        ("llama", "GPTNeoXTokenizerFast"),
        ("llama", "CohereTokenizer"),
        ("qwen3", "CodeGenTokenizerFast"),
        ("llama", "SomeTokenizer"),
    ] {
        let files = MemFiles::new(&[(
            "tokenizer_config.json",
            json!({ "tokenizer_class": name }).to_string().into_bytes(),
        )]);
        let model_config = json!({ "model_type": model_type });
        let err = class::resolve(&Dir::new(&files, &model_config).unwrap()).unwrap_err();
        let shown = name.strip_suffix("Fast").unwrap_or(name);
        let message = err.to_string();
        assert!(
            message.contains(&format!("tokenizer_class \"{shown}\""))
                && message.contains("convert_hf_to_gguf.py"),
            "{message}"
        );
    }
}

/// `tiny_bpe` as a qwen2 model loads it with these settings: its added tokens (id, content,
/// special) and its serialization.
fn qwen2_loaded(settings: serde_json::Value) -> (Vec<(u32, String, bool)>, serde_json::Value) {
    loaded_as(json!({"model_type": "qwen2"}), settings)
}

/// The same for a model of this `config.json`.
fn loaded_as(
    model_config: serde_json::Value,
    settings: serde_json::Value,
) -> (Vec<(u32, String, bool)>, serde_json::Value) {
    let mut file: serde_json::Value = serde_json::from_slice(&tiny_bpe()).unwrap();
    file["model"]["ignore_merges"] = json!(true);
    file["normalizer"] = json!({"type": "Lowercase"});
    let files = [
        ("tokenizer.json", file.to_string().into_bytes()),
        ("tokenizer_config.json", settings.to_string().into_bytes()),
    ];
    let loaded = loaded_in(model_config, &files).unwrap();
    let mut added: Vec<(u32, String, bool)> = (loaded.tokenizer.get_added_tokens_decoder())
        .into_iter()
        .map(|(id, t)| (id, t.content, t.special))
        .collect();
    added.sort();
    let serialized = loaded.tokenizer.to_string(false).unwrap();
    (added, serde_json::from_str(&serialized).unwrap())
}

#[test]
fn a_qwen2_tokenizer_is_built_as_its_class_builds_it() {
    // Current layout: the settings' table only (not the file's <|end|>), then the named tokens
    // with the class's defaults for unk and pad, in transformers' order (eos before unk).
    let (added, json) = qwen2_loaded(
        json!({"added_tokens_decoder": {}, "eos_token": "<|im_end|>",
        "add_prefix_space": true}),
    );
    let t = |id: u32, content: &str| (id, content.to_string(), true);
    assert_eq!(added, [t(3, "<|im_end|>"), t(4, "<|endoftext|>")]);
    // The class's pipeline and model options over the file's.
    assert_eq!(json["normalizer"], json!({"type": "NFC"}));
    assert_eq!(
        json["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"],
        json!(true)
    );
    assert_eq!(
        json["pre_tokenizer"]["pretokenizers"][0]["type"],
        json!("Split")
    );
    assert_eq!(json["model"]["ignore_merges"], json!(false));
    assert_eq!(json["model"]["vocab"], json!({"a": 0, "b": 1, "ab": 2}));
    // Old layout: the file's added tokens are the table; a pad token named keeps its name.
    let (added, _) = qwen2_loaded(json!({"pad_token": "b"}));
    assert_eq!(added, [t(1, "b"), t(3, "<|end|>"), t(4, "<|endoftext|>")]);
}

/// A SentencePiece-style `tokenizer.json` (a BPE with byte fallback) as transformers saves a
/// Llama tokenizer.
fn sentencepiece_json() -> serde_json::Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first",
            "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "\u{2581}a": 3, "<0x0A>": 4}, "merges": []}})
}

#[test]
fn a_llama_tokenizer_names_its_default_special_tokens() {
    // transformers builds a llama model's non-byte-level tokenizer.json as LlamaTokenizer,
    // whose unk token is <unk> where the settings name none: a control token then.
    let types = |settings: serde_json::Value| {
        let files = MemFiles::new(&[
            (
                "tokenizer.json",
                sentencepiece_json().to_string().into_bytes(),
            ),
            ("tokenizer_config.json", settings.to_string().into_bytes()),
        ]);
        let meta = vocab_of(&files, json!({"model_type": "llama"}), VocabFamily::Llama).unwrap();
        ints(&meta, "tokenizer.ggml.token_type")
    };
    let settings =
        |class: &str| json!({"tokenizer_class": class, "bos_token": "<s>", "eos_token": "</s>"});
    assert_eq!(types(settings("LlamaTokenizerFast")), [3, 3, 3, 1, 6]);
    assert_eq!(types(settings("PreTrainedTokenizerFast")), [1, 3, 3, 1, 6]);
    // A tokenizer.json that mentions "ByteLevel" anywhere is loaded as it is.
    let mut byte_level = sentencepiece_json();
    byte_level["post_processor"] = json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": false, "use_regex": true});
    let files = MemFiles::new(&[
        ("tokenizer.json", byte_level.to_string().into_bytes()),
        (
            "tokenizer_config.json",
            settings("LlamaTokenizer").to_string().into_bytes(),
        ),
    ]);
    let dir_config = json!({"model_type": "llama"});
    let class = class::resolve(&Dir::new(&files, &dir_config).unwrap()).unwrap();
    assert_eq!(class, TokenizerClass::File);
}

#[test]
fn a_gpt2_tokenizer_is_built_as_its_class_builds_it() {
    // (as transformers 5.24 loads it: no normalizer, byte-level with its own regex, and
    // <|endoftext|> its bos, eos and unk token)
    let model = json!({"model_type": "llama"});
    let settings = json!({"tokenizer_class": "GPT2Tokenizer", "pad_token": "b"});
    let (added, json) = loaded_as(model, settings);
    let t = |id: u32, content: &str| (id, content.to_string(), true);
    assert_eq!(added, [t(1, "b"), t(3, "<|end|>"), t(4, "<|endoftext|>")]);
    assert_eq!(json["normalizer"], serde_json::Value::Null);
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
        "use_regex": true});
    assert_eq!(json["pre_tokenizer"], byte_level);
    assert_eq!(json["model"]["ignore_merges"], json!(false));
}

#[test]
fn named_special_tokens_missing_from_tokenizer_json_are_added_in_transformers_order() {
    let config = json!({"pad_token": "[PAD]", "eos_token": "<|end|>", "image_token": "<img>",
        "add_bos_token": false, "extra_special_tokens": ["[X]", "[PAD]", "b"]});
    let tokenizer = loaded_with(config, true).unwrap();
    let added: std::collections::BTreeMap<u32, (String, bool)> = tokenizer
        .tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, t)| (id, (t.content, t.special)))
        .collect();
    // (tokenizers numbers the fixture's added token 3, right after the model's vocabulary)
    let want = [
        (1, "b"),
        (3, "<|end|>"),
        (4, "[PAD]"),
        (5, "<img>"),
        (6, "[X]"),
    ];
    let want: std::collections::BTreeMap<u32, (String, bool)> = want
        .iter()
        .map(|(id, t)| (*id, (t.to_string(), true)))
        .collect();
    assert_eq!(added, want);
}

/// The added tokens of `tokenizer`: id -> (content, special).
fn added_tokens(
    tokenizer: &hf_tokenizer::HfTokenizer,
) -> std::collections::BTreeMap<u32, (String, bool)> {
    (tokenizer.tokenizer.get_added_tokens_decoder().into_iter())
        .map(|(id, t)| (id, (t.content, t.special)))
        .collect()
}

#[test]
fn the_added_token_table_comes_before_the_named_tokens_in_id_order() {
    let want = |list: &[(u32, &str, bool)]| -> std::collections::BTreeMap<u32, (String, bool)> {
        (list.iter())
            .map(|(id, t, s)| (*id, (t.to_string(), *s)))
            .collect()
    };
    // the legacy layout: added_tokens.json, special where the settings name the token
    let config = json!({"pad_token": "<pad2>"});
    let table = json!({"<pad2>": 9, "<new>": 7, "[X]": 8});
    let legacy = json!({"unk_token": "<u>", "additional_special_tokens": ["[X]"]});
    let others = [
        ("added_tokens.json", table),
        ("special_tokens_map.json", legacy),
    ];
    let tokenizer = loaded_with_files(config, true, &others).unwrap();
    let got = added_tokens(&tokenizer);
    // ([X] is named by the legacy map's deprecated list, which counts only at `__init__`:
    // not special when the table is read, and not a named token either)
    let expected = [(3, "<|end|>", true), (4, "<new>", false), (5, "[X]", false)];
    let rest = [(6, "<pad2>", true), (7, "<u>", true)];
    assert_eq!(got, want(&[&expected[..], &rest[..]].concat()));
    // the config's own table: each entry with its flags; ignored beside it, added_tokens.json
    let config = json!({"added_tokens_decoder": {
        "12": {"content": "<b>", "special": true},
        "11": {"content": "<a>", "special": false, "normalized": true},
    }, "eos_token": "<e>"});
    let others = [("added_tokens.json", json!({"<c>": 13}))];
    let got = added_tokens(&loaded_with_files(config, true, &others).unwrap());
    let expected = [
        (3, "<|end|>", true),
        (4, "<a>", false),
        (5, "<b>", true),
        (6, "<e>", true),
    ];
    assert_eq!(got, want(&expected));
}

#[test]
fn a_named_token_added_without_the_special_mark_is_refused_by_name() {
    let err = loaded_with(json!({"eos_token": "<|end|>"}), false)
        .err()
        .unwrap();
    assert!(matches!(err, Error::NoGguf { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("/models/m/tokenizer_config.json: no GGUF view: "),
        "{text}"
    );
    assert!(
        text.contains("eos_token") && text.contains("not marked special"),
        "{text}"
    );
    assert!(text.contains("convert_hf_to_gguf.py"), "{text}");
    assert!(loaded_with(json!({}), false).is_ok());
}
