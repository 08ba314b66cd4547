//! `--views FILE`: named views listed in a TOML file, read when the mount starts and again
//! whenever the file or an adapter it names changes. This module knows nothing of FUSE: it
//! parses the file and tells a [`Registry`] which views to make, change or remove.
//!
//! # Format
//!
//! ```toml
//! [views."mix/a"]
//! adapters = [{ path = "/ckpt/a", weight = 0.7 }, "/ckpt/b:0.3"]
//! dtype = "bf16"            # optional, as --dtype (default: the mount's)
//! gguf = ["F16"]            # optional, as --gguf (default: the mount's; [] for none)
//! combine = "ties"          # optional: PEFT's combination_type
//! density = 0.5             # with ties, dare_linear, dare_ties, magnitude_prune
//! majority_sign = "total"   # with ties, dare_ties: total (default) or frequency
//! svd_rank = 8              # with svd (default: the largest rank of the adapters)
//! seed = 0                  # with dare_linear, dare_ties (default 0)
//! ```
//!
//! - The only top-level key is `views`; each view is a table named by its view name
//!   (quoted when it holds a `/`), checked as `--view` names are.
//! - An adapter is `"DIR"`, `"DIR:WEIGHT"` (as `--adapter`: an existing path is taken whole)
//!   or `{ path = "DIR", weight = W }` (weight 1 if left out). A relative DIR is relative to
//!   the file's directory, not to where `lorafs` was started.
//! - Unknown keys are errors, and so is a combination parameter the method does not use.
//!
//! # Changes
//!
//! The file's directory and the adapters' directories are watched (editors replace a file
//! by renaming another over it), and everything is also stat'ed every [`POLL`]. Once the
//! file and the adapter files have stayed unchanged for [`QUIET`], the file is read again:
//! - a file that cannot be read or parsed changes nothing; one log line says why;
//! - a view whose entry or whose adapter files changed is rebuilt and swapped in whole
//!   (open files keep the old model); one whose rebuild fails stays as it was, logged;
//! - views no longer listed are removed; new ones are added.
//!
//! Views from elsewhere (`--view`, `lorafs view add`, `--catalog`) are never touched: an
//! entry whose name one of them holds is refused (an error when mounting, a log line after).
//! A file view changed by `lorafs view set` becomes a named view and the file lets it be.

mod parse;
mod sync;
mod watch;

use std::path::Path;
use std::time::Duration;

pub use parse::{parse, Entries};
pub use sync::{FileSync, Registry};
pub use watch::{watch, Watcher};

/// How long the file and its adapters must stay unchanged before the file is read again:
/// as long as a catalog's checkpoints (an editor's save, a trainer's write, take steps).
pub const QUIET: Duration = crate::catalog::QUIET;

/// How often the file and its adapters are stat'ed without notifications: notifications
/// can be lost or unavailable (network filesystems, watch limits), and stats are cheap.
pub const POLL: Duration = Duration::from_secs(2);

/// Read and parse the views file at `path`: its views, or one line naming the file and
/// what is wrong.
pub fn load(path: &Path) -> Result<Entries, String> {
    let context = |e: String| format!("views file {}: {e}", path.display());
    let path = std::path::absolute(path).map_err(|e| context(e.to_string()))?;
    let text = std::fs::read_to_string(&path).map_err(|e| context(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    parse(&text, dir).map_err(context)
}
