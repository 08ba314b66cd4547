//! The two filesystem operations that could destroy data if done carelessly: removing a tree
//! and renaming onto the output path.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, CWD};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// Nesting beyond which removal gives up: it holds one descriptor per level, and this stays
/// well inside the default limit of 1024 open files.
const MAX_DEPTH: usize = 256;

/// Remove `name` in directory `dir` and, if it is a directory, everything below it.
/// Descriptor-relative all the way down, so a component swapped for a symbolic link while this
/// runs is never followed: links are unlinked, never entered. A directory on another device
/// than `dir` (a mount point) is not entered and the removal fails. A directory without owner
/// write and search bits (an earlier output that kept a 0555 source mode) gets them first, so
/// that what lorafs wrote it can also remove. A missing `name` is not an error.
pub(super) fn remove_tree(dir: &Path, name: &OsStr) -> Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let parent = rustix::fs::open(dir, flags, Mode::empty()).map_err(|e| fail(dir, e))?;
    let dev = rustix::fs::fstat(&parent).map_err(|e| fail(dir, e))?.st_dev;
    remove_at(parent.as_fd(), name.as_bytes(), dev, &dir.join(name), 0)
}

/// Remove entry `name` of `dir` (at `path`, for messages) as [`remove_tree`] says.
fn remove_at(dir: BorrowedFd, name: &[u8], dev: u64, path: &Path, depth: usize) -> Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()), // removed meanwhile (another run's sweep)
        Err(e) => return Err(fail(path, e)),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return unlink(dir, name, AtFlags::empty(), path);
    }
    if depth >= MAX_DEPTH {
        return Err(Error::io(
            path,
            io::Error::other("nested too deep to remove"),
        ));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(|e| fail(path, e))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| fail(path, e))?;
    if stat.st_dev != dev {
        let what = "is a mount point (another filesystem); lorafs does not remove what it holds";
        return Err(Error::io(path, io::Error::other(what)));
    }
    let mode = Mode::from_raw_mode(stat.st_mode);
    if !mode.contains(Mode::RWXU) {
        // Best effort: if it fails, the unlinks below report the real error.
        let _ = rustix::fs::fchmod(&fd, mode | Mode::RWXU);
    }
    let mut names = Vec::new();
    for entry in Dir::read_from(&fd).map_err(|e| fail(path, e))? {
        let entry = entry.map_err(|e| fail(path, e))?;
        let entry_name: &CStr = entry.file_name();
        if !matches!(entry_name.to_bytes(), b"." | b"..") {
            names.push(entry_name.to_owned());
        }
    }
    for entry_name in names {
        let bytes = entry_name.to_bytes();
        let entry_path = path.join(OsStr::from_bytes(bytes));
        remove_at(fd.as_fd(), bytes, dev, &entry_path, depth + 1)?;
    }
    unlink(dir, name, AtFlags::REMOVEDIR, path)
}

fn unlink(dir: BorrowedFd, name: &[u8], flags: AtFlags, path: &Path) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(fail(path, e)),
    }
}

fn fail(path: &Path, errno: Errno) -> Error {
    Error::io(path, errno.into())
}

/// Rename `from` to `to` unless `to` exists (`EEXIST` then), atomically where the filesystem
/// supports `RENAME_NOREPLACE`.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL | Errno::NOSYS) => {
            // A filesystem (or kernel) without RENAME_NOREPLACE: check, then rename. Another
            // process could create `to` between the two calls: a window of microseconds,
            // where the flag closes it entirely.
            match std::fs::symlink_metadata(to) {
                Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::rename(from, to),
                Err(e) => Err(e),
            }
        }
        other => other.map_err(io::Error::from),
    }
}

/// Swap `a` and `b` atomically (`RENAME_EXCHANGE`); Ok(false) when the filesystem cannot.
pub(super) fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    match rustix::fs::renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(true),
        Err(Errno::INVAL | Errno::NOSYS) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Make `dir`'s entries durable: after its files were written and synced, or after a rename
/// into it, so that the output's names are on disk when the run says it is done. What cannot
/// be asked of the system is skipped, not failed after the whole run's work: a directory the
/// user may write into but not read (no descriptor to sync), and filesystems that do not sync
/// directories (`EINVAL`, `EOPNOTSUPP`: some FUSE and network filesystems). A failed sync
/// (`EIO`) fails the run.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ACCESS) => {
            log::debug!("{}: not readable, its entries not synced", dir.display());
            return Ok(());
        }
        Err(e) => return Err(fail(dir, e)),
    };
    match rustix::fs::fsync(&fd) {
        Err(e @ (Errno::INVAL | Errno::OPNOTSUPP)) => {
            log::debug!(
                "{}: the filesystem does not sync directories ({e})",
                dir.display()
            );
            Ok(())
        }
        done => done.map_err(|e| fail(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_dir_syncs_a_directory_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
        let missing = dir.path().join("gone");
        let err = sync_dir(&missing).unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }
}
