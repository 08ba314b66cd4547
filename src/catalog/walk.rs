//! One walk of the catalog tree: the directories that hold both adapter files, with their
//! files' fingerprints, and what the walk could not see. Nothing here waits or remembers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, FileType, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::adapter::Adapter;
use crate::error::Error;
use crate::layout::Layout;

/// How many levels below the root adapter directories are looked for.
const MAX_DEPTH: usize = 4;
/// Directories walked at most: a catalog pointed at `/` by mistake, or links fanning out,
/// must not keep the watcher busy for minutes.
const MAX_DIRS: usize = 100_000;
/// Names the Hugging Face Trainer writes a checkpoint under before renaming it.
const STAGING_PREFIX: &[u8] = b"tmp-checkpoint-";

/// The identity of a directory, to enter none twice on one path from the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct DirId {
    dev: u64,
    ino: u64,
}

impl DirId {
    fn of(meta: &Metadata) -> DirId {
        DirId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The identity and state of one file: any write changes its modification time, any
/// replacement its inode, a `chmod` or a rename over it its change time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The identity and state of an adapter directory's two files: while it stays the same,
/// neither file was written, truncated or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    config: FileStamp,
    weights: FileStamp,
}

#[cfg(test)]
impl Fingerprint {
    /// A made-up fingerprint, distinct for each `n`.
    pub(super) fn fake(n: u64) -> Fingerprint {
        let stamp = FileStamp {
            dev: 1,
            ino: n,
            size: n,
            mtime: (0, 0),
            ctime: (0, 0),
        };
        Fingerprint {
            config: stamp,
            weights: stamp,
        }
    }
}

/// The fingerprint of the adapter files in `dir`; `None` if either is missing or is not a
/// regular file (links are followed).
pub(super) fn fingerprint(dir: &Path) -> io::Result<Option<Fingerprint>> {
    let stamp = |file: &str| match fs::metadata(dir.join(file)) {
        Ok(meta) if meta.is_file() => Ok(Some(FileStamp::of(&meta))),
        Ok(_) => Ok(None),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    };
    let (Some(config), Some(weights)) =
        (stamp(Adapter::CONFIG_FILE)?, stamp(Adapter::WEIGHTS_FILE)?)
    else {
        return Ok(None);
    };
    Ok(Some(Fingerprint { config, weights }))
}

/// Whether the adapter files in `dir` are fully written: the config is a JSON object, the
/// weights' header is valid and the file ends where its last tensor does.
pub(super) fn check_complete(dir: &Path) -> crate::Result<()> {
    type JsonObject = serde_json::Map<String, serde_json::Value>;
    crate::error::read_json::<JsonObject>(&dir.join(Adapter::CONFIG_FILE))?;
    Layout::open(&dir.join(Adapter::WEIGHTS_FILE))?;
    Ok(())
}

/// A directory holding both adapter files, as one walk saw it.
#[derive(Debug)]
pub(super) struct Candidate {
    pub dir: PathBuf,
    pub fingerprint: Fingerprint,
}

/// What one walk saw.
#[derive(Debug, Default)]
pub(super) struct Walk {
    /// By name (path relative to the root).
    pub candidates: BTreeMap<PathBuf, Candidate>,
    /// Names below which the walk could not see (the empty name: anywhere): what was found
    /// there before is neither confirmed nor gone.
    pub unsure: Vec<PathBuf>,
    /// One line per problem met, naming its path.
    pub problems: Vec<String>,
}

impl Walk {
    /// Whether the walk could not see whether `name` is still there.
    pub fn is_unsure(&self, name: &Path) -> bool {
        self.unsure.iter().any(|u| name.starts_with(u))
    }
}

/// Walk `root` (an absolute path); `on_dir` is called with each directory and its identity
/// before the directory is listed, so a change made after the listing is not missed by a
/// watch set up in `on_dir`.
pub(super) fn walk(root: &Path, on_dir: &mut dyn FnMut(&Path, DirId)) -> Walk {
    let mut walker = Walker {
        on_dir,
        dirs: 0,
        out: Walk::default(),
    };
    match fs::metadata(root) {
        Ok(meta) => walker.visit(root, Path::new(""), &mut vec![DirId::of(&meta)]),
        // Like any directory: gone means its views are gone.
        Err(e) if is_gone(&e) => {}
        Err(e) => walker.unsure(Path::new(""), Error::io(root, e)),
    }
    walker.out
}

struct Walker<'a> {
    on_dir: &'a mut dyn FnMut(&Path, DirId),
    dirs: usize,
    out: Walk,
}

impl Walker<'_> {
    /// Visit directory `dir`, named `name`; `ancestors` ends with `dir`'s own identity.
    fn visit(&mut self, dir: &Path, name: &Path, ancestors: &mut Vec<DirId>) {
        (self.on_dir)(dir, ancestors[ancestors.len() - 1]);
        let entries = match list(dir) {
            Ok(entries) => entries,
            Err(e) if is_gone(&e) => return,
            Err(e) => return self.unsure(name, Error::io(dir, e)),
        };
        if !name.as_os_str().is_empty() {
            self.candidate(dir, name, &entries);
        }
        // `ancestors` holds the root and each level down to `dir`.
        if ancestors.len() > MAX_DEPTH {
            return;
        }
        for (entry, file_type) in entries {
            let bytes = entry.as_bytes();
            if bytes.starts_with(b".") || bytes.starts_with(STAGING_PREFIX) {
                continue;
            }
            if !file_type.is_dir() && !file_type.is_symlink() {
                continue;
            }
            let path = dir.join(&entry);
            let meta = match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => meta,
                Ok(_) => continue,
                Err(e) if is_gone(&e) => continue,
                Err(e) => {
                    self.unsure(&name.join(&entry), Error::io(&path, e));
                    continue;
                }
            };
            let id = DirId::of(&meta);
            if ancestors.contains(&id) {
                let loop_back = io::Error::other("leads back to a directory above it; not entered");
                self.out
                    .problems
                    .push(Error::io(&path, loop_back).to_string());
                continue;
            }
            if self.dirs == MAX_DIRS {
                let what = format!("more than {MAX_DIRS} directories; the rest is not searched");
                return self.unsure(Path::new(""), Error::io(&path, io::Error::other(what)));
            }
            self.dirs += 1;
            ancestors.push(id);
            self.visit(&path, &name.join(&entry), ancestors);
            ancestors.pop();
        }
    }

    /// Record `dir` if its listing holds both adapter files.
    fn candidate(&mut self, dir: &Path, name: &Path, entries: &[(OsString, FileType)]) {
        let has = |file: &str| entries.iter().any(|(entry, _)| entry == file);
        if !has(Adapter::CONFIG_FILE) || !has(Adapter::WEIGHTS_FILE) {
            return;
        }
        match fingerprint(dir) {
            Ok(Some(fingerprint)) => {
                let dir = dir.to_path_buf();
                let candidate = Candidate { dir, fingerprint };
                self.out.candidates.insert(name.to_path_buf(), candidate);
            }
            Ok(None) => {}
            Err(e) => self.unsure(name, Error::io(dir, e)),
        }
    }

    fn unsure(&mut self, name: &Path, problem: Error) {
        self.out.unsure.push(name.to_path_buf());
        let line = format!("{problem} (views found there before are kept)");
        self.out.problems.push(line);
    }
}

/// The entries of `dir` by name, sorted, with their types as the listing gives them.
fn list(dir: &Path) -> io::Result<Vec<(OsString, FileType)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        entries.push((entry.file_name(), entry.file_type()?));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Whether an error says the path is not there (anymore).
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}
