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
//! Before those, it adds the tokens of the added-token table of the settings that the
//! tokenizer lacks (`added_tokens_decoder`, with their flags), in id order.
//!
//! A `tokenizer_config.json` without an `added_tokens_decoder` (written before transformers
//! 4.34) is read as transformers' legacy path reads it: with `special_tokens_map.json` over
//! it, and `added_tokens.json` as the added-token table.
//! Its standard names replace the config's, its other `*_token` keys come before the config's
//! (transformers finds them later, in `__init__`), its `extra_special_tokens` are appended to
//! the config's, and its `additional_special_tokens` count where the config has no extra list.
//!
//! A named token that `tokenizer.json` lists as an added token that is *not* special is a case
//! where transformers' tokenizer classes disagree (some make it special, some normalize it
//! differently): lorafs refuses it rather than guess.

use super::class::TokenizerClass;
use super::hf_tokenizer::{file_added_tokens, TOKENIZER_JSON};
use super::{Dir, TOKENIZER_CONFIG};
use crate::Result;
use serde_json::{Map, Value as Json};
use std::collections::{BTreeMap, HashSet};
use tokenizers::{AddedToken, Tokenizer};

const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
const ADDED_TOKENS_FILE: &str = "added_tokens.json";
/// The config's added-token table, written since transformers 4.34.
const ADDED_TOKENS_DECODER: &str = "added_tokens_decoder";

/// The key of a token of the extra list.
const EXTRA: &str = "extra special token";

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

/// A special token named by a tokenizer's settings.
#[derive(Debug, PartialEq)]
struct Named {
    /// The key naming it (`"pad_token"`, or `"extra special token"`).
    key: String,
    content: String,
    /// The file that named it.
    file: &'static str,
}

