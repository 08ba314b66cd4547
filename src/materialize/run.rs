//! A run's own files beside OUT, and how they become OUT.
//!
//! A run with id ID writes, beside OUT (so that every rename stays in one directory):
//! - `.OUT.lorafs-ID.owner`, the [`Marker`] (pid, start time, boot id), created first;
//! - `.OUT.lorafs-ID/`, the new tree, renamed to OUT when complete. With `--force` it is
//!   exchanged with the old OUT in one atomic step, so afterwards it holds the old OUT;
//! - `.OUT.lorafs-ID.old`, the old OUT moved aside, only on filesystems that cannot exchange.
//!
//! The owner file claims the other two names: whatever is there is removed (never through a
//! symbolic link, never across a mount point) when the run ends, or by a later run once the
//! marker's process is gone, and only then is the owner file removed. A name without a valid
//! owner file is never touched.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::fsops::{exchange, remove_tree, rename_noreplace};
use super::marker::{Marker, Owner};
use super::target::{mount_points, refusal, Existing, Target};
use crate::error::{Error, Result};

/// Random characters in a run id (alphanumeric).
const ID_LEN: usize = 10;

/// Tries at a fresh run id before giving up (a collision needs the same random id twice).
const ID_TRIES: usize = 16;

/// An owner file larger than this is not a marker.
const MARKER_MAX: u64 = 4096;

/// The names of one run, and how to clear them.
#[derive(Debug)]
struct Names {
    parent: PathBuf,
    /// OUT as the user gave it, for messages.
    out_shown: PathBuf,
    out: PathBuf,
    /// `.OUT.lorafs-ID`: the owner file and the aside name append a suffix to it.
    stem: OsString,
}

/// The files of this run. Dropping it removes them (see [`Names::clean`]).
#[derive(Debug)]
pub(super) struct RunDir(Names);

impl RunDir {
    /// Write the owner file, then create the (empty, 0700) directory of the new tree.
    pub fn create(target: &Target) -> Result<RunDir> {
        let marker = Marker::current().to_text();
        let prefix = run_prefix(&target.name);
        for _ in 0..ID_TRIES {
            let mut owner = tempfile::Builder::new()
                .prefix(&prefix)
                .suffix(".owner")
                .rand_bytes(ID_LEN)
                .tempfile_in(&target.parent)
                .map_err(|e| Error::io(&target.parent, e))?;
            // Durable before the tree exists, so that a tree left by a power loss has one.
            owner
                .write_all(marker.as_bytes())
                .and_then(|()| owner.as_file().sync_all())
                .map_err(|e| Error::io(owner.path(), e))?;
            let stem = owner
                .path()
                .file_name()
                .expect("a temporary file has a name");
            let stem = OsStr::from_bytes(stem.as_bytes().strip_suffix(b".owner").expect("suffix"));
            let names = Names::new(target, stem);
            let tree = names.tree();
            match std::fs::DirBuilder::new().mode(0o700).create(&tree) {
                Ok(()) => {
                    // Only now is the name ours, and the run's drop may remove it.
                    let run = RunDir(names);
                    owner
                        .keep()
                        .map_err(|e| Error::io(run.0.owner(), e.error))?;
                    // Whatever the umask: lorafs writes into it, and nobody else reads it.
                    std::fs::set_permissions(&tree, PermissionsExt::from_mode(0o700))
                        .map_err(|e| Error::io(&tree, e))?;
                    return Ok(run);
                }
                // Not ours: try another name (the owner file goes with `owner`).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&tree, e)),
            }
        }
        Err(Error::io(
            &target.parent,
            io::Error::other("no free name for a temporary directory"),
        ))
    }

    /// The directory the new tree is written to.
    pub fn tree(&self) -> PathBuf {
        self.0.tree()
    }

