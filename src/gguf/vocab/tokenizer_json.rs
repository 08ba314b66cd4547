//! `tokenizer.json` parsed for the vocabulary code. A BPE model's `vocab` and `merges` are
//! most of the file (Llama 3's: 17 MB), and only the `tokenizers` library and the list of
//! merges need them, each in its own form; making every string of them a JSON value first
//! was a large part of the time and memory a GGUF header of such a tokenizer took. So they
//! stay text until one of those two reads them, and everything else is parsed into JSON
//! values as usual.

use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess};
use serde::de::{SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};
use std::fmt;
use std::marker::PhantomData;

/// The model's large fields, left as text in [`TokenizerJson::outline`].
const LARGE: [&str; 2] = ["vocab", "merges"];

/// A parsed `tokenizer.json`.
pub(crate) struct TokenizerJson {
    /// The file, its `model` without `vocab` and `merges`.
    pub outline: Json,
    /// The `model` object's text, `vocab` and `merges` included (`None`: no `model` object).
    model: Option<Box<RawValue>>,
}

impl TokenizerJson {
    /// Parses the file as `serde_json` parses it into a value (the same values, the last of
    /// duplicate keys, the same errors), with the model's large fields left as text.
    pub(crate) fn parse(bytes: &[u8]) -> serde_json::Result<TokenizerJson> {
        let Some(fields) = pick::<Box<RawValue>>(bytes, |_| true) else {
            // Not an object, or not JSON: the whole as a value, or its error.
            let outline = serde_json::from_slice(bytes)?;
            return Ok(TokenizerJson {
                outline,
                model: None,
            });
        };
        let mut outline = Map::new();
        let mut model = None;
        for (key, text) in fields {
            let value = if key == "model" {
                let value = match pick::<Json>(text.get().as_bytes(), |key| !LARGE.contains(&key)) {
                    Some(fields) => Json::Object(fields.into_iter().collect()),
                    None => serde_json::from_str(text.get())?,
                };
                model = value.is_object().then_some(text);
                value
            } else {
                serde_json::from_str(text.get())?
            };
            outline.insert(key, value);
        }
        Ok(TokenizerJson {
            outline: Json::Object(outline),
            model,
        })
    }

    /// The model's text, `vocab` and `merges` included.
    pub(crate) fn model_text(&self) -> Option<&str> {
        self.model.as_deref().map(RawValue::get)
    }

    /// The model as a JSON value, `vocab` and `merges` included.
    pub(crate) fn model(&self) -> serde_json::Result<Option<Json>> {
        self.model_text().map(serde_json::from_str).transpose()
    }

    /// The model's `merges` where they are a list (`None`: none, or not a list), read
    /// straight into strings; an item that is neither a string nor a list of strings is an
    /// error (as it is for the converter, whichever form the first item has).
    pub(crate) fn merges(&self) -> serde_json::Result<Option<Vec<Merge>>> {
        let Some(model) = self.model.as_deref() else {
            return Ok(None);
        };
        let picked = pick::<Box<RawValue>>(model.get().as_bytes(), |key| key == "merges");
        let picked = picked.unwrap_or_default();
        match picked.into_iter().last() {
            Some((_, text)) if text.get().starts_with('[') => serde_json::from_str(text.get()),
            _ => Ok(None),
        }
    }

    /// The whole file as one JSON value.
    pub(crate) fn whole(&self) -> serde_json::Result<Json> {
        let mut whole = self.outline.clone();
        if let Some(model) = self.model()? {
            whole["model"] = model;
        }
        Ok(whole)
    }
}

/// A merge of a BPE model: `"a b"`, or a list of parts (transformers 4.45+ saves pairs).
#[derive(Debug, PartialEq)]
pub(crate) enum Merge {
    Text(String),
    Parts(Vec<String>),
}

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Merge, D::Error> {
        struct MergeVisitor;
        impl<'de> Visitor<'de> for MergeVisitor {
            type Value = Merge;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Merge, E> {
                Ok(Merge::Text(text.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Merge, E> {
                Ok(Merge::Text(text))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                let mut parts = Vec::with_capacity(2);
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Merge::Parts(parts))
            }
        }
        deserializer.deserialize_any(MergeVisitor)
    }
}

/// An object's fields with the keys `keep` takes, in order, read as `V` (the others skipped
/// without being read into anything); `None` if the text is not one JSON object.
fn pick<V: DeserializeOwned>(text: &[u8], keep: fn(&str) -> bool) -> Option<Vec<(String, V)>> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let seed = Pick {
        keep,
        value: PhantomData,
    };
    let picked = seed.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?; // nothing but white space after it, as `from_slice` requires
    Some(picked)
}

