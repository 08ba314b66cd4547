//! The wire format: per connection, the command sends one request line and the server
//! answers one response line, both JSON.
//!
//! ```text
//! {"op":"ls"}
//! {"op":"add","name":"chat","adapters":[{"dir":"/l/chat","weight":1.0}]}
//! {"op":"set","name":"chat","adapters":[...]}      {"op":"rm","name":"chat"}
//! -> {"ok":true,"views":[{"name":..,"spec":..,"adapters":[..],"source":"named"}]}
//! -> {"ok":false,"error":"message"}
//! ```
//!
//! Every successful answer lists the views as they are after the request.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ViewInfo, ViewSource};

/// Longest request line taken: far above any real request (a few paths), low enough that a
/// client cannot make the server hold much memory.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Longest response line taken by the command: a listing of many thousands of views.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// An adapter of a view: its directory and weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterEntry {
    pub dir: String,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Ls,
    Add {
        name: String,
        adapters: Vec<AdapterEntry>,
    },
    Set {
        name: String,
        adapters: Vec<AdapterEntry>,
    },
    Rm {
        name: String,
    },
}

impl Request {
    /// The operation and the view it names, for logs.
    pub fn summary(&self) -> String {
        match self {
            Request::Ls => "ls".into(),
            Request::Add { name, .. } | Request::Set { name, .. } | Request::Rm { name } => {
                format!("{} {name:?}", self.op())
            }
        }
    }

    /// The operation, for logs and messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ls => "ls",
            Request::Add { .. } => "add",
            Request::Set { .. } => "set",
            Request::Rm { .. } => "rm",
        }
    }
}

/// A view as listed on the wire, and by `lorafs view ls --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewEntry {
    pub name: String,
    /// The adapters as a spec, `DIR:WEIGHT,...`.
    pub spec: String,
    pub adapters: Vec<AdapterEntry>,
    pub source: ViewSource,
}

impl From<&ViewInfo> for ViewEntry {
    fn from(view: &ViewInfo) -> ViewEntry {
        ViewEntry {
            name: view.name.clone(),
            spec: super::format_spec(view.adapters.iter().map(|(d, w)| (d.as_path(), *w))),
            // Paths the command sent are UTF-8; a `--view` path that is not shows lossily.
            adapters: view
                .adapters
                .iter()
                .map(|(dir, weight)| AdapterEntry {
                    dir: dir.to_string_lossy().into_owned(),
                    weight: *weight,
                })
                .collect(),
            source: view.source,
        }
    }
}

/// Adapters of a request as the registry takes them.
pub(super) fn adapter_paths(adapters: Vec<AdapterEntry>) -> Vec<(PathBuf, f64)> {
    adapters
        .into_iter()
        .map(|a| (PathBuf::from(a.dir), a.weight))
        .collect()
}

/// The server's answer: the views after the request, or why it was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireResponse", into = "WireResponse")]
pub enum Response {
    Views(Vec<ViewEntry>),
    Refused(String),
}

#[derive(Serialize, Deserialize)]
struct WireResponse {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    views: Option<Vec<ViewEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Response> for WireResponse {
    fn from(response: Response) -> WireResponse {
        match response {
            Response::Views(views) => WireResponse {
                ok: true,
                views: Some(views),
                error: None,
            },
            Response::Refused(error) => WireResponse {
                ok: false,
                views: None,
                error: Some(error),
            },
        }
    }
}

impl TryFrom<WireResponse> for Response {
    type Error = &'static str;

    fn try_from(wire: WireResponse) -> Result<Response, &'static str> {
        match wire {
            WireResponse {
                ok: true,
                views: Some(views),
                ..
            } => Ok(Response::Views(views)),
            WireResponse {
                ok: false,
                error: Some(error),
                ..
            } => Ok(Response::Refused(error)),
            _ => Err("a response needs \"ok\":true with \"views\", or \"ok\":false with \"error\""),
        }
    }
}

