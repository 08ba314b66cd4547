//! `mount` in the background: the server it starts, and how the server leaves its parent.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;

/// The line a background server prints on stdout once its mount is usable.
pub(crate) const READY: &str = "lorafs-ready";

/// The background server's `--log-file`, once open.
static LOG_FILE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
/// Set once the server's stderr is the log file (or `/dev/null`).
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where log lines go: stderr, and a background server's `--log-file` from the moment it is
/// open, so that what the server says while it starts (the transport it serves through,
/// the kernel's settings, warnings about its inputs) is in the log file too. Until the
/// server detaches, stderr is the pipe to the `lorafs mount` that started it, which shows
/// the last lines when the server fails; afterwards it is the log file itself, written once.
pub(crate) struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let detached = DETACHED.load(std::sync::atomic::Ordering::Acquire);
        if let Some(mut file) = LOG_FILE.get() {
            file.write_all(line)?;
            if detached {
                return Ok(line.len());
            }
        }
        std::io::stderr().write_all(line)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The server allocates about 1 MiB blocks from several threads; with glibc's default of
/// one arena per thread, freed blocks stay spread over arenas and resident memory ends tens
/// of MiB above the cache budget. One arena is enough at this allocation rate.
pub(crate) fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before the server starts threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `mount` without --foreground: run the same command (`command_line`, argv[0] included) as
/// a background server in its own session and return once it reports the mount ready, or
/// fail with its error.
pub(crate) fn spawn_background_server(command_line: &[OsString]) -> anyhow::Result<()> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().context("cannot find the lorafs executable")?;
    let mut command = Command::new(exe);
    command
        // Named lorafs whatever this process was called: a copy of the binary installed as
        // mount.lorafs must not read the server's arguments as mount(8)'s.
        .arg0("lorafs")
        .args(server_args(command_line))
        // The server is not the process systemd started: a unit whose main process runs
        // `lorafs mount` in the background must not hear READY=1 from another pid.
        .env_remove(lorafs::sd_notify::NOTIFY_SOCKET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it detaches the server from the terminal's
    // session so that closing the terminal or Ctrl-C does not kill the mount.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .context("cannot start the background server")?;
    // Read stderr while waiting for the ready line: a server that logs more than a pipe
    // holds (64 KiB) before it is ready would otherwise block on it, and `mount` with it.
    let stderr = child
        .stderr
        .take()
        .context("no stderr pipe to the server")?;
    let collector = std::thread::spawn(move || StderrTail::collect(stderr));
    let stdout = child
        .stdout
        .take()
        .context("no stdout pipe to the server")?;
    let mut line = Vec::new();
    // Bounded: the server prints nothing else on stdout before the ready line.
    stdout.take(READY.len() as u64 + 1).read_to_end(&mut line)?;
    if line == format!("{READY}\n").as_bytes() {
        return Ok(());
    }
    let tail = collector.join().unwrap_or_default();
    let status = child.wait()?;
    match tail.error_message() {
        Some(message) => anyhow::bail!("{message}"),
        None => anyhow::bail!("mount failed ({status})"),
    }
}

/// The server's arguments: the command's, with `--daemon-child` right after the `mount`
/// subcommand, where it is an option even when the command line ends in `-- BASE MNT`.
fn server_args(command_line: &[OsString]) -> Vec<OsString> {
    let mut args: Vec<OsString> = command_line.iter().skip(1).cloned().collect();
    let at = args
        .iter()
        .position(|a| a == "mount")
        .map_or(args.len(), |i| i + 1);
    args.insert(at, "--daemon-child".into());
    args
}

/// The last bytes a background server wrote to stderr: enough for its error, bounded
/// whatever it logs.
#[derive(Default)]
pub(crate) struct StderrTail(Vec<u8>);

impl StderrTail {
    /// Bytes kept (up to twice as many between trims): the error comes last, and a few lines
    /// before it say what led there.
    const KEEP: usize = 16 << 10;

