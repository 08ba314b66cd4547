//! The merged model directory, byte by byte.
//!
//! [`Engine::read_at`] is the one function through which every byte of the merged directory
//! is produced: FUSE reads and `materialize` both call it, so they cannot disagree.
//!
//! A file is a list of segments. A pass-through file is one segment of base bytes. A
//! safetensors file is its header (kept in memory, served as is), runs of untouched tensors
//! (base bytes at the same offsets), and merged tensors, computed in blocks of whole rows.
//! A later change of header or of a tensor's size is a change to this list only.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::adapter::Adapter;
use crate::cache::{Block, BlockCache};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::model::BaseModel;
use crate::plan::{MergePlan, TensorMerge};

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
    /// Merged tensor `merge` of the plan; its base rows start at `base_offset`.
    Merged { merge: usize, base_offset: u64 },
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
    base: File,
    segments: Vec<Segment>,
}

/// Counters of an engine's work, for logs and the mount's stats.
#[derive(Default, Debug)]
pub struct EngineStats {
    pub bytes_read: AtomicU64,
    pub bytes_passthrough: AtomicU64,
    pub bytes_merged: AtomicU64,
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
    pub kernel: Kernel,
    pub cache: BlockCache,
    /// Tell the kernel to drop base-file pages once read (`POSIX_FADV_DONTNEED`). A mount
    /// puts merged pages in the page cache; for a model over half of RAM, base pages kept
    /// beside them would make the two evict each other.
    pub drop_base_pages: bool,
    pub stats: EngineStats,
    /// Number of values in the base's tensors (for `inspect`).
    pub base_params: usize,
    /// Number of tensors in the base's safetensors files.
    pub base_tensors: usize,
}

impl Engine {
    /// Open a base model and adapters (`(dir, weight)`, in order) and plan the merge. All
    /// inputs are validated here; reads afterwards fail only on I/O errors.
    pub fn open(
        base_dir: &Path,
        adapters: &[(PathBuf, f64)],
        options: EngineOptions,
    ) -> Result<Engine> {
        let base = BaseModel::open(base_dir)?;
        let adapters = adapters
            .iter()
            .map(|(dir, weight)| Adapter::load(dir, *weight))
            .collect::<Result<Vec<_>>>()?;
        let plan = MergePlan::build(&base, &adapters)?;
        drop(adapters); // the plan holds the factors it needs, packed.
        Engine::from_plan(base, plan, options)
    }

    fn from_plan(base: BaseModel, plan: MergePlan, options: EngineOptions) -> Result<Engine> {
        let mut files = Vec::with_capacity(base.files.len());
        for file in &base.files {
            let handle = File::open(&file.path).map_err(|e| Error::io(&file.path, e))?;
            let segments = match file.layout {
                None => vec![Segment {
                    start: 0,
                    len: file.size,
                    source: Source::Base { offset: 0 },
                }],
                Some(li) => safetensors_segments(&base, li, &plan),
            };
            files.push(VirtualFile {
                rel: file.rel.clone(),
                size: file.size,
                base_path: file.path.clone(),
                base: handle,
                segments,
            });
        }
        Ok(Engine {
            base_dir: base.dir.clone(),
            base_params: base.num_params(),
            base_tensors: base.tensors.len(),
            files,
            dirs: base.dirs,
            plan,
            kernel: Kernel::selected(),
            cache: BlockCache::new(options.cache_bytes),
            drop_base_pages: false,
            stats: EngineStats::default(),
        })
    }

