//! One merged model directory over an engine's base, byte by byte.
//!
//! [`View::read_at`] is the one function through which every byte of a merged directory is
//! produced: FUSE reads and `materialize` both call it, so they cannot disagree.
//!
//! A file is a list of segments. A pass-through file is one segment of its source's bytes.
//! A safetensors file is its header (kept in memory), runs of untouched tensors (base bytes,
//! or converted to `--dtype`), and merged tensors, computed in blocks of whole rows from
//! their recipe (see [`crate::engine`]). A change of header or of a tensor's size is a
//! change to this list only.
//!
//! A [`Format`] lays a view's plan out as files: `safetensors.rs` lays it out as the base's
//! directory. Another format (a GGUF file of the same merged model) is another way of
//! turning the same plan into segments; `read_at`, the caches and the mount serve any.

mod ahead;
mod gguf;
mod merged;
mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::adapter::Adapter;
use crate::baseio::{Identity, SourceFile};
use crate::dtype::DType;
use crate::engine::{AdapterVersion, Engine, EngineOptions, Recipe};
use crate::error::{Error, Result};
use crate::plan::{Combine, MergePlan};

pub use merged::BLOCK_BYTES;

/// The files of an adapter directory the plan is read from.
const ADAPTER_FILES: [&str; 2] = [Adapter::CONFIG_FILE, Adapter::WEIGHTS_FILE];

/// Where a run of output bytes comes from.
#[derive(Debug, Clone)]
enum Source {
    /// Bytes held in memory (a safetensors header, a rewritten JSON file).
    Bytes(Arc<[u8]>),
    /// The file's source bytes starting at this offset.
    Base { offset: u64 },
    /// The source's elements from this offset, stored in `from`, served in `to` (a tensor
    /// no adapter touches, under `--dtype`).
    Converted { offset: u64, from: DType, to: DType },
    /// Bytes of adapter `adapter`'s weights file from this offset: a replaced tensor served
    /// as stored.
    Adapter { adapter: usize, offset: u64 },
    /// Merged tensor `merge` of the plan (its `W` source says where its rows come from).
    Merged { merge: usize },
    /// A tensor of a GGUF file, computed from the view's bytes of a safetensors tensor.
    Gguf(Arc<gguf::GgufTensor>),
}

#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    len: u64,
    source: Source,
}

/// One file of a merged directory.
#[derive(Debug)]
pub struct VirtualFile {
    /// Path relative to the directory root.
    pub rel: PathBuf,
    pub size: u64,
    /// The file behind it: a base file, or an adapter's tokenizer file.
    source: Arc<SourceFile>,
    segments: Vec<Segment>,
    /// Whether some bytes come from the adapters (merged or replaced tensors): then a
    /// change of an adapter's files fails reads of this file.
    adapted: bool,
    /// Other files its bytes are made from (a GGUF file: every shard, the tokenizer): a
    /// change of one fails reads, and it is served only to those who may read them all.
    inputs: Vec<Arc<SourceFile>>,
}

impl VirtualFile {
    /// The segments that bytes `offset .. offset + len` of the file fall in, each with the
    /// part of it they cover (`lo .. hi`, offsets within the segment).
    fn segments_in(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Segment, u64, u64)> {
        let end = (offset + len).min(self.size);
        let first = self.segments.partition_point(|s| s.start + s.len <= offset);
        let segments = self.segments[first..]
            .iter()
            .take_while(move |s| s.start < end);
        segments.map(move |seg| {
            let lo = offset.max(seg.start) - seg.start;
            (seg, lo, end.min(seg.start + seg.len) - seg.start)
        })
    }

    /// The `stat` of the file behind it, taken before anything was read from it: its
    /// permissions and owner are what the mount serves and `materialize` keeps.
    pub fn source(&self) -> Identity {
        self.source.identity()
    }

    /// The path of the file behind it (for messages).
    pub fn source_path(&self) -> &Path {
        &self.source.path
    }
}

/// How a view's plan is laid out as files: each a list of segments over the base, the
/// adapters, bytes in memory and merged tensors.
pub(crate) trait Format {
    fn lay_out(&self, engine: &Engine, plan: &MergePlan) -> Result<Vec<VirtualFile>>;
}

/// One merged model: a plan over the engine's base, laid out as files.
pub struct View {
    pub engine: Arc<Engine>,
    pub files: Vec<VirtualFile>,
    pub plan: MergePlan,
    /// Adapter weights files, by adapter index: the source of replaced tensors.
    adapter_weights: Vec<SourceFile>,
    /// Adapter config files, by adapter index: read at open only, held to see a change.
    adapter_configs: Vec<SourceFile>,
    /// The recipe id of each merge, by index in `plan.merges`.
    recipes: Vec<u32>,
    /// The GGUF files added by [`View::add_gguf`].
    pub gguf: Vec<GgufFile>,
}

