//! The FUSE wire format as FUSE over io_uring carries it (the kernel's
//! `include/uapi/linux/fuse.h`, protocol 7.42): the layout of a ring entry's header buffer,
//! the request header and the per-operation arguments lorafs reads, and the replies it
//! writes. Plain byte offsets in native byte order, checked by the tests below against the
//! sizes the header file gives; nothing here is `unsafe`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

/// `struct fuse_uring_req_header`: the request header (`fuse_in_header`, and the reply's
/// `fuse_out_header` written over it), the operation's first argument, and
/// `fuse_uring_ent_in_out`.
pub const HEADER_BYTES: usize = 288;
const OP_IN: usize = 128;
const OP_IN_BYTES: usize = 128;
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;

/// `enum fuse_uring_cmd`: the commands of an `IORING_OP_URING_CMD` on `/dev/fuse`.
pub const CMD_REGISTER: u32 = 1;
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `enum fuse_opcode`, the operations that can reach a ring (FORGET and INTERRUPT never do).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const IOCTL: u32 = 39;
}

/// `struct fuse_uring_cmd_req`, in the 80-byte command area of a 128-byte SQE.
pub fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// `struct fuse_in_header`, the fields lorafs uses.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub opcode: u32,
    pub nodeid: u64,
    pub uid: u32,
}

/// A request as the kernel put it in a ring entry, copied out of it, so that the reply can
/// be written into the same buffers. Only names are ever in the payload of the requests a
/// read-only mount gets (no WRITE reaches it), so the copy is small.
pub struct Request {
    pub header: InHeader,
    /// The operation's first argument (zeros past its end).
    arg: [u8; OP_IN_BYTES],
    /// The rest of the arguments (a name, for LOOKUP and GETXATTR).
    payload: Vec<u8>,
}

impl Request {
    /// Read the request in `header` (a ring entry's header buffer) and `payload`; `None`
    /// when the kernel's payload size does not fit the buffer.
    pub fn parse(header: &[u8; HEADER_BYTES], payload: &[u8]) -> Option<Request> {
        let len = u32_at(header, ENT_PAYLOAD_SZ) as usize;
        Some(Request {
            header: InHeader {
                opcode: u32_at(header, 4),
                nodeid: u64_at(header, 16),
                uid: u32_at(header, 24),
            },
            arg: header[OP_IN..OP_IN + OP_IN_BYTES]
                .try_into()
                .expect("128 bytes"),
            payload: payload.get(..len)?.to_vec(),
        })
    }

    /// A NUL-terminated name at the start of the payload.
    pub fn name(&self) -> Option<&OsStr> {
        let end = self.payload.iter().position(|&b| b == 0)?;
        Some(OsStr::from_bytes(&self.payload[..end]))
    }

    pub fn u32_arg(&self, at: usize) -> u32 {
        u32_at(&self.arg, at)
    }

    pub fn u64_arg(&self, at: usize) -> u64 {
        u64_at(&self.arg, at)
    }
}

/// The request's id, to reply to it (also when the rest cannot be read).
pub fn unique(header: &[u8; HEADER_BYTES]) -> u64 {
    u64_at(header, 8)
}

/// The entry's commit id, to hand back with the reply.
pub fn commit_id(header: &[u8; HEADER_BYTES]) -> u64 {
    u64_at(header, ENT_COMMIT_ID)
}

/// Write the reply header (`fuse_out_header`) over the request's, and the size of the
/// reply's payload. An error reply has no payload.
pub fn set_reply(header: &mut [u8; HEADER_BYTES], unique: u64, error: i32, payload: usize) {
    header[..16].fill(0);
    put_u32(header, 0, (16 + payload) as u32);
    header[4..8].copy_from_slice(&error.to_ne_bytes());
    put_u64(header, 8, unique);
    put_u32(header, ENT_PAYLOAD_SZ, payload as u32);
}

/// Field offsets in `struct fuse_read_in` (READ, READDIR).
pub mod read_in {
    pub const FH: usize = 0;
    pub const OFFSET: usize = 8;
    pub const SIZE: usize = 16;
}

/// `fuse_open_in.flags`, `fuse_release_in.fh`, `fuse_getxattr_in.size`, `fuse_ioctl_in`'s
/// `out_size`: all at these offsets of their structs.
pub const OPEN_IN_FLAGS: usize = 0;
pub const RELEASE_IN_FH: usize = 0;
pub const GETXATTR_IN_SIZE: usize = 0;

const ATTR_BYTES: usize = 88;
pub const ENTRY_OUT_BYTES: usize = 40 + ATTR_BYTES;
pub const ATTR_OUT_BYTES: usize = 16 + ATTR_BYTES;
pub const OPEN_OUT_BYTES: usize = 16;
pub const STATFS_OUT_BYTES: usize = 80;
pub const GETXATTR_OUT_BYTES: usize = 8;

