//! The views file's TOML, checked entry by entry into view specs. Every error is one line
//! naming the view and the key; the caller adds the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::control::{check_view_name, ViewSpec};
use crate::dtype::DType;
use crate::gguf::OutType;
use crate::plan::combine::{Combine, MajoritySign, Method};

/// The views of a file, by name.
pub type Entries = BTreeMap<PathBuf, ViewSpec>;

/// The keys of a view's table, in the order the docs list them.
const VIEW_KEYS: [&str; 8] = [
    "adapters",
    "dtype",
    "gguf",
    "combine",
    "density",
    "majority_sign",
    "svd_rank",
    "seed",
];

/// A view's table as written. Adapters are read by hand: each is a `"DIR[:W]"` string or a
/// `{ path, weight }` table, and serde's untagged enums would lose the reason one is bad.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewToml {
    adapters: Option<Vec<toml::Value>>,
    dtype: Option<String>,
    gguf: Option<Vec<String>>,
    combine: Option<String>,
    density: Option<f64>,
    majority_sign: Option<String>,
    svd_rank: Option<usize>,
    seed: Option<u64>,
}

/// Parse the text of a views file whose directory is `dir` (relative adapter paths are
/// taken from there).
pub fn parse(text: &str, dir: &Path) -> Result<Entries, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    let mut entries = Entries::new();
    for (key, value) in table {
        if key != "views" {
            return Err(format!(
                "unknown key {key:?} at the top level: views are tables [views.\"NAME\"]"
            ));
        }
        let toml::Value::Table(views) = value else {
            return Err("views must be a table of tables: [views.\"NAME\"]".into());
        };
        for (name, view) in views {
            let spec = parse_view(&name, view, dir).map_err(|e| format!("view {name:?}: {e}"))?;
            entries.insert(PathBuf::from(name), spec);
        }
    }
    Ok(entries)
}

/// `line L, column C: message` for a TOML syntax error.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    let Some(span) = error.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: {message}")
}

