//! The directory tree a mount serves, numbered by inode, able to change while mounted.
//!
//! A mount of one merged model (`--adapter`) is that view's tree at the root. A mount of
//! views (`--view`, `--catalog`) has each view's tree at its name (`a`, `run1/checkpoint-2`),
//! with plain directories above nested names. A change of a view is done like a file replaced
//! by rename: the view's nodes get new inode numbers, so the kernel's cached pages and names
//! of the old ones can never be served for the new model; the old nodes stay resolvable
//! while the kernel still knows them (until it forgets them), and open files keep reading the
//! view they opened. The tree knows nothing of FUSE: it is generic over the attributes the
//! FUSE adapter serves, and a change returns the names the kernel must forget.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::control::ViewSource;

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// A node: a directory, or file `file` of a view (`V`: the mount's `Arc<View>`).
pub enum Kind<V> {
    Dir { children: BTreeMap<OsString, u64> },
    File { view: V, file: usize },
}

pub struct Node<A, V> {
    pub parent: u64,
    pub kind: Kind<V>,
    pub attr: A,
}

struct Entry<A, V> {
    node: Node<A, V>,
    /// Lookups the kernel holds (FUSE's count, given back by `forget`).
    lookups: AtomicU64,
    /// Still reachable from the root; an unlinked node lives until the kernel forgets it.
    linked: bool,
    /// A directory made above nested view names, not part of any view.
    synthetic: bool,
}

/// A view at a name of the tree.
pub struct Mounted<V> {
    pub view: V,
    pub origin: ViewSource,
    /// The view directory's inode.
    root: u64,
}

impl<V> Mounted<V> {
    /// The view directory's inode.
    pub fn root(&self) -> u64 {
        self.root
    }
}

/// What the kernel must be told after a change: names whose cached entries are stale
/// (`(parent inode, name)`), and directories whose attributes changed.
#[derive(Debug, Default)]
pub struct Change {
    pub names: Vec<(u64, OsString)>,
    pub dirs: Vec<u64>,
}

/// The tree; `A` is what the FUSE adapter serves as a node's attributes, `V` the view
/// (`Arc<View>` in a mount).
pub struct Tree<A, V> {
    nodes: HashMap<u64, Entry<A, V>>,
    views: BTreeMap<PathBuf, Mounted<V>>,
    next: Arc<AtomicU64>,
}

/// Inode numbers handed out before the nodes are made (outside the tree's lock).
#[derive(Clone)]
pub struct Numbers(Arc<AtomicU64>);

impl Numbers {
    /// `n` consecutive unused inode numbers; returns the first.
    pub fn take(&self, n: usize) -> u64 {
        self.0.fetch_add(n as u64, Ordering::Relaxed)
    }
}

impl<A: Clone, V> Tree<A, V> {
    /// A tree whose root is a view's root (`nodes[0]`, numbered [`ROOT`]): one merged model.
    pub fn single(nodes: Vec<Node<A, V>>) -> Tree<A, V> {
        let mut tree = Tree::empty(nodes.len() as u64 + 1);
        for (i, node) in nodes.into_iter().enumerate() {
            tree.insert(ROOT + i as u64, node);
        }
        tree
    }

    /// A tree of views, empty but for its root directory.
    pub fn of_views(root: A) -> Tree<A, V> {
        let mut tree = Tree::empty(ROOT + 1);
        tree.insert(ROOT, dir_node(ROOT, root));
        tree
    }

    fn empty(next: u64) -> Tree<A, V> {
        Tree {
            nodes: HashMap::new(),
            views: BTreeMap::new(),
            next: Arc::new(AtomicU64::new(next)),
        }
    }

    fn insert(&mut self, ino: u64, node: Node<A, V>) {
        let entry = Entry {
            node,
            lookups: AtomicU64::new(0),
            linked: true,
            synthetic: false,
        };
        self.nodes.insert(ino, entry);
    }

    /// A new empty directory made above nested view names.
    fn insert_synthetic(&mut self, parent: u64, attr: A) -> u64 {
        let ino = self.numbers().take(1);
        self.insert(ino, dir_node(parent, attr));
        if let Some(entry) = self.nodes.get_mut(&ino) {
            entry.synthetic = true;
        }
        ino
    }

