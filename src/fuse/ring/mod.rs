//! FUSE over io_uring (Linux 6.14+, where the fuse module's `enable_uring` is on; the
//! protocol is the kernel's `Documentation/filesystems/fuse-io-uring.rst`): instead of
//! reading each request from `/dev/fuse` and writing each reply back (two system calls), a
//! server registers ring entries, each a header buffer and a payload buffer, on one queue
//! per CPU; the kernel writes a request into an entry of the queue of the CPU it came from
//! and completes that entry's command; the server writes the reply into the same buffers and
//! commits it, fetching the next request in the same call.
//!
//! Here each serving thread owns one io_uring with one entry on one queue, so a thread
//! serves one request at a time, as a `/dev/fuse` thread does, and waits in one system call
//! per request. Every queue gets `threads` of them. fuser's session still negotiates INIT and
//! reads `/dev/fuse`, which the kernel keeps using for FORGET and INTERRUPT.
//!
//! Once INIT agreed to the ring, the kernel holds every request until each queue has an
//! entry; if a registration fails it gives up on the ring and serves `/dev/fuse`
//! instead. So the ring is asked for only after [`Plan::probe`] showed this process can run
//! one, and a failed registration is logged once and leaves the mount to `/dev/fuse`.

mod abi;
mod dispatch;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::Errno;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::dev::MAX_WRITE;
use super::{panics, LorafsFs};
pub(super) use dispatch::Users;

/// Each entry's payload buffer: the kernel requires the largest request or reply it may
/// send, `max_write` or `max_pages` pages. lorafs sets `max_write` to 1 MiB, and fuser asks
/// for the pages of max(`max_write`, `max_readahead`), the latter 128 KiB as the kernel
/// offers it at INIT; a kernel wanting more refuses the registration, and the mount falls
/// back to `/dev/fuse` (logged).
const PAYLOAD: usize = MAX_WRITE as usize;

/// More queues than this means a machine with many possible CPUs; a thread per queue
/// would cost more than the ring saves, so it is not used there.
const MAX_QUEUES: usize = 256;

/// Serving threads in all, at most (but one per queue at least): `--threads` per queue
/// would be the square of the cores on a large machine.
const MAX_THREADS: usize = 64;

/// How the ring is laid out on this machine.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    /// One per possible CPU, as the kernel makes them.
    pub queues: usize,
    /// Serving threads (each with one entry) per queue.
    pub threads: usize,
}

impl Plan {
    /// The plan for `threads` serving threads per queue (fewer where the queues are many:
    /// [`MAX_THREADS`]), if this process can run a ring:
    /// the CPUs the kernel makes queues for are known, and an io_uring with 128-byte entries
    /// (the FUSE command's size) can be set up.
    pub fn probe(threads: usize) -> Result<Plan, String> {
        let queues = possible_cpus().map_err(|e| format!("possible CPUs unknown: {e}"))?;
        if queues == 0 || queues > MAX_QUEUES {
            return Err(format!("{queues} possible CPUs (queues)"));
        }
        new_ring().map_err(|e| format!("io_uring unavailable: {e}"))?;
        Ok(Plan {
            queues,
            threads: threads_per_queue(threads, queues),
        })
    }
}

/// The running ring: told when its threads should stop registering again (the mount ends).
pub(super) struct Ring {
    stopping: Arc<AtomicBool>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// Start serving `fs` on the ring of `dev` (the mount's `/dev/fuse`, after INIT agreed to the
/// ring). Each thread registers its entry and serves; a registration the kernel refuses is
/// logged, and the mount is served through `/dev/fuse`.
pub(super) fn serve(
    plan: Plan,
    dev: Arc<OwnedFd>,
    fs: Arc<LorafsFs>,
    users: Users,
) -> io::Result<Ring> {
    let stopping = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicBool::new(false));
    fs.uring.store(true, Ordering::Relaxed);
    for qid in 0..plan.queues {
        for t in 0..plan.threads {
            let queue = Queue {
                qid: qid as u16,
                dev: dev.clone(),
                fs: fs.clone(),
                users,
                stopping: stopping.clone(),
                refused: refused.clone(),
            };
            std::thread::Builder::new()
                .name(format!("lorafs-ring-{qid}.{t}"))
                .spawn(move || queue.run())?;
        }
    }
    log::info!(
        "serving through FUSE over io_uring: {} queues x {} threads, {} KiB payload buffers",
        plan.queues,
        plan.threads,
        PAYLOAD >> 10
    );
    Ok(Ring { stopping })
}

