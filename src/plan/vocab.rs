//! The vocabulary: which tensors are its input and output embeddings, which of them a tied
//! `lm_head` means, and the one kind of shape change lorafs serves, a resized vocabulary.

use std::path::Path;

use super::build::Planner;
use super::*;

/// Input embeddings, by the last parts of their names: Llama-style `embed_tokens`, GPT-2
/// `wte`, BLOOM / BERT `word_embeddings`, GPT-NeoX `embed_in`.
const INPUT_EMBEDDINGS: [&str; 4] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
];

/// Output embeddings (the LM head): most models' `lm_head`, GPT-NeoX `embed_out`.
const OUTPUT_EMBEDDINGS: [&str; 2] = ["lm_head.weight", "embed_out.weight"];

/// Whether `name` is `suffix` or ends with `.suffix`.
fn named(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}

fn is_input_embedding(name: &str) -> bool {
    INPUT_EMBEDDINGS.iter().any(|s| named(name, s))
}

/// Whether a tensor has one row per token: an input or output embedding, or the tensor a
/// tied `lm_head` stands for.
pub(super) fn is_vocab_tensor(name: &str, tied: &Option<(String, String)>) -> bool {
    is_input_embedding(name)
        || OUTPUT_EMBEDDINGS.iter().any(|s| named(name, s))
        || tied.as_ref().is_some_and(|(_, emb)| emb == name)
}

/// (`lm_head.weight`, input embedding name) when the base ties them and stores only the
/// embedding.
pub(super) fn tied_embedding(base: &BaseModel) -> Option<(String, String)> {
    let tied = base
        .config
        .as_ref()
        .and_then(|c| c.get("tie_word_embeddings"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true);
    let head = "lm_head.weight";
    if !tied || base.tensors.contains_key(head) {
        return None;
    }
    let mut embeddings = base.tensors.keys().filter(|n| is_input_embedding(n));
    let emb = embeddings.next()?.clone();
    if embeddings.next().is_some() {
        return None;
    }
    Some((head.to_string(), emb))
}

impl Planner<'_> {
    /// The vocabulary resize the replacements make, if any: one (old, new) row count for
    /// every tensor that changes shape, and every vocabulary tensor of the base resized with
    /// them (a model whose input and output embeddings disagree cannot be loaded).
    pub(super) fn vocab_resize(&self, adapters: &[Adapter]) -> Result<Option<VocabResize>> {
        let base = self.base;
        let name = |(li, ti): (usize, usize)| &base.layouts[li].tensors[ti].name;
        let rows = |shape: &[usize]| shape.first().copied();
        // (old, new, the first tensor resized)
        let mut resize: Option<(usize, usize, (usize, usize))> = None;
        for (&loc, p) in &self.pending {
            let entry = &base.layouts[loc.0].tensors[loc.1];
            let (Some(old), Some(new)) = (rows(base.shape(loc)), rows(&p.shape)) else {
                continue;
            };
            match resize {
                _ if old == new => {}
                Some((o, n, first)) if (o, n) != (old, new) => {
                    return Err(Error::unsupported(
                        self.replacer(adapters, loc),
                        format!(
                            "`{}` goes from {old} to {new} rows but `{}` from {o} to {n}; a \
                             resized vocabulary has one size",
                            entry.name,
                            name(first)
                        ),
                    ));
                }
                Some(_) => {}
                None => resize = Some((old, new, loc)),
            }
        }
        let Some((old, new, first)) = resize else {
            return Ok(None);
        };
        let mut vocab: Vec<(&String, (usize, usize))> = base
            .tensors
            .iter()
            .filter(|(n, _)| is_vocab_tensor(n, &self.tied_embedding))
            .map(|(n, &loc)| (n, loc))
            .collect();
        vocab.sort();
        for (tensor, loc) in vocab {
            let shape = base.shape(loc);
            let now = self.pending.get(&loc).map_or(shape, |p| p.shape.as_slice());
            if rows(shape) == Some(old) && rows(now) != Some(new) {
                return Err(Error::unsupported(
                    self.replacer(adapters, first),
                    format!(
                        "`{}` is resized from {old} to {new} rows but `{tensor}` keeps {old}: \
                         the input and output embeddings of a resized vocabulary change \
                         together (save both, e.g. save_embedding_layers=True)",
                        name(first)
                    ),
                ));
            }
        }
        Ok(Some(VocabResize {
            base: old,
            merged: new,
        }))
    }

    /// The adapter file that replaced a pending tensor, for messages.
    fn replacer<'b>(&'b self, adapters: &'b [Adapter], loc: (usize, usize)) -> &'b Path {
        match self.pending.get(&loc).and_then(|p| p.replaced.as_ref()) {
            Some(r) => &adapters[r.adapter].file,
            None => &self.base.dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_tensors_by_name() {
        for name in [
            "model.embed_tokens.weight",
            "transformer.wte.weight",
            "wte.weight",
            "transformer.word_embeddings.weight",
            "gpt_neox.embed_in.weight",
            "lm_head.weight",
            "embed_out.weight",
        ] {
            assert!(is_vocab_tensor(name, &None), "{name}");
        }
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "transformer.wpe.weight",
            "model.my_embed_tokens.weight",
            "lm_head.bias",
        ] {
            assert!(!is_vocab_tensor(name, &None), "{name}");
        }
        let tied = Some(("lm_head.weight".to_string(), "shared.weight".to_string()));
        assert!(is_vocab_tensor("shared.weight", &tied));
    }
}
