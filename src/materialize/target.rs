//! The output path of `materialize`: what it names, and whether lorafs may write there. Every
//! check that can refuse runs before any work, and again on an existing OUT when the new tree
//! is complete, because the path may have changed meanwhile.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The output directory, resolved: `parent` is canonical (no symbolic link, no `..`), so
/// `parent/name` is exactly the entry lorafs creates or replaces, whatever the path looked like.
#[derive(Debug)]
pub(super) struct Target {
    /// The path as the user gave it, for messages.
    pub shown: PathBuf,
    pub parent: PathBuf,
    pub name: OsString,
    /// `OUT/` or `OUT/.`: the user named a directory, and through a symbolic link its target.
    trailing_slash: bool,
}

/// What is at the output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    Nothing,
    Directory,
    File,
}

impl Target {
    /// Resolve `out`, refusing paths whose meaning is unclear or whose parent is unusable or
    /// inside an input (canonical `inputs`). What is at `out` itself is checked by
    /// [`Target::existing`].
    pub fn resolve(out: &Path, inputs: &[PathBuf]) -> Result<Target> {
        let refuse = |what: &str| refusal(out, what);
        let raw = out.as_os_str().as_bytes();
        if raw.is_empty() {
            return Err(refuse("is empty"));
        }
        // None when the current directory was removed: there is nothing to protect then.
        let cwd = std::env::current_dir().ok();
        let Some(Component::Normal(name)) = out.components().next_back() else {
            // `.`, `..`, `/` or `dir/..`: no entry that could be created or replaced.
            if let Ok(real) = out.canonicalize() {
                if let Some(what) = holds_cwd(&real, cwd.as_deref()) {
                    return Err(refuse(what));
                }
            }
            return Err(refuse("does not end in a name (it ends in `..` or is `/`)"));
        };
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let real_parent = check_parent(out, parent)?;
        if out.components().any(|c| c == Component::ParentDir) {
            // `link/../out` is `./out` to the reader but `TARGET_PARENT/out` to the kernel;
            // and `link/x/../out` is `link/out` to the reader, which is refused above.
            let lexical = lexical_parent(&cwd.unwrap_or_default().join(parent));
            check_parent(out, &lexical)?;
            if lexical.canonicalize().ok().as_ref() != Some(&real_parent) {
                return Err(refuse(&format!(
                    "has `..` after a symbolic link: it is in {}, not in {}; \
                     give the path without `..`",
                    real_parent.display(),
                    lexical.display()
                )));
            }
        }
        if inputs.iter().any(|i| real_parent.starts_with(i)) {
            return Err(refuse(
                "is inside an input directory; write the merged model elsewhere",
            ));
        }
        Ok(Target {
            shown: out.to_path_buf(),
            parent: real_parent,
            name: name.to_os_string(),
            trailing_slash: raw.ends_with(b"/") || raw.ends_with(b"/."),
        })
    }

    /// The entry itself: the canonical parent joined with the name.
    pub fn path(&self) -> PathBuf {
        self.parent.join(&self.name)
    }

    /// What is at OUT now, refusing what lorafs must never replace (even with `--force`):
    /// a symbolic link, anything but a directory or regular file, the current directory or
    /// one of its ancestors, an input or a directory holding one, a mount point, a directory
    /// holding a mount point. Whether an existing OUT may be replaced (`--force`) is the
    /// caller's decision.
    pub fn existing(&self, inputs: &[PathBuf]) -> Result<Existing> {
        let refuse = |what: &str| refusal(&self.shown, what);
        let path = self.path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
            Err(e) => return Err(Error::io(&path, e)),
        };
        if meta.file_type().is_symlink() {
            let to = std::fs::read_link(&path).unwrap_or_default();
            return Err(refuse(&format!(
                "is a symbolic link (to {}); lorafs neither writes through nor replaces links: \
                 name a path that is not a link",
                to.display()
            )));
        }
        let kind = if meta.is_dir() {
            Existing::Directory
        } else if meta.is_file() {
            Existing::File
        } else {
            return Err(refuse(
                "exists and is neither a directory nor a regular file; refusing to replace it",
            ));
        };
        if let Some(what) = holds_cwd(&path, std::env::current_dir().ok().as_deref()) {
            return Err(refuse(what));
        }
        if inputs.iter().any(|i| i.starts_with(&path)) {
            return Err(refuse(
                "contains an input (base or adapter); refusing to replace it",
            ));
        }
        let parent_dev = std::fs::metadata(&self.parent)
            .map_err(|e| Error::io(&self.parent, e))?
            .dev();
        let mounts = mount_points();
        if meta.dev() != parent_dev || mounts.contains(&path) {
            return Err(refuse(
                "is a mount point; lorafs does not replace mount points: \
                 write into a new directory inside it, or elsewhere",
            ));
        }
        if let Some(inner) = mounts.iter().find(|m| m.starts_with(&path)) {
            return Err(refuse(&format!(
                "contains a mount point ({}); refusing to replace it",
                inner.display()
            )));
        }
        if kind == Existing::File && self.trailing_slash {
            return Err(refuse(
                "is a regular file, but the trailing `/` names a directory",
            ));
        }
        Ok(kind)
    }
}

pub(super) fn refusal(out: &Path, what: &str) -> Error {
    Error::Output {
        path: out.to_path_buf(),
        what: what.to_string(),
    }
}

/// Why `real` (canonical) cannot be replaced because the process works inside it, if so.
fn holds_cwd(real: &Path, cwd: Option<&Path>) -> Option<&'static str> {
    let cwd = cwd?;
    if cwd == real {
        Some("is the current directory; refusing to replace it")
    } else if cwd.starts_with(real) {
        Some("is an ancestor of the current directory; refusing to replace it")
    } else {
        None
    }
}

/// The canonical parent directory of `out`, refusing a parent that is missing, is not a
/// directory, or is itself a symbolic link (`link/out` would write where `link` points).
fn check_parent(out: &Path, parent: &Path) -> Result<PathBuf> {
    let refuse = |what: String| Err(refusal(out, &what));
    match std::fs::symlink_metadata(parent) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return refuse(format!(
                "cannot be created: its parent directory {} does not exist",
                parent.display()
            ))
        }
        Err(e) => return Err(Error::io(parent, e)),
        Ok(meta) if meta.file_type().is_symlink() => {
            let to = std::fs::read_link(parent).unwrap_or_default();
            return refuse(format!(
                "is inside {}, a symbolic link (to {}); name the real directory instead",
                parent.display(),
                to.display()
            ));
        }
        Ok(meta) if !meta.is_dir() => {
            return refuse(format!("{} is not a directory", parent.display()))
        }
        Ok(_) => {}
    }
    parent.canonicalize().map_err(|e| Error::io(parent, e))
}

/// `path` (absolute) with `.` and `..` resolved by the text alone, as a reader would.
fn lexical_parent(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every mount point of this process's mount namespace (empty if `/proc` is unreadable: the
/// device comparison still catches mounts of other filesystems).
pub(super) fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape(field))))
        .collect()
}

/// A mountinfo path field: space, tab, newline and backslash are written `\ooo` (octal).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (field[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(br"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape(br"/x\0"), br"/x\0");
        assert!(mount_points().contains(&PathBuf::from("/")));
    }

    #[test]
    fn lexical_parents() {
        assert_eq!(lexical_parent(Path::new("/a/b/../c/.")), Path::new("/a/c"));
        assert_eq!(lexical_parent(Path::new("/../a")), Path::new("/a"));
    }
}
