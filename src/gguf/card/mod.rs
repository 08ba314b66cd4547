//! The model card: the `general.*` keys llama.cpp's converter takes from the YAML front
//! matter of the model directory's `README.md` (gguf-py's `Metadata.load_model_card`, the
//! model-card part of `Metadata.apply_metadata_heuristic`, and `set_gguf_meta_model`): the
//! name and authorship fields a card gives, the license, base models, datasets, tags and
//! languages, with the converter's value types, order and quirks. (Facts from gguf-py; the
//! code is lorafs's own.)
//!
//! What the converter derives from the directory name or `_name_or_path` instead of the card
//! (name, basename, finetune, version, organization) is not reproduced: lorafs has no such
//! directory (docs/GGUF.md).

pub mod yaml;

/// A README.md larger than this is refused (model cards are kilobytes).
pub const MAX_README: u64 = 16 << 20;

use std::sync::OnceLock;

use regex::Regex;

use self::yaml::Y;
use super::{Array, Metadata, Value};

/// The authorship and provenance fields the card gives, as `Metadata` holds them after the
/// model-card heuristics (`None` where the card gives nothing, or null).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Card {
    pub name: Option<Y>,
    pub author: Option<Y>,
    pub version: Option<Y>,
    pub organization: Option<Y>,
    pub finetune: Option<Y>,
    pub basename: Option<Y>,
    pub description: Option<Y>,
    pub size_label: Option<Y>,
    pub license: Option<Y>,
    pub license_name: Option<Y>,
    pub license_link: Option<Y>,
    pub source_url: Option<Y>,
    pub source_doi: Option<Y>,
    pub source_uuid: Option<Y>,
    pub source_repo_url: Option<Y>,
    /// Each entry a mapping (string keys `name`, `organization`, ...).
    pub base_models: Option<Vec<Y>>,
    pub datasets: Option<Vec<Y>>,
    pub tags: Option<Vec<Y>>,
    pub languages: Option<Vec<Y>>,
}

/// The YAML front matter of a README's text, prepared as `load_model_card` prepares it:
/// `None` without front matter (the first line is not exactly `---`).
pub fn front_matter(text: &str) -> Option<String> {
    // Python's text mode turns \r\n and \r into \n; `str.splitlines` then also splits at
    // \v, \f, \x1c-\x1e, \x85, U+2028 and U+2029, and drops the empty piece after a final
    // line break.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let is_break = |c: char| {
        matches!(
            c,
            '\n' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}' | '\u{2029}'
        )
    };
    let mut lines: Vec<&str> = text.split(is_break).collect();
    if text.ends_with(is_break) {
        lines.pop();
    }
    if lines.first() != Some(&"---") {
        return None;
    }
    let body: Vec<&str> = lines[1..]
        .iter()
        .take_while(|l| **l != "---")
        .copied()
        .collect();
    let yaml = body.join("\n") + "\n";
    // The converter's fix of the "Norway problem" and its tab replacement, both textual.
    Some(yaml.replace("- no\n", "- \"no\"\n").replace('\t', "  "))
}

/// The card of a README (its bytes), as `Metadata.load` reads it; `total_params` is the
/// converter's parameter count (it decides which parts of a base model's name are a size).
/// An error where the converter fails: a README that is not UTF-8, or front matter that is
/// not valid YAML.
pub fn load(readme: &[u8], total_params: u64) -> Result<Card, String> {
    let text = std::str::from_utf8(readme).map_err(|e| format!("not UTF-8 ({e})"))?;
    let Some(yaml) = front_matter(text) else {
        return Ok(Card::default());
    };
    let data = yaml::load(&yaml).map_err(|e| format!("its YAML front matter: {e}"))?;
    match data {
        // The converter logs an error and ignores front matter that is not a mapping.
        Some(map @ Y::Map(_)) => Ok(from_card(&map, total_params)),
        _ => Ok(Card::default()),
    }
}