    /// Rename the complete tree to OUT. An OUT that exists now is checked again (it may
    /// have appeared or changed while the tree was written); without `force` it is left
    /// alone and the run fails; with `force` it is swapped out and removed afterwards (by
    /// the drop of this run).
    pub fn place(&self, target: &Target, inputs: &[PathBuf], force: bool) -> Result<()> {
        let out = &self.0.out;
        // A few rounds: OUT can appear between the check and the rename; check it again.
        for _ in 0..3 {
            match target.existing(inputs)? {
                Existing::Nothing => match rename_noreplace(&self.tree(), out) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::io(out, e)),
                },
                Existing::Directory | Existing::File if !force => {
                    return Err(refusal(
                        &self.0.out_shown,
                        "was created by someone else while the merged model was being \
                         written; left it alone (pass --force to replace it)",
                    ))
                }
                Existing::Directory | Existing::File => return self.replace(),
            }
        }
        Err(refusal(
            &self.0.out_shown,
            "keeps appearing and disappearing; left it alone",
        ))
    }

    /// Put the tree at OUT and the old OUT under this run's names, from where the drop
    /// removes it.
    fn replace(&self) -> Result<()> {
        let (tree, out, aside) = (self.tree(), &self.0.out, self.0.aside());
        if exchange(&tree, out).map_err(|e| Error::io(out, e))? {
            return Ok(());
        }
        // No RENAME_EXCHANGE here (NFS, some FUSE filesystems): two renames. Between them
        // OUT is missing; a crash there leaves the old OUT at `aside`, which the next run
        // to OUT puts back (see `clean`).
        rename_noreplace(out, &aside).map_err(|e| Error::io(out, e))?;
        if let Err(e) = rename_noreplace(&tree, out) {
            if let Err(back) = rename_noreplace(&aside, out) {
                log::error!(
                    "{}: could not put the old output back from {}: {back}",
                    self.0.out_shown.display(),
                    aside.display()
                );
            }
            return Err(Error::io(out, e));
        }
        Ok(())
    }
}

impl Names {
    fn new(target: &Target, stem: &OsStr) -> Names {
        Names {
            parent: target.parent.clone(),
            out_shown: target.shown.clone(),
            out: target.path(),
            stem: stem.to_os_string(),
        }
    }

    /// The directory the new tree is written to.
    fn tree(&self) -> PathBuf {
        self.parent.join(&self.stem)
    }

    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut name = self.stem.clone();
        name.push(suffix);
        self.parent.join(name)
    }

    fn owner(&self) -> PathBuf {
        self.with_suffix(".owner")
    }

    fn aside(&self) -> PathBuf {
        self.with_suffix(".old")
    }

    /// Remove what this run's names hold: the tree (or, after an exchange, the old OUT), and
    /// the old OUT moved aside (put back instead when OUT is missing). The owner file goes
    /// last, only when everything else is gone.
    fn clean(&self) -> Result<()> {
        let aside = self.aside();
        if std::fs::symlink_metadata(&aside).is_ok() {
            match std::fs::symlink_metadata(&self.out) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    rename_noreplace(&aside, &self.out).map_err(|e| Error::io(&aside, e))?;
                    log::warn!(
                        "{}: put back the old output, left at {} by an interrupted run",
                        self.out_shown.display(),
                        aside.display()
                    );
                }
                _ => remove_plain(&self.parent, &aside)?,
            }
        }
        remove_plain(&self.parent, &self.tree())?;
        match std::fs::remove_file(self.owner()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(self.owner(), e)),
            _ => Ok(()),
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(err) = self.0.clean() {
            let out = self.0.out_shown.display();
            log::warn!("{out}: {err}; the next run to {out} will remove it");
        }
    }
}

/// Remove `path` (in `parent`) if it is a directory or a regular file; leave anything else.
fn remove_plain(parent: &Path, path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    if !(meta.is_dir() || meta.is_file()) {
        let what = "is neither a directory nor a regular file; left in place";
        return Err(Error::io(path, io::Error::other(what)));
    }
    // A bind mount (same device, so `remove_tree` would enter it) made since OUT was checked.
    if let Some(mount) = mount_points().into_iter().find(|m| m.starts_with(path)) {
        let what = format!("holds a mount point ({}); left in place", mount.display());
        return Err(Error::io(path, io::Error::other(what)));
    }
    remove_tree(parent, path.file_name().expect("a run's names are names"))
}

