//! The arguments every command that opens a base takes, and their parsers.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use lorafs::args::{parse_adapter, resolve_adapters};
use lorafs::{Engine, EngineOptions, View};

#[derive(Args)]
pub(crate) struct MergeArgs {
    /// Base model directory (config.json, tokenizer, *.safetensors), or a repo id
    /// `org/name[@revision]` already in the local Hugging Face cache.
    pub(crate) base: PathBuf,
    /// LoRA adapter directory (or cached repo id), optionally with a weight: DIR or
    /// DIR:WEIGHT. An argument that is an existing path is taken whole (a directory named
    /// `ad:2` is that directory at weight 1). Repeat to merge several; their deltas are
    /// summed in f32 and rounded once.
    #[arg(long = "adapter", short = 'a', value_name = "DIR[:WEIGHT]", value_parser = parse_adapter)]
    pub(crate) adapters: Vec<(PathBuf, f64)>,
    /// Bytes of merged blocks to cache (e.g. 512MiB, 2GiB). Default: 64MiB for a mount,
    /// 32MiB for materialize, which streams and reads each block once.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) cache_size: Option<usize>,
    /// Bytes of the base read ahead of a sequential reader of a mount (and of
    /// materialize's) when the base is read with O_DIRECT, several reads in flight, so the
    /// disk stays busy while blocks are merged (0: read only what is asked). Through the
    /// page cache the kernel reads ahead itself.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64MiB")]
    pub(crate) base_read_ahead: usize,
    /// Read base files with O_DIRECT, keeping them out of the page cache: auto (when the
    /// model is over half of RAM, so base and merged pages do not evict each other, or when
    /// less than half of its weights are in the page cache, where reading around it is
    /// faster), always or never.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub(crate) direct_io: DirectIo,
    /// Store floating tensors in this dtype: f16, bf16 or f32 (default: as in the base).
    /// Merged tensors are still rounded once: W widened to f32, the delta added, rounded
    /// into DTYPE. config.json says the new dtype.
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    pub(crate) dtype: Option<lorafs::dtype::DType>,
    /// Also serve the merged model as GGUF files, `model-TYPE.gguf` for each TYPE (F32,
    /// F16, BF16, Q8_0: llama.cpp's --outtype values), byte-identical to what llama.cpp's
    /// convert_hf_to_gguf.py writes from a materialized copy. For materialize, an OUT ending
    /// in .gguf writes just that file (one TYPE).
    #[arg(long, value_name = "TYPE[,TYPE...]", value_delimiter = ',', value_parser = parse_gguf)]
    pub(crate) gguf: Vec<lorafs::gguf::OutType>,
    /// Combine the adapters as PEFT's add_weighted_adapter(combination_type=TYPE) then
    /// merge_and_unload: cat, linear, ties, dare_linear, dare_ties, magnitude_prune, svd
    /// (docs/SEMANTICS.md, "Combining adapters"). Without it, the weighted deltas are summed.
    #[arg(long, value_name = "TYPE")]
    pub(crate) combine: Option<lorafs::plan::Method>,
    /// The fraction of each factor's values kept (ties, dare_*, magnitude_prune; 1 keeps all).
    #[arg(long, value_name = "D", requires = "combine")]
    pub(crate) density: Option<f64>,
    /// How ties and dare_ties elect each value's sign: total (the sign of the sum) or
    /// frequency (the more frequent sign).
    #[arg(long, value_name = "METHOD", requires = "combine")]
    pub(crate) majority_sign: Option<lorafs::plan::MajoritySign>,
    /// The rank svd truncates to (default: the largest adapter rank).
    #[arg(long, value_name = "N", requires = "combine")]
    pub(crate) svd_rank: Option<usize>,
    /// Seeds DARE's random masks: the same seed gives the same bytes.
    #[arg(long, value_name = "S", requires = "combine", default_value_t = 0)]
    pub(crate) seed: u64,
}

