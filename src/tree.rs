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
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::view::View;

/// The root directory's inode number.
pub const ROOT: u64 = 1;

pub enum Kind {
    Dir { children: BTreeMap<OsString, u64> },
    File { view: Arc<View>, file: usize },
}

pub struct Node<A> {
    pub parent: u64,
    pub kind: Kind,
    pub attr: A,
}

struct Entry<A> {
    node: Node<A>,
    /// Lookups the kernel holds (FUSE's count, given back by `forget`).
    lookups: AtomicU64,
    /// Still reachable from the root; an unlinked node lives until the kernel forgets it.
    linked: bool,
}

/// Where a view came from, for `view ls`.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// `--view NAME=SPEC` or `lorafs view add`.
    Named,
    /// Found in the `--catalog` directory.
    Catalog,
}

/// A view at a name of the tree.
pub struct Mounted {
    pub view: Arc<View>,
    pub origin: Origin,
    /// The view directory's inode.
    root: u64,
}

/// What the kernel must be told after a change: names whose cached entries are stale
/// (`(parent inode, name)`), and directories whose attributes changed.
#[derive(Debug, Default)]
pub struct Change {
    pub names: Vec<(u64, OsString)>,
    pub dirs: Vec<u64>,
}

pub struct Tree<A> {
    nodes: HashMap<u64, Entry<A>>,
    views: BTreeMap<PathBuf, Mounted>,
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

impl<A: Clone> Tree<A> {
    /// A tree whose root is a view's root (`nodes[0]`, numbered [`ROOT`]): one merged model.
    pub fn single(nodes: Vec<Node<A>>) -> Tree<A> {
        let mut tree = Tree::empty(nodes.len() as u64 + 1);
        for (i, node) in nodes.into_iter().enumerate() {
            tree.insert(ROOT + i as u64, node);
        }
        tree
    }

    /// A tree of views, empty but for its root directory.
    pub fn of_views(root: A) -> Tree<A> {
        let mut tree = Tree::empty(ROOT + 1);
        tree.insert(ROOT, dir_node(ROOT, root));
        tree
    }

    fn empty(next: u64) -> Tree<A> {
        Tree {
            nodes: HashMap::new(),
            views: BTreeMap::new(),
            next: Arc::new(AtomicU64::new(next)),
        }
    }

    fn insert(&mut self, ino: u64, node: Node<A>) {
        let entry = Entry {
            node,
            lookups: AtomicU64::new(0),
            linked: true,
        };
        self.nodes.insert(ino, entry);
    }

    pub fn numbers(&self) -> Numbers {
        Numbers(self.next.clone())
    }

    pub fn get(&self, ino: u64) -> Option<&Node<A>> {
        self.nodes.get(&ino).map(|e| &e.node)
    }

    /// The child `name` of directory `parent`, counted as a kernel lookup.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<(u64, &Node<A>)> {
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
    pub fn views(&self) -> &BTreeMap<PathBuf, Mounted> {
        &self.views
    }

    /// Whether `name` could be added: not a view, not inside one, not above one.
    pub fn name_free(&self, name: &Path) -> Result<(), String> {
        for existing in self.views.keys() {
            if existing == name {
                return Err(format!("a view named {} exists", name.display()));
            }
            if name.starts_with(existing) || existing.starts_with(name) {
                return Err(format!(
                    "{} would nest with view {}: a view cannot hold another",
                    name.display(),
                    existing.display()
                ));
            }
        }
        Ok(())
    }

    /// Put `view` at `name`: its nodes (made by the caller from inode numbers it took,
    /// `nodes[0]` the view's root directory), under directories made as needed with
    /// attributes `dir_attr`. The name must be free ([`Tree::name_free`]).
    pub fn add_view(
        &mut self,
        name: &Path,
        view: Arc<View>,
        origin: Origin,
        nodes: Vec<(u64, Node<A>)>,
        dir_attr: &A,
    ) -> Change {
        let mut change = Change::default();
        let parts: Vec<&OsStr> = name.components().map(|c| c.as_os_str()).collect();
        let Some((last, above)) = parts.split_last() else {
            return change;
        };
        let mut parent = ROOT;
        for part in above {
            parent = match self.child(parent, part) {
                Some(ino) => ino,
                None => {
                    let ino = self.numbers().take(1);
                    self.insert(ino, dir_node(parent, dir_attr.clone()));
                    self.link(parent, part, ino, &mut change);
                    ino
                }
            };
        }
        let root = nodes.first().map_or(0, |(ino, _)| *ino);
        for (ino, mut node) in nodes {
            if ino == root {
                node.parent = parent;
            }
            self.insert(ino, node);
        }
        self.link(parent, last, root, &mut change);
        self.views
            .insert(name.to_path_buf(), Mounted { view, origin, root });
        change
    }

    /// Take the view at `name` out of the tree, with the directories it leaves empty.
    pub fn remove_view(&mut self, name: &Path) -> Option<(Mounted, Change)> {
        let mounted = self.views.remove(name)?;
        let mut change = Change::default();
        self.unlink_subtree(mounted.root);
        let mut ino = mounted.root;
        loop {
            let parent = self.nodes.get(&ino).map_or(ROOT, |e| e.node.parent);
            let Some(Entry { node, .. }) = self.nodes.get_mut(&parent) else {
                break;
            };
            let Kind::Dir { children } = &mut node.kind else {
                break;
            };
            let Some(key) = children
                .iter()
                .find(|(_, &c)| c == ino)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            children.remove(&key);
            change.names.push((parent, key));
            change.dirs.push(parent);
            if parent == ROOT || !children.is_empty() {
                break;
            }
            // A directory made for nested names, now empty: it goes too.
            self.unlink_subtree(parent);
            ino = parent;
        }
        self.drop_unknown();
        Some((mounted, change))
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

fn dir_node<A>(parent: u64, attr: A) -> Node<A> {
    Node {
        parent,
        kind: Kind::Dir {
            children: BTreeMap::new(),
        },
        attr,
    }
}

/// Check a view name: a relative path of 1 to 8 components, each of letters, digits and
/// `._+-`, not starting with a dot, at most 255 bytes.
pub fn check_view_name(name: &str) -> Result<PathBuf, String> {
    let path = Path::new(name);
    let parts: Vec<Component> = path.components().collect();
    let bad = |why: &str| Err(format!("view name {name:?}: {why}"));
    if name.is_empty() || parts.is_empty() {
        return bad("empty");
    }
    if parts.len() > 8 {
        return bad("more than 8 path components");
    }
    for part in &parts {
        let Component::Normal(part) = part else {
            return bad("must be a relative path without `.` or `..`");
        };
        let part = part.to_string_lossy();
        if part.starts_with('.') {
            return bad("a component starts with a dot");
        }
        if part.len() > 255 {
            return bad("a component is over 255 bytes");
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
        if !part.chars().all(allowed) {
            return bad("use letters, digits and . _ + - only");
        }
    }
    Ok(parts.iter().collect())
}
