//! Reading the base ahead of its readers.
//!
//! A disk is fast only with several reads in flight. A mount's readers (FUSE requests, the
//! prefetch of merged blocks) each read a block's base rows and then merge them: one read
//! at a time per thread, and the disk idle while they merge. So while a client streams
//! through a file, the view names the base bytes it will need next ([`ReadAhead::schedule`]),
//! a few threads of their own read them into staged buffers (with `O_DIRECT` where the engine
//! reads around the page cache), and readers take them from there ([`ReadAhead::read`])
//! instead of from the disk.
//!
//! The staged ranges' memory is bounded (the budget, counted in buffers' sizes, see
//! [`crate::aligned`]); the oldest are dropped first when it is full, and a range is let go
//! once all of it has been lent to readers. Its buffer is kept for the next range while
//! staged and kept buffers fit the budget together: buffers are mapped anew only to grow,
//! since memory a process touches for the first time costs more than the read itself where
//! the kernel zeroes it (and here the VM's host faults it in). For the same reason a mount
//! maps and faults in its buffers in the background as it starts ([`ReadAhead::prepare`]),
//! so that its first reads do not wait for new memory.
//! A reader that asks for a range still waiting in the queue reads it at once itself, so a
//! queue never makes a read slower than reading. Staged bytes are read like any other: the
//! file is checked against the version lorafs opened after they are in the buffer, and they
//! are not served once a change of the file was seen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::aligned::AlignedBuf;
use crate::baseio::{SourceFile, Version};
use crate::error::Result;

/// Staged ranges start and end on the O_DIRECT alignment.
const ALIGN: u64 = crate::aligned::ALIGN as u64;

/// Tuning of a [`ReadAhead`].
#[derive(Debug, Clone, Copy)]
pub struct AheadOptions {
    /// Bytes staged or being read, at most.
    pub budget: u64,
    /// Threads reading: the reads in flight.
    pub threads: usize,
}

impl Default for AheadOptions {
    fn default() -> Self {
        AheadOptions {
            budget: 64 << 20,
            threads: 8,
        }
    }
}

/// Counters, readable while in use.
#[derive(Default, Debug)]
pub struct AheadStats {
    /// Bytes read ahead into staged buffers.
    pub staged: AtomicU64,
    /// Bytes readers took from staged buffers.
    pub served: AtomicU64,
    /// Staged ranges dropped unread to make room.
    pub dropped: AtomicU64,
}

/// Where one staged range stands.
enum Fill {
    Queued,
    Reading,
    Ready(Arc<AlignedBuf>),
    /// The read failed: readers read the range themselves, and meet the error there.
    Failed,
}

struct Chunk {
    end: u64,
    fill: Fill,
    /// Bytes handed to readers so far.
    served: u64,
    /// When it was scheduled (tells it from a later range at the same offset).
    seq: u64,
    /// Read around the page cache.
    bypass: bool,
}

/// A range to read: its chunk (found by file and start, told from a later one by `seq`)
/// holds the rest.
struct Job {
    file: Arc<SourceFile>,
    start: u64,
    seq: u64,
}

#[derive(Default)]
struct State {
    /// Staged ranges by file version and start offset. Keyed by version, not by `SourceFile`:
    /// two opens of one version hold the same bytes, and a new version never finds old ones.
    files: HashMap<Version, BTreeMap<u64, Chunk>>,
    /// Memory of the ranges in `files`: their buffers' capacity (see [`held`]).
    bytes: u64,
    /// Ranges in the order they were scheduled: (file, start, seq).
    order: VecDeque<(Version, u64, u64)>,
    queue: VecDeque<Job>,
    /// Buffers kept for the next ranges, and their memory: with `bytes`, within the budget.
    spares: Vec<AlignedBuf>,
    spare_bytes: u64,
    budget: u64,
    next_seq: u64,
    started: usize,
    closed: bool,
}

struct Shared {
    options: AheadOptions,
    state: Mutex<State>,
    /// Signalled when a range is filled (readers wait on it).
    filled: Condvar,
    /// Signalled when a job is queued or the engine goes away (reading threads wait on it).
    queued: Condvar,
    stats: AheadStats,
}

/// Base bytes read ahead of their readers: see the module's documentation.
pub struct ReadAhead {
    shared: Arc<Shared>,
}

