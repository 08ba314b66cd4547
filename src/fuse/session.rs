//! Mounting: checks on the mount point, the fuser session, signals, kernel read-ahead, and
//! unmounting.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use super::transport::{self, Transport};
use super::views::Views;
use super::LorafsFs;
use crate::mountinfo::{find_mount, mount_target};
use crate::sd_notify::ServiceNotifier;
use crate::tree;
use crate::view::View;

#[derive(Clone)]
pub struct MountOptions {
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// Let other users than the one mounting read the mount (`allow_other`).
    pub allow_other: bool,
    /// Mount with `noexec`.
    pub noexec: bool,
    /// Read-ahead of the mount's backing device in KiB, set through sysfs after mounting.
    pub read_ahead_kb: Option<u32>,
    /// Once mounted, merge every file of this view (a mount of one view) in the background
    /// and hand it to the kernel's page cache (FUSE_NOTIFY_STORE), so that readers find it
    /// there.
    pub warm: Option<Arc<View>>,
    /// systemd's notification socket (`Type=notify`), told READY=1 once the mount serves and
    /// STOPPING=1 when it starts to unmount. Only for the process systemd started: a
    /// background server is not the unit's main process.
    pub notify: Option<Arc<ServiceNotifier>>,
    /// FUSE's `max_background`: background requests in flight before readers wait.
    pub max_background: u16,
    /// How requests travel between the kernel and the server.
    pub transport: Transport,
}

/// What a mount of views needs once the mount exists: the registry, told the kernel's
/// notifier, and the services that change it (the control socket, the catalog watcher),
/// started by `start` and kept until unmounted.
pub struct Live {
    pub views: Arc<Views>,
    pub start: Box<dyn FnOnce() -> io::Result<Services>>,
}

/// Services kept running until unmounted (each stops when dropped).
pub type Services = Vec<Box<dyn std::any::Any>>;

/// Bytes per page-cache store while warming: one FUSE request's worth.
const WARM_CHUNK: usize = 1 << 20;

