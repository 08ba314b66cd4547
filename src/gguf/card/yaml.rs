//! The YAML of a model card's front matter, loaded as PyYAML's `yaml.safe_load` loads it
//! (the converter's reader): YAML 1.1 implicit types for plain scalars (`yes`/`no`/`on`/`off`
//! are booleans, a float needs a dot, `0o17` is a string but `017` an octal int, `2024-01-01`
//! a date), merge keys (`<<`), anchors and aliases, the core explicit tags, and one document.
//! The events come from `yaml-rust2`'s parser; the typing of scalars is done here, since
//! yaml-rust2's own loader types them as YAML 1.2 does.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use yaml_rust2::parser::{Event, EventReceiver, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// A loaded YAML value, as the Python object `safe_load` makes of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Y {
    Null,
    Bool(bool),
    /// Python's ints are unbounded; beyond i128 the value saturates (it is only ever
    /// compared with zero or checked against the int32 range).
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Y>),
    /// Keys in first-insertion order, each with its last value (a Python dict).
    Map(Vec<(Y, Y)>),
    /// A value of a type no card field can hold (a date, a timestamp, bytes, a set).
    Other(&'static str),
}

impl Y {
    /// Python's truth value.
    pub fn truthy(&self) -> bool {
        match self {
            Y::Null => false,
            Y::Bool(b) => *b,
            Y::Int(i) => *i != 0,
            Y::Float(f) => *f != 0.0,
            Y::Str(s) => !s.is_empty(),
            Y::Seq(v) => !v.is_empty(),
            Y::Map(m) => !m.is_empty(),
            Y::Other(_) => true,
        }
    }

    /// The value of string key `key` of a mapping (`dict.get`).
    pub fn get(&self, key: &str) -> Option<&Y> {
        match self {
            Y::Map(m) => m
                .iter()
                .find(|(k, _)| matches!(k, Y::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description for messages.
    pub fn describe(&self) -> String {
        match self {
            Y::Null => "null".into(),
            Y::Bool(b) => format!("the boolean {b}"),
            Y::Int(i) => format!("the integer {i}"),
            Y::Float(f) => format!("the number {f}"),
            Y::Str(s) => format!("{s:?}"),
            Y::Seq(_) => "a list".into(),
            Y::Map(_) => "a mapping".into(),
            Y::Other(what) => format!("a {what}"),
        }
    }
}

/// Loads `text` as `yaml.safe_load` does: `None` for an empty stream.
pub fn load(text: &str) -> Result<Option<Y>, String> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut b, true).map_err(|e| e.to_string())?;
    if let Some(e) = b.error {
        return Err(e);
    }
    if b.documents > 1 {
        return Err("expected a single document in the stream, but found another".into());
    }
    Ok(b.root)
}

enum Open {
    Seq(Vec<Y>),
    /// Pairs as written (merge keys included), and the key waiting for its value.
    Map(Vec<(Y, Y)>, Option<Y>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Open, usize)>,
    anchors: HashMap<usize, Y>,
    documents: usize,
    root: Option<Y>,
    error: Option<String>,
}

/// The merge key `<<`, while a mapping is built.
const MERGE: &str = "\u{0}<<merge>>";

impl Builder {
    fn fail(&mut self, what: String) {
        self.error.get_or_insert(what);
    }

    fn value(&mut self, y: Y, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, y.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(y);
                }
            }
            Some((Open::Seq(items), _)) => items.push(y),
            Some((Open::Map(pairs, key), _)) => match key.take() {
                None => *key = Some(y),
                Some(k) => pairs.push((k, y)),
            },
        }
    }

    fn end_map(&mut self, pairs: Vec<(Y, Y)>) -> Result<Y, String> {
        // SafeConstructor.flatten_mapping: the merged mappings' pairs come first (the
        // last-listed mapping first), then the mapping's own; later keys win.
        let mut merged = Vec::new();
        let mut own = Vec::new();
        for (k, v) in pairs {
            if matches!(&k, Y::Str(s) if s == MERGE) {
                match v {
                    Y::Map(m) => merged.push(m),
                    Y::Seq(items) => {
                        let mut maps = Vec::new();
                        for item in items {
                            match item {
                                Y::Map(m) => maps.push(m),
                                _ => {
                                    return Err(
                                        "a merge key `<<` of something else than mappings".into()
                                    )
                                }
                            }
                        }
                        maps.reverse();
                        merged.extend(maps);
                    }
                    _ => return Err("a merge key `<<` of something else than a mapping".into()),
                }
            } else {
                own.push((k, v));
            }
        }
        let mut out: Vec<(Y, Y)> = Vec::new();
        for (k, v) in merged.into_iter().flatten().chain(own) {
            if matches!(k, Y::Seq(_) | Y::Map(_)) {
                return Err("a list or mapping as a mapping key (unhashable)".into());
            }
            if let Y::Str(s) = &v {
                if s == MERGE {
                    return Err("the merge key `<<` as a value".into());
                }
            }
            match out.iter_mut().find(|(ok, _)| *ok == k) {
                Some(pair) => pair.1 = v,
                None => out.push((k, v)),
            }
        }
        Ok(Y::Map(out))
    }
}

