//! `lorafs materialize`: write the merged directory to disk, streaming through
//! [`Engine::read_at`] so the bytes are exactly what a mount serves.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::Engine;
use crate::error::{Error, Result};

/// Bytes per `read_at` call: several blocks, so that merging uses every core, and small
/// enough that memory stays bounded (one chunk plus the cache, whatever the model size).
const CHUNK: usize = 16 << 20;

/// Bytes per `write`. On this project's VMs, 1 MiB or larger writes of a new file sometimes
/// run five times slower (large page-cache folios the host faults in); 256 KiB writes do not
/// (BENCHMARKS.md, "Against PEFT", says how to see it).
const WRITE_BYTES: usize = 256 << 10;

#[derive(Debug, Clone, Default)]
pub struct MaterializeOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

#[derive(Debug)]
pub struct Summary {
    pub files: usize,
    pub tensors_merged: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} files, {} tensors merged, {} bytes in {:.2} s ({:.0} MB/s)",
            self.files,
            self.tensors_merged,
            self.bytes,
            secs,
            self.bytes as f64 / secs.max(1e-9) / 1e6
        )
    }
}

/// Write the merged directory to `out`. It is built in a temporary directory beside `out`
/// and renamed into place only when complete, so a failure leaves nothing at `out`.
pub fn materialize(
    engine: &Engine,
    out: &Path,
    inputs: &[&Path],
    options: &MaterializeOptions,
) -> Result<Summary> {
    let start = Instant::now();
    check_output(out, inputs, options.force)?;
    let parent = parent_dir(out);
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.lorafs-"))
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;

    for dir in &engine.dirs {
        let path = tmp.path().join(dir);
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    let total = engine.total_bytes();
    let bar = if options.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    write_files(engine, tmp.path(), &bar)?;
    bar.finish_and_clear();

    if out.exists() {
        // `--force` (checked above): remove the old output only now that the new one is whole.
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        Error::io(out, e)
    })?;
    Ok(Summary {
        files: engine.files.len(),
        tensors_merged: engine.plan.merges.len(),
        bytes: total,
        elapsed: start.elapsed(),
    })
}

/// Write every file under `dir`: this thread merges a chunk (`read_at`) while a writer
/// thread writes the previous one, so merging and writing overlap.
fn write_files(engine: &Engine, dir: &Path, bar: &ProgressBar) -> Result<()> {
    // (file index, buffer, bytes used); a file of size 0 is sent once with 0 bytes.
    let (full_tx, full_rx) = mpsc::sync_channel::<(usize, Vec<u8>, usize)>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        empty_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            let mut current: Option<(usize, File, PathBuf)> = None;
            for (index, buf, n) in full_rx {
                if current.as_ref().map(|c| c.0) != Some(index) {
                    let path = dir.join(&engine.files[index].rel);
                    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                    current = Some((index, file, path));
                }
                let (_, file, path) = current.as_mut().expect("set above");
                for piece in buf[..n].chunks(WRITE_BYTES) {
                    file.write_all(piece).map_err(|e| Error::io(&*path, e))?;
                }
                if buf.len() == CHUNK {
                    let _ = empty_tx.send(buf); // back to the producer
                }
            }
            Ok(())
        });
        let produced = (|| -> Result<()> {
            for (index, file) in engine.files.iter().enumerate() {
                if file.size == 0 && full_tx.send((index, Vec::new(), 0)).is_err() {
                    return Ok(()); // the writer stopped: its error is reported below
                }
                let mut offset = 0;
                while offset < file.size {
                    let Ok(mut buf) = empty_rx.recv() else {
                        return Ok(());
                    };
                    let n = engine.read_at(index, offset, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    if full_tx.send((index, buf, n)).is_err() {
                        return Ok(());
                    }
                    offset += n as u64;
                    bar.inc(n as u64);
                }
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer.join().expect("the writer thread does not panic");
        produced.and(written)
    })
}

/// Refuse an output that exists (without `force`) or that would overwrite an input.
fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let output = |what: &str| Error::Output {
        path: out.to_path_buf(),
        what: what.to_string(),
    };
    let parent = parent_dir(out);
    let parent = parent.canonicalize().map_err(|e| Error::io(parent, e))?;
    let inputs = inputs
        .iter()
        .map(|i| i.canonicalize().map_err(|e| Error::io(i, e)))
        .collect::<Result<Vec<_>>>()?;
    if inputs.iter().any(|i| parent.starts_with(i)) {
        return Err(output(
            "is inside an input directory; write the merged model elsewhere",
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(out) {
        if !force {
            return Err(output("already exists; pass --force to replace it"));
        }
        if !meta.is_dir() {
            return Err(output(
                "exists and is not a directory; refusing to replace it",
            ));
        }
        let out = out.canonicalize().map_err(|e| Error::io(out, e))?;
        if inputs.iter().any(|i| i.starts_with(&out)) {
            return Err(output(
                "contains an input (base or adapter); refusing to replace it",
            ));
        }
    }
    Ok(())
}

/// The directory `out` is created in.
fn parent_dir(out: &Path) -> &Path {
    out.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
