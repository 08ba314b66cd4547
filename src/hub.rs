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

/// A name that is one plain path component: joined to a directory, it stays inside.
fn plain_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Find `repo` at `revision` under `cache`; the error says what is missing. Nothing outside
/// the repo's folder is ever returned: a revision is a ref name (plain components, like
/// `main` or `refs/pr/1`) or a commit, a ref file holds a commit, and the snapshot found
/// must really be inside `snapshots/` (no link out of it).
pub fn resolve_in(
    cache: &Path,
    repo: &str,
    revision: &str,
) -> std::result::Result<PathBuf, String> {
    if !revision.split('/').all(plain_component) {
        return Err(format!(
            "revision {revision:?} is not a branch, tag or commit name"
        ));
    }
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !folder.is_dir() {
        return Err(format!("{} does not exist", folder.display()));
    }
    let snapshots = folder.join("snapshots");
    let ref_file = folder.join("refs").join(revision);
    // A ref holds a 40-character hash: 4 KiB is plenty, and a FIFO or device there fails.
    let commit = match crate::baseio::read_small(&ref_file, 4096) {
        Ok(hash) => String::from_utf8_lossy(&hash).trim().to_string(),
        // A commit hash (or its prefix) names a snapshot directly.
        Err(_) => revision.to_string(),
    };
    if !plain_component(&commit) {
        let what = if commit == revision {
            "is not a ref of this repo, nor a commit".to_string()
        } else {
            format!(
                "has a ref file {} holding {commit:?}, not a commit",
                ref_file.display()
            )
        };
        return Err(format!("revision {revision:?} {what}"));
    }
    let exact = snapshots.join(&commit);
    if exact.is_dir() {
        return inside(&snapshots, exact);
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
            return inside(&snapshots, only.clone());
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

/// `snapshot` if, with every link resolved, it is inside `snapshots`.
fn inside(snapshots: &Path, snapshot: PathBuf) -> std::result::Result<PathBuf, String> {
    let canonical = |p: &Path| {
        p.canonicalize()
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    if canonical(&snapshot)?.starts_with(canonical(snapshots)?) {
        Ok(snapshot)
    } else {
        Err(format!(
            "{} leads outside {}",
            snapshot.display(),
            snapshots.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache with `models--org--m`: a snapshot `abc1234`, refs/main → it, and refs/pr/1.
    fn cache() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("models--org--m");
        std::fs::create_dir_all(folder.join("snapshots/abc1234")).unwrap();
        std::fs::create_dir_all(folder.join("refs/refs/pr")).unwrap();
        std::fs::write(folder.join("refs/main"), "abc1234\n").unwrap();
        std::fs::write(folder.join("refs/refs/pr/1"), "abc1234").unwrap();
        tmp
    }

    #[test]
    fn revisions_resolve_to_snapshots() {
        let tmp = cache();
        let snapshot = tmp.path().join("models--org--m/snapshots/abc1234");
        for revision in ["main", "refs/pr/1", "abc1234", "abc12"] {
            let found = resolve_in(tmp.path(), "org/m", revision);
            if revision == "abc12" {
                // Too short a prefix to be a commit.
                assert!(found.is_err(), "{found:?}");
            } else {
                assert_eq!(found.unwrap(), snapshot, "{revision}");
            }
        }
    }

    #[test]
    fn revisions_and_refs_never_lead_out_of_the_cache() {
        let tmp = cache();
        let folder = tmp.path().join("models--org--m");
        for revision in ["..", "../..", "main/../..", "/etc", ".", "a//b"] {
            let err = resolve_in(tmp.path(), "org/m", revision).unwrap_err();
            assert!(
                err.contains("is not a branch, tag or commit"),
                "{revision}: {err}"
            );
        }
        // A ref file holding a path instead of a commit.
        std::fs::write(folder.join("refs/evil"), "../../x").unwrap();
        std::fs::create_dir_all(tmp.path().join("x")).unwrap();
        let err = resolve_in(tmp.path(), "org/m", "evil").unwrap_err();
        assert!(err.contains("holding \"../../x\", not a commit"), "{err}");
        std::fs::write(folder.join("refs/dots"), "..").unwrap();
        assert!(resolve_in(tmp.path(), "org/m", "dots").is_err());
        // A snapshot that is a link out of the cache.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), folder.join("snapshots/def5678")).unwrap();
        let err = resolve_in(tmp.path(), "org/m", "def5678").unwrap_err();
        assert!(err.contains("leads outside"), "{err}");
        let err = resolve_in(tmp.path(), "org/m", "def56").unwrap_err();
        assert!(err.contains("is not in"), "{err}");
    }
}
