//! Which base bytes a range of a view's file is made from: what to read ahead of a reader.

use super::merged::{block_bytes, block_rows};
use super::{Source, View};
use crate::plan::WFile;

impl View {
    /// Whether this view reads the base ahead of its readers: only where the base is read
    /// with `O_DIRECT`. Through the page cache, the kernel's own read-ahead of the base file
    /// does it without the copy into a staged buffer (`scripts/tune_read.sh` measured
    /// staging slower there).
    pub(super) fn reads_ahead(&self) -> bool {
        self.engine.direct_base_reads && self.engine.ahead.budget() > 0
    }

    /// Read, in the background, the base bytes that file `file` is made from after `offset`
    /// (half the read-ahead budget's worth, so that a second stream fits beside), unless
    /// they are at hand already (merged blocks cached or being computed); see
    /// [`crate::ahead`]. For a reader that streams through the file.
    pub fn read_ahead(&self, file: usize, offset: u64) {
        if self.reads_ahead() {
            self.ahead_range(file, offset, self.engine.ahead.budget() / 2);
        }
    }

    /// Read ahead the base bytes of bytes `offset .. offset + len` of file `file`.
    fn ahead_range(&self, file: usize, offset: u64, len: u64) {
        let Some(vf) = self.files.get(file) else {
            return;
        };
        for (seg, lo, hi) in vf.segments_in(offset, len) {
            match &seg.source {
                Source::Base { offset } => self.ahead_span(file, offset + lo, offset + hi),
                &Source::Converted { offset, from, to } => {
                    let (from, to) = (from.size() as u64, to.size() as u64);
                    self.ahead_span(file, offset + lo / to * from, offset + hi / to * from);
                }
                &Source::Merged { merge } => self.ahead_merged(file, merge, lo, hi),
                Source::Gguf(tensor) => {
                    let (source_offset, source_len) = tensor.source_bytes(lo, hi);
                    self.ahead_range(tensor.file, source_offset, source_len);
                }
                Source::Bytes(_) | Source::Adapter { .. } => {}
            }
        }
    }

    /// Read bytes `start .. end` of file `file`'s source ahead, in ranges of the read-ahead's
    /// size on a grid cut to the span (so a reader of the span takes all of each range, and
    /// lets it go).
    fn ahead_span(&self, file: usize, start: u64, end: u64) {
        let size = self.engine.ahead.range_bytes();
        let mut at = start - start % size;
        while at < end {
            let next = at + size;
            self.schedule(file, at.max(start), next.min(end));
            at = next;
        }
    }

    /// Read ahead the rows of `W` of merged tensor `merge` that bytes `lo .. hi` of it are
    /// made from, skipping blocks cached or being computed. Blocks go in groups on a fixed
    /// grid, as many as the read-ahead's range size holds (at least one): a group's blocks
    /// still to compute are one range, the same whenever it is asked for again, so a range
    /// staged already is found rather than read again in another cut.
    fn ahead_merged(&self, file: usize, merge: usize, lo: u64, hi: u64) {
        let m = &self.plan.merges[merge];
        if m.w.file != WFile::Base || m.w.quant.is_some() {
            return;
        }
        let blocks = (lo / block_bytes(m))..hi.div_ceil(block_bytes(m));
        let rows = block_rows(m) as u64;
        let w_row = (m.dims.cols * m.w.dtype.size()) as u64;
        let group = (self.engine.ahead.range_bytes() / (rows * w_row)).max(1);
        let count = (m.dims.rows as u64).div_ceil(rows);
        let missing = |b: &u64| {
            let key = (self.recipes[merge], *b as u32);
            !self.engine.blocks.present_or_pending(key)
        };
        let mut g = blocks.start / group;
        while g * group < blocks.end {
            let in_group = g * group..((g + 1) * group).min(count);
            let first = in_group.clone().find(missing);
            let last = in_group.rev().find(missing);
            if let (Some(first), Some(last)) = (first, last) {
                let end_row = ((last + 1) * rows).min(m.dims.rows as u64);
                let start = m.w.offset + first * rows * w_row;
                self.schedule(file, start, m.w.offset + end_row * w_row);
            }
            g += 1;
        }
    }

    /// Have bytes `start .. end` of file `file`'s source read ahead, around the page cache.
    fn schedule(&self, file: usize, start: u64, end: u64) {
        let source = &self.files[file].source;
        (self.engine.ahead).schedule(source, start, end, self.engine.direct_base_reads);
    }
}
