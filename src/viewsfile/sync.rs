//! The views of a file kept in step with it: what was applied, from which versions of the
//! file and of the adapter files, and what to do when they change.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{load, Entries, POLL, QUIET};
use crate::adapter::Adapter;
use crate::control::ViewSpec;

/// Where the views of a file go: the mount's view registry.
pub trait Registry: Send + Sync {
    /// Make the file's view `name` serve `spec` (added, or replaced whole), or with `None`
    /// remove the file's view `name`. A name held by a view from elsewhere is an error
    /// (and is never removed); removing a view that is gone is not.
    fn apply(&self, name: &Path, spec: Option<&ViewSpec>) -> Result<(), String>;
}

/// The identity and state of one file: while it stays the same, the file was not written,
/// truncated or replaced. `None`: missing (or unreadable).
type Stamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// The stamps of an adapter directory's two files.
fn adapter_stamp(dir: &Path) -> [Stamp; 2] {
    [Adapter::CONFIG_FILE, Adapter::WEIGHTS_FILE].map(|file| stamp(&dir.join(file)))
}

/// The state of the file and of every adapter its last good version names.
#[derive(Clone, PartialEq, Debug)]
struct Snapshot {
    file: Stamp,
    adapters: BTreeMap<PathBuf, [Stamp; 2]>,
}

/// A view of the file as last applied, or as last refused (so it is logged once).
#[derive(PartialEq)]
struct Version {
    spec: ViewSpec,
    adapters: Vec<[Stamp; 2]>,
}

impl Version {
    fn now(spec: &ViewSpec) -> Version {
        Version {
            spec: spec.clone(),
            adapters: spec
                .adapters
                .iter()
                .map(|(d, _)| adapter_stamp(d))
                .collect(),
        }
    }
}

/// A views file and the views it made.
pub struct FileSync {
    path: PathBuf,
    /// The last version of the file that parsed.
    entries: Entries,
    /// The views the file made, each as built.
    served: BTreeMap<PathBuf, Version>,
    /// Views whose last build failed, as they were then: not tried again until they change.
    refused: BTreeMap<PathBuf, Version>,
    /// What the last reading acted on.
    applied: Snapshot,
    /// A state other than `applied`, and when it was first seen: read once quiet.
    pending: Option<(Snapshot, Instant)>,
}

impl FileSync {
    /// Read the file at `path` and apply every view of it; any error (the file, a view that
    /// cannot be built or whose name is taken) is returned, for the mount to refuse.
    pub fn open(path: &Path, registry: &dyn Registry) -> Result<FileSync, String> {
        let path =
            std::path::absolute(path).map_err(|e| format!("views file {}: {e}", path.display()))?;
        let file = stamp(&path);
        let entries = load(&path)?;
        let mut served = BTreeMap::new();
        for (name, spec) in &entries {
            let version = Version::now(spec);
            (registry.apply(name, Some(spec))).map_err(|e| {
                format!(
                    "views file {}: view {}: {e}",
                    path.display(),
                    name.display()
                )
            })?;
            served.insert(name.clone(), version);
        }
        log::info!("views file {}: {} views", path.display(), served.len());
        let mut sync = FileSync {
            path,
            entries,
            served,
            refused: BTreeMap::new(),
            applied: Snapshot {
                file,
                adapters: BTreeMap::new(),
            },
            pending: None,
        };
        sync.applied = sync.built_from(file);
        Ok(sync)
    }

    /// The file's path (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The adapter directories of the file's last good version: watched too.
    pub fn adapter_dirs(&self) -> impl Iterator<Item = &Path> {
        (self.entries.values()).flat_map(|spec| spec.adapters.iter().map(|(d, _)| d.as_path()))
    }

    /// Look at the file and its adapters; read the file again if they changed and have
    /// stayed so for [`QUIET`]. Returns how long until the next look is due.
    pub fn check(&mut self, registry: &dyn Registry) -> Duration {
        let now = self.snapshot();
        if now == self.applied {
            self.pending = None;
            return POLL;
        }
        match &self.pending {
            Some((seen, since)) if *seen == now => {
                let quiet_for = since.elapsed();
                if quiet_for < QUIET {
                    return QUIET - quiet_for;
                }
                self.pending = None;
                self.reload(now.file, registry);
                POLL
            }
            _ => {
                self.pending = Some((now, Instant::now()));
                QUIET
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            file: stamp(&self.path),
            adapters: (self.adapter_dirs())
                .map(|dir| (dir.to_path_buf(), adapter_stamp(dir)))
                .collect(),
        }
    }

    /// Read the file again and apply what changed. `file` is its stamp before the read: a
    /// change made during the read is seen at the next look.
    fn reload(&mut self, file: Stamp, registry: &dyn Registry) {
        let entries = match load(&self.path) {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("{e}; the views stay as they were");
                // Logged once: looked at again when the file changes again.
                self.applied.file = file;
                return;
            }
        };
        let gone: Vec<PathBuf> = (self.served.keys())
            .filter(|name| !entries.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.served.remove(&name);
            if let Err(e) = registry.apply(&name, None) {
                self.log_refused(&name, &e);
            }
        }
        self.refused.retain(|name, _| entries.contains_key(name));
        for (name, spec) in &entries {
            let version = Version::now(spec);
            if self.served.get(name) == Some(&version) || self.refused.get(name) == Some(&version) {
                continue;
            }
            match registry.apply(name, Some(spec)) {
                Ok(()) => {
                    self.refused.remove(name);
                    self.served.insert(name.clone(), version);
                }
                Err(e) => {
                    self.log_refused(name, &e);
                    self.refused.insert(name.clone(), version);
                }
            }
        }
        self.entries = entries;
        self.applied = self.built_from(file);
    }

    /// The snapshot the views of the file were built from (or refused at): the file's
    /// stamp `file` and, for each entry, its adapters' stamps then.
    fn built_from(&self, file: Stamp) -> Snapshot {
        let mut adapters = BTreeMap::new();
        for name in self.entries.keys() {
            let version = (self.refused.get(name)).or_else(|| self.served.get(name));
            let Some(version) = version else { continue };
            for ((dir, _), stamp) in version.spec.adapters.iter().zip(&version.adapters) {
                adapters.insert(dir.clone(), *stamp);
            }
        }
        Snapshot { file, adapters }
    }

    fn log_refused(&self, name: &Path, e: &str) {
        log::warn!(
            "views file {}: view {}: {e}; kept as it was",
            self.path.display(),
            name.display()
        );
    }
}
