//! The GGUF format: a view's merged model as one `.gguf` file (see [`crate::gguf`]), each
//! tensor's data computed, row by row, from the bytes the view serves for that tensor in its
//! safetensors files. The GGUF file is thus exactly the converter's output on a
//! materialized copy: the same stored values, encoded as the converter encodes them.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{GgufFile, Segment, Source, View, VirtualFile};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gguf::arch::{self, Permute, SourceTensor, TensorData};
use crate::gguf::header::{self, TensorInfo};
use crate::gguf::{encode, vocab, GgmlType, ModelFiles, OutType};

/// Output rows are computed this many bytes at a time.
const CHUNK_BYTES: u64 = 1 << 20;
/// A model file the header is built from (config, tokenizer) larger than this is refused.
const MAX_MODEL_FILE: u64 = 1 << 30;
/// A safetensors header larger than this is refused (the layout checked it already).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Where each source tensor of a view is, by name: its file (index in the view), offset and
/// dtype.
type Locations = std::collections::HashMap<String, (usize, u64, DType)>;

/// Where a GGUF tensor's rows come from: a tensor of one of the view's safetensors files.
#[derive(Debug)]
pub(super) struct GgufTensor {
    /// The view file holding the source tensor, and the offset of its data there.
    pub(super) file: usize,
    offset: u64,
    dtype: DType,
    rows: u64,
    cols: u64,
    ty: GgmlType,
    /// Llama's Q/K row permutation, if the converter applies it to this tensor.
    permute: Option<Permute>,
}

impl GgufTensor {
    /// Whether the GGUF type is the source's dtype: widening to f32 and encoding back is
    /// exact, so the bytes are the stored ones.
    fn is_stored_as_is(&self) -> bool {
        matches!(
            (self.dtype, self.ty),
            (DType::F32, GgmlType::F32)
                | (DType::F16, GgmlType::F16)
                | (DType::BF16, GgmlType::Bf16)
        )
    }

    /// The source row of output row `r`.
    fn source_row(&self, r: u64) -> u64 {
        match self.permute {
            None => r,
            Some(p) => p.source_row(r, self.rows),
        }
    }

    /// The view file bytes (offset in file `self.file`, length) that bytes `lo .. hi` of
    /// this tensor's data are computed from.
    pub(super) fn source_bytes(&self, lo: u64, hi: u64) -> (u64, u64) {
        let row_bytes = self.ty.row_bytes(self.cols);
        let first = lo / row_bytes;
        let (s_lo, s_hi) = self.source_span(first, hi.div_ceil(row_bytes) - first);
        let src_row = self.cols * self.dtype.size() as u64;
        (self.offset + s_lo * src_row, (s_hi - s_lo) * src_row)
    }

    /// The source rows `lo .. hi` that output rows `row0 .. row0 + n` are made from.
    fn source_span(&self, row0: u64, n: u64) -> (u64, u64) {
        // The permutation moves rows only within a head's rows.
        match self.permute {
            None => (row0, row0 + n),
            Some(p) => {
                let d = self.rows / p.heads;
                (row0 / d * d, (row0 + n).div_ceil(d) * d)
            }
        }
    }
}

/// The view's files, read through the view (so a rewritten `config.json` or an adapter's
/// tokenizer is what the header is built from), remembering which were read.
struct ViewFiles<'a> {
    view: &'a View,
    used: RefCell<Vec<usize>>,
}

