//! Merged tensors, computed in blocks of whole rows, each cached under its recipe.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rayon::prelude::*;

use super::{Source, View, VirtualFile};
use crate::cache::Block;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Realized, TensorMerge, TermKind, WFile};

/// Merged blocks hold whole rows, about this many bytes: big enough that per-block overhead
/// (a cache lookup, one `pread`) is small next to the merge, small enough that a 128 KiB
/// kernel readahead or a random `pread` does not compute much it will not use.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Store the token rows of `realized` that fall in the block of rows `row0 ..` held in
/// `data` (as `dtype`).
fn store_token_rows(
    m: &TensorMerge,
    realized: &Realized,
    row0: usize,
    dtype: DType,
    data: &mut [u8],
) {
    let n = data.len() / (m.dims.cols * dtype.size()).max(1);
    for row in &realized.rows {
        if (row0..row0 + n).contains(&row.index) {
            let first = (row.index - row0) * m.dims.cols;
            for (j, &x) in row.values.iter().enumerate() {
                dtype.store(data, first + j, x);
            }
        }
    }
}

/// Bytes of one block of `m` (all blocks but the last of a tensor).
pub(super) fn block_bytes(m: &TensorMerge) -> u64 {
    (block_rows(m) * m.row_bytes()) as u64
}

/// Rows per block of a merged tensor.
pub(super) fn block_rows(m: &TensorMerge) -> usize {
    (BLOCK_BYTES / m.row_bytes().max(1)).max(1)
}

impl View {
    /// Copy bytes `within .. within + out.len()` of merged tensor `merge` into `out`,
    /// computing the blocks it covers (several at once on the thread pool).
    pub(super) fn read_merged(
        &self,
        vf: &VirtualFile,
        merge: usize,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let m = &self.plan.merges[merge];
        let block_bytes = block_bytes(m);
        let first = within / block_bytes;
        let last = (within + out.len() as u64 - 1) / block_bytes;
        let get = |b: u64| self.block(vf, merge, b as usize);
        let blocks: Vec<Block> = if first == last {
            vec![get(first)?]
        } else {
            (first..=last)
                .into_par_iter()
                .map(get)
                .collect::<Result<_>>()?
        };
        let mut done = 0;
        for (b, block) in (first..=last).zip(blocks) {
            let start = (within + done as u64 - b * block_bytes) as usize;
            let n = (block.len() - start).min(out.len() - done);
            out[done..done + n].copy_from_slice(&block[start..start + n]);
            done += n;
        }
        Ok(())
    }

    /// The factors of merge `merge`, from the engine's factor cache or read now. The
    /// adapter files are checked before and after: factors are never taken from a version
    /// other than the one the view was planned from.
    pub(super) fn realized(&self, merge: usize) -> Result<Arc<Realized>> {
        let key = (self.recipes[merge], 0);
        self.engine.factors.get_or_compute(key, || {
            for file in self.adapter_files() {
                file.check()?;
            }
            let realized = self.plan.merges[merge].realize(&self.plan.loaded)?;
            for file in self.adapter_files() {
                file.check()?;
            }
            (self.engine.stats.factors_loaded).fetch_add(1, Ordering::Relaxed);
            Ok(realized)
        })
    }

