//! The adapter file's tensors sorted by what they are, from their names, dtypes and shapes.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Replacement, Stored};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorEntry};

/// The prefix PEFT puts before module names (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Part {
    A,
    B,
}

/// What an adapter key (prefix removed) means.
enum Role<'a> {
    /// `(module, A or B, embedding LoRA)`.
    Factor(&'a str, Part, bool),
    LoraBias(&'a str),
    Magnitude(&'a str),
    Tokens(&'a str),
    /// A whole base tensor, by its base name.
    Replace(String),
    /// `M.modules_to_save.P` or `M.original_module.P`: the wrapper's own copy and the
    /// original, which PEFT saves beside `M.P` when it saves a resized embedding layer it
    /// also trains whole, and never loads (its loader renames them to parameters that do not
    /// exist). Valid only beside `M.P`, the tensor PEFT loads (by its name here).
    WrapperCopy(String),
}

/// A module's factors as found so far: A and/or B.
#[derive(Default)]
pub(super) struct Halves {
    pub a: Option<Stored>,
    pub b: Option<Stored>,
}

/// Every tensor of the adapter file by role, keyed by module name.
#[derive(Default)]
pub(super) struct Table {
    /// By (module, embedding LoRA).
    pub halves: BTreeMap<(String, bool), Halves>,
    pub lora_biases: BTreeMap<String, Stored>,
    pub magnitudes: BTreeMap<String, Stored>,
    pub token_deltas: BTreeMap<String, Stored>,
    /// In file order, so that messages and `inspect` follow the adapter file.
    pub replacements: Vec<Replacement>,
    pub num_params: usize,
}

impl Table {
    /// Classify every tensor of the adapter's header and check its dtype and number of
    /// dimensions. Two keys with one role for one module (e.g. with and without the PEFT
    /// prefix) are refused rather than one silently winning.
    pub(super) fn classify(file: &Path, layout: &Layout) -> Result<Table> {
        let mut table = Table::default();
        let mut copies = Vec::new();
        for entry in &layout.tensors {
            let key = &entry.name;
            table.num_params = table.num_params.checked_add(entry.numel()).ok_or_else(|| {
                Error::tensor(file, key, "the number of values overflows a 64-bit count")
            })?;
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
            let role = classify(name).ok_or_else(|| unsupported_key(file, key, name))?;
            let what = role_name(&role);
            if let Role::WrapperCopy(target) = role {
                copies.push((key, target));
            } else if let Some(other) = table.add(file, entry, role, what)? {
                return Err(twice(file, key, &other.key, what));
            }
        }
        for (key, target) in copies {
            if !table.replacements.iter().any(|r| r.target == target) {
                return Err(Error::tensor(
                    file,
                    key,
                    format!(
                        "a copy that PEFT saves beside the trained `{target}` (and does not \
                         load), but this adapter has no `{target}`"
                    ),
                ));
            }
        }
        Ok(table)
    }

    /// File `entry` (described as `what`) under its `role`: the tensor already filed under
    /// that role for that module, if any (the caller refuses the pair).
    fn add(
        &mut self,
        file: &Path,
        entry: &TensorEntry,
        role: Role,
        what: &str,
    ) -> Result<Option<Stored>> {
        let key = &entry.name;
        Ok(match role {
            Role::Replace(target) => {
                if let Some(other) = self.replacements.iter().find(|r| r.target == target) {
                    return Err(twice(file, key, &other.key, &format!("`{target}`")));
                }
                self.replacements.push(Replacement {
                    key: key.clone(),
                    target,
                    dtype: entry.dtype,
                    shape: entry.shape.clone(),
                    offset: entry.offset,
                    len: entry.len,
                });
                None
            }
            Role::Factor(module, part, embedding) => {
                if entry.shape.len() > 2 {
                    return Err(convolution(file, entry));
                }
                let factor = stored(file, entry, 2, what)?;
                let halves = (self.halves)
                    .entry((module.to_string(), embedding))
                    .or_default();
                match part {
                    Part::A => halves.a.replace(factor),
                    Part::B => halves.b.replace(factor),
                }
            }
            Role::LoraBias(m) => {
                let bias = stored(file, entry, 1, what)?;
                self.lora_biases.insert(m.to_string(), bias)
            }
            Role::Magnitude(m) => {
                let magnitude = stored(file, entry, 1, what)?;
                self.magnitudes.insert(m.to_string(), magnitude)
            }
            Role::Tokens(m) => {
                let values = stored(file, entry, 2, what)?;
                self.token_deltas.insert(m.to_string(), values)
            }
            // Filed by the caller, which checks them once every tensor is classified.
            Role::WrapperCopy(_) => None,
        })
    }
}

/// The header's description of a factor, bias, magnitude or token rows (`what`), with its
/// dtype and number of dimensions checked.
fn stored(file: &Path, entry: &TensorEntry, dims: usize, what: &str) -> Result<Stored> {
    let key = &entry.name;
    let dtype = DType::from_safetensors(entry.dtype).ok_or_else(|| {
        Error::tensor(
            file,
            key,
            format!(
                "dtype {:?} is not supported (F16, BF16 or F32)",
                entry.dtype
            ),
        )
    })?;
    let shape = &entry.shape;
    let (rows, cols) = match shape[..] {
        [n] if dims == 1 => (1, n),
        [r, c] if dims == 2 => (r, c),
        _ => {
            return Err(Error::tensor(
                file,
                key,
                format!("expected a {dims}-D {what}, found shape {shape:?}"),
            ))
        }
    };
    Ok(Stored {
        key: key.clone(),
        dtype,
        rows,
        cols,
        offset: entry.offset,
    })
}

fn convolution(file: &Path, entry: &TensorEntry) -> Error {
    Error::unsupported(
        file,
        format!(
            "`{}` has shape {:?}: LoRA on a convolution (nn.Conv1d/2d/3d) is not supported by \
             lorafs (and with groups > 1 it cannot be merged as a low-rank delta at all); merge \
             it with PEFT",
            entry.name, entry.shape
        ),
    )
}

/// What a role is, for messages.
fn role_name(role: &Role) -> &'static str {
    match role {
        Role::Factor(_, Part::A, false) => "lora_A",
        Role::Factor(_, Part::B, false) => "lora_B",
        Role::Factor(_, Part::A, true) => "lora_embedding_A",
        Role::Factor(_, Part::B, true) => "lora_embedding_B",
        Role::LoraBias(_) => "lora_B bias",
        Role::Magnitude(_) => "DoRA magnitude",
        Role::Tokens(_) => "trainable tokens delta",
        Role::Replace(_) => "replacement",
        Role::WrapperCopy(_) => "modules_to_save copy",
    }
}

fn twice(file: &Path, key: &str, other: &str, what: &str) -> Error {
    Error::tensor(
        file,
        key,
        format!("`{other}` is already the {what} of this module; an adapter has one of each"),
    )
}

/// Split an adapter key (prefix removed) into module name and role.
fn classify(name: &str) -> Option<Role<'_>> {
    const SUFFIXES: [(&str, Part, bool); 4] = [
        (".lora_A.weight", Part::A, false),
        (".lora_B.weight", Part::B, false),
        (".lora_embedding_A", Part::A, true),
        (".lora_embedding_B", Part::B, true),
    ];
    if let Some(role) = SUFFIXES.iter().find_map(|&(suffix, part, embedding)| {
        name.strip_suffix(suffix)
            .map(|m| Role::Factor(m, part, embedding))
    }) {
        return Some(role);
    }
    if let Some(m) = name.strip_suffix(".lora_B.bias") {
        return Some(Role::LoraBias(m));
    }
    if let Some(m) = name
        .strip_suffix(".lora_magnitude_vector")
        .or_else(|| name.strip_suffix(".lora_magnitude_vector.weight"))
    {
        return Some(Role::Magnitude(m));
    }
    if let Some(m) = name.strip_suffix(".token_adapter.trainable_tokens_delta") {
        return Some(Role::Tokens(m));
    }
    for wrapper in [".modules_to_save.", ".original_module."] {
        if let Some((m, param)) = name.split_once(wrapper) {
            if !param.contains('.') {
                return Some(Role::WrapperCopy(format!("{m}.{param}")));
            }
        }
    }
    // Anything else that still names a LoRA part (another variant's tensors, an adapter
    // name left in the key) is not a plain tensor: refuse rather than replace something.
    if name.contains("lora_") || name.contains("token_adapter") || name.contains("modules_to_save")
    {
        return None;
    }
    // `M.base_layer.weight` replaces `M.weight`; any other key replaces itself.
    for (suffix, to) in [
        (".base_layer.weight", ".weight"),
        (".base_layer.bias", ".bias"),
    ] {
        if let Some(m) = name.strip_suffix(suffix) {
            return Some(Role::Replace(format!("{m}{to}")));
        }
    }
    Some(Role::Replace(name.to_string()))
}

fn unsupported_key(file: &Path, key: &str, name: &str) -> Error {
    let what = if name.contains("lora_magnitude_vector") {
        "a DoRA magnitude vector in a form lorafs does not know".to_string()
    } else {
        format!(
            "unknown adapter key `{name}`: not a LoRA factor (lora_A/lora_B, lora_embedding_A/B), \
             lora_B.bias, DoRA magnitude, trainable tokens delta, or a plain tensor to replace"
        )
    };
    Error::tensor(file, key, what)
}
