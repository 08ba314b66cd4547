//! Bases quantized with bitsandbytes (QLoRA bases), served dequantized.
//!
//! transformers saves a `Linear4bit` weight as packed 4-bit codes (`X.weight`, uint8) and
//! its quantization state as companion tensors (`X.weight.absmax`, `.quant_map`,
//! `.nested_absmax`, `.nested_quant_map`, and `.quant_state.bitsandbytes__nf4|fp4`, a JSON
//! blob stored as uint8); a `Linear8bitLt` weight as int8 rows (`X.weight`) with one scale
//! per row (`X.SCB`) and `X.weight_format`. lorafs reads such a weight's rows as
//! bitsandbytes dequantizes them, in f32 (see [`dequant`]), so that the deltas are added
//! before the one rounding into the model's dtype, and serves a plain model: the companions
//! dropped from the headers, `quantization_config` dropped from `config.json`.
//!
//! [`scan`] checks every size and field from the headers and the small state tensors
//! (the JSON blob, the nested scales) before anything is allocated; the codes and the
//! per-block scales of a row are read with it ([`read`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

pub mod dequant;
mod read;
mod state;
#[cfg(test)]
mod tests;

pub use dequant::Scheme;

/// The `quantization_config.quant_method` lorafs dequantizes.
pub const BITSANDBYTES: &str = "bitsandbytes";

/// Where some bytes of a base tensor are: the layout (safetensors file) and the absolute
/// offset of its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub layout: usize,
    pub offset: u64,
}

/// The scale of each block of a quantized tensor.
#[derive(Debug, Clone)]
pub enum Scales {
    /// One f32 per block (`absmax`), read with the rows.
    F32(Part),
    /// Double quantization: one 8-bit code per block (`absmax`, read with the rows), whose
    /// value is `code[c] · nested_absmax[block / nested_blocksize] + offset`.
    Nested {
        codes: Part,
        code: Box<[f32; 256]>,
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        offset: f32,
    },
}

/// One quantized weight of the base.
#[derive(Debug, Clone)]
pub struct QuantTensor {
    pub scheme: Scheme,
    /// The weight's shape as the model uses it (the quantization state's `shape`).
    pub shape: Vec<usize>,
    /// The dtype it is dequantized into when no `--dtype` is given: the model's.
    pub dtype: DType,
    /// Values per scale: bitsandbytes' `blocksize` (4-bit), the row length (8-bit).
    pub blocksize: usize,
    /// The codes: packed 4-bit (two per byte, the first in the high nibble) or int8.
    pub codes: Part,
    pub scales: Scales,
}

impl QuantTensor {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The quantization of a base: its quantized weights and the tensors that describe them.
#[derive(Debug, Default)]
pub struct Quantization {
    /// By (layout, tensor) of the weight.
    pub tensors: BTreeMap<(usize, usize), QuantTensor>,
    /// The companion tensors (scales, maps, states), left out of the served files.
    pub dropped: HashSet<(usize, usize)>,
}

impl Quantization {
    /// What `inspect` says of it: each scheme (with double quantization or not) and how
    /// many weights use it.
    pub fn describe(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for q in self.tensors.values() {
            let name = match (q.scheme, &q.scales) {
                (Scheme::Int8, _) => "int8".to_string(),
                (s, Scales::Nested { .. }) => format!("{} (double quantization)", s.name()),
                (s, Scales::F32(_)) => s.name().to_string(),
            };
            *counts.entry(name).or_insert(0) += 1;
        }
        counts.into_iter().collect()
    }
}

/// The base's quantization, from `config.json`'s `quantization_config` and the tensors.
/// `None` for a base without one. Methods other than bitsandbytes are refused by name.
pub(crate) fn scan(
    dir: &Path,
    config: Option<&Value>,
    layouts: &[Layout],
    tensors: &HashMap<String, (usize, usize)>,
) -> Result<Option<Quantization>> {
    let config_path = dir.join("config.json");
    let Some(qc) = config.and_then(|c| c.get("quantization_config")) else {
        return Ok(None);
    };
    let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != BITSANDBYTES {
        let method = if method.is_empty() {
            "an unnamed method"
        } else {
            method
        };
        return Err(Error::unsupported(
            &config_path,
            format!(
                "the base is quantized with {method} (quantization_config.quant_method); lorafs \
                 dequantizes only bitsandbytes bases: use the 16-bit base model instead"
            ),
        ));
    }
    let storage = qc.get("bnb_4bit_quant_storage").and_then(Value::as_str);
    if qc.get("load_in_4bit").and_then(Value::as_bool) == Some(true)
        && storage.is_some_and(|s| s != "uint8")
    {
        return Err(Error::unsupported(
            &config_path,
            format!(
                "bnb_4bit_quant_storage is {:?}; lorafs reads 4-bit codes stored as uint8 (the \
                 default): use the 16-bit base model instead",
                storage.unwrap_or_default()
            ),
        ));
    }
    let model_dtype = state::model_dtype(config, &config_path)?;
    let mut quant = Quantization::default();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if let Some((weight, suffix)) = state::four_bit_state(name) {
            let mut found = state::four_bit(layouts, tensors, weight, name, suffix)?;
            // The model's dtype decides, as for every other weight; the state's (the dtype
            // bitsandbytes dequantizes into) is the same in a model transformers saved.
            found.0.dtype = model_dtype.unwrap_or(found.0.dtype);
            add(&mut quant, tensors, weight, found);
        } else if let Some(module) = name.strip_suffix(".SCB") {
            let weight = format!("{module}.weight");
            let found = state::eight_bit(layouts, tensors, &weight, name, model_dtype)?;
            add(&mut quant, tensors, &weight, found);
        }
    }
    Ok(Some(quant))
}

fn add(
    quant: &mut Quantization,
    tensors: &HashMap<String, (usize, usize)>,
    weight: &str,
    (q, companions): (QuantTensor, Vec<(usize, usize)>),
) {
    quant.tensors.insert(tensors[weight], q);
    quant.dropped.extend(companions);
}

/// A tensor of the base by name: its layout entry and location.
fn entry<'a>(
    layouts: &'a [Layout],
    tensors: &HashMap<String, (usize, usize)>,
    name: &str,
) -> Option<(&'a crate::layout::TensorEntry, (usize, usize))> {
    let &(li, ti) = tensors.get(name)?;
    Some((&layouts[li].tensors[ti], (li, ti)))
}

/// Read a small base tensor whole (its size checked against `cap` by the caller).
fn read_small(layout: &Layout, t: &crate::layout::TensorEntry) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = crate::baseio::open_regular(&layout.path)?;
    let mut buf = vec![0u8; t.len as usize];
    file.read_exact_at(&mut buf, t.offset)
        .map_err(|e| Error::io(&layout.path, e))?;
    Ok(buf)
}
