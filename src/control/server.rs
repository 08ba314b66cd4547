//! The server side: a thread that answers the view control of one mount.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{self, LineError, Request, Response, ViewEntry, MAX_REQUEST_BYTES};
use super::spec::{check_adapters, check_view_name};
use super::ViewControl;
use crate::mountinfo::{find_mount, mount_target};

/// How long one client may take to send its request or take the answer: a client that
/// stalls holds the (one) control thread this long at most.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binding is retried this long when the name is taken: the server of an earlier mount that
/// had the same device number may still be exiting.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// The running control of a mount. Dropping it stops the thread (after the request under
/// way, if any) and frees the name.
pub struct ControlServer {
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket_name: String,
}

impl ControlServer {
    /// The abstract socket name served.
    pub fn socket_name(&self) -> &str {
        &self.socket_name
    }

    /// Stop serving, as dropping does.
    pub fn stop(self) {}
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept: on Linux, accept on a listening socket shut down for
        // reading fails with EINVAL at once.
        if let Err(e) = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Read) {
            log::warn!("control @{}: shutdown failed: {e}", self.socket_name);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("control @{}: the thread panicked", self.socket_name);
            }
        }
    }
}

/// Serve the view control of the mount at `mountpoint`, which must be mounted already (its
/// device number names the socket; the mount point is not stat'ed, so this may run before
/// the session answers requests). An error (the name is taken, e.g. by another user) means
/// the mount serves without control: log it and go on.
pub fn serve(mountpoint: &Path, control: Arc<dyn ViewControl>) -> io::Result<ControlServer> {
    let target = mount_target(mountpoint)?;
    let Some(mount) = find_mount(&target)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "view control: {} is not mounted (not in mountinfo)",
                target.display()
            ),
        ));
    };
    serve_at(&super::socket_name(&mount.device), control)
}

/// Serve the view control on the abstract socket `socket_name` (tests pick their own).
pub fn serve_at(socket_name: &str, control: Arc<dyn ViewControl>) -> io::Result<ControlServer> {
    let listener = Arc::new(bind(socket_name)?);
    let stopping = Arc::new(AtomicBool::new(false));
    let server = Server {
        control,
        owner: rustix::process::geteuid().as_raw(),
        socket_name: socket_name.to_string(),
    };
    let thread = {
        let (listener, stopping) = (listener.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("lorafs-control".into())
            .spawn(move || server.run(&listener, &stopping))?
    };
    log::info!("view control listening on @{socket_name}");
    Ok(ControlServer {
        listener,
        stopping,
        thread: Some(thread),
        socket_name: socket_name.to_string(),
    })
}

fn bind(socket_name: &str) -> io::Result<UnixListener> {
    let address = SocketAddr::from_abstract_name(socket_name.as_bytes())?;
    let deadline = std::time::Instant::now() + BIND_RETRY;
    loop {
        match UnixListener::bind_addr(&address) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "view control: the socket name @{socket_name} is taken by another \
                             process; views cannot be changed while this mount serves"
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

struct Server {
    control: Arc<dyn ViewControl>,
    /// The server's effective uid: with root, the one user answered.
    owner: u32,
    socket_name: String,
}

impl Server {
    fn run(&self, listener: &UnixListener, stopping: &AtomicBool) {
        loop {
            let accepted = listener.accept();
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            match accepted {
                // A bug in a connection's handling must not end the control.
                Ok((stream, _)) => {
                    if catch_unwind(AssertUnwindSafe(|| self.handle(stream))).is_err() {
                        log::error!("control @{}: a connection panicked", self.socket_name);
                    }
                }
                Err(e) => {
                    // Out of descriptors or memory: wait a little rather than spin.
                    log::warn!("control @{}: accept failed: {e}", self.socket_name);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn allows(&self, uid: u32) -> bool {
        uid == self.owner || uid == 0
    }

    fn handle(&self, stream: UnixStream) {
        let uid = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(cred) => cred.uid.as_raw(),
            Err(e) => return log::warn!("control: no peer credentials: {e}"),
        };
        if let Err(e) = stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        {
            return log::warn!("control: cannot set timeouts: {e}");
        }
        // Refused before reading anything: a stranger cannot hold the thread.
        let response = if !self.allows(uid) {
            log::warn!(
                "control: refused uid {uid} (not uid {} or root)",
                self.owner
            );
            Response::Refused(format!(
                "permission denied: only the user who mounted it (uid {}) or root may use \
                 its view control",
                self.owner
            ))
        } else {
            match protocol::read_line(&stream, MAX_REQUEST_BYTES) {
                Ok(line) => self.answer_line(&line, uid),
                Err(LineError::TooLong) => Response::Refused(format!(
                    "request refused: longer than {MAX_REQUEST_BYTES} bytes"
                )),
                Err(LineError::Empty) => return,
                Err(LineError::Io(e)) => return log::info!("control: uid {uid}: {e}"),
            }
        };
        if let Err(e) = protocol::write_line(&stream, &response) {
            log::info!("control: uid {uid}: answer not delivered: {e}");
        }
    }

    fn answer_line(&self, line: &[u8], uid: u32) -> Response {
        let request: Request = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(e) => return Response::Refused(format!("malformed request: {e}")),
        };
        let (op, what) = (request.op(), request.summary());
        match catch_unwind(AssertUnwindSafe(|| answer(&*self.control, request))) {
            Ok(Response::Refused(why)) => {
                log::info!("control: uid {uid}: {what} refused: {why}");
                Response::Refused(why)
            }
            Ok(views) => {
                if op != "ls" {
                    log::info!("control: uid {uid}: {what} done");
                }
                views
            }
            // The panic hook of a server process has logged where.
            Err(_) => {
                log::error!("control: uid {uid}: {what} panicked; the control keeps serving");
                Response::Refused(format!(
                    "internal error: the server failed on this {op} request (see its log)"
                ))
            }
        }
    }
}

/// Check a request and carry it out; the views after it, sorted by name.
fn answer(control: &dyn ViewControl, request: Request) -> Response {
    let done = match request {
        Request::Ls if !control.has_views() => Err(super::NO_VIEWS.into()),
        Request::Ls => Ok(()),
        Request::Add { name, adapters } => {
            let adapters = protocol::adapter_paths(adapters);
            check_view_name(&name)
                .and_then(|()| check_adapters(&adapters))
                .and_then(|()| control.add(&name, adapters))
        }
        Request::Set { name, adapters } => {
            let adapters = protocol::adapter_paths(adapters);
            check_view_name(&name)
                .and_then(|()| check_adapters(&adapters))
                .and_then(|()| control.set(&name, adapters))
        }
        Request::Rm { name } => check_view_name(&name).and_then(|()| control.remove(&name)),
    };
    match done {
        Ok(()) => {
            let mut views: Vec<ViewEntry> = control.list().iter().map(ViewEntry::from).collect();
            views.sort_by(|a, b| a.name.cmp(&b.name));
            Response::Views(views)
        }
        Err(why) => Response::Refused(why),
    }
}
