//! Views changed while mounted: `lorafs view add|set|rm`, and the catalog's directories
//! appearing, changing and going. Each change opens the new view first (a bad one changes
//! nothing), then swaps it into the tree under new inode numbers, then tells the kernel
//! which names it must forget.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use fuser::{FileAttr, INodeNo, Notifier};

use super::{inodes, SharedTree};
use crate::catalog::{Event, Found};
use crate::control::{ViewControl, ViewInfo, ViewSource, ViewSpec};
use crate::dtype::DType;
use crate::engine::Engine;
use crate::gguf::OutType;
use crate::plan::Combine;
use crate::tree::{self, Change};
use crate::view::View;

pub struct Views {
    engine: Arc<Engine>,
    dtype: Option<DType>,
    tree: SharedTree,
    /// The kernel's notifier and the mount point, once mounted.
    notifier: OnceLock<(Notifier, PathBuf)>,
    /// Warm each view (merge it into the page cache) when a file of it is first opened.
    warm: bool,
    /// The views warmed (or being warmed), so each is warmed once.
    warmed: Mutex<Vec<Weak<View>>>,
    /// Changes are made one at a time (a name checked free stays free until it is used).
    changing: Mutex<()>,
    /// GGUF files each view also serves (`--gguf`).
    gguf: Vec<OutType>,
    /// How every view combines its adapters (`--combine`).
    combine: Option<Combine>,
}

impl Views {
    /// The registry of views over `engine`, in `tree`; with `warm`, each view is merged into
    /// the page cache in the background when a file of it is first opened.
    pub fn new(engine: Arc<Engine>, dtype: Option<DType>, tree: SharedTree, warm: bool) -> Views {
        Views {
            engine,
            dtype,
            tree,
            notifier: OnceLock::new(),
            warm,
            warmed: Mutex::new(Vec::new()),
            changing: Mutex::new(()),
            gguf: Vec::new(),
            combine: None,
        }
    }

    /// Every view combines its adapters this way.
    pub fn with_combine(mut self, combine: Option<Combine>) -> Views {
        self.combine = combine;
        self
    }

    /// Every view also serves these GGUF files.
    pub fn with_gguf(mut self, types: &[OutType]) -> Views {
        self.gguf = types.to_vec();
        self
    }

    /// Once the mount exists: changes from now on are notified to the kernel.
    pub fn set_notifier(&self, notifier: Notifier, mountpoint: &Path) {
        let _ = self.notifier.set((notifier, mountpoint.to_path_buf()));
    }