    /// Fill `buf` with the bytes of file `file` from `offset`; returns the count (short only
    /// at the end of the file). Safe to call from many threads; never writes to the inputs.
    pub fn read_at(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let vf = self.files.get(file).ok_or(Error::NoSuchFile(file))?;
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
                Source::Merged { merge, base_offset } => {
                    self.read_merged(vf, *merge, *base_offset, within, out)?;
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

    /// Rows per block of a merged tensor.
    pub fn block_rows(m: &TensorMerge) -> usize {
        (BLOCK_BYTES / m.row_bytes().max(1)).max(1)
    }

    /// Copy bytes `within .. within + out.len()` of merged tensor `merge` into `out`,
    /// computing the blocks it covers (several at once on the thread pool).
    fn read_merged(
        &self,
        vf: &VirtualFile,
        merge: usize,
        base_offset: u64,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let m = &self.plan.merges[merge];
        let block_bytes = (Self::block_rows(m) * m.row_bytes()) as u64;
        let first = within / block_bytes;
        let last = (within + out.len() as u64 - 1) / block_bytes;
        let get = |b: u64| self.block(vf, merge, base_offset, b as usize);
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
    fn block(&self, vf: &VirtualFile, merge: usize, base_offset: u64, b: usize) -> Result<Block> {
        let m = &self.plan.merges[merge];
        self.cache.get_or_compute((merge as u32, b as u32), || {
            let rows = Self::block_rows(m);
            let row0 = b * rows;
            let n = rows.min(m.factors.rows - row0);
            let mut data = self.cache.buffer(n * m.row_bytes());
            read_exact_at(
                &vf.base,
                &vf.base_path,
                &mut data,
                base_offset + (row0 * m.row_bytes()) as u64,
            )?;
            self.kernel.merge(m.dtype, &m.factors, row0, &mut data);
            Ok(data)
        })
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
            let Source::Merged { merge, base_offset } = seg.source else {
                continue;
            };
            let m = &self.plan.merges[merge];
            let block_bytes = (Self::block_rows(m) * m.row_bytes()) as u64;
            let lo = offset.max(seg.start) - seg.start;
            let hi = end.min(seg.start + seg.len) - seg.start;
            for b in lo / block_bytes..hi.div_ceil(block_bytes) {
                if self.cache.present_or_pending((merge as u32, b as u32)) {
                    continue;
                }
                let engine = Arc::clone(self);
                rayon::spawn(move || {
                    if let Err(err) =
                        engine.block(&engine.files[file], merge, base_offset, b as usize)
                    {
                        log::warn!(
                            "prefetch of {} failed: {err}",
                            engine.files[file].rel.display()
                        );
                    }
                });
            }
        }
    }

    /// Read base bytes, dropping their pages from the page cache afterwards if so configured.
    fn read_base(&self, vf: &VirtualFile, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact_at(&vf.base, &vf.base_path, buf, offset)?;
        if self.drop_base_pages {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise only advises the kernel about a file we hold open.
            let rc = unsafe {
                libc::posix_fadvise(
                    vf.base.as_raw_fd(),
                    offset as i64,
                    buf.len() as i64,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            if rc != 0 {
                log::debug!(
                    "posix_fadvise on {} failed: errno {rc}",
                    vf.base_path.display()
                );
            }
        }
        Ok(())
    }

    /// Total bytes of the base's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Index of the file at a relative path.
    pub fn file_index(&self, rel: &Path) -> Option<usize> {
        self.files.iter().position(|f| f.rel == rel)
    }
}

/// The segments of a safetensors file: its header, then its tensors in file order, runs of
/// untouched tensors joined into one pass-through segment.
fn safetensors_segments(base: &BaseModel, li: usize, plan: &MergePlan) -> Vec<Segment> {
    let layout = &base.layouts[li];
    let mut segments = vec![Segment {
        start: 0,
        len: layout.header.len() as u64,
        source: Source::Bytes(Arc::from(layout.header.as_slice())),
    }];
    for (ti, t) in layout.tensors.iter().enumerate() {
        let merged = plan
            .merges
            .binary_search_by_key(&(li, ti), |m| (m.layout, m.tensor))
            .ok();
        match (merged, segments.last_mut()) {
            (Some(merge), _) => segments.push(Segment {
                start: t.offset,
                len: t.len,
                source: Source::Merged {
                    merge,
                    base_offset: t.offset,
                },
            }),
            (
                None,
                Some(Segment {
                    start,
                    len,
                    source: Source::Base { .. },
                }),
            ) if *start + *len == t.offset => {
                *len += t.len;
            }
            (None, _) => segments.push(Segment {
                start: t.offset,
                len: t.len,
                source: Source::Base { offset: t.offset },
            }),
        }
    }
    segments.retain(|s| s.len > 0);
    segments
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::io(
                path,
                std::io::Error::new(
                    e.kind(),
                    "file is shorter than when lorafs opened it; inputs must not change",
                ),
            )
        } else {
            Error::io(path, e)
        }
    })
}
