//! Reading input files: through the page cache or around it, and only ever the version
//! lorafs opened.
//!
//! A mount puts merged pages in the page cache. For a model over half of RAM, base pages
//! cached beside them would make the two evict each other, so such models read the base
//! with `O_DIRECT`. (`posix_fadvise(DONTNEED)` after each read does not do it: the kernel
//! keeps page-cache folios larger than the range advised, which is most of them.)
//!
//! An input rewritten in place while lorafs serves it must not be served as a mix of old
//! bytes (merged blocks in the cache, the plan's factors) and new ones. Each input's
//! [`Identity`] is recorded before anything is read from it, and every read compares the
//! file's identity, taken *after* the bytes are in the buffer, with it: a write that lands
//! before or during the read updates the file's times first (the kernel stamps them before
//! copying data), so the check sees it; a write after the check leaves the bytes read old,
//! which is consistent. Once a change is seen the file stays changed, so cached blocks made
//! from it are refused too.

use std::cell::RefCell;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, Result};

thread_local! {
    /// One aligned-read buffer per thread, grown as needed and reused.
    static DIRECT_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// One version of a file: what `stat` says about it. Writing to the file in place changes
/// its change time (and size or modification time); replacing it changes the inode.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Status change time (seconds, nanoseconds).
    pub ctime: (i64, i64),
    /// Number of names the file has.
    pub links: u64,
    /// Permission bits and owner, served (mount) and kept (materialize) from this same
    /// `stat`, so a file's bytes and its permissions are those of one version.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The part of an [`Identity`] that names one version of a file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    pub fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            links: meta.nlink(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// What tells this version of the file from any other: two files with equal versions
    /// hold the same bytes (as far as `stat` can tell, the same test as [`SourceFile`]'s).
    pub fn version(&self) -> Version {
        Version {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }

    /// The identity of the file at `path` (symlinks followed).
    pub fn of_path(path: &Path) -> Result<Identity> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(Identity::of(&meta))
    }

    /// Whether `now` may hold other bytes than `self`, and if so what differs (for the
    /// message). Any status change counts (a chmod too): the change time cannot tell it
    /// from a write whose modification time was set back (`cp -p` onto the file). Except
    /// one: a file whose last name went away (replaced by a rename, or deleted) gets a new
    /// change time but keeps its bytes, and an open descriptor still reads them.
    pub fn changes(&self, now: &Identity) -> Option<String> {
        let same =
            (self.dev, self.ino, self.size, self.mtime) == (now.dev, now.ino, now.size, now.mtime);
        if same && (self.ctime == now.ctime || (now.links == 0 && self.links > 0)) {
            return None;
        }
        let time = |(s, ns): (i64, i64)| format!("{s}.{ns:09}");
        let mut parts = Vec::new();
        if (self.dev, self.ino) != (now.dev, now.ino) {
            parts.push(format!(
                "replaced by another file: inode {} → {}",
                self.ino, now.ino
            ));
        }
        if self.size != now.size {
            parts.push(format!("size {} → {}", self.size, now.size));
        }
        if self.mtime != now.mtime {
            parts.push(format!("mtime {} → {}", time(self.mtime), time(now.mtime)));
        }
        if self.ctime != now.ctime {
            parts.push(format!("ctime {} → {}", time(self.ctime), time(now.ctime)));
        }
        Some(parts.join(", "))
    }
}

/// An input file, read-only. Weights files keep one descriptor from open (plus an `O_DIRECT`
/// one once a read bypasses the page cache); other files are opened at each read, so a
/// tree of thousands of small files needs no more descriptors than its weights.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    /// For a file opened at each read: `path` with every symbolic link resolved when lorafs
    /// opened it, opened without following any link since (see [`SourceFile::lazy`]).
    resolved: PathBuf,
    identity: Identity,
    /// The descriptor held from open, or `None` for a file opened at each read.
    held: Option<File>,
    /// The `O_DIRECT` descriptor, opened at the first read that asks for it; `None` inside
    /// where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE filesystems).
    direct: OnceLock<Option<File>>,
    /// Set (to what changed) the first time a change is seen; the file stays changed.
    changed: OnceLock<String>,
}

