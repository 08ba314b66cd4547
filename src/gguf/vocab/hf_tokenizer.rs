//! A `tokenizer.json` loaded as transformers' `AutoTokenizer` gives it to the converter: by
//! the Hugging Face `tokenizers` library (its Rust crate), built as the tokenizer class
//! transformers picks builds it ([`class`](super::class)), with the tokens transformers adds
//! from the settings ([`named`](super::named)).

use super::class::{self, TokenizerClass};
use super::tokenizer_json::TokenizerJson;
use super::{Dir, TOKENIZER_CONFIG};
use crate::Result;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer};

pub(crate) const TOKENIZER_JSON: &str = "tokenizer.json";

/// `tokenizer.json` loaded by the `tokenizers` library, as transformers' fast tokenizer.
pub(crate) struct HfTokenizer {
    pub tokenizer: Tokenizer,
    /// The class transformers builds it as.
    pub class: TokenizerClass,
}

impl HfTokenizer {
    /// Loads `tokenizer.json` as the tokenizer class transformers picks builds it, with the
    /// special tokens the settings name; a missing file or one `tokenizers` cannot read is
    /// refused (the converter would need a slow tokenizer or fail).
    pub(crate) fn load(dir: &Dir) -> Result<HfTokenizer> {
        let Some(file) = dir.tokenizer_json()? else {
            return Err(dir.unsupported(
                TOKENIZER_JSON,
                "a tokenizer without tokenizer.json or tokenizer.model",
            ));
        };
        let class = class::resolve(dir)?;
        if class != TokenizerClass::File && !is_bpe(&file.outline) {
            return Err(dir.unsupported(
                TOKENIZER_JSON,
                &format!(
                    "a tokenizer.json that is not a BPE model under {}, which transformers \
                     builds as one (named in {TOKENIZER_CONFIG} or taken for the model type)",
                    class.name()
                ),
            ));
        }
        let mut tokenizer = deserialize(&file, class).map_err(|e| {
            dir.bad(
                TOKENIZER_JSON,
                format!("not a tokenizer the `tokenizers` library reads: {e}"),
            )
        })?;
        super::named::add_named_tokens(dir, &mut tokenizer, class)?;
        Ok(HfTokenizer { tokenizer, class })
    }

    /// `get_vocab()`: the model's vocabulary with the added tokens.
    pub(crate) fn vocab(&self) -> HashMap<String, u32> {
        self.tokenizer.get_vocab(true)
    }

    /// The token ids of `text`, with the post-processor's special tokens when `special`.
    pub(crate) fn encode(&self, dir: &Dir, text: &str, special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| dir.bad(TOKENIZER_JSON, format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub(crate) fn decode(&self, dir: &Dir, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| dir.bad(TOKENIZER_JSON, format!("cannot decode tokens: {e}")))
    }
}

fn is_bpe(json: &Json) -> bool {
    let model_type = json.get("model").and_then(|m| m.get("type"));
    model_type.and_then(Json::as_str) == Some("BPE")
}

/// The tokenizer of a parsed `tokenizer.json` as `class` builds it: for the file's own class,
/// what `Tokenizer::deserialize` gives (as `Tokenizer::from_bytes` would read the file); for
/// a class of its own, the file's vocabulary and merges under the class's model options and
/// pipeline, with the file's post-processor, padding and truncation, and no added tokens
/// (the settings' are added by [`named`](super::named)).
///
/// A BPE model is read straight from its text, and the rest of the tokenizer around a
/// placeholder model; then the steps of the library's own deserializer follow: the model put
/// in, the added tokens added. That is faster: the library takes any model through an untagged
/// enum, which copies the whole model (a large vocabulary and its merges: most of the file)
/// into an intermediate value twice before reading it, which was most of the time a `mount
/// --gguf` of a model with Llama 3's tokenizer took. Other models take the library's way.
pub(super) fn deserialize(
    file: &TokenizerJson,
    class: TokenizerClass,
) -> std::result::Result<Tokenizer, serde_json::Error> {
    let json = &file.outline;
    let (Some(fields), Some(model), Some(model_text)) =
        (json.as_object(), json.get("model"), file.model_text())
    else {
        return Tokenizer::deserialize(file.whole()?);
    };
    if !is_bpe(json) {
        return Tokenizer::deserialize(file.whole()?);
    }
    let bpe = match class.model_options() {
        // (`model` has the options, if any: they are not its large fields)
        Some(options) if !has_options(model, &options) => {
            let mut model = file.model()?.unwrap_or_default();
            for (key, value) in options {
                model[key] = value;
            }
            BPE::deserialize(&model)?
        }
        _ => serde_json::from_str(model_text)?,
    };
    let mut rest: Map<String, Json> = fields
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "model" | "added_tokens"))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (key, value) in class.pipeline().into_iter().flatten() {
        rest.insert(key.into(), value);
    }
    rest.insert(
        "model".into(),
        serde_json::json!({"type": "BPE", "vocab": {}, "merges": []}),
    );
    let mut tokenizer = Tokenizer::deserialize(&Json::Object(rest))?;
    tokenizer.with_model(ModelWrapper::BPE(bpe));
    if class == TokenizerClass::File {
        let added = file_added_tokens(json)?.into_iter().map(|(_, token)| token);
        tokenizer
            .add_tokens(added)
            .map_err(serde::de::Error::custom)?;
    }
    Ok(tokenizer)
}

/// The `added_tokens` of a `tokenizer.json`, each with its id (which the library requires,
/// and then gives the token the id the model or the order of adding gives it).
pub(super) fn file_added_tokens(
    json: &Json,
) -> std::result::Result<Vec<(u32, AddedToken)>, serde_json::Error> {
    #[derive(Deserialize)]
    struct WithId {
        id: u32,
        #[serde(flatten)]
        token: AddedToken,
    }
    let added = match json.get("added_tokens") {
        Some(tokens) => Vec::<WithId>::deserialize(tokens)?,
        None => Vec::new(),
    };
    Ok(added.into_iter().map(|t| (t.id, t.token)).collect())
}

/// Whether a BPE model's JSON has these options already: a key left out has the library's
/// default, and an empty subword prefix or suffix is the same as none.
fn has_options(model: &Json, options: &[(&str, Json)]) -> bool {
    options.iter().all(|(key, want)| {
        let got = match (*key, model.get(*key)) {
            ("continuing_subword_prefix" | "end_of_word_suffix", None | Some(Json::Null)) => {
                serde_json::json!("")
            }
            ("fuse_unk" | "byte_fallback" | "ignore_merges", None) => Json::Bool(false),
            (_, None) => Json::Null,
            (_, Some(value)) => value.clone(),
        };
        got == *want
    })
}
