//! Asking the kernel to read base bytes into the page cache ahead of their readers.
//!
//! Where the base is read through the page cache, the kernel reads ahead of each reader of
//! the base file on its own, as long as the reads look sequential. A view's file is often
//! not read that way from the base: a GGUF file holds each layer's tensors in another order
//! than the safetensors file, a merged block's rows sit among others, and the block
//! computations of several threads read one descriptor at several offsets at once. Then
//! the kernel reads little ahead, and a cold load waits on the disk a block at a time.
//!
//! So the view names the base bytes a sequential reader will need next (the ranges
//! [`crate::ahead`] stages where the base is read with `O_DIRECT`), and one thread asks the
//! kernel for them with `posix_fadvise(WILLNEED)`, which starts the reads and returns;
//! readers then find the bytes in the page cache. It is a hint and never more: a range
//! asked recently is not asked again, one that does not fit the queue is dropped, and a
//! failure is logged and ignored. Nothing is read into lorafs's memory.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::baseio::{SourceFile, Version};

/// Ranges waiting for the thread, at most (more are dropped: the reader is far behind).
const QUEUE: usize = 256;

/// Ranges remembered as asked: a range among them is not asked again. Ranges are about
/// 1 MiB, so this covers a few read-ahead windows of several readers.
const RECENT: usize = 1024;

/// A range to ask for.
struct Job {
    file: Arc<SourceFile>,
    start: u64,
    end: u64,
}

/// Ranges asked recently, by file version and start.
#[derive(Default)]
struct Recent {
    set: HashSet<(Version, u64)>,
    order: VecDeque<(Version, u64)>,
}

impl Recent {
    /// Remember `key`; false if it was remembered already.
    fn insert(&mut self, key: (Version, u64)) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn forget(&mut self, key: &(Version, u64)) {
        self.set.remove(key);
    }
}

#[derive(Default)]
struct State {
    recent: Recent,
    /// The thread's queue, once it is started; `None` before, and for good if it could not
    /// be started or has gone.
    queue: Option<SyncSender<Job>>,
    /// The thread could not be started or has gone: no more hints.
    gave_up: bool,
}

/// Base bytes asked of the page cache ahead of their readers: see the module's
/// documentation.
#[derive(Default)]
pub struct WillNeed {
    state: Mutex<State>,
    /// Bytes the kernel was asked to read.
    asked: Arc<AtomicU64>,
}

impl WillNeed {
    pub fn new() -> WillNeed {
        WillNeed::default()
    }

    /// Bytes the kernel was asked to read so far.
    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }

    /// Have the kernel start reading bytes `start .. end` of `file` into the page cache,
    /// unless they were asked for recently. Returns at once.
    pub fn ask(&self, file: &Arc<SourceFile>, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let key = (file.identity().version(), start);
        let mut state = self.lock();
        if state.gave_up || !state.recent.insert(key) {
            return;
        }
        let Some(queue) = self.queue(&mut state) else {
            return;
        };
        let job = Job {
            file: Arc::clone(file),
            start,
            end,
        };
        match queue.try_send(job) {
            Ok(()) => {}
            // Dropped: a later request for it may find room.
            Err(TrySendError::Full(_)) => state.recent.forget(&key),
            Err(TrySendError::Disconnected(_)) => {
                log::warn!("the read-ahead hint thread has gone: the kernel reads ahead alone");
                state.queue = None;
                state.gave_up = true;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is one step: a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread's queue, starting the thread the first time.
    fn queue<'a>(&self, state: &'a mut State) -> Option<&'a SyncSender<Job>> {
        if state.queue.is_none() {
            let (queue, jobs) = sync_channel::<Job>(QUEUE);
            let asked = Arc::clone(&self.asked);
            // The thread ends when the queue's sender goes, with this `WillNeed`.
            let spawned = std::thread::Builder::new()
                .name("lorafs-willneed".into())
                .spawn(move || {
                    for job in jobs {
                        match job.file.advise(job.start, job.end) {
                            Ok(()) => _ = asked.fetch_add(job.end - job.start, Ordering::Relaxed),
                            Err(err) => log::debug!(
                                "read-ahead hint for {} failed: {err}",
                                job.file.path.display()
                            ),
                        }
                    }
                });
            match spawned {
                Ok(_) => state.queue = Some(queue),
                Err(err) => {
                    // The kernel's own read-ahead still serves: slower, never wrong.
                    log::warn!("could not start the read-ahead hint thread: {err}");
                    state.gave_up = true;
                }
            }
        }
        state.queue.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn file_of(dir: &std::path::Path, len: usize) -> Arc<SourceFile> {
        let path = dir.join("w.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        f.sync_all().unwrap();
        Arc::new(SourceFile::open(&path, None).unwrap())
    }

    fn wait_asked(hints: &WillNeed, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while hints.asked() < bytes {
            assert!(
                Instant::now() < deadline,
                "asked {} of {bytes}",
                hints.asked()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn each_range_is_asked_once_while_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_of(dir.path(), 3 << 20);
        let hints = WillNeed::new();
        hints.ask(&file, 0, 1 << 20);
        hints.ask(&file, 0, 1 << 20);
        hints.ask(&file, 1 << 20, 3 << 20);
        hints.ask(&file, 5, 5);
        wait_asked(&hints, 3 << 20);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(hints.asked(), 3 << 20);
    }

    #[test]
    fn a_range_forgotten_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_of(dir.path(), 4096);
        let hints = WillNeed::new();
        hints.ask(&file, 0, 4096);
        wait_asked(&hints, 4096);
        // RECENT other ranges push the first one out (each waited for: the queue is
        // shorter).
        for i in 0..RECENT as u64 {
            hints.ask(&file, 1 + i, 2 + i);
            wait_asked(&hints, 4096 + i + 1);
        }
        hints.ask(&file, 0, 4096);
        wait_asked(&hints, 2 * 4096 + RECENT as u64);
    }

    /// Pages of `file` in the page cache.
    fn resident(file: &std::fs::File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: a shared read-only mapping of `len` bytes of an open file, only passed to
        // mincore (never read through: the file cannot shrink under it here) and unmapped
        // before returning; `vec` has one byte per page of it.
        unsafe {
            let fd = file.as_raw_fd();
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn the_bytes_asked_come_into_the_page_cache() {
        use std::os::fd::AsRawFd;
        // /var/tmp is disk-backed where /tmp may be tmpfs, whose pages cannot be dropped.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let len = 2 << 20;
        let source = file_of(dir.path(), len);
        let file = std::fs::File::open(&source.path).unwrap();
        // SAFETY: posix_fadvise on an open descriptor; DONTNEED only drops clean pages.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if resident(&file, len) > 0 {
            eprintln!("skipped: the file system keeps the file's pages (cannot start cold)");
            return;
        }
        let hints = WillNeed::new();
        hints.ask(&source, 1 << 20, 2 << 20);
        wait_asked(&hints, 1 << 20);
        let deadline = Instant::now() + Duration::from_secs(10);
        while resident(&file, len) < 256 {
            assert!(
                Instant::now() < deadline,
                "{} pages resident",
                resident(&file, len)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn what_is_remembered_is_bounded() {
        let mut recent = Recent::default();
        let dir = tempfile::tempdir().unwrap();
        let version = file_of(dir.path(), 1).identity().version();
        for i in 0..3 * RECENT as u64 {
            assert!(recent.insert((version, i)));
        }
        assert_eq!((recent.set.len(), recent.order.len()), (RECENT, RECENT));
        assert!(!recent.insert((version, 3 * RECENT as u64 - 1)));
        assert!(recent.insert((version, 0)));
    }
}