impl SourceFile {
    /// Open `path` and keep the descriptor. `recorded` is the identity taken before anything
    /// was read from the path (e.g. while walking the base directory): a file that changed
    /// since is refused now rather than served.
    pub fn open(path: &Path, recorded: Option<Identity>) -> Result<SourceFile> {
        let file = open_file(path)?;
        let now = fstat(path, &file)?;
        if let Some(what) = recorded.and_then(|r| r.changes(&now)) {
            return Err(Error::Changed {
                path: path.to_path_buf(),
                what,
            });
        }
        Ok(SourceFile {
            path: path.to_path_buf(),
            resolved: path.to_path_buf(),
            identity: recorded.unwrap_or(now),
            held: Some(file),
            direct: OnceLock::new(),
            changed: OnceLock::new(),
        })
    }

    /// A file opened at each read, whose identity was taken before anything was read from
    /// its path. Its links are resolved now, and later opens follow none: a link put in
    /// its place afterwards (say, into the mount itself, where the server would wait on
    /// its own request for ever) is a change, not a path to take.
    pub fn lazy(path: &Path, identity: Identity) -> SourceFile {
        SourceFile {
            path: path.to_path_buf(),
            resolved: path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
            identity,
            held: None,
            direct: OnceLock::new(),
            changed: OnceLock::new(),
        }
    }

    /// The file's size when lorafs opened it (the only size it ever serves).
    pub fn size(&self) -> u64 {
        self.identity.size
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Fill `buf` from `offset`, around the page cache if `bypass_cache` (and possible).
    /// Fails with [`Error::Changed`] if the file is not the version opened.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, bypass_cache: bool) -> Result<()> {
        self.unchanged()?;
        let opened;
        let file = match &self.held {
            Some(file) => file,
            None => {
                opened = self.open_again()?;
                &opened
            }
        };
        let result = match (bypass_cache, self.held.is_some()) {
            (true, true) => match self.direct(file) {
                Some(direct) => read_direct(direct, buf, offset),
                None => file.read_exact_at(buf, offset),
            },
            _ => file.read_exact_at(buf, offset),
        };
        // After the read: a change that could have reached `buf` is visible now. A short
        // read is most likely a truncation, which this names.
        self.verify(file)?;
        result.map_err(|e| self.read_error(e))
    }

    /// A failed read of this file. Every read path says a short read the same way (std's
    /// "failed to fill whole buffer").
    fn read_error(&self, e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Error::io(&self.path, io::Error::from(e.kind())),
            _ => Error::io(&self.path, e),
        }
    }

    /// Whether the file is still the version opened: its flag, then its identity now.
    pub fn check(&self) -> Result<()> {
        self.unchanged()?;
        match &self.held {
            Some(file) => self.verify(file),
            None => self.verify(&self.open_again()?),
        }
    }

    /// Open a file that is opened at each read: its resolved path, following no symbolic
    /// link (`openat2` with `RESOLVE_NO_SYMLINKS`). Where the kernel has no `openat2`
    /// (before Linux 5.6, or a sandbox that forbids it), the path is opened as given.
    fn open_again(&self) -> Result<File> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        match openat2(
            CWD,
            &self.resolved,
            flags,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(fd) => Ok(File::from(fd)),
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => open_file(&self.path),
            Err(rustix::io::Errno::LOOP) => {
                let what = format!(
                    "a symbolic link now stands on {} (or a directory above it)",
                    self.resolved.display()
                );
                if self.changed.set(what.clone()).is_ok() {
                    log::error!("{}", self.changed_error(what.clone()));
                }
                Err(self.changed_error(what))
            }
            Err(e) => Err(open_error(&self.resolved, e.into())),
        }
    }

    /// Fails if a change was seen before (no system call).
    pub fn unchanged(&self) -> Result<()> {
        match self.changed.get() {
            None => Ok(()),
            Some(what) => Err(self.changed_error(what.clone())),
        }
    }

    fn verify(&self, file: &File) -> Result<()> {
        let now = fstat(&self.path, file)?;
        let Some(what) = self.identity.changes(&now) else {
            return Ok(());
        };
        if self.changed.set(what.clone()).is_ok() {
            // Once per file: every later read fails with the same error, unlogged here.
            log::error!("{}", self.changed_error(what.clone()));
        }
        Err(self.changed_error(self.changed.get().cloned().unwrap_or(what)))
    }

    fn changed_error(&self, what: String) -> Error {
        Error::Changed {
            path: self.path.clone(),
            what,
        }
    }

    /// The `O_DIRECT` descriptor of the held file, opened once. It is opened through
    /// `/proc/self/fd`, so it is the same file as the held descriptor even if the path was
    /// replaced since.
    fn direct(&self, held: &File) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let direct = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", held.as_raw_fd()))
                    .ok()?;
                let meta = direct.metadata().ok()?;
                ((meta.dev(), meta.ino()) == (self.identity.dev, self.identity.ino))
                    .then_some(direct)
            })
            .as_ref()
    }
}

