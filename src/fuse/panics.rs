//! Surviving our own bugs: a panic costs one request or one piece of background work, is
//! logged, and never takes the mount down.
//!
//! Left alone, fuser 0.18 lets a panicking callback end its worker thread (the request gets
//! EIO as the reply is dropped), and `Session::run` returns as soon as it joins a panicked
//! worker, which unmounts; `rayon::spawn` aborts the process on a panic. So every callback
//! runs under [`caught`], the server's rayon pool has a panic handler, and the warm-up
//! thread catches its own.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

/// Panics caught in this process (requests answered with EIO, background work dropped),
/// shown in the stats file.
static CAUGHT: AtomicU64 = AtomicU64::new(0);

pub fn caught_count() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// Set up a server process: panics are logged through `log` (a background server's stderr is
/// its log file, or nothing), and the global rayon pool, which prefetch uses, drops a
/// panicking task instead of aborting. Call before anything uses rayon.
pub fn init_server_process() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
            _ => String::new(),
        };
        log::error!(
            "thread {} {}{backtrace}",
            thread.name().unwrap_or("unnamed"),
            info.to_string().replace('\n', " ")
        );
    }));
    if let Err(err) = background_pool().build_global() {
        // Only if something built it first: prefetch panics would then abort.
        log::error!("rayon pool already set up, its panics are not caught: {err}");
    }
}

/// The rayon pool of a server: each panic in a spawned task is counted and logged (the hook
/// has logged where it happened), and the worker goes on with the next task.
pub fn background_pool() -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("lorafs-bg-{i}"))
        .panic_handler(|_payload| {
            CAUGHT.fetch_add(1, Ordering::Relaxed);
            log::error!("background task panicked; it was dropped, the mount keeps serving");
        })
}

/// Run `work`; `None` if it panicked (counted; the hook has logged where).
pub fn catch<T>(work: impl FnOnce() -> T) -> Option<T> {
    // The filesystem's shared state is either immutable or behind poison-tolerant locks, so
    // observing it after a panic is sound.
    let result = catch_unwind(AssertUnwindSafe(work));
    if result.is_err() {
        CAUGHT.fetch_add(1, Ordering::Relaxed);
    }
    result.ok()
}

/// Run `work` (a FUSE callback's body, which owns its reply); if it panics, log it and
/// return. The unanswered reply, dropped while unwinding, answers the request with EIO, and
/// the worker thread lives on.
pub fn caught(what: &str, work: impl FnOnce()) {
    if catch(work).is_none() {
        log::error!("{what} panicked; the request got EIO, the mount keeps serving");
    }
}

/// Run `work` on this background thread; if it panics, log it and return `false`.
pub fn caught_background(what: &str, work: impl FnOnce()) -> bool {
    let ok = catch(work).is_some();
    if !ok {
        log::error!("{what} panicked and stopped; the mount keeps serving");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Stands for a fuser reply: answers (here: reports) when dropped unanswered.
    struct Reply(mpsc::Sender<&'static str>);

    impl Drop for Reply {
        fn drop(&mut self) {
            let _ = self.0.send("EIO");
        }
    }

    #[test]
    fn a_panicking_callback_costs_its_request_only() {
        let before = caught_count();
        let (tx, rx) = mpsc::channel();
        let reply = Reply(tx);
        caught("lookup", move || {
            let _owned = reply;
            panic!("bug in a callback");
        });
        assert_eq!(rx.try_recv(), Ok("EIO"), "the dropped reply answered");
        assert!(caught_count() > before);
        let mut ran = false;
        caught("getattr", || ran = true);
        assert!(ran, "the next callback runs");
    }

    #[test]
    fn a_panicking_background_task_is_dropped_and_the_pool_goes_on() {
        let before = caught_count();
        let pool = background_pool().num_threads(1).build().unwrap();
        pool.spawn(|| panic!("bug in prefetch"));
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || tx.send(()).unwrap());
        // Without the handler, rayon aborts this test binary at the first spawn.
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the same worker runs the next task");
        assert!(caught_count() > before);
    }

    #[test]
    fn a_panicking_background_thread_reports_it() {
        let before = caught_count();
        assert!(!caught_background("warm-up", || panic!("bug in warm-up")));
        assert!(caught_background("warm-up", || {}));
        assert!(caught_count() > before);
    }
}
