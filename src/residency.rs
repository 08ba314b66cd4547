//! How much of a file is in the page cache: `cachestat(2)` (Linux 6.5+), else `mincore(2)`
//! over a mapping that is never read.
//!
//! `--direct-io auto` asks this of every base file when a mount opens, so it is on the
//! mount's critical path: `mincore` looks up each 4 KiB page of the file on its own,
//! `cachestat` walks the page cache by folio, which for a large file on ext4 or xfs (large
//! folios) is a small fraction of the lookups.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Bytes of `file` (of `size` bytes) in the page cache now, in whole pages; `None` where the
/// kernel cannot say.
pub fn cached_bytes(file: &File, size: u64) -> Option<u64> {
    if size == 0 {
        return Some(0);
    }
    by_cachestat(file)
        .or_else(|| by_mincore(file, size))
        .map(|bytes| bytes.min(size))
}

/// `cachestat`'s system call number: 451 in the table every architecture shares for calls
/// added since Linux 5.1 (the libc crate does not name it on every target yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of `<linux/mman.h>`: `len` 0 means to the end of the file.
#[repr(C)]
struct Range {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`, in pages.
#[repr(C)]
#[derive(Default)]
struct Stat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The page cache's count of the whole file, or `None` on a kernel without `cachestat`
/// (`ENOSYS`) or a file it does not count (hugetlbfs: `EOPNOTSUPP`).
fn by_cachestat(file: &File) -> Option<u64> {
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: the descriptor is open for the call; `range` and `stat` are live, properly laid
    // out kernel structures (read and written only during the call); flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    (rc == 0).then(|| stat.nr_cache * page_size())
}

/// One status byte per page of a mapping of the file that is never read, a gigabyte of the
/// file at a time.
fn by_mincore(file: &File, size: u64) -> Option<u64> {
    // SAFETY: the mapping is handed to mincore only, never read, so a change of the file
    // under it (which Mmap::map cannot exclude) cannot be observed through it.
    let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
    let page = usize::try_from(page_size()).ok()?;
    let pages = usize::try_from(size).ok()?.div_ceil(page);
    let mut status = vec![0u8; pages.min((1 << 30) / page)];
    let mut cached = 0u64;
    for part in map.chunks(status.len() * page) {
        // SAFETY: `part` lies in the mapping and starts on a page boundary (the mapping does,
        // and the parts are whole pages); `status` has a byte for each of its pages.
        let rc = unsafe { libc::mincore(part.as_ptr() as *mut _, part.len(), status.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        let resident = status[..part.len().div_ceil(page)].iter();
        cached += resident.filter(|&&s| s & 1 != 0).count() as u64;
    }
    Some(cached * page as u64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, taken as 4 KiB.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes on disk (/var/tmp, where /tmp may be tmpfs, whose pages are the
    /// file and cannot be evicted); `None` (and a line saying so) on tmpfs.
    fn disk_file(dir: &tempfile::TempDir, len: u64) -> Option<File> {
        let path = dir.path().join("data");
        std::fs::write(&path, vec![5u8; len as usize]).unwrap();
        if rustix::fs::statfs(&path).unwrap().f_type == libc::TMPFS_MAGIC {
            eprintln!(
                "skipping: {} is on tmpfs, whose pages cannot be evicted",
                path.display()
            );
            return None;
        }
        Some(File::open(&path).unwrap())
    }

    fn evict(file: &File) {
        file.sync_all().unwrap();
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    #[test]
    fn both_counts_agree_on_a_file_cached_in_part() {
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let size = 8 << 20;
        let Some(file) = disk_file(&dir, size) else {
            return;
        };
        evict(&file);
        assert_eq!(by_mincore(&file, size), Some(0));
        // Read the second quarter back into the page cache.
        let mut buf = vec![0u8; 2 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 2 << 20).unwrap();
        let mincore = by_mincore(&file, size).unwrap();
        assert!((2 << 20..size).contains(&mincore), "{mincore} bytes cached");
        match by_cachestat(&file) {
            Some(cachestat) => assert_eq!(cachestat, mincore),
            None => eprintln!("this kernel has no cachestat: mincore alone checked"),
        }
        assert_eq!(cached_bytes(&file, size), Some(mincore));
    }

    #[test]
    fn a_count_is_never_more_than_the_file() {
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let path = dir.path().join("odd");
        std::fs::write(&path, vec![1u8; 5000]).unwrap();
        let file = File::open(&path).unwrap();
        let mut buf = vec![0u8; 5000];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0).unwrap();
        assert_eq!(
            cached_bytes(&file, 5000),
            Some(5000),
            "two pages, cut to the size"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(cached_bytes(&File::open(&empty).unwrap(), 0), Some(0));
    }
}