impl ModelFiles for ViewFiles<'_> {
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(i) = self
            .view
            .files
            .iter()
            .position(|f| f.rel == Path::new(name))
        else {
            return Ok(None);
        };
        let vf = &self.view.files[i];
        if vf.size > MAX_MODEL_FILE {
            return Err(Error::config(
                vf.source_path(),
                "too large for a model file",
            ));
        }
        self.used.borrow_mut().push(i);
        Ok(Some(self.view.read_whole(i, 0, vf.size)?))
    }

    fn read_capped(&self, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        let big = (self.view.files.iter()).find(|f| f.rel == Path::new(name) && f.size > cap);
        if let Some(vf) = big {
            return Err(crate::gguf::too_large(vf.source_path().to_path_buf(), cap));
        }
        self.read(name)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let dir = Path::new(dir);
        Ok((self.view.files.iter())
            .filter(|f| f.rel.parent() == Some(dir))
            .filter_map(|f| f.rel.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn root(&self) -> &Path {
        self.view.base_dir()
    }
}

impl View {
    /// Add `model-TYPE.gguf` for each of `types` to the view's files.
    pub fn add_gguf(&mut self, types: &[OutType]) -> Result<()> {
        let name = self.gguf_name();
        for &out in types {
            let (vf, architecture, tensors) = self.gguf_file(out, &name)?;
            self.gguf.push(GgufFile {
                rel: vf.rel.clone(),
                out,
                architecture,
                tensors,
                bytes: vf.size,
            });
            self.files.push(vf);
        }
        Ok(())
    }

    /// The model name a GGUF header gives (`general.name` and the keys derived from it):
    /// the base directory's name, as the converter takes its input directory's.
    fn gguf_name(&self) -> String {
        let dir = self.base_dir();
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        (dir.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Bytes `offset .. offset + len` of view file `file`, all of them.
    fn read_whole(&self, file: usize, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let n = self.read_file(file, offset, &mut buf, false)?;
        if n != buf.len() {
            let path = self.files[file].source_path();
            return Err(Error::config(path, "ended before its header said"));
        }
        Ok(buf)
    }

    /// The GGUF file of type `out`, its architecture and its tensor count.
    fn gguf_file(&self, out: OutType, name: &str) -> Result<(VirtualFile, String, usize)> {
        let files = ViewFiles {
            view: self,
            used: RefCell::new(Vec::new()),
        };
        let parts = weight_files(&files)?;
        let (sources, locations) = self.source_tensors(&parts)?;
        let plan = arch::plan(&files, &sources, out, name)?;
        let config = files.read("config.json")?.unwrap_or_default();
        let config: serde_json::Value =
            serde_json::from_slice(&config).map_err(|e| Error::Json {
                path: self.base_dir().join("config.json"),
                source: e,
            })?;
        let mut metadata = plan.metadata;
        vocab::vocab_metadata(&files, &config, plan.vocab, &mut metadata)?;
        let (infos, data) = self.gguf_tensors(plan.tensors, &locations)?;
        let layout = header::build(&metadata, &infos);
        let segments = gguf_segments(layout.bytes, &layout.offsets, layout.size, &infos, data);
        let mut used = files.used.into_inner();
        used.extend(locations.values().map(|&(file, _, _)| file));
        used.sort_unstable();
        used.dedup();
        let architecture = match metadata.get("general.architecture") {
            Some(crate::gguf::Value::Text(arch)) => arch.clone(),
            _ => String::new(),
        };
        let vf = self.gguf_virtual_file(out, used, segments, layout.size);
        Ok((vf, architecture, infos.len()))
    }

    /// The planned tensors' entries in the header, and where each one's bytes come from:
    /// values computed at planning, or a source tensor of the view re-encoded by rows.
    fn gguf_tensors(
        &self,
        planned: Vec<arch::PlannedTensor>,
        locations: &Locations,
    ) -> Result<(Vec<TensorInfo>, Vec<Source>)> {
        let mut infos = Vec::with_capacity(planned.len());
        let mut data = Vec::with_capacity(planned.len());
        for t in planned {
            let info = TensorInfo {
                name: t.name,
                shape: t.shape,
                ty: t.ty,
            };
            data.push(match t.data {
                TensorData::Computed(values) => Source::Bytes(encoded(t.ty, &values).into()),
                TensorData::Model { source, permute } => {
                    let &(file, offset, dtype) = locations.get(&source).ok_or_else(|| {
                        Error::config(self.base_dir(), format!("no tensor `{source}`"))
                    })?;
                    let (rows, cols) = row_layout(&info, permute);
                    Source::Gguf(Arc::new(GgufTensor {
                        file,
                        offset,
                        dtype,
                        rows,
                        cols,
                        ty: t.ty,
                        permute,
                    }))
                }
            });
            infos.push(info);
        }
        Ok((infos, data))
    }

    /// The virtual file of a laid-out GGUF: it is served as its first safetensors file is
    /// (owner, permissions), and only to those who may read every file it is made from.
    fn gguf_virtual_file(
        &self,
        out: OutType,
        used: Vec<usize>,
        segments: Vec<Segment>,
        size: u64,
    ) -> VirtualFile {
        let is_weights = |&i: &usize| self.files[i].rel.extension() == Some("safetensors".as_ref());
        let first = used.iter().copied().find(is_weights).unwrap_or(used[0]);
        VirtualFile {
            rel: PathBuf::from(format!("model-{}.gguf", out.name())),
            size,
            source: self.files[first].source.clone(),
            segments,
            adapted: used.iter().any(|&i| self.files[i].adapted),
            inputs: (used.iter())
                .filter(|&&i| i != first)
                .map(|&i| self.files[i].source.clone())
                .collect(),
        }
    }

    /// Every tensor of the view's safetensors files (from the headers the view serves), and
    /// where each one's data is: `(file, offset, dtype)`.
    #[allow(clippy::type_complexity)]
    fn source_tensors(&self, parts: &[String]) -> Result<(Vec<SourceTensor>, Locations)> {
        let mut tensors = Vec::new();
        let mut locations = std::collections::HashMap::new();
        for (i, vf) in self.files.iter().enumerate() {
            let rel = vf.rel.to_string_lossy();
            if !parts.iter().any(|p| *p == rel) || vf.size < 8 {
                continue;
            }
            let n = u64::from_le_bytes(self.read_whole(i, 0, 8)?.try_into().expect("8 bytes"));
            if n > MAX_SAFETENSORS_HEADER || 8 + n > vf.size {
                return Err(Error::BadSafetensors {
                    path: vf.source_path().to_owned(),
                    what: format!("header of {n} bytes"),
                });
            }
            let json = self.read_whole(i, 8, n)?;
            let bad = |what: String| Error::BadSafetensors {
                path: vf.source_path().to_owned(),
                what,
            };
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
            for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
                let entry: TensorEntry = serde_json::from_value(info.clone())
                    .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                // A tensor of another dtype (integer buffers) is not listed: a plan that
                // needs it is refused as naming a tensor the model does not have.
                let Some(dtype) = entry.dtype() else { continue };
                locations.insert(name.clone(), (i, 8 + n + entry.data_offsets[0], dtype));
                tensors.push(SourceTensor {
                    name: name.clone(),
                    shape: entry.shape,
                    dtype,
                    part: vf.rel.to_string_lossy().into_owned(),
                });
            }
        }
        Ok((tensors, locations))
    }

    /// Bytes `within ..` of a GGUF tensor's data, computed from the rows they cover.
    pub(super) fn read_gguf(&self, t: &GgufTensor, within: u64, out: &mut [u8]) -> Result<()> {
        if t.permute.is_none() && t.is_stored_as_is() {
            // The bytes are the source tensor's, at the same offsets: read them in place.
            let n = self.read_file(t.file, t.offset + within, out, false)?;
            if n != out.len() {
                let path = self.files[t.file].source_path();
                return Err(Error::config(path, "ended before its header said"));
            }
            return Ok(());
        }
        let row_bytes = t.ty.row_bytes(t.cols);
        let first = within / row_bytes;
        let end = (within + out.len() as u64).div_ceil(row_bytes);
        let chunk = (CHUNK_BYTES / row_bytes).max(1);
        let (mut row, mut done) = (first, 0usize);
        while row < end {
            let n = chunk.min(end - row);
            let skip = if row == first {
                (within - first * row_bytes) as usize
            } else {
                0
            };
            let len = (n * row_bytes) as usize;
            let take = (len - skip).min(out.len() - done);
            if skip == 0 && take == len {
                // Whole rows: encoded straight into the reply.
                self.gguf_rows(t, row, &mut out[done..done + len])?;
            } else {
                let mut rows = vec![0u8; len];
                self.gguf_rows(t, row, &mut rows)?;
                out[done..done + take].copy_from_slice(&rows[skip..skip + take]);
            }
            done += take;
            row += n;
        }
        Ok(())
    }

    /// Output rows `row0 ..` of a GGUF tensor, encoded into `out` (as many rows as it holds).
    fn gguf_rows(&self, t: &GgufTensor, row0: u64, out: &mut [u8]) -> Result<()> {
        let row_bytes = t.ty.row_bytes(t.cols) as usize;
        let n = (out.len() / row_bytes) as u64;
        let (lo, hi) = t.source_span(row0, n);
        let src_row = t.cols * t.dtype.size() as u64;
        let raw = self.read_whole(t.file, t.offset + lo * src_row, (hi - lo) * src_row)?;
        // A float type is the kernel's conversion: widened exactly, rounded to nearest even as
        // numpy's astype and `encode` do, a NaN made the kernels' one quiet NaN (which
        // `encode` keeps as it is); a tensor already in that dtype is copied as it is.
        let float = match t.ty {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::Bf16 => Some(DType::BF16),
            GgmlType::Q8_0 => None,
        };
        let quantized = float.is_none();
        let mut wide = vec![0u8; if quantized { t.cols as usize * 4 } else { 0 }];
        let mut values = vec![0f32; if quantized { t.cols as usize } else { 0 }];
        let kernel = self.engine.kernel;
        for (k, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
            let s = (t.source_row(row0 + k as u64) - lo) as usize;
            let src = &raw[s * src_row as usize..(s + 1) * src_row as usize];
            match float {
                Some(dtype) if dtype == t.dtype => dst.copy_from_slice(src),
                Some(dtype) => kernel.convert(t.dtype, src, dtype, dst),
                None => {
                    kernel.convert(t.dtype, src, DType::F32, &mut wide);
                    for (v, b) in values.iter_mut().zip(wide.chunks_exact(4)) {
                        *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                    encode::encode(t.ty, &values, dst);
                }
            }
        }
        Ok(())
    }
}

/// A GGUF file's segments: its header (`header`, whose tensor data starts at `offsets`, the
/// file `size` bytes long), then each tensor's bytes from `data`, each followed by the zeros
/// that align the next.
fn gguf_segments(
    header: Vec<u8>,
    offsets: &[u64],
    size: u64,
    infos: &[TensorInfo],
    data: Vec<Source>,
) -> Vec<Segment> {
    let mut segments = vec![Segment {
        start: 0,
        len: header.len() as u64,
        source: Source::Bytes(header.into()),
    }];
    for (k, (info, source)) in infos.iter().zip(data).enumerate() {
        let start = offsets[k];
        let end = offsets.get(k + 1).copied().unwrap_or(size);
        segments.push(Segment {
            start,
            len: info.bytes(),
            source,
        });
        if end > start + info.bytes() {
            let pad = vec![0u8; (end - start - info.bytes()) as usize];
            segments.push(Segment {
                start: start + info.bytes(),
                len: pad.len() as u64,
                source: Source::Bytes(pad.into()),
            });
        }
    }
    segments
}

/// The safetensors files the converter reads: those the shard index names, or without one
/// the top-level `model*.safetensors` (a Mistral repository's `consolidated.safetensors`
/// beside them is another copy of the same weights).
fn weight_files(files: &ViewFiles) -> Result<Vec<String>> {
    if let Some(index) = files.read(crate::model::INDEX_FILE)? {
        let path = files.root().join(crate::model::INDEX_FILE);
        let index: serde_json::Value =
            serde_json::from_slice(&index).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        let map = (index.get("weight_map").and_then(|m| m.as_object()))
            .ok_or_else(|| Error::config(&path, "has no weight_map"))?;
        let mut parts: Vec<String> = (map.values())
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        parts.sort();
        parts.dedup();
        return Ok(parts);
    }
    let view = files.view;
    Ok((view.files.iter())
        .map(|f| f.rel.to_string_lossy().into_owned())
        .filter(|rel| {
            !rel.contains('/') && rel.starts_with("model") && rel.ends_with(".safetensors")
        })
        .collect())
}

/// The (rows, columns) a GGUF tensor's data is computed in. A permuted 1-D tensor (Llama's
/// `q_proj`/`k_proj` biases) has its elements moved as the rows of a weight are: it is served
/// as rows of one element (F32, as every 1-D tensor is, so the bytes are the same).
fn row_layout(info: &TensorInfo, permute: Option<Permute>) -> (u64, u64) {
    match (permute, info.shape.as_slice()) {
        (Some(_), &[n]) if info.ty == GgmlType::F32 => (n, 1),
        _ => (info.rows(), info.cols()),
    }
}

/// `values` encoded as `ty` (a computed tensor such as `rope_freqs`).
fn encoded(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(values.len() as u64) as usize];
    encode::encode(ty, values, &mut out);
    out
}

/// A tensor entry of a safetensors header.
#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

impl TensorEntry {
    fn dtype(&self) -> Option<DType> {
        match self.dtype.as_str() {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<u64>, ty: GgmlType, permute: Option<Permute>) -> GgufTensor {
        let info = TensorInfo {
            name: "t".into(),
            shape,
            ty,
        };
        let (rows, cols) = row_layout(&info, permute);
        GgufTensor {
            file: 0,
            offset: 0,
            dtype: DType::BF16,
            rows,
            cols,
            ty,
            permute,
        }
    }

    #[test]
    fn a_permuted_bias_is_permuted_element_by_element() {
        // q_proj.bias of 4 heads of 4: each head's two halves interleaved, as the weight's rows.
        let p = Some(Permute { heads: 4 });
        let bias = tensor(vec![16], GgmlType::F32, p);
        assert_eq!((bias.rows, bias.cols), (16, 1));
        let order: Vec<u64> = (0..16).map(|r| bias.source_row(r)).collect();
        assert_eq!(
            order,
            [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15]
        );
        // Element 5 (bytes 20..24) comes from the second head's elements.
        assert_eq!(bias.source_span(5, 1), (4, 8));
        assert_eq!(bias.source_bytes(20, 24), (8, 8));
        // A weight keeps its rows; an unpermuted bias is one row.
        let weight = tensor(vec![16, 8], GgmlType::F16, p);
        assert_eq!((weight.rows, weight.cols), (16, 8));
        let plain = tensor(vec![16], GgmlType::F32, None);
        assert_eq!((plain.rows, plain.cols), (1, 16));
    }
}
