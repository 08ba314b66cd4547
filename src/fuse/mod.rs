//! The FUSE adapter: the only module that knows `fuser`. Each callback asks the core and
//! replies, or logs why and replies with an errno; none of them can panic on bad input.

mod session;

pub use session::{check_mountpoint, mount, unmount, MountOptions};

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::engine::Engine;

/// The content never changes while mounted, so the kernel may cache names and attributes
/// for as long as it likes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reported as `st_blksize`: programs such as `cat` size their reads by it, and larger reads
/// mean fewer round trips through the kernel (FUSE caps one read at 1 MiB anyway).
const BLKSIZE: u32 = 1 << 20;

/// A file not listed in any directory, readable by name: live counters of the mount.
pub const STATS_FILE: &str = ".lorafs-stats";

/// How far ahead of a sequential reader merged blocks are computed in the background.
const PREFETCH_BYTES: u64 = 8 << 20;

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

enum NodeKind {
    Dir { children: BTreeMap<OsString, u64> },
    File { file: usize },
}

struct Node {
    parent: u64,
    kind: NodeKind,
    attr: FileAttr,
}

pub struct LorafsFs {
    engine: Arc<Engine>,
    /// Index = inode number - 1.
    nodes: Vec<Node>,
    stats_ino: u64,
    next_fh: AtomicU64,
    /// Per open file handle: where the last read ended, to spot sequential readers.
    last_end: Mutex<HashMap<u64, u64>>,
}

impl LorafsFs {
    pub fn new(engine: Arc<Engine>) -> LorafsFs {
        let uid = euid();
        let gid = egid();
        let mtime = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH)
        };
        let attr = |ino: u64, kind: FileType, size: u64, time: SystemTime| FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: if kind == FileType::Directory {
                0o555
            } else {
                0o444
            },
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        };
        let dir_node = |ino: u64, parent: u64, time| Node {
            parent,
            kind: NodeKind::Dir {
                children: BTreeMap::new(),
            },
            attr: attr(ino, FileType::Directory, 0, time),
        };
        let mut nodes = vec![dir_node(1, 1, mtime(&engine.base_dir))];
        let mut dir_ino: HashMap<&Path, u64> = HashMap::from([(Path::new(""), 1)]);
        let link = |nodes: &mut Vec<Node>, parent: u64, name: &OsStr, ino: u64| {
            if let NodeKind::Dir { children } = &mut nodes[parent as usize - 1].kind {
                children.insert(name.to_os_string(), ino);
            }
        };
        for dir in &engine.dirs {
            let ino = nodes.len() as u64 + 1;
            let parent = dir_ino[dir.parent().unwrap_or(Path::new(""))];
            nodes.push(dir_node(ino, parent, mtime(&engine.base_dir.join(dir))));
            link(&mut nodes, parent, dir.file_name().unwrap_or_default(), ino);
            dir_ino.insert(dir, ino);
        }
        for (index, file) in engine.files.iter().enumerate() {
            let ino = nodes.len() as u64 + 1;
            let parent = dir_ino[file.rel.parent().unwrap_or(Path::new(""))];
            nodes.push(Node {
                parent,
                kind: NodeKind::File { file: index },
                attr: attr(
                    ino,
                    FileType::RegularFile,
                    file.size,
                    mtime(&file.base_path),
                ),
            });
            link(
                &mut nodes,
                parent,
                file.rel.file_name().unwrap_or_default(),
                ino,
            );
        }
        let stats_ino = nodes.len() as u64 + 1;
        LorafsFs {
            engine,
            nodes,
            stats_ino,
            next_fh: AtomicU64::new(1),
            last_end: Mutex::new(HashMap::new()),
        }
    }

    /// The inode number of every file, by file index.
    pub fn file_inodes(&self) -> Vec<u64> {
        let mut inodes = vec![0; self.engine.files.len()];
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

    fn stats_attr(&self) -> FileAttr {
        let mut attr = self.nodes[0].attr;
        attr.ino = INodeNo(self.stats_ino);
        attr.kind = FileType::RegularFile;
        attr.perm = 0o444;
        attr.nlink = 1;
        attr.size = self.stats_text().len() as u64;
        attr
    }

    fn stats_text(&self) -> String {
        stats_text(&self.engine)
    }

    /// Prefetch ahead of a reader whose read starts where its previous one ended.
    fn note_read(&self, fh: u64, file: usize, offset: u64, len: u64) {
        let sequential = {
            let mut last = self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            let previous = last.insert(fh, offset + len);
            previous == Some(offset)
        };
        if sequential {
            self.engine.prefetch(file, offset + len, PREFETCH_BYTES);
        }
    }
}

