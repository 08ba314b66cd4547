//! JSON as text, so that generated inputs can hold what `serde_json::Value` cannot: duplicate
//! keys, numbers out of every range (`1e999`, `18446744073709551616`), and raw garbage.

use proptest::prelude::*;

#[derive(Clone, Debug)]
pub enum J {
    /// Literal JSON text (a number, `true`, `null`, or something invalid on purpose).
    Raw(String),
    Str(String),
    Arr(Vec<J>),
    /// Keys in order, duplicates kept.
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn num(n: impl std::fmt::Display) -> J {
        J::Raw(n.to_string())
    }

    pub fn str(s: &str) -> J {
        J::Str(s.to_string())
    }

    pub fn obj(fields: Vec<(&str, J)>) -> J {
        J::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Raw(text) => out.push_str(text),
            J::Str(s) => write_str(s, out),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

/// Numbers a parser must survive: edges of every integer type, floats that overflow f64 or
/// f32, negative zero, fractions where integers are expected.
pub const ODD_NUMBERS: [&str; 22] = [
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "8",
    "16",
    "0.5",
    "1.5",
    "-2.5",
    "1e38",
    "1e39",
    "1e308",
    "1e999",
    "-1e999",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
];

/// Strings a parser must survive: regex syntax, control characters, path tricks, unicode.
pub const ODD_STRINGS: [&str; 24] = [
    "",
    " ",
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    ".*",
    "(",
    ")",
    "[",
    "\\",
    "*",
    "a{99999}",
    "(?P<x",
    "\\w{200}",
    "(a|aa)*{1000}",
    "line\nbreak",
    "tab\there",
    "nul\u{0}byte",
    "\u{1b}[31mred",
    "é漢🦀",
    "..",
    "../../etc/passwd",
    "./x",
    "/abs",
    "LORA",
];

pub fn odd_number() -> BoxedStrategy<J> {
    prop_oneof![
        proptest::sample::select(&ODD_NUMBERS[..]).prop_map(J::num),
        any::<i64>().prop_map(J::num),
        any::<u64>().prop_map(J::num),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(J::num),
    ]
    .boxed()
}

pub fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::sample::select(&ODD_STRINGS[..]).prop_map(str::to_string),
        2 => "[a-z_.]{0,16}",
        1 => any::<String>(),
        1 => (1usize..4000).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// Any JSON value, small, biased to odd scalars.
pub fn odd_value() -> BoxedStrategy<J> {
    let leaf = prop_oneof![
        3 => odd_number(),
        2 => odd_string().prop_map(J::Str),
        1 => proptest::sample::select(&["true", "false", "null", "", "nan", "{", "]"][..])
            .prop_map(|s| J::Raw(s.to_string())),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
            prop::collection::vec((odd_string(), inner), 0..4).prop_map(J::Obj),
        ]
    })
    .boxed()
}

/// A value of the expected kind most of the time (`good`), anything otherwise.
pub fn mostly(good: BoxedStrategy<J>) -> BoxedStrategy<J> {
    prop_oneof![9 => good, 1 => odd_value()].boxed()
}

/// An object with the given optional fields (each present with its probability), plus now
/// and then an unknown field or a repeated one (whether the first or last wins is the
/// parser's choice).
pub fn object(fields: Vec<(&'static str, f64, BoxedStrategy<J>)>) -> BoxedStrategy<J> {
    let parts: Vec<BoxedStrategy<Option<(String, J)>>> = fields
        .into_iter()
        .map(|(name, p, value)| {
            proptest::option::weighted(p, value.prop_map(move |v| (name.to_string(), v))).boxed()
        })
        .collect();
    (
        parts,
        proptest::option::weighted(0.1, (odd_string(), odd_value())),
        proptest::option::weighted(0.1, any::<prop::sample::Index>()),
    )
        .prop_map(|(parts, extra, repeat)| {
            let mut fields: Vec<(String, J)> = parts.into_iter().flatten().collect();
            fields.extend(extra);
            if let (Some(i), false) = (repeat, fields.is_empty()) {
                let again = fields[i.index(fields.len())].clone();
                fields.push(again);
            }
            J::Obj(fields)
        })
        .boxed()
}
