//! What every view of one base shares: the base opened once, the kernel, the caches of
//! merged blocks and of factors, the table of recipes, the counters.
//!
//! A view ([`crate::view::View`]) is one merged model directory over the engine's base. Its
//! merged tensors are computed from recipes: everything a tensor's bytes depend on (the
//! base tensor, where `W` is read, the output dtype, and each contributing adapter's file
//! versions and weight). Equal recipes get one id, and the caches are keyed by it, so two
//! views made from the same adapters share blocks and factors, and no view can be served
//! bytes made from other inputs than its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::ahead::{AheadOptions, ReadAhead};
use crate::baseio::{SourceFile, Version};
use crate::cache::{BlockCache, Cache};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernel::Kernel;
use crate::model::{BaseModel, INDEX_FILE};
use crate::plan::{CombinationKey, Realized, TensorId, WSource};

/// Counters of an engine's work, for logs and the mount's stats.
#[derive(Default, Debug)]
pub struct EngineStats {
    pub bytes_read: AtomicU64,
    pub bytes_passthrough: AtomicU64,
    pub bytes_merged: AtomicU64,
    /// Bytes served from adapter files (replaced tensors).
    pub bytes_replaced: AtomicU64,
    /// Bytes converted to another dtype without a merge (`--dtype`).
    pub bytes_converted: AtomicU64,
    /// Tensors whose factors were read from the adapter files.
    pub factors_loaded: AtomicU64,
}

/// Bytes of merged blocks a mount keeps by default. They serve readers that come back (a
/// kernel request spanning two blocks, blocks merged ahead of a reader, several loader
/// threads, mmap faults out of order); the page cache keeps what was read, so the blocks are
/// a second copy, and every byte of the budget is memory a fresh mount touches for the first
/// time (256 MiB took a sixth of the CPU a fresh mount spent serving a 1 GB GGUF:
/// docs/DESIGN.md, "Where a cold mapping's CPU goes").
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Tuning knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bytes of merged blocks to keep.
    pub cache_bytes: usize,
    /// Bytes of factors to keep; the least recently used are dropped beyond it and read
    /// again when needed.
    pub factor_bytes: usize,
    /// Reading the base ahead of sequential readers.
    pub ahead: AheadOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            factor_bytes: usize::MAX,
            ahead: AheadOptions::default(),
        }
    }
}

/// The version of one adapter a recipe uses: its two files and the user's weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdapterVersion {
    pub weights: Version,
    pub config: Version,
    /// The weight's bits: weights that differ in any bit are different recipes.
    pub weight: u64,
}

/// Everything a merged tensor's bytes are computed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipe {
    pub tensor: TensorId,
    pub w: WSource,
    pub dtype: DType,
    /// The adapters it reads, in the order the view lists them (all of the view's with a
    /// combination, whose rank and scale depend on every adapter's config).
    pub adapters: Vec<AdapterVersion>,
    /// The view's `--combine` and every parameter of it (the seed too).
    pub combination: Option<CombinationKey>,
}

pub struct Engine {
    pub base: BaseModel,
    /// The base's files, by index in `base.files`: weights keep a descriptor, other files
    /// are opened at each read (see [`crate::baseio`]).
    pub base_files: Vec<Arc<SourceFile>>,
    pub kernel: Kernel,
    pub blocks: BlockCache,
    pub factors: Cache<Realized>,
    recipes: Mutex<HashMap<Recipe, u32>>,
    /// Read the base with `O_DIRECT`, around the page cache (see [`crate::baseio`]): for
    /// models over half of RAM, whose base pages would evict the merged ones.
    pub direct_base_reads: bool,
    /// Base bytes read ahead of sequential readers.
    pub ahead: ReadAhead,
    pub stats: EngineStats,
}

impl Engine {
    /// Open the base model: its files checked and opened, nothing merged.
    pub fn open(base_dir: &Path, options: EngineOptions) -> Result<Engine> {
        let base = BaseModel::open(base_dir)?;
        let base_files = (base.files.iter())
            .map(|file| {
                let input = match file.layout {
                    Some(_) => SourceFile::open(&file.path, Some(file.identity))?,
                    None => SourceFile::lazy(&file.path, file.identity),
                };
                // The walk read the index and config.json after finding them: they must
                // still be the version walked, which their reads stand for.
                let read_by_walk =
                    file.rel == Path::new(INDEX_FILE) || file.rel == Path::new("config.json");
                if read_by_walk {
                    input.check()?;
                }
                Ok(Arc::new(input))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Engine {
            base,
            base_files,
            kernel: Kernel::selected(),
            blocks: BlockCache::new(options.cache_bytes),
            factors: Cache::new(options.factor_bytes),
            recipes: Mutex::new(HashMap::new()),
            direct_base_reads: false,
            ahead: ReadAhead::new(options.ahead),
            stats: EngineStats::default(),
        })
    }

    /// The id of `recipe`: the same for equal recipes, different for any other.
    pub fn recipe_id(&self, recipe: Recipe) -> u32 {
        let mut recipes = self.recipes.lock().unwrap_or_else(|p| p.into_inner());
        let next = recipes.len() as u32;
        *recipes.entry(recipe).or_insert(next)
    }

    /// Bytes of the base's files.
    pub fn base_bytes(&self) -> u64 {
        self.base.files.iter().map(|f| f.size).sum()
    }

    /// Of the base's weights files, the bytes in the page cache now and in all; `None` if
    /// the kernel cannot say.
    pub fn base_weights_cached(&self) -> Option<(u64, u64)> {
        let weights = (self.base.files.iter().zip(&self.base_files))
            .filter(|(file, _)| file.layout.is_some());
        let (mut cached, mut total) = (0, 0);
        for (file, source) in weights {
            cached += source.cached_bytes()?;
            total += file.size;
        }
        Some((cached, total))
    }
}
