//! The command side: `lorafs view ls|add|set|rm MNT ...`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{self, AdapterEntry, LineError, Request, Response, ViewEntry};
use super::spec::{check_view_name, parse_spec};
use super::ViewSource;
use crate::mountinfo::{find_mount, mount_target};

/// How long the command waits for the answer. An `add` or `set` opens and checks adapters
/// before answering, seconds for large ones; a server silent for this long is stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a view command failed; each message names the mount as the user gave it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is not a lorafs mount ({why})", .mountpoint.display())]
    NotLorafs { mountpoint: PathBuf, why: String },
    #[error("{} was mounted without views (--view/--views/--catalog)", .0.display())]
    NoViews(PathBuf),
    #[error(
        "permission denied: only the user who mounted {} ({}) or root may {action} its views",
        .mountpoint.display(), uid_text(*.owner)
    )]
    PermissionDenied {
        mountpoint: PathBuf,
        owner: Option<u32>,
        /// `list` or `change`.
        action: &'static str,
    },
    /// The name is served by a process of another user: not to be trusted with a request.
    #[error(
        "the control socket of {} belongs to a process of uid {uid}, neither root nor the \
         user who mounted it ({}): refusing to talk to it",
        .mountpoint.display(), uid_text(*.owner)
    )]
    Impostor {
        mountpoint: PathBuf,
        uid: u32,
        owner: Option<u32>,
    },
    #[error("the lorafs server of {} does not answer ({why})", .mountpoint.display())]
    NoAnswer { mountpoint: PathBuf, why: String },
    /// The server refused the request; `message` is its reason.
    #[error("{}: {message}", .mountpoint.display())]
    Refused {
        mountpoint: PathBuf,
        message: String,
    },
    /// A view name or spec the command was given.
    #[error("{0}")]
    Usage(String),
    /// An adapter of the spec could not be found.
    #[error(transparent)]
    Adapter(#[from] crate::Error),
    #[error("{}: {source}", .mountpoint.display())]
    Io {
        mountpoint: PathBuf,
        source: io::Error,
    },
}

fn uid_text(uid: Option<u32>) -> String {
    match uid {
        Some(uid) => format!("uid {uid}"),
        None => "uid unknown".into(),
    }
}

/// Send `request` to the server of the lorafs mount at `mountpoint`, found through
/// mountinfo (never stat'ed: its server may be stuck). Refused early, without a
/// connection, when this user could not be answered.
pub fn request(mountpoint: &Path, request: &Request) -> Result<Response, Error> {
    let io_error = |source| Error::Io {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    let target = mount_target(mountpoint).map_err(io_error)?;
    let not_lorafs = |why: String| Error::NotLorafs {
        mountpoint: mountpoint.to_path_buf(),
        why,
    };
    let mount = match find_mount(&target).map_err(io_error)? {
        None => return Err(not_lorafs("nothing is mounted there".into())),
        Some(mount) if !mount.is_lorafs() => {
            return Err(not_lorafs(format!("it is a {} mount", mount.fstype)))
        }
        Some(mount) => mount,
    };
    let owner = mount.user_id();
    let me = rustix::process::geteuid().as_raw();
    if me != 0 && Some(me) != owner {
        return Err(Error::PermissionDenied {
            mountpoint: mountpoint.to_path_buf(),
            owner,
            action: if *request == Request::Ls {
                "list"
            } else {
                "change"
            },
        });
    }
    request_at(
        &super::socket_name(&mount.device),
        mountpoint,
        owner,
        request,
    )
}

/// Send `request` on the abstract socket `socket_name`, trusting a server that runs as
/// root or as `owner`; `mountpoint` only names the mount in errors.
pub fn request_at(
    socket_name: &str,
    mountpoint: &Path,
    owner: Option<u32>,
    request: &Request,
) -> Result<Response, Error> {
    let no_answer = |why: String| Error::NoAnswer {
        mountpoint: mountpoint.to_path_buf(),
        why,
    };
    let address = SocketAddr::from_abstract_name(socket_name.as_bytes())
        .map_err(|e| no_answer(e.to_string()))?;
    let stream = UnixStream::connect_addr(&address).map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            no_answer("no view control: the server is gone, or too old to have one".into())
        }
        _ => no_answer(e.to_string()),
    })?;
    let uid = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(|e| no_answer(format!("no peer credentials: {e}")))?
        .uid
        .as_raw();
    if uid != 0 && Some(uid) != owner {
        return Err(Error::Impostor {
            mountpoint: mountpoint.to_path_buf(),
            uid,
            owner,
        });
    }
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| no_answer(e.to_string()))?;
    // A server that refuses this user answers without reading: its answer is what counts.
    let sent = protocol::write_line(&stream, request);
    let line = match protocol::read_line(&stream, protocol::MAX_RESPONSE_BYTES) {
        Ok(line) => line,
        Err(LineError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(no_answer(format!(
                "no answer in {} s",
                ANSWER_TIMEOUT.as_secs()
            )))
        }
        Err(LineError::Io(e)) => return Err(no_answer(e.to_string())),
        Err(LineError::Empty) => {
            let why = match sent {
                Err(e) => format!("sending the request failed: {e}"),
                Ok(()) => "it closed the connection without answering".into(),
            };
            return Err(no_answer(why));
        }
        Err(LineError::TooLong) => return Err(no_answer("its answer is too long".into())),
    };
    serde_json::from_slice(&line).map_err(|e| no_answer(format!("malformed answer: {e}")))
}