    pub fn numbers(&self) -> Numbers {
        Numbers(self.next.clone())
    }

    pub fn get(&self, ino: u64) -> Option<&Node<A, V>> {
        self.nodes.get(&ino).map(|e| &e.node)
    }

    /// The child `name` of directory `parent`, counted as a kernel lookup.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<(u64, &Node<A, V>)> {
        let Kind::Dir { children } = &self.get(parent)?.kind else {
            return None;
        };
        let ino = *children.get(name)?;
        let entry = self.nodes.get(&ino)?;
        entry.lookups.fetch_add(1, Ordering::Relaxed);
        Some((ino, &entry.node))
    }

    /// The kernel forgot `n` lookups of `ino`: an unlinked node it no longer knows goes.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(entry) = self.nodes.get_mut(&ino) else {
            return;
        };
        let left = entry.lookups.get_mut();
        *left = left.saturating_sub(n);
        if *left == 0 && !entry.linked {
            self.nodes.remove(&ino);
        }
    }

    /// Number of nodes held (linked or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The views, by name.
    pub fn views(&self) -> &BTreeMap<PathBuf, Mounted<V>> {
        &self.views
    }

    /// Put `view` at `name`: its nodes (made by the caller from inode numbers it took,
    /// `nodes[0]` the view's root directory), under directories made as needed with
    /// attributes `dir_attr`. Views nest (a trainer's output directory holds the final
    /// adapter and its `checkpoint-N` directories): a view's directory also lists the
    /// views below it, so no name of a view may be one of the view's own files or
    /// directories. Nothing changes when it fails.
    pub fn add_view(
        &mut self,
        name: &Path,
        view: V,
        origin: ViewSource,
        nodes: Vec<(u64, Node<A, V>)>,
        dir_attr: &A,
    ) -> Result<Change, String> {
        let parts: Vec<&OsStr> = name.components().map(|c| c.as_os_str()).collect();
        let (Some((last, above)), Some((root, _))) = (parts.split_last(), nodes.first()) else {
            return Err("a view needs a name and a root directory".into());
        };
        let root = *root;
        self.check_place(name, &parts, &nodes[0].1)?;
        let mut change = Change::default();
        let mut parent = ROOT;
        for part in above {
            parent = match self.child(parent, part) {
                Some(ino) => ino,
                None => {
                    let ino = self.insert_synthetic(parent, dir_attr.clone());
                    self.link(parent, part, ino, &mut change);
                    ino
                }
            };
        }
        // A directory left by nested views at this name: the view takes its children.
        let adopted = self.child(parent, last).map(|ino| self.take_children(ino));
        for (ino, mut node) in nodes {
            if ino == root {
                node.parent = parent;
            }
            self.insert(ino, node);
        }
        for (child_name, child) in adopted.into_iter().flatten() {
            self.set_parent(child, root);
            self.link(root, &child_name, child, &mut change);
        }
        self.link(parent, last, root, &mut change);
        self.drop_unknown();
        let mounted = Mounted { view, origin, root };
        self.views.insert(name.to_path_buf(), mounted);
        Ok(change)
    }

    /// Fails unless `name` (split in `parts`) can take a view whose root is `root`: free,
    /// below directories that are views' roots or made for nested names, and, where views
    /// are already nested below it, none of their names one of the view's own.
    fn check_place(&self, name: &Path, parts: &[&OsStr], root: &Node<A, V>) -> Result<(), String> {
        if self.views.contains_key(name) {
            return Err(format!("a view named {} exists", name.display()));
        }
        let mut at = ROOT;
        for (depth, part) in parts.iter().enumerate() {
            let Some(ino) = self.child(at, part) else {
                return Ok(());
            };
            if !self.is_container(ino) {
                let prefix: PathBuf = parts[..=depth].iter().collect();
                return Err(format!(
                    "{} is a file or directory of a view: no view can be named {}",
                    prefix.display(),
                    name.display()
                ));
            }
            at = ino;
        }
        // `at` is a directory made for views nested below `name`.
        let (Some(Kind::Dir { children: nested }), Kind::Dir { children: own }) =
            (self.get(at).map(|n| &n.kind), &root.kind)
        else {
            return Ok(());
        };
        match nested.keys().find(|n| own.contains_key(*n)) {
            Some(clash) => Err(format!(
                "{}: a view below it is named like its {clash:?}",
                name.display()
            )),
            None => Ok(()),
        }
    }

    /// Whether `ino` may hold views: the root, a view's root, a directory made for them.
    fn is_container(&self, ino: u64) -> bool {
        ino == ROOT
            || self.nodes.get(&ino).is_some_and(|e| e.synthetic)
            || self.views.values().any(|m| m.root == ino)
    }

    /// Take the view at `name` out of the tree. Views nested below it stay, in a directory
    /// made for them at its name; directories left empty go.
    pub fn remove_view(&mut self, name: &Path) -> Option<(Mounted<V>, Change)> {
        let mounted = self.views.remove(name)?;
        let mut change = Change::default();
        let root = mounted.root;
        let parent = self.nodes.get(&root).map_or(ROOT, |e| e.node.parent);
        let nested: Vec<(OsString, u64)> = match self.get(root).map(|n| &n.kind) {
            Some(Kind::Dir { children }) => (children.iter())
                .filter(|(_, &c)| self.is_container(c))
                .map(|(n, &c)| (n.clone(), c))
                .collect(),
            _ => Vec::new(),
        };
        if let Some(Kind::Dir { children }) = self.get_mut(root).map(|n| &mut n.kind) {
            for (n, _) in &nested {
                children.remove(n);
            }
        }
        self.unlink_subtree(root);
        let last = name.file_name().unwrap_or_default();
        self.unlink(parent, last, &mut change);
        if nested.is_empty() {
            self.prune(parent, &mut change);
        } else {
            let dir_attr = self.get(ROOT).map(|n| n.attr.clone()).expect("a root");
            let kept = self.insert_synthetic(parent, dir_attr);
            for (n, child) in nested {
                self.set_parent(child, kept);
                self.link(kept, &n, child, &mut change);
            }
            self.link(parent, last, kept, &mut change);
        }
        self.drop_unknown();
        Some((mounted, change))
    }

    /// Replace the view at `name` by `view` (arguments as [`Tree::add_view`]); returns the
    /// old one. Nothing changes when it fails.
    pub fn replace_view(
        &mut self,
        name: &Path,
        view: V,
        origin: ViewSource,
        nodes: Vec<(u64, Node<A, V>)>,
        dir_attr: &A,
    ) -> Result<(Mounted<V>, Change), String> {
        let old_root = (self.views.get(name))
            .ok_or_else(|| format!("no view named {}", name.display()))?
            .root;
        // The views nested below the old one stay: none may be named like a file or
        // directory of the new one.
        if let (Some(Kind::Dir { children: old }), Some((_, new))) =
            (self.get(old_root).map(|n| &n.kind), nodes.first())
        {
            if let Kind::Dir { children: new } = &new.kind {
                let nested = old.iter().filter(|(_, &c)| self.is_container(c));
                if let Some((clash, _)) = nested.into_iter().find(|(n, _)| new.contains_key(*n)) {
                    return Err(format!(
                        "{}: a view below it is named like its {clash:?}",
                        name.display()
                    ));
                }
            }
        }
        let (old, mut change) = self.remove_view(name).expect("the view exists");
        let added = self.add_view(name, view, origin, nodes, dir_attr)?;
        change.names.extend(added.names);
        change.dirs.extend(added.dirs);
        Ok((old, change))
    }

    /// Remove directories made for nested names that are left empty, from `dir` up.
    fn prune(&mut self, mut dir: u64, change: &mut Change) {
        while dir != ROOT && self.nodes.get(&dir).is_some_and(|e| e.synthetic) {
            let empty = matches!(self.get(dir).map(|n| &n.kind), Some(Kind::Dir { children }) if children.is_empty());
            if !empty {
                return;
            }
            let parent = self.nodes.get(&dir).map_or(ROOT, |e| e.node.parent);
            let name = match self.get(parent).map(|n| &n.kind) {
                Some(Kind::Dir { children }) => children
                    .iter()
                    .find(|(_, &c)| c == dir)
                    .map(|(n, _)| n.clone()),
                _ => None,
            };
            self.unlink_subtree(dir);
            if let Some(name) = name {
                self.unlink(parent, &name, change);
            }
            dir = parent;
        }
    }

    fn get_mut(&mut self, ino: u64) -> Option<&mut Node<A, V>> {
        self.nodes.get_mut(&ino).map(|e| &mut e.node)
    }

    fn set_parent(&mut self, ino: u64, parent: u64) {
        if let Some(node) = self.get_mut(ino) {
            node.parent = parent;
        }
    }

    /// The children of directory `ino`, taken out of it (it is then unlinked).
    fn take_children(&mut self, ino: u64) -> BTreeMap<OsString, u64> {
        let taken = match self.get_mut(ino).map(|n| &mut n.kind) {
            Some(Kind::Dir { children }) => std::mem::take(children),
            _ => BTreeMap::new(),
        };
        if let Some(entry) = self.nodes.get_mut(&ino) {
            entry.linked = false;
        }
        taken
    }

    fn unlink(&mut self, parent: u64, name: &OsStr, change: &mut Change) {
        if let Some(Kind::Dir { children }) = self.get_mut(parent).map(|n| &mut n.kind) {
            children.remove(name);
            change.names.push((parent, name.to_os_string()));
            change.dirs.push(parent);
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        match &self.get(parent)?.kind {
            Kind::Dir { children } => children.get(name).copied(),
            Kind::File { .. } => None,
        }
    }

    fn link(&mut self, parent: u64, name: &OsStr, ino: u64, change: &mut Change) {
        if let Some(Entry {
            node:
                Node {
                    kind: Kind::Dir { children },
                    ..
                },
            ..
        }) = self.nodes.get_mut(&parent)
        {
            children.insert(name.to_os_string(), ino);
            change.names.push((parent, name.to_os_string()));
            change.dirs.push(parent);
        }
    }

    fn unlink_subtree(&mut self, ino: u64) {
        let mut stack = vec![ino];
        while let Some(ino) = stack.pop() {
            if let Some(entry) = self.nodes.get_mut(&ino) {
                entry.linked = false;
                if let Kind::Dir { children } = &entry.node.kind {
                    stack.extend(children.values().copied());
                }
            }
        }
    }

    /// Remove unlinked nodes the kernel does not know (never looked up, or forgotten).
    fn drop_unknown(&mut self) {
        self.nodes
            .retain(|_, e| e.linked || e.lookups.load(Ordering::Relaxed) > 0);
    }
}