/// Mount `fs` at `mountpoint` and serve it until unmounted (by `umount`, `lorafs
/// unmount`, SIGINT or SIGTERM). `ready` runs once the mount is usable.
pub fn mount(
    fs: LorafsFs,
    live: Option<Live>,
    mountpoint: &Path,
    options: &MountOptions,
    ready: impl FnOnce(),
) -> io::Result<()> {
    check_mountpoint(mountpoint)?;
    let mountpoint = mountpoint.canonicalize()?;
    let engine = fs.engine.clone();
    let tree = fs.tree();
    let transport::Served {
        mut session,
        ring: _ring,
        own_mount,
    } = transport::serve(fs, &mountpoint, options)?;
    if let Some(view) = &options.warm {
        spawn_warm(
            view.clone(),
            session.notifier(),
            mountpoint.clone(),
            tree::ROOT,
        )?;
    }
    let (_services, _control) = start_view_services(live, &session, &mountpoint)?;
    if let Some(kb) = options.read_ahead_kb {
        set_read_ahead(&mountpoint, kb);
    }
    let fuser_unmounter = (!own_mount).then(|| session.unmount_callable());
    let unmounter = transport::Unmounter::new(&mountpoint, fuser_unmounter)?;
    let failure_unmounter = unmounter.by_lorafs();
    spawn_signals(unmounter, &mountpoint, &engine, options.notify.clone())?;
    let nodes = tree.read().map_or(0, |t| t.len());
    log::info!(
        "mounted {} at {} ({nodes} nodes, kernel {})",
        engine.base.dir.display(),
        mountpoint.display(),
        engine.kernel.name()
    );
    ready();
    if let Some(notify) = &options.notify {
        notify.ready(&format!(
            "serving {} at {}",
            engine.base.dir.display(),
            mountpoint.display()
        ));
    }
    let served = session.run();
    // Unmounted from outside (`umount`, `lorafs unmount`) or by the signal thread, which
    // told systemd already; or the session failed. Either way the service is stopping.
    if let Some(notify) = &options.notify {
        notify.stopping("unmounted");
    }
    if served.is_err() && own_mount {
        // fuser unmounts its own mounts when its session fails; this one is lorafs's.
        if let Err(err) = failure_unmounter.detach() {
            log::error!("after the session failed: {err}");
        }
    }
    served?;
    log::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// What a mount of views runs beside the session: the services that change the views
/// (started now, with the registry told the kernel's notifier) and the control socket
/// through which `lorafs view` reaches the server. Both are kept until unmounted. Without
/// the socket the mount still serves: only live changes are lost (its name can be taken
/// by another user's process), so that failure is logged, not returned.
fn start_view_services(
    live: Option<Live>,
    session: &fuser::Session<super::dev::DevFs>,
    mountpoint: &Path,
) -> io::Result<(Services, Option<crate::control::ControlServer>)> {
    let (services, control): (_, Arc<dyn crate::control::ViewControl>) = match live {
        Some(live) => {
            live.views.set_notifier(session.notifier(), mountpoint);
            ((live.start)()?, live.views)
        }
        None => (Vec::new(), Arc::new(super::views::NoViews)),
    };
    let control = match crate::control::serve(mountpoint, control) {
        Ok(server) => Some(server),
        Err(e) => {
            log::error!("view control of {} unavailable: {e}", mountpoint.display());
            None
        }
    };
    Ok((services, control))
}

/// The thread that answers signals: SIGUSR1 logs the counters; SIGINT and SIGTERM unmount
/// (lazily if the mount is busy), unless someone else's mount is on top of it now.
fn spawn_signals(
    mut unmounter: transport::Unmounter,
    mountpoint: &Path,
    engine: &Arc<crate::engine::Engine>,
    notify: Option<Arc<ServiceNotifier>>,
) -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
    let (mountpoint, engine) = (mountpoint.to_path_buf(), engine.clone());
    // False where it left the mount alone (someone else's on top); true once it tried to
    // unmount, which ends the thread's work as it ends the session.
    let unmount = move |signal: i32, unmounter: &mut transport::Unmounter| -> bool {
        if let Err(err) = unmounter.check() {
            // Someone else's mount on top: unmounting the path would remove it.
            log::error!("signal {signal}: not unmounting: {err}");
            return false;
        }
        log::info!("signal {signal}: unmounting {}", mountpoint.display());
        if let Some(notify) = &notify {
            notify.stopping(&format!("signal {signal}: unmounting"));
        }
        if let Err(err) = unmounter.unmount() {
            // Busy (a file is open): detach now, the kernel finishes when it is closed.
            let shown = mountpoint.display();
            log::warn!("unmount of {shown} failed ({err}); detaching lazily");
            if let Err(err) = unmounter.detach() {
                log::error!("lazy unmount of {shown} failed: {err}");
            }
        }
        true
    };
    std::thread::Builder::new()
        .name("lorafs-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGUSR1 {
                    let stats = super::stats_text(&engine).replace('\n', " ");
                    log::warn!("stats: {stats}");
                    continue;
                }
                if unmount(signal, &mut unmounter) {
                    break;
                }
            }
        })
        .map(drop)
}

/// Warm `view`, served at `dir` with its root at inode `root`, on a thread of its own.
pub(super) fn spawn_warm(
    view: Arc<View>,
    notifier: fuser::Notifier,
    dir: PathBuf,
    root: u64,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("lorafs-warm".into())
        .spawn(move || {
            super::panics::caught_background("warm-up", || warm(&view, &notifier, &dir, root));
        })
        .map(drop)
}

/// Merge every file of `view` (served at `dir`, its root at inode `root`), in order, and
/// store it in the kernel's page cache, so that a loader started after the mount (Python
/// takes a second or two to import torch), or reading a view after its config, finds the
/// model there. Reads arriving meanwhile are served as usual; both go through the block
/// cache, so nothing is merged twice. Stops quietly at the first refusal (e.g. the mount
/// or the view is gone). GGUF files are left out: they are another encoding of the same
/// model, read by other loaders, and warming them too would hold the model in the page
/// cache once per format; they are computed as read, with read-ahead.
fn warm(view: &View, notifier: &fuser::Notifier, dir: &Path, root: u64) {
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; WARM_CHUNK];
    let mut stored = 0u64;
    let served =
        (view.files.iter().enumerate()).filter(|(_, f)| f.rel.extension() != Some("gguf".as_ref()));
    for (index, file) in served {
        // The kernel keeps pages only for inodes it knows: look the file up first.
        if let Err(e) = std::fs::metadata(dir.join(&file.rel)) {
            return log::info!("warm-up stopped at {}: {e}", file.rel.display());
        }
        let ino = super::inodes::file_ino(view, root, index);
        let mut offset = 0;
        while offset < file.size {
            // Where the base is read around the page cache, its next bytes are read
            // meanwhile (as for any sequential reader).
            view.read_ahead(index, offset + WARM_CHUNK as u64);
            let n = match view.read_at(index, offset, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return log::warn!("warm-up stopped at {}: {e}", file.rel.display()),
            };
            if let Err(e) = notifier.store(fuser::INodeNo(ino), offset, &buf[..n]) {
                return log::info!("warm-up stopped at {}: {e}", file.rel.display());
            }
            offset += n as u64;
            stored += n as u64;
        }
    }
    log::info!(
        "warm-up of {}: {stored} bytes in the page cache after {:.2} s",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
}