/// What a reader found at an offset.
enum Piece {
    /// `n` bytes at `at` of a staged buffer.
    Staged {
        data: Arc<AlignedBuf>,
        at: usize,
        n: usize,
    },
    /// `n` bytes nobody staged: read them.
    Missing { n: usize },
}

impl ReadAhead {
    pub fn new(options: AheadOptions) -> ReadAhead {
        ReadAhead {
            shared: Arc::new(Shared {
                options,
                state: Mutex::new(State {
                    budget: options.budget,
                    ..State::default()
                }),
                filled: Condvar::new(),
                queued: Condvar::new(),
                stats: AheadStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &AheadStats {
        &self.shared.stats
    }

    /// Bytes staged or being read now.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    pub fn budget(&self) -> u64 {
        self.shared.options.budget
    }

    /// The size of the ranges to ask for: about one huge page (a buffer of one is read
    /// fastest: see [`crate::aligned`]), or less where the budget would hold only a few.
    pub fn range_bytes(&self) -> u64 {
        (self.budget() / 8).clamp(ALIGN, crate::aligned::HUGE_PAGE as u64)
    }

    /// Map and fault in buffers for the ranges to come, as many as the budget holds, on a
    /// thread of its own; ranges read meanwhile take those made so far. Each holds any range
    /// of [`ReadAhead::range_bytes`] (on whatever alignment), so none is mapped anew. For a
    /// mount, as it starts: a cold load through it otherwise spends its first reads having
    /// the kernel zero the budget's memory (0.07 s of CPU for 64 MiB on the VM of
    /// docs/DESIGN.md, "Buffers prepared at the start"), while most loaders spend that long
    /// starting up before they read.
    pub fn prepare(&self) {
        let size = crate::aligned::capacity_for((self.range_bytes() + 2 * ALIGN) as usize);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("lorafs-prep".into())
            .spawn(move || shared.prepare(size));
        if let Err(err) = spawned {
            // Ranges map their buffers as they need them: slower, never wrong.
            log::warn!("read-ahead buffers not prepared: {err}");
        }
    }

    /// Fill `buf` with the bytes of `file` at `offset`: from staged ranges where there are
    /// some, read now where not.
    pub fn read(
        &self,
        file: &Arc<SourceFile>,
        buf: &mut [u8],
        offset: u64,
        bypass: bool,
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let out = &mut buf[(pos - offset) as usize..];
            match self.shared.take(file, pos, end, false)? {
                Piece::Staged { data, at, n } => {
                    let copy = |staged: &[u8]| out[..n].copy_from_slice(staged);
                    self.shared.lend(data, at, n, copy);
                    pos += n as u64;
                }
                Piece::Missing { n } => {
                    file.read_exact_at(&mut out[..n], pos, bypass)?;
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Run `f` on bytes `offset .. offset + len` of `file` if one staged range holds them
    /// all (waiting for it if it is being read, reading it now if it is queued), and let
    /// the range go; `None` (nothing taken) if none does.
    pub fn with_staged<R>(
        &self,
        file: &Arc<SourceFile>,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let end = offset + len as u64;
        match self.shared.take(file, offset, end, true)? {
            Piece::Staged { data, at, n } => Ok(Some(self.shared.lend(data, at, n, f))),
            Piece::Missing { .. } => Ok(None),
        }
    }

    /// Read bytes `start .. end` of `file` in the background, unless they are staged or
    /// queued already or the budget is full of ranges still to be read.
    pub fn schedule(&self, file: &Arc<SourceFile>, start: u64, end: u64, bypass: bool) {
        let start = start - start % ALIGN;
        let end = end.div_ceil(ALIGN).saturating_mul(ALIGN).min(file.size());
        let shared = &self.shared;
        if start >= end || end - start > shared.options.budget / 4 {
            return;
        }
        let version = file.identity().version();
        let mut state = shared.lock();
        // A range at the same start that does not cover this one is left as it is: rare
        // (ranges of neighbouring tensors meeting in one aligned block), and readers read
        // the rest themselves.
        if state.closed || state.starts_at(&version, start) || state.covers(&version, start, end) {
            return;
        }
        if !state.make_room(held(start, end), shared) {
            return;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let fill = Fill::Queued;
        let chunks = state.files.entry(version).or_default();
        chunks.insert(
            start,
            Chunk {
                end,
                fill,
                served: 0,
                seq,
                bypass,
            },
        );
        state.bytes += held(start, end);
        state.order.push_back((version, start, seq));
        let file = Arc::clone(file);
        state.queue.push_back(Job { file, start, seq });
        if state.started < shared.options.threads {
            state.started += 1;
            let worker = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name("lorafs-read".into())
                .spawn(move || worker.work());
            if let Err(err) = spawned {
                // Readers read what nobody reads ahead: slower, never wrong.
                state.started -= 1;
                log::warn!("could not start a read-ahead thread: {err}");
            }
        }
        shared.queued.notify_one();
    }
}

/// The memory range `start .. end` takes staged: its buffer's capacity.
fn held(start: u64, end: u64) -> u64 {
    crate::aligned::capacity_for((end - start) as usize) as u64
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.queued.notify_all();
    }
}

impl State {
    /// Whether one staged range holds all of `start .. end`.
    fn covers(&self, version: &Version, start: u64, end: u64) -> bool {
        let Some(chunks) = self.files.get(version) else {
            return false;
        };
        (chunks.range(..=start).next_back()).is_some_and(|(_, c)| c.end >= end)
    }

    fn starts_at(&self, version: &Version, start: u64) -> bool {
        (self.files.get(version)).is_some_and(|chunks| chunks.contains_key(&start))
    }

    /// Drop the oldest ranges until `len` more bytes fit the budget; false if the ranges in
    /// the way are being read.
    fn make_room(&mut self, len: u64, shared: &Shared) -> bool {
        while self.bytes + len > shared.options.budget {
            let Some(&(version, start, seq)) = self.order.front() else {
                return false;
            };
            let chunks = self.files.get_mut(&version);
            let chunk = chunks.and_then(|c| c.get(&start)).filter(|c| c.seq == seq);
            if chunk.is_some_and(|c| matches!(c.fill, Fill::Reading)) {
                return false;
            }
            self.order.pop_front();
            if chunk.is_some() {
                self.remove(&version, start);
                shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn remove(&mut self, version: &Version, start: u64) {
        let Some(chunks) = self.files.get_mut(version) else {
            return;
        };
        let removed = chunks.remove(&start);
        if chunks.is_empty() {
            self.files.remove(version);
        }
        if let Some(chunk) = removed {
            self.bytes -= held(start, chunk.end);
            if let Fill::Ready(data) = chunk.fill {
                if let Some(buf) = Arc::into_inner(data) {
                    self.keep_spare(buf);
                }
            }
        }
    }

    /// Whether a buffer of `size` bytes more fits the budget beside the ranges held and the
    /// buffers kept.
    fn room_for(&self, size: u64) -> bool {
        self.bytes + self.spare_bytes + size <= self.budget
    }

    /// Keep `buf` for a later range if it fits the budget beside the ranges held; whether
    /// it was kept.
    fn keep_spare(&mut self, buf: AlignedBuf) -> bool {
        let size = buf.capacity() as u64;
        let kept = self.room_for(size);
        if kept {
            self.spare_bytes += size;
            self.spares.push(buf);
        }
        kept
    }

    /// A kept buffer for a range of `len` bytes: the smallest that holds it if any does
    /// (else one to map anew in place of its memory), or a new one.
    fn take_spare(&mut self, len: usize) -> AlignedBuf {
        let need = crate::aligned::capacity_for(len);
        let fits = (self.spares.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= need)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match fits.or(self.spares.len().checked_sub(1)) {
            Some(i) => {
                let buf = self.spares.swap_remove(i);
                self.spare_bytes -= buf.capacity() as u64;
                buf
            }
            None => AlignedBuf::default(),
        }
    }

    /// The range at `start`, which the caller found there under the same lock.
    fn chunk_mut(&mut self, version: &Version, start: u64) -> &mut Chunk {
        let chunks = self.files.get_mut(version).expect("the range's file");
        chunks.get_mut(&start).expect("the range")
    }

    /// The staged range that holds `pos`: its start.
    fn holding(&self, version: &Version, pos: u64) -> Option<u64> {
        let chunks = self.files.get(version)?;
        let (&start, chunk) = chunks.range(..=pos).next_back()?;
        (chunk.end > pos).then_some(start)
    }

    /// The start of the first staged range after `pos`.
    fn next_after(&self, version: &Version, pos: u64) -> Option<u64> {
        let chunks = self.files.get(version)?;
        chunks.range(pos + 1..).next().map(|(&start, _)| start)
    }
}

impl Shared {
    /// [`ReadAhead::prepare`]'s thread: buffers of `size` bytes, faulted in, kept as spares
    /// while they fit the budget beside the ranges held, until the read-ahead goes away.
    fn prepare(&self, size: usize) {
        loop {
            let room = {
                let state = self.lock();
                !state.closed && state.room_for(size as u64)
            };
            if !room {
                return;
            }
            // Faulted in without the lock: the readers go on meanwhile.
            let buf = AlignedBuf::populated(size);
            let mut state = self.lock();
            if state.closed || !state.keep_spare(buf) {
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every update is one
        // step), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a reader of `pos .. end` of `file` finds at `pos`, waiting for a range being
    /// read, and reading a queued one itself. With `whole`, a staged range that ends before
    /// `end` is left alone and reported missing.
    fn take(&self, file: &Arc<SourceFile>, pos: u64, end: u64, whole: bool) -> Result<Piece> {
        let version = file.identity().version();
        let mut state = self.lock();
        loop {
            let Some(start) = state.holding(&version, pos) else {
                let next = state.next_after(&version, pos).unwrap_or(end);
                return Ok(Piece::Missing {
                    n: (next.min(end) - pos) as usize,
                });
            };
            let chunk = &state.files[&version][&start];
            let (chunk_end, seq) = (chunk.end, chunk.seq);
            let n = (chunk_end.min(end) - pos) as usize;
            match &chunk.fill {
                Fill::Reading => state = self.filled.wait(state).unwrap_or_else(|p| p.into_inner()),
                Fill::Queued => {
                    let file = Arc::clone(file);
                    state = self.run(state, Job { file, start, seq });
                }
                Fill::Failed => {
                    state.remove(&version, start);
                    return Ok(Piece::Missing { n });
                }
                Fill::Ready(_) if whole && chunk_end < end => {
                    return Ok(Piece::Missing { n });
                }
                Fill::Ready(data) => {
                    let data = Arc::clone(data);
                    // Readers take each byte once (a stream, or the blocks a range holds, in
                    // any order): the range is done with when all of it was handed out,
                    // but for the alignment's rounding at either end.
                    let chunk = state.chunk_mut(&version, start);
                    chunk.served += n as u64;
                    if chunk.served + 2 * ALIGN > chunk_end - start {
                        state.remove(&version, start);
                    }
                    drop(state);
                    // Read before: the file must still be that version now (one `fstat`).
                    file.check()?;
                    let at = (pos - start) as usize;
                    return Ok(Piece::Staged { data, at, n });
                }
            }
        }
    }

    /// Read `job`'s range into a buffer (the lock released meanwhile) and file it, if it is
    /// still queued; returns the lock.
    fn run<'a>(&'a self, mut state: MutexGuard<'a, State>, job: Job) -> MutexGuard<'a, State> {
        let version = job.file.identity().version();
        let chunks = state.files.get_mut(&version);
        let Some(chunk) = chunks.and_then(|c| c.get_mut(&job.start)) else {
            return state;
        };
        if chunk.seq != job.seq || !matches!(chunk.fill, Fill::Queued) {
            return state;
        }
        chunk.fill = Fill::Reading;
        let (len, bypass) = ((chunk.end - job.start) as usize, chunk.bypass);
        let mut buf = state.take_spare(len);
        drop(state);
        // A panic must not leave the range `Reading`: its readers would wait for ever.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job.file.read_span(&mut buf, job.start, len, bypass)
        }));
        let mut state = self.lock();
        let fill = match read {
            Err(_) => {
                log::error!("read-ahead of {} panicked", job.file.path.display());
                Fill::Failed
            }
            Ok(Ok(())) => {
                self.stats.staged.fetch_add(len as u64, Ordering::Relaxed);
                Fill::Ready(Arc::new(buf))
            }
            Ok(Err(err)) => {
                log::debug!("read-ahead of {} failed: {err}", job.file.path.display());
                state.keep_spare(buf);
                Fill::Failed
            }
        };
        // A range being read is never dropped, so it is still there.
        let chunks = state.files.get_mut(&version);
        if let Some(chunk) = chunks.and_then(|c| c.get_mut(&job.start)) {
            debug_assert_eq!(chunk.seq, job.seq);
            chunk.fill = fill;
        }
        self.filled.notify_all();
        state
    }

    /// A reading thread: runs queued jobs until the engine goes away.
    fn work(&self) {
        let mut state = self.lock();
        loop {
            if state.closed {
                return;
            }
            match state.queue.pop_front() {
                Some(job) => state = self.run(state, job),
                None => state = self.queued.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Run `f` on `n` staged bytes at `at` of `data`, count them served, and give the
    /// buffer back for the next staged read if nobody else holds it.
    fn lend<R>(&self, data: Arc<AlignedBuf>, at: usize, n: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let result = f(&data.bytes()[at..at + n]);
        self.stats.served.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(buf) = Arc::into_inner(data) {
            self.lock().keep_spare(buf);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// A file of `len` bytes of [`data`] in a new temporary directory (kept alive by the
    /// caller), its bytes, and the file opened.
    fn fixture(len: usize) -> (tempfile::TempDir, Vec<u8>, Arc<SourceFile>) {
        let dir = tempdir();
        let data = data(len);
        let file = source(dir.path(), &data);
        (dir, data, file)
    }

    fn source(dir: &Path, data: &[u8]) -> Arc<SourceFile> {
        let path = dir.join("data");
        std::fs::write(&path, data).unwrap();
        Arc::new(SourceFile::open(&path, None).unwrap())
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| (i * 31 + i / 4099) as u8).collect()
    }

    fn tempdir() -> tempfile::TempDir {
        // /var/tmp is disk-backed where /tmp may be tmpfs (which refuses O_DIRECT).
        tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    /// Wait until `bytes` were staged.
    fn wait_staged(ahead: &ReadAhead, bytes: u64) {
        let start = Instant::now();
        while ahead.stats().staged.load(Ordering::Relaxed) < bytes {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "read-ahead stalled"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn staged_bytes_are_the_files_at_any_offset() {
        let (_dir, data, file) = fixture(3 << 20);
        for bypass in [false, true] {
            let ahead = ReadAhead::new(AheadOptions {
                budget: 16 << 20,
                threads: 3,
            });
            // Ranges that do not start or end on the alignment, overlapping, to the end.
            for (start, end) in [(100, 700_000), (650_000, 2_000_000), (1_999_999, 3 << 20)] {
                ahead.schedule(&file, start, end, bypass);
            }
            wait_staged(&ahead, 3 << 20);
            for (offset, len) in [(0, 10), (5, 1 << 20), (699_000, 5000), (2_500_000, 645_728)] {
                let mut buf = vec![0u8; len];
                ahead.read(&file, &mut buf, offset, bypass).unwrap();
                assert_eq!(
                    buf,
                    data[offset as usize..offset as usize + len],
                    "{offset}+{len}"
                );
            }
            assert!(ahead.stats().served.load(Ordering::Relaxed) > 0);
        }
    }

    #[test]
    fn a_reader_reads_what_is_still_queued_and_never_waits_on_nobody() {
        let (_dir, data, file) = fixture(2 << 20);
        // One thread, many ranges queued: readers of later ones read them themselves.
        let ahead = ReadAhead::new(AheadOptions {
            budget: 64 << 20,
            threads: 1,
        });
        for start in (0..2 << 20).step_by(64 << 10) {
            ahead.schedule(&file, start, start + (64 << 10), true);
        }
        let mut buf = vec![0u8; 2 << 20];
        ahead.read(&file, &mut buf, 0, true).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn a_whole_range_is_lent_only_from_one_staged_range() {
        let (_dir, data, file) = fixture(1 << 20);
        let ahead = ReadAhead::new(AheadOptions::default());
        ahead.schedule(&file, 4096, 500_000, true);
        wait_staged(&ahead, 500_000 - 4096);
        let sum = |w: &[u8]| w.iter().map(|&b| b as u64).sum::<u64>();
        let want = |lo: usize, hi: usize| sum(&data[lo..hi]);
        // Past the staged range's end: nothing lent, nothing let go.
        assert_eq!(ahead.with_staged(&file, 5000, 600_000, sum).unwrap(), None);
        assert_eq!(ahead.with_staged(&file, 0, 5000, sum).unwrap(), None);
        assert!(ahead.bytes() > 0);
        let lent = ahead.with_staged(&file, 5000, 400_000, sum).unwrap();
        assert_eq!(lent, Some(want(5000, 405_000)));
        // Lent up to its end, the range is let go.
        let lent = ahead.with_staged(&file, 405_000, 95_000, sum).unwrap();
        assert_eq!(lent, Some(want(405_000, 500_000)));
        assert_eq!(ahead.bytes(), 0);
    }

    #[test]
    fn a_range_is_let_go_once_all_of_it_was_lent_in_any_order() {
        let (_dir, data, file) = fixture(1 << 20);
        let ahead = ReadAhead::new(AheadOptions::default());
        // Two blocks' rows in one range, taken last block first (as blocks computed in
        // parallel may): the first taker must not let the range go.
        ahead.schedule(&file, 0, 600_000, true);
        wait_staged(&ahead, 600_000);
        let sum = |w: &[u8]| w.iter().map(|&b| b as u64).sum::<u64>();
        let want = |lo: usize, hi: usize| sum(&data[lo..hi]);
        let late = ahead.with_staged(&file, 300_000, 300_000, sum).unwrap();
        assert_eq!(late, Some(want(300_000, 600_000)));
        assert!(ahead.bytes() > 0, "let go with half of it never lent");
        let early = ahead.with_staged(&file, 0, 300_000, sum).unwrap();
        assert_eq!(early, Some(want(0, 300_000)));
        assert_eq!(ahead.bytes(), 0);
    }

    #[test]
    fn the_budget_bounds_what_is_held() {
        let (_dir, data, file) = fixture(8 << 20);
        let ahead = ReadAhead::new(AheadOptions {
            budget: 2 << 20,
            threads: 2,
        });
        for start in (0..8 << 20).step_by(256 << 10) {
            ahead.schedule(&file, start, start + (256 << 10), false);
            assert!(ahead.bytes() <= 2 << 20);
        }
        // Too large a range for the budget is not read ahead at all.
        ahead.schedule(&file, 0, 1 << 20, false);
        assert!(ahead.bytes() <= 2 << 20);
        let mut buf = vec![0u8; 8 << 20];
        ahead.read(&file, &mut buf, 0, false).unwrap();
        assert_eq!(buf, data);
        // Read through to their ends, the ranges are let go.
        assert_eq!(ahead.bytes(), 0);
    }

    /// Buffers mapped by `ahead`, and how many are kept: the kept ones and those of ranges
    /// read or being read (a queued range has none yet: it takes a kept one when its read
    /// starts).
    fn memory(ahead: &ReadAhead) -> (u64, usize) {
        let state = ahead.shared.lock();
        let chunks = state.files.values().flat_map(|c| c.iter());
        let lent = chunks.map(|(&start, chunk)| match &chunk.fill {
            Fill::Ready(data) => data.capacity() as u64,
            Fill::Reading => held(start, chunk.end),
            Fill::Queued | Fill::Failed => 0,
        });
        (lent.sum::<u64>() + state.spare_bytes, state.spares.len())
    }

    #[test]
    fn buffers_are_kept_for_the_next_ranges_within_the_budget() {
        const RANGE: u64 = 256 << 10;
        let (_dir, data, file) = fixture(8 << 20);
        let read = |ahead: &ReadAhead, start: u64, len: u64| {
            let mut buf = vec![0u8; len as usize];
            ahead.read(&file, &mut buf, start, true).unwrap();
            assert_eq!(buf, data[start as usize..][..len as usize]);
        };
        // A reader streaming range by range: each range's buffer serves the next one.
        let ahead = ReadAhead::new(AheadOptions {
            budget: 2 << 20,
            threads: 2,
        });
        for start in (0..4 << 20).step_by(RANGE as usize) {
            ahead.schedule(&file, start, start + RANGE, true);
            wait_staged(&ahead, start + RANGE);
            read(&ahead, start, RANGE);
            assert_eq!(
                memory(&ahead),
                (RANGE, 1),
                "one buffer, kept for the next range"
            );
        }
        // Ranges scheduled faster than they are read: never more memory than the budget.
        for start in (4 << 20..8 << 20).step_by(RANGE as usize) {
            ahead.schedule(&file, start, start + RANGE, true);
            assert!(memory(&ahead).0 <= 2 << 20, "{:?}", memory(&ahead));
        }
        read(&ahead, 4 << 20, 4 << 20);
        assert!(memory(&ahead).0 <= 2 << 20, "{:?}", memory(&ahead));
        // 24 ranges staged before a reader takes them: all 24 buffers are kept for the next
        // ranges, since they fit the budget.
        let ahead = ReadAhead::new(AheadOptions {
            budget: 16 << 20,
            threads: 2,
        });
        for start in (0..6 << 20).step_by(RANGE as usize) {
            ahead.schedule(&file, start, start + RANGE, true);
        }
        wait_staged(&ahead, 6 << 20);
        read(&ahead, 0, 6 << 20);
        assert_eq!(memory(&ahead), (6 << 20, 24));
    }

    #[test]
    fn prepared_buffers_fill_the_budget_and_take_any_range() {
        let (_dir, data, file) = fixture(16 << 20);
        // Ranges of a huge page: buffers on huge pages, mapped with slack to align them.
        let ahead = ReadAhead::new(AheadOptions {
            budget: 32 << 20,
            threads: 2,
        });
        assert_eq!(ahead.range_bytes(), crate::aligned::HUGE_PAGE as u64);
        let range = ahead.range_bytes();
        ahead.prepare();
        // Prepared: buffers up to the budget, less than one range's short of it.
        let start = Instant::now();
        let prepared = loop {
            let (bytes, count) = memory(&ahead);
            assert!(bytes <= 32 << 20, "{bytes} bytes over the budget");
            if bytes + range + 2 * ALIGN > 32 << 20 {
                break (bytes, count);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{bytes} bytes prepared"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        // Ranges of the read-ahead's size on any alignment, one after another: each takes
        // a prepared buffer and gives it back, and none is mapped anew.
        let mut staged = 0;
        for start in [0, ALIGN, range - ALIGN, 3 * range + 100 * ALIGN] {
            // `range` bytes off the alignment: a range one block longer.
            ahead.schedule(&file, start + 5, start + 5 + range, true);
            staged += range + ALIGN;
            wait_staged(&ahead, staged);
            let mut buf = vec![0u8; range as usize];
            ahead.read(&file, &mut buf, start + 5, true).unwrap();
            assert_eq!(buf, data[(start + 5) as usize..][..buf.len()]);
            assert_eq!(memory(&ahead), prepared, "a buffer mapped anew");
        }
    }

    #[test]
    fn staged_bytes_of_a_file_changed_since_are_refused() {
        let (_dir, _, file) = fixture(1 << 20);
        let ahead = ReadAhead::new(AheadOptions::default());
        ahead.schedule(&file, 0, 1 << 20, false);
        wait_staged(&ahead, 1 << 20);
        // Same size, same inode, new bytes (a tick later, so the times differ).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file.path, vec![7u8; 1 << 20]).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = ahead.read(&file, &mut buf, 0, false).unwrap_err();
        assert!(matches!(err, crate::Error::Changed { .. }), "{err}");
    }

    #[test]
    fn many_readers_and_schedulers_agree_with_the_file() {
        let (_dir, data, file) = fixture(4 << 20);
        let ahead = ReadAhead::new(AheadOptions {
            budget: 1 << 20,
            threads: 4,
        });
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (ahead, file, data) = (&ahead, &file, &data);
                s.spawn(move || {
                    let step = 100_000 + t * 7919;
                    let mut offset = t * 12_345;
                    while offset + step < 4 << 20 {
                        ahead.schedule(file, offset + step, offset + 3 * step, t % 2 == 0);
                        let mut buf = vec![0u8; step as usize];
                        ahead.read(file, &mut buf, offset, t % 2 == 0).unwrap();
                        assert_eq!(buf, data[offset as usize..(offset + step) as usize]);
                        offset += step;
                    }
                });
            }
        });
        assert!(ahead.bytes() <= 1 << 20);
    }
}