/// Seconds and nanoseconds since the epoch, negative before it (as fuser encodes them).
fn time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    }
}

fn mode(kind: FileType, perm: u16) -> u32 {
    let kind = match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    };
    kind | u32::from(perm)
}

/// `struct fuse_attr`.
fn put_attr(b: &mut [u8], a: &FileAttr) {
    let (atime, mtime, ctime) = (time(a.atime), time(a.mtime), time(a.ctime));
    put_u64(b, 0, a.ino.0);
    put_u64(b, 8, a.size);
    put_u64(b, 16, a.blocks);
    put_u64(b, 24, atime.0 as u64);
    put_u64(b, 32, mtime.0 as u64);
    put_u64(b, 40, ctime.0 as u64);
    put_u32(b, 48, atime.1);
    put_u32(b, 52, mtime.1);
    put_u32(b, 56, ctime.1);
    put_u32(b, 60, mode(a.kind, a.perm));
    put_u32(b, 64, a.nlink);
    put_u32(b, 68, a.uid);
    put_u32(b, 72, a.gid);
    put_u32(b, 76, a.rdev);
    put_u32(b, 80, a.blksize);
    put_u32(b, 84, a.flags);
}

/// `struct fuse_entry_out` for a LOOKUP: the node, its attributes, both valid for `ttl`.
pub fn put_entry(b: &mut [u8], a: &FileAttr, ttl: Duration) -> usize {
    let b = &mut b[..ENTRY_OUT_BYTES];
    b.fill(0);
    put_u64(b, 0, a.ino.0);
    put_u64(b, 16, ttl.as_secs());
    put_u64(b, 24, ttl.as_secs());
    put_u32(b, 32, ttl.subsec_nanos());
    put_u32(b, 36, ttl.subsec_nanos());
    put_attr(&mut b[40..], a);
    ENTRY_OUT_BYTES
}

/// `struct fuse_attr_out` for a GETATTR.
pub fn put_attr_out(b: &mut [u8], a: &FileAttr, ttl: Duration) -> usize {
    let b = &mut b[..ATTR_OUT_BYTES];
    b.fill(0);
    put_u64(b, 0, ttl.as_secs());
    put_u32(b, 8, ttl.subsec_nanos());
    put_attr(&mut b[16..], a);
    ATTR_OUT_BYTES
}

/// `struct fuse_open_out`.
pub fn put_open(b: &mut [u8], fh: u64, open_flags: u32) -> usize {
    let b = &mut b[..OPEN_OUT_BYTES];
    b.fill(0);
    put_u64(b, 0, fh);
    put_u32(b, 8, open_flags);
    OPEN_OUT_BYTES
}

/// `struct fuse_statfs_out`: no free space, nothing to create.
pub fn put_statfs(b: &mut [u8], blocks: u64, files: u64, bsize: u32, namelen: u32) -> usize {
    let b = &mut b[..STATFS_OUT_BYTES];
    b.fill(0);
    put_u64(b, 0, blocks);
    put_u64(b, 24, files);
    put_u32(b, 40, bsize);
    put_u32(b, 44, namelen);
    put_u32(b, 48, bsize);
    STATFS_OUT_BYTES
}

/// `struct fuse_getxattr_out`: the size an attribute (list) would need.
pub fn put_xattr_size(b: &mut [u8], size: u32) -> usize {
    let b = &mut b[..GETXATTR_OUT_BYTES];
    b.fill(0);
    put_u32(b, 0, size);
    GETXATTR_OUT_BYTES
}