/// How many times a serving thread replaces a failed ring before it gives up (each time
/// costs a payload buffer, never freed; the waits between add up to 2.5 s).
const RESTARTS: u32 = 8;

/// What a serving thread does after the kernel failed its command.
enum After {
    /// End quietly: the mount ended, or the kernel refused the ring at start-up.
    Stop,
    /// Register the entry again.
    Register,
    /// Give the ring up (why): the thread starts over on a new one.
    Fail(String),
}

/// A serving thread's place in the ring.
struct Queue {
    qid: u16,
    dev: Arc<OwnedFd>,
    fs: Arc<LorafsFs>,
    users: Users,
    stopping: Arc<AtomicBool>,
    /// Set by the first thread whose registration the kernel refused: the others stay quiet.
    refused: Arc<AtomicBool>,
}

/// A ring entry's buffers, registered with the kernel and valid as long as the ring.
struct Entry {
    header: Box<[u8; abi::HEADER_BYTES]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

impl Entry {
    fn new(payload: usize) -> Entry {
        let mut header = Box::new([0u8; abi::HEADER_BYTES]);
        let mut payload = vec![0u8; payload];
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ]);
        Entry {
            header,
            payload,
            iov,
        }
    }
}

impl Queue {
    /// Serve until the mount ends. A ring that fails (an error no request caused) is
    /// replaced by a new one with a new entry, a few times, so that a queue is not left
    /// without entries: the kernel would hold its CPU's requests for ever, since a
    /// connection cannot go back to `/dev/fuse`.
    fn run(self) {
        for restart in 0..=RESTARTS {
            let mut entry = Entry::new(PAYLOAD);
            let Err(why) = self.serve_ring(&mut entry, restart == 0) else {
                return;
            };
            // The failed ring may still point at the entry's buffers: never freed.
            std::mem::forget(entry);
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if restart == RESTARTS {
                return log::error!(
                    "ring queue {}: {why}; giving up after {RESTARTS} new rings",
                    self.qid
                );
            }
            log::error!("ring queue {}: {why}; serving on a new ring", self.qid);
            std::thread::sleep(std::time::Duration::from_millis(10 << restart));
        }
    }

    /// Serve on a new ring with `entry` until the mount ends or the ring is refused (`Ok`),
    /// or the ring fails (`Err`, why). `first`: the thread's first ring, whose first
    /// registration the kernel may refuse (the mount then falls back to `/dev/fuse`). The
    /// ring is dropped before the caller's `entry`.
    fn serve_ring(&self, entry: &mut Entry, first: bool) -> Result<(), String> {
        let mut ring = new_ring().map_err(|e| format!("io_uring setup failed: {e}"))?;
        let mut next = register(self.dev.as_raw_fd(), self.qid, entry);
        let mut registering = true;
        let mut served = false;
        loop {
            // SAFETY: the entry's buffers and iovecs, which the command points to, outlive
            // the ring: `entry` is the caller's, and forgotten if the ring fails.
            unsafe { ring.submission().push(&next) }
                .map_err(|e| format!("submission queue full: {e}"))?;
            let result = completion(&mut ring).map_err(|e| format!("io_uring_enter: {e}"))?;
            if result < 0 {
                let err = io::Error::from_raw_os_error(-result);
                match self.recover(err, registering, first && !served) {
                    After::Stop => return Ok(()),
                    After::Fail(why) => return Err(why),
                    After::Register => {}
                }
                next = register(self.dev.as_raw_fd(), self.qid, entry);
                registering = true;
                continue;
            }
            (registering, served) = (false, true);
            let commit_id = abi::commit_id(&entry.header);
            self.serve_one(entry);
            next = commit(self.dev.as_raw_fd(), self.qid, commit_id);
        }
    }