/// The views after `request`, or the server's refusal as an error.
fn views(mountpoint: &Path, request: &Request) -> Result<Vec<ViewEntry>, Error> {
    match self::request(mountpoint, request)? {
        Response::Views(mut views) => {
            views.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(views)
        }
        Response::Refused(message) if message == super::NO_VIEWS => {
            Err(Error::NoViews(mountpoint.to_path_buf()))
        }
        Response::Refused(message) => Err(Error::Refused {
            mountpoint: mountpoint.to_path_buf(),
            message,
        }),
    }
}

/// `lorafs view ls`: the text to print, `NAME  SPEC` a line sorted by name, or with
/// `json` an array of [`ViewEntry`]. A mount of one merged model is [`Error::NoViews`] in
/// text (the caller says so) and an empty array in JSON.
pub fn view_ls(mountpoint: &Path, json: bool) -> Result<String, Error> {
    match views(mountpoint, &Request::Ls) {
        Err(Error::NoViews(_)) if json => Ok(listing(&[], json)),
        listed => Ok(listing(&listed?, json)),
    }
}

fn listing(views: &[ViewEntry], json: bool) -> String {
    if json {
        // Serializing plain strings and finite numbers cannot fail.
        let mut text = serde_json::to_string_pretty(views).unwrap_or_default();
        text.push('\n');
        return text;
    }
    views
        .iter()
        .map(|view| {
            let source = match view.source {
                ViewSource::Named => "",
                ViewSource::Catalog => "  (catalog)",
                ViewSource::File => "  (views file)",
            };
            format!("{}  {}{source}\n", view.name, view.spec)
        })
        .collect()
}

/// `lorafs view add`: a new view NAME of the adapters in SPEC.
pub fn view_add(mountpoint: &Path, name: &str, spec: &str) -> Result<(), Error> {
    check_view_name(name).map_err(Error::Usage)?;
    let adapters = resolve_spec(spec)?;
    let name = name.to_string();
    views(mountpoint, &Request::Add { name, adapters }).map(drop)
}

/// `lorafs view set`: view NAME now merges the adapters in SPEC.
pub fn view_set(mountpoint: &Path, name: &str, spec: &str) -> Result<(), Error> {
    check_view_name(name).map_err(Error::Usage)?;
    let adapters = resolve_spec(spec)?;
    let name = name.to_string();
    views(mountpoint, &Request::Set { name, adapters }).map(drop)
}

/// `lorafs view rm`: view NAME is no longer served.
pub fn view_rm(mountpoint: &Path, name: &str) -> Result<(), Error> {
    check_view_name(name).map_err(Error::Usage)?;
    let name = name.to_string();
    views(mountpoint, &Request::Rm { name }).map(drop)
}

/// The adapters of `spec` as the server takes them: existing directories (repo ids found
/// in the local cache), absolute from this command's working directory.
fn resolve_spec(spec: &str) -> Result<Vec<AdapterEntry>, Error> {
    let adapters = parse_spec(spec).map_err(Error::Usage)?;
    crate::args::resolve_adapters(&adapters)?
        .into_iter()
        .map(|(dir, weight)| {
            let absolute = dir.canonicalize().map_err(|e| crate::Error::io(&dir, e))?;
            let dir = absolute.to_str().ok_or_else(|| {
                Error::Usage(format!(
                    "adapter {}: only UTF-8 paths can be sent",
                    absolute.display()
                ))
            })?;
            Ok(AdapterEntry {
                dir: dir.to_string(),
                weight,
            })
        })
        .collect()
}
