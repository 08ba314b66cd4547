//! The `lorafs` command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use lorafs::args::{parse_adapter, resolve_adapters};
use lorafs::materialize::{materialize, Interrupt, MaterializeOptions};
use lorafs::{Engine, EngineOptions, View};

#[derive(Parser)]
#[command(
    name = "lorafs",
    version,
    about = "A base model plus LoRA adapters, served as the merged model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the merged model directory to OUT.
    Materialize {
        #[command(flatten)]
        inputs: MergeArgs,
        /// Output directory (must not exist, unless --force). Never a symbolic link, a
        /// mount point, the current directory or one of its ancestors.
        out: PathBuf,
        /// Replace OUT if it exists (a directory or regular file): the old one is removed
        /// once the new one is in place.
        #[arg(long)]
        force: bool,
    },
    /// Mount the merged model read-only at MOUNTPOINT (FUSE). Returns once the mount is
    /// ready and keeps serving in the background, unless --foreground.
    Mount {
        #[command(flatten)]
        inputs: MergeArgs,
        #[command(flatten)]
        views: ViewArgs,
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// Let users other than the one mounting read the mount (needs `user_allow_other`
        /// in /etc/fuse.conf when not root).
        #[arg(long)]
        allow_other: bool,
        /// Read-ahead of the mount in KiB (0 keeps the kernel's 128 KiB). Needs root.
        #[arg(long, value_name = "KIB", default_value_t = DEFAULT_READ_AHEAD_KB)]
        read_ahead_kb: u32,
        /// Merge the whole model into the page cache in the background once mounted (with
        /// views: each view when a file of it is first opened): auto (when it fits in a
        /// quarter of RAM), always or never.
        #[arg(long, value_name = "WHEN", default_value = "auto")]
        warm: Warm,
        /// Stay attached and log to stderr; SIGINT or SIGTERM unmounts.
        #[arg(long)]
        foreground: bool,
        /// In the background, append logs to this file (default: discard them).
        #[arg(long, value_name = "PATH")]
        log_file: Option<PathBuf>,
        /// Internal: the background server started by `mount` without --foreground.
        #[arg(long, hide = true)]
        daemon_child: bool,
    },
    /// Unmount a lorafs mount (like `umount MOUNTPOINT`); its server exits.
    Unmount { mountpoint: PathBuf },
    /// List or change the views of a mount made with --view or --catalog, while it serves.
    ///
    /// Only the user who mounted and root may use them.
    View {
        #[command(subcommand)]
        command: ViewCommand,
    },
    /// Show the merge plan: adapters, scales, the tensors they change.
    Inspect {
        #[command(flatten)]
        inputs: MergeArgs,
        #[command(flatten)]
        views: ViewArgs,
        /// List every merged tensor.
        #[arg(long)]
        tensors: bool,
    },
}

#[derive(Subcommand)]
enum ViewCommand {
    /// List the views: `NAME  SPEC`, one a line, sorted by name.
    Ls {
        mountpoint: PathBuf,
        /// A JSON array of {name, spec, adapters: [{dir, weight}], source: named|catalog}.
        #[arg(long)]
        json: bool,
    },
    /// Add view NAME, merging the adapters of SPEC.
    Add {
        mountpoint: PathBuf,
        #[command(flatten)]
        view: NamedSpec,
    },
    /// Make view NAME merge the adapters of SPEC instead.
    Set {
        mountpoint: PathBuf,
        #[command(flatten)]
        view: NamedSpec,
    },
    /// Remove view NAME.
    Rm {
        mountpoint: PathBuf,
        #[arg(help = VIEW_NAME_HELP)]
        name: String,
    },
}

const VIEW_NAME_HELP: &str = "A relative path of 1 to 8 components of [A-Za-z0-9._+-], \
                              none starting with '.'";

