//! One ring request in, one reply out: decode the operation, ask `ops`, and write the reply
//! into the entry's payload buffer. A read is merged straight into that buffer, which is the
//! one the kernel copies the reply from: no copy in between.

use fuser::{Errno, FileType};

use super::abi::{self, opcode, read_in, Request};
use crate::fuse::ops::{Attr, Statfs, STATFS_BSIZE, STATFS_NAMELEN};
use crate::fuse::LorafsFs;

/// Who may use the mount besides the kernel's own requests: `None` for anyone (`allow_other`;
/// the kernel checks each access against the modes), or the one user who mounted it (and
/// root), as fuser enforces for the `/dev/fuse` transport.
#[derive(Clone, Copy)]
pub(in crate::fuse) struct Users {
    pub owner: Option<u32>,
}

/// What a request is answered with, decided before anything is written into the payload
/// buffer (which still holds the request's own arguments, such as a name).
enum Answer {
    Entry(Attr),
    Attr(Attr),
    Open(u64, u32),
    Statfs(Statfs),
    XattrSize(u32),
    Empty,
    Read { fh: u64, offset: u64, size: usize },
    List { offset: u64, size: usize },
}

/// Answer `req` into `payload`: the reply's payload size, or the errno to reply with.
pub(super) fn answer(
    fs: &LorafsFs,
    users: Users,
    req: &Request,
    payload: &mut [u8],
) -> Result<usize, Errno> {
    let h = req.header;
    if let Some(owner) = users.owner {
        if h.uid != owner && h.uid != 0 && !sent_without_user(h.opcode) {
            return Err(Errno::EACCES);
        }
    }
    let answer = decide(fs, req)?;
    Ok(match answer {
        Answer::Entry(a) => abi::put_entry(payload, &a.attr, a.ttl),
        Answer::Attr(a) => abi::put_attr_out(payload, &a.attr, a.ttl),
        Answer::Open(fh, flags) => abi::put_open(payload, fh, flags),
        Answer::Statfs(s) => {
            abi::put_statfs(payload, s.blocks, s.files, STATFS_BSIZE, STATFS_NAMELEN)
        }
        Answer::XattrSize(size) => abi::put_xattr_size(payload, size),
        Answer::Empty => 0,
        Answer::Read { fh, offset, size } => {
            let size = size.min(payload.len());
            fs.read(h.nodeid, fh, offset, &mut payload[..size])?
        }
        Answer::List { offset, size } => {
            let size = size.min(payload.len());
            list(fs, h.nodeid, offset, &mut payload[..size])?
        }
    })
}

/// Requests the kernel may send on its own behalf, with no user's id (as fuser lets through;
/// FORGET, which fuser also lets through, never comes through a ring).
fn sent_without_user(op: u32) -> bool {
    matches!(
        op,
        opcode::READ | opcode::READDIR | opcode::RELEASE | opcode::RELEASEDIR
    )
}

fn decide(fs: &LorafsFs, req: &Request) -> Result<Answer, Errno> {
    let ino = req.header.nodeid;
    Ok(match req.header.opcode {
        opcode::LOOKUP => Answer::Entry(fs.lookup(ino, req.name().ok_or(Errno::EINVAL)?)?),
        opcode::GETATTR => Answer::Attr(fs.getattr(ino)?),
        opcode::OPEN => {
            let (fh, flags) = fs.open(ino, req.u32_arg(abi::OPEN_IN_FLAGS) as i32)?;
            Answer::Open(fh, flags.bits())
        }
        opcode::READ => Answer::Read {
            fh: req.u64_arg(read_in::FH),
            offset: req.u64_arg(read_in::OFFSET),
            size: req.u32_arg(read_in::SIZE) as usize,
        },
        opcode::RELEASE => {
            fs.release(req.u64_arg(abi::RELEASE_IN_FH));
            Answer::Empty
        }
        opcode::OPENDIR => {
            fs.opendir(ino)?;
            Answer::Open(0, 0)
        }
        opcode::READDIR => Answer::List {
            offset: req.u64_arg(read_in::OFFSET),
            size: req.u32_arg(read_in::SIZE) as usize,
        },
        // Nothing is ever written, so nothing to flush; a directory handle holds nothing.
        opcode::FLUSH | opcode::RELEASEDIR => Answer::Empty,
        opcode::STATFS => Answer::Statfs(fs.statfs()),
        // No extended attributes (see `dev` for why ACLs are not served).
        opcode::GETXATTR => return Err(Errno::from_i32(libc::ENODATA)),
        opcode::LISTXATTR => match req.u32_arg(abi::GETXATTR_IN_SIZE) {
            0 => Answer::XattrSize(0),
            _ => Answer::Empty,
        },
        opcode::IOCTL => return Err(Errno::from_i32(libc::ENOTTY)),
        op => {
            log::debug!("FUSE opcode {op} not implemented (ENOSYS)");
            return Err(Errno::ENOSYS);
        }
    })
}

/// Directory entries of `ino` from `offset` on, as many as fit in `buf`.
fn list(fs: &LorafsFs, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut end = 0;
    fs.list(
        ino,
        offset,
        |child, next, kind: FileType, name| match abi::put_dirent(buf, end, child, next, kind, name)
        {
            Some(e) => {
                end = e;
                false
            }
            None => true,
        },
    )?;
    Ok(end)
}