/// The live counters, as served by the stats file and logged on SIGUSR1.
pub fn stats_text(engine: &Engine) -> String {
    let c = &engine.cache.stats;
    let s = &engine.stats;
    format!(
        "cache_hits {}\ncache_misses {}\ncache_waits {}\ncache_evictions {}\ncache_bytes {}\ncache_budget {}\n\
         bytes_computed {}\nbytes_read {}\nbytes_merged {}\nbytes_passthrough {}\nbytes_replaced {}\nfactor_bytes {}\nkernel {}\npid {}\n",
        c.hits.load(Ordering::Relaxed),
        c.misses.load(Ordering::Relaxed),
        c.waits.load(Ordering::Relaxed),
        c.evictions.load(Ordering::Relaxed),
        engine.cache.bytes(),
        engine.cache.budget(),
        c.bytes_computed.load(Ordering::Relaxed),
        s.bytes_read.load(Ordering::Relaxed),
        s.bytes_merged.load(Ordering::Relaxed),
        s.bytes_passthrough.load(Ordering::Relaxed),
        s.bytes_replaced.load(Ordering::Relaxed),
        engine.plan.factor_bytes(),
        engine.kernel.name(),
        std::process::id(),
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
        if parent.0 == 1 && name == STATS_FILE {
            return reply.entry(&Duration::ZERO, &self.stats_attr(), Generation(0));
        }
        match self.node(parent).map(|n| &n.kind) {
            Some(NodeKind::Dir { children }) => match children.get(name) {
                Some(&ino) => reply.entry(&TTL, &self.nodes[ino as usize - 1].attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            Some(NodeKind::File { .. }) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == self.stats_ino {
            return reply.attr(&Duration::ZERO, &self.stats_attr());
        }
        match self.node(ino) {
            Some(node) => reply.attr(&TTL, &node.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if ino.0 == self.stats_ino {
            // Its size changes with every read: bypass the page cache.
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        match self.node(ino).map(|n| &n.kind) {
            // The content never changes while mounted: keep the page cache across opens.
            Some(NodeKind::File { .. }) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(NodeKind::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
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
        if ino.0 == self.stats_ino {
            let text = self.stats_text();
            let start = (offset as usize).min(text.len());
            let end = (start + size as usize).min(text.len());
            return reply.data(&text.as_bytes()[start..end]);
        }
        let file = match self.node(ino).map(|n| &n.kind) {
            Some(NodeKind::File { file }) => *file,
            Some(NodeKind::Dir { .. }) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        READ_BUF.with_borrow_mut(|buf| {
            // One buffer per FUSE thread, reused: no allocation or zeroing per read.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            // A bug must cost one read (EIO), not a serving thread and with it the mount.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.engine.read_at(file, offset, &mut buf[..size as usize])
            }));
            let rel = &self.engine.files[file].rel;
            match result {
                Ok(Ok(n)) => {
                    reply.data(&buf[..n]);
                    self.note_read(fh.0, file, offset, n as u64);
                }
                Ok(Err(err)) => {
                    log::error!(
                        "read of {} at {offset} (+{size}) failed: {err}",
                        rel.display()
                    );
                    reply.error(Errno::from_i32(err.errno()));
                }
                Err(_) => {
                    log::error!(
                        "read of {} at {offset} (+{size}) panicked; returning EIO",
                        rel.display()
                    );
                    reply.error(Errno::EIO);
                }
            }
        });
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
        self.last_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(NodeKind::File { .. }) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
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
        for (i, (child, kind, name)) in entries.enumerate().skip(offset as usize) {
            // The offset passed back is that of the next entry.
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // The calls below come from ordinary tools (`ls -l` asks for ACL xattrs, `isatty` sends
    // an ioctl); they have plain answers, so fuser's "not implemented" warning would be noise.

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
        let bytes = self.engine.total_bytes();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            self.nodes.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }
}