    /// After the kernel completed this thread's command with `err`: what next. The end of
    /// the mount ends the thread quietly; a refused registration at start-up (`starting`)
    /// leaves the mount to `/dev/fuse` (logged once), one refused later fails the ring; a
    /// failed commit costs the entry, which is registered again.
    fn recover(&self, err: io::Error, registering: bool, starting: bool) -> After {
        let ended = matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECANCELED | libc::ENODEV | libc::ECONNABORTED)
        );
        if ended || self.stopping.load(Ordering::Relaxed) {
            log::debug!("ring queue {}: stopped ({err})", self.qid);
            return After::Stop;
        }
        if registering && !starting {
            return After::Fail(format!("the kernel refused the entry ({err})"));
        }
        if registering {
            self.fs.uring.store(false, Ordering::Relaxed);
            if !self.refused.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "FUSE over io_uring: the kernel refused a ring entry ({err}); \
                     serving through /dev/fuse"
                );
            }
            return After::Stop;
        }
        log::error!(
            "ring queue {}: a commit failed ({err}); registering again",
            self.qid
        );
        After::Register
    }

    /// Answer the request in `entry` and write the reply over it. A bug costs the request
    /// (EIO), not the thread.
    fn serve_one(&self, entry: &mut Entry) {
        let Entry {
            header, payload, ..
        } = entry;
        let unique = abi::unique(header);
        let result = match abi::Request::parse(header, payload) {
            None => {
                log::error!("ring request {unique}: payload size past the buffer; EIO");
                Err(Errno::EIO)
            }
            Some(req) => {
                let answered =
                    panics::catch(|| dispatch::answer(&self.fs, self.users, &req, payload));
                answered.unwrap_or_else(|| {
                    let op = req.header.opcode;
                    log::error!("FUSE opcode {op} panicked; the request got EIO");
                    Err(Errno::EIO)
                })
            }
        };
        match result {
            Ok(n) => abi::set_reply(header, unique, 0, n),
            Err(errno) => abi::set_reply(header, unique, -i32::from(errno), 0),
        }
    }
}

fn new_ring() -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    // As libfuse sets its rings up: one thread submits, and the kernel's work for it runs
    // when that thread waits (no interrupt to run it earlier).
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(2)
}

/// Submit what is queued and wait for the one command in flight to complete: its result.
fn completion(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>) -> io::Result<i32> {
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result());
        }
    }
}

/// The command registering `entry` on queue `qid` of `dev`.
fn register(dev: RawFd, qid: u16, entry: &Entry) -> squeue::Entry128 {
    let mut sqe = opcode::UringCmd80::new(types::Fd(dev), abi::CMD_REGISTER)
        .cmd(abi::cmd_req(0, qid))
        .addr(Some(entry.iov.as_ptr() as u64))
        .build();
    // FUSE takes the number of iovecs in the SQE's `len`, which io-uring's builder has no
    // setter for.
    // SAFETY: `Entry128` is `#[repr(C)]` and starts with the kernel's `struct io_uring_sqe`,
    // whose `__u32 len` is at byte 24 (include/uapi/linux/io_uring.h); the write stays
    // within the 128-byte value.
    unsafe {
        let sqe_bytes = (&mut sqe as *mut squeue::Entry128).cast::<u8>();
        sqe_bytes.add(24).cast::<u32>().write_unaligned(2);
    }
    sqe
}

/// The command committing the reply to request `commit_id` and fetching the next.
fn commit(dev: RawFd, qid: u16, commit_id: u64) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev), abi::CMD_COMMIT_AND_FETCH)
        .cmd(abi::cmd_req(commit_id, qid))
        .build()
}

fn threads_per_queue(threads: usize, queues: usize) -> usize {
    threads.clamp(1, (MAX_THREADS / queues).max(1))
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1` or
/// `0-3,8`): the kernel makes one queue for each.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    count_cpus(text.trim()).ok_or_else(|| io::Error::other(format!("unreadable: {text:?}")))
}

fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for range in list.split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
        count += last.checked_sub(first)? + 1;
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_threads_per_queue() {
        assert_eq!(threads_per_queue(2, 2), 2);
        assert_eq!(threads_per_queue(0, 2), 1);
        assert_eq!(threads_per_queue(16, 16), 4);
        assert_eq!(threads_per_queue(64, 64), 1);
        assert_eq!(threads_per_queue(8, 200), 1, "one a queue, however many");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-1"), Some(2));
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus(""), None);
    }
}