/// `apply_metadata_heuristic`'s model-card part.
fn from_card(card: &Y, total_params: u64) -> Card {
    let mut m = Card::default();
    let has = |k: &str| card.get(k).is_some();
    // use_model_card_metadata: set from the card when the key is there and the field still
    // None (a null sets None again).
    let use_key = |field: &mut Option<Y>, key: &str| {
        if field.is_none() {
            if let Some(v) = card.get(key) {
                *field = Some(v.clone()).filter(|v| *v != Y::Null);
            }
        }
    };
    use_key(&mut m.name, "name");
    use_key(&mut m.author, "author");
    use_key(&mut m.version, "version");
    use_key(&mut m.organization, "organization");
    use_key(&mut m.description, "description");
    use_key(&mut m.finetune, "finetune");
    use_key(&mut m.basename, "basename");
    use_key(&mut m.size_label, "size_label");
    use_key(&mut m.source_url, "url");
    use_key(&mut m.source_doi, "doi");
    use_key(&mut m.source_uuid, "uuid");
    use_key(&mut m.source_repo_url, "repo_url");
    use_key(&mut m.name, "model_name");
    use_key(&mut m.author, "model_author");
    use_key(&mut m.version, "model_version");
    use_key(&mut m.organization, "model_organization");
    use_key(&mut m.description, "model_description");
    use_key(&mut m.finetune, "model_finetune");
    use_key(&mut m.basename, "model_basename");
    use_key(&mut m.size_label, "model_size_label");
    use_key(&mut m.source_url, "model_url");
    use_key(&mut m.source_doi, "model_doi");
    use_key(&mut m.source_uuid, "model_uuid");
    use_key(&mut m.source_repo_url, "model_repo_url");
    use_key(&mut m.name, "model_name");
    use_key(&mut m.author, "model_creator");
    use_key(&mut m.basename, "model_type");

    // `card.get(a, card.get(b, card.get(c)))`: the first key present wins, even when null.
    let first = |keys: &[&str]| keys.iter().find_map(|k| card.get(k));
    if has("base_model") || has("base_models") || has("base_model_sources") {
        let ids = listed(first(&["base_model", "base_models", "base_model_sources"]));
        let entries = ids.iter().map(|id| source_entry(id, total_params));
        m.base_models = Some(entries.collect());
    }
    if has("datasets") || has("dataset") || has("dataset_sources") {
        let ids = listed(first(&["datasets", "dataset", "dataset_sources"]));
        let entries = ids.iter().map(|id| source_entry(id, total_params));
        m.datasets = Some(entries.collect());
    }
    use_key(&mut m.license, "license");
    use_key(&mut m.license_name, "license_name");
    use_key(&mut m.license_link, "license_link");
    // use_array_model_card_metadata: appends a string or a list's items (anything else
    // leaves an empty list, which is not written).
    let append = |field: &mut Option<Vec<Y>>, key: &str| {
        let Some(v) = card.get(key).filter(|v| **v != Y::Null) else {
            return;
        };
        let list = field.get_or_insert_with(Vec::new);
        match v {
            Y::Str(_) => list.push(v.clone()),
            Y::Seq(items) => list.extend(items.iter().cloned()),
            _ => {}
        }
    };
    append(&mut m.tags, "tags");
    append(&mut m.tags, "pipeline_tag");
    append(&mut m.languages, "languages");
    append(&mut m.languages, "language");
    m
}

