//! The tokenizer class transformers' `AutoTokenizer` makes of a `tokenizer.json`, where it
//! changes what the converter sees.
//!
//! Most classes load the file as it is. A class with an `__init__` of its own instead builds
//! the tokenizer itself from the file's vocabulary and merges (its own model options,
//! normalizer, pre-tokenizer and decoder; only the post-processor, padding and truncation come
//! from the file), starts without the file's added tokens, and names special tokens by
//! default. The converter tokenizes, and lists the vocabulary, with what that gives.
//!
//! Of those classes lorafs builds the ones the supported architectures meet (transformers
//! 5.24): `Qwen2Tokenizer`, used for every `qwen2` model whatever its `tokenizer_class` says
//! (`qwen2` is on transformers' list of models published with a wrong class), and for `llama`
//! and `qwen3` models whose `tokenizer_class` names it; `GPT2Tokenizer`, and `LlamaTokenizer`
//! for a `tokenizer.json` that does not mention `"ByteLevel"` (one that does is loaded as it
//! is), for `llama` and `qwen3` models whose `tokenizer_class` names them. A `mistral` model
//! always loads the file: its registered class (`MistralCommonBackend`, or the file's without
//! `mistral_common`) wins over the one named. A vocabulary's own `tokenizer.json` is what its
//! class builds, so this matters for a vocabulary under another class, for settings such as
//! `add_prefix_space`, and for the special tokens a class names by default.

use super::{Dir, TOKENIZER_CONFIG};
use crate::Result;
use serde_json::{json, Value as Json};

/// How transformers makes the tokenizer of a `tokenizer.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenizerClass {
    /// From the file as it is.
    File,
    /// `Qwen2Tokenizer.__init__`, with the settings' `add_prefix_space`.
    Qwen2 { add_prefix_space: bool },
    /// `GPT2Tokenizer.__init__`, with the settings' `add_prefix_space`.
    Gpt2 { add_prefix_space: bool },
    /// `LlamaTokenizer.__init__`, with the settings' `add_prefix_space` (unset: true) and
    /// `legacy`.
    Llama {
        add_prefix_space: bool,
        legacy: bool,
    },
}