/// Append `struct fuse_dirent` for `name` at `b[at..]`, padded to 8 bytes: the new end, or
/// `None` when it does not fit.
pub fn put_dirent(
    b: &mut [u8],
    at: usize,
    ino: u64,
    next: u64,
    kind: FileType,
    name: &OsStr,
) -> Option<usize> {
    let name = name.as_bytes();
    let end = at + (24 + name.len()).next_multiple_of(8);
    let e = b.get_mut(at..end)?;
    e.fill(0);
    put_u64(e, 0, ino);
    put_u64(e, 8, next);
    put_u32(e, 16, name.len() as u32);
    put_u32(e, 20, mode(kind, 0) >> 12);
    e[24..24 + name.len()].copy_from_slice(name);
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::INodeNo;

    fn attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(7),
            size: 1 << 33,
            blocks: 9,
            atime: UNIX_EPOCH + Duration::new(5, 6),
            mtime: UNIX_EPOCH - Duration::new(1, 250),
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o440,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    #[test]
    fn request_fields_are_read_where_the_kernel_writes_them() {
        let mut h = [0u8; HEADER_BYTES];
        put_u32(&mut h, 4, opcode::READ);
        put_u64(&mut h, 8, 42);
        put_u64(&mut h, 16, 7);
        put_u32(&mut h, 24, 1000);
        put_u64(&mut h, OP_IN + read_in::OFFSET, 1 << 40);
        put_u32(&mut h, OP_IN + read_in::SIZE, 4096);
        put_u64(&mut h, ENT_COMMIT_ID, 42);
        put_u32(&mut h, ENT_PAYLOAD_SZ, 3);
        let payload = *b"ab\0xyz";
        let r = Request::parse(&h, &payload).expect("fits");
        assert_eq!(r.header.opcode, opcode::READ);
        assert_eq!((unique(&h), r.header.nodeid, r.header.uid), (42, 7, 1000));
        assert_eq!(r.u64_arg(read_in::OFFSET), 1 << 40);
        assert_eq!(r.u32_arg(read_in::SIZE), 4096);
        assert_eq!(r.name(), Some(OsStr::new("ab")));
        assert_eq!(commit_id(&h), 42);
        put_u32(&mut h, ENT_PAYLOAD_SZ, 7);
        assert!(
            Request::parse(&h, &payload).is_none(),
            "payload size past the buffer"
        );
    }

    #[test]
    fn reply_header_and_payload_size() {
        let mut h = [0xffu8; HEADER_BYTES];
        set_reply(&mut h, 42, -libc::ENOENT, 0);
        assert_eq!(u32_at(&h, 0), 16);
        assert_eq!(
            i32::from_ne_bytes(h[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
        assert_eq!(u64_at(&h, 8), 42);
        assert_eq!(u32_at(&h, ENT_PAYLOAD_SZ), 0);
    }

    #[test]
    fn entry_and_attr_replies() {
        let mut b = [0xffu8; 256];
        let ttl = Duration::new(3, 4);
        assert_eq!(put_entry(&mut b, &attr(), ttl), 128);
        assert_eq!((u64_at(&b, 0), u64_at(&b, 8)), (7, 0));
        assert_eq!((u64_at(&b, 16), u32_at(&b, 32)), (3, 4));
        let a = &b[40..];
        assert_eq!((u64_at(a, 0), u64_at(a, 8), u64_at(a, 16)), (7, 1 << 33, 9));
        assert_eq!((u64_at(a, 24), u32_at(a, 48)), (5, 6));
        // 1.00000025 s before the epoch: -2 s + 999999750 ns.
        assert_eq!((u64_at(a, 32) as i64, u32_at(a, 52)), (-2, 999_999_750));
        assert_eq!(u32_at(a, 60), libc::S_IFREG | 0o440);
        assert_eq!(
            (u32_at(a, 68), u32_at(a, 72), u32_at(a, 80)),
            (1000, 100, 1 << 20)
        );
        assert_eq!(b[128], 0xff, "nothing written past the struct");
        assert_eq!(put_attr_out(&mut b, &attr(), ttl), 104);
        assert_eq!((u64_at(&b, 0), u32_at(&b, 8), u64_at(&b, 16)), (3, 4, 7));
    }

    #[test]
    fn small_replies() {
        let mut b = [0xffu8; 128];
        assert_eq!(put_open(&mut b, 9, 2), 16);
        assert_eq!((u64_at(&b, 0), u32_at(&b, 8), u32_at(&b, 12)), (9, 2, 0));
        assert_eq!(put_statfs(&mut b, 10, 11, 4096, 255), 80);
        assert_eq!((u64_at(&b, 0), u64_at(&b, 8), u64_at(&b, 24)), (10, 0, 11));
        assert_eq!(
            (u32_at(&b, 40), u32_at(&b, 44), u32_at(&b, 48)),
            (4096, 255, 4096)
        );
        assert_eq!(put_xattr_size(&mut b, 0), 8);
        assert_eq!(u64_at(&b, 0), 0);
    }

    #[test]
    fn dirents_are_padded_and_stop_when_full() {
        let mut b = [0xffu8; 64];
        let end = put_dirent(&mut b, 0, 5, 1, FileType::Directory, OsStr::new("."));
        assert_eq!(end, Some(32));
        assert_eq!((u64_at(&b, 0), u64_at(&b, 8), u32_at(&b, 16)), (5, 1, 1));
        assert_eq!(u32_at(&b, 20), libc::DT_DIR as u32);
        assert_eq!(&b[24..32], b".\0\0\0\0\0\0\0");
        let name = OsStr::new("config.json");
        assert_eq!(
            put_dirent(&mut b, 32, 6, 2, FileType::RegularFile, name),
            None
        );
        assert_eq!(b[32], 0xff, "an entry that does not fit is not written");
        let end = put_dirent(&mut b, 0, 6, 2, FileType::RegularFile, name);
        assert_eq!(end, Some(40));
        assert_eq!(u32_at(&b, 20), libc::DT_REG as u32);
    }

    #[test]
    fn command_area() {
        let cmd = cmd_req(0x1122, 3);
        assert_eq!(u64_at(&cmd, 0), 0);
        assert_eq!(u64_at(&cmd, 8), 0x1122);
        assert_eq!(u16::from_ne_bytes([cmd[16], cmd[17]]), 3);
    }
}
