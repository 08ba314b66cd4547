//! What the command says about itself: `--version` with its kernels, and the shell
//! completions and man pages generated from the clap definitions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use clap::CommandFactory;

use lorafs::kernel::Kernel;

use super::Cli;

/// `lorafs 0.1.0 (kernels: avx512bf16, avx512, avx2, scalar; this CPU: avx2)`: the kernels
/// this build holds, best first, and the one this CPU selects (and the one `LORAFS_KERNEL`
/// forces, when it names another that runs here).
pub(crate) fn version_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let compiled: Vec<&str> = Kernel::compiled().iter().rev().map(|k| k.name()).collect();
        let best = Kernel::available()
            .last()
            .copied()
            .unwrap_or(Kernel::Scalar);
        let selected = Kernel::selected();
        let forced = match selected != best {
            true => format!("; in use: {} (LORAFS_KERNEL)", selected.name()),
            false => String::new(),
        };
        format!(
            "{} (kernels: {}; this CPU: {}{forced})",
            env!("CARGO_PKG_VERSION"),
            compiled.join(", "),
            best.name()
        )
    })
}

/// The command as the generated documents describe it: the package version only, which
/// does not depend on the machine that generates them.
fn documented_command() -> clap::Command {
    Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .long_version(env!("CARGO_PKG_VERSION"))
}

/// `lorafs completions SHELL`: the completion script, on stdout.
pub(crate) fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut documented_command(), "lorafs", &mut script);
    crate::to_stdout(&String::from_utf8_lossy(&script))
}

/// `lorafs man [--dir DIR]`: the page of `lorafs` on stdout, or every page (`lorafs.1`,
/// `lorafs-mount.1`, `lorafs-view-ls.1`, ...) written into DIR, each path printed.
pub(crate) fn man(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut command = documented_command().disable_help_subcommand(true);
    command.build();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        page_of(command)
            .render(&mut page)
            .context("cannot render the man page")?;
        return crate::to_stdout(&String::from_utf8_lossy(&page));
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(command, &dir, &mut written)?;
    written.sort();
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    crate::to_stdout(&list)
}

/// The man page of `command`, footed `lorafs VERSION` (a subcommand has no version of its
/// own, and its page would show none).
fn page_of(command: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(command).source(concat!("lorafs ", env!("CARGO_PKG_VERSION")))
}

/// The page of `command` and of each of its visible subcommands, recursively, into `dir`.
fn write_pages(
    command: clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    let man = page_of(command);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page).context("cannot render a man page")?;
    std::fs::File::create(&path)
        .and_then(|mut file| file.write_all(&page))
        .with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    Ok(())
}