    /// Block `b` of merged tensor `merge`, from the cache or computed now.
    fn block(&self, vf: &VirtualFile, merge: usize, b: usize) -> Result<Block> {
        let m = &self.plan.merges[merge];
        let blocks = &self.engine.blocks;
        blocks.get_or_compute((self.recipes[merge], b as u32), || {
            // The factors in memory were read from the adapter files: see a change of them
            // now (the base's `W` is checked as it is read).
            for file in self.adapter_files() {
                file.check()?;
            }
            let realized = self.realized(merge)?;
            let rows = block_rows(m);
            let row0 = b * rows;
            let n = rows.min(m.dims.rows - row0);
            let mut data = blocks.buffer(n * m.row_bytes());
            if m.w.quant.is_some() {
                // W dequantized to f32, the deltas added, rounded once.
                let mut raw = vec![0u8; n * m.dims.cols * 4];
                self.read_quantized(m, row0, &mut raw)?;
                self.merge_converting(m, &realized, row0, &raw, &mut data)?;
                return Ok(data);
            }
            if m.w.dtype == m.dtype {
                if self.merge_staged(vf, m, &realized, row0, &mut data)? {
                    return Ok(data);
                }
                self.read_w(vf, m, row0, &mut data)?;
                self.merge_in_place(m, &realized, row0, &mut data)?;
                return Ok(data);
            }
            let mut raw = vec![0u8; n * m.dims.cols * m.w.dtype.size()];
            self.read_w(vf, m, row0, &mut raw)?;
            if self.plan.dtype.is_none() {
                // A replacement stored in another dtype than the base's: PEFT loads it into
                // the base model, rounding it to the base's dtype, and merges after.
                self.engine
                    .kernel
                    .convert(m.w.dtype, &raw, m.dtype, &mut data);
                self.merge_in_place(m, &realized, row0, &mut data)?;
            } else {
                // `--dtype`: the reference is PEFT's merge in f32, cast once at the end.
                self.merge_converting(m, &realized, row0, &raw, &mut data)?;
            }
            Ok(data)
        })
    }

    fn dora_error(&self, m: &TensorMerge, row: usize) -> Error {
        let dora = m.terms.iter().find(|t| t.kind == TermKind::Dora);
        let adapter = dora.map_or(0, |t| t.adapter);
        Error::tensor(
            &self.plan.loaded[adapter].file,
            &m.name,
            format!(
                "row {row}: W + ΔW is all zeros, so DoRA's magnitude / norm is undefined (PEFT \
                 would merge NaN); this adapter does not fit this base"
            ),
        )
    }

    /// Rows `row0 ..` of a merged tensor's `W` (as many as `buf` holds), as stored: from
    /// the base file or from an adapter file (a replaced tensor).
    fn read_w(&self, vf: &VirtualFile, m: &TensorMerge, row0: usize, buf: &mut [u8]) -> Result<()> {
        let w = m.w;
        let at = w.offset + (row0 * m.dims.cols * w.dtype.size()) as u64;
        match w.file {
            WFile::Base => self.read_source(vf, buf, at),
            WFile::Adapter(i) => self.adapter_weights[i].read_exact_at(buf, at, false),
        }
    }

