//! The catalog: a directory tree whose adapter directories are found, and watched while a
//! mount serves them. This module knows nothing of FUSE or of merging: it says which adapter
//! directories there are, under which names, and when that changes.
//!
//! # Rules
//!
//! - **Adapter directory**: a directory holding both `adapter_config.json` and
//!   `adapter_model.safetensors` (regular files, or links to regular files as in a Hugging
//!   Face cache snapshot). Its name is its path relative to the catalog root, e.g.
//!   `run1/checkpoint-2000`. The root itself is never one (a name is never empty).
//!   An adapter directory is searched further: a trainer's output directory often holds the
//!   final adapter and its `checkpoint-N` subdirectories, and all of them are found.
//! - **Depth**: the root's subdirectories down to 4 levels below the root
//!   (`DIR/a/b/c/d` is found, `DIR/a/b/c/d/e` is not).
//! - **Skipped names**: any name starting with `.` (`.git`, `.cache`, staging directories of
//!   copy tools), and `tmp-checkpoint-*`: the Hugging Face Trainer (transformers 4.36 to
//!   4.38) saves into `tmp-checkpoint-N` and renames it to `checkpoint-N` once written.
//! - **Links**: symbolic links to directories are followed, so a catalog may be a directory
//!   of links to adapters stored elsewhere (a Hugging Face cache snapshot, another disk), and
//!   an adapter reached by two names is found under both. Mount points are crossed for the
//!   same reason. A directory that is its own ancestor (a link loop, a bind mount inside
//!   itself) is not entered again: the walk keeps the (device, inode) of the directories
//!   above it. At most 100,000 directories are walked; past that the walk stops with a
//!   warning and no view disappears for it. The mount point must not be inside the catalog.
//! - **Complete**: both files exist; the config parses as a JSON object; the safetensors
//!   header parses and is valid and the file's size is exactly the header's 8 + N bytes plus
//!   the end of its last tensor ([`crate::layout::Layout::open`]: headers over 100 MB are
//!   refused), so the file is fully written; and the two files' fingerprint (device, inode,
//!   size, modification and change time of each) has stayed the same for [`QUIET`] (500 ms)
//!   since the watcher first saw it. Writers that pause longer than that in the middle of a
//!   file are caught by the size check unless they preallocate the file.
//! - **Start** ([`scan`]): what is complete now, without the quiet period: files already
//!   there when the mount starts are taken as they are if their structure checks out.
//! - **Appeared**: a name that was not a view becomes complete.
//! - **Changed**: a view's fingerprint changes (rewritten in place, files renamed over it, the
//!   directory replaced) and the new version becomes complete. While the new version is
//!   incomplete the view stays as it was, with no event: lorafs notices inputs that changed
//!   under open files by itself, and a view that blinks out while a trainer rewrites it is
//!   worse than a short wait. A new version that stays incomplete is logged once.
//! - **Disappeared**: the directory or either file is gone (not found, or no longer a
//!   regular file), or its name is now skipped or too deep. A directory that cannot be read
//!   for another reason (permissions, I/O error on a network filesystem) keeps the views
//!   found below it before, with one warning: a transient error must not remove views.
//!
//! # Watching
//!
//! Change notifications (inotify, through `notify`) on every walked directory are only a
//! trigger: 100 ms after the first one (or 4 times the last walk's duration, if longer) the
//! tree is walked again. Writes to files other than the two adapter files (a trainer's
//! optimizer state) are ignored; creations, removals and renames are not. A walk lists directories and stats the two files of adapter directories; headers
//! are parsed only for a fingerprint that has been quiet. While some candidate waits for its
//! quiet period, its files are stat'ed again every 200 ms. A full walk also runs every 30 s in
//! case notifications were missed (queue overflow, network filesystems), and every 2 s when
//! notifications cannot be set up (no inotify, watch limit reached). From the end of a copy
//! to the event takes about 0.6 s with notifications, up to about 2.7 s without.

mod track;
mod walk;
mod watch;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use walk::Fingerprint;
pub use watch::Watcher;

/// How long an adapter directory's files must stay unchanged before it becomes (or changes)
/// a view: trainers write the weights and the config in steps, and copies take time.
pub const QUIET: Duration = Duration::from_millis(500);

/// An adapter directory of the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its path relative to the catalog root: the view's name. Never empty.
    pub name: PathBuf,
    /// Its path: the catalog root (made absolute) joined with `name`.
    pub dir: PathBuf,
    /// The identity of its two files when it was found complete.
    pub fingerprint: Fingerprint,
}

/// A change of the catalog's adapter directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete adapter directory under a name that was not a view.
    Appeared(Found),
    /// A view's files were replaced and the new version is complete.
    Changed(Found),
    /// A view's directory or one of its files is gone.
    Disappeared { name: PathBuf },
}

/// The complete adapter directories under `root` now, sorted by name, without waiting for
/// files to be quiet (for the mount's start). Problems met on the way (an unreadable
/// directory, an incomplete adapter) are logged, each once; only a root that cannot be
/// listed is an error.
pub fn scan(root: &Path) -> io::Result<Vec<Found>> {
    let root = checked_root(root)?;
    let walk = walk::walk(&root, &mut |_, _| {});
    for problem in &walk.problems {
        log::warn!("catalog: {problem}");
    }
    let mut found = Vec::new();
    for (name, candidate) in walk.candidates {
        match walk::check_complete(&candidate.dir) {
            Ok(()) => found.push(Found {
                name,
                dir: candidate.dir,
                fingerprint: candidate.fingerprint,
            }),
            Err(e) => log::warn!("catalog: not a view (incomplete adapter): {e}"),
        }
    }
    Ok(found)
}

/// Watch `root` in a background thread. `initial` is the start state (what [`scan`]
/// returned and the caller accepted); `on_event` is called on that thread for each change
/// after it, in order. A `Found` the caller left out of `initial` comes back once as
/// [`Event::Appeared`]. The watcher's state is what it reported, whether or not the caller
/// could use it: a view the caller failed to build comes back only when it changes.
///
/// Dropping the [`Watcher`] stops the thread and waits for it, so `on_event` is not called
/// after the drop returns; do not drop it while holding a lock that `on_event` takes.
pub fn watch(
    root: &Path,
    initial: &[Found],
    on_event: impl FnMut(Event) + Send + 'static,
) -> io::Result<Watcher> {
    let root = checked_root(root)?;
    watch::start(root, initial, Box::new(on_event), watch::Notify::Inotify)
}

/// `root` made absolute, if it is a directory that can be listed.
fn checked_root(root: &Path) -> io::Result<PathBuf> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("catalog {root:?}: {e}"));
    let root = std::path::absolute(root).map_err(context)?;
    std::fs::read_dir(&root).map_err(context)?;
    Ok(root)
}

#[cfg(test)]
mod tests;