/// Why no line was read.
#[derive(Debug)]
pub enum LineError {
    /// More than the limit before a newline.
    TooLong,
    /// The peer closed without sending anything.
    Empty,
    Io(io::Error),
}

/// One line of at most `limit` bytes (the newline not counted), without its newline; a line
/// ended by the peer closing is taken too. Bytes after the newline are ignored.
pub fn read_line(from: impl Read, limit: usize) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    io::BufReader::new(from.take(limit as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(LineError::Io)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > limit {
        return Err(LineError::TooLong);
    } else if line.is_empty() {
        return Err(LineError::Empty);
    }
    Ok(line)
}

/// `message` as one JSON line, in a single write.
pub fn write_line(mut to: impl Write, message: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    to.write_all(&line)?;
    to.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
        let mut wire = Vec::new();
        write_line(&mut wire, value).unwrap();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(&read_line(&wire[..], MAX_REQUEST_BYTES).unwrap()).unwrap()
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let adapters = vec![
            AdapterEntry {
                dir: "/l/a b\n".into(),
                weight: 0.5,
            },
            AdapterEntry {
                dir: "/l/\u{e9}".into(),
                weight: -1.0,
            },
        ];
        for request in [
            Request::Ls,
            Request::Add {
                name: "x/y".into(),
                adapters: adapters.clone(),
            },
            Request::Set {
                name: "x".into(),
                adapters: adapters.clone(),
            },
            Request::Rm { name: "x".into() },
        ] {
            assert_eq!(round_trip(&request), request);
        }
        let views = Response::Views(vec![ViewEntry {
            name: "v".into(),
            spec: "/l/a b\n:0.5".into(),
            adapters,
            source: ViewSource::Catalog,
        }]);
        assert_eq!(round_trip(&views), views);
        let refused = Response::Refused("no".into());
        assert_eq!(round_trip(&refused), refused);
    }

    #[test]
    fn the_wire_format_is_as_documented() {
        let request: Request =
            serde_json::from_str(r#"{"op":"add","name":"a","adapters":[{"dir":"/d","weight":1}]}"#)
                .unwrap();
        assert_eq!(
            request,
            Request::Add {
                name: "a".into(),
                adapters: vec![AdapterEntry {
                    dir: "/d".into(),
                    weight: 1.0
                }]
            }
        );
        assert_eq!(
            serde_json::to_string(&Response::Refused("why".into())).unwrap(),
            r#"{"ok":false,"error":"why"}"#
        );
        let view = ViewInfo {
            name: "a".into(),
            adapters: vec![("/d".into(), 1.0), ("/e".into(), 0.5)],
            source: ViewSource::Named,
        };
        assert_eq!(
            serde_json::to_string(&Response::Views(vec![ViewEntry::from(&view)])).unwrap(),
            r#"{"ok":true,"views":[{"name":"a","spec":"/d:1,/e:0.5","adapters":[{"dir":"/d","weight":1.0},{"dir":"/e","weight":0.5}],"source":"named"}]}"#
        );
        for bad in [r#"{"ok":true}"#, r#"{"ok":false}"#, r#"{"views":[]}"#] {
            assert!(serde_json::from_str::<Response>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_are_bounded() {
        let limit = 8;
        assert_eq!(
            read_line(&b"12345678\nrest"[..], limit).unwrap(),
            b"12345678"
        );
        assert_eq!(read_line(&b"closed"[..], limit).unwrap(), b"closed");
        assert!(matches!(
            read_line(&b"123456789\n"[..], limit),
            Err(LineError::TooLong)
        ));
        // Never reads past the limit: an endless sender is cut off.
        assert!(matches!(
            read_line(io::repeat(b'x'), MAX_REQUEST_BYTES),
            Err(LineError::TooLong)
        ));
        assert!(matches!(read_line(&b""[..], limit), Err(LineError::Empty)));
    }
}
