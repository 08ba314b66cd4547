//! The quantization state of one weight, checked from the headers and the small state
//! tensors: every size and JSON field before anything is allocated from it.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;

use super::{entry, read_small, Part, QuantTensor, Scales, Scheme};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorEntry};

/// The largest quant_state JSON blob read (bitsandbytes' is under 300 bytes).
const MAX_STATE_BYTES: u64 = 1 << 16;
/// bitsandbytes' valid 4-bit blocksizes (`functional.dequantize_4bit`).
const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// `(weight name, "nf4" | "fp4")` for a `X.weight.quant_state.bitsandbytes__nf4` name.
pub(super) fn four_bit_state(name: &str) -> Option<(&str, &str)> {
    let (weight, kind) = name.rsplit_once(".quant_state.bitsandbytes__")?;
    Some((weight, kind))
}

/// The model's dtype from `config.json` (`dtype`, or `torch_dtype` of older transformers).
pub(super) fn model_dtype(config: Option<&Value>, path: &Path) -> Result<Option<DType>> {
    let Some(c) = config else { return Ok(None) };
    let name = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| c.get(*k).and_then(Value::as_str));
    match name {
        None => Ok(None),
        Some(n) => torch_dtype(n)
            .map(Some)
            .ok_or_else(|| Error::config(path, format!("dtype {n:?} is not a float dtype"))),
    }
}

