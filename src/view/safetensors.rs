//! The safetensors format: a view laid out as the base's directory, each safetensors file
//! a header then its tensors, with the JSON files derived from the changes (the shard
//! index, `config.json`).

use std::path::Path;
use std::sync::Arc;

use super::{Format, Segment, Source, VirtualFile};
use crate::baseio::{Identity, SourceFile};
use crate::dtype::DType;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorEntry};
use crate::model::INDEX_FILE;
use crate::plan::{MergePlan, TensorId, WFile};

/// The base's directory, merged: what Hugging Face loaders read.
pub(super) struct Safetensors;

impl Format for Safetensors {
    fn lay_out(&self, engine: &Engine, plan: &MergePlan) -> Result<Vec<VirtualFile>> {
        lay_out(engine, plan)
    }
}

/// Every file of the view over `engine`'s base, sorted by relative path.
fn lay_out(engine: &Engine, plan: &MergePlan) -> Result<Vec<VirtualFile>> {
    let base = &engine.base;
    let mut files = Vec::with_capacity(base.files.len());
    // Change of the safetensors files' data (tensor bytes): a resized tensor changes it.
    let mut data_delta: i64 = 0;
    for (file, source) in base.files.iter().zip(&engine.base_files) {
        let extra = plan.extra_files.get(&file.rel);
        let source = match extra {
            Some(path) => Arc::new(SourceFile::lazy(path, Identity::of_path(path)?)),
            None => source.clone(),
        };
        let mut vf = passthrough(&file.rel, source);
        if let (Some(li), None) = (file.layout, extra) {
            let laid = safetensors_segments(engine, li, plan)?;
            vf.adapted = (laid.segments.iter())
                .any(|s| matches!(s.source, Source::Merged { .. } | Source::Adapter { .. }));
            (vf.segments, vf.size) = (laid.segments, laid.size);
            data_delta = data_delta.checked_add(laid.data_delta).ok_or_else(|| {
                Error::config(
                    &file.path,
                    "the model's size change overflows a 64-bit count",
                )
            })?;
        }
        files.push(vf);
    }
    // Files derived from the changes: the shard index (total_size, and without the tensors
    // left out) when the data's size changes, config.json when the vocabulary, the dtype or
    // the quantization does.
    let dropped: Vec<&str> = (base.quant.iter().flat_map(|q| &q.dropped))
        .map(|&(li, ti)| base.layouts[li].tensors[ti].name.as_str())
        .collect();
    for vf in &mut files {
        let rewritten = if vf.rel == Path::new(INDEX_FILE) && data_delta != 0 {
            Some(rewrite_index(&vf.source.path, data_delta, &dropped)?)
        } else if vf.rel == Path::new("config.json")
            && (plan.vocab.is_some() || plan.dtype.is_some() || base.quant.is_some())
        {
            Some(rewrite_config(
                base.config.clone().unwrap_or_default(),
                plan,
                base.quant.is_some(),
            ))
        } else {
            None
        };
        if let Some(bytes) = rewritten {
            vf.size = bytes.len() as u64;
            vf.segments = vec![Segment {
                start: 0,
                len: vf.size,
                source: Source::Bytes(Arc::from(bytes)),
            }];
        }
    }
    for (rel, path) in &plan.extra_files {
        if !files.iter().any(|f| &f.rel == rel) {
            let source = SourceFile::lazy(path, Identity::of_path(path)?);
            files.push(passthrough(rel, Arc::new(source)));
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
}

/// A safetensors file as segments.
struct Laid {
    segments: Vec<Segment>,
    /// The file's size.
    size: u64,
    /// The change in the size of its data (tensor bytes).
    data_delta: i64,
}

/// The segments of safetensors file `li`: its header, then its tensors in file order, runs
/// of untouched tensors joined into one pass-through segment. When a tensor changes shape
/// or dtype, the header is regenerated and the tensors after it move.
fn safetensors_segments(engine: &Engine, li: usize, plan: &MergePlan) -> Result<Laid> {
    let layout = &engine.base.layouts[li];
    // A quantized base's companion tensors (scales, maps, states) are not served.
    let dropped: Vec<bool> = (0..layout.tensors.len())
        .map(|ti| is_dropped(engine, (li, ti)))
        .collect();
    let (header, ranges) = header_and_ranges(layout, li, plan, &dropped)?;
    let mut segments = vec![Segment {
        start: 0,
        len: header.len() as u64,
        source: Source::Bytes(header),
    }];
    for (ti, (t, &(start, len))) in layout.tensors.iter().zip(&ranges).enumerate() {
        if !dropped[ti] {
            let source = tensor_source(plan, li, ti, t, len);
            push_joined(&mut segments, Segment { start, len, source });
        }
    }
    segments.retain(|s| s.len > 0);
    let data: u64 = ranges.iter().map(|r| r.1).sum();
    let before: u64 = layout.tensors.iter().map(|t| t.len).sum();
    let size = ranges
        .last()
        .map(|&(o, l)| o + l)
        .unwrap_or(segments.first().map_or(0, |s| s.len));
    Ok(Laid {
        segments,
        size,
        data_delta: data as i64 - before as i64,
    })
}

/// The merge of tensor `ti` of safetensors file `li`, if it is merged.
fn merge_of(plan: &MergePlan, li: usize, ti: usize) -> Option<usize> {
    let id = TensorId {
        layout: li,
        tensor: ti,
    };
    plan.merges.binary_search_by_key(&id, |m| m.tensor).ok()
}

/// `--dtype`'s conversion (from, to) of a floating tensor stored as `dtype`, if any.
fn conversion(plan: &MergePlan, dtype: safetensors::Dtype) -> Option<(DType, DType)> {
    let from = DType::from_safetensors(dtype)?;
    plan.dtype.filter(|&to| to != from).map(|to| (from, to))
}

/// Each tensor's (offset, length) in a served safetensors file.
type TensorRanges = Vec<(u64, u64)>;

/// The header file `li` is served with, and each tensor's (offset, length) in it: the
/// base's own where no tensor changes shape or dtype and none is dropped, else a new one.
fn header_and_ranges(
    layout: &Layout,
    li: usize,
    plan: &MergePlan,
    dropped: &[bool],
) -> Result<(Arc<[u8]>, TensorRanges)> {
    // Each tensor's output (shape, dtype): a merge's, or `--dtype` for a floating tensor.
    let (shapes, dtypes): (Vec<Vec<usize>>, Vec<safetensors::Dtype>) = (layout.tensors.iter())
        .enumerate()
        .map(|(ti, t)| match merge_of(plan, li, ti) {
            Some(mi) => (
                plan.merges[mi].shape.clone(),
                plan.merges[mi].dtype.to_safetensors(),
            ),
            None => (
                t.shape.clone(),
                conversion(plan, t.dtype).map_or(t.dtype, |(_, to)| to.to_safetensors()),
            ),
        })
        .unzip();
    let unchanged = !dropped.contains(&true)
        && (layout.tensors.iter().zip(shapes.iter().zip(&dtypes)))
            .all(|(t, (shape, &dtype))| shape == &t.shape && dtype == t.dtype);
    if unchanged {
        let ranges = layout.tensors.iter().map(|t| (t.offset, t.len)).collect();
        return Ok((Arc::from(layout.header.as_slice()), ranges));
    }
    let (header, ranges) = layout.header_with(&shapes, &dtypes, dropped)?;
    Ok((Arc::from(header), ranges))
}

/// Where the `len` bytes served for tensor `t` (number `ti` of file `li`) come from.
fn tensor_source(plan: &MergePlan, li: usize, ti: usize, t: &TensorEntry, len: u64) -> Source {
    match (merge_of(plan, li, ti), conversion(plan, t.dtype)) {
        (Some(merge), _) => {
            let m = &plan.merges[merge];
            debug_assert_eq!(m.bytes(), len);
            match m.w.file {
                WFile::Adapter(adapter) if m.is_plain_copy() => Source::Adapter {
                    adapter,
                    offset: m.w.offset,
                },
                _ => Source::Merged { merge },
            }
        }
        (None, Some((from, to))) => Source::Converted {
            offset: t.offset,
            from,
            to,
        },
        (None, None) => Source::Base { offset: t.offset },
    }
}

/// Whether tensor `loc` of the base is a quantization companion, not served.
fn is_dropped(engine: &Engine, loc: (usize, usize)) -> bool {
    (engine.base.quant.as_ref()).is_some_and(|q| q.dropped.contains(&loc))
}

/// Append `next`, joining it to the last segment when both are base bytes that follow on
/// in the output and in the source.
fn push_joined(segments: &mut Vec<Segment>, next: Segment) {
    if let (
        Source::Base { offset },
        Some(Segment {
            start,
            len,
            source: Source::Base { offset: prev },
        }),
    ) = (&next.source, segments.last_mut())
    {
        if *start + *len == next.start && *prev + *len == *offset {
            *len += next.len;
            return;
        }
    }
    segments.push(next);
}

/// A file served unchanged from `source` (a base file, or an adapter's tokenizer file).
fn passthrough(rel: &Path, source: Arc<SourceFile>) -> VirtualFile {
    let size = source.size();
    VirtualFile {
        rel: rel.to_path_buf(),
        size,
        source,
        segments: vec![Segment {
            start: 0,
            len: size,
            source: Source::Base { offset: 0 },
        }],
        adapted: false,
        inputs: Vec::new(),
    }
}

/// `model.safetensors.index.json` with `metadata.total_size` changed by `delta` bytes and
/// the `dropped` tensors out of its `weight_map`.
fn rewrite_index(path: &Path, delta: i64, dropped: &[&str]) -> Result<Vec<u8>> {
    let mut index: serde_json::Value = crate::error::read_json(path)?;
    if let Some(map) = index.get_mut("weight_map").and_then(|m| m.as_object_mut()) {
        for name in dropped {
            map.remove(*name);
        }
    }
    if let Some(total) = index
        .get_mut("metadata")
        .and_then(|m| m.get_mut("total_size"))
    {
        if let Some(n) = total.as_i64() {
            let sum = n.checked_add(delta).ok_or_else(|| {
                Error::config(
                    path,
                    format!("metadata.total_size {n} overflows when changed by {delta} bytes"),
                )
            })?;
            *total = serde_json::Value::from(sum);
        }
    }
    let mut bytes = serde_json::to_vec_pretty(&index).expect("JSON serializes");
    bytes.push(b'\n');
    Ok(bytes)
}

/// The base's `config.json` with `vocab_size` (top level, and in a `text_config`) set to the
/// merged vocabulary's where it was the base's, and the dtype set to `--dtype`'s: under
/// `dtype`, the key transformers 5 writes, and `torch_dtype` too where the base has it
/// (older transformers read that one). Without `quantization_config` when the base is
/// quantized: the view serves it dequantized.
fn rewrite_config(mut config: serde_json::Value, plan: &MergePlan, dequantized: bool) -> Vec<u8> {
    let set = |v: &mut serde_json::Value| {
        if let (true, Some(object)) = (dequantized, v.as_object_mut()) {
            object.remove("quantization_config");
        }
        if let Some(resize) = plan.vocab {
            if let Some(size) = v.get_mut("vocab_size") {
                if size.as_u64() == Some(resize.base as u64) {
                    *size = serde_json::Value::from(resize.merged);
                }
            }
        }
        if let (Some(dtype), Some(object)) = (plan.dtype, v.as_object_mut()) {
            let name = serde_json::Value::from(dtype.torch_name());
            if object.contains_key("torch_dtype") {
                object.insert("torch_dtype".into(), name.clone());
            }
            object.insert("dtype".into(), name);
        }
    };
    set(&mut config);
    if let Some(text) = config.get_mut("text_config") {
        set(text);
    }
    let mut bytes = serde_json::to_vec_pretty(&config).expect("JSON serializes");
    bytes.push(b'\n');
    bytes
}