fn dir_node<A, V>(parent: u64, attr: A) -> Node<A, V> {
    Node {
        parent,
        kind: Kind::Dir {
            children: BTreeMap::new(),
        },
        attr,
    }
}

/// A view name checked ([`crate::control::check_view_name`]), as a path.
pub fn check_view_name(name: &str) -> Result<PathBuf, String> {
    crate::control::check_view_name(name)?;
    Ok(PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of `files` at the root of its directory, numbered from the tree's numbers.
    fn view_nodes(
        tree: &Tree<u32, &'static str>,
        files: &[&str],
        tag: &'static str,
    ) -> Vec<(u64, Node<u32, &'static str>)> {
        let first = tree.numbers().take(1 + files.len());
        let children = (files.iter().enumerate())
            .map(|(i, f)| (OsString::from(f), first + 1 + i as u64))
            .collect();
        let mut nodes = vec![(
            first,
            Node {
                parent: first,
                kind: Kind::Dir { children },
                attr: 0,
            },
        )];
        for (i, _) in files.iter().enumerate() {
            let kind = Kind::File { view: tag, file: i };
            nodes.push((
                first + 1 + i as u64,
                Node {
                    parent: first,
                    kind,
                    attr: 1,
                },
            ));
        }
        nodes
    }

    /// The path `a/b/c` from the root, or None.
    fn resolve(tree: &Tree<u32, &'static str>, path: &str) -> Option<u64> {
        let mut at = ROOT;
        for part in path.split('/') {
            at = tree.child(at, OsStr::new(part))?;
        }
        Some(at)
    }

    fn file_view(tree: &Tree<u32, &'static str>, path: &str) -> Option<&'static str> {
        match &tree.get(resolve(tree, path)?)?.kind {
            Kind::File { view, .. } => Some(*view),
            Kind::Dir { .. } => None,
        }
    }

    fn add(
        tree: &mut Tree<u32, &'static str>,
        name: &str,
        files: &[&str],
        tag: &'static str,
    ) -> Result<Change, String> {
        let nodes = view_nodes(tree, files, tag);
        tree.add_view(Path::new(name), tag, ViewSource::Named, nodes, &9)
    }

    #[test]
    fn views_nest_and_survive_the_removal_of_the_view_above() {
        let mut tree = Tree::of_views(9);
        add(&mut tree, "run/checkpoint-1", &["model.safetensors"], "c1").unwrap();
        add(
            &mut tree,
            "run",
            &["model.safetensors", "config.json"],
            "final",
        )
        .unwrap();
        assert_eq!(file_view(&tree, "run/model.safetensors"), Some("final"));
        assert_eq!(
            file_view(&tree, "run/checkpoint-1/model.safetensors"),
            Some("c1")
        );
        let err = add(&mut tree, "run/config.json", &["x"], "bad").unwrap_err();
        assert!(err.contains("file or directory of a view"), "{err}");
        let err = add(&mut tree, "run/checkpoint-1", &["x"], "dup").unwrap_err();
        assert!(err.contains("exists"), "{err}");

        let (_, change) = tree.remove_view(Path::new("run")).unwrap();
        assert!(change.names.iter().any(|(p, n)| *p == ROOT && n == "run"));
        assert_eq!(resolve(&tree, "run/model.safetensors"), None);
        assert_eq!(
            file_view(&tree, "run/checkpoint-1/model.safetensors"),
            Some("c1")
        );
        tree.remove_view(Path::new("run/checkpoint-1")).unwrap();
        assert_eq!(resolve(&tree, "run"), None, "an emptied directory goes");
        assert!(tree.views().is_empty());
    }

    #[test]
    fn a_replaced_view_gets_new_inodes_and_its_nested_views_stay() {
        let mut tree = Tree::of_views(9);
        add(&mut tree, "a", &["w"], "old").unwrap();
        add(&mut tree, "a/b", &["w"], "nested").unwrap();
        let before = resolve(&tree, "a/w").unwrap();
        let nodes = view_nodes(&tree, &["w"], "new");
        let (old, change) = tree
            .replace_view(Path::new("a"), "new", ViewSource::Named, nodes, &9)
            .unwrap();
        assert_eq!(old.view, "old");
        assert!(change.names.iter().any(|(p, n)| *p == ROOT && n == "a"));
        let after = resolve(&tree, "a/w").unwrap();
        assert_ne!(before, after, "a new model is a new inode");
        assert_eq!(file_view(&tree, "a/w"), Some("new"));
        assert_eq!(file_view(&tree, "a/b/w"), Some("nested"));
        // A new version named like a nested view is refused, and nothing changes.
        let nodes = view_nodes(&tree, &["b"], "clash");
        let Err(err) = tree.replace_view(Path::new("a"), "clash", ViewSource::Named, nodes, &9)
        else {
            panic!("a clash is refused");
        };
        assert!(err.contains("named like"), "{err}");
        assert_eq!(file_view(&tree, "a/w"), Some("new"));
    }

    #[test]
    fn unlinked_nodes_live_until_the_kernel_forgets_them() {
        let mut tree = Tree::of_views(9);
        add(&mut tree, "v", &["w"], "old").unwrap();
        let (ino, _) = tree
            .lookup(resolve(&tree, "v").unwrap(), OsStr::new("w"))
            .unwrap();
        let untouched = resolve(&tree, "v").unwrap();
        tree.remove_view(Path::new("v")).unwrap();
        assert!(
            tree.get(ino).is_some(),
            "looked up once: kept for the kernel"
        );
        assert!(
            tree.get(untouched).is_none(),
            "never looked up: gone at once"
        );
        tree.forget(ino, 1);
        assert!(tree.get(ino).is_none(), "forgotten: gone");
    }

    #[test]
    fn view_names_are_checked() {
        assert_eq!(
            check_view_name("run1/checkpoint-2").unwrap(),
            Path::new("run1/checkpoint-2")
        );
        for bad in [
            "",
            "/abs",
            "../up",
            "a/../b",
            ".hidden",
            "a/.b",
            "sp ace",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(check_view_name(bad).is_err(), "{bad:?}");
        }
    }
}