/// Refuse a mount point that is missing, not a directory, not empty, or already mounted.
pub fn check_mountpoint(path: &Path) -> io::Result<()> {
    let fail = |kind: io::ErrorKind, what: &str| {
        Err(io::Error::new(
            kind,
            format!("mount point {}: {what}", path.display()),
        ))
    };
    let absolute = std::path::absolute(path)?;
    if find_mount(&absolute)?.is_some() {
        return fail(
            io::ErrorKind::AlreadyExists,
            "is already a mount point (lorafs unmount it first)",
        );
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return fail(e.kind(), "does not exist"),
        Err(e) => return fail(e.kind(), &e.to_string()),
        Ok(m) if !m.is_dir() => return fail(io::ErrorKind::NotADirectory, "is not a directory"),
        Ok(_) => {}
    }
    if std::fs::read_dir(path)?.next().is_some() {
        return fail(io::ErrorKind::DirectoryNotEmpty, "is not empty");
    }
    Ok(())
}

/// Unmount a lorafs mount; its serving process then exits. A mount that is busy (a file on
/// it open or mapped) is refused, unless `lazy`: then it is detached at once, as by
/// `umount -l` (`MNT_DETACH`), leaving the directory tree now while the programs that hold
/// its files keep reading them; its server exits when the last of them is closed.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let target = mount_target(mountpoint)?;
    match find_mount(&target)? {
        Some(info) if info.is_lorafs() => {}
        Some(info) => {
            return Err(io::Error::other(format!(
                "{} is a {} mount, not lorafs",
                target.display(),
                info.fstype
            )))
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not mounted", target.display()),
            ))
        }
    }
    let unmounted = if lazy {
        umount(&target, libc::MNT_DETACH)
    } else {
        umount_retrying_busy(&target)
    };
    match unmounted {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(&target, lazy),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} is busy (a file on it is open or mapped); close it, or detach the mount \
                 now with `lorafs unmount --lazy`",
                target.display()
            ),
        )),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("unmounting {} failed: {e}", target.display()),
        )),
    }
}

/// `umount(2)`, tried again for a short while when busy: a path walk that is under way
/// (the server's own warm-up looks each file up once; a shell completing a name) holds the
/// mount for an instant, and an unmount right after mounting should not fail for it. A file
/// that stays open keeps it busy to the end, and that is reported.
fn umount_retrying_busy(path: &Path) -> io::Result<()> {
    const ATTEMPTS: u32 = 20;
    for _ in 1..ATTEMPTS {
        match umount(path, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            other => return other,
        }
    }
    umount(path, 0)
}

pub(super) fn umount(path: &Path, flags: i32) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unprivileged users unmount through the setuid helper of the fuse package (`-z`: lazily).
fn fusermount_unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy { "-uz" } else { "-u" };
    for helper in ["fusermount3", "fusermount"] {
        if let Ok(status) = std::process::Command::new(helper)
            .arg(flags)
            .arg(path)
            .status()
        {
            return if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "{helper} {flags} {} failed",
                    path.display()
                )))
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "not root and no fusermount3 to unmount with",
    ))
}

/// Raise the read-ahead of the mount's backing device: the kernel offers FUSE only 128 KiB
/// at init, and larger read-ahead roughly triples cold sequential reads (BENCHMARKS.md).
/// Needs root; elsewhere the default stays, quietly.
fn set_read_ahead(mountpoint: &Path, kb: u32) {
    let device = match find_mount(mountpoint) {
        Ok(Some(info)) => info.device,
        _ => {
            return log::info!(
                "read-ahead: {} not found in mountinfo",
                mountpoint.display()
            )
        }
    };
    let knob = PathBuf::from(format!("/sys/class/bdi/{device}/read_ahead_kb"));
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => log::info!(
            "read-ahead of {} set to {kb} KiB ({})",
            mountpoint.display(),
            knob.display()
        ),
        Err(e) => log::info!(
            "read-ahead not raised ({}: {e}); using the kernel's default",
            knob.display()
        ),
    }
}
