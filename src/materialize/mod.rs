//! `lorafs materialize`: write the merged directory to disk, streaming through
//! [`Engine::read_at`] so the bytes are exactly what a mount serves.
//!
//! What it may touch (docs/SAFETY.md states it for users): the new tree is written in a
//! directory of its own beside OUT ([`run`]) and renamed into place only when complete;
//! nothing is ever removed but that run's own files and, with `--force`, an old OUT that
//! passed every check in [`target`] twice (before the run and when the tree is complete).

mod file;
mod fsops;
mod interrupt;
mod marker;
mod output;
mod run;
mod target;
mod write;

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub use file::materialize_file;
pub use interrupt::Interrupt;

use crate::error::{Error, Result};
use crate::view::View;
use run::RunDir;
use target::{refusal, Existing, Target};

#[derive(Debug, Clone, Default)]
pub struct MaterializeOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Stops the run (which then removes what it wrote) once set.
    pub interrupt: Interrupt,
}

#[derive(Debug)]
pub struct Summary {
    pub files: usize,
    pub tensors_merged: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} files, {} tensors merged, {} bytes in {:.2} s ({:.0} MB/s)",
            self.files,
            self.tensors_merged,
            self.bytes,
            secs,
            self.bytes as f64 / secs.max(1e-9) / 1e6
        )
    }
}

/// Write the merged directory to `out`. It is built in a temporary directory beside `out`
/// and renamed into place only when complete, so a failure leaves nothing at `out`.
/// `inputs` are the base and adapter directories, which the output must not touch.
pub fn materialize(
    view: &View,
    out: &Path,
    inputs: &[&Path],
    options: &MaterializeOptions,
) -> Result<Summary> {
    let start = Instant::now();
    let inputs = inputs
        .iter()
        .map(|i| i.canonicalize().map_err(|e| Error::io(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let target = Target::resolve(out, &inputs)?;
    run::sweep(&target);
    if target.existing(&inputs)? != Existing::Nothing && !options.force {
        return Err(refusal(out, "already exists; pass --force to replace it"));
    }
    options.interrupt.check(out)?;

    let run = RunDir::create(&target)?;
    let tree = run.tree();
    let modes = Modes::of(view, &tree)?;
    for dir in view.dirs() {
        let path = tree.join(dir);
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    let total = view.total_bytes();
    let bar = if options.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let sink = write::Sink {
        dir: &tree,
        modes: &modes.files,
        bar: &bar,
        interrupt: &options.interrupt,
        out,
    };
    let written = write::write_files(view, &sink);
    bar.finish_and_clear();
    written?;
    // The files were synced as they were finished; now their names (before the modes, which
    // may take the read bit a directory's open needs), and after the rename OUT's own.
    for dir in view.dirs().iter().rev().map(|d| tree.join(d)) {
        fsops::sync_dir(&dir)?;
    }
    fsops::sync_dir(&tree)?;
    modes.apply_to_dirs(view, &tree)?;
    options.interrupt.check(out)?;
    run.place(&target, &inputs, options.force)?;
    fsops::sync_dir(&target.parent)?;
    drop(run); // removes the replaced OUT (--force) and the run's owner file
    Ok(Summary {
        files: view.files.len(),
        tensors_merged: view.plan.merges.len(),
        bytes: total,
        elapsed: start.elapsed(),
    })
}

/// The permission bits the output keeps: each file's and directory's source's, read before
/// any work so that an unreadable source fails the run early.
struct Modes {
    /// By index in `view.files`.
    files: Vec<u32>,
    /// By index in `view.dirs()`.
    dirs: Vec<u32>,
    /// OUT itself: the base directory's.
    root: u32,
}

impl Modes {
    /// The modes of `view`'s files and directories written under `tree` (the run's
    /// directory, whose group its files and directories get).
    fn of(view: &View, tree: &Path) -> Result<Modes> {
        let group = std::fs::metadata(tree)
            .map_err(|e| Error::io(tree, e))?
            .gid();
        let dir_mode = |path: &Path| -> Result<u32> {
            let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
            Ok(kept_bits(meta.mode(), meta.gid(), group))
        };
        Ok(Modes {
            // A file's source is the base file (config.json and the shard index too, when
            // lorafs rewrites them) or, for an adapter's tokenizer file, that file.
            files: (view.files.iter())
                .map(|f| {
                    let source = f.source();
                    kept_bits(source.mode, source.gid, group) & adapters_readable(view, f)
                })
                .collect(),
            dirs: (view.dirs().iter())
                .map(|d| dir_mode(&view.base_dir().join(d)))
                .collect::<Result<_>>()?,
            root: dir_mode(view.base_dir())?,
        })
    }

    /// Set the directories' bits, last and deepest first: a read-only source directory
    /// (0555) must not stop lorafs writing into its copy, and the root stays 0700 (closed to
    /// others) until everything below is final.
    fn apply_to_dirs(&self, view: &View, tree: &Path) -> Result<()> {
        let dirs = view.dirs().iter().zip(&self.dirs).rev();
        for (path, mode) in dirs
            .map(|(rel, &mode)| (tree.join(rel), mode))
            .chain(std::iter::once((PathBuf::from(tree), self.root)))
        {
            std::fs::set_permissions(&path, Permissions::from_mode(mode))
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

/// The classes (group, others) whose bits a file keeps given its adapters: a file with merged
/// or replaced tensors holds the adapters' weights (with the base file, the delta can be read
/// back), so, as the mount serves it, it stays open to a class only if every adapter file
/// (`adapter_model.safetensors`, `adapter_config.json`) grants that class read. The owner
/// class stays: the output belongs to whoever ran lorafs, who read the adapters. (The
/// directories above the adapters are not looked at: where OUT is decides who reaches it.)
fn adapters_readable(view: &View, file: &crate::view::VirtualFile) -> u32 {
    let mut mask = 0o777;
    for input in view.other_sources(file) {
        let mode = input.identity().mode;
        for class in [0o070, 0o007] {
            if mode & class & 0o444 == 0 {
                mask &= !class;
            }
        }
    }
    mask
}

/// The bits a copy keeps of its source's `mode` (through symbolic links: a Hugging Face
/// snapshot's blob counts): read, write and execute only (setuid, setgid and sticky do not
/// carry over to a copy that belongs to whoever runs lorafs). A copy in another group than
/// its source's (`group`, the group the run's files get) gives that group no more than the
/// source gave everyone else: its members were "others" to the source.
fn kept_bits(mode: u32, source_group: u32, group: u32) -> u32 {
    let mode = mode & 0o777;
    if source_group == group {
        return mode;
    }
    let others_as_group = (mode & 0o007) << 3;
    (mode & !0o070) | (mode & others_as_group)
}

#[cfg(test)]
mod tests {
    use super::kept_bits;

    #[test]
    fn a_copy_in_another_group_gives_it_only_what_others_had() {
        assert_eq!(kept_bits(0o4755, 10, 10), 0o755);
        assert_eq!(kept_bits(0o640, 10, 10), 0o640);
        assert_eq!(kept_bits(0o640, 10, 20), 0o600);
        assert_eq!(kept_bits(0o754, 10, 20), 0o744);
        assert_eq!(kept_bits(0o705, 10, 20), 0o705);
        assert_eq!(kept_bits(0o775, 10, 20), 0o755);
    }
}
