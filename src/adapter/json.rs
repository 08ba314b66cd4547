//! Compact readers for the fields of `adapter_config.json`. Each keeps what lorafs needs and
//! skips the rest of the JSON stream without building a `serde_json::Value` (about 80 bytes
//! per number), so a hostile config costs memory in proportion to the values kept.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Most keys an `alpha_pattern` or `rank_pattern` may have. Each key is a regex compiled and
/// tried per module; PEFT writes at most one per targeted module (a few hundred for a large
/// model), so this is generous and bounds the memory and time a hostile config costs.
pub const MAX_PATTERN_KEYS: usize = 4096;

/// Whether a field is set: anything but null, false, `[]` and `{}` (its content is skipped).
#[derive(Debug, Default, Clone, Copy)]
pub struct IsSet(pub bool);

impl<'de> Deserialize<'de> for IsSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IsSet, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IsSet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: Error>(self) -> Result<IsSet, E> {
                Ok(IsSet(false))
            }
            fn visit_bool<E: Error>(self, b: bool) -> Result<IsSet, E> {
                Ok(IsSet(b))
            }
            fn visit_i64<E: Error>(self, _: i64) -> Result<IsSet, E> {
                Ok(IsSet(true))
            }
            fn visit_u64<E: Error>(self, _: u64) -> Result<IsSet, E> {
                Ok(IsSet(true))
            }
            fn visit_f64<E: Error>(self, _: f64) -> Result<IsSet, E> {
                Ok(IsSet(true))
            }
            fn visit_str<E: Error>(self, _: &str) -> Result<IsSet, E> {
                Ok(IsSet(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IsSet, A::Error> {
                let mut any = false;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(IsSet(any))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IsSet, A::Error> {
                let mut any = false;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(IsSet(any))
            }
        }
        d.deserialize_any(V)
    }
}

/// A field kept when it is a string (e.g. `init_lora_weights`, also a bool); anything else
/// is skipped.
#[derive(Debug, Default, Clone)]
pub struct Text(pub Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        let text = match Shown::deserialize(d)? {
            Shown::Str(s) => Some(s),
            Shown::Other(_) => None,
        };
        Ok(Text(text))
    }
}

/// Any JSON value, kept as a string when it is one, else as a short description.
enum Shown {
    Str(String),
    Other(String),
}

