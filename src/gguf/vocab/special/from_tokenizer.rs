//! `SpecialVocab._try_load_from_tokenizer_json`: merges, normalizer flags and the
//! post-processor's add-bos/eos/sep from `tokenizer.json`; then the chat template, the
//! add flags and the special tokens of `tokenizer_config.json`.

use super::{get2, in_pair, token_content, truthy_value, Config, SpecialVocab};
use crate::gguf::vocab::tokenizer_json::{Merge, TokenizerJson};
use crate::gguf::vocab::{truthy, Dir, TOKENIZER_CONFIG};
use crate::Result;
use serde_json::{json, Map, Value as Json};

/// The names the post-processor code reads and rewrites (`special_bos`...).
#[derive(Default)]
struct Names {
    bos: Option<Json>,
    cls: Option<Json>,
    eos: Option<Json>,
    sep: Option<Json>,
}

fn opt_truthy(value: &Option<Json>) -> bool {
    value.as_ref().is_some_and(truthy)
}

fn config_truthy(tc: &Config) -> bool {
    tc.as_ref().is_some_and(|m| !m.is_empty())
}

/// `tokenizer_config[key] = value` (only called where the config is truthy).
fn put(tc: &mut Config, key: &str, value: &Option<Json>) {
    if let Some(map) = tc.as_mut() {
        map.insert(key.to_string(), value.clone().unwrap_or(Json::Null));
    }
}

fn non_null(value: Option<&Json>) -> Option<Json> {
    value.filter(|v| !v.is_null()).cloned()
}

/// The `id` of a template piece's `SpecialToken`, if truthy.
fn special_id(piece: Option<&Json>) -> Option<Json> {
    truthy_value(piece.and_then(|p| get2(p, "SpecialToken", "id")))
}

impl SpecialVocab {
    pub(super) fn load_tokenizer_json(&mut self, dir: &Dir) -> Result<()> {
        let file = dir.tokenizer_json()?;
        let tokenizer = match file.as_deref().map(|file| &file.outline) {
            None => None,
            Some(Json::Object(map)) => Some(map),
            Some(_) => return Err(dir.bad("tokenizer.json", "not a JSON object")),
        };
        let mut added_tokens = Vec::new();
        if let (Some(tokenizer), Some(file)) = (tokenizer, file.as_deref()) {
            if self.load_merges {
                self.read_merges(dir, file)?;
            }
            if let Some(normalizer) = tokenizer.get("normalizer").filter(|n| truthy(n)) {
                self.parse_normalizer(normalizer);
            }
            if let Some(Json::Array(list)) = tokenizer.get("added_tokens") {
                added_tokens = list.clone();
            }
        }
        let mut tc: Config = dir.json_object(TOKENIZER_CONFIG)?;
        if let Some(tokenizer) = tokenizer.filter(|t| !t.is_empty()) {
            self.read_post_processor(dir, tokenizer, &mut tc)?;
        }
        let Some(tc) = tc.filter(|m| !m.is_empty()) else {
            return Ok(());
        };
        self.read_chat_template(dir, &tc)?;
        let types = self.types.clone();
        for kind in &types {
            if let Some(Json::Bool(flag)) = tc.get(&format!("add_{kind}_token")) {
                self.set_add_default(kind, *flag);
            }
            let Some(content) = token_content(tc.get(&format!("{kind}_token"))) else {
                continue;
            };
            let id = added_tokens
                .iter()
                .find(|t| t.get("content").and_then(Json::as_str) == Some(content.as_str()))
                .and_then(|t| t.get("id"))
                .cloned()
                .unwrap_or(Json::Null);
            self.set_special_token(dir, "tokenizer.json", kind, &id)?;
        }
        Ok(())
    }

    /// The converter's `_try_load_merges_txt`'s counterpart for `tokenizer.json`: strings as
    /// they are, or (when the first is a pair) the parts of each joined with a space, a space
    /// inside a part written as U+0120, the byte-level BPE's spelling of a space.
    fn read_merges(&mut self, dir: &Dir, file: &TokenizerJson) -> Result<()> {
        let bad = || dir.bad("tokenizer.json", "unknown tokenizer merges format");
        let Some(merges) = file.merges().map_err(|_| bad())? else {
            return Ok(());
        };
        self.merges = match merges.first() {
            None => Vec::new(),
            Some(Merge::Text(_)) => (merges.into_iter())
                .map(|merge| match merge {
                    Merge::Text(text) => Ok(text),
                    Merge::Parts(_) => Err(bad()),
                })
                .collect::<Result<_>>()?,
            Some(Merge::Parts(first)) if first.len() == 2 => (merges.into_iter())
                .map(|merge| match merge {
                    Merge::Parts(parts) => Ok(parts
                        .iter()
                        .map(|part| part.replace(' ', "\u{120}"))
                        .collect::<Vec<_>>()
                        .join(" ")),
                    Merge::Text(_) => Err(bad()),
                })
                .collect::<Result<_>>()?,
            Some(Merge::Parts(_)) => return Err(bad()),
        };
        Ok(())
    }

