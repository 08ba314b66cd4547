//! The FUSE adapter: the only module that knows `fuser`. Each callback asks the core and
//! replies, or logs why and replies with an errno; none of them can panic on bad input.

mod access;
mod acl;
mod inodes;
mod panics;
mod session;
pub mod views;

pub use panics::init_server_process;
pub use session::{check_mountpoint, mount, unmount, Live, MountOptions};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::engine::Engine;
use crate::tree::{self, Kind, Tree};
use crate::view::View;
use panics::caught;

/// The content never changes while mounted, so the kernel may cache names and attributes
/// for as long as it likes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A file in the root not listed in any directory, readable by name: live counters of the
/// mount. A base file of that name wins: it is served, and the counters are not.
pub const STATS_FILE: &str = ".lorafs-stats";

/// How far ahead of a sequential reader merged blocks are computed in the background.
const PREFETCH_BYTES: u64 = 8 << 20;

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

    fn is_stats(&self, ino: INodeNo) -> bool {
        self.stats_ino == Some(ino.0)
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

    fn stats_text(&self) -> String {
        stats_text(&self.engine)
    }

    /// The view and file behind an open handle.
    fn handle(&self, fh: u64) -> Option<(Arc<View>, usize)> {
        let handles = self.lock_handles();
        handles.get(&fh).map(|h| (h.view.clone(), h.file))
    }

    /// Prefetch ahead of a reader whose read starts where its previous one ended.
    fn note_read(&self, fh: u64, view: &Arc<View>, file: usize, offset: u64, len: u64) {
        let sequential = {
            let mut handles = self.lock_handles();
            let Some(h) = handles.get_mut(&fh) else {
                return;
            };
            let previous = h.last_end.replace(offset + len);
            previous == Some(offset)
        };
        if sequential {
            // The base bytes further ahead are read first, then the next blocks merged
            // from them.
            view.read_ahead(file, offset + len);
            view.prefetch(file, offset + len, PREFETCH_BYTES);
        }
    }

    /// Serve a read of open file `fh`.
    fn read_file(&self, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        let Some((view, file)) = self.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        READ_BUF.with_borrow_mut(|buf| {
            // One buffer per FUSE thread, reused: no allocation or zeroing per read.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let rel = &view.files[file].rel;
            // A bug must cost one read (EIO), not a serving thread and with it the mount.
            let result = panics::catch(|| view.read_at(file, offset, &mut buf[..size as usize]));
            match result {
                None => {
                    log::error!(
                        "read of {} at {offset} (+{size}) panicked; returning EIO",
                        rel.display()
                    );
                    reply.error(Errno::EIO);
                }
                Some(Ok(n)) => {
                    reply.data(&buf[..n]);
                    self.note_read(fh.0, &view, file, offset, n as u64);
                }
                Some(Err(err)) => {
                    log::error!(
                        "read of {} at {offset} (+{size}) failed: {err}",
                        rel.display()
                    );
                    reply.error(Errno::from_i32(err.errno()));
                }
            }
        });
    }

    /// Open file `ino` of `view`: its sources are checked now, since pages cached from a
    /// source since changed (a write, or a `chmod` closing it to this reader) must not be
    /// served.
    fn open_file(&self, view: Arc<View>, file: usize, reply: ReplyOpen) {
        if let Err(err) = view.check_sources(file) {
            log::debug!("open of {} refused: {err}", view.files[file].rel.display());
            return reply.error(Errno::from_i32(err.errno()));
        }
        if let Some(views) = self.views.get() {
            views.opened(&view);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle {
            view,
            file,
            last_end: None,
        };
        self.lock_handles().insert(fh, handle);
        // A file's content never changes under its inode (a changed view gets new inodes):
        // keep the page cache across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// List directory `ino` from entry `offset` on: `.`, `..`, then the children by name.
    fn list(&self, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
        let tree = self.read_tree();
        let Some(node) = tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Kind::Dir { children } = &node.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (node.parent, FileType::Directory, OsStr::new("..")),
        ];
        let kind = |child: u64| {
            tree.get(child)
                .map_or(FileType::RegularFile, |n| n.attr.kind)
        };
        let entries = dots.into_iter().chain(
            children
                .iter()
                .map(|(name, &child)| (child, kind(child), name.as_os_str())),
        );
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in entries.enumerate().skip(skip) {
            // The offset passed back is that of the next entry.
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The live counters, as served by the stats file and logged on SIGUSR1.
pub fn stats_text(engine: &Engine) -> String {
    let c = &engine.blocks.stats;
    let s = &engine.stats;
    let a = engine.ahead.stats();
    format!(
        "cache_hits {}\ncache_misses {}\ncache_waits {}\ncache_evictions {}\ncache_bytes {}\ncache_budget {}\n\
         bytes_computed {}\nbytes_read {}\nbytes_merged {}\nbytes_passthrough {}\nbytes_replaced {}\nbytes_converted {}\n\
         factor_bytes {}\nfactor_budget {}\nfactors_loaded {}\n\
         read_ahead_bytes {}\nread_ahead_budget {}\nread_ahead_staged {}\nread_ahead_served {}\nread_ahead_dropped {}\n\
         kernel {}\npid {}\npanics_caught {}\n",
        c.hits.load(Ordering::Relaxed),
        c.misses.load(Ordering::Relaxed),
        c.waits.load(Ordering::Relaxed),
        c.evictions.load(Ordering::Relaxed),
        engine.blocks.bytes(),
        engine.blocks.budget(),
        c.bytes_computed.load(Ordering::Relaxed),
        s.bytes_read.load(Ordering::Relaxed),
        s.bytes_merged.load(Ordering::Relaxed),
        s.bytes_passthrough.load(Ordering::Relaxed),
        s.bytes_replaced.load(Ordering::Relaxed),
        s.bytes_converted.load(Ordering::Relaxed),
        engine.factors.bytes(),
        engine.factors.budget(),
        s.factors_loaded.load(Ordering::Relaxed),
        engine.ahead.bytes(),
        engine.ahead.budget(),
        a.staged.load(Ordering::Relaxed),
        a.served.load(Ordering::Relaxed),
        a.dropped.load(Ordering::Relaxed),
        engine.kernel.name(),
        std::process::id(),
        panics::caught_count(),
    )
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

/// Each callback runs its body under [`caught`]: a bug costs that request (EIO), not the
/// worker thread and with it the mount. `init` runs once, before serving, and only sets
/// kernel options.
impl Filesystem for LorafsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // More reads in flight than the default 16: readahead of several files at once and
        // threads of a loader each keep some outstanding.
        match config.set_max_background(64) {
            Ok(_) => log::info!("kernel accepted max_background 64"),
            Err(max) => log::info!("kernel refused max_background 64 (max {max})"),
        }
        match config.set_max_readahead(u32::MAX) {
            Ok(_) => {}
            Err(max) => match config.set_max_readahead(max) {
                Ok(_) => log::info!("kernel max_readahead {max} bytes (raised later via sysfs)"),
                Err(e) => log::info!("kernel refused max_readahead {max}: {e}"),
            },
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        caught("lookup", || {
            if let (tree::ROOT, Some(stats)) = (parent.0, self.stats_ino) {
                if name == STATS_FILE {
                    return reply.entry(&Duration::ZERO, &self.stats_attr(stats), Generation(0));
                }
            }
            let tree = self.read_tree();
            match tree.lookup(parent.0, name) {
                Some((ino, node)) => reply.entry(&TTL, &with_ino(node.attr, ino), Generation(0)),
                None => match tree.get(parent.0).map(|n| &n.kind) {
                    Some(Kind::File { .. }) => reply.error(Errno::ENOTDIR),
                    _ => reply.error(Errno::ENOENT),
                },
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        caught("forget", || {
            let mut tree = self.tree.write().unwrap_or_else(|p| p.into_inner());
            tree.forget(ino.0, nlookup);
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        caught("getattr", || {
            if self.is_stats(ino) {
                return reply.attr(&Duration::ZERO, &self.stats_attr(ino.0));
            }
            match self.read_tree().get(ino.0) {
                Some(node) => reply.attr(&TTL, &with_ino(node.attr, ino.0)),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        caught("open", || {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            if self.is_stats(ino) {
                // Its size changes with every read: bypass the page cache.
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            let file = match self.read_tree().get(ino.0).map(|n| &n.kind) {
                Some(Kind::File { view, file }) => Ok((view.clone(), *file)),
                Some(Kind::Dir { .. }) => Err(Errno::EISDIR),
                None => Err(Errno::ENOENT),
            };
            match file {
                Ok((view, file)) => self.open_file(view, file, reply),
                Err(errno) => reply.error(errno),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        caught("read", || {
            if self.is_stats(ino) {
                let text = self.stats_text();
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(text.len());
                let end = start.saturating_add(size as usize).min(text.len());
                return reply.data(&text.as_bytes()[start..end]);
            }
            self.read_file(fh, offset, size, reply)
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Called on every close; nothing is ever written, so nothing to flush.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        caught("release", || {
            self.lock_handles().remove(&fh.0);
            reply.ok();
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Directories of views change while mounted: their listings are not cached.
        caught("opendir", || {
            match self.read_tree().get(ino.0).map(|n| &n.kind) {
                Some(Kind::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
                Some(Kind::File { .. }) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        caught("readdir", || self.list(ino, offset, reply))
    }

    // The calls below come from ordinary tools (`ls -l` asks for ACL xattrs, `isatty` sends
    // an ioctl); they have plain answers, so fuser's "not implemented" warning would be noise.
    // No ACLs: the kernel checks the mode bits alone. A source ACL's refusals are folded into
    // the served mode (see `acl`); what it grants beyond the mode is not carried over.

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        // No attributes: an empty list.
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        caught("statfs", || {
            let bytes = self.engine.base_bytes();
            let nodes = self.read_tree().len() as u64;
            reply.statfs(bytes.div_ceil(4096), 0, 0, nodes, 0, 4096, 255, 4096)
        })
    }
}
