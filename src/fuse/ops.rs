//! What the mount answers, whatever carries the request: each FUSE operation lorafs serves
//! as a plain function of its arguments, returning the answer or an errno. The transports
//! (`dev`: fuser over `/dev/fuse`; `ring`: FUSE over io_uring) decode requests, call these
//! and encode the answers, so both serve the same bytes and the same errors.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, FopenFlags};

use super::{panics, with_ino, Handle, LorafsFs, PREFETCH_BYTES, STATS_FILE, TTL};
use crate::tree::{self, Kind};
use crate::view::View;

/// A node's attributes and how long the kernel may keep them.
pub(super) struct Attr {
    pub attr: FileAttr,
    pub ttl: Duration,
}

/// The numbers `statfs` reports: 4 KiB blocks of the base, and nodes.
pub(super) struct Statfs {
    pub blocks: u64,
    pub files: u64,
}

/// `statfs`'s block size and longest name.
pub(super) const STATFS_BSIZE: u32 = 4096;
pub(super) const STATFS_NAMELEN: u32 = 255;

impl LorafsFs {
    pub(super) fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        if let (tree::ROOT, Some(stats)) = (parent, self.stats_ino) {
            if name == STATS_FILE {
                return Ok(self.stats_node(stats));
            }
        }
        let tree = self.read_tree();
        match tree.lookup(parent, name) {
            Some((ino, node)) => Ok(Attr {
                attr: with_ino(node.attr, ino),
                ttl: TTL,
            }),
            None => match tree.get(parent).map(|n| &n.kind) {
                Some(Kind::File { .. }) => Err(Errno::ENOTDIR),
                _ => Err(Errno::ENOENT),
            },
        }
    }

    pub(super) fn forget(&self, ino: u64, nlookup: u64) {
        let mut tree = self.tree.write().unwrap_or_else(|p| p.into_inner());
        tree.forget(ino, nlookup);
    }

    pub(super) fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        if self.stats_ino == Some(ino) {
            return Ok(self.stats_node(ino));
        }
        match self.read_tree().get(ino) {
            Some(node) => Ok(Attr {
                attr: with_ino(node.attr, ino),
                ttl: TTL,
            }),
            None => Err(Errno::ENOENT),
        }
    }

    /// Open `ino` with open(2) `flags`: a handle and the flags the kernel is told.
    pub(super) fn open(&self, ino: u64, flags: i32) -> Result<(u64, FopenFlags), Errno> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(Errno::EROFS);
        }
        if self.stats_ino == Some(ino) {
            // Its size changes with every read: bypass the page cache.
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            return Ok((fh, FopenFlags::FOPEN_DIRECT_IO));
        }
        let file = match self.read_tree().get(ino).map(|n| &n.kind) {
            Some(Kind::File { view, file }) => (view.clone(), *file),
            Some(Kind::Dir { .. }) => return Err(Errno::EISDIR),
            None => return Err(Errno::ENOENT),
        };
        self.open_file(file.0, file.1)
    }

    /// Read open file `fh` (inode `ino`) at `offset` into `buf`: the bytes read, fewer only
    /// at the end of the file.
    pub(super) fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        if self.stats_ino == Some(ino) {
            let text = self.stats_text();
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(text.len());
            let n = buf.len().min(text.len() - start);
            buf[..n].copy_from_slice(&text.as_bytes()[start..start + n]);
            return Ok(n);
        }
        let Some((view, file)) = self.handle(fh) else {
            return Err(Errno::EBADF);
        };
        let rel = &view.files[file].rel;
        let size = buf.len();
        // Before serving it: a sequential reader's next bytes are asked of the disk while
        // this read waits for its own (the kernel sends a stream's requests in order, each
        // with some already in flight behind it).
        self.note_read(fh, &view, file, offset, size as u64);
        // A bug must cost one read (EIO), not a serving thread and with it the mount.
        match panics::catch(|| view.read_at(file, offset, buf)) {
            None => {
                log::error!(
                    "read of {} at {offset} (+{size}) panicked; returning EIO",
                    rel.display()
                );
                Err(Errno::EIO)
            }
            Some(Ok(n)) => Ok(n),
            Some(Err(err)) => {
                log::error!(
                    "read of {} at {offset} (+{size}) failed: {err}",
                    rel.display()
                );
                Err(Errno::from_i32(err.errno()))
            }
        }
    }

    pub(super) fn release(&self, fh: u64) {
        self.lock_handles().remove(&fh);
    }

    /// Directories of views change while mounted: their listings are not cached, and the
    /// handle is not needed.
    pub(super) fn opendir(&self, ino: u64) -> Result<(), Errno> {
        match self.read_tree().get(ino).map(|n| &n.kind) {
            Some(Kind::Dir { .. }) => Ok(()),
            Some(Kind::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// List directory `ino` from entry `offset` on: `.`, `..`, then the children by name,
    /// each passed to `add` with the offset of the entry after it, until `add` says the
    /// reply is full.
    pub(super) fn list(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let tree = self.read_tree();
        let Some(node) = tree.get(ino) else {
            return Err(Errno::ENOENT);
        };
        let Kind::Dir { children } = &node.kind else {
            return Err(Errno::ENOTDIR);
        };
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
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
            if add(child, i as u64 + 1, kind, name) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn statfs(&self) -> Statfs {
        Statfs {
            blocks: self.engine.base_bytes().div_ceil(u64::from(STATFS_BSIZE)),
            files: self.read_tree().len() as u64,
        }
    }

    /// The stats file's node: never cached, its size changes with every read.
    fn stats_node(&self, ino: u64) -> Attr {
        Attr {
            attr: self.stats_attr(ino),
            ttl: Duration::ZERO,
        }
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

    /// Open file `file` of `view`: its sources are checked now, since pages cached from a
    /// source since changed (a write, or a `chmod` closing it to this reader) must not be
    /// served.
    fn open_file(&self, view: Arc<View>, file: usize) -> Result<(u64, FopenFlags), Errno> {
        if let Err(err) = view.check_sources(file) {
            log::debug!("open of {} refused: {err}", view.files[file].rel.display());
            return Err(Errno::from_i32(err.errno()));
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
        Ok((fh, FopenFlags::FOPEN_KEEP_CACHE))
    }
}