/// Open an input read-only; running out of descriptors says what to do about it.
fn open_file(path: &Path) -> Result<File> {
    open_regular(path)
}

/// Open `path` (through symbolic links) for reading, only if it is a regular file. With
/// `O_NONBLOCK`, so that a FIFO under an input's name fails here instead of blocking the
/// open until a writer comes, which may be never; on a regular file the flag changes
/// nothing. A device (`config.json -> /dev/zero`) would be read without end.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = "is not a regular file (a device, FIFO or socket); lorafs reads only files";
        return Err(Error::io(path, io::Error::other(what)));
    }
    Ok(file)
}

/// An open that failed; running out of descriptors says what to do about it.
fn open_error(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EMFILE) {
        let what = "too many open files: raise `ulimit -n`";
        Error::io(path, io::Error::new(e.kind(), what))
    } else {
        Error::io(path, e)
    }
}

/// The whole of a small regular file (a JSON config or index, a ref), refused without
/// reading it when it holds more than `cap` bytes: such a file is read whole into memory.
pub fn read_small(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_large = || {
        let what = format!("larger than {} MiB; refusing to read it whole", cap >> 20);
        Err(Error::io(path, io::Error::other(what)))
    };
    if size > cap {
        return too_large();
    }
    // `take` as well: a file of /proc says 0 bytes whatever it holds.
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return too_large();
    }
    Ok(bytes)
}

fn fstat(path: &Path, file: &File) -> Result<Identity> {
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    Ok(Identity::of(&meta))
}

/// Read `buf.len()` bytes at `offset` with aligned O_DIRECT reads into a thread-local
/// buffer, then copy out the part asked for.
fn read_direct(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = offset - offset % ALIGN as u64;
    let skip = (offset - start) as usize;
    let want = skip + buf.len();
    DIRECT_BUF.with_borrow_mut(|direct| {
        let aligned = direct.span(want);
        read_aligned(file, aligned, start, want)?;
        buf.copy_from_slice(&aligned[skip..want]);
        Ok(())
    })
}

/// Fill the first `want` bytes of `aligned` (an ALIGN-aligned buffer of a whole number of
/// ALIGN blocks) from `start` (aligned too) with O_DIRECT reads.
fn read_aligned(file: &File, aligned: &mut [u8], start: u64, want: usize) -> io::Result<()> {
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
    Ok(())
}

