//! A counting global allocator: the peak of heap bytes in use while one fuzz case runs.
//!
//! The counters are process-wide, so that work a call hands to other threads counts too
//! (a thread-local counter would miss it); in exchange the tests of this binary must not
//! overlap: each holds [`alone`] throughout, and [`measure`] a lock for the call.
//! Memory-mapped file pages are not heap and are not counted; nor is anything before or
//! after the measured call (the case's generation, its files).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A single request above this is refused outright while a case runs (the allocator
/// returns null, so an infallible allocation aborts the process): nothing a fuzz input can
/// justify is this large, and granting it could take the machine's memory with it.
pub const HARD_CAP: usize = 1 << 30;

pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
/// The largest request refused during the current case (0: none).
static REFUSED: AtomicUsize = AtomicUsize::new(0);
/// What the current case is, printed if a refusal aborts (set and freed by [`measure`]).
static LABEL: AtomicPtr<String> = AtomicPtr::new(std::ptr::null_mut());

impl Counting {
    /// Whether a request of `size` bytes may go ahead; records and reports it if not.
    fn admit(size: usize) -> bool {
        if size <= HARD_CAP || !ARMED.load(Ordering::Relaxed) {
            return true;
        }
        REFUSED.fetch_max(size, Ordering::Relaxed);
        report_refusal(size);
        false
    }

    fn grew(size: usize) {
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(size: usize) {
        CURRENT.fetch_sub(size, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, and only
// adds atomic bookkeeping (which never allocates), or returns null, which the
// `GlobalAlloc` contract allows for any request.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this wrapper) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's pointer, layout and size, as `GlobalAlloc::realloc` requires.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::grew(new_size);
            Self::shrank(layout.size());
        }
        p
    }
}

/// Write "refused N bytes" and the case's label to stderr without allocating (we are inside
/// the allocator): if the refusal aborts the process, this is what says which input did it.
fn report_refusal(size: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    write_stderr(b"\nlorafs fuzz: refused a heap allocation of ");
    write_stderr(&digits[i..]);
    write_stderr(b" bytes; case: ");
    let label = LABEL.load(Ordering::Relaxed);
    if !label.is_null() {
        // SAFETY: LABEL only ever holds a pointer from `Box::into_raw` that `measure` frees
        // after clearing LABEL, and `measure` runs one case at a time (under CASE_LOCK).
        write_stderr(unsafe { (*label).as_bytes() });
    }
    write_stderr(b"\n");
}

fn write_stderr(bytes: &[u8]) {
    // SAFETY: writes `bytes.len()` bytes from a valid slice to fd 2; a short or failed write
    // only loses diagnostics.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// What one measured call cost.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Peak heap bytes in use above what was in use when the call started.
    pub peak: usize,
    /// The largest single request that was refused (above [`HARD_CAP`]), if any.
    pub refused: Option<usize>,
    pub elapsed: Duration,
}

static CASE_LOCK: Mutex<()> = Mutex::new(());
static TEST_LOCK: Mutex<()> = Mutex::new(());

/// Hold this for a whole test so that no other test of this binary runs meanwhile: the
/// counters are process-wide, so another test's allocations (or frees) during a measured
/// call would count as the call's, and its CPU use would count against the time bound.
pub fn alone() -> MutexGuard<'static, ()> {
    // A test that failed while holding it poisons nothing: there is no data behind it.
    TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` alone, and measure its peak heap use and time. `label` (e.g. where the case's
/// files are) is printed if the process aborts on a refused allocation.
pub fn measure<T>(label: &str, f: impl FnOnce() -> T) -> (T, Cost) {
    // A case that panicked poisons nothing we rely on: the counters are atomics.
    let _guard = CASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let label = Box::into_raw(Box::new(label.to_string()));
    LABEL.store(label, Ordering::SeqCst);
    REFUSED.store(0, Ordering::SeqCst);
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    ARMED.store(false, Ordering::SeqCst);
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(base);
    let refused = REFUSED.swap(0, Ordering::SeqCst);
    LABEL.store(std::ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: `label` came from `Box::into_raw` above and LABEL no longer points to it.
    drop(unsafe { Box::from_raw(label) });
    let refused = (refused > 0).then_some(refused);
    (
        out,
        Cost {
            peak,
            refused,
            elapsed,
        },
    )
}