    fn parse_normalizer(&mut self, normalizer: &Json) {
        match normalizer.get("type").and_then(Json::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = normalizer.get("lowercase") {
                    self.lowercase = Some(truthy(v));
                }
                if let Some(v) = normalizer.get("strip_accents") {
                    self.strip_accents = Some(truthy(v));
                }
            }
            Some("Sequence") => {
                if let Some(Json::Array(list)) = normalizer.get("normalizers") {
                    for inner in list {
                        self.parse_normalizer(inner);
                    }
                }
            }
            _ => {}
        }
    }

    fn read_post_processor(
        &mut self,
        dir: &Dir,
        tokenizer: &Map<String, Json>,
        tc: &mut Config,
    ) -> Result<()> {
        let get = |tc: &Config, key: &str| non_null(tc.as_ref().and_then(|m| m.get(key)));
        let mut n = Names {
            bos: get(tc, "bos_token"),
            cls: get(tc, "cls_token"),
            eos: get(tc, "eos_token"),
            sep: get(tc, "sep_token"),
        };
        if !opt_truthy(&n.bos) && opt_truthy(&n.cls) && config_truthy(tc) {
            n.bos = n.cls.clone();
            put(tc, "bos_token", &n.bos);
        }
        if !opt_truthy(&n.eos) && opt_truthy(&n.sep) && config_truthy(tc) {
            n.eos = n.sep.clone();
            put(tc, "eos_token", &n.eos);
        }
        let Some(post) = tokenizer.get("post_processor").filter(|p| truthy(p)) else {
            return Ok(());
        };
        let processors = match post.get("processors") {
            None => vec![post.clone()],
            Some(Json::Array(list)) => list.clone(),
            Some(_) => {
                return Err(dir.bad("tokenizer.json", "post_processor.processors is not a list"))
            }
        };
        for processor in &processors {
            match processor.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    self.set_add_default("bos", false);
                    self.set_add_default("eos", false);
                }
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                    if !opt_truthy(&n.cls) && config_truthy(tc) {
                        n.cls = first_of(processor.get("cls"), &n.bos);
                        put(tc, "cls_token", &n.cls);
                    }
                    if !opt_truthy(&n.sep) && config_truthy(tc) {
                        n.sep = first_of(processor.get("sep"), &n.eos);
                        put(tc, "sep_token", &n.sep);
                    }
                }
                Some("TemplateProcessing") => self.read_template(processor, &mut n, tc),
                _ => {}
            }
        }
        Ok(())
    }

    /// The converter's "crude parsing of TemplateProcessing".
    fn read_template(&mut self, processor: &Json, n: &mut Names, tc: &mut Config) {
        let list = |key: &str| match processor.get(key) {
            Some(Json::Array(list)) => list.clone(),
            _ => Vec::new(),
        };
        let single = list("single");
        let (mut first, mut last) = (None, None);
        if single.len() > 1 {
            first = special_id(single.first());
            if let Some(f) = &first {
                self.template_first(f, n, tc);
            }
            last = special_id(single.last());
            if let Some(l) = &last {
                self.template_last(l, n, tc);
            }
        }
        self.template_pair(&list("pair"), first, last, n, tc);
    }

    /// The special token that starts the template's single sequence: the BOS (or CLS), and
    /// whether it is added.
    fn template_first(&mut self, f: &Json, n: &mut Names, tc: &mut Config) {
        if !config_truthy(tc) {
            n.bos = Some(f.clone());
        } else if !in_pair(f, &n.bos, &n.cls) {
            if !opt_truthy(&n.bos) {
                n.bos = Some(f.clone());
                put(tc, "bos_token", &n.bos);
            }
            if !opt_truthy(&n.cls) {
                n.cls = Some(f.clone());
                put(tc, "cls_token", &n.cls);
            }
        }
        let flag = in_pair(f, &n.bos, &n.cls);
        self.set_add("bos", flag);
    }

    /// The special token that ends the template's single sequence: the EOS (the one it
    /// replaces kept as EOT or EOM), and whether it is added.
    fn template_last(&mut self, l: &Json, n: &mut Names, tc: &mut Config) {
        if !config_truthy(tc) {
            n.eos = Some(l.clone());
        } else if n.eos.as_ref() != Some(l) {
            if !self.types.iter().any(|t| t == "eot") {
                self.types.push("eot".into());
                put(tc, "eot_token", &n.eos);
            } else if !self.types.iter().any(|t| t == "eom") {
                self.types.push("eom".into());
                put(tc, "eom_token", &n.eos);
            }
            n.eos = Some(l.clone());
            put(tc, "eos_token", &n.eos);
        }
        let flag = n.eos.as_ref() == Some(l);
        self.set_add("eos", flag);
    }

    /// Whether a separator is added, from the template's pair of sequences (`first` and
    /// `last` the single sequence's special tokens, stripped from its ends).
    fn template_pair(
        &mut self,
        pair: &[Json],
        first: Option<Json>,
        last: Option<Json>,
        n: &mut Names,
        tc: &mut Config,
    ) {
        let piece_id = |p: Option<&Json>| p.and_then(|p| get2(p, "SpecialToken", "id")).cloned();
        let start = usize::from(first.is_some() && piece_id(pair.first()) == first);
        let stop_last = last.is_some() && piece_id(pair.last()) == last;
        let end = pair.len() - usize::from(stop_last);
        let pair = if start < end {
            &pair[start..end]
        } else {
            &[][..]
        };
        let seq = |p: Option<&Json>| p.and_then(|p| get2(p, "Sequence", "id")).cloned();
        let (a, b) = (seq(pair.first()), seq(pair.last()));
        if a != Some(Json::from("A")) || b != Some(Json::from("B")) || pair.len() < 3 {
            return;
        }
        let middle = &pair[1..pair.len() - 1];
        let mut add_sep = false;
        if let Some(entry) = special_id(middle.first()) {
            if in_pair(&entry, &n.sep, &n.eos) && last.is_none() {
                add_sep = true;
            }
        }
        if middle.len() == 2 {
            if let Some(entry) = special_id(middle.get(1)) {
                if in_pair(&entry, &n.sep, &n.eos) {
                    add_sep = true;
                }
            }
        }
        self.set_add("sep", add_sep);
        if add_sep && !opt_truthy(&n.sep) && config_truthy(tc) {
            put(tc, "sep_token", &n.eos.clone());
        }
    }

    fn read_chat_template(&mut self, dir: &Dir, tc: &Map<String, Json>) -> Result<()> {
        let mut alternative = Json::Null;
        if let Some(bytes) = dir.read("chat_template.jinja")? {
            let text = String::from_utf8(bytes)
                .map_err(|_| dir.bad("chat_template.jinja", "not UTF-8"))?;
            alternative = Json::String(universal_newlines(text));
            let extra = additional_templates(dir)?;
            if !extra.is_empty() {
                let mut list = vec![json!({"name": "default", "template": alternative})];
                list.extend(extra);
                alternative = Json::Array(list);
            }
        } else if let Some(json) = dir.json("chat_template.json")? {
            alternative = json.get("chat_template").cloned().unwrap_or(Json::Null);
        }
        let template = tc.get("chat_template").cloned().unwrap_or(alternative);
        if matches!(template, Json::String(_) | Json::Array(_)) {
            self.chat_template = Some(template);
        }
        Ok(())
    }
}

/// Python reads text files with universal newlines.
fn universal_newlines(text: String) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// `additional_chat_templates/*.jinja` as `{name: stem, template}`. The converter takes them
/// in the directory's listing order, which no file system fixes; lorafs sorts them by name.
fn additional_templates(dir: &Dir) -> Result<Vec<Json>> {
    const SUBDIR: &str = "additional_chat_templates";
    let mut names: Vec<String> = dir
        .files
        .list(SUBDIR)?
        .into_iter()
        .filter(|n| n.ends_with(".jinja") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut templates = Vec::new();
    for name in names {
        let file = format!("{SUBDIR}/{name}");
        let Some(bytes) = dir.read(&file)? else {
            continue;
        };
        let text = String::from_utf8(bytes).map_err(|_| dir.bad(&file, "not UTF-8"))?;
        let stem = &name[..name.len() - ".jinja".len()];
        templates.push(json!({"name": stem, "template": universal_newlines(text)}));
    }
    Ok(templates)
}

/// `processor.get(key, [default])[0]`.
fn first_of(value: Option<&Json>, default: &Option<Json>) -> Option<Json> {
    match value {
        None => default.clone(),
        Some(v) => non_null(v.get(0)),
    }
}
