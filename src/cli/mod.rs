//! The `lorafs` command line: its arguments, and what each command runs.

mod args;
mod daemon;
mod docs;
mod fstab;
mod mount;
mod mount_helper;
mod stats;
mod views;

pub(crate) use daemon::LogSink;
pub(crate) use fstab::invoked_as_helper;
pub(crate) use mount_helper::run_mount_helper;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use lorafs::gguf::OutType;
use lorafs::materialize::{materialize, materialize_file, Interrupt, MaterializeOptions};
use lorafs::View;

use crate::{report, to_stdout};
use args::*;
use mount::{mount, MountArgs};
use views::*;

#[derive(Parser)]
#[command(
    name = "lorafs",
    version = docs::version_text(),
    about = "A base model plus LoRA adapters, served as the merged model"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    Mount(MountArgs),
    /// Unmount a lorafs mount (like `umount MOUNTPOINT`); its server exits.
    Unmount {
        mountpoint: PathBuf,
        /// If a file on the mount is still open or mapped (a loaded model maps its
        /// safetensors), detach it now anyway, like `umount -l`: it leaves the directory
        /// tree at once, those programs keep reading their files, and the server exits when
        /// the last of them is closed.
        #[arg(long)]
        lazy: bool,
    },
    /// List or change the views of a mount made with --view, --views or --catalog, while it
    /// serves.
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
        /// The plan as one JSON object (schema in docs/CLI.md).
        #[arg(long)]
        json: bool,
    },
    /// Show the counters of a running mount (bytes served, cache, factors), once or
    /// refreshed with --watch.
    Stats(stats::StatsArgs),
    /// Print the completion script of SHELL (install lines in docs/CLI.md).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page of lorafs (roff), or with --dir write it and one page per
    /// subcommand into DIR.
    Man {
        /// Write lorafs.1, lorafs-mount.1, ... into DIR (created if missing), replacing
        /// pages of those names.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ViewCommand {
    /// List the views: `NAME  SPEC`, one a line, sorted by name, then `(catalog)` or
    /// `(views file)` for a view from there.
    Ls {
        mountpoint: PathBuf,
        /// A JSON array of {name, spec, adapters: [{dir, weight}], source:
        /// named|catalog|file}.
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
pub(crate) struct NamedSpec {
    #[arg(help = VIEW_NAME_HELP)]
    name: String,
    /// ADAPTER[:WEIGHT], comma-separated, each as --adapter takes it (a directory, relative
    /// to here, or a cached repo id).
    spec: String,
}

/// With an OUT ending in `.gguf`, the view file materialize writes alone: the GGUF file of
/// the one `--gguf` type.
fn gguf_output(view: &View, types: &[OutType], out: &Path) -> anyhow::Result<Option<usize>> {
    if out.extension() != Some("gguf".as_ref()) {
        return Ok(None);
    }
    let [out_type] = types else {
        anyhow::bail!(
            "{}: a .gguf output is one GGUF file: give exactly one --gguf TYPE (F32, F16, BF16 or Q8_0)",
            out.display()
        );
    };
    let name = format!("model-{}.gguf", out_type.name());
    let file = view.files.iter().position(|f| f.rel == Path::new(&name));
    Ok(Some(
        file.expect("add_gguf added the file of each --gguf type"),
    ))
}

/// Run the command `cli`, parsed from `command_line` (argv[0] included).
pub(crate) fn run(cli: Cli, command_line: &[OsString]) -> anyhow::Result<()> {
    match cli.command {
        Command::Materialize { inputs, out, force } => materialize_command(&inputs, &out, force)?,
        Command::Mount(args) => mount(args, command_line)?,
        Command::Unmount { mountpoint, lazy } => lorafs::fuse::unmount(&mountpoint, lazy)?,
        Command::View { command } => view_command(command)?,
        Command::Inspect {
            inputs,
            views,
            tensors,
            json,
        } => inspect_command(&inputs, &views, tensors, json)?,
        Command::Stats(args) => stats::stats(args)?,
        Command::Completions { shell } => docs::completions(shell)?,
        Command::Man { dir } => docs::man(dir)?,
    }
    Ok(())
}

/// `lorafs materialize`: the directory (or, for an OUT ending in `.gguf`, the one GGUF
/// file) written, or on a signal what was written removed and the process ended as if
/// killed by it (128 + its number).
fn materialize_command(inputs: &MergeArgs, out: &Path, force: bool) -> anyhow::Result<()> {
    let view = inputs.open(MATERIALIZE_CACHE, true)?;
    log::info!("kernel: {}", view.engine.kernel.name());
    // From here on SIGINT, SIGTERM and SIGHUP stop the run, which removes what it wrote.
    let interrupt = Interrupt::on_signals().context("cannot install the signal handlers")?;
    let options = MaterializeOptions {
        force,
        progress: std::io::stderr().is_terminal(),
        interrupt: interrupt.clone(),
    };
    let summary = match gguf_output(&view, &inputs.gguf, out)? {
        Some(file) => materialize_file(&view, file, out, &inputs_of(&view), &options),
        None => materialize(&view, out, &inputs_of(&view), &options),
    }
    .with_context(|| format!("materialize into {} failed", out.display()));
    match (summary, interrupt.signal()) {
        (Ok(summary), _) => to_stdout(&format!("{}: {summary}\n", out.display())),
        (Err(err), Some(signal)) => {
            report(&err);
            std::process::exit(128 + signal);
        }
        (Err(err), None) => Err(err),
    }
}

/// `lorafs view ...`: list or change the views of a running mount.
fn view_command(command: ViewCommand) -> anyhow::Result<()> {
    match command {
        ViewCommand::Ls { mountpoint, json } => {
            match lorafs::control::view_ls(&mountpoint, json) {
                // Nothing to list is not a failure: said on stderr, stdout stays a listing.
                Err(no_views @ lorafs::control::Error::NoViews(_)) => {
                    eprintln!("lorafs: {no_views}: no views to list")
                }
                listed => to_stdout(&listed?)?,
            }
        }
        ViewCommand::Add { mountpoint, view } => {
            lorafs::control::view_add(&mountpoint, &view.name, &view.spec)?
        }
        ViewCommand::Set { mountpoint, view } => {
            lorafs::control::view_set(&mountpoint, &view.name, &view.spec)?
        }
        ViewCommand::Rm { mountpoint, name } => lorafs::control::view_rm(&mountpoint, &name)?,
    }
    Ok(())
}

/// `lorafs inspect`: the plan of the merge, or of each view, as text or JSON.
fn inspect_command(
    inputs: &MergeArgs,
    views: &ViewArgs,
    tensors: bool,
    json: bool,
) -> anyhow::Result<()> {
    use lorafs::inspect;
    if views.any() {
        let opened = inspect_views(inputs, views)?;
        let refs: Vec<(String, &View)> = opened.iter().map(|(n, v)| (n.clone(), v)).collect();
        to_stdout(&match json {
            true => inspect::json::report_views(&refs, tensors),
            false => inspect::report_views(&refs, tensors),
        })
    } else {
        let view = inputs.open(0, false)?;
        to_stdout(&match json {
            true => inspect::json::report(&view, tensors),
            false => inspect::report(&view, tensors),
        })
    }
}
