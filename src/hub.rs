//! Model and adapter arguments given as Hugging Face repo ids (`org/name`, optionally
//! `@revision`), resolved in the local Hugging Face cache only: lorafs never downloads.
//!
//! Cache layout (huggingface_hub): `HF_HUB_CACHE` (default `HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) holds `models--org--name/refs/REV` (a file with a commit
//! hash) and `models--org--name/snapshots/COMMIT/` (the files, as links to blobs).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache directory huggingface_hub would use, from the environment.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Some(dir.into());
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(home).join("hub"));
    }
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let cache =
        xdg.or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("huggingface").join("hub"))
}

/// An argument as given: an existing directory is used as is; otherwise a repo id
/// `org/name[@revision]` is looked up in the cache.
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let (repo, revision) = match text.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (&*text, "main"),
    };
    let is_repo_id = !repo.is_empty()
        && repo.split('/').count() <= 2
        && repo
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !repo.starts_with('/')
        && !revision.is_empty();
    if !is_repo_id {
        // A path, not a repo id: report what the filesystem says about it.
        return match std::fs::metadata(arg) {
            Err(e) => Err(Error::io(arg, e)),
            Ok(_) => Err(Error::io(arg, std::io::Error::other("not a directory"))),
        };
    }
    let Some(cache) = cache_dir() else {
        return Err(not_cached(
            arg,
            "no cache directory (HF_HUB_CACHE, HF_HOME and HOME are unset)",
        ));
    };
    resolve_in(&cache, repo, revision).map_err(|what| not_cached(arg, &what))
}

fn not_cached(arg: &Path, what: &str) -> Error {
    Error::config(
        arg,
        format!(
            "not a directory, and not in the local Hugging Face cache: {what}; lorafs never downloads \
             (fetch it first, e.g. `hf download {}`)",
            arg.to_string_lossy().split('@').next().unwrap_or_default()
        ),
    )
}

/// Find `repo` at `revision` under `cache`; the error says what is missing.
pub fn resolve_in(
    cache: &Path,
    repo: &str,
    revision: &str,
) -> std::result::Result<PathBuf, String> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !folder.is_dir() {
        return Err(format!("{} does not exist", folder.display()));
    }
    let snapshots = folder.join("snapshots");
    let commit = match std::fs::read_to_string(folder.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        // A commit hash (or its prefix) names a snapshot directly.
        Err(_) => revision.to_string(),
    };
    let exact = snapshots.join(&commit);
    if exact.is_dir() {
        return Ok(exact);
    }
    if commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()) {
        let matches: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&commit))
            .map(|e| e.path())
            .collect();
        if let [only] = matches.as_slice() {
            return Ok(only.clone());
        }
    }
    let available: Vec<String> = std::fs::read_dir(&snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Err(format!(
        "revision {revision:?} is not in {} (snapshots: {})",
        folder.display(),
        if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        }
    ))
}