pub(crate) fn parse_gguf(arg: &str) -> Result<lorafs::gguf::OutType, String> {
    lorafs::gguf::OutType::parse(arg)
        .ok_or_else(|| format!("unknown GGUF type {arg:?} (use F32, F16, BF16 or Q8_0)"))
}

/// Many merged models in one mount, each a directory named after its view.
#[derive(Args)]
pub(crate) struct ViewArgs {
    /// A view at MNT/NAME: SPEC is a comma-separated list of ADAPTER[:WEIGHT], merged as
    /// --adapter merges them. Repeat for more views. NAME is a relative path (letters,
    /// digits, `._+-`, up to 8 components).
    #[arg(long = "view", value_name = "NAME=SPEC", value_parser = parse_view)]
    pub(crate) views: Vec<(String, Vec<(PathBuf, f64)>)>,
    /// Every PEFT adapter directory under DIR (up to 4 levels down) is a view at its path
    /// relative to DIR; DIR is watched, and views appear, change and go with it.
    #[arg(long, value_name = "DIR")]
    pub(crate) catalog: Option<PathBuf>,
    /// A TOML file of named views, each with its adapters and weights and optionally its
    /// dtype, GGUF types and combination method (format in docs/CLI.md). Read when
    /// mounting (a bad file mounts nothing) and again whenever it or an adapter it names
    /// changes (a bad version keeps the views as they were, with a log line). Its names
    /// must not be those of --view views or catalog views.
    #[arg(long = "views", value_name = "FILE")]
    pub(crate) views_file: Option<PathBuf>,
    /// Bytes of factors to keep for the views (e.g. 2GiB): the least recently used views'
    /// factors are dropped beyond it and read again when needed.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4GiB")]
    pub(crate) factor_cache: usize,
}

impl ViewArgs {
    pub(crate) fn any(&self) -> bool {
        !self.views.is_empty() || self.catalog.is_some() || self.views_file.is_some()
    }
}

/// `NAME=SPEC`, SPEC a comma-separated list of `ADAPTER[:WEIGHT]`.
pub(crate) fn parse_view(arg: &str) -> Result<(String, Vec<(PathBuf, f64)>), String> {
    let (name, spec) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected NAME=SPEC"))?;
    lorafs::control::check_view_name(name)?;
    Ok((name.to_string(), lorafs::control::parse_spec(spec)?))
}

