//! Which transport a mount serves through, and the mount itself: fuser mounts for the
//! `/dev/fuse` transport; for FUSE over io_uring lorafs mounts with mount(2) itself (as
//! fuser does for root), because the ring is registered on the mount's `/dev/fuse`
//! descriptor, which fuser keeps to itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::ring::Plan;

/// How requests travel between the kernel and lorafs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// FUSE over io_uring where the kernel offers it and lorafs can use it, else
    /// `/dev/fuse`, saying why in one log line.
    Auto,
    /// FUSE over io_uring, or no mount.
    Uring,
    /// `/dev/fuse` (read and write), what every FUSE kernel has.
    Dev,
}

impl Transport {
    pub const NAMES: [&'static str; 3] = ["auto", "uring", "dev"];

    pub fn parse(name: &str) -> Option<Transport> {
        match name {
            "auto" => Some(Transport::Auto),
            "uring" => Some(Transport::Uring),
            "dev" => Some(Transport::Dev),
            _ => None,
        }
    }
}

/// The fuse module's switch for FUSE over io_uring (Linux 6.14+; off by default, root can
/// turn it on).
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// The ring to serve with, if `transport` wants one and this process can have one:
/// `Ok(None)` for `/dev/fuse` (for `auto`, after logging why), an error when `uring` was
/// asked for and cannot be had.
pub(super) fn choose(transport: Transport, threads: usize) -> io::Result<Option<Plan>> {
    if transport == Transport::Dev {
        return Ok(None);
    }
    match ring_plan(threads) {
        Ok(plan) => Ok(Some(plan)),
        Err(why) if transport == Transport::Auto => {
            log::info!("FUSE over io_uring not used ({why}): serving through /dev/fuse");
            Ok(None)
        }
        Err(why) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("--transport uring: FUSE over io_uring unavailable: {why}"),
        )),
    }
}

fn ring_plan(threads: usize) -> Result<Plan, String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(value) if value.trim() == "Y" => {}
        Ok(_) => return Err(format!("the kernel has it off: {ENABLE_URING} is N")),
        Err(_) => return Err("the kernel has none (no fuse module parameter enable_uring)".into()),
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("it needs a mount by root".into());
    }
    Plan::probe(threads)
}

/// What mount(2) is given: the options fuser would pass for the same mount.
pub(super) struct MountRequest<'a> {
    pub mountpoint: &'a Path,
    pub fsname: &'a str,
    pub allow_other: bool,
}

/// Mount a read-only FUSE filesystem at the mount point with mount(2) (root only) and
/// return its `/dev/fuse` descriptor, on which the kernel has queued INIT.
pub(super) fn mount(req: &MountRequest) -> io::Result<OwnedFd> {
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let mode = std::fs::metadata(req.mountpoint)?.mode();
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut options = format!(
        "fd={},rootmode={mode:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if req.allow_other {
        options.push_str(",allow_other");
    }
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::other("NUL in a mount argument"));
    let source = c(req.fsname.as_bytes())?;
    let target = c(req.mountpoint.as_os_str().as_bytes())?;
    let options = c(options.as_bytes())?;
    let flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: every pointer is to a NUL-terminated string that outlives the call.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dev)
}