/// The special tokens `Qwen2Tokenizer` names where the settings do not.
const QWEN2_DEFAULTS: &[(&str, &str)] = &[
    ("unk_token", "<|endoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// The special tokens `GPT2Tokenizer` names where the settings do not.
const GPT2_DEFAULTS: &[(&str, &str)] = &[
    ("unk_token", "<|endoftext|>"),
    ("bos_token", "<|endoftext|>"),
    ("eos_token", "<|endoftext|>"),
];

/// The special tokens `LlamaTokenizer` names where the settings do not.
const LLAMA_DEFAULTS: &[(&str, &str)] = &[
    ("unk_token", "<unk>"),
    ("bos_token", "<s>"),
    ("eos_token", "</s>"),
];

/// `Qwen2Tokenizer`'s pre-tokenizer split (its `PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The class `AutoTokenizer.from_pretrained` picks for this directory (transformers 5.24).
pub(crate) fn resolve(dir: &Dir) -> Result<TokenizerClass> {
    let settings = dir.json_object(TOKENIZER_CONFIG)?.unwrap_or_default();
    if settings.contains_key("auto_map") {
        return Ok(TokenizerClass::File); // remote code, which the converter does not run
    }
    let named = (settings.get("tokenizer_class"))
        .or_else(|| dir.hparams.get("tokenizer_class"))
        .and_then(Json::as_str)
        .map(|name| name.strip_suffix("Fast").unwrap_or(name));
    let model_type = dir.hparams.get("model_type").and_then(Json::as_str);
    if model_type == Some("mistral") && patches_mistral_regex(dir, &settings) {
        return Err(dir.unsupported(
            TOKENIZER_CONFIG,
            "a tokenizer.json whose pre-tokenizer transformers patches (fix_mistral_regex in \
             the settings of a mistral model saved before transformers 5)",
        ));
    }
    let add_prefix_space = (settings.get("add_prefix_space")).is_some_and(super::truthy);
    Ok(match (model_type, named) {
        (Some("qwen2"), _) | (Some("llama" | "qwen3"), Some("Qwen2Tokenizer")) => {
            TokenizerClass::Qwen2 { add_prefix_space }
        }
        (Some("llama" | "qwen3"), Some("GPT2Tokenizer")) => {
            TokenizerClass::Gpt2 { add_prefix_space }
        }
        // (transformers' test for a byte-level tokenizer.json: the text in the file)
        (Some("llama" | "qwen3"), Some("LlamaTokenizer")) if !mentions_byte_level(dir)? => {
            TokenizerClass::Llama {
                add_prefix_space: settings
                    .get("add_prefix_space")
                    .is_none_or(|v| v.is_null() || super::truthy(v)),
                legacy: settings.get("legacy").is_some_and(super::truthy),
            }
        }
        (Some("llama" | "qwen3"), Some(name)) if !LOADS_THE_FILE.contains(&name) => {
            return Err(dir.unsupported(
                TOKENIZER_CONFIG,
                &format!(
                    "a tokenizer.json under tokenizer_class \"{name}\" (a class transformers \
                     may build itself from the file's vocabulary, with a pre-tokenizer and \
                     special tokens of its own, as GPTNeoXTokenizer and CohereTokenizer do; \
                     lorafs models GPT2Tokenizer, LlamaTokenizer and Qwen2Tokenizer)"
                ),
            ))
        }
        _ => TokenizerClass::File,
    })
}

/// The `tokenizer_class` names (without `Fast`) under which transformers loads a
/// `tokenizer.json` as it is (`LlamaTokenizer` does where the file is byte-level, above).
/// Another name is either a class that builds the tokenizer itself, which lorafs refuses
/// unless it models it, or one transformers does not know, which it loads the file as:
/// lorafs cannot tell the two apart without transformers' list of classes, and refuses both.
const LOADS_THE_FILE: &[&str] = &[
    "PreTrainedTokenizer",
    "TokenizersBackend",
    "BloomTokenizer",
    "LlamaTokenizer",
];

impl TokenizerClass {
    /// transformers' name of the class.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TokenizerClass::File => "TokenizersBackend",
            TokenizerClass::Qwen2 { .. } => "Qwen2Tokenizer",
            TokenizerClass::Gpt2 { .. } => "GPT2Tokenizer",
            TokenizerClass::Llama { .. } => "LlamaTokenizer",
        }
    }

    /// The special tokens the class names where the settings have no such key.
    pub(crate) fn default_tokens(self) -> &'static [(&'static str, &'static str)] {
        match self {
            TokenizerClass::File => &[],
            TokenizerClass::Qwen2 { .. } => QWEN2_DEFAULTS,
            TokenizerClass::Gpt2 { .. } => GPT2_DEFAULTS,
            TokenizerClass::Llama { .. } => LLAMA_DEFAULTS,
        }
    }

    /// The class's own parts of the tokenizer (`normalizer`, `pre_tokenizer`, `decoder`), in
    /// `tokenizer.json` form; `None` for the file's.
    pub(crate) fn pipeline(self) -> Option<[(&'static str, Json); 3]> {
        // tokenizers' `decoders.ByteLevel()`, which both classes set.
        let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true});
        let byte_level = |add_prefix_space: bool, use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
                "trim_offsets": true, "use_regex": use_regex})
        };
        match self {
            TokenizerClass::File => None,
            TokenizerClass::Qwen2 { add_prefix_space } => Some([
                ("normalizer", json!({"type": "NFC"})),
                (
                    "pre_tokenizer",
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT},
                            "behavior": "Isolated", "invert": false},
                        byte_level(add_prefix_space, false),
                    ]}),
                ),
                ("decoder", decoder),
            ]),
            TokenizerClass::Gpt2 { add_prefix_space } => Some([
                ("normalizer", Json::Null),
                ("pre_tokenizer", byte_level(add_prefix_space, true)),
                ("decoder", decoder),
            ]),
            TokenizerClass::Llama {
                add_prefix_space,
                legacy,
            } => {
                // transformers' `_get_prepend_scheme`
                let prepend_scheme = match (add_prefix_space, legacy) {
                    (false, _) => "never",
                    (true, true) => "always",
                    (true, false) => "first",
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_prefix_space {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                Some([
                    ("normalizer", Json::Null),
                    (
                        "pre_tokenizer",
                        json!({"type": "Metaspace", "replacement": "\u{2581}",
                            "prepend_scheme": prepend_scheme, "split": false}),
                    ),
                    ("decoder", json!({"type": "Sequence", "decoders": decoders})),
                ])
            }
        }
    }

    /// The BPE options the class builds its model with, or `None` for the file's. (An empty
    /// subword prefix or suffix is the same as none.)
    pub(crate) fn model_options(self) -> Option<[(&'static str, Json); 7]> {
        // `LlamaTokenizer` fuses unknown pieces and falls back to bytes; the byte-level
        // classes do neither.
        let sentencepiece = match self {
            TokenizerClass::File => return None,
            TokenizerClass::Qwen2 { .. } | TokenizerClass::Gpt2 { .. } => false,
            TokenizerClass::Llama { .. } => true,
        };
        Some([
            ("dropout", Json::Null),
            ("unk_token", Json::Null),
            ("continuing_subword_prefix", json!("")),
            ("end_of_word_suffix", json!("")),
            ("fuse_unk", json!(sentencepiece)),
            ("byte_fallback", json!(sentencepiece)),
            ("ignore_merges", json!(false)),
        ])
    }
}

/// Whether transformers replaces the first split of this mistral model's pre-tokenizer with
/// its own pattern when it loads the tokenizer (`fix_mistral_regex`, transformers 5.24): when
/// the settings ask for it and `config.json` was saved before transformers 5, or does not say
/// by which version.
fn patches_mistral_regex(dir: &Dir, settings: &serde_json::Map<String, Json>) -> bool {
    let asked = settings.get("fix_mistral_regex").is_some_and(super::truthy);
    let saved_by = dir
        .hparams
        .get("transformers_version")
        .and_then(Json::as_str);
    asked && saved_by.is_none_or(before_5)
}

/// Whether a version string is below 5.0.0 as `packaging` orders them (pre-releases of
/// 5.0.0, such as `5.0.0rc1` or `5.0.0.dev0`, are; an unreadable one is taken as old).
fn before_5(version: &str) -> bool {
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major != 5 => major < 5,
        Some(_) => version.strip_prefix("5.0.0").is_some_and(|rest| {
            let rest = rest.trim_start_matches('.');
            [
                "a", "b", "rc", "c", "dev", "pre", "preview", "alpha", "beta",
            ]
            .iter()
            .any(|tag| rest.starts_with(tag))
        }),
        None => true,
    }
}

/// Whether the directory's `tokenizer.json` has the text `"ByteLevel"` anywhere.
fn mentions_byte_level(dir: &Dir) -> Result<bool> {
    let bytes = dir
        .read(super::hf_tokenizer::TOKENIZER_JSON)?
        .unwrap_or_default();
    Ok(bytes.windows(11).any(|w| w == b"\"ByteLevel\""))
}