    /// Rows `row0 ..` of a quantized base weight, dequantized into `buf` as f32 (as many
    /// as it holds): only the codes and scales of their blocks are read.
    fn read_quantized(&self, m: &TensorMerge, row0: usize, buf: &mut [u8]) -> Result<()> {
        let base = &self.engine.base;
        let loc = (m.tensor.layout, m.tensor.tensor);
        let q = base
            .quantized(loc)
            .expect("a quantized merge's weight is quantized");
        let files: Vec<&Arc<crate::baseio::SourceFile>> = (base.files.iter())
            .zip(&self.engine.base_files)
            .filter(|(f, _)| f.layout.is_some())
            .map(|(_, s)| s)
            .collect();
        let mut values = vec![0f32; buf.len() / 4];
        q.read(
            &files,
            self.engine.direct_base_reads,
            row0 * m.dims.cols,
            &mut values,
        )?;
        for (chunk, v) in buf.chunks_exact_mut(4).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Merge rows `row0 ..` of `m` into `data` straight from the base bytes read ahead, if
    /// they are (no copy of `W` first); false, with nothing done, where they are not, or
    /// where `W` is changed before the deltas (token rows, DoRA) or not at all.
    fn merge_staged(
        &self,
        vf: &VirtualFile,
        m: &TensorMerge,
        realized: &Realized,
        row0: usize,
        data: &mut [u8],
    ) -> Result<bool> {
        let f = &realized.factors;
        let n = data.len() / m.row_bytes().max(1);
        let tokens = (realized.rows.iter()).any(|r| (row0..row0 + n).contains(&r.index));
        let plain = m.w.file == WFile::Base && realized.dora.is_none() && f.rank > 0 && !tokens;
        if !plain || !self.reads_ahead() {
            return Ok(false);
        }
        let at = m.w.offset + (row0 * m.row_bytes()) as u64;
        let (engine, dtype, len) = (&self.engine, m.dtype, data.len());
        let merge = |w: &[u8]| engine.kernel.merge_into(dtype, w, dtype, data, f, row0);
        Ok((engine.ahead)
            .with_staged(&vf.source, at, len, merge)?
            .is_some())
    }

    /// Merge rows `row0 ..` of `m` into `data`, which holds them in the output dtype, the
    /// dtype `W` is stored in.
    fn merge_in_place(
        &self,
        m: &TensorMerge,
        realized: &Realized,
        row0: usize,
        data: &mut [u8],
    ) -> Result<()> {
        store_token_rows(m, realized, row0, m.dtype, data);
        let f = &realized.factors;
        if let Some(groups) = &realized.dora {
            // DoRA reads `W` from one buffer and writes another; its f32 loop costs far
            // more than this copy.
            let w = data.to_vec();
            crate::dora::merge(m.dtype, &w, m.dtype, data, f, groups, row0)
                .map_err(|row| self.dora_error(m, row))?;
        } else if f.rank > 0 {
            self.engine.kernel.merge(m.dtype, f, row0, data);
        }
        Ok(())
    }

    /// Merge rows `row0 ..` of `m`, `raw` holding `W` as stored, into `data` in the output
    /// dtype: `W` widened exactly, the delta added in f32, rounded once (`--dtype`, or a
    /// replacement stored in another dtype).
    fn merge_converting(
        &self,
        m: &TensorMerge,
        realized: &Realized,
        row0: usize,
        raw: &[u8],
        data: &mut [u8],
    ) -> Result<()> {
        let (kernel, f) = (self.engine.kernel, &realized.factors);
        let n = data.len() / m.row_bytes().max(1);
        let tokens = (realized.rows.iter()).any(|r| (row0..row0 + n).contains(&r.index));
        let wide;
        let (from, w) = if tokens || realized.dora.is_some() {
            // Token rows replace rows of W before the deltas of later adapters are added
            // (and before DoRA's norms): put them into W widened to f32, where their values,
            // rounded to the output dtype, are exact.
            let mut buf = vec![0u8; raw.len() / m.w.dtype.size() * 4];
            kernel.convert(m.w.dtype, raw, DType::F32, &mut buf);
            store_token_rows(m, realized, row0, DType::F32, &mut buf);
            wide = buf;
            (DType::F32, &wide[..])
        } else {
            (m.w.dtype, raw)
        };
        if let Some(groups) = &realized.dora {
            crate::dora::merge(from, w, m.dtype, data, f, groups, row0)
                .map_err(|row| self.dora_error(m, row))?;
        } else if f.rank > 0 {
            kernel.merge_into(from, w, m.dtype, data, f, row0);
        } else {
            kernel.convert(from, w, m.dtype, data);
        }
        Ok(())
    }

    /// Compute, in the background, the merged blocks of `file` in `offset .. offset + len`
    /// that are not cached yet, so that a sequential reader finds them ready. Skipped when
    /// the cache could not hold them anyway.
    pub fn prefetch(self: &Arc<Self>, file: usize, offset: u64, len: u64) {
        let Some(vf) = self.files.get(file) else {
            return;
        };
        let blocks = &self.engine.blocks;
        if len > blocks.budget() as u64 / 4 || offset >= vf.size {
            return;
        }
        for (seg, lo, hi) in vf.segments_in(offset, len) {
            if let Source::Gguf(tensor) = &seg.source {
                // A GGUF tensor's rows come from its source tensor's: prefetch those.
                let (source_offset, source_len) = tensor.source_bytes(lo, hi);
                self.prefetch(tensor.file, source_offset, source_len);
                continue;
            }
            let Source::Merged { merge } = seg.source else {
                continue;
            };
            let block_bytes = block_bytes(&self.plan.merges[merge]);
            for b in lo / block_bytes..hi.div_ceil(block_bytes) {
                if blocks.present_or_pending((self.recipes[merge], b as u32)) {
                    continue;
                }
                let view = Arc::clone(self);
                rayon::spawn(move || {
                    if let Err(err) = view.block(&view.files[file], merge, b as usize) {
                        log::warn!(
                            "prefetch of {} failed: {err}",
                            view.files[file].rel.display()
                        );
                    }
                });
            }
        }
    }
}
