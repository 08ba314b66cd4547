//! Streaming the merged files into the run's directory.

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use indicatif::ProgressBar;

use super::interrupt::Interrupt;
use super::output::Output;
use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};
use crate::view::View;

/// Bytes per `read_at` call: several blocks, so that merging uses every core, and small
/// enough that memory stays bounded (one chunk plus the cache, whatever the model size).
const CHUNK: usize = 16 << 20;

/// Where the files go and what to watch while writing them.
pub(super) struct Sink<'a> {
    /// The run's directory (its subdirectories exist).
    pub dir: &'a Path,
    /// Permission bits of each file, by index in `view.files`.
    pub modes: &'a [u32],
    pub bar: &'a ProgressBar,
    /// Checked per chunk: a signal stops the run with an error naming `out`.
    pub interrupt: &'a Interrupt,
    pub out: &'a Path,
}

/// Write every file under `sink.dir`.
pub(super) fn write_files(view: &View, sink: &Sink) -> Result<()> {
    let files: Vec<usize> = (0..view.files.len()).collect();
    let open = |index: usize| {
        let path = sink.dir.join(&view.files[index].rel);
        Ok((create(&path, sink.modes[index])?, path))
    };
    stream(view, &files, open, sink.bar, sink.interrupt, sink.out)
}

/// A merged chunk on its way to the writer: (file index, buffer, bytes used); a file of size
/// 0 is sent once with 0 bytes.
type Chunk = (usize, AlignedBuf, usize);

/// Write view files `files`, in order, each into the file `open` gives for its index: this
/// thread merges a chunk (`read_at`) while a writer thread writes the previous one, so
/// merging and writing overlap. `interrupt` is checked per chunk.
pub(super) fn stream(
    view: &View,
    files: &[usize],
    open: impl FnMut(usize) -> Result<(File, PathBuf)> + Send,
    bar: &ProgressBar,
    interrupt: &Interrupt,
    out: &Path,
) -> Result<()> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..2 {
        empty_tx
            .send(AlignedBuf::zeroed(CHUNK))
            .expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || write_chunks(full_rx, empty_tx, open));
        let produced = produce(view, files, &full_tx, &empty_rx, bar, interrupt, out);
        drop(full_tx);
        let written = writer.join().expect("the writer thread does not panic");
        produced.and(written)
    })
}

/// The writer thread: each chunk into its file (opened with `open` at its first chunk, and
/// finished at the next file's), each buffer sent back for the next chunk.
fn write_chunks(
    full: mpsc::Receiver<Chunk>,
    empty: mpsc::Sender<AlignedBuf>,
    mut open: impl FnMut(usize) -> Result<(File, PathBuf)>,
) -> Result<()> {
    let mut current: Option<(usize, Output)> = None;
    for (index, buf, n) in full {
        if current.as_ref().map(|c| c.0) != Some(index) {
            if let Some((_, done)) = current.take() {
                done.finish()?;
            }
            let (file, path) = open(index)?;
            current = Some((index, Output::new(file, path)));
        }
        let (_, output) = current.as_mut().expect("set above");
        if n > 0 {
            output.write(&buf.bytes()[..n])?;
            let _ = empty.send(buf); // back to the producer
        }
    }
    match current {
        Some((_, last)) => last.finish(),
        None => Ok(()),
    }
}

/// Merge the chunks of `files` into the buffers that come back on `empty`, and send them to
/// the writer on `full`. Stops without an error of its own when the writer has stopped (its
/// error is the one reported).
fn produce(
    view: &View,
    files: &[usize],
    full: &mpsc::SyncSender<Chunk>,
    empty: &mpsc::Receiver<AlignedBuf>,
    bar: &ProgressBar,
    interrupt: &Interrupt,
    out: &Path,
) -> Result<()> {
    for &index in files {
        let file = &view.files[index];
        interrupt.check(out)?;
        if file.size == 0 && full.send((index, AlignedBuf::default(), 0)).is_err() {
            return Ok(());
        }
        let mut offset = 0;
        while offset < file.size {
            interrupt.check(out)?;
            let Ok(mut buf) = empty.recv() else {
                return Ok(());
            };
            // The base of the chunks after this one is read meanwhile: a cold base keeps
            // the disk busy while this one is merged.
            view.read_ahead(index, offset + CHUNK as u64);
            let n = view.read_at(index, offset, buf.bytes_mut())?;
            if n == 0 {
                let what = "the view ended before its size";
                return Err(Error::config(file.source_path(), what));
            }
            if full.send((index, buf, n)).is_err() {
                return Ok(());
            }
            offset += n as u64;
            bar.inc(n as u64);
        }
    }
    Ok(())
}

/// A new file with the source's permission bits. Set on the open descriptor, which stays
/// writable even when the bits say read-only (a 0444 source).
fn create(path: &Path, mode: u32) -> Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))?;
    Ok(file)
}