/// A string is one id, a list its items, anything else none.
fn listed(v: Option<&Y>) -> Vec<Y> {
    match v {
        Some(s @ Y::Str(_)) => vec![s.clone()],
        Some(Y::Seq(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// One base model or dataset entry: a URL, a Hugging Face id (`org/name`) or a mapping
/// given as is; anything else an empty entry (the converter logs an error and counts it).
fn source_entry(id: &Y, total_params: u64) -> Y {
    let s = |k: &str, v: String| (Y::Str(k.into()), Y::Str(v));
    match id {
        Y::Map(_) => id.clone(),
        Y::Str(id)
            if ["http://", "https://", "ssh://"]
                .iter()
                .any(|p| id.starts_with(p)) =>
        {
            let mut entry = vec![s("repo_url", id.clone())];
            static HF_URL: OnceLock<Regex> = OnceLock::new();
            let re = HF_URL.get_or_init(|| {
                Regex::new(r"\Ahttps?://huggingface.co/([^/]+/[^/]+)\z").expect("valid regex")
            });
            // (`$` in Python also matches before a final newline, which [^/]+ takes anyway)
            if id.contains("huggingface.co") {
                if let Some(c) = re.captures(id) {
                    let parts = model_id_components(&c[1], total_params);
                    if let Some(name) = parts.name {
                        entry.push(s("name", id_to_title(&name)));
                    }
                    if let Some(org) = parts.org {
                        entry.push(s("organization", id_to_title(&org)));
                    }
                    if let Some(version) = parts.version {
                        entry.push(s("version", version));
                    }
                }
            }
            Y::Map(entry)
        }
        Y::Str(id) => {
            let parts = model_id_components(id, total_params);
            let mut entry = Vec::new();
            if let Some(name) = &parts.name {
                entry.push(s("name", id_to_title(name)));
            }
            if let Some(org) = &parts.org {
                entry.push(s("organization", id_to_title(org)));
            }
            if let Some(version) = parts.version {
                entry.push(s("version", version));
            }
            if let (Some(org), Some(name)) = (&parts.org, &parts.name) {
                entry.push(s(
                    "repo_url",
                    format!("https://huggingface.co/{org}/{name}"),
                ));
            }
            Y::Map(entry)
        }
        _ => Y::Map(Vec::new()),
    }
}

/// The parts of a Hugging Face model id `get_model_id_components` gives that a card entry
/// uses: the full name, the organization and the version.
#[derive(Debug, Default, PartialEq)]
struct IdParts {
    name: Option<String>,
    org: Option<String>,
    version: Option<String>,
}

fn is_decimal(c: char) -> bool {
    static ND: OnceLock<Regex> = OnceLock::new();
    let re = ND.get_or_init(|| Regex::new(r"^\p{Nd}$").expect("valid regex"));
    c.is_ascii_digit() || (!c.is_ascii() && re.is_match(c.encode_utf8(&mut [0; 4])))
}

/// gguf-py's `Metadata.get_model_id_components`, up to the version.
fn model_id_components(model_id: &str, total_params: u64) -> IdParts {
    if model_id.contains(' ') {
        return IdParts {
            name: Some(model_id.into()),
            ..IdParts::default()
        };
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, n)) => (Some(o.to_string()), n.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    static RES: OnceLock<[Regex; 4]> = OnceLock::new();
    let [version_re, type_re, size_re, finetune_re] = RES.get_or_init(|| {
        [
            r"(?i)\A(?:(v|iter)?\d+([.]\d+)*)\z",
            r"(?i)\A(?:i?q\d(_\w)*|b?fp?(16|32))\z",
            r"(?i)\A(?:(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl))\z",
            r"(?i)\A(?:chat|instruct|vision|lora)\z",
        ]
        .map(|r| Regex::new(r).expect("valid regex"))
    });
    let mut parts: Vec<String> = full
        .split('-')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    #[derive(Default, Clone)]
    struct Types {
        basename: bool,
        size_label: bool,
        finetune: bool,
        version: bool,
        ty: bool,
    }
    impl Types {
        fn len(&self) -> usize {
            [
                self.basename,
                self.size_label,
                self.finetune,
                self.version,
                self.ty,
            ]
            .iter()
            .filter(|b| **b)
            .count()
        }
    }
    let mut types = vec![Types::default(); parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if version_re.is_match(&part) {
            types[i].version = true;
        } else if type_re.is_match(&part) {
            types[i].ty = true;
            parts[i] = part.to_uppercase();
        } else if i > 0 && size_re.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            let n = p.len();
            if is_decimal(p[n - 1]) {
                // bloom-7b1 -> 7.1B
                let (a, b) = (p[n - 2], p[n - 1]);
                p.truncate(n - 2);
                p.extend(['.', b, a]);
            }
            let n = p.len();
            if n > 1 && is_decimal(p[n - 2]) && matches!(p[n - 1], 'k' | 'm' | 'b' | 't') {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total_params != 0 {
                let n = p.len();
                let number: String = p[..n - 1].iter().collect();
                if let Ok(x) = number.trim().parse::<f64>() {
                    let scale = match " KMBT".find(p[n - 1]) {
                        Some(k) => 1000f64.powi(k as i32),
                        None => 1e-3,
                    };
                    let label = x * scale;
                    let total = total_params as f64;
                    if (label - total).abs() > (7 * total_params / 8) as f64 {
                        types[i].finetune = true;
                        let last = p[n - 1].to_lowercase().collect::<Vec<_>>();
                        p.truncate(n - 1);
                        p.extend(last);
                    }
                }
            }
            if types[i].len() == 0 {
                types[i].size_label = true;
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && finetune_re.is_match(&part) {
            types[i].finetune = true;
        }
    }
    // Word sizes ("small") are no size when a numeric one is there.
    if parts
        .iter()
        .zip(&types)
        .any(|(n, t)| t.size_label && n.chars().any(is_decimal))
    {
        for (n, t) in parts.iter().zip(types.iter_mut()) {
            if t.size_label && n.chars().all(char::is_alphabetic) {
                t.size_label = false;
            }
        }
    }
    let mut at_start = true;
    for (part, t) in parts.iter().zip(types.iter_mut()) {
        let alpha = part.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((t.len() == 0 && alpha) || t.version) {
            t.basename = true;
        } else {
            at_start = false;
            if t.len() == 0 {
                t.finetune = true;
            }
        }
    }
    for t in types.iter_mut().rev() {
        if t.basename && t.len() > 1 {
            t.basename = false;
        } else {
            break;
        }
    }
    let version: Vec<&str> = parts
        .iter()
        .zip(&types)
        .filter(|(_, t)| t.version && !t.basename)
        .map(|(p, _)| p.as_str())
        .collect();
    IdParts {
        name: Some(full),
        org,
        version: Some(version.join("-")).filter(|v| !v.is_empty()),
    }
}

/// gguf-py's `Metadata.id_to_title`: words of an id title-cased unless they have capitals
/// or are a version or start with a digit.
fn id_to_title(s: &str) -> String {
    static KEEP: OnceLock<Regex> = OnceLock::new();
    let keep = KEEP.get_or_init(|| Regex::new(r"^(?:v\d+(?:\.\d+)*|\d.*)$").expect("valid regex"));
    let words: Vec<String> = s
        .trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            if is_lower(w) && !keep.is_match(w) {
                title(w)
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ")
}

/// Python's `str.islower`: some cased character, none upper case.
fn is_lower(w: &str) -> bool {
    w.chars().any(char::is_lowercase) && !w.chars().any(char::is_uppercase)
}

/// Python's `str.title`: a cased character after an uncased one upper case, others lower.
fn title(w: &str) -> String {
    let mut out = String::new();
    let mut prev_cased = false;
    for c in w.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = cased;
    }
    out
}

/// Why a card value cannot be written: the converter fails on it too.
fn unwritable(key: &str, v: &Y, want: &str) -> String {
    format!(
        "the model card gives `{key}` {}, not {want}; llama.cpp's convert_hf_to_gguf.py fails \
         on it too",
        v.describe()
    )
}

/// `GGUFWriter.add_string`: nothing for a false value (empty, null, 0), else a string.
fn put_text(md: &mut Metadata, key: &str, v: Option<&Y>) -> Result<(), String> {
    match v {
        None => Ok(()),
        Some(v) if !v.truthy() => Ok(()),
        Some(Y::Str(s)) => {
            md.set(key, Value::Text(s.clone()));
            Ok(())
        }
        Some(v) => Err(unwritable(key, v, "text")),
    }
}

/// `GGUFWriter.add_array`: nothing for an empty list, else items of one type (the type of
/// the first: string, bool, int32 or float32).
fn put_array(md: &mut Metadata, key: &str, items: &[Y]) -> Result<(), String> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let mixed = || unwritable(key, &Y::Seq(items.to_vec()), "a list of items of one type");
    let array = match first {
        Y::Str(_) => Array::Text(
            (items.iter())
                .map(|y| match y {
                    Y::Str(s) => Ok(s.clone()),
                    _ => Err(mixed()),
                })
                .collect::<Result<_, _>>()?,
        ),
        Y::Bool(_) => Array::Bool(
            (items.iter())
                .map(|y| match y {
                    Y::Bool(b) => Ok(*b),
                    _ => Err(mixed()),
                })
                .collect::<Result<_, _>>()?,
        ),
        Y::Int(_) => Array::I32(
            (items.iter())
                .map(|y| match y {
                    Y::Int(i) => i32::try_from(*i)
                        .map_err(|_| unwritable(key, y, "an integer in the 32-bit range")),
                    _ => Err(mixed()),
                })
                .collect::<Result<_, _>>()?,
        ),
        Y::Float(_) => Array::F32(
            (items.iter())
                .map(|y| match y {
                    Y::Float(f) => Ok(*f as f32),
                    _ => Err(mixed()),
                })
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(unwritable(key, other, "a string, boolean or number")),
    };
    md.set(key, Value::Array(array));
    Ok(())
}

impl Card {
    /// The keys `set_gguf_meta_model` writes from `general.name` to `general.size_label`:
    /// the card's name (else `default_name`), authorship fields, then the size label (the
    /// card's, else `computed_size_label`).
    pub fn write_names(
        &self,
        md: &mut Metadata,
        default_name: &str,
        computed_size_label: Option<String>,
    ) -> Result<(), String> {
        match &self.name {
            Some(name) => put_text(md, "general.name", Some(name))?,
            None => md.set("general.name", Value::Text(default_name.into())),
        }
        for (key, value) in [
            ("general.author", &self.author),
            ("general.version", &self.version),
            ("general.organization", &self.organization),
            ("general.finetune", &self.finetune),
            ("general.basename", &self.basename),
            ("general.description", &self.description),
        ] {
            put_text(md, key, value.as_ref())?;
        }
        match &self.size_label {
            Some(label) => put_text(md, "general.size_label", Some(label))?,
            None => {
                if let Some(label) = computed_size_label {
                    md.set("general.size_label", Value::Text(label));
                }
            }
        }
        Ok(())
    }

    /// The keys `set_gguf_meta_model` writes after the size label: license, source,
    /// base models, datasets, tags, languages.
    pub fn write_rest(&self, md: &mut Metadata) -> Result<(), String> {
        match &self.license {
            Some(Y::Seq(items)) => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        Y::Str(s) => parts.push(s.as_str()),
                        other => return Err(unwritable("license", other, "text")),
                    }
                }
                put_text(md, "general.license", Some(&Y::Str(parts.join(","))))?;
            }
            other => put_text(md, "general.license", other.as_ref())?,
        }
        for (key, value) in [
            ("general.license.name", &self.license_name),
            ("general.license.link", &self.license_link),
            ("general.source.url", &self.source_url),
            ("general.source.doi", &self.source_doi),
            ("general.source.uuid", &self.source_uuid),
            ("general.source.repo_url", &self.source_repo_url),
        ] {
            put_text(md, key, value.as_ref())?;
        }
        for (what, entries) in [
            ("base_model", &self.base_models),
            ("dataset", &self.datasets),
        ] {
            let Some(entries) = entries else { continue };
            md.set(
                format!("general.{what}.count"),
                Value::U32(entries.len() as u32),
            );
            for (i, entry) in entries.iter().enumerate() {
                for field in [
                    "name",
                    "author",
                    "version",
                    "organization",
                    "description",
                    "url",
                    "doi",
                    "uuid",
                    "repo_url",
                ] {
                    put_text(md, &format!("general.{what}.{i}.{field}"), entry.get(field))?;
                }
            }
        }
        if let Some(tags) = &self.tags {
            put_array(md, "general.tags", tags)?;
        }
        if let Some(languages) = &self.languages {
            put_array(md, "general.languages", languages)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
