//! One output file of a run, written around the page cache where the filesystem allows it.
//!
//! Materialize writes gigabytes that it will not read again. Through the page cache every
//! byte is copied into a new page-cache page (slow on VMs that hand freed pages back to the
//! host, and it evicts the user's cached files), then written back later; the run could
//! even report success before the bytes were on disk. So whole ALIGN blocks go out with
//! `O_DIRECT` from the (aligned) chunk buffers, the unaligned tail of a file through the
//! page cache, and the file is `fsync`ed before the run renames it into place: when
//! materialize says it is done, the output is on disk. Filesystems that refuse `O_DIRECT`
//! (tmpfs, some FUSE and network filesystems), at open or at the first write, get buffered
//! writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

use crate::aligned::ALIGN;
use crate::error::{Error, Result};

/// Bytes per buffered `write`. On this project's VMs, 1 MiB or larger writes of a new file
/// sometimes run five times slower (large page-cache folios the host faults in); 256 KiB
/// writes do not (BENCHMARKS.md, "Against PEFT", says how to see it).
const WRITE_BYTES: usize = 256 << 10;

/// An output file being written from its start, in order.
pub(super) struct Output {
    file: File,
    path: PathBuf,
    /// Where the next bytes go.
    offset: u64,
    /// The descriptor has `O_DIRECT` set.
    direct: bool,
}

impl Output {
    /// `file` (new, empty, opened for writing) at `path`; `O_DIRECT` if the filesystem
    /// takes it.
    pub fn new(file: File, path: PathBuf) -> Output {
        let mut output = Output {
            file,
            path,
            offset: 0,
            direct: false,
        };
        output.direct = output.set_direct(true).is_ok();
        output
    }

    /// Append `bytes`. Direct writes need an aligned address (the chunk buffers are) and
    /// whole blocks at aligned offsets: the blocks go direct, a remainder (a file's tail)
    /// through the page cache, and every later write of this file too.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let aligned =
            bytes.as_ptr().align_offset(ALIGN) == 0 && self.offset.is_multiple_of(ALIGN as u64);
        let whole = match self.direct && aligned {
            true => bytes.len() / ALIGN * ALIGN,
            false => 0,
        };
        if whole > 0 {
            match self.file.write_all_at(&bytes[..whole], self.offset) {
                Ok(()) => self.offset += whole as u64,
                // Accepted at open, refused at the first write: nothing was written yet.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.offset == 0 => {
                    self.set_direct(false)?;
                    return self.write(bytes);
                }
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        let rest = &bytes[whole..];
        if rest.is_empty() {
            return Ok(());
        }
        if self.direct {
            self.set_direct(false)?;
        }
        for piece in rest.chunks(WRITE_BYTES) {
            let written = self.file.write_all_at(piece, self.offset);
            written.map_err(|e| Error::io(&self.path, e))?;
            self.offset += piece.len() as u64;
        }
        Ok(())
    }

    /// The file's bytes and size on disk.
    pub fn finish(self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }

    /// Set or clear `O_DIRECT` on the descriptor (on its open file description, which a
    /// clone of the descriptor shares).
    fn set_direct(&mut self, on: bool) -> Result<()> {
        let flags =
            fcntl_getfl(&self.file).map_err(|e| Error::io(&self.path, io::Error::from(e)))?;
        let flags = match on {
            true => flags | OFlags::DIRECT,
            false => flags - OFlags::DIRECT,
        };
        fcntl_setfl(&self.file, flags).map_err(|e| Error::io(&self.path, io::Error::from(e)))?;
        self.direct = on;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::AlignedBuf;
    use std::os::unix::fs::OpenOptionsExt;

    /// Bytes written through an Output in pieces of `sizes`, read back.
    fn write_pieces(dir: &std::path::Path, sizes: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let path = dir.join(format!("out-{}", sizes.len()));
        let file = File::create_new(&path).unwrap();
        let mut output = Output::new(file, path.clone());
        let mut want = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let mut buf = AlignedBuf::zeroed(size);
            for (j, b) in buf.bytes_mut().iter_mut().enumerate() {
                *b = (i * 31 + j * 7) as u8;
            }
            output.write(buf.bytes()).unwrap();
            want.extend_from_slice(buf.bytes());
        }
        output.finish().unwrap();
        (std::fs::read(&path).unwrap(), want)
    }

    #[test]
    fn every_mix_of_whole_blocks_and_tails_reads_back_the_same() {
        // /var/tmp is disk-backed, /dev/shm tmpfs (which refused O_DIRECT before Linux 6.6).
        for root in ["/var/tmp", "/dev/shm"] {
            for sizes in [
                &[3 * ALIGN, 2 * ALIGN][..],
                &[3 * ALIGN + 100],
                &[ALIGN, ALIGN + 1, ALIGN],
                &[17],
                &[],
            ] {
                let dir = tempfile::tempdir_in(root).unwrap();
                let (got, want) = write_pieces(dir.path(), sizes);
                assert!(got == want, "{root} sizes {sizes:?}");
            }
        }
    }

    #[test]
    fn direct_writes_are_used_where_the_filesystem_takes_them() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("out");
        let output = Output::new(File::create_new(&path).unwrap(), path.clone());
        let flags = fcntl_getfl(&output.file).unwrap();
        assert_eq!(output.direct, flags.contains(OFlags::DIRECT));
        // Where the filesystem opens the file with O_DIRECT, the output is written direct.
        let probe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        assert_eq!(output.direct, probe.is_ok(), "{probe:?}");
    }
}
