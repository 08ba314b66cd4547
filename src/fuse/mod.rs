//! The FUSE adapter: the only module that knows `fuser` and the FUSE protocol. `ops`
//! answers each request from the core, or with an errno; two transports carry requests and
//! replies between the kernel and `ops`: `dev` (fuser over `/dev/fuse`, always) and `ring`
//! (FUSE over io_uring, where the kernel offers it). No request can panic the server.

mod access;
mod acl;
mod dev;
mod inodes;
mod ops;
mod panics;
mod ring;
mod session;
mod transport;
pub mod views;

pub use panics::init_server_process;
pub use session::{check_mountpoint, mount, unmount, Live, MountOptions, Services};
pub use transport::Transport;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuser::{FileAttr, FileType, INodeNo};

use crate::engine::Engine;
use crate::tree::{self, Kind, Tree};
use crate::view::View;

/// The content never changes while mounted, so the kernel may cache names and attributes
/// for as long as it likes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A file in the root not listed in any directory, readable by name: live counters of the
/// mount. A base file of that name wins: it is served, and the counters are not.
pub const STATS_FILE: &str = ".lorafs-stats";

/// How far ahead of a sequential reader merged blocks are computed in the background.
const PREFETCH_BYTES: u64 = 8 << 20;

/// An open file: the view it was opened in (kept to the end, whatever changes meanwhile)
/// and where its last read ended, to spot sequential readers.
struct Handle {
    view: Arc<View>,
    file: usize,
    last_end: Option<u64>,
}

/// The tree a mount serves, its nodes, and the tree shared by the callbacks and the
/// changes of views.
pub type MountTree = Tree<FileAttr, Arc<View>>;
pub type MountNode = tree::Node<FileAttr, Arc<View>>;
pub type SharedTree = Arc<RwLock<MountTree>>;

/// The filesystem a mount serves: a tree of views over one engine.
pub struct LorafsFs {
    engine: Arc<Engine>,
    tree: SharedTree,
    /// The stats file's inode, unless the base has a file of that name at the root.
    stats_ino: Option<u64>,
    next_fh: AtomicU64,
    handles: Mutex<HashMap<u64, Handle>>,
    /// The registry of a mount of views, told of each open (to warm a view when first used).
    views: std::sync::OnceLock<Arc<views::Views>>,
    /// Whether requests come through FUSE over io_uring (else `/dev/fuse`), for the stats.
    uring: std::sync::atomic::AtomicBool,
}

impl LorafsFs {
    /// The tree of one merged model at the root, each node with its source's permissions
    /// and owner; fails when a source cannot be stat'ed.
    pub fn single(view: Arc<View>) -> io::Result<LorafsFs> {
        let nodes = inodes::build(&view, tree::ROOT)?;
        let tree = Tree::single(nodes.into_iter().map(|(_, node)| node).collect());
        let shadowed = tree
            .get(tree::ROOT)
            .is_some_and(|n| matches!(&n.kind, Kind::Dir { children } if children.contains_key(OsStr::new(STATS_FILE))));
        if shadowed {
            log::warn!(
                "{}: the base has a file named {STATS_FILE}: it is served, and the mount's \
                 counters only through `kill -USR1 PID` (logged)",
                view.base_dir().display()
            );
        }
        Ok(LorafsFs::with_tree(view.engine.clone(), tree, shadowed))
    }

    /// An empty tree of views (added by [`views::Views`]), its root served with the base
    /// directory's permissions and owner.
    pub fn of_views(engine: Arc<Engine>) -> io::Result<LorafsFs> {
        let tree = Tree::of_views(inodes::base_dir_attr(&engine.base.dir)?);
        Ok(LorafsFs::with_tree(engine, tree, false))
    }

    fn with_tree(engine: Arc<Engine>, tree: MountTree, shadowed: bool) -> LorafsFs {
        let stats_ino = (!shadowed).then(|| tree.numbers().take(1));
        LorafsFs {
            engine,
            tree: Arc::new(RwLock::new(tree)),
            stats_ino,
            next_fh: AtomicU64::new(1),
            handles: Mutex::new(HashMap::new()),
            views: std::sync::OnceLock::new(),
            uring: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Attach the registry of a mount of views.
    pub fn attach(&self, views: Arc<views::Views>) {
        let _ = self.views.set(views);
    }

    pub fn tree(&self) -> SharedTree {
        self.tree.clone()
    }

    fn read_tree(&self) -> std::sync::RwLockReadGuard<'_, MountTree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stats file is the mounting user's (and root's) to read: it shows the server's pid
    /// and activity, not model bytes, and the base's owner may be someone else.
    fn stats_attr(&self, ino: u64) -> FileAttr {
        let mut attr = self
            .read_tree()
            .get(tree::ROOT)
            .map(|n| n.attr)
            .expect("a root");
        attr.ino = INodeNo(ino);
        attr.kind = FileType::RegularFile;
        attr.perm = 0o400;
        attr.uid = euid();
        attr.gid = egid();
        attr.nlink = 1;
        attr.size = self.stats_text().len() as u64;
        attr.blocks = attr.size.div_ceil(512);
        attr
    }

    /// The counters, and the transport serving them.
    fn stats_text(&self) -> String {
        let transport = match self.uring.load(Ordering::Relaxed) {
            true => "uring",
            false => "dev",
        };
        format!("{}transport {transport}\n", stats_text(&self.engine))
    }
}

/// The live counters, as served by the stats file and logged on SIGUSR1: a line each,
/// `name value`.
pub fn stats_text(engine: &Engine) -> String {
    let (c, s, a) = (&engine.blocks.stats, &engine.stats, engine.ahead.stats());
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let counters = [
        ("cache_hits", load(&c.hits)),
        ("cache_misses", load(&c.misses)),
        ("cache_waits", load(&c.waits)),
        ("cache_evictions", load(&c.evictions)),
        ("cache_bytes", engine.blocks.bytes() as u64),
        ("cache_budget", engine.blocks.budget() as u64),
        ("bytes_computed", load(&c.bytes_computed)),
        ("bytes_read", load(&s.bytes_read)),
        ("bytes_merged", load(&s.bytes_merged)),
        ("bytes_passthrough", load(&s.bytes_passthrough)),
        ("bytes_replaced", load(&s.bytes_replaced)),
        ("bytes_converted", load(&s.bytes_converted)),
        ("factor_bytes", engine.factors.bytes() as u64),
        ("factor_budget", engine.factors.budget() as u64),
        ("factors_loaded", load(&s.factors_loaded)),
        ("read_ahead_bytes", engine.ahead.bytes()),
        ("read_ahead_budget", engine.ahead.budget()),
        ("read_ahead_staged", load(&a.staged)),
        ("read_ahead_served", load(&a.served)),
        ("read_ahead_dropped", load(&a.dropped)),
    ];
    let mut text: String = (counters.iter())
        .map(|(name, value)| format!("{name} {value}\n"))
        .collect();
    text += &format!("kernel {}\n", engine.kernel.name());
    text += &format!("pid {}\n", std::process::id());
    text += &format!("panics_caught {}\n", panics::caught_count());
    text
}

/// `attr` as served for inode `ino` (the directories made above nested view names share
/// one set of attributes).
fn with_ino(mut attr: FileAttr, ino: u64) -> FileAttr {
    attr.ino = INodeNo(ino);
    attr
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn egid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}