/// A GGUF file of a view, as `inspect` describes it.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub rel: PathBuf,
    pub out: crate::gguf::OutType,
    /// `general.architecture`.
    pub architecture: String,
    pub tensors: usize,
    pub bytes: u64,
}

impl View {
    /// Plan the merge of `adapters` (`(dir, weight)`, in order) into the engine's base,
    /// stored in `dtype` (`None`: the base's). Everything is checked from the headers; no
    /// factor is read until a merged block needs it (see [`View::realize_all`]).
    pub fn open(
        engine: Arc<Engine>,
        adapters: &[(PathBuf, f64)],
        dtype: Option<DType>,
        combine: Option<&Combine>,
    ) -> Result<View> {
        // Before the adapters are read: what they are read from must be what is served.
        let recorded: HashMap<PathBuf, Identity> = adapters
            .iter()
            .flat_map(|(dir, _)| ADAPTER_FILES.map(|name| dir.join(name)))
            .filter_map(|path| Some((path.clone(), Identity::of_path(&path).ok()?)))
            .collect();
        let loaded = adapters
            .iter()
            .map(|(dir, weight)| Adapter::load(dir, *weight))
            .collect::<Result<Vec<_>>>()?;
        let plan = MergePlan::build(&engine.base, loaded, dtype, combine)?;
        let open_recorded = |path: &Path| SourceFile::open(path, recorded.get(path).copied());
        let adapter_weights = (plan.loaded.iter())
            .map(|a| open_recorded(&a.file))
            .collect::<Result<Vec<_>>>()?;
        let adapter_configs = (plan.loaded.iter())
            .map(|a| open_recorded(&a.config_path))
            .collect::<Result<Vec<_>>>()?;
        let files = safetensors::Safetensors.lay_out(&engine, &plan)?;
        let mut view = View {
            engine,
            files,
            plan,
            adapter_weights,
            adapter_configs,
            recipes: Vec::new(),
            gguf: Vec::new(),
        };
        view.recipes = (0..view.plan.merges.len())
            .map(|i| view.engine.recipe_id(view.recipe(i)))
            .collect();
        Ok(view)
    }

    /// Open a base and plan one view of it, with every factor read and checked now: what
    /// `materialize`, `inspect` and a mount of one merged model use.
    pub fn open_single(
        base_dir: &Path,
        adapters: &[(PathBuf, f64)],
        dtype: Option<DType>,
        combine: Option<&Combine>,
        options: EngineOptions,
    ) -> Result<View> {
        let engine = Arc::new(Engine::open(base_dir, options)?);
        let view = View::open(engine, adapters, dtype, combine)?;
        view.realize_all()?;
        Ok(view)
    }

    /// Everything merge `i`'s bytes are computed from.
    fn recipe(&self, i: usize) -> Recipe {
        let m = &self.plan.merges[i];
        let combination = self.plan.combination.as_ref().map(|c| c.key());
        let used = match combination {
            Some(_) => (0..self.plan.loaded.len()).collect(),
            None => m.adapters(),
        };
        Recipe {
            tensor: m.tensor,
            w: m.w,
            dtype: m.dtype,
            combination,
            adapters: (used.into_iter())
                .map(|a| AdapterVersion {
                    weights: self.adapter_weights[a].identity().version(),
                    config: self.adapter_configs[a].identity().version(),
                    weight: self.plan.loaded[a].weight.to_bits(),
                })
                .collect(),
        }
    }

    /// Read and check every merge's factors now (non-finite values, deltas that could
    /// overflow), so that a bad adapter fails here rather than at a read. They stay in the
    /// engine's factor cache as far as its budget allows. On every core (this is most of a
    /// mount's start); of several bad merges, the first in plan order is reported.
    pub fn realize_all(&self) -> Result<()> {
        use rayon::prelude::*;
        let checked: Vec<Result<()>> = (0..self.plan.merges.len())
            .into_par_iter()
            .map(|merge| self.realized(merge).map(drop))
            .collect();
        checked.into_iter().collect()
    }

    /// The base directory.
    pub fn base_dir(&self) -> &Path {
        &self.engine.base.dir
    }