pub(crate) fn parse_dtype(arg: &str) -> Result<lorafs::dtype::DType, String> {
    lorafs::dtype::DType::parse(arg)
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Warm {
    Auto,
    Always,
    Never,
}

impl Warm {
    /// Whether to warm a model of `bytes` bytes: `auto` when it fits in a quarter of RAM and
    /// has no GGUF file (with --gguf, which format a loader reads is not known: see
    /// MountArgs::warm).
    pub(crate) fn wanted(self, gguf: bool, bytes: u64) -> bool {
        match self {
            Warm::Always => true,
            Warm::Never => false,
            Warm::Auto => !gguf && bytes <= total_ram() / 4,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum DirectIo {
    Auto,
    Always,
    Never,
}

/// Physical memory in bytes.
pub(crate) fn total_ram() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        u64::MAX
    } else {
        pages as u64 * size as u64
    }
}

/// Why `--direct-io auto` reads this engine's base around the page cache, if it does: a
/// model over half of RAM, whose base pages would evict the merged ones; or a base mostly not
/// in the page cache, which `O_DIRECT` into huge-page buffers reads faster than the page
/// cache fills (docs/DESIGN.md, "Buffers on huge pages"). A base mostly cached is read from
/// there.
fn auto_direct_io(engine: &Engine) -> Option<String> {
    let size = engine.base_bytes();
    if size > total_ram() / 2 {
        return Some(format!("the model's {size} bytes are over half of RAM"));
    }
    let (cached, weights) = engine.base_weights_cached()?;
    (cached < weights / 2)
        .then(|| format!("{cached} of the base's {weights} bytes of weights are in the page cache"))
}

impl MergeArgs {
    /// The `--combine` method with its parameters, checked.
    pub(crate) fn combine(&self) -> anyhow::Result<Option<lorafs::plan::Combine>> {
        let Some(method) = self.combine else {
            return Ok(None);
        };
        let combine = lorafs::plan::Combine {
            method,
            density: self.density,
            majority_sign: self.majority_sign.unwrap_or_default(),
            svd_rank: self.svd_rank,
            seed: self.seed,
        };
        combine.check().map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(combine))
    }

    /// Open the engine; `default_cache` is the cache budget unless --cache-size says.
    /// The engine over the base (O_DIRECT chosen by --direct-io: see [`auto_direct_io`]).
    /// `reads`: it will read the weights (a mount, materialize; not inspect), so where it
    /// reads them with O_DIRECT its read-ahead buffers are prepared now, in the background.
    pub(crate) fn engine(&self, default_cache: usize, reads: bool) -> anyhow::Result<Engine> {
        let options = EngineOptions {
            cache_bytes: self.cache_size.unwrap_or(default_cache),
            ahead: lorafs::ahead::AheadOptions {
                budget: self.base_read_ahead as u64,
                ..Default::default()
            },
            ..EngineOptions::default()
        };
        let base = lorafs::hub::resolve(&self.base)?;
        let mut engine = Engine::open(&base, options)?;
        let why = match self.direct_io {
            DirectIo::Always => Some("--direct-io always".to_string()),
            DirectIo::Never => None,
            DirectIo::Auto => auto_direct_io(&engine),
        };
        if let Some(why) = &why {
            log::info!("reading base files with O_DIRECT, around the page cache ({why})");
        }
        engine.direct_base_reads = why.is_some();
        if reads && engine.direct_base_reads {
            engine.ahead.prepare();
        }
        Ok(engine)
    }

    /// The one merged model of `--adapter`, every factor read and checked.
    pub(crate) fn open(&self, default_cache: usize, reads: bool) -> anyhow::Result<View> {
        if self.adapters.is_empty() {
            anyhow::bail!("name the adapters to merge with --adapter DIR[:WEIGHT]");
        }
        let engine = Arc::new(self.engine(default_cache, reads)?);
        let adapters = resolve_adapters(&self.adapters)?;
        let combine = self.combine()?;
        let mut view = View::open(engine, &adapters, self.dtype, combine.as_ref())?;
        view.realize_all()?;
        view.add_gguf(&self.gguf)?;
        Ok(view)
    }
}

/// A byte count: a number with an optional unit (B, K/KB/KiB, M/MB/MiB, G/GB/GiB), all
/// binary multiples.
pub(crate) fn parse_size(arg: &str) -> Result<usize, String> {
    let arg = arg.trim();
    let split = arg
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(arg.len());
    let (number, unit) = arg.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{arg:?} is not a size like 512MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((number * (1u64 << shift) as f64) as usize)
}

/// Cache budgets by default: a mount's is the engine's (see there why it is small);
/// materialize reads every block once, in order, and only needs the blocks its 16 MiB
/// chunks share at their edges.
pub(crate) const MOUNT_CACHE: usize = lorafs::engine::DEFAULT_CACHE_BYTES;
pub(crate) const MATERIALIZE_CACHE: usize = 32 << 20;

/// Read-ahead for the mount, KiB. Cold sequential reads through FUSE at the kernel's
/// default 128 KiB run about a third as fast as at 1-8 MiB (BENCHMARKS.md, "Mount").
pub(crate) const DEFAULT_READ_AHEAD_KB: u32 = 4096;

/// FUSE's `max_background` for the mount: more reads in flight than the kernel's default 12
/// (readahead of several files at once, and threads of a loader, each keep some outstanding).
pub(crate) const DEFAULT_MAX_BACKGROUND: u16 = 64;

pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
    }
}