    pub(crate) fn collect(mut from: impl std::io::Read) -> StderrTail {
        let mut tail = StderrTail::default();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return tail,
                Ok(n) => tail.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The server is gone: what it wrote so far is all there is.
                Err(_) => return tail,
            }
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * Self::KEEP {
            self.0.drain(..self.0.len() - Self::KEEP);
        }
    }

    /// The server's error line (`lorafs: error: ...`, printed last), else whatever it
    /// printed last (a panic, a log line), else `None`.
    pub(crate) fn error_message(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0);
        let prefix = "lorafs: error: ";
        let last_error = text.lines().rev().find_map(|l| l.strip_prefix(prefix));
        let message = match last_error {
            Some(error) => error.to_string(),
            None => text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())?
                .to_string(),
        };
        Some(message.trim().to_string())
    }
}

/// The background server's `--log-file`, opened for appending before anything is mounted.
/// A path inside the mount point is refused (once mounted, it would be a file of the
/// read-only mount, or hidden under it), and a FIFO without a reader fails instead of
/// blocking the open for ever.
pub(crate) fn open_log_file(path: &Path, mountpoint: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let inside = |dir: &Path| {
        let dir = dir.canonicalize().ok();
        dir.zip(mountpoint.canonicalize().ok())
            .is_some_and(|(dir, mnt)| dir.starts_with(mnt))
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if inside(parent) || inside(path) {
        anyhow::bail!(
            "log file {} is inside the mount point {}: name one outside it",
            path.display(),
            mountpoint.display()
        );
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    // Writes block as usual once open (a FIFO's reader that is slow holds back the log).
    // SAFETY: F_GETFL/F_SETFL on a descriptor owned by `file`, which outlives the calls.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    if let Ok(logger_copy) = file.try_clone() {
        let _ = LOG_FILE.set(logger_copy);
    }
    Ok(file)
}

/// In the background server, once mounted: point stderr at the log file (or /dev/null), tell
/// the parent, then point stdout there too, so the server never writes to a pipe whose
/// reader has gone (or stopped reading).
pub(crate) fn detach_from_parent(log: Option<&std::fs::File>) {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    let null = match log {
        Some(_) => None,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .ok(),
    };
    let redirect = |fd: i32| {
        if let Some(file) = log.or(null.as_ref()) {
            // SAFETY: dup2 onto a standard descriptor with a descriptor we own; `file` stays
            // open for the duration of the call.
            unsafe { libc::dup2(file.as_raw_fd(), fd) };
        }
    };
    redirect(2);
    DETACHED.store(true, std::sync::atomic::Ordering::Release);
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
    redirect(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_flag_goes_before_the_positional_arguments() {
        let line = |args: &[&str]| -> Vec<OsString> { args.iter().map(OsString::from).collect() };
        assert_eq!(
            server_args(&line(&[
                "lorafs",
                "mount",
                "--adapter",
                "a",
                "--",
                "b",
                "m"
            ])),
            line(&["mount", "--daemon-child", "--adapter", "a", "--", "b", "m"])
        );
        assert_eq!(
            server_args(&line(&["/x/lorafs", "mount", "b", "m", "-a", "a"])),
            line(&["mount", "--daemon-child", "b", "m", "-a", "a"])
        );
    }

    #[test]
    fn a_servers_stderr_is_kept_bounded_and_its_error_found() {
        let mut log = Vec::new();
        for i in 0..10_000 {
            log.extend_from_slice(format!("[WARN lorafs] warning number {i}\n").as_bytes());
        }
        log.extend_from_slice(b"lorafs: error: mount point /m: is not empty\n");
        let tail = StderrTail::collect(&log[..]);
        assert!(
            tail.0.len() <= 2 * StderrTail::KEEP,
            "{} bytes kept",
            tail.0.len()
        );
        assert_eq!(
            tail.error_message().as_deref(),
            Some("mount point /m: is not empty")
        );
        let panicked =
            StderrTail::collect(&b"[ERROR lorafs] thread main panicked at x.rs:1:2\n\n"[..]);
        assert_eq!(
            panicked.error_message().as_deref(),
            Some("[ERROR lorafs] thread main panicked at x.rs:1:2")
        );
        assert_eq!(StderrTail::collect(&b" \n"[..]).error_message(), None);
    }
}