#[derive(Args)]
struct NamedSpec {
    #[arg(help = VIEW_NAME_HELP)]
    name: String,
    /// ADAPTER[:WEIGHT], comma-separated, each as --adapter takes it (a directory, relative
    /// to here, or a cached repo id).
    spec: String,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model directory (config.json, tokenizer, *.safetensors), or a repo id
    /// `org/name[@revision]` already in the local Hugging Face cache.
    base: PathBuf,
    /// LoRA adapter directory (or cached repo id), optionally with a weight: DIR or
    /// DIR:WEIGHT. An argument that is an existing path is taken whole (a directory named
    /// `ad:2` is that directory at weight 1). Repeat to merge several; their deltas are
    /// summed in f32 and rounded once.
    #[arg(long = "adapter", short = 'a', value_name = "DIR[:WEIGHT]", value_parser = parse_adapter)]
    adapters: Vec<(PathBuf, f64)>,
    /// Bytes of merged blocks to cache (e.g. 512MiB, 2GiB). Default: 256MiB for a mount,
    /// 32MiB for materialize, which streams and reads each block once.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_size: Option<usize>,
    /// Read base files with O_DIRECT, keeping them out of the page cache: auto (when the
    /// model is over half of RAM, so base and merged pages do not evict each other), always
    /// or never.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    direct_io: DirectIo,
    /// Store floating tensors in this dtype: f16, bf16 or f32 (default: as in the base).
    /// Merged tensors are still rounded once: W widened to f32, the delta added, rounded
    /// into DTYPE. config.json says the new dtype.
    #[arg(long, value_name = "DTYPE", value_parser = parse_dtype)]
    dtype: Option<lorafs::dtype::DType>,
}

/// Many merged models in one mount, each a directory named after its view.
#[derive(Args)]
struct ViewArgs {
    /// A view at MNT/NAME: SPEC is a comma-separated list of ADAPTER[:WEIGHT], merged as
    /// --adapter merges them. Repeat for more views. NAME is a relative path (letters,
    /// digits, `._+-`, up to 8 components).
    #[arg(long = "view", value_name = "NAME=SPEC", value_parser = parse_view)]
    views: Vec<(String, Vec<(PathBuf, f64)>)>,
    /// Every PEFT adapter directory under DIR (up to 4 levels down) is a view at its path
    /// relative to DIR; DIR is watched, and views appear, change and go with it.
    #[arg(long, value_name = "DIR")]
    catalog: Option<PathBuf>,
    /// Bytes of factors to keep for the views (e.g. 2GiB): the least recently used views'
    /// factors are dropped beyond it and read again when needed.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4GiB")]
    factor_cache: usize,
}

impl ViewArgs {
    fn any(&self) -> bool {
        !self.views.is_empty() || self.catalog.is_some()
    }
}

/// `NAME=SPEC`, SPEC a comma-separated list of `ADAPTER[:WEIGHT]`.
fn parse_view(arg: &str) -> Result<(String, Vec<(PathBuf, f64)>), String> {
    let (name, spec) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected NAME=SPEC"))?;
    lorafs::control::check_view_name(name)?;
    Ok((name.to_string(), lorafs::control::parse_spec(spec)?))
}