    /// A file of `view` was opened: with warming on, the first open of a view merges the
    /// rest of it into the page cache in the background, so a loader that reads the config
    /// first finds the weights there (as a mount of one model warms at once).
    pub fn opened(&self, view: &Arc<View>) {
        let Some((notifier, mountpoint)) = self.notifier.get().filter(|_| self.warm) else {
            return;
        };
        {
            let mut warmed = self.warmed.lock().unwrap_or_else(|p| p.into_inner());
            warmed.retain(|w| w.strong_count() > 0);
            if warmed
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(view)))
            {
                return;
            }
            warmed.push(Arc::downgrade(view));
        }
        let place = {
            let tree = self.tree.read().unwrap_or_else(|p| p.into_inner());
            (tree.views().iter())
                .find(|(_, m)| Arc::ptr_eq(&m.view, view))
                .map(|(name, m)| (mountpoint.join(name), m.root()))
        };
        if let Some((dir, root)) = place {
            if let Err(e) = super::session::spawn_warm(view.clone(), notifier.clone(), dir, root) {
                log::warn!("warm-up not started: {e}");
            }
        }
    }

    /// Open the view of `spec`. A named or file view reads and checks every factor now, so
    /// a bad adapter is refused here; a catalog view reads its factors when first read (its
    /// headers and configs are checked now), so a catalog of many checkpoints mounts fast.
    /// Options the spec leaves out are the mount's (`--dtype`, `--gguf`, `--combine`).
    pub fn open(&self, spec: &ViewSpec, origin: &ViewSource) -> Result<Arc<View>, String> {
        let dtype = spec.dtype.or(self.dtype);
        let combine = spec.combine.as_ref().or(self.combine.as_ref());
        let mut view = View::open(self.engine.clone(), &spec.adapters, dtype, combine)
            .map_err(|e| e.to_string())?;
        if *origin != ViewSource::Catalog {
            view.realize_all().map_err(|e| e.to_string())?;
        }
        let gguf = spec.gguf.as_deref().unwrap_or(&self.gguf);
        view.add_gguf(gguf).map_err(|e| e.to_string())?;
        Ok(Arc::new(view))
    }

    /// Add a view at `name`; fails if the name is taken, or cannot take a view.
    pub fn insert(&self, name: &Path, view: Arc<View>, origin: ViewSource) -> Result<(), String> {
        self.put(name, view, origin, false)
    }

    /// Replace the view at `name`; fails if there is none.
    pub fn replace(&self, name: &Path, view: Arc<View>, origin: ViewSource) -> Result<(), String> {
        self.put(name, view, origin, true)
    }

    /// Remove the view at `name`; open files of it keep reading it until closed.
    pub fn delete(&self, name: &Path) -> Result<(), String> {
        let _serial = self.lock_changes();
        let removed = self.write_tree().remove_view(name);
        match removed {
            Some((_, change)) => {
                self.notify(change);
                log::info!("view {} removed", name.display());
                Ok(())
            }
            None => Err(format!("no view named {}", name.display())),
        }
    }

    /// The views, by name.
    pub fn infos(&self) -> Vec<ViewInfo> {
        let tree = self.tree.read().unwrap_or_else(|p| p.into_inner());
        (tree.views().iter())
            .map(|(name, mounted)| ViewInfo {
                name: name.display().to_string(),
                source: mounted.origin,
                adapters: (mounted.view.plan.adapters.iter())
                    .map(|a| (a.dir.clone(), a.weight))
                    .collect(),
            })
            .collect()
    }

    /// The origin of the view at `name`, if there is one.
    pub fn origin(&self, name: &Path) -> Option<ViewSource> {
        let tree = self.tree.read().unwrap_or_else(|p| p.into_inner());
        tree.views().get(name).map(|m| m.origin)
    }

    fn put(
        &self,
        name: &Path,
        view: Arc<View>,
        origin: ViewSource,
        replace: bool,
    ) -> Result<(), String> {
        let _serial = self.lock_changes();
        {
            let tree = self.tree.read().unwrap_or_else(|p| p.into_inner());
            let exists = tree.views().contains_key(name);
            match (replace, exists) {
                (true, false) => return Err(format!("no view named {}", name.display())),
                (false, true) => return Err(format!("a view named {} exists", name.display())),
                _ => {}
            }
        }
        // The nodes' attributes need a stat of every source: made before taking the lock.
        let numbers = self
            .tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .numbers();
        let first = numbers.take(inodes::count(&view));
        let nodes = inodes::build(&view, first).map_err(|e| e.to_string())?;
        let change;
        {
            let mut tree = self.write_tree();
            let dir_attr: FileAttr = tree.get(tree::ROOT).map(|n| n.attr).expect("a root");
            change = match replace {
                true => tree.replace_view(name, view, origin, nodes, &dir_attr)?.1,
                false => tree.add_view(name, view, origin, nodes, &dir_attr)?,
            };
        }
        // Told after the lock is released: the kernel may need to call back while it
        // handles a notification.
        self.notify(change);
        log::info!(
            "view {} {}",
            name.display(),
            if replace { "changed" } else { "added" }
        );
        Ok(())
    }

    /// Add a catalog directory found at the mount's start or by the watcher. One that is not
    /// a valid adapter for this base, or whose name cannot be a view's, is skipped with one
    /// log line: it never stops the mount or the other views.
    pub fn add_found(&self, found: &Found) {
        if let Err(e) = self.put_found(found, false) {
            log::warn!("catalog: {} skipped: {e}", found.dir.display());
        }
    }

    /// Apply a change the catalog watcher saw. A named view (`--view`, `view add`) is
    /// never touched by the catalog.
    pub fn catalog_event(&self, event: Event) {
        let (found, name) = match &event {
            Event::Appeared(f) | Event::Changed(f) => (Some(f), &f.name),
            Event::Disappeared { name } => (None, name),
        };
        match (self.origin(name), found) {
            (Some(ViewSource::Named), _) => log::info!(
                "catalog: {} changed, but the view of that name was named by hand: kept",
                name.display()
            ),
            (Some(ViewSource::File), _) => log::info!(
                "catalog: {} changed, but the view of that name is the views file's: kept",
                name.display()
            ),
            (Some(ViewSource::Catalog), None) => {
                if let Err(e) = self.delete(name) {
                    log::warn!("catalog: {}: {e}", name.display());
                }
            }
            (None, None) => {}
            // A view that exists changes; one that does not (a new directory, or one whose
            // earlier version was skipped) is added.
            (existing, Some(found)) => {
                if let Err(e) = self.put_found(found, existing.is_some()) {
                    log::warn!("catalog: {} skipped: {e}", found.dir.display());
                }
            }
        }
    }

    fn put_found(&self, found: &Found, replace: bool) -> Result<(), String> {
        let name = (found.name.to_str())
            .ok_or_else(|| "its path is not UTF-8".to_string())
            .and_then(tree::check_view_name)?;
        let spec = ViewSpec::of_adapters(vec![(found.dir.clone(), 1.0)]);
        let view = self.open(&spec, &ViewSource::Catalog)?;
        self.put(&name, view, ViewSource::Catalog, replace)
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_tree(&self) -> std::sync::RwLockWriteGuard<'_, super::MountTree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Tell the kernel to forget the names and directory attributes a change made stale.
    /// A name or inode the kernel never saw is not an error (ENOENT).
    fn notify(&self, change: Change) {
        let Some((notifier, _)) = self.notifier.get() else {
            return;
        };
        for (parent, name) in &change.names {
            if let Err(e) = notifier.inval_entry(INodeNo(*parent), name) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    log::warn!("kernel refused to forget the name {name:?}: {e}");
                }
            }
        }
        let mut dirs = change.dirs;
        dirs.sort_unstable();
        dirs.dedup();
        for dir in dirs {
            if let Err(e) = notifier.inval_inode(INodeNo(dir), 0, 0) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    log::warn!("kernel refused to forget directory {dir}'s attributes: {e}");
                }
            }
        }
    }
}

