//! The merged model directory, byte by byte.
//!
//! [`Engine::read_at`] is the one function through which every byte of the merged directory
//! is produced: FUSE reads and `materialize` both call it, so they cannot disagree.
//!
//! A file is a list of segments. A pass-through file is one segment of base bytes. A
//! safetensors file is its header (kept in memory, served as is), runs of untouched tensors
//! (base bytes at the same offsets), and merged tensors, computed in blocks of whole rows.
//! A later change of header or of a tensor's size is a change to this list only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::adapter::Adapter;
use crate::baseio::{Identity, InputFile};
use crate::cache::{Block, BlockCache};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::model::{BaseModel, INDEX_FILE};
use crate::plan::{Input, MergePlan, TensorMerge, TermKind, WSource};

/// The files of an adapter directory the plan is read from.
const ADAPTER_FILES: [&str; 2] = [Adapter::CONFIG_FILE, Adapter::WEIGHTS_FILE];

/// Merged blocks hold whole rows, about this many bytes: big enough that per-block overhead
/// (a cache lookup, one `pread`) is small next to the merge, small enough that a 128 KiB
/// kernel readahead or a random `pread` does not compute much it will not use.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Where a run of output bytes comes from.
#[derive(Debug, Clone)]
enum Source {
    /// Bytes held in memory (a safetensors header).
    Bytes(Arc<[u8]>),
    /// The base file's bytes starting at this offset.
    Base { offset: u64 },
    /// Bytes of another input file (`Engine::inputs[input]`, an adapter's weights) from this
    /// offset: a replaced tensor served as stored.
    Input { input: usize, offset: u64 },
    /// Merged tensor `merge` of the plan (its `W` source says where its rows come from).
    Merged { merge: usize },
}

#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    len: u64,
    source: Source,
}

/// One file of the merged directory.
#[derive(Debug)]
pub struct VirtualFile {
    /// Path relative to the directory root.
    pub rel: PathBuf,
    pub size: u64,
    /// The base file behind it (for messages and `stat` times).
    pub base_path: PathBuf,
    base: InputFile,
    segments: Vec<Segment>,
    /// Whether some bytes come from the adapters (merged or replaced tensors): then a
    /// change of an adapter's files fails reads of this file.
    adapted: bool,
}

impl VirtualFile {
    /// The `stat` of the file behind it, taken before anything was read from it: its
    /// permissions and owner are what the mount serves and `materialize` keeps.
    pub fn source(&self) -> Identity {
        self.base.identity()
    }
}

/// Counters of an engine's work, for logs and the mount's stats.
#[derive(Default, Debug)]
pub struct EngineStats {
    pub bytes_read: AtomicU64,
    pub bytes_passthrough: AtomicU64,
    pub bytes_merged: AtomicU64,
    /// Bytes served from adapter files (replaced tensors).
    pub bytes_replaced: AtomicU64,
}

/// Tuning knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bytes of merged blocks to keep.
    pub cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_bytes: 256 << 20,
        }
    }
}

pub struct Engine {
    pub base_dir: PathBuf,
    pub files: Vec<VirtualFile>,
    /// Subdirectories of the tree (relative), parents before children.
    pub dirs: Vec<PathBuf>,
    pub plan: MergePlan,
    /// Adapter weight files, by adapter index: the source of replaced tensors.
    pub inputs: Vec<InputFile>,
    /// Adapter config files, by adapter index: read at open only, held to see a change.
    pub adapter_configs: Vec<InputFile>,
    pub kernel: Kernel,
    pub cache: BlockCache,
    /// Read the base with `O_DIRECT`, around the page cache (see [`crate::baseio`]): for
    /// models over half of RAM, whose base pages would evict the merged ones.
    pub direct_base_reads: bool,
    pub stats: EngineStats,
    /// Number of values in the base's tensors (for `inspect`).
    pub base_params: usize,
    /// Number of tensors in the base's safetensors files.
    pub base_tensors: usize,
}

