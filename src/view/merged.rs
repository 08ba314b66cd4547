//! Merged tensors, computed in blocks of whole rows, each cached under its recipe.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rayon::prelude::*;

use super::{Source, View, VirtualFile};
use crate::cache::Block;
use crate::error::{Error, Result};
use crate::plan::{Realized, TensorMerge, TermKind, WFile};

/// Merged blocks hold whole rows, about this many bytes: big enough that per-block overhead
/// (a cache lookup, one `pread`) is small next to the merge, small enough that a 128 KiB
/// kernel readahead or a random `pread` does not compute much it will not use.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Bytes of one block of `m` (all blocks but the last of a tensor).
fn block_bytes(m: &TensorMerge) -> u64 {
    (block_rows(m) * m.row_bytes()) as u64
}

/// Rows per block of a merged tensor.
fn block_rows(m: &TensorMerge) -> usize {
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
            self.read_w(vf, m, row0, &mut data)?;
            for row in &realized.rows {
                if (row0..row0 + n).contains(&row.index) {
                    let first = (row.index - row0) * m.dims.cols;
                    for (j, &x) in row.values.iter().enumerate() {
                        m.dtype.store(&mut data, first + j, x);
                    }
                }
            }
            let f = &realized.factors;
            if let Some(groups) = &realized.dora {
                crate::dora::merge(m.dtype, f, groups, row0, &mut data)
                    .map_err(|row| self.dora_error(m, row))?;
            } else if f.rank > 0 {
                self.engine.kernel.merge(m.dtype, f, row0, &mut data);
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

    /// Rows `row0 ..` of a merged tensor's `W` (as many as `data` holds), in its output
    /// dtype, from the base file or from an adapter file (a replaced tensor), converted
    /// (rounded to nearest even) when the stored dtype differs.
    fn read_w(
        &self,
        vf: &VirtualFile,
        m: &TensorMerge,
        row0: usize,
        data: &mut [u8],
    ) -> Result<()> {
        let w = m.w;
        let at = w.offset + (row0 * m.dims.cols * w.dtype.size()) as u64;
        let read = |buf: &mut [u8]| match w.file {
            WFile::Base => self.read_source(vf, buf, at),
            WFile::Adapter(i) => self.adapter_weights[i].read_exact_at(buf, at, false),
        };
        if w.dtype == m.dtype {
            return read(data);
        }
        let elements = data.len() / m.dtype.size();
        let mut raw = vec![0u8; elements * w.dtype.size()];
        read(&mut raw)?;
        for e in 0..elements {
            m.dtype.store(data, e, w.dtype.load(&raw, e));
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
        let end = (offset + len).min(vf.size);
        let first = vf.segments.partition_point(|s| s.start + s.len <= offset);
        for seg in vf.segments[first..].iter().take_while(|s| s.start < end) {
            let Source::Merged { merge } = seg.source else {
                continue;
            };
            let block_bytes = block_bytes(&self.plan.merges[merge]);
            let lo = offset.max(seg.start) - seg.start;
            let hi = end.min(seg.start + seg.len) - seg.start;
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
