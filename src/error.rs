//! The core's error type. Every message names the file (and the tensor, where there is one)
//! and says what is wrong, so a user can act on it without a debugger.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the core (layout, adapters, merge plan, reads).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be opened, read or written.
    #[error("{}: {}", OneLine(path.display()), OneLine(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index, adapter config) could not be parsed.
    #[error("{}: invalid JSON: {}", OneLine(path.display()), OneLine(source))]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file parsed but does not have the expected content.
    #[error("{}: {}", OneLine(path.display()), OneLine(what))]
    BadConfig { path: PathBuf, what: String },
    /// A safetensors file whose header is corrupt, truncated or inconsistent with its size.
    #[error("{}: corrupt safetensors file: {}", OneLine(path.display()), OneLine(what))]
    BadSafetensors { path: PathBuf, what: String },
    /// A tensor-level problem: unmapped adapter key, shape mismatch, unsupported dtype...
    #[error("{}: tensor `{}`: {}", OneLine(path.display()), OneLine(tensor), OneLine(what))]
    Tensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },
    /// An adapter that lorafs deliberately refuses, with the reason and what to do instead.
    #[error("{}: unsupported adapter: {}", OneLine(path.display()), OneLine(what))]
    Unsupported { path: PathBuf, what: String },
    /// The output path of `materialize` cannot be used.
    #[error("{}: {}", OneLine(path.display()), OneLine(what))]
    Output { path: PathBuf, what: String },
    /// An input file changed (rewritten in place, truncated, or replaced) since lorafs opened
    /// it: serving it further could mix two versions.
    #[error("{}: changed since lorafs opened it ({}); remount (or rerun) to use the new version", OneLine(path.display()), OneLine(what))]
    Changed { path: PathBuf, what: String },
    /// A model that lorafs cannot show as GGUF (an architecture or tokenizer it does not
    /// convert), with the reason and what to do instead.
    #[error("{}: no GGUF view: {}", OneLine(path.display()), OneLine(what))]
    NoGguf { path: PathBuf, what: String },
    /// A read asked for a file id that does not exist.
    #[error("no file with id {0}")]
    NoSuchFile(usize),
    /// An error from a block computation that several readers waited on.
    #[error(transparent)]
    Shared(#[from] std::sync::Arc<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Text shown in a message with its control characters escaped (`\n`, `\u{1b}`): file and
/// tensor names, and the parsers' messages that quote them, come from input files, and a
/// newline or a terminal escape in one must not split the message or reach the terminal.
struct OneLine<T>(T);

impl<T: fmt::Display> fmt::Display for OneLine<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    if c.is_control() {
                        write!(self.0, "{}", c.escape_default())?;
                    } else {
                        fmt::Write::write_char(self.0, c)?;
                    }
                }
                Ok(())
            }
        }
        fmt::write(&mut Escaping(f), format_args!("{}", self.0))
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn tensor(
        path: impl AsRef<Path>,
        tensor: impl Into<String>,
        what: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.into(),
            what: what.into(),
        }
    }

    pub fn config(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::BadConfig {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    pub fn unsupported(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    pub fn no_gguf(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::NoGguf {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    /// The errno a filesystem read should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NoSuchFile(_) => libc::ENOENT,
            Error::Shared(inner) => inner.errno(),
            Error::Json { .. }
            | Error::BadConfig { .. }
            | Error::BadSafetensors { .. }
            | Error::Tensor { .. }
            | Error::Unsupported { .. }
            | Error::NoGguf { .. }
            | Error::Output { .. }
            | Error::Changed { .. } => libc::EIO,
        }
    }
}

/// The largest JSON file of a base read (`config.json`, the shard index): the index of a
/// model with thousands of shards is a few MiB; the cap bounds a hostile one.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// Read a whole JSON file into a typed value, with the file named in any error. Only a
/// regular file of at most 64 MiB is read.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = crate::baseio::read_small(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
