//! The vocabulary keys of the last few model directories, kept by the contents of the files
//! they were computed from.
//!
//! Every view of a mount has its own GGUF header, and so its own `tokenizer.*` keys, but the
//! views of one base share the base's tokenizer files (unless an adapter brings its own).
//! Computing the keys means loading a `tokenizer.json` of often 10–20 MB into the tokenizers
//! library, for each view and each GGUF type. So the keys are kept with a record of every
//! file read and listing made to compute them; a directory whose files read the same (same
//! names present and absent, same bytes, by SHA-256) gets the kept keys, having read those
//! files once more (so the caller sees the same reads).

use super::{Metadata, ModelFiles, VocabFamily};
use crate::Result;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Directories kept: each entry holds a vocabulary's keys (a few MB to some tens of MB
/// for the largest vocabularies).
const KEPT: usize = 4;

/// What the computation saw: a file's SHA-256 (`None`: absent), or a subdirectory's listing.
#[derive(Clone, PartialEq, Eq)]
enum Seen {
    File(String, Option<[u8; 32]>),
    Listing(String, Vec<String>),
}

struct Entry {
    family: VocabFamily,
    config: Json,
    seen: Vec<Seen>,
    keys: Arc<Metadata>,
}

/// Recent vocabularies, most recently used first.
pub(super) struct Memo {
    entries: Mutex<Vec<Entry>>,
}

/// The process's memo.
pub(super) static MEMO: Memo = Memo::new();

impl Memo {
    pub(super) const fn new() -> Memo {
        Memo {
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The keys for `files`: kept ones if an entry for `family` and `config` saw the same
    /// files, else `compute(files)` (kept if it succeeds).
    pub(super) fn get_or_compute(
        &self,
        files: &dyn ModelFiles,
        config: &Json,
        family: VocabFamily,
        compute: impl FnOnce(&dyn ModelFiles) -> Result<Metadata>,
    ) -> Result<Arc<Metadata>> {
        let candidates: Vec<(Vec<Seen>, Arc<Metadata>)> = (self.lock().iter())
            .filter(|e| e.family == family && e.config == *config)
            .map(|e| (e.seen.clone(), e.keys.clone()))
            .collect();
        for (seen, keys) in candidates {
            if sees_the_same(files, &seen)? {
                self.keep(family, config, seen, keys.clone());
                return Ok(keys);
            }
        }
        let recorder = Recorder {
            files,
            seen: RefCell::new(Vec::new()),
        };
        let keys = Arc::new(compute(&recorder)?);
        self.keep(family, config, recorder.seen.into_inner(), keys.clone());
        Ok(keys)
    }

    /// Put the entry first, dropping its older copy and the least recently used beyond
    /// [`KEPT`].
    fn keep(&self, family: VocabFamily, config: &Json, seen: Vec<Seen>, keys: Arc<Metadata>) {
        let mut entries = self.lock();
        entries.retain(|e| !(e.family == family && e.config == *config && e.seen == seen));
        entries.insert(
            0,
            Entry {
                family,
                config: config.clone(),
                seen,
                keys,
            },
        );
        entries.truncate(KEPT);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // The entries are replaced whole, so a panic elsewhere cannot leave one half made.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `files` reads as `seen` says, checked in the order the computation read them.
fn sees_the_same(files: &dyn ModelFiles, seen: &[Seen]) -> Result<bool> {
    for s in seen {
        let now = match s {
            Seen::File(name, _) => Seen::File(name.clone(), files.read(name)?.map(digest)),
            Seen::Listing(dir, _) => Seen::Listing(dir.clone(), sorted(files.list(dir)?)),
        };
        if now != *s {
            return Ok(false);
        }
    }
    Ok(true)
}

fn digest(bytes: Vec<u8>) -> [u8; 32] {
    Sha256::digest(&bytes).into()
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort_unstable();
    names
}

/// The caller's files, noting each first read of a name and each listing.
struct Recorder<'a> {
    files: &'a dyn ModelFiles,
    seen: RefCell<Vec<Seen>>,
}

impl Recorder<'_> {
    fn note(&self, seen: Seen) {
        let mut all = self.seen.borrow_mut();
        let known = all.iter().any(|s| match (s, &seen) {
            (Seen::File(a, _), Seen::File(b, _)) => a == b,
            (Seen::Listing(a, _), Seen::Listing(b, _)) => a == b,
            _ => false,
        });
        if !known {
            all.push(seen);
        }
    }
}

impl ModelFiles for Recorder<'_> {
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let bytes = self.files.read(name)?;
        let hash = bytes.as_ref().map(|b| Sha256::digest(b).into());
        self.note(Seen::File(name.to_string(), hash));
        Ok(bytes)
    }

    fn read_capped(&self, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        let bytes = self.files.read_capped(name, cap)?;
        let hash = bytes.as_ref().map(|b| Sha256::digest(b).into());
        self.note(Seen::File(name.to_string(), hash));
        Ok(bytes)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let names = self.files.list(dir)?;
        self.note(Seen::Listing(dir.to_string(), sorted(names.clone())));
        Ok(names)
    }

    fn root(&self) -> &Path {
        self.files.root()
    }
}