fn torch_dtype(name: &str) -> Option<DType> {
    match name {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// A companion tensor, which must exist with this dtype and number of values.
fn companion<'a>(
    layouts: &'a [Layout],
    tensors: &HashMap<String, (usize, usize)>,
    weight_file: &Path,
    name: &str,
    dtype: Dtype,
    count: usize,
) -> Result<(&'a TensorEntry, (usize, usize))> {
    let (t, loc) = entry(layouts, tensors, name).ok_or_else(|| {
        Error::tensor(weight_file, name, "missing: the quantized weight needs it")
    })?;
    if t.dtype != dtype || t.numel() != count {
        return Err(Error::tensor(
            &layouts[loc.0].path,
            name,
            format!(
                "is {:?} {:?}; the quantization state needs {count} values of {dtype:?}",
                t.dtype, t.shape
            ),
        ));
    }
    Ok((t, loc))
}

fn part(t: &TensorEntry, loc: (usize, usize)) -> Part {
    Part {
        layout: loc.0,
        offset: t.offset,
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    (bytes.chunks_exact(4))
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// A 4-bit weight: its state blob parsed and every companion checked against it.
pub(super) fn four_bit(
    layouts: &[Layout],
    tensors: &HashMap<String, (usize, usize)>,
    weight: &str,
    state_name: &str,
    kind: &str,
) -> Result<(QuantTensor, Vec<(usize, usize)>)> {
    let (st, st_loc) = entry(layouts, tensors, state_name).expect("listed");
    let path = &layouts[st_loc.0].path;
    let bad = |what: String| Error::tensor(path, state_name, what);
    if st.dtype != Dtype::U8 || st.len > MAX_STATE_BYTES {
        return Err(bad(format!(
            "is {:?} of {} bytes; a quant_state is a JSON blob of uint8 under {MAX_STATE_BYTES} bytes",
            st.dtype, st.len
        )));
    }
    let blob: Value = serde_json::from_slice(&read_small(&layouts[st_loc.0], st)?)
        .map_err(|e| bad(format!("is not JSON: {e}")))?;
    let state = FourBitState::parse(&blob, kind, &bad)?;
    let (w, w_loc) = entry(layouts, tensors, weight).ok_or_else(|| {
        bad(format!(
            "names weight `{weight}`, which the base does not have"
        ))
    })?;
    let (shape, numel) = (&state.shape, state.numel);
    if w.dtype != Dtype::U8 || w.numel() != numel.div_ceil(2) {
        return Err(Error::tensor(
            &layouts[w_loc.0].path,
            weight,
            format!(
                "is {:?} {:?}; the 4-bit codes of shape {shape:?} are {} uint8 values",
                w.dtype,
                w.shape,
                numel.div_ceil(2)
            ),
        ));
    }
    let companions = Companions {
        layouts,
        tensors,
        weight,
        weight_file: &layouts[w_loc.0].path,
    };
    let mut dropped = vec![st_loc];
    dropped.push(companions.get("quant_map", Dtype::F32, 16)?.1);
    let blocks = numel.div_ceil(state.blocksize);
    let scales = match state.nested {
        Some(nested) => companions.nested_scales(nested, blocks, &mut dropped)?,
        None => {
            let absmax = companions.get("absmax", Dtype::F32, blocks)?;
            dropped.push(absmax.1);
            Scales::F32(part(absmax.0, absmax.1))
        }
    };
    let q = QuantTensor {
        scheme: state.scheme,
        shape: state.shape,
        dtype: state.dtype,
        blocksize: state.blocksize,
        codes: part(w, w_loc),
        scales,
    };
    Ok((q, dropped))
}

/// The fields of a 4-bit weight's quant_state blob, checked.
struct FourBitState {
    scheme: Scheme,
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    numel: usize,
    /// With double quantization (`nested_*`): its block size and offset.
    nested: Option<(usize, f32)>,
}

impl FourBitState {
    /// The blob of a weight named for quantization `kind` ("nf4" or "fp4"); `bad` makes the
    /// error naming the state tensor.
    fn parse(blob: &Value, kind: &str, bad: &dyn Fn(String) -> Error) -> Result<FourBitState> {
        let field = |k: &str| blob.get(k).ok_or_else(|| bad(format!("has no {k:?}")));
        let scheme = match (kind, field("quant_type")?.as_str()) {
            ("nf4", Some("nf4")) => Scheme::Nf4,
            ("fp4", Some("fp4")) => Scheme::Fp4,
            (k, t) => {
                return Err(bad(format!(
                    "quant_type {t:?} does not match the name's bitsandbytes__{k} (nf4 and fp4 \
                     are dequantized)"
                )))
            }
        };
        let blocksize = (field("blocksize")?.as_u64())
            .and_then(|b| usize::try_from(b).ok())
            .filter(|b| BLOCKSIZES.contains(b))
            .ok_or_else(|| bad(format!("blocksize is not one of {BLOCKSIZES:?}")))?;
        let dtype = (field("dtype")?.as_str())
            .and_then(torch_dtype)
            .ok_or_else(|| bad("dtype is not bfloat16, float16 or float32".into()))?;
        let shape: Vec<usize> = (field("shape")?.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .filter(|s: &Vec<usize>| !s.is_empty())
            .ok_or_else(|| bad("shape is not a list of sizes".into()))?;
        let numel = crate::layout::numel(&shape)
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
        let nested = blob.get("nested_absmax").is_some() || blob.get("nested_blocksize").is_some();
        let nested = match nested {
            false => None,
            true => {
                let blocksize = (field("nested_blocksize")?.as_u64())
                    .and_then(|b| usize::try_from(b).ok())
                    .filter(|b| (1..=4096).contains(b))
                    .ok_or_else(|| bad("nested_blocksize is not in 1..=4096".into()))?;
                if field("nested_dtype")?.as_str() != Some("float32") {
                    return Err(bad("nested_dtype is not float32".into()));
                }
                // bitsandbytes reads it as a Python float and makes an f32 tensor of it.
                let offset = (field("nested_offset")?.as_f64())
                    .map(|o| o as f32)
                    .filter(|o| o.is_finite())
                    .ok_or_else(|| bad("nested_offset is not a finite number".into()))?;
                Some((blocksize, offset))
            }
        };
        Ok(FourBitState {
            scheme,
            blocksize,
            dtype,
            shape,
            numel,
            nested,
        })
    }
}

/// The companion tensors of one quantized weight (`{weight}.absmax`, ...).
struct Companions<'a> {
    layouts: &'a [Layout],
    tensors: &'a HashMap<String, (usize, usize)>,
    weight: &'a str,
    weight_file: &'a Path,
}

impl<'a> Companions<'a> {
    /// `{weight}.{suffix}`, which must exist with this dtype and number of values.
    fn get(
        &self,
        suffix: &str,
        dtype: Dtype,
        count: usize,
    ) -> Result<(&'a TensorEntry, (usize, usize))> {
        let name = format!("{}.{suffix}", self.weight);
        companion(
            self.layouts,
            self.tensors,
            self.weight_file,
            &name,
            dtype,
            count,
        )
    }

    /// Double-quantized scales of `blocks` blocks: u8 codes of the absmax, and the nested
    /// absmax (of `nested` = (block size, offset)) and code book that decode them.
    fn nested_scales(
        &self,
        (nested_blocksize, offset): (usize, f32),
        blocks: usize,
        dropped: &mut Vec<(usize, usize)>,
    ) -> Result<Scales> {
        let codes = self.get("absmax", Dtype::U8, blocks)?;
        let nabs = self.get(
            "nested_absmax",
            Dtype::F32,
            blocks.div_ceil(nested_blocksize),
        )?;
        let ncode = self.get("nested_quant_map", Dtype::F32, 256)?;
        dropped.extend([codes.1, nabs.1, ncode.1]);
        let code: Vec<f32> = f32s(&read_small(&self.layouts[ncode.1 .0], ncode.0)?);
        Ok(Scales::Nested {
            codes: part(codes.0, codes.1),
            code: Box::new(code.try_into().expect("256 values checked")),
            nested_absmax: f32s(&read_small(&self.layouts[nabs.1 .0], nabs.0)?),
            nested_blocksize,
            offset,
        })
    }
}

/// An 8-bit weight: int8 rows, one f32 scale per row (`SCB`), `weight_format` row-major.
pub(super) fn eight_bit(
    layouts: &[Layout],
    tensors: &HashMap<String, (usize, usize)>,
    weight: &str,
    scb_name: &str,
    model_dtype: Option<DType>,
) -> Result<(QuantTensor, Vec<(usize, usize)>)> {
    let (_, scb_loc) = entry(layouts, tensors, scb_name).expect("listed");
    let path = &layouts[scb_loc.0].path;
    let (w, w_loc) = entry(layouts, tensors, weight)
        .ok_or_else(|| Error::tensor(path, scb_name, format!("has no int8 weight `{weight}`")))?;
    let (rows, cols) = match *w.shape.as_slice() {
        [rows, cols] if w.dtype == Dtype::I8 => (rows, cols),
        _ => {
            return Err(Error::tensor(
                &layouts[w_loc.0].path,
                weight,
                format!(
                    "is {:?} {:?}; an 8-bit weight is a 2-D int8 tensor",
                    w.dtype, w.shape
                ),
            ))
        }
    };
    let wpath = &layouts[w_loc.0].path;
    let scb = companion(layouts, tensors, wpath, scb_name, Dtype::F32, rows)
        .map(|(t, loc)| (part(t, loc), loc))?;
    let mut dropped = vec![scb.1];
    let format_name = format!("{}.weight_format", weight.trim_end_matches(".weight"));
    if entry(layouts, tensors, &format_name).is_some() {
        let (t, loc) = companion(layouts, tensors, wpath, &format_name, Dtype::U8, 1)?;
        if read_small(&layouts[loc.0], t)? != [0] {
            return Err(Error::tensor(
                &layouts[loc.0].path,
                &format_name,
                "is not 0 (row-major); only row-major 8-bit weights are dequantized",
            ));
        }
        dropped.push(loc);
    }
    let q = QuantTensor {
        scheme: Scheme::Int8,
        shape: vec![rows, cols],
        // transformers' dequantize() gives f32; the model's dtype is what the base's
        // other weights are in.
        dtype: model_dtype.unwrap_or(DType::F32),
        blocksize: cols,
        codes: part(w, w_loc),
        scales: Scales::F32(scb.0),
    };
    Ok((q, dropped))
}