fn parse_dtype(arg: &str) -> Result<lorafs::dtype::DType, String> {
    use lorafs::dtype::DType;
    match arg.to_ascii_lowercase().as_str() {
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        _ => Err(format!("unknown dtype {arg:?} (use f16, bf16 or f32)")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Warm {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DirectIo {
    Auto,
    Always,
    Never,
}

/// Physical memory in bytes.
fn total_ram() -> u64 {
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

impl MergeArgs {
    /// Open the engine; `default_cache` is the cache budget unless --cache-size says.
    /// The engine over the base (O_DIRECT chosen by the base's size).
    fn engine(&self, default_cache: usize) -> anyhow::Result<Engine> {
        let options = EngineOptions {
            cache_bytes: self.cache_size.unwrap_or(default_cache),
            ..EngineOptions::default()
        };
        let base = lorafs::hub::resolve(&self.base)?;
        let mut engine = Engine::open(&base, options)?;
        engine.direct_base_reads = match self.direct_io {
            DirectIo::Always => true,
            DirectIo::Never => false,
            DirectIo::Auto => engine.base_bytes() > total_ram() / 2,
        };
        if engine.direct_base_reads {
            log::info!("reading base files with O_DIRECT, around the page cache");
        }
        Ok(engine)
    }

    /// The one merged model of `--adapter`, every factor read and checked.
    fn open(&self, default_cache: usize) -> anyhow::Result<View> {
        if self.adapters.is_empty() {
            anyhow::bail!("name the adapters to merge with --adapter DIR[:WEIGHT]");
        }
        let engine = Arc::new(self.engine(default_cache)?);
        let adapters = resolve_adapters(&self.adapters)?;
        let view = View::open(engine, &adapters, self.dtype)?;
        view.realize_all()?;
        Ok(view)
    }
}

/// A mount of views: the engine, an empty tree, and the registry with the `--view` views
/// in it (each checked in full: a bad one mounts nothing).
fn open_views(
    inputs: &MergeArgs,
    args: &ViewArgs,
    mountpoint: &Path,
    warm: Warm,
) -> anyhow::Result<(lorafs::fuse::LorafsFs, lorafs::fuse::Live)> {
    use lorafs::control::ViewSource;
    use lorafs::fuse::views::Views;
    if !inputs.adapters.is_empty() {
        anyhow::bail!(
            "--adapter merges one model at the mount point, --view and --catalog serve views \
             under it: use one or the other (--adapter A --adapter B is --view NAME=A,B)"
        );
    }
    let mut engine = inputs.engine(MOUNT_CACHE)?;
    engine.factors = lorafs::cache::Cache::new(args.factor_cache);
    let engine = Arc::new(engine);
    let fs = lorafs::fuse::LorafsFs::of_views(engine.clone())?;
    // Each view is about the base's size: warm one when first opened if that fits.
    let warm = match warm {
        Warm::Always => true,
        Warm::Never => false,
        Warm::Auto => !engine.direct_base_reads && engine.base_bytes() <= total_ram() / 4,
    };
    let views = Arc::new(Views::new(engine, inputs.dtype, fs.tree(), warm));
    fs.attach(views.clone());
    for (name, spec) in &args.views {
        let view = resolve_adapters(spec)
            .and_then(|adapters| views.open(&adapters, &ViewSource::Named))
            .with_context(|| format!("view {name}"))?;
        let name = Path::new(name);
        views
            .insert(name, view, ViewSource::Named)
            .map_err(|e| anyhow::anyhow!("view {}: {e}", name.display()))?;
    }
    let catalog = match &args.catalog {
        Some(dir) => Some(open_catalog(dir, mountpoint, &views)?),
        None => None,
    };
    let registry = views.clone();
    let start = Box::new(move || {
        let mut services: Vec<Box<dyn std::any::Any>> = Vec::new();
        if let Some((root, found)) = catalog {
            let views = registry.clone();
            let watcher =
                lorafs::catalog::watch(&root, &found, move |event| views.catalog_event(event))?;
            services.push(Box::new(watcher));
        }
        Ok(services)
    });
    Ok((fs, lorafs::fuse::Live { views, start }))
}

/// The catalog at `dir`: its adapter directories found now, each added as a view (or
/// skipped with a log line). Returns its root and what was found, for the watcher.
fn open_catalog(
    dir: &Path,
    mountpoint: &Path,
    views: &lorafs::fuse::views::Views,
) -> anyhow::Result<(PathBuf, Vec<lorafs::catalog::Found>)> {
    let root = (dir.canonicalize()).with_context(|| format!("catalog {}", dir.display()))?;
    let mnt = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    if mnt.starts_with(&root) {
        anyhow::bail!(
            "the mount point {} is inside the catalog {}: the catalog would find the mount's \
             own views; mount elsewhere",
            mnt.display(),
            root.display()
        );
    }
    let found =
        lorafs::catalog::scan(&root).with_context(|| format!("catalog {}", root.display()))?;
    for f in &found {
        views.add_found(f);
    }
    log::info!(
        "catalog {}: {} adapter directories found",
        root.display(),
        found.len()
    );
    Ok((root, found))
}

/// The views `inspect` shows: each named view checked in full, as a mount would.
fn inspect_views(inputs: &MergeArgs, args: &ViewArgs) -> anyhow::Result<Vec<(String, View)>> {
    if !inputs.adapters.is_empty() {
        anyhow::bail!(
            "--adapter plans one model, --view and --catalog plan views: use one or the other"
        );
    }
    let engine = Arc::new(inputs.engine(0)?);
    let mut views = Vec::new();
    for (name, spec) in &args.views {
        let view = resolve_adapters(spec)
            .and_then(|adapters| View::open(engine.clone(), &adapters, inputs.dtype))
            .and_then(|view| view.realize_all().map(|()| view))
            .with_context(|| format!("view {name}"))?;
        views.push((name.clone(), view));
    }
    if let Some(dir) = &args.catalog {
        let root = dir
            .canonicalize()
            .with_context(|| format!("catalog {}", dir.display()))?;
        for found in lorafs::catalog::scan(&root)? {
            let name = found.name.display().to_string();
            let view = View::open(engine.clone(), &[(found.dir.clone(), 1.0)], inputs.dtype)
                .and_then(|view| view.realize_all().map(|()| view));
            match view {
                Ok(view) => views.push((name, view)),
                // As a mount does: a directory that is not a valid adapter is skipped.
                Err(e) => log::warn!("catalog: {} skipped: {e}", found.dir.display()),
            }
        }
    }
    Ok(views)
}

/// The input directories of a view (resolved), which an output must not touch.
fn inputs_of(view: &View) -> Vec<&Path> {
    std::iter::once(view.base_dir())
        .chain(view.plan.adapters.iter().map(|a| a.dir.as_path()))
        .collect()
}

/// A byte count: a number with an optional unit (B, K/KB/KiB, M/MB/MiB, G/GB/GiB), all
/// binary multiples.
fn parse_size(arg: &str) -> Result<usize, String> {
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

/// Cache budgets by default. A mount keeps recently merged blocks for readers that come
/// back (several loader threads, mmap faults out of order); materialize reads every block
/// once, in order, and only needs the blocks its 16 MiB chunks share at their edges.
const MOUNT_CACHE: usize = 256 << 20;
const MATERIALIZE_CACHE: usize = 32 << 20;

/// Read-ahead for the mount, KiB. Cold sequential reads through FUSE at the kernel's
/// default 128 KiB run about a third as fast as at 1-8 MiB (BENCHMARKS.md, "Mount").
const DEFAULT_READ_AHEAD_KB: u32 = 4096;

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
}

/// The line a background server prints on stdout once its mount is usable.
const READY: &str = "lorafs-ready";

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Materialize { inputs, out, force } => {
            let view = inputs.open(MATERIALIZE_CACHE)?;
            log::info!("kernel: {}", view.engine.kernel.name());
            // From here on SIGINT, SIGTERM and SIGHUP stop the run, which removes what it
            // wrote; then the process exits as if killed by the signal (128 + its number).
            let interrupt =
                Interrupt::on_signals().context("cannot install the signal handlers")?;
            let options = MaterializeOptions {
                force,
                progress: std::io::stderr().is_terminal(),
                interrupt: interrupt.clone(),
            };
            let summary = materialize(&view, &out, &inputs_of(&view), &options)
                .with_context(|| format!("materialize into {} failed", out.display()));
            match (summary, interrupt.signal()) {
                (Ok(summary), _) => to_stdout(&format!("{}: {summary}\n", out.display()))?,
                (Err(err), Some(signal)) => {
                    report(&err);
                    std::process::exit(128 + signal);
                }
                (Err(err), None) => return Err(err),
            }
        }
        Command::Mount {
            inputs,
            views,
            mountpoint,
            threads,
            allow_other,
            read_ahead_kb,
            warm,
            foreground,
            log_file,
            daemon_child,
        } => {
            if !foreground && !daemon_child {
                return spawn_background_server();
            }
            // First, before anything uses rayon: panics are logged and cost one request.
            lorafs::fuse::init_server_process();
            // Validate everything before mounting, so a bad input mounts nothing.
            lorafs::fuse::check_mountpoint(&mountpoint)?;
            // Opened now, before the mount exists: a path that leads into the mount would
            // otherwise be looked up through it before it serves, and never answered.
            let log = match (daemon_child, &log_file) {
                (true, Some(path)) => Some(open_log_file(path, &mountpoint)?),
                _ => None,
            };
            one_malloc_arena();
            let (fs, live, warm_view) = if views.any() {
                let (fs, live) = open_views(&inputs, &views, &mountpoint, warm)?;
                (fs, Some(live), None)
            } else {
                let view = Arc::new(inputs.open(MOUNT_CACHE)?);
                let warm = match warm {
                    Warm::Always => true,
                    Warm::Never => false,
                    Warm::Auto => {
                        !view.engine.direct_base_reads && view.total_bytes() <= total_ram() / 4
                    }
                };
                let fs = lorafs::fuse::LorafsFs::single(view.clone())?;
                (fs, None, warm.then_some(view))
            };
            let options = lorafs::fuse::MountOptions {
                threads,
                allow_other,
                read_ahead_kb: (read_ahead_kb > 0).then_some(read_ahead_kb),
                warm: warm_view,
            };
            lorafs::fuse::mount(fs, live, &mountpoint, &options, || {
                if daemon_child {
                    detach_from_parent(log.as_ref());
                }
            })?;
        }
        Command::Unmount { mountpoint } => lorafs::fuse::unmount(&mountpoint)?,
        Command::View { command } => match command {
            ViewCommand::Ls { mountpoint, json } => {
                to_stdout(&lorafs::control::view_ls(&mountpoint, json)?)?
            }
            ViewCommand::Add { mountpoint, view } => {
                lorafs::control::view_add(&mountpoint, &view.name, &view.spec)?
            }
            ViewCommand::Set { mountpoint, view } => {
                lorafs::control::view_set(&mountpoint, &view.name, &view.spec)?
            }
            ViewCommand::Rm { mountpoint, name } => lorafs::control::view_rm(&mountpoint, &name)?,
        },
        Command::Inspect {
            inputs,
            views,
            tensors,
        } => {
            if views.any() {
                let opened = inspect_views(&inputs, &views)?;
                let refs: Vec<(String, &View)> =
                    opened.iter().map(|(n, v)| (n.clone(), v)).collect();
                to_stdout(&lorafs::inspect::report_views(&refs, tensors))?;
            } else {
                let view = inputs.open(0)?;
                to_stdout(&lorafs::inspect::report(&view, tensors))?;
            }
        }
    }
    Ok(())
}

/// The server allocates about 1 MiB blocks from several threads; with glibc's default of
/// one arena per thread, freed blocks stay spread over arenas and resident memory ends tens
/// of MiB above the cache budget. One arena is enough at this allocation rate.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before the server starts threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Raise the soft limit on open files to the hard one. lorafs keeps one descriptor per
/// safetensors file (others are opened per read), and the usual soft limit of 1024 is below
/// the shard count of some models, while the hard limit is usually far higher.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed, which lives on
    // this stack frame; failures leave the limit as it was, which is fine.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::debug!("could not raise the open files limit");
            }
        }
    }
}

