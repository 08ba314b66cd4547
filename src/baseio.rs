//! Reading base files, through the page cache or around it.
//!
//! A mount puts merged pages in the page cache. For a model over half of RAM, base pages
//! cached beside them would make the two evict each other, so such models read the base
//! with `O_DIRECT`. (`posix_fadvise(DONTNEED)` after each read does not do it: the kernel
//! keeps page-cache folios larger than the range advised, which is most of them.)

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical block size;
/// 4096 covers every common device.
const ALIGN: usize = 4096;

thread_local! {
    /// One aligned-read buffer per thread, grown as needed and reused.
    static DIRECT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// An input file, opened read-only: buffered, and with `O_DIRECT` where the filesystem
/// supports it.
#[derive(Debug)]
pub struct InputFile {
    pub path: PathBuf,
    buffered: File,
    direct: Option<File>,
}

impl InputFile {
    pub fn open(path: &Path) -> Result<InputFile> {
        let buffered = File::open(path).map_err(|e| Error::io(path, e))?;
        // tmpfs and some FUSE filesystems refuse O_DIRECT (EINVAL): then reads stay buffered.
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(InputFile {
            path: path.to_path_buf(),
            buffered,
            direct,
        })
    }

    /// The file's size now.
    pub fn size(&self) -> Result<u64> {
        Ok(self
            .buffered
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len())
    }

    /// Fill `buf` from `offset`, around the page cache if `bypass_cache` (and possible).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, bypass_cache: bool) -> Result<()> {
        let result = match (&self.direct, bypass_cache) {
            (Some(direct), true) => read_direct(direct, buf, offset),
            _ => self.buffered.read_exact_at(buf, offset),
        };
        result.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let what = "file is shorter than when lorafs opened it; inputs must not change";
                Error::io(&self.path, io::Error::new(e.kind(), what))
            } else {
                Error::io(&self.path, e)
            }
        })
    }
}

/// Read `buf.len()` bytes at `offset` with aligned O_DIRECT reads into a thread-local
/// buffer, then copy out the part asked for.
fn read_direct(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = offset - offset % ALIGN as u64;
    let skip = (offset - start) as usize;
    let want = skip + buf.len();
    let span = want.div_ceil(ALIGN) * ALIGN;
    DIRECT_BUF.with_borrow_mut(|raw| {
        if raw.len() < span + ALIGN {
            raw.resize(span + ALIGN, 0);
        }
        let pad = raw.as_ptr().align_offset(ALIGN);
        let aligned = &mut raw[pad..pad + span];
        let mut done = 0;
        while done < want {
            // `done` stays a multiple of ALIGN: only the last read (at EOF) is short.
            match file.read_at(&mut aligned[done..], start + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if done % ALIGN != 0 && done < want {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
        buf.copy_from_slice(&aligned[skip..want]);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_buffered_reads_agree_at_any_offset() {
        // /var/tmp is disk-backed where /tmp may be tmpfs (which refuses O_DIRECT).
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = InputFile::open(&path).unwrap();
        if file.direct.is_none() {
            eprintln!(
                "O_DIRECT not supported on {}: checking buffered reads only",
                dir.path().display()
            );
        }
        for (offset, len) in [
            (0, 1),
            (1, 4095),
            (4095, 2),
            (4096, 4096),
            (12_345, 30_000),
            (49_999, 1),
            (0, 50_000),
        ] {
            for bypass in [false, true] {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset as u64, bypass).unwrap();
                assert_eq!(
                    buf,
                    data[offset..offset + len],
                    "{offset}+{len} bypass={bypass}"
                );
            }
        }
        let mut buf = vec![0u8; 10];
        let err = file.read_exact_at(&mut buf, 49_995, true).unwrap_err();
        assert!(err.to_string().contains("shorter than"), "{err}");
    }
}