/// `lorafs view` on a mount of views: named views, each checked in full before it is
/// swapped in.
impl ViewControl for Views {
    fn list(&self) -> Vec<ViewInfo> {
        self.infos()
    }

    fn add(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String> {
        let name = tree::check_view_name(name)?;
        if self.origin(&name).is_some() {
            return Err(format!("a view named {} exists", name.display()));
        }
        let view = self.open(&ViewSpec::of_adapters(adapters), &ViewSource::Named)?;
        self.insert(&name, view, ViewSource::Named)
    }

    fn set(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String> {
        let name = tree::check_view_name(name)?;
        if self.origin(&name).is_none() {
            return Err(format!("no view named {}", name.display()));
        }
        let view = self.open(&ViewSpec::of_adapters(adapters), &ViewSource::Named)?;
        self.replace(&name, view, ViewSource::Named)
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        self.delete(&tree::check_view_name(name)?)
    }
}

/// The views of `--views FILE`: each checked in full before it is swapped in; views from
/// elsewhere are never changed or removed by the file.
impl crate::viewsfile::Registry for Views {
    fn apply(&self, name: &Path, spec: Option<&ViewSpec>) -> Result<(), String> {
        let origin = self.origin(name);
        let Some(spec) = spec else {
            return match origin {
                Some(ViewSource::File) => self.delete(name),
                _ => Ok(()),
            };
        };
        let holder = match origin {
            Some(ViewSource::Named) => " (from --view or `lorafs view add|set`)",
            Some(ViewSource::Catalog) => " (from the catalog)",
            Some(ViewSource::File) | None => "",
        };
        if !holder.is_empty() {
            return Err(format!("a view named {} exists{holder}", name.display()));
        }
        let view = self.open(spec, &ViewSource::File)?;
        match origin {
            Some(_) => self.replace(name, view, ViewSource::File),
            None => self.insert(name, view, ViewSource::File),
        }
    }
}

/// `lorafs view` on a mount of one merged model: there are no views to change.
pub struct NoViews;

impl ViewControl for NoViews {
    fn list(&self) -> Vec<ViewInfo> {
        Vec::new()
    }

    fn has_views(&self) -> bool {
        false
    }

    fn add(&self, _: &str, _: Vec<(PathBuf, f64)>) -> Result<(), String> {
        Err(crate::control::NO_VIEWS.into())
    }

    fn set(&self, _: &str, _: Vec<(PathBuf, f64)>) -> Result<(), String> {
        Err(crate::control::NO_VIEWS.into())
    }

    fn remove(&self, _: &str) -> Result<(), String> {
        Err(crate::control::NO_VIEWS.into())
    }
}
