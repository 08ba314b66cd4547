//! The view control: how `lorafs view ls|add|set|rm MNT ...` reaches the server of a mount
//! and changes the merged models (views) it serves, while it serves them.
//!
//! - Transport: an abstract Unix stream socket (no file to create, leave behind or protect)
//!   named `lorafs-control/MAJ:MIN`, after the mount's device number in
//!   `/proc/self/mountinfo`. The number is the mount's own while it is mounted, and both
//!   sides find it from the mount point without stat'ing it. Abstract names belong to the
//!   network namespace, so the command must run in the server's.
//! - Trust, both ways, by `SO_PEERCRED`: the server answers only its own user and root
//!   (a listing reveals adapter paths too); the command talks only to a server running as
//!   root or as the user who mounted (`user_id=` in mountinfo), so another user who took
//!   the name first cannot pose as the server. Such a squatter keeps the server from
//!   binding: it logs so and serves the mount without control.
//! - Protocol ([`protocol`]): per connection, one JSON request line and one JSON response
//!   line, requests at most 1 MiB. The server handles one connection at a time (changes
//!   are serialized anyway) with 10 s read and write timeouts, so a stuck client holds it
//!   for 10 s at most.
//! - View names ([`check_view_name`]): a relative path of 1 to 8 components of
//!   `[A-Za-z0-9._+-]`, none starting with `.`, each at most 255 bytes (`chat`,
//!   `math/v2`). Specs ([`parse_spec`]): `ADAPTER[:WEIGHT]`, comma-separated, each as
//!   `--adapter` takes it; the command sends absolute directories.

mod client;
pub mod protocol;
mod server;
mod spec;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use client::{request, request_at, view_add, view_ls, view_rm, view_set, Error};
pub use protocol::{AdapterEntry, Request, Response, ViewEntry};
pub use server::{serve, serve_at, ControlServer};
pub use spec::{check_view_name, format_spec, parse_spec, ViewSpec};

/// What a [`ViewControl`] answers when its mount has no view registry (a single `--adapter`
/// merge); the command then says the mount was made without views.
pub const NO_VIEWS: &str = "this mount was made without views (--view/--views/--catalog)";

/// Where a view comes from: named on the command line or by `view add` (`Named`), found
/// in a catalog directory (`Catalog`), or an entry of the `--views` file (`File`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewSource {
    Named,
    Catalog,
    File,
}

/// One view as the server's registry lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewInfo {
    pub name: String,
    /// Adapter directories (absolute) and their weights, in merge order.
    pub adapters: Vec<(PathBuf, f64)>,
    pub source: ViewSource,
}

/// The server's view registry, as the control channel drives it. The server has checked
/// the caller, the name ([`check_view_name`]) and the adapters (at least one, absolute
/// directories, finite weights) before calling; errors are one-line messages shown to the
/// user as they are. A panic costs the request only (it is answered with an error).
pub trait ViewControl: Send + Sync + 'static {
    fn list(&self) -> Vec<ViewInfo>;
    /// Whether the mount was made with views (a mount of one merged model has none to list).
    fn has_views(&self) -> bool {
        true
    }
    /// A new view; an error if the name is taken.
    fn add(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String>;
    /// Replace the adapters of an existing view.
    fn set(&self, name: &str, adapters: Vec<(PathBuf, f64)>) -> Result<(), String>;
    fn remove(&self, name: &str) -> Result<(), String>;
}

/// The abstract socket name of the mount whose device is `device` (`MAJ:MIN`).
fn socket_name(device: &str) -> String {
    format!("lorafs-control/{device}")
}
