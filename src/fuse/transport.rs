//! Which transport a mount serves through, and the mount itself: fuser mounts for the
//! `/dev/fuse` transport; for FUSE over io_uring lorafs mounts with mount(2) itself (as
//! fuser does for root), because the ring is registered on the mount's `/dev/fuse`
//! descriptor, which fuser keeps to itself, and unmounts it itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

use super::dev::DevFs;
use super::ring::{self, Plan};
use super::session::{umount, MountOptions};
use super::LorafsFs;
use crate::mountinfo::find_mount;
use crate::mountinfo::FS_NAME;

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
    pub noexec: bool,
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
    let mut flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID;
    if req.noexec {
        flags |= libc::MS_NOEXEC;
    }
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

/// A mount's session, and the ring serving it beside `/dev/fuse` if any.
pub(super) struct Served {
    pub session: Session<DevFs>,
    pub ring: Option<ring::Ring>,
    /// Mounted by lorafs itself (for the ring), not by fuser: lorafs unmounts it.
    pub own_mount: bool,
}

/// Mount `fs` at `mountpoint` (canonical) through the transport `options` choose: fuser
/// mounts for `/dev/fuse`; for the ring lorafs mounts, lets fuser negotiate INIT on the
/// descriptor, and starts the ring's threads.
pub(super) fn serve(fs: LorafsFs, mountpoint: &Path, options: &MountOptions) -> io::Result<Served> {
    let fsname = format!(
        "{FS_NAME}:{}",
        (fs.engine.base.dir.canonicalize())
            .unwrap_or_else(|_| fs.engine.base.dir.clone())
            .display()
    );
    let config = session_config(&fsname, options);
    let plan = choose(options.transport, options.threads)?;
    let fs = Arc::new(fs);
    let ring_agreed = Arc::new(AtomicBool::new(false));
    let dev_fs = DevFs {
        fs: fs.clone(),
        ring: plan.is_some(),
        ring_agreed: ring_agreed.clone(),
        max_background: options.max_background,
    };
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("mounting {} failed: {e}", mountpoint.display()),
        )
    };
    let Some(plan) = plan else {
        let session = Session::new(dev_fs, mountpoint, &config).map_err(failed)?;
        return Ok(Served {
            session,
            ring: None,
            own_mount: false,
        });
    };
    let request = MountRequest {
        mountpoint,
        fsname: &fsname,
        allow_other: options.allow_other,
        noexec: options.noexec,
    };
    let dev = mount(&request).map_err(failed)?;
    // Once INIT agreed to the ring, every request waits for it: a failure from here on
    // must not leave the mount behind.
    let own = Unmounter::new(mountpoint, None);
    let detach = |e: io::Error| {
        let detached = match &own {
            Ok(own) => own.detach(),
            Err(err) => Err(io::Error::other(err.to_string())),
        };
        if let Err(err) = detached {
            log::error!(
                "the failed mount is left at {}: {err}",
                mountpoint.display()
            );
        }
        failed(e)
    };
    let ring_dev = Arc::new(dev.try_clone().map_err(detach)?);
    let session = Session::from_fd(dev_fs, dev, config.acl, config.clone()).map_err(detach)?;
    let ring = if ring_agreed.load(Ordering::Acquire) {
        let users = ring::Users {
            owner: (!options.allow_other).then(super::euid),
        };
        Some(ring::serve(plan, ring_dev, fs, users).map_err(detach)?)
    } else {
        log::info!("FUSE over io_uring not offered at INIT: serving through /dev/fuse");
        None
    };
    Ok(Served {
        session,
        ring,
        own_mount: true,
    })
}

/// fuser's session settings: the mount options (read-only, the kernel checking permissions,
/// no devices or set-id programs), who may use the mount, the serving threads.
fn session_config(fsname: &str, options: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        // The kernel checks each access against the mode and owner each node takes from its
        // source (see `inodes`), so `--allow-other` shares no more than the source does.
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName(fsname.into()),
        MountOption::Subtype(FS_NAME.into()),
    ];
    if options.noexec {
        config.mount_options.push(MountOption::NoExec);
    }
    if options.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    config
}

/// Unmounts the mount being served (on a signal, or when its session fails): fuser's own
/// mount, or the one lorafs made for FUSE over io_uring. Only while it is the mount on top
/// at its path (the device it got when mounted): a filesystem mounted over it since is
/// someone else's, and unmounting the path would remove that one instead.
pub(super) struct Unmounter {
    path: PathBuf,
    device: String,
    fuser: Option<fuser::SessionUnmounter>,
}

impl Unmounter {
    /// For the mount just made at `path` (fuser's `unmounter` if fuser made it).
    pub fn new(path: &Path, fuser: Option<fuser::SessionUnmounter>) -> io::Result<Unmounter> {
        let info = find_mount(path)?.filter(|info| info.is_lorafs());
        let device = info.map(|info| info.device).ok_or_else(|| {
            io::Error::other(format!("{}: no lorafs mount in mountinfo", path.display()))
        })?;
        Ok(Unmounter {
            path: path.to_path_buf(),
            device,
            fuser,
        })
    }

    /// The same mount, unmounted by lorafs itself rather than fuser (another handle, for
    /// the session's failure while this one serves the signals).
    pub fn by_lorafs(&self) -> Unmounter {
        Unmounter {
            path: self.path.clone(),
            device: self.device.clone(),
            fuser: None,
        }
    }

    /// Whether the mount on top at the path is still this one.
    pub fn check(&self) -> io::Result<()> {
        match find_mount(&self.path)? {
            Some(info) if info.device == self.device => Ok(()),
            Some(info) => Err(io::Error::other(format!(
                "{} is covered by another mount ({}, device {}): unmount that first",
                self.path.display(),
                info.fstype,
                info.device
            ))),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not mounted", self.path.display()),
            )),
        }
    }

    pub fn unmount(&mut self) -> io::Result<()> {
        self.check()?;
        match &mut self.fuser {
            Some(unmounter) => unmounter.unmount(),
            None => umount(&self.path, 0),
        }
    }

    /// Detach the mount now (`MNT_DETACH`): it leaves the tree, and goes when unused.
    pub fn detach(&self) -> io::Result<()> {
        self.check()?;
        umount(&self.path, libc::MNT_DETACH)
    }
}