fn parse_view(name: &str, view: toml::Value, dir: &Path) -> Result<ViewSpec, String> {
    check_view_name(name)?;
    let toml::Value::Table(table) = view else {
        return Err(format!(
            "expected a table [views.\"{name}\"] with adapters = [...]"
        ));
    };
    for (key, value) in &table {
        if !VIEW_KEYS.contains(&key.as_str()) {
            // `[views.mix.a]` makes a table `a` inside view `mix`, not a view `mix/a`.
            let hint = match value {
                toml::Value::Table(_) => " (a name with / is quoted: [views.\"a/b\"])",
                _ => "",
            };
            return Err(format!(
                "unknown key {key:?}{hint}; the keys are {}",
                VIEW_KEYS.join(", ")
            ));
        }
    }
    let view = read_view(table)?;
    let Some(listed) = &view.adapters else {
        return Err("adapters is missing: adapters = [\"DIR[:WEIGHT]\", ...]".into());
    };
    if listed.is_empty() {
        return Err("adapters is empty: a view merges at least one adapter".into());
    }
    let adapters = (listed.iter().enumerate())
        .map(|(i, a)| parse_adapter(a, dir).map_err(|e| format!("adapters[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = view.dtype.as_deref().map(DType::parse).transpose()?;
    let gguf = (view.gguf.as_ref())
        .map(|types| types.iter().map(|t| parse_gguf(t)).collect())
        .transpose()?;
    Ok(ViewSpec {
        adapters,
        dtype,
        gguf,
        combine: parse_combine(&view)?,
    })
}

/// The table of a view as its struct. serde's message for a value of the wrong type does
/// not say which key held it: then each key is read alone to find it.
fn read_view(table: toml::Table) -> Result<ViewToml, String> {
    let one_line = |e: toml::de::Error| e.message().trim().replace('\n', "; ");
    match toml::Value::Table(table.clone()).try_into() {
        Ok(view) => Ok(view),
        Err(e) => {
            for (key, value) in table {
                let alone = toml::Table::from_iter([(key.clone(), value)]);
                if let Err(e) = toml::Value::Table(alone).try_into::<ViewToml>() {
                    return Err(format!("{key}: {}", one_line(e)));
                }
            }
            Err(one_line(e))
        }
    }
}

fn parse_gguf(text: &str) -> Result<OutType, String> {
    OutType::parse(text)
        .ok_or_else(|| format!("gguf: unknown GGUF type {text:?} (use F32, F16, BF16 or Q8_0)"))
}

/// An adapter: `"DIR"`, `"DIR:WEIGHT"` (as `--adapter`) or `{ path = "DIR", weight = W }`,
/// DIR relative to `dir` unless absolute.
fn parse_adapter(value: &toml::Value, dir: &Path) -> Result<(PathBuf, f64), String> {
    let (path, weight) = match value {
        toml::Value::String(text) => split_weight(text, dir)?,
        toml::Value::Table(table) => {
            if let Some(key) = table
                .keys()
                .find(|k| !["path", "weight"].contains(&k.as_str()))
            {
                return Err(format!("unknown key {key:?}; the keys are path, weight"));
            }
            let path = match table.get("path") {
                Some(toml::Value::String(path)) => path.clone(),
                Some(_) => return Err("path must be a string".into()),
                None => return Err("path is missing".into()),
            };
            let weight = match table.get("weight") {
                None => 1.0,
                Some(toml::Value::Float(w)) => *w,
                Some(toml::Value::Integer(w)) => *w as f64,
                Some(_) => return Err("weight must be a number".into()),
            };
            (path, weight)
        }
        _ => return Err("expected \"DIR[:WEIGHT]\" or { path = \"DIR\", weight = W }".to_string()),
    };
    if path.is_empty() {
        return Err("the adapter path is empty".into());
    }
    if !weight.is_finite() {
        return Err(format!("weight {weight} is not a finite number"));
    }
    Ok((dir.join(path), weight))
}

/// `DIR[:WEIGHT]` as `--adapter` reads it, an existing path taken whole: relative to `dir`.
fn split_weight(text: &str, dir: &Path) -> Result<(String, f64), String> {
    if dir.join(text).exists() {
        return Ok((text.to_string(), 1.0));
    }
    match text.rsplit_once(':') {
        Some((path, weight)) => match weight.parse::<f64>() {
            Ok(w) => Ok((path.to_string(), w)),
            Err(_) => Ok((text.to_string(), 1.0)),
        },
        None => Ok((text.to_string(), 1.0)),
    }
}

/// The combination of a view: `combine` and the parameters of its method, checked as
/// `--combine` is. A parameter without `combine` is an error, not ignored.
fn parse_combine(view: &ViewToml) -> Result<Option<Combine>, String> {
    let Some(method) = &view.combine else {
        let given = [
            ("density", view.density.is_some()),
            ("majority_sign", view.majority_sign.is_some()),
            ("svd_rank", view.svd_rank.is_some()),
            ("seed", view.seed.is_some()),
        ];
        return match given.iter().find(|(_, is)| *is) {
            Some((key, _)) => Err(format!(
                "{key} is a parameter of combine, which is not set (combine = \"ties\", ...)"
            )),
            None => Ok(None),
        };
    };
    let method: Method = method.parse().map_err(|e| format!("combine: {e}"))?;
    let majority_sign = match &view.majority_sign {
        Some(sign) => sign.parse().map_err(|e| format!("majority_sign: {e}"))?,
        None => MajoritySign::default(),
    };
    if view.seed.is_some() && !method.is_random() {
        return Err(format!(
            "seed does not apply to combine = \"{method}\": only dare_linear and dare_ties \
             draw random masks"
        ));
    }
    let combine = Combine {
        method,
        density: view.density,
        majority_sign,
        svd_rank: view.svd_rank,
        seed: view.seed.unwrap_or(0),
    };
    // `Combine::check` speaks of the command's flags; here they are keys.
    combine.check().map_err(|e| {
        e.replace("--combine ", "combine = ")
            .replace("--density", "density")
            .replace("--majority-sign", "majority_sign")
            .replace("--svd-rank", "svd_rank")
    })?;
    Ok(Some(combine))
}

#[cfg(test)]
mod tests;
