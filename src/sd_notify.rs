//! Readiness for systemd (`Type=notify`): the `sd_notify(3)` protocol, which is one datagram
//! of `KEY=VALUE` lines sent to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! A few lines over std's Unix datagram socket rather than a crate: the protocol is that
//! small, and the abstract socket names systemd uses (`@...`) are in std on Linux.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable systemd sets for a `Type=notify` service's main process.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The service manager's notification socket, for the process systemd started.
pub struct ServiceNotifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    stopping_sent: AtomicBool,
}

impl ServiceNotifier {
    /// The notifier of `$NOTIFY_SOCKET`, or `None` when it is not set (not run by systemd,
    /// or by a unit that is not `Type=notify`). A value that is not a usable socket address
    /// is an error naming it.
    pub fn from_env() -> io::Result<Option<ServiceNotifier>> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(name) if !name.is_empty() => ServiceNotifier::connect(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `name`: a path, or `@name` for an abstract socket (Linux).
    pub fn connect(name: &std::ffi::OsStr) -> io::Result<ServiceNotifier> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("{NOTIFY_SOCKET}={}: {e}", name.to_string_lossy()),
            )
        };
        let bytes = name.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => abstract_addr(abstract_name).map_err(bad)?,
            None if bytes.starts_with(b"/") => SocketAddr::from_pathname(name).map_err(bad)?,
            None => {
                return Err(bad(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an abstract name (@...)",
                )))
            }
        };
        Ok(ServiceNotifier {
            socket: UnixDatagram::unbound().map_err(bad)?,
            addr,
            stopping_sent: AtomicBool::new(false),
        })
    }

    /// Send `state`: newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }

    /// `READY=1`: the service is up (here: the mount serves).
    pub fn ready(&self, status: &str) {
        self.log_failure(self.send(&format!("READY=1\nSTATUS={status}")));
    }

    /// `STOPPING=1`, once, however many times the service starts to stop (a signal, then
    /// the end of the session it causes).
    pub fn stopping(&self, status: &str) {
        if !self.stopping_sent.swap(true, Ordering::SeqCst) {
            self.log_failure(self.send(&format!("STOPPING=1\nSTATUS={status}")));
        }
    }

    /// A lost notification is logged, not fatal: the service still serves, and systemd's
    /// start timeout says the rest.
    fn log_failure(&self, result: io::Result<()>) {
        if let Err(e) = result {
            log::warn!("cannot notify systemd ({NOTIFY_SOCKET}): {e}");
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn received(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_then_stopping_once_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = ServiceNotifier::connect(path.as_os_str()).unwrap();
        notifier.ready("serving");
        assert_eq!(received(&listener), "READY=1\nSTATUS=serving");
        notifier.stopping("unmounting");
        notifier.stopping("again");
        assert_eq!(received(&listener), "STOPPING=1\nSTATUS=unmounting");
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(listener.recv(&mut buf).is_err(), "STOPPING=1 sent once");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_names_start_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("lorafs-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = ServiceNotifier::connect(format!("@{name}").as_ref()).unwrap();
        notifier.ready("up");
        assert_eq!(received(&listener), "READY=1\nSTATUS=up");
    }

    #[test]
    fn a_relative_name_is_refused_naming_it() {
        let err = ServiceNotifier::connect("notify.sock".as_ref())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("NOTIFY_SOCKET=notify.sock"),
            "{err}"
        );
    }
}