/// `mount` without --foreground: run the same command as a background server in its own
/// session and return once it reports the mount ready, or fail with its error.
fn spawn_background_server() -> anyhow::Result<()> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().context("cannot find the lorafs executable")?;
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it detaches the server from the terminal's
    // session so that closing the terminal or Ctrl-C does not kill the mount.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .context("cannot start the background server")?;
    // Read stderr while waiting for the ready line: a server that logs more than a pipe
    // holds (64 KiB) before it is ready would otherwise block on it, and `mount` with it.
    let stderr = child
        .stderr
        .take()
        .context("no stderr pipe to the server")?;
    let collector = std::thread::spawn(move || StderrTail::collect(stderr));
    let stdout = child
        .stdout
        .take()
        .context("no stdout pipe to the server")?;
    let mut line = Vec::new();
    // Bounded: the server prints nothing else on stdout before the ready line.
    stdout.take(READY.len() as u64 + 1).read_to_end(&mut line)?;
    if line == format!("{READY}\n").as_bytes() {
        return Ok(());
    }
    let tail = collector.join().unwrap_or_default();
    let status = child.wait()?;
    match tail.error_message() {
        Some(message) => anyhow::bail!("{message}"),
        None => anyhow::bail!("mount failed ({status})"),
    }
}

/// The last bytes a background server wrote to stderr: enough for its error, bounded
/// whatever it logs.
#[derive(Default)]
struct StderrTail(Vec<u8>);

