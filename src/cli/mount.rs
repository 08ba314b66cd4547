//! `lorafs mount`: its arguments, and the server it runs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use lorafs::fuse::Live;
use lorafs::sd_notify::ServiceNotifier;
use lorafs::View;

use super::args::*;
use super::daemon::*;
use super::views::open_views;
use lorafs::fuse::Transport;

/// Mount the merged model read-only at MOUNTPOINT (FUSE).
#[derive(Args)]
pub(crate) struct MountArgs {
    #[command(flatten)]
    pub(crate) inputs: MergeArgs,
    #[command(flatten)]
    pub(crate) views: ViewArgs,
    /// An existing, empty directory.
    pub(crate) mountpoint: PathBuf,
    /// Threads serving FUSE requests (over FUSE over io_uring: on each CPU's queue, at most
    /// 64 in all).
    #[arg(long, default_value_t = default_threads())]
    pub(crate) threads: usize,
    /// Let users other than the one mounting read the mount (needs `user_allow_other`
    /// in /etc/fuse.conf when not root).
    #[arg(long)]
    pub(crate) allow_other: bool,
    /// Mount with `noexec`: no file in the mount can be executed, whatever its mode.
    #[arg(long)]
    pub(crate) noexec: bool,
    /// Read-ahead of the mount in KiB (0 keeps the kernel's 128 KiB). Needs root.
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_READ_AHEAD_KB)]
    pub(crate) read_ahead_kb: u32,
    /// Merge the whole model into the page cache in the background once mounted (with
    /// views: each view when a file of it is first opened): auto (when it fits in a
    /// quarter of RAM and no --gguf: which format a loader will read is not known, and
    /// warming the other would only compete with it), always or never. GGUF files are
    /// never warmed.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub(crate) warm: Warm,
    /// Stay attached and log to stderr; SIGINT or SIGTERM unmounts. Under systemd
    /// (`Type=notify`), tells it READY=1 once the mount serves and STOPPING=1 when it
    /// unmounts.
    #[arg(long)]
    pub(crate) foreground: bool,
    /// Requests the kernel may have in flight in the background (read-ahead and
    /// asynchronous reads) before it makes readers wait: FUSE's `max_background`.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BACKGROUND,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) max_background: u16,
    /// How requests travel between the kernel and lorafs: uring (FUSE over io_uring: Linux
    /// 6.14+ with the fuse module's enable_uring on, and root), dev (/dev/fuse), or auto
    /// (uring where it can be had, else dev, saying why in the log).
    #[arg(long, value_name = "HOW", default_value = "auto", env = "LORAFS_TRANSPORT",
          value_parser = parse_transport)]
    pub(crate) transport: Transport,
    /// In the background, append logs to this file (default: discard them).
    #[arg(long, value_name = "PATH")]
    pub(crate) log_file: Option<PathBuf>,
    /// Internal: the background server started by `mount` without --foreground.
    #[arg(long, hide = true)]
    pub(crate) daemon_child: bool,
}

fn parse_transport(name: &str) -> Result<Transport, String> {
    Transport::parse(name).ok_or_else(|| format!("one of {}", Transport::NAMES.join(", ")))
}

/// Run `lorafs mount`: in the background unless --foreground (returning once mounted), or
/// as the server itself, until unmounted. `command_line` is the lorafs command line that
/// asked for it (argv[0] included): a background server runs it again.
pub(crate) fn mount(args: MountArgs, command_line: &[OsString]) -> anyhow::Result<()> {
    let MountArgs {
        inputs,
        views,
        mountpoint,
        threads,
        allow_other,
        noexec,
        read_ahead_kb,
        warm,
        foreground,
        max_background,
        transport,
        log_file,
        daemon_child,
    } = args;
    if !foreground && !daemon_child {
        return spawn_background_server(command_line);
    }
    // First, before anything uses rayon: panics are logged and cost one request.
    lorafs::fuse::init_server_process();
    // Only the process systemd started tells it the mount is ready; a background server
    // never does (its parent removed NOTIFY_SOCKET, and it is not read here either).
    // A NOTIFY_SOCKET that is not an address costs the notifications, not the mount.
    let notify = match foreground && !daemon_child {
        true => ServiceNotifier::from_env().unwrap_or_else(|e| {
            log::warn!("not notifying systemd: {e}");
            None
        }),
        false => None,
    };
    // Validate everything before mounting, so a bad input mounts nothing.
    lorafs::fuse::check_mountpoint(&mountpoint)?;
    // Opened now, before the mount exists: a path that leads into the mount would
    // otherwise be looked up through it before it serves, and never answered.
    let log = match (daemon_child, &log_file) {
        (true, Some(path)) => Some(open_log_file(path, &mountpoint)?),
        _ => None,
    };
    one_malloc_arena();
    let (fs, live, warm_view) = open_filesystem(&inputs, &views, &mountpoint, warm, true)?;
    let options = lorafs::fuse::MountOptions {
        threads,
        allow_other,
        noexec,
        read_ahead_kb: (read_ahead_kb > 0).then_some(read_ahead_kb),
        warm: warm_view,
        notify: notify.map(Arc::new),
        max_background,
        transport,
    };
    lorafs::fuse::mount(fs, live, &mountpoint, &options, || {
        if daemon_child {
            detach_from_parent(log.as_ref());
        }
    })?;
    Ok(())
}

/// Check what `mount` would mount (the mount point, the base, every adapter and view)
/// without mounting: `mount.lorafs -f`.
pub(crate) fn check(args: &MountArgs) -> anyhow::Result<()> {
    lorafs::fuse::check_mountpoint(&args.mountpoint)?;
    open_filesystem(
        &args.inputs,
        &args.views,
        &args.mountpoint,
        Warm::Never,
        false,
    )?;
    Ok(())
}

/// The file system of the mount (its views, or its one merged model), and the view to
/// warm once mounted, if any. `reads`: it will serve reads (not a check), so the engine
/// prepares its read-ahead buffers (see [`MergeArgs::engine`]).
fn open_filesystem(
    inputs: &MergeArgs,
    views: &ViewArgs,
    mountpoint: &Path,
    warm: Warm,
    reads: bool,
) -> anyhow::Result<(lorafs::fuse::LorafsFs, Option<Live>, Option<Arc<View>>)> {
    if views.any() {
        let (fs, live) = open_views(inputs, views, mountpoint, warm, reads)?;
        return Ok((fs, Some(live), None));
    }
    let view = Arc::new(inputs.open(MOUNT_CACHE, reads)?);
    let warm = warm.wanted(!view.gguf.is_empty(), view.total_bytes());
    let fs = lorafs::fuse::LorafsFs::single(view.clone())?;
    Ok((fs, None, warm.then_some(view)))
}