/// The longest file name Linux filesystems take (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Bytes of OUT's name kept in a run's names: the longest, `.NAME.lorafs-ID.owner`, must fit
/// in [`NAME_MAX`].
const NAME_KEPT: usize = NAME_MAX - ".".len() - ".lorafs-".len() - ID_LEN - ".owner".len();

/// `.OUT.lorafs-`: how every name of a run for OUT begins. A name too long for that (OUT
/// names of 231 to 255 bytes) is cut and ends in a hash of the whole name, so the prefix stays
/// one per OUT and the next run to OUT finds what this one left.
fn run_prefix(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    let mut prefix = b".".to_vec();
    if bytes.len() <= NAME_KEPT {
        prefix.extend_from_slice(bytes);
    } else {
        // FNV-1a, 64 bits: stable across builds and machines, unlike std's hasher.
        let hash = (bytes.iter()).fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let tail = format!("~{hash:016x}");
        prefix.extend_from_slice(&bytes[..NAME_KEPT - tail.len()]);
        prefix.extend_from_slice(tail.as_bytes());
    }
    prefix.extend_from_slice(b".lorafs-");
    OsString::from_vec(prefix)
}

/// Remove what earlier runs to the same OUT left behind (SIGKILL, power loss): the names
/// claimed by every owner file whose marker is valid and whose process is gone. Nothing
/// else is touched; failures are logged, never fatal.
pub(super) fn sweep(target: &Target) {
    let prefix = run_prefix(&target.name);
    let Ok(entries) = std::fs::read_dir(&target.parent) else {
        return;
    };
    let here = Marker::current();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .as_bytes()
            .strip_prefix(prefix.as_bytes())
            .and_then(|rest| rest.strip_suffix(b".owner"))
        else {
            continue;
        };
        if id.len() != ID_LEN || !id.iter().all(u8::is_ascii_alphanumeric) {
            continue;
        }
        let stem = OsStr::from_bytes(&name.as_bytes()[..name.len() - ".owner".len()]);
        let run = Names::new(target, stem);
        let Some(marker) = read_marker(&run.owner()) else {
            continue;
        };
        match marker.owner(&here) {
            Owner::Gone => {
                log::info!(
                    "removing {}, left by an interrupted run (pid {})",
                    run.tree().display(),
                    marker.pid()
                );
                if let Err(err) = run.clean() {
                    log::warn!("{err}");
                }
            }
            Owner::Running | Owner::Elsewhere => {}
        }
    }
}

/// The marker in an owner file, if it is a regular file (not a link) of this user holding a
/// valid one. Another user's marker is never acted on: anyone who may write beside OUT could
/// plant one, with a dead pid, to have this run remove or move what its names hold.
fn read_marker(path: &Path) -> Option<Marker> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO under that name must not block the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file()
        || meta.len() > MARKER_MAX
        || meta.uid() != rustix::process::geteuid().as_raw()
    {
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Marker::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_fit_name_max_and_stay_one_per_output() {
        let name = |n: usize, last: u8| {
            let mut bytes = vec![b'a'; n];
            bytes[n - 1] = last;
            OsString::from_vec(bytes)
        };
        let longest = |out: &OsStr| run_prefix(out).len() + ID_LEN + ".owner".len();
        assert_eq!(run_prefix(OsStr::new("out")), OsStr::new(".out.lorafs-"));
        assert_eq!(longest(&name(NAME_KEPT, b'a')), NAME_MAX);
        for n in [NAME_KEPT + 1, 240, NAME_MAX] {
            assert_eq!(longest(&name(n, b'a')), NAME_MAX, "{n}");
            assert_eq!(run_prefix(&name(n, b'a')), run_prefix(&name(n, b'a')));
            assert_ne!(run_prefix(&name(n, b'a')), run_prefix(&name(n, b'b')));
        }
    }
}