/// Appends to `tokenizer` the tokens transformers adds when it loads it: those of the
/// added-token table of the settings (`added_tokens_decoder`, or the legacy
/// `added_tokens.json`) that it lacks, in id order, then the named special tokens it lacks, in
/// transformers' order; each once. `Err` if a named token is an added token that is not
/// special (see the module's comment). A tokenizer `class` of its own names its default
/// tokens where the settings do not, and starts without the file's added tokens, which the
/// legacy table then holds.
pub(super) fn add_named_tokens(
    dir: &Dir,
    tokenizer: &mut Tokenizer,
    class: TokenizerClass,
) -> Result<()> {
    let mut config = dir.json_object(TOKENIZER_CONFIG)?.unwrap_or_default();
    for (key, token) in class.default_tokens() {
        config.entry(*key).or_insert_with(|| Json::from(*token));
    }
    // Settings saved the old way (no table in the config) are read with the legacy map over
    // them (empty where there is none); `None` is the current layout.
    let legacy = match config.contains_key(ADDED_TOKENS_DECODER) {
        true => None,
        false => Some(dir.json_object(SPECIAL_TOKENS_MAP)?.unwrap_or_default()),
    };
    let added = tokenizer.get_added_tokens_decoder();
    let mut known: HashSet<String> = added.values().map(|t| t.content.clone()).collect();
    let named = named_tokens(&config, legacy.as_ref());
    // The table's tokens go to the library as they are: like transformers, it skips those it
    // has with the same flags, and takes the flags of one it has with others.
    let from_file = class != TokenizerClass::File;
    let mut missing = table_tokens(dir, &config, legacy.as_ref(), &named, from_file)?;
    known.extend(missing.iter().map(|t| t.content.clone()));
    for Named { key, content, file } in named {
        if let Some(token) = added.values().find(|t| t.content == content) {
            if !token.special {
                return Err(dir.unsupported(
                    file,
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

/// The tokens of the added-token table transformers reads beside `tokenizer.json`, in id
/// order: the config's `added_tokens_decoder` (each with its flags), or in the old layout
/// (`legacy` given), `added_tokens.json` (special where the config, with the legacy map over
/// it, names the token among its standard special tokens or its extra list before
/// `__init__`), with `tokenizer.json`'s added tokens after it when `from_file` (each with its
/// flags, over a token of the same id). A token that any setting names is made special, as
/// transformers' `__init__` does.
fn table_tokens(
    dir: &Dir,
    config: &Map<String, Json>,
    legacy: Option<&Map<String, Json>>,
    named: &[Named],
    from_file: bool,
) -> Result<Vec<AddedToken>> {
    let named_contents: HashSet<&str> = (named.iter())
        .filter(|n| n.key != EXTRA)
        .map(|n| n.content.as_str())
        .collect();
    let mut table: BTreeMap<u64, AddedToken> = BTreeMap::new();
    if legacy.is_none() {
        let bad = |what: &str| dir.bad(TOKENIZER_CONFIG, format!("{ADDED_TOKENS_DECODER}: {what}"));
        let Some(Json::Object(decoder)) = config.get(ADDED_TOKENS_DECODER) else {
            return Err(bad("not an object"));
        };
        for (id, entry) in decoder {
            let id = id
                .parse()
                .map_err(|_| bad(&format!("{id:?} is not a token id")))?;
            let token =
                added_token(entry).ok_or_else(|| bad(&format!("token {id} has no content")))?;
            table.insert(id, token);
        }
    } else if let Some(file) = dir.json_object(ADDED_TOKENS_FILE)? {
        let (extra, _) = extra_tokens(config, legacy, false);
        let mut special: HashSet<String> = (named.iter())
            .filter(|n| NAMED.contains(&n.key.as_str()))
            .map(|n| n.content.clone())
            .collect();
        special.extend(extra.iter().filter_map(|(v, _)| token_content(v)));
        for (content, id) in &file {
            let id = id.as_u64().ok_or_else(|| {
                dir.bad(ADDED_TOKENS_FILE, format!("{content:?} has no token id"))
            })?;
            let token = AddedToken::from(content.clone(), special.contains(content));
            table.insert(id, token);
        }
    }
    if legacy.is_some() && from_file {
        if let Some(file) = dir.tokenizer_json()? {
            let tokens = file_added_tokens(&file.outline)
                .map_err(|e| dir.bad(TOKENIZER_JSON, format!("added_tokens: {e}")))?;
            table.extend(tokens.into_iter().map(|(id, token)| (u64::from(id), token)));
        }
    }
    Ok((table.into_values())
        .map(|mut token| {
            token.special |= named_contents.contains(token.content.as_str());
            token
        })
        .collect())
}

/// An `added_tokens_decoder` entry as transformers' `AddedToken(**entry)` makes it.
fn added_token(entry: &Json) -> Option<AddedToken> {
    let content = entry.get("content")?.as_str()?.to_string();
    let flag = |key: &str| entry.get(key).and_then(Json::as_bool);
    let special = flag("special").unwrap_or(false);
    let mut token = AddedToken::from(content, special);
    token.normalized = flag("normalized").unwrap_or(!special);
    token.lstrip = flag("lstrip").unwrap_or(false);
    token.rstrip = flag("rstrip").unwrap_or(false);
    token.single_word = flag("single_word").unwrap_or(false);
    Some(token)
}

/// The named special tokens of `tokenizer_config.json` (`config`), with the legacy
/// `special_tokens_map.json` (`legacy`) over it, in transformers' order: the standard names,
/// then other `*_token` keys (transformers' model-specific tokens: the legacy file's first),
/// then the `extra_special_tokens` (formerly `additional_special_tokens`) list.
fn named_tokens(config: &Map<String, Json>, legacy: Option<&Map<String, Json>>) -> Vec<Named> {
    let empty = Map::new();
    let legacy_map = legacy.unwrap_or(&empty);
    let mut tokens = Vec::new();
    let mut push = |key: &str, value: &Json, file| {
        if let Some(content) = token_content(value) {
            let key = key.to_string();
            tokens.push(Named { key, content, file });
        }
    };
    for key in NAMED {
        match (legacy_map.get(*key), config.get(*key)) {
            (Some(value), _) => push(key, value, SPECIAL_TOKENS_MAP),
            (None, Some(value)) => push(key, value, TOKENIZER_CONFIG),
            (None, None) => {}
        }
    }
    // transformers takes the config's own (string-valued) ones out first; the legacy file's
    // are found among the remaining settings in `__init__` and come first, the config's value
    // kept for a key both name.
    let own: Vec<(&String, &Json)> = (config.iter())
        .filter(|(key, value)| is_model_specific(key) && value.is_string())
        .collect();
    let from_legacy = (legacy_map.iter())
        .filter(|(key, value)| is_model_specific(key) && (value.is_string() || value.is_object()));
    for (key, value) in from_legacy {
        match own.iter().find(|(k, _)| *k == key) {
            Some((_, value)) => push(key, value, TOKENIZER_CONFIG),
            None => push(key, value, SPECIAL_TOKENS_MAP),
        }
    }
    for (key, value) in &own {
        if !legacy_map.contains_key(*key) {
            push(key, value, TOKENIZER_CONFIG);
        }
    }
    let (extra, named) = extra_tokens(config, legacy, true);
    for (name, value) in named {
        push(name, value, TOKENIZER_CONFIG);
    }
    for (value, file) in extra {
        push(EXTRA, value, file);
    }
    tokens
}

/// The extra special tokens, each with the file naming it, and the config's model-specific
/// tokens given as an `extra_special_tokens` object (which transformers moves to the named
/// ones), settled as transformers settles them in `_from_pretrained`, then (`at_init`) in
/// `__init__`.
#[allow(clippy::type_complexity)]
fn extra_tokens<'a>(
    config: &'a Map<String, Json>,
    legacy: Option<&'a Map<String, Json>>,
    at_init: bool,
) -> (Vec<(&'a Json, &'static str)>, Vec<(&'a str, &'a Json)>) {
    let mut extra = config
        .get("extra_special_tokens")
        .map(|v| (v, TOKENIZER_CONFIG));
    let mut additional = config
        .get("additional_special_tokens")
        .map(|v| (v, TOKENIZER_CONFIG));
    // The deprecated name stands in for an empty or absent list.
    if additional.is_some() && !extra.is_some_and(|(v, _)| truthy(v)) {
        extra = additional.take();
    }
    let mut named = Vec::new();
    if let Some((Json::Object(map), _)) = extra {
        named = map.iter().map(|(k, v)| (k.as_str(), v)).collect();
        extra = None;
    }
    let mut list: Vec<(&Json, &str)> = match extra {
        Some((Json::Array(values), file)) => values.iter().map(|v| (v, file)).collect(),
        _ => Vec::new(),
    };
    if let Some(legacy) = legacy {
        if let Some(Json::Array(values)) = legacy.get("extra_special_tokens") {
            for value in values {
                let content = token_content(value);
                if !list.iter().any(|(v, _)| token_content(v) == content) {
                    list.push((value, SPECIAL_TOKENS_MAP));
                }
            }
            extra = legacy
                .get("extra_special_tokens")
                .map(|v| (v, SPECIAL_TOKENS_MAP));
        }
        if let Some(value) = legacy.get("additional_special_tokens") {
            additional = Some((value, SPECIAL_TOKENS_MAP));
        }
    }
    // `__init__` takes the deprecated name only where no list was given at all.
    if let (true, None, Some((Json::Array(values), file))) = (at_init, extra, additional) {
        list = values.iter().map(|v| (v, file)).collect();
    }
    (list, named)
}

/// Python's truth of a setting's value.
fn truthy(value: &Json) -> bool {
    match value {
        Json::Null | Json::Bool(false) => false,
        Json::Array(list) => !list.is_empty(),
        Json::Object(map) => !map.is_empty(),
        Json::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn is_model_specific(key: &str) -> bool {
    key.ends_with("_token") && !NAMED.contains(&key)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Json) -> Map<String, Json> {
        value.as_object().unwrap().clone()
    }

    /// (key, content, file) of each named token, in order.
    fn named(config: Json, legacy: Option<Json>) -> Vec<(String, String, &'static str)> {
        let legacy = legacy.map(object);
        (named_tokens(&object(config), legacy.as_ref()).into_iter())
            .map(|n| (n.key, n.content, n.file))
            .collect()
    }

    fn t(key: &str, content: &str, file: &'static str) -> (String, String, &'static str) {
        (key.to_string(), content.to_string(), file)
    }

    #[test]
    fn the_legacy_map_goes_over_the_config_in_transformers_order() {
        let config = json!({"video_token": "<vid>", "eos_token": "<|end|>", "image_token": "<i>",
            "bos_token": "<s>"});
        let legacy = json!({"image_token": {"content": "<img>"}, "pad_token": "[PAD]",
            "eos_token": {"content": "[E]", "lstrip": false}, "bos_token": null,
            "additional_special_tokens": ["[X]"]});
        let (c, m) = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP);
        assert_eq!(
            named(config, Some(legacy)),
            [
                t("eos_token", "[E]", m),
                t("pad_token", "[PAD]", m),
                // the legacy file's model-specific tokens first; the config's value kept
                t("image_token", "<i>", c),
                t("video_token", "<vid>", c),
                t("extra special token", "[X]", m),
            ]
        );
    }

    #[test]
    fn extra_lists_are_settled_as_transformers_settles_them() {
        let (c, m) = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP);
        let extra = |config: Json, legacy: Option<Json>| -> Vec<(String, &'static str)> {
            (named(config, legacy).into_iter())
                .map(|(_, content, file)| (content, file))
                .collect()
        };
        let s = |content: &str, file| (content.to_string(), file);
        // the deprecated name stands in for an empty list
        let config = json!({"extra_special_tokens": [], "additional_special_tokens": ["[A]"]});
        assert_eq!(extra(config, None), [s("[A]", c)]);
        // the legacy list is appended, each token once; its deprecated list is then ignored
        let config = json!({"extra_special_tokens": ["[X]"]});
        let legacy = json!({"extra_special_tokens": ["[Y]", {"content": "[X]"}],
            "additional_special_tokens": ["[Z]"]});
        assert_eq!(extra(config, Some(legacy)), [s("[X]", c), s("[Y]", m)]);
        // the legacy deprecated list counts only where no list was given at all
        let legacy = json!({"additional_special_tokens": ["[Z]"]});
        assert_eq!(extra(json!({}), Some(legacy.clone())), [s("[Z]", m)]);
        assert!(extra(json!({"extra_special_tokens": []}), Some(legacy)).is_empty());
        // an object of named extra tokens joins the model-specific ones
        let config = json!({"extra_special_tokens": {"audio_token": "<a>"}, "image_token": "<i>"});
        assert_eq!(extra(config, None), [s("<i>", c), s("<a>", c)]);
    }
}
