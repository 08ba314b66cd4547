//! The FUSE adapter: the only module that knows `fuser`. Each callback asks the core and
//! replies, or logs why and replies with an errno; none of them can panic on bad input.

mod access;
mod acl;
mod inodes;
mod panics;
mod session;

pub use panics::init_server_process;
pub use session::{check_mountpoint, mount, unmount, MountOptions};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::view::View;
use inodes::{Node, NodeKind};
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

pub struct LorafsFs {
    view: Arc<View>,
    /// Index = inode number - 1.
    nodes: Vec<Node>,
    /// The stats file's inode, unless the base has a file of that name.
    stats_ino: Option<u64>,
    next_fh: AtomicU64,
    /// Per open file handle: where the last read ended, to spot sequential readers.
    last_end: Mutex<HashMap<u64, u64>>,
}

impl LorafsFs {
    /// The tree of `view`, each node with its source's permissions and owner; fails when a
    /// source cannot be stat'ed.
    pub fn new(view: Arc<View>) -> io::Result<LorafsFs> {
        let nodes = inodes::build(&view)?;
        let shadowed = match &nodes[0].kind {
            NodeKind::Dir { children } => children.contains_key(OsStr::new(STATS_FILE)),
            NodeKind::File { .. } => false,
        };
        if shadowed {
            log::warn!(
                "{}: the base has a file named {STATS_FILE}: it is served, and the mount's \
                 counters only through `kill -USR1 PID` (logged)",
                view.base_dir().display()
            );
        }
        Ok(LorafsFs {
            stats_ino: (!shadowed).then_some(nodes.len() as u64 + 1),
            view,
            nodes,
            next_fh: AtomicU64::new(1),
            last_end: Mutex::new(HashMap::new()),
        })
    }

    /// The inode number of every file, by file index.
    pub fn file_inodes(&self) -> Vec<u64> {
        let mut inodes = vec![0; self.view.files.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if let NodeKind::File { file } = node.kind {
                inodes[file] = i as u64 + 1;
            }
        }
        inodes
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        self.nodes.get((ino.0 as usize).checked_sub(1)?)
    }

    fn is_stats(&self, ino: INodeNo) -> bool {
        self.stats_ino == Some(ino.0)
    }

    /// The stats file is the mounting user's (and root's) to read: it shows the server's pid
    /// and activity, not model bytes, and the base's owner may be someone else.
    fn stats_attr(&self, ino: u64) -> FileAttr {
        let mut attr = self.nodes[0].attr;
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
        stats_text(&self.view)
    }

    /// Prefetch ahead of a reader whose read starts where its previous one ended.
    fn note_read(&self, fh: u64, file: usize, offset: u64, len: u64) {
        let sequential = {
            let mut last = self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            let previous = last.insert(fh, offset + len);
            previous == Some(offset)
        };
        if sequential {
            self.view.prefetch(file, offset + len, PREFETCH_BYTES);
        }
    }

    /// Serve a read of merged file `file`.
    fn read_file(&self, file: usize, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        READ_BUF.with_borrow_mut(|buf| {
            // One buffer per FUSE thread, reused: no allocation or zeroing per read.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let rel = &self.view.files[file].rel;
            // A bug must cost one read (EIO), not a serving thread and with it the mount.
            let result =
                panics::catch(|| self.view.read_at(file, offset, &mut buf[..size as usize]));
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
                    self.note_read(fh.0, file, offset, n as u64);
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

    /// List directory `ino` from entry `offset` on: `.`, `..`, then the children by name.
    fn list(&self, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let NodeKind::Dir { children } = &node.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (node.parent, FileType::Directory, OsStr::new("..")),
        ];
        let entries = dots
            .into_iter()
            .chain(children.iter().map(|(name, &child)| {
                (
                    child,
                    self.nodes[child as usize - 1].attr.kind,
                    name.as_os_str(),
                )
            }));
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
pub fn stats_text(view: &View) -> String {
    let c = &view.engine.blocks.stats;
    let s = &view.engine.stats;
    format!(
        "cache_hits {}\ncache_misses {}\ncache_waits {}\ncache_evictions {}\ncache_bytes {}\ncache_budget {}\n\
         bytes_computed {}\nbytes_read {}\nbytes_merged {}\nbytes_passthrough {}\nbytes_replaced {}\nfactor_bytes {}\nkernel {}\npid {}\n\
         panics_caught {}\n",
        c.hits.load(Ordering::Relaxed),
        c.misses.load(Ordering::Relaxed),
        c.waits.load(Ordering::Relaxed),
        c.evictions.load(Ordering::Relaxed),
        view.engine.blocks.bytes(),
        view.engine.blocks.budget(),
        c.bytes_computed.load(Ordering::Relaxed),
        s.bytes_read.load(Ordering::Relaxed),
        s.bytes_merged.load(Ordering::Relaxed),
        s.bytes_passthrough.load(Ordering::Relaxed),
        s.bytes_replaced.load(Ordering::Relaxed),
        view.plan.factor_bytes(),
        view.engine.kernel.name(),
        std::process::id(),
        panics::caught_count(),
    )
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
            if let (1, Some(stats)) = (parent.0, self.stats_ino) {
                if name == STATS_FILE {
                    return reply.entry(&Duration::ZERO, &self.stats_attr(stats), Generation(0));
                }
            }
            match self.node(parent).map(|n| &n.kind) {
                Some(NodeKind::Dir { children }) => match children.get(name) {
                    Some(&ino) => {
                        reply.entry(&TTL, &self.nodes[ino as usize - 1].attr, Generation(0))
                    }
                    None => reply.error(Errno::ENOENT),
                },
                Some(NodeKind::File { .. }) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        caught("getattr", || {
            if self.is_stats(ino) {
                return reply.attr(&Duration::ZERO, &self.stats_attr(ino.0));
            }
            match self.node(ino) {
                Some(node) => reply.attr(&TTL, &node.attr),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        caught("open", || {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            if self.is_stats(ino) {
                // Its size changes with every read: bypass the page cache.
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            match self.node(ino).map(|n| &n.kind) {
                // The content never changes while mounted: keep the page cache across opens.
                // Pages cached from a source since changed (a write, or a `chmod` closing it
                // to this reader) are not served: the open fails, as a read would.
                Some(NodeKind::File { file }) => match self.view.check_sources(*file) {
                    Ok(()) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                    Err(err) => {
                        log::debug!(
                            "open of {} refused: {err}",
                            self.view.files[*file].rel.display()
                        );
                        reply.error(Errno::from_i32(err.errno()))
                    }
                },
                Some(NodeKind::Dir { .. }) => reply.error(Errno::EISDIR),
                None => reply.error(Errno::ENOENT),
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
            match self.node(ino).map(|n| &n.kind) {
                Some(NodeKind::File { file }) => self.read_file(*file, fh, offset, size, reply),
                Some(NodeKind::Dir { .. }) => reply.error(Errno::EISDIR),
                None => reply.error(Errno::ENOENT),
            }
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
            self.last_end
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fh.0);
            reply.ok();
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        caught("opendir", || match self.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(NodeKind::File { .. }) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
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
            let bytes = self.view.total_bytes();
            reply.statfs(
                bytes.div_ceil(4096),
                0,
                0,
                self.nodes.len() as u64,
                0,
                4096,
                255,
                4096,
            )
        })
    }
}