    /// Subdirectories of the tree (relative), parents before children.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.engine.base.dirs
    }

    /// Fill `buf` with the bytes of file `file` from `offset`; returns the count (short only
    /// at the end of the file). Safe to call from many threads; never writes to the inputs.
    pub fn read_at(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_file(file, offset, buf, true)
    }

    /// [`View::read_at`], counting the bytes as read by a client if `client` (not when a
    /// GGUF tensor reads its source tensor's bytes).
    fn read_file(&self, file: usize, offset: u64, buf: &mut [u8], client: bool) -> Result<usize> {
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
        let stats = &self.engine.stats;
        for seg in &vf.segments[first..] {
            if done == len {
                break;
            }
            let within = pos - seg.start;
            let n = ((seg.len - within) as usize).min(len - done);
            let out = &mut buf[done..done + n];
            let counter = match &seg.source {
                Source::Bytes(bytes) => {
                    out.copy_from_slice(&bytes[within as usize..within as usize + n]);
                    None
                }
                Source::Base { offset } => {
                    self.read_source(vf, out, offset + within)?;
                    Some(&stats.bytes_passthrough)
                }
                &Source::Converted { offset, from, to } => {
                    self.read_converted(vf, offset, from, to, within, out)?;
                    Some(&stats.bytes_converted)
                }
                Source::Adapter { adapter, offset } => {
                    self.adapter_weights[*adapter].read_exact_at(out, offset + within, false)?;
                    Some(&stats.bytes_replaced)
                }
                Source::Merged { merge } => {
                    self.read_merged(vf, *merge, within, out)?;
                    Some(&stats.bytes_merged)
                }
                Source::Gguf(tensor) => {
                    self.read_gguf(tensor, within, out)?;
                    None
                }
            };
            if let (Some(counter), true) = (counter, client) {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            pos += n as u64;
            done += n;
        }
        if client {
            stats.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(len)
    }

    /// Bytes `within ..` of a converted tensor whose source elements start at `offset`:
    /// the elements the range touches are converted, from the base bytes read ahead where
    /// they are (no copy of them first), and straight into `out` where the range holds
    /// whole elements (every read but one cutting an element).
    fn read_converted(
        &self,
        vf: &VirtualFile,
        offset: u64,
        from: DType,
        to: DType,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let (first, end) = (within / to.size() as u64, within + out.len() as u64);
        let count = (end.div_ceil(to.size() as u64) - first) as usize;
        let at = offset + first * from.size() as u64;
        let skip = (within - first * to.size() as u64) as usize;
        let kernel = self.engine.kernel;
        let convert = |raw: &[u8], out: &mut [u8]| {
            if skip == 0 && out.len() == count * to.size() {
                kernel.convert(from, raw, to, out);
            } else {
                let mut converted = vec![0u8; count * to.size()];
                kernel.convert(from, raw, to, &mut converted);
                out.copy_from_slice(&converted[skip..skip + out.len()]);
            }
        };
        let len = count * from.size();
        if self.reads_ahead() {
            let staged = self
                .engine
                .ahead
                .with_staged(&vf.source, at, len, |raw| convert(raw, out))?;
            if staged.is_some() {
                return Ok(());
            }
        }
        let mut raw = vec![0u8; len];
        self.read_source(vf, &mut raw, at)?;
        convert(&raw, out);
        Ok(())
    }

    /// Fails if a file that file `file` is made from changed since lorafs opened it, looking
    /// now (one `fstat` each): the mount asks at every open, since reads served from the
    /// kernel's page cache never reach [`View::read_at`], and a `chmod` of the source
    /// must close the file to those it no longer lets in.
    pub fn check_sources(&self, file: usize) -> Result<()> {
        let vf = self.files.get(file).ok_or(Error::NoSuchFile(file))?;
        vf.source.check()?;
        for input in self.other_sources(vf) {
            input.check()?;
        }
        Ok(())
    }

    /// Fails if a file `vf` is made from was seen changed (no system call).
    fn sources_unchanged(&self, vf: &VirtualFile) -> Result<()> {
        vf.source.unchanged()?;
        for input in self.other_sources(vf) {
            input.unchanged()?;
        }
        Ok(())
    }

    /// The files besides its own source that `vf`'s bytes are made from: every adapter
    /// file if some bytes come from the adapters (merged or replaced tensors), and its other
    /// inputs (a GGUF file's). A change of one fails reads of `vf`, and the mount serves
    /// `vf` only to those who may read every one.
    pub fn other_sources<'a>(
        &'a self,
        vf: &'a VirtualFile,
    ) -> impl Iterator<Item = &'a SourceFile> + 'a {
        (self.adapter_files().filter(|_| vf.adapted)).chain(vf.inputs.iter().map(|s| &**s))
    }

    /// Every adapter file the plan was read from.
    fn adapter_files(&self) -> impl Iterator<Item = &SourceFile> {
        self.adapter_weights.iter().chain(&self.adapter_configs)
    }

    /// Read bytes of the file behind `vf` (those read ahead from memory), around the page
    /// cache if so configured.
    fn read_source(&self, vf: &VirtualFile, buf: &mut [u8], offset: u64) -> Result<()> {
        let (engine, direct) = (&self.engine, self.engine.direct_base_reads);
        match self.reads_ahead() {
            true => engine.ahead.read(&vf.source, buf, offset, direct),
            false => vf.source.read_exact_at(buf, offset, direct),
        }
    }

    /// Total bytes of the merged directory's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