impl StderrTail {
    /// Bytes kept (up to twice as many between trims): the error comes last, and a few lines
    /// before it say what led there.
    const KEEP: usize = 16 << 10;

    fn collect(mut from: impl std::io::Read) -> StderrTail {
        let mut tail = StderrTail::default();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return tail,
                Ok(n) => tail.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The server is gone: what it wrote so far is all there is.
                Err(_) => return tail,
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * Self::KEEP {
            self.0.drain(..self.0.len() - Self::KEEP);
        }
    }

    /// The server's error line (`lorafs: error: ...`, printed last), else whatever it
    /// printed last (a panic, a log line), else `None`.
    fn error_message(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0);
        let prefix = "lorafs: error: ";
        let last_error = text.lines().rev().find_map(|l| l.strip_prefix(prefix));
        let message = match last_error {
            Some(error) => error.to_string(),
            None => text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())?
                .to_string(),
        };
        Some(message.trim().to_string())
    }
}

/// The background server's `--log-file`, opened for appending before anything is mounted.
/// A path inside the mount point is refused (once mounted, it would be a file of the
/// read-only mount, or hidden under it), and a FIFO without a reader fails instead of
/// blocking the open for ever.
fn open_log_file(path: &Path, mountpoint: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let inside = |dir: &Path| {
        let dir = dir.canonicalize().ok();
        dir.zip(mountpoint.canonicalize().ok())
            .is_some_and(|(dir, mnt)| dir.starts_with(mnt))
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if inside(parent) || inside(path) {
        anyhow::bail!(
            "log file {} is inside the mount point {}: name one outside it",
            path.display(),
            mountpoint.display()
        );
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    // Writes block as usual once open (a FIFO's reader that is slow holds back the log).
    // SAFETY: F_GETFL/F_SETFL on a descriptor owned by `file`, which outlives the calls.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// In the background server, once mounted: point stderr at the log file (or /dev/null), tell
/// the parent, then point stdout there too, so the server never writes to a pipe whose
/// reader has gone (or stopped reading).
fn detach_from_parent(log: Option<&std::fs::File>) {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    let null = match log {
        Some(_) => None,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .ok(),
    };
    let redirect = |fd: i32| {
        if let Some(file) = log.or(null.as_ref()) {
            // SAFETY: dup2 onto a standard descriptor with a descriptor we own; `file` stays
            // open for the duration of the call.
            unsafe { libc::dup2(file.as_raw_fd(), fd) };
        }
    };
    redirect(2);
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
    redirect(1);
}

/// The error and its causes on one line, leaving out causes the message already quotes.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Print an error, with its causes, as the last line of a failed run. A stderr that cannot
/// take it (closed, a full disk) leaves only the exit code: `eprintln!` would panic.
fn report(err: &anyhow::Error) {
    let _ = writeln!(std::io::stderr(), "lorafs: error: {}", error_chain(err));
}

/// Write `text` to stdout. A reader that went away (`lorafs inspect | head -1`) is not an
/// error, as for other command-line tools; any other failure (`> /dev/full`) is, where
/// `print!` would panic.
fn to_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        Ok(()) | Err(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A mount is a long-lived server: say what it did at init (kernel settings, read-ahead).
    // fuser's session warns when the mount is already gone as it ends (after `umount` or
    // `lorafs unmount`, the normal way): not worth a warning.
    let default_level = if matches!(cli.command, Command::Mount { .. }) {
        "info,fuser::session=error"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("LORAFS_LOG", default_level))
        .init();
    raise_open_files_limit();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_stderr_is_kept_bounded_and_its_error_found() {
        let mut log = Vec::new();
        for i in 0..10_000 {
            log.extend_from_slice(format!("[WARN lorafs] warning number {i}\n").as_bytes());
        }
        log.extend_from_slice(b"lorafs: error: mount point /m: is not empty\n");
        let tail = StderrTail::collect(&log[..]);
        assert!(
            tail.0.len() <= 2 * StderrTail::KEEP,
            "{} bytes kept",
            tail.0.len()
        );
        assert_eq!(
            tail.error_message().as_deref(),
            Some("mount point /m: is not empty")
        );
        let panicked =
            StderrTail::collect(&b"[ERROR lorafs] thread main panicked at x.rs:1:2\n\n"[..]);
        assert_eq!(
            panicked.error_message().as_deref(),
            Some("[ERROR lorafs] thread main panicked at x.rs:1:2")
        );
        assert_eq!(StderrTail::collect(&b" \n"[..]).error_message(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
    }
}
