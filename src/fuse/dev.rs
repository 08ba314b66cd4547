//! The `/dev/fuse` transport: fuser reads each request, calls these callbacks, and writes
//! the reply. Always there: it serves everything when FUSE over io_uring is not in use, and
//! alongside the ring it takes what the kernel never sends through one (FORGET, INTERRUPT).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::{
    Errno, FileHandle, Filesystem, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};

use super::ops::{STATFS_BSIZE, STATFS_NAMELEN};
use super::panics::caught;
use super::LorafsFs;

/// `max_write`, the largest write the kernel may send. Nothing is ever written to a
/// read-only mount; fuser's default (16 MiB) would make the kernel ask each io_uring entry
/// for a payload buffer that large.
pub(super) const MAX_WRITE: u32 = 1 << 20;

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The filesystem as fuser's session holds it. `ring` asks for FUSE over io_uring at INIT;
/// `ring_agreed` records whether the kernel offered it (and was asked).
pub(super) struct DevFs {
    pub fs: Arc<LorafsFs>,
    pub ring: bool,
    pub ring_agreed: Arc<AtomicBool>,
    /// FUSE's `max_background`, asked for at INIT.
    pub max_background: u16,
}

/// Each callback runs its body under [`caught`]: a bug costs that request (EIO), not the
/// worker thread and with it the mount. `init` runs once, before serving, and only sets
/// kernel options.
impl Filesystem for DevFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let n = self.max_background;
        match config.set_max_background(n) {
            Ok(_) => log::info!("kernel accepted max_background {n}"),
            Err(max) => log::info!("kernel refused max_background {n} (max {max})"),
        }
        match config.set_max_readahead(u32::MAX) {
            Ok(_) => {}
            Err(max) => match config.set_max_readahead(max) {
                Ok(_) => log::info!("kernel max_readahead {max} bytes (raised later via sysfs)"),
                Err(e) => log::info!("kernel refused max_readahead {max}: {e}"),
            },
        }
        if let Err(e) = config.set_max_write(MAX_WRITE) {
            log::info!("kernel refused max_write 1 MiB: {e}");
        }
        if self.ring {
            // Offered only where the fuse module's `enable_uring` is on.
            let agreed = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            self.ring_agreed.store(agreed, Ordering::Release);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        caught("lookup", || match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&a.ttl, &a.attr, Generation(0)),
            Err(errno) => reply.error(errno),
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        caught("forget", || self.fs.forget(ino.0, nlookup))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        caught("getattr", || match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&a.ttl, &a.attr),
            Err(errno) => reply.error(errno),
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        caught("open", || match self.fs.open(ino.0, flags.0) {
            Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
            Err(errno) => reply.error(errno),
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
            READ_BUF.with_borrow_mut(|buf| {
                // One buffer per FUSE thread, reused: no allocation or zeroing per read.
                if buf.len() < size as usize {
                    buf.resize(size as usize, 0);
                }
                match self.fs.read(ino.0, fh.0, offset, &mut buf[..size as usize]) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(errno) => reply.error(errno),
                }
            })
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
            self.fs.release(fh.0);
            reply.ok();
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        caught("opendir", || match self.fs.opendir(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), fuser::FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        caught("readdir", || {
            let listed = self.fs.list(ino.0, offset, |child, next, kind, name| {
                reply.add(INodeNo(child), next, kind, name)
            });
            match listed {
                Ok(()) => reply.ok(),
                Err(errno) => reply.error(errno),
            }
        })
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
            let s = self.fs.statfs();
            let (bsize, namelen) = (STATFS_BSIZE, STATFS_NAMELEN);
            reply.statfs(s.blocks, 0, 0, s.files, 0, bsize, namelen, bsize)
        })
    }
}