/// Reads an object into the fields `keep` takes.
struct Pick<V> {
    keep: fn(&str) -> bool,
    value: PhantomData<V>,
}

impl<'de, V: DeserializeOwned> DeserializeSeed<'de> for Pick<V> {
    type Value = Vec<(String, V)>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, V: DeserializeOwned> Visitor<'de> for Pick<V> {
    type Value = Vec<(String, V)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut picked = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if (self.keep)(&key) {
                picked.push((key, map.next_value()?));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(text: &str) -> TokenizerJson {
        TokenizerJson::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_model_s_large_fields_stay_text_until_asked_for() {
        let text = r#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1},
            "merges": ["a b"], "byte_fallback": true}, "added_tokens": []}"#;
        let file = parsed(text);
        let want = json!({"version": "1.0", "model": {"type": "BPE", "byte_fallback": true},
            "added_tokens": []});
        assert_eq!(file.outline, want);
        // The same key order as a value parsed whole (serde_json's `preserve_order`).
        let keys: Vec<&String> = file.outline["model"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["type", "byte_fallback"]);
        assert_eq!(
            file.merges().unwrap(),
            Some(vec![Merge::Text("a b".into())])
        );
        let whole: Json = serde_json::from_str(text).unwrap();
        assert_eq!(file.whole().unwrap(), whole);
        assert_eq!(file.model().unwrap().as_ref(), whole.get("model"));
    }

    #[test]
    fn it_reads_what_a_whole_value_would_hold() {
        // Duplicate keys: the last, as in a value; a model that is not an object.
        let file = parsed(
            r#"{"model": {"merges": ["x y"], "merges": [], "type": "BPE"}, "a": 1, "a": 2}"#,
        );
        assert_eq!(file.merges().unwrap(), Some(vec![]));
        assert_eq!(file.outline, json!({"model": {"type": "BPE"}, "a": 2}));
        let file = parsed(r#"{"model": null}"#);
        assert_eq!(file.outline, json!({"model": null}));
        assert_eq!(file.model().unwrap(), None);
        assert_eq!(file.merges().unwrap(), None);
        // Merges as pairs; merges that are not a list; an item that is not a string.
        let pairs = parsed(r#"{"model": {"merges": [["a", "b c"], ["d", "e", "f"]]}}"#);
        let parts = |p: &[&str]| Merge::Parts(p.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            pairs.merges().unwrap(),
            Some(vec![parts(&["a", "b c"]), parts(&["d", "e", "f"])])
        );
        assert_eq!(
            parsed(r#"{"model": {"merges": "a b"}}"#).merges().unwrap(),
            None
        );
        assert_eq!(
            parsed(r#"{"model": {"merges": null}}"#).merges().unwrap(),
            None
        );
        assert!(parsed(r#"{"model": {"merges": ["a b", 1]}}"#)
            .merges()
            .is_err());
        assert!(parsed(r#"{"model": {"merges": [["a", 1]]}}"#)
            .merges()
            .is_err());
        // A file that is not an object is its value; one that is not JSON, its error.
        assert_eq!(parsed("[1, 2]").outline, json!([1, 2]));
        let err = TokenizerJson::parse(b"{\"model\": {\"vocab\": [}")
            .err()
            .unwrap();
        let want = serde_json::from_slice::<Json>(b"{\"model\": {\"vocab\": [}").unwrap_err();
        assert_eq!(err.to_string(), want.to_string());
        // Text after the object is an error, as for `serde_json::from_slice`.
        let err = TokenizerJson::parse(b"{\"model\": {}} x").err().unwrap();
        let want = serde_json::from_slice::<Json>(b"{\"model\": {}} x").unwrap_err();
        assert_eq!(err.to_string(), want.to_string());
    }
}
