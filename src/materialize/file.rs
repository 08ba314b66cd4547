//! `lorafs materialize BASE OUT.gguf --gguf TYPE`: one file of a view written on its own.
//!
//! The file is written to a temporary file beside OUT (created by this run, removed if the
//! run fails or is interrupted) and renamed onto OUT only when complete; without `--force`
//! an existing OUT is never replaced, even one that appears while the run writes.

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use super::{adapters_readable, kept_bits, MaterializeOptions, Summary};
use crate::error::{Error, Result};
use crate::view::View;

/// Write view file `file` to `out`. `inputs` are the base and adapter directories, which
/// the output must not be inside.
pub fn materialize_file(
    view: &View,
    file: usize,
    out: &Path,
    inputs: &[&Path],
    options: &MaterializeOptions,
) -> Result<Summary> {
    let start = Instant::now();
    let refuse = |what: &str| Error::Output {
        path: out.to_path_buf(),
        what: what.into(),
    };
    let name = out
        .file_name()
        .ok_or_else(|| refuse("is not a file name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = parent.canonicalize().map_err(|e| Error::io(parent, e))?;
    for input in inputs {
        let input = input.canonicalize().map_err(|e| Error::io(input, e))?;
        if parent.starts_with(&input) {
            return Err(refuse(&format!("is inside the input {}", input.display())));
        }
    }
    match std::fs::symlink_metadata(out) {
        Ok(meta) if !meta.is_file() => return Err(refuse("exists and is not a regular file")),
        Ok(_) if !options.force => {
            return Err(refuse("already exists; pass --force to replace it"))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(out, e)),
    }
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".lorafs-");
    let temp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let vf = &view.files[file];
    let handle = (temp.as_file().try_clone()).map_err(|e| Error::io(temp.path(), e))?;
    let mut handle = Some((handle, temp.path().to_path_buf()));
    let open = |_| handle.take().ok_or_else(|| refuse("was opened twice"));
    let hidden = indicatif::ProgressBar::hidden();
    super::write::stream(view, &[file], open, &hidden, &options.interrupt, out)?;
    let group = std::fs::metadata(&parent)
        .map_err(|e| Error::io(&parent, e))?
        .gid();
    let source = vf.source();
    let mode = kept_bits(source.mode, source.gid, group) & adapters_readable(view, vf);
    let file_ = temp.as_file();
    file_
        .set_permissions(Permissions::from_mode(mode))
        .map_err(|e| Error::io(temp.path(), e))?;
    options.interrupt.check(out)?;
    let placed = if options.force {
        temp.persist(out)
    } else {
        temp.persist_noclobber(out)
    };
    placed.map_err(|e| Error::io(out, e.error))?;
    super::fsops::sync_dir(&parent)?; // the new name on disk too (the data was synced)
    Ok(Summary {
        files: 1,
        tensors_merged: view.plan.merges.len(),
        bytes: vf.size,
        elapsed: start.elapsed(),
    })
}