impl SourceFile {
    /// Fill `buf` with bytes `start .. start + len`, around the page cache if `bypass_cache`
    /// (and possible), checked like [`SourceFile::read_exact_at`]. `start` must be a
    /// multiple of 4096 (the O_DIRECT alignment), so the bytes go straight into `buf`.
    pub fn read_span(
        &self,
        buf: &mut AlignedBuf,
        start: u64,
        len: usize,
        bypass_cache: bool,
    ) -> Result<()> {
        debug_assert_eq!(start % ALIGN as u64, 0);
        self.unchanged()?;
        buf.set_len(0);
        let aligned = buf.span(len);
        let direct = match &self.held {
            Some(file) if bypass_cache => self.direct(file),
            _ => None,
        };
        let result = match (direct, &self.held) {
            (Some(direct), _) => read_aligned(direct, aligned, start, len),
            (None, Some(file)) => file.read_exact_at(&mut aligned[..len], start),
            (None, None) => self.open_again()?.read_exact_at(&mut aligned[..len], start),
        };
        self.check()?;
        result.map_err(|e| self.read_error(e))?;
        buf.set_len(len);
        Ok(())
    }

    /// Bytes of the file in the page cache now, in whole pages (`crate::residency`); `None`
    /// for a file opened at each read, or where the kernel cannot say.
    pub fn cached_bytes(&self) -> Option<u64> {
        crate::residency::cached_bytes(self.held.as_ref()?, self.size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    fn tempdir() -> tempfile::TempDir {
        // /var/tmp is disk-backed where /tmp may be tmpfs (which refuses O_DIRECT).
        tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    /// Overwrite bytes in place (same inode, same size). Kernels before 6.13 stamp times at
    /// clock-tick granularity: wait a tick so the write gets a time of its own.
    fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = OpenOptions::new().write(true).open(path).unwrap();
        f.seek(io::SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn cached_bytes_follow_the_page_cache() {
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![3u8; (1 << 20) + 100]).unwrap();
        let file = SourceFile::open(&path, None).unwrap();
        let mut all = vec![0u8; file.size() as usize];
        file.read_exact_at(&mut all, 0, false).unwrap();
        assert_eq!(file.cached_bytes(), Some(file.size()));
        let held = File::open(&path).unwrap();
        held.sync_all().unwrap();
        rustix::fs::fadvise(&held, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // tmpfs (where /var/tmp is missing) keeps its pages: they are the file.
        let tmpfs = rustix::fs::statfs(&path).unwrap().f_type == libc::TMPFS_MAGIC;
        if tmpfs {
            eprintln!("skipping the eviction check: the file is on tmpfs, always cached");
        } else {
            assert!(file.cached_bytes().unwrap() < file.size());
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            SourceFile::open(&empty, None).unwrap().cached_bytes(),
            Some(0)
        );
        let lazy = SourceFile::lazy(&path, Identity::of_path(&path).unwrap());
        assert_eq!(lazy.cached_bytes(), None, "a file opened at each read");
    }

    #[test]
    fn direct_and_buffered_reads_agree_at_any_offset() {
        let dir = tempdir();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = SourceFile::open(&path, None).unwrap();
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
        if file.direct.get().is_some_and(Option::is_none) {
            eprintln!(
                "O_DIRECT not supported on {}: checked buffered reads only",
                dir.path().display()
            );
        }
        let mut buf = vec![0u8; 10];
        let err = file.read_exact_at(&mut buf, 49_995, true).unwrap_err();
        assert!(err.to_string().contains("unexpected end of file"), "{err}");
    }

    #[test]
    fn a_file_rewritten_in_place_fails_every_read_after() {
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        for held in [true, false] {
            let file = if held {
                SourceFile::open(&path, None).unwrap()
            } else {
                SourceFile::lazy(&path, Identity::of_path(&path).unwrap())
            };
            let mut buf = vec![0u8; 100];
            file.read_exact_at(&mut buf, 0, false).unwrap();
            overwrite(&path, 5_000, &[2u8; 10]);
            // The range read is untouched, but the file is not the version opened.
            let err = file.read_exact_at(&mut buf, 0, false).unwrap_err();
            assert!(matches!(err, Error::Changed { .. }), "{err}");
            assert_eq!(err.errno(), libc::EIO);
            let text = err.to_string();
            assert!(
                text.contains("data: changed since lorafs opened it (") && text.contains("ctime"),
                "{text}"
            );
            // Sticky: even a read that would not look again fails.
            assert!(matches!(file.unchanged(), Err(Error::Changed { .. })));
        }
    }

    #[test]
    fn a_write_with_its_modification_time_set_back_is_a_change() {
        // What `cp -p new old` does: write in place, then restore the source's times.
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let file = SourceFile::open(&path, None).unwrap();
        overwrite(&path, 0, &[2u8; 10]);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(mtime).unwrap();
        let mut buf = vec![0u8; 10];
        let err = file.read_exact_at(&mut buf, 0, false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ctime") && !text.contains("mtime"), "{text}");
    }

    #[test]
    fn truncation_is_named_as_a_change() {
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        let file = SourceFile::open(&path, None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let mut buf = vec![0u8; 1000];
        let err = file.read_exact_at(&mut buf, 5_000, false).unwrap_err();
        assert!(err.to_string().contains("size 10000 → 100"), "{err}");
    }

    #[test]
    fn a_file_replaced_by_rename_keeps_its_held_version_and_fails_a_lazy_one() {
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let held = SourceFile::open(&path, None).unwrap();
        let lazy = SourceFile::lazy(&path, Identity::of_path(&path).unwrap());
        let new = dir.path().join("new");
        std::fs::write(&new, vec![2u8; 1000]).unwrap();
        std::fs::rename(&new, &path).unwrap();
        let mut buf = vec![0u8; 1000];
        for bypass in [false, true] {
            held.read_exact_at(&mut buf, 0, bypass).unwrap();
            assert_eq!(buf, vec![1u8; 1000]);
        }
        let err = lazy.read_exact_at(&mut buf, 0, false).unwrap_err();
        assert!(
            err.to_string().contains("replaced by another file"),
            "{err}"
        );
    }

    #[test]
    fn a_link_put_in_place_of_a_lazy_file_is_not_followed() {
        // The link could lead anywhere, the mount itself included (where the server would
        // wait on its own request): it is a change, whatever it points to.
        let dir = tempdir();
        let linked = dir.path().join("linked");
        std::fs::write(&linked, vec![1u8; 1000]).unwrap();
        // A link in place when lorafs opens the file is resolved then (a Hugging Face
        // snapshot links into blobs/), and read through afterwards.
        let snapshot = dir.path().join("snapshot");
        std::os::unix::fs::symlink(&linked, &snapshot).unwrap();
        let lazy = SourceFile::lazy(&snapshot, Identity::of_path(&snapshot).unwrap());
        let mut buf = vec![0u8; 1000];
        lazy.read_exact_at(&mut buf, 0, false).unwrap();
        assert_eq!(buf, vec![1u8; 1000]);
        // The same file, reached through a link put in its place: refused, for good.
        let path = dir.path().join("data");
        std::fs::rename(&linked, &path).unwrap();
        std::os::unix::fs::symlink(&path, &linked).unwrap();
        let err = lazy.read_exact_at(&mut buf, 0, false).unwrap_err();
        assert!(
            err.to_string().contains("symbolic link now stands"),
            "{err}"
        );
        std::fs::remove_file(&linked).unwrap();
        std::fs::rename(&path, &linked).unwrap();
        assert!(lazy.check().is_err(), "a change is for good");
    }

    #[test]
    fn opening_checks_the_identity_recorded_before() {
        let dir = tempdir();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let before = Identity::of_path(&path).unwrap();
        overwrite(&path, 0, &[2u8; 2000]);
        let err = SourceFile::open(&path, Some(before)).unwrap_err();
        assert!(err.to_string().contains("size 1000 → 2000"), "{err}");
        assert_eq!(SourceFile::open(&path, None).unwrap().size(), 2000);
    }
}