impl Engine {
    /// Open a base model and adapters (`(dir, weight)`, in order) and plan the merge. All
    /// inputs are validated here; reads afterwards fail only on I/O errors, or when an input
    /// changed since (see [`crate::baseio`]).
    pub fn open(
        base_dir: &Path,
        adapters: &[(PathBuf, f64)],
        options: EngineOptions,
    ) -> Result<Engine> {
        let base = BaseModel::open(base_dir)?;
        // Before the adapters are read: what they are read from must be what is served.
        let recorded: HashMap<PathBuf, Identity> = adapters
            .iter()
            .flat_map(|(dir, _)| ADAPTER_FILES.map(|name| dir.join(name)))
            .filter_map(|path| Some((path.clone(), Identity::of_path(&path).ok()?)))
            .collect();
        let mut adapters = adapters
            .iter()
            .map(|(dir, weight)| Adapter::load(dir, *weight))
            .collect::<Result<Vec<_>>>()?;
        let plan = MergePlan::build(&base, &mut adapters)?;
        drop(adapters); // the plan holds the factors it needs, packed.
        Engine::from_plan(base, plan, &recorded, options)
    }

    fn from_plan(
        base: BaseModel,
        plan: MergePlan,
        recorded: &HashMap<PathBuf, Identity>,
        options: EngineOptions,
    ) -> Result<Engine> {
        let open_recorded = |path: &Path| InputFile::open(path, recorded.get(path).copied());
        let inputs = plan
            .adapters
            .iter()
            .map(|a| open_recorded(&a.file))
            .collect::<Result<Vec<_>>>()?;
        let adapter_configs = plan
            .adapters
            .iter()
            .map(|a| open_recorded(&a.dir.join(Adapter::CONFIG_FILE)))
            .collect::<Result<Vec<_>>>()?;
        let mut files = Vec::with_capacity(base.files.len());
        // Change of the safetensors files' data (tensor bytes): a resized tensor changes it.
        let mut data_delta: i64 = 0;
        for file in &base.files {
            let extra = plan.extra_files.get(&file.rel);
            // Weights keep a descriptor; other files are opened at each read (baseio).
            let input = match (extra, file.layout) {
                (Some(path), _) => InputFile::lazy(path, Identity::of_path(path)?),
                (None, Some(_)) => InputFile::open(&file.path, Some(file.identity))?,
                (None, None) => InputFile::lazy(&file.path, file.identity),
            };
            let mut vf = passthrough(&file.rel, input);
            if let (Some(li), None) = (file.layout, extra) {
                let (segments, size, delta) = safetensors_segments(&base, li, &plan)?;
                vf.adapted = segments
                    .iter()
                    .any(|s| matches!(s.source, Source::Merged { .. } | Source::Input { .. }));
                (vf.segments, vf.size) = (segments, size);
                data_delta = data_delta.checked_add(delta).ok_or_else(|| {
                    Error::config(
                        &file.path,
                        "the model's size change overflows a 64-bit count",
                    )
                })?;
            }
            files.push(vf);
        }
        // Files derived from the changes: the shard index (total_size) and config.json
        // (vocab_size) when a resized tensor changes them.
        for vf in &mut files {
            let rewritten = if vf.rel == Path::new(INDEX_FILE) && data_delta != 0 {
                Some(rewrite_index(&vf.base_path, data_delta)?)
            } else if vf.rel == Path::new("config.json") {
                plan.vocab.map(|(old, new)| {
                    rewrite_config(base.config.clone().unwrap_or_default(), old, new)
                })
            } else {
                None
            };
            // The base read the index and config.json after the walk: they must still be the
            // version walked, which their reads (or these bytes) stand for.
            if vf.rel == Path::new(INDEX_FILE) || vf.rel == Path::new("config.json") {
                vf.base.check()?;
            }
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
                files.push(passthrough(
                    rel,
                    InputFile::lazy(path, Identity::of_path(path)?),
                ));
            }
        }
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(Engine {
            base_dir: base.dir.clone(),
            base_params: base.num_params(),
            base_tensors: base.tensors.len(),
            files,
            dirs: base.dirs,
            plan,
            inputs,
            adapter_configs,
            kernel: Kernel::selected(),
            cache: BlockCache::new(options.cache_bytes),
            direct_base_reads: false,
            stats: EngineStats::default(),
        })
    }

    /// Fill `buf` with the bytes of file `file` from `offset`; returns the count (short only
    /// at the end of the file). Safe to call from many threads; never writes to the inputs.
    pub fn read_at(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let vf = self.files.get(file).ok_or(Error::NoSuchFile(file))?;
        // Cached blocks were made from the inputs as opened: once one is seen changed, none
        // of this file's bytes are served, so no read mixes versions.
        self.sources_unchanged(vf)?;
        if offset >= vf.size {
            return Ok(0);
        }
        let len = buf.len().min((vf.size - offset) as usize);
        let buf = &mut buf[..len];
        let first = vf.segments.partition_point(|s| s.start + s.len <= offset);
        let mut pos = offset;
        let mut done = 0;
        for seg in &vf.segments[first..] {
            if done == len {
                break;
            }
            let within = pos - seg.start;
            let n = ((seg.len - within) as usize).min(len - done);
            let out = &mut buf[done..done + n];
            match &seg.source {
                Source::Bytes(bytes) => {
                    out.copy_from_slice(&bytes[within as usize..within as usize + n])
                }
                Source::Base { offset } => {
                    self.read_base(vf, out, offset + within)?;
                    self.stats
                        .bytes_passthrough
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Source::Input { input, offset } => {
                    self.inputs[*input].read_exact_at(out, offset + within, false)?;
                    self.stats
                        .bytes_replaced
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Source::Merged { merge } => {
                    self.read_merged(vf, *merge, within, out)?;
                    self.stats
                        .bytes_merged
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            pos += n as u64;
            done += n;
        }
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(len)
    }

    /// Fails if a file that file `file` is made from changed since lorafs opened it, looking
    /// now (one `fstat` each): the mount asks at every open, since reads served from the
    /// kernel's page cache never reach [`Engine::read_at`], and a `chmod` of the source
    /// must close the file to those it no longer lets in.
    pub fn check_sources(&self, file: usize) -> Result<()> {
        let vf = self.files.get(file).ok_or(Error::NoSuchFile(file))?;
        vf.base.check()?;
        for input in self.adapter_sources(vf) {
            input.check()?;
        }
        Ok(())
    }

    /// Fails if a file `vf` is made from was seen changed (no system call).
    fn sources_unchanged(&self, vf: &VirtualFile) -> Result<()> {
        vf.base.unchanged()?;
        for input in self.adapter_sources(vf) {
            input.unchanged()?;
        }
        Ok(())
    }

    /// The adapter files `vf`'s bytes are made from: all of them if some bytes come from
    /// the adapters (merged or replaced tensors), else none. A change of one fails reads of
    /// `vf`, and the mount serves `vf` only to those who may read every one.
    pub fn adapter_sources<'a>(
        &'a self,
        vf: &'a VirtualFile,
    ) -> impl Iterator<Item = &'a InputFile> + 'a {
        self.adapter_files().filter(|_| vf.adapted)
    }

    /// Every adapter file the plan was read from.
    fn adapter_files(&self) -> impl Iterator<Item = &InputFile> {
        self.inputs.iter().chain(&self.adapter_configs)
    }

    /// Bytes of one block of `m` (all blocks but the last of a tensor).
    fn block_bytes(m: &TensorMerge) -> u64 {
        (Self::block_rows(m) * m.row_bytes()) as u64
    }

    /// Rows per block of a merged tensor.
    fn block_rows(m: &TensorMerge) -> usize {
        (BLOCK_BYTES / m.row_bytes().max(1)).max(1)
    }

    /// Copy bytes `within .. within + out.len()` of merged tensor `merge` into `out`,
    /// computing the blocks it covers (several at once on the thread pool).
    fn read_merged(
        &self,
        vf: &VirtualFile,
        merge: usize,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let m = &self.plan.merges[merge];
        let block_bytes = Self::block_bytes(m);
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

    /// Block `b` of merged tensor `merge`, from the cache or computed now.
    fn block(&self, vf: &VirtualFile, merge: usize, b: usize) -> Result<Block> {
        let m = &self.plan.merges[merge];
        self.cache.get_or_compute((merge as u32, b as u32), || {
            // The factors in memory were read from the adapter files: see a change of them
            // now (the base's `W` is checked as it is read).
            for input in self.adapter_files() {
                input.check()?;
            }
            let rows = Self::block_rows(m);
            let row0 = b * rows;
            let n = rows.min(m.factors.rows - row0);
            let mut data = self.cache.buffer(n * m.row_bytes());
            self.read_w(vf, m, row0, &mut data)?;
            for (row, values) in &m.rows {
                if (row0..row0 + n).contains(row) {
                    let first = (row - row0) * m.factors.cols;
                    for (j, &x) in values.iter().enumerate() {
                        m.dtype.store(&mut data, first + j, x);
                    }
                }
            }
            if let Some(groups) = &m.dora {
                // DoRA reads `W` from one buffer and writes another; its f32 loop costs far
                // more than this copy.
                let w = data.clone();
                let (f, dtype) = (&m.factors, m.dtype);
                crate::dora::merge(dtype, &w, dtype, &mut data, f, groups, row0).map_err(
                    |row| {
                        let dora = m.terms.iter().find(|t| t.kind == TermKind::Dora);
                        let adapter = dora.map_or(0, |t| t.adapter);
                        Error::tensor(
                            &self.inputs[adapter].path,
                            &m.name,
                            format!(
                                "row {row}: W + ΔW is all zeros, so DoRA's magnitude / norm is \
                                 undefined (PEFT would merge NaN); this adapter does not fit \
                                 this base"
                            ),
                        )
                    },
                )?;
            } else if m.factors.rank > 0 {
                self.kernel.merge(m.dtype, &m.factors, row0, &mut data);
            }
            Ok(data)
        })
    }

    /// Rows `row0 .. row0 + n` of a merged tensor's `W`, in its output dtype, from the base
    /// file or from an adapter file (a replaced tensor), converted (rounded to nearest even)
    /// when the stored dtype differs.
    fn read_w(
        &self,
        vf: &VirtualFile,
        m: &TensorMerge,
        row0: usize,
        data: &mut [u8],
    ) -> Result<()> {
        let WSource {
            input,
            offset,
            dtype,
        } = m.w;
        let cols = m.factors.cols;
        let at = offset + (row0 * cols * dtype.size()) as u64;
        let read = |buf: &mut [u8]| match input {
            Input::Base => self.read_base(vf, buf, at),
            Input::Adapter(i) => self.inputs[i].read_exact_at(buf, at, false),
        };
        if dtype == m.dtype {
            return read(data);
        }
        let elements = data.len() / m.dtype.size();
        let mut raw = vec![0u8; elements * dtype.size()];
        read(&mut raw)?;
        for e in 0..elements {
            m.dtype.store(data, e, dtype.load(&raw, e));
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
        if len > self.cache.budget() as u64 / 4 || offset >= vf.size {
            return;
        }
        let end = (offset + len).min(vf.size);
        let first = vf.segments.partition_point(|s| s.start + s.len <= offset);
        for seg in vf.segments[first..].iter().take_while(|s| s.start < end) {
            let Source::Merged { merge } = seg.source else {
                continue;
            };
            let m = &self.plan.merges[merge];
            let block_bytes = Self::block_bytes(m);
            let lo = offset.max(seg.start) - seg.start;
            let hi = end.min(seg.start + seg.len) - seg.start;
            for b in lo / block_bytes..hi.div_ceil(block_bytes) {
                if self.cache.present_or_pending((merge as u32, b as u32)) {
                    continue;
                }
                let engine = Arc::clone(self);
                rayon::spawn(move || {
                    if let Err(err) = engine.block(&engine.files[file], merge, b as usize) {
                        log::warn!(
                            "prefetch of {} failed: {err}",
                            engine.files[file].rel.display()
                        );
                    }
                });
            }
        }
    }

    /// Read base bytes, around the page cache if so configured.
    fn read_base(&self, vf: &VirtualFile, buf: &mut [u8], offset: u64) -> Result<()> {
        vf.base.read_exact_at(buf, offset, self.direct_base_reads)
    }

    /// Total bytes of the merged directory's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The segments of a safetensors file: its header, then its tensors in file order, runs of
/// untouched tensors joined into one pass-through segment. Returns them with the file's size
/// and the change in the size of its data (tensor bytes). When a replaced tensor has another shape, the
/// header is regenerated and the tensors after it move.
fn safetensors_segments(
    base: &BaseModel,
    li: usize,
    plan: &MergePlan,
) -> Result<(Vec<Segment>, u64, i64)> {
    let layout = &base.layouts[li];
    let merge_of = |ti: usize| {
        plan.merges
            .binary_search_by_key(&(li, ti), |m| (m.layout, m.tensor))
            .ok()
    };
    let shapes: Vec<Vec<usize>> = layout
        .tensors
        .iter()
        .enumerate()
        .map(|(ti, t)| match merge_of(ti) {
            Some(mi) => plan.merges[mi].shape.clone(),
            None => t.shape.clone(),
        })
        .collect();
    let (header, ranges): (Arc<[u8]>, Vec<(u64, u64)>) = if shapes
        .iter()
        .zip(&layout.tensors)
        .all(|(s, t)| s == &t.shape)
    {
        (
            Arc::from(layout.header.as_slice()),
            layout.tensors.iter().map(|t| (t.offset, t.len)).collect(),
        )
    } else {
        let (header, ranges) = layout.header_with(&shapes)?;
        (Arc::from(header), ranges)
    };
    let mut segments = vec![Segment {
        start: 0,
        len: header.len() as u64,
        source: Source::Bytes(header),
    }];
    for (ti, (t, &(start, len))) in layout.tensors.iter().zip(&ranges).enumerate() {
        let source = match merge_of(ti) {
            Some(merge) => {
                let m = &plan.merges[merge];
                debug_assert_eq!(m.bytes(), len);
                match m.w.input {
                    Input::Adapter(input) if m.is_plain_copy() => Source::Input {
                        input,
                        offset: m.w.offset,
                    },
                    _ => Source::Merged { merge },
                }
            }
            None => Source::Base { offset: t.offset },
        };
        match (source, segments.last_mut()) {
            (
                Source::Base { offset },
                Some(Segment {
                    start: s,
                    len: l,
                    source: Source::Base { offset: prev },
                }),
            ) if *s + *l == start && *prev + *l == offset => {
                *l += len;
            }
            (source, _) => segments.push(Segment { start, len, source }),
        }
    }
    segments.retain(|s| s.len > 0);
    let data: u64 = ranges.iter().map(|r| r.1).sum();
    let before: u64 = layout.tensors.iter().map(|t| t.len).sum();
    let size = ranges
        .last()
        .map(|&(o, l)| o + l)
        .unwrap_or(segments.first().map_or(0, |s| s.len));
    Ok((segments, size, data as i64 - before as i64))
}

/// A file served unchanged from `input` (a base file, or an adapter's tokenizer file).
fn passthrough(rel: &Path, input: InputFile) -> VirtualFile {
    let size = input.size();
    VirtualFile {
        rel: rel.to_path_buf(),
        size,
        base_path: input.path.clone(),
        base: input,
        segments: vec![Segment {
            start: 0,
            len: size,
            source: Source::Base { offset: 0 },
        }],
        adapted: false,
    }
}

/// `model.safetensors.index.json` with `metadata.total_size` changed by `delta` bytes.
fn rewrite_index(path: &Path, delta: i64) -> Result<Vec<u8>> {
    let mut index: serde_json::Value = crate::error::read_json(path)?;
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

/// The base's `config.json` with `vocab_size` (top level, and in a `text_config`) set to
/// `new` where it was `old`.
fn rewrite_config(mut config: serde_json::Value, old: usize, new: usize) -> Vec<u8> {
    let set = |v: &mut serde_json::Value| {
        if let Some(size) = v.get_mut("vocab_size") {
            if size.as_u64() == Some(old as u64) {
                *size = serde_json::Value::from(new);
            }
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