impl<'de> Deserialize<'de> for Shown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shown, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shown;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: Error>(self) -> Result<Shown, E> {
                Ok(Shown::Other("null".into()))
            }
            fn visit_bool<E: Error>(self, b: bool) -> Result<Shown, E> {
                Ok(Shown::Other(b.to_string()))
            }
            fn visit_i64<E: Error>(self, n: i64) -> Result<Shown, E> {
                Ok(Shown::Other(n.to_string()))
            }
            fn visit_u64<E: Error>(self, n: u64) -> Result<Shown, E> {
                Ok(Shown::Other(n.to_string()))
            }
            fn visit_f64<E: Error>(self, n: f64) -> Result<Shown, E> {
                Ok(Shown::Other(n.to_string()))
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<Shown, E> {
                Ok(Shown::Str(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shown, A::Error> {
                IsSet::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Shown::Other("[…]".into()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shown, A::Error> {
                IsSet::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Shown::Other("{…}".into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `target_modules` as written: a regex string, a list of names, or absent.
#[derive(Debug, Default, Clone)]
pub enum TargetModules {
    #[default]
    Unset,
    Regex(String),
    Names(Vec<String>),
    /// Anything else, described.
    Other(String),
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TargetModules, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetModules;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of module names or a regex")
            }
            fn visit_unit<E: Error>(self) -> Result<TargetModules, E> {
                Ok(TargetModules::Unset)
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<TargetModules, E> {
                Ok(TargetModules::Regex(s.to_string()))
            }
            fn visit_bool<E: Error>(self, b: bool) -> Result<TargetModules, E> {
                Ok(TargetModules::Other(b.to_string()))
            }
            fn visit_i64<E: Error>(self, n: i64) -> Result<TargetModules, E> {
                Ok(TargetModules::Other(n.to_string()))
            }
            fn visit_u64<E: Error>(self, n: u64) -> Result<TargetModules, E> {
                Ok(TargetModules::Other(n.to_string()))
            }
            fn visit_f64<E: Error>(self, n: f64) -> Result<TargetModules, E> {
                Ok(TargetModules::Other(n.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TargetModules, A::Error> {
                let mut names = Vec::new();
                while let Some(item) = seq.next_element::<Shown>()? {
                    names.push(match item {
                        Shown::Str(s) | Shown::Other(s) => s,
                    });
                }
                Ok(TargetModules::Names(names))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TargetModules, A::Error> {
                IsSet::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(TargetModules::Other("{…}".into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `trainable_token_indices`: a list of token ids (for the input embedding), or module-name
/// keys with a list each. Ids are kept as 8-byte integers.
#[derive(Debug, Default, Clone)]
pub enum TokenIndices {
    #[default]
    Unset,
    List(Vec<usize>),
    Modules(Vec<(String, Vec<usize>)>),
}

const TOKEN_INDICES: &str =
    "trainable_token_indices: a list of token ids or an object {module: [ids]}";

/// A token id: a non-negative integer.
struct Id(usize);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(TOKEN_INDICES)
            }
            fn visit_u64<E: Error>(self, n: u64) -> Result<Id, E> {
                usize::try_from(n)
                    .map(Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
            }
        }
        d.deserialize_u64(V)
    }
}

/// A list of token ids.
struct Ids(Vec<usize>);

impl<'de> Deserialize<'de> for Ids {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ids, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ids;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(TOKEN_INDICES)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ids, A::Error> {
                let mut ids = Vec::new();
                while let Some(Id(id)) = seq.next_element()? {
                    ids.push(id);
                }
                Ok(Ids(ids))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for TokenIndices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TokenIndices, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TokenIndices;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(TOKEN_INDICES)
            }
            fn visit_unit<E: Error>(self) -> Result<TokenIndices, E> {
                Ok(TokenIndices::Unset)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TokenIndices, A::Error> {
                let Ids(ids) = Ids::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(if ids.is_empty() {
                    TokenIndices::Unset
                } else {
                    TokenIndices::List(ids)
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TokenIndices, A::Error> {
                let mut modules = Vec::new();
                while let Some((module, Ids(ids))) = map.next_entry::<String, Ids>()? {
                    modules.push((module, ids));
                }
                Ok(if modules.is_empty() {
                    TokenIndices::Unset
                } else {
                    TokenIndices::Modules(modules)
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A pattern's value: a JSON number, or `None` for anything else (skipped).
#[derive(Debug, Clone)]
pub struct PatternValue(pub Option<serde_json::Number>);

impl<'de> Deserialize<'de> for PatternValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PatternValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PatternValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: Error>(self, n: i64) -> Result<PatternValue, E> {
                Ok(PatternValue(Some(n.into())))
            }
            fn visit_u64<E: Error>(self, n: u64) -> Result<PatternValue, E> {
                Ok(PatternValue(Some(n.into())))
            }
            fn visit_f64<E: Error>(self, n: f64) -> Result<PatternValue, E> {
                Ok(PatternValue(serde_json::Number::from_f64(n)))
            }
            fn visit_unit<E: Error>(self) -> Result<PatternValue, E> {
                Ok(PatternValue(None))
            }
            fn visit_bool<E: Error>(self, _: bool) -> Result<PatternValue, E> {
                Ok(PatternValue(None))
            }
            fn visit_str<E: Error>(self, _: &str) -> Result<PatternValue, E> {
                Ok(PatternValue(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PatternValue, A::Error> {
                IsSet::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(PatternValue(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PatternValue, A::Error> {
                IsSet::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(PatternValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The entries of an `alpha_pattern` / `rank_pattern` object in file order (PEFT's
/// first-match rule needs it), at most [`MAX_PATTERN_KEYS`] of them.
#[derive(Debug, Default, Clone)]
pub struct PatternEntries(pub Vec<(String, PatternValue)>);

impl<'de> Deserialize<'de> for PatternEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PatternEntries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PatternEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object {module pattern: number}")
            }
            fn visit_unit<E: Error>(self) -> Result<PatternEntries, E> {
                Ok(PatternEntries::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PatternEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, PatternValue>()? {
                    if entries.len() == MAX_PATTERN_KEYS {
                        return Err(A::Error::custom(format!(
                            "an alpha_pattern or rank_pattern has more than {MAX_PATTERN_KEYS} keys"
                        )));
                    }
                    entries.push(entry);
                }
                Ok(PatternEntries(entries))
            }
        }
        d.deserialize_any(V)
    }
}