impl EventReceiver for Builder {
    fn on_event(&mut self, ev: Event) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(value, style, anchor, tag) => match scalar(value, style, tag) {
                Ok(y) => self.value(y, anchor),
                Err(e) => self.fail(e),
            },
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(y) => self.value(y, 0),
                None => self.fail("an alias of an anchor not yet complete (recursive)".into()),
            },
            Event::SequenceStart(anchor, tag) => {
                if let Some(t) = tag.filter(|t| !is_core(t, "seq")) {
                    return self.fail(format!("unsupported tag {}{}", t.handle, t.suffix));
                }
                self.stack.push((Open::Seq(Vec::new()), anchor));
            }
            Event::MappingStart(anchor, tag) => {
                if let Some(t) = tag.filter(|t| !is_core(t, "map")) {
                    return self.fail(format!("unsupported tag {}{}", t.handle, t.suffix));
                }
                self.stack.push((Open::Map(Vec::new(), None), anchor));
            }
            Event::SequenceEnd => {
                if let Some((Open::Seq(items), anchor)) = self.stack.pop() {
                    self.value(Y::Seq(items), anchor);
                }
            }
            Event::MappingEnd => {
                if let Some((Open::Map(pairs, _), anchor)) = self.stack.pop() {
                    match self.end_map(pairs) {
                        Ok(y) => self.value(y, anchor),
                        Err(e) => self.fail(e),
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_core(tag: &Tag, name: &str) -> bool {
    tag.handle == "tag:yaml.org,2002:" && tag.suffix == name
}

/// A scalar as SafeLoader constructs it: plain scalars typed by the YAML 1.1 implicit
/// resolvers, quoted and block scalars strings, explicit core tags obeyed.
fn scalar(value: String, style: TScalarStyle, tag: Option<Tag>) -> Result<Y, String> {
    let kind = match &tag {
        Some(t) if t.handle == "tag:yaml.org,2002:" => t.suffix.clone(),
        Some(t) if t.handle == "!" && t.suffix.is_empty() => "str".into(),
        Some(t) => return Err(format!("unsupported tag {}{}", t.handle, t.suffix)),
        None if style == TScalarStyle::Plain => resolve(&value).into(),
        None => "str".into(),
    };
    let bad = |what: &str| format!("{value:?} is not a valid {what}");
    Ok(match kind.as_str() {
        "str" => Y::Str(value),
        "null" => Y::Null,
        "bool" => Y::Bool(matches!(
            value.to_lowercase().as_str(),
            "yes" | "true" | "on"
        )),
        "int" => Y::Int(int(&value).ok_or_else(|| bad("integer"))?),
        "float" => Y::Float(float(&value).ok_or_else(|| bad("float"))?),
        "merge" => Y::Str(MERGE.into()),
        "timestamp" => Y::Other("date"),
        "binary" => Y::Other("binary value"),
        "value" => return Err(format!("{value:?}: could not determine a constructor")),
        other => return Err(format!("unsupported tag !!{other}")),
    })
}

/// PyYAML's implicit resolvers (Resolver.add_implicit_resolver, YAML 1.1).
fn resolve(v: &str) -> &'static str {
    static RES: OnceLock<Vec<(&'static str, Regex)>> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            ("bool", r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$"),
            ("float", r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
            ("int", r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$"),
            ("merge", r"^(?:<<)$"),
            ("null", r"^(?:~|null|Null|NULL|)$"),
            ("timestamp", r"^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$"),
            ("value", r"^(?:=)$"),
        ]
        .into_iter()
        .map(|(k, r)| (k, Regex::new(r).expect("valid regex")))
        .collect()
    });
    // PyYAML's `$` also matches before a final newline; a plain scalar has none.
    res.iter()
        .find(|(_, re)| re.is_match(v))
        .map(|(k, _)| *k)
        .unwrap_or("str")
}

/// SafeConstructor.construct_yaml_int.
fn int(v: &str) -> Option<i128> {
    let v = v.replace('_', "");
    let (sign, v) = match v.strip_prefix('-') {
        Some(rest) => (-1, rest.to_string()),
        None => (1, v.strip_prefix('+').unwrap_or(&v).to_string()),
    };
    let sat = |r: Result<i128, std::num::ParseIntError>| match r {
        Ok(n) => Some(n),
        Err(e) if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) => Some(i128::MAX),
        Err(_) => None,
    };
    let n = if v == "0" {
        0
    } else if let Some(b) = v.strip_prefix("0b") {
        sat(i128::from_str_radix(b, 2))?
    } else if let Some(h) = v.strip_prefix("0x") {
        sat(i128::from_str_radix(h, 16))?
    } else if let Some(o) = v.strip_prefix('0') {
        sat(i128::from_str_radix(o, 8))?
    } else if v.contains(':') {
        let mut n: i128 = 0;
        for part in v.split(':') {
            n = n
                .saturating_mul(60)
                .saturating_add(part.parse::<i128>().ok()?);
        }
        n
    } else {
        sat(v.parse::<i128>())?
    };
    Some(sign * n)
}

/// SafeConstructor.construct_yaml_float.
fn float(v: &str) -> Option<f64> {
    let v = v.replace('_', "").to_lowercase();
    let (sign, v) = match v.strip_prefix('-') {
        Some(rest) => (-1.0, rest.to_string()),
        None => (1.0, v.strip_prefix('+').unwrap_or(&v).to_string()),
    };
    let x = if v == ".inf" {
        f64::INFINITY
    } else if v == ".nan" {
        f64::NAN
    } else if v.contains(':') {
        let mut x = 0.0;
        for part in v.split(':') {
            let p = part.replace(".e", ".0e");
            let p = if p.ends_with('.') { format!("{p}0") } else { p };
            x = x * 60.0 + p.parse::<f64>().ok()?;
        }
        x
    } else {
        let p = v.replace(".e", ".0e");
        let p = if p.ends_with('.') { format!("{p}0") } else { p };
        let p = if p.starts_with('.') {
            format!("0{p}")
        } else {
            p
        };
        p.parse::<f64>().ok()?
    };
    Some(sign * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Y {
        load(text).unwrap().unwrap()
    }

    #[test]
    fn yaml_1_1_scalars() {
        let y = one("a: yes\nb: no\nc: 1e5\nd: 1.5e+3\ne: 017\nf: 0x1F\ng: ~\nh: 2024-01-02\ni: '017'\nj: 1_000\nk: 1:30\nl: .5\nm: On\nn: 3.\n");
        assert_eq!(y.get("a"), Some(&Y::Bool(true)));
        assert_eq!(y.get("b"), Some(&Y::Bool(false)));
        assert_eq!(y.get("c"), Some(&Y::Str("1e5".into())));
        assert_eq!(y.get("d"), Some(&Y::Float(1500.0)));
        assert_eq!(y.get("e"), Some(&Y::Int(15)));
        assert_eq!(y.get("f"), Some(&Y::Int(31)));
        assert_eq!(y.get("g"), Some(&Y::Null));
        assert_eq!(y.get("h"), Some(&Y::Other("date")));
        assert_eq!(y.get("i"), Some(&Y::Str("017".into())));
        assert_eq!(y.get("j"), Some(&Y::Int(1000)));
        assert_eq!(y.get("k"), Some(&Y::Int(90)));
        assert_eq!(y.get("l"), Some(&Y::Float(0.5)));
        assert_eq!(y.get("m"), Some(&Y::Bool(true)));
        assert_eq!(y.get("n"), Some(&Y::Float(3.0)));
    }

    #[test]
    fn merge_keys_anchors_and_duplicates() {
        let y = one("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nd: 1\nd: 2\n");
        assert_eq!(
            y.get("m"),
            Some(&Y::Map(vec![
                (Y::Str("x".into()), Y::Int(1)),
                (Y::Str("y".into()), Y::Int(3))
            ]))
        );
        assert_eq!(y.get("d"), Some(&Y::Int(2)));
    }

    #[test]
    fn empty_multi_and_malformed() {
        assert_eq!(load("\n").unwrap(), None);
        assert_eq!(load("# just a comment\n").unwrap(), None);
        assert!(load("a: 1\n---\nb: 2\n").is_err());
        assert!(load("a: [1, 2\n").is_err());
        assert!(load("a: !custom x\n").is_err());
    }
}
