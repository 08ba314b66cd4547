//! Running a fuzz target: how many cases, which seed, and the properties every call into
//! lorafs must keep whatever the input.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use crate::alloc;

/// Cases per target when `LORAFS_FUZZ_CASES` is not set: 2 to 10 s per target in a release
/// build on a 2-core machine, about 30 s for all five, so that CI can afford it on every run.
const DEFAULT_CASES: u32 = 10_000;

/// Heap one call may use. Every input is under a few MiB of real bytes and the base is a
/// few KiB, so what lorafs legitimately needs is well under a MiB; the bound leaves room for
/// a regex or two compiled at the `regex` crate's default size limit (10 MiB), not for
/// memory that grows with what a header declares.
pub const HEAP_BOUND: usize = 32 << 20;

/// Time one call may take: these inputs need milliseconds; seconds mean work that grows with
/// what a header declares. Unoptimised builds get more.
pub fn time_bound() -> Duration {
    Duration::from_secs(if cfg!(debug_assertions) { 10 } else { 2 })
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

/// Run `test` on `LORAFS_FUZZ_CASES` inputs from `strategy`, each with a fresh temporary
/// directory for its files. On a failure proptest shrinks the input; the panic message
/// shows the smallest failing one and the seed (`LORAFS_FUZZ_SEED`) that replays the run.
///
/// With `LORAFS_FUZZ_KEEP_GOING=1` a failure does not stop the run: every distinct kind of
/// failure is listed with its first input (not shrunk), and the test fails at the end.
/// With `LORAFS_FUZZ_VERBOSE=1` the outcomes (success, or the error) are counted and shown.
pub fn fuzz<S>(
    target: &str,
    strategy: S,
    test: impl Fn(&Path, S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let _alone = alloc::alone();
    let cases = env_number("LORAFS_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n as u32);
    let seed = env_number("LORAFS_FUZZ_SEED").unwrap_or_else(rand::random);
    let keep_going = env_number("LORAFS_FUZZ_KEEP_GOING").is_some_and(|n| n != 0);
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // Failures become named regression tests (tests/fuzz/regressions.rs), so proptest's
        // own persistence files would only be clutter.
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    OUTCOMES.with_borrow_mut(BTreeMap::clear);
    let failures = RefCell::new(Failures::default());
    let result = TestRunner::new(config).run(&strategy, |input| {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(format!("tempdir: {e}")))?;
        if !keep_going {
            return test(dir.path(), input);
        }
        let shown = format!("{input:#?}");
        if let Err(err) = test(dir.path(), input) {
            failures.borrow_mut().note(&err, dir.path(), shown);
        }
        Ok(())
    });
    if env_number("LORAFS_FUZZ_VERBOSE").is_some_and(|n| n != 0) {
        eprintln!("fuzz target {target}: {cases} cases, outcomes:");
        OUTCOMES.with_borrow(|outcomes| {
            for (what, n) in outcomes {
                eprintln!("{n:8}  {what}");
            }
        });
    }
    let replay = format!("replay: LORAFS_FUZZ_SEED={seed} LORAFS_FUZZ_CASES={cases}");
    if let Err(err) = result {
        panic!("fuzz target {target}: {err}\n{replay}");
    }
    let failures = failures.into_inner();
    if !failures.0.is_empty() {
        panic!("fuzz target {target}: {failures}\n{replay}");
    }
}

/// The failures of a `LORAFS_FUZZ_KEEP_GOING` run: per kind, how many and the first.
#[derive(Default)]
struct Failures(BTreeMap<String, (usize, String)>);

impl Failures {
    fn note(&mut self, err: &TestCaseError, dir: &Path, input: String) {
        let what = err.to_string().replace(&dir.display().to_string(), "DIR");
        let first = format!("{what}\ninput: {input}");
        self.0.entry(kind(&what)).or_insert((0, first)).0 += 1;
    }
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} kinds of failure", self.0.len())?;
        for (n, first) in self.0.values() {
            write!(f, "\n\n{n} case(s), the first: {first}")?;
        }
        Ok(())
    }
}

thread_local! {
    /// Outcomes of this thread's target, by kind (see [`kind`]), for `LORAFS_FUZZ_VERBOSE`.
    /// A target's cases all run on its test's thread.
    static OUTCOMES: RefCell<BTreeMap<String, usize>> = const { RefCell::new(BTreeMap::new()) };
}

/// The first line of a message with what varies between inputs taken out (numbers, names
/// in backticks or quotes, the temporary directory), so that messages of one kind count
/// together.
fn kind(message: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    for c in message.lines().next().unwrap_or("").chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(c);
            }
            Some(_) => {}
            None if c == '`' || c == '"' => {
                quote = Some(c);
                out.push(c);
                out.push('…');
            }
            None if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            None => out.push(c),
        }
    }
    without_temp_dirs(&out).chars().take(110).collect()
}

/// `text` without the temporary directories of the cases (`/tmp/.tmpAbC123`).
fn without_temp_dirs(text: &str) -> String {
    let tmp = std::env::temp_dir().join(".tmp").display().to_string();
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(&tmp) {
        out.push_str(&rest[..at]);
        let after = &rest[at + tmp.len()..];
        let name = after.find(|c: char| !c.is_ascii_alphanumeric() && c != '#');
        rest = &after[name.unwrap_or(after.len())..];
        out.push_str("TMP");
    }
    out.push_str(rest);
    out
}

fn tally(outcome: String) {
    OUTCOMES.with_borrow_mut(|o| *o.entry(outcome).or_default() += 1);
}

/// A failure to prepare a case's files (the harness's fault, not lorafs's).
pub fn setup(err: std::io::Error) -> TestCaseError {
    TestCaseError::fail(format!("writing the case's files: {err}"))
}

/// Call lorafs on a prepared case and check what must hold for any input: it returns (no
/// panic), an error is one non-empty line of text (no control characters: no newline, no
/// terminal escape), and the call stays within [`HEAP_BOUND`] and [`time_bound`].
pub fn check<T, E: std::fmt::Display>(
    dir: &Path,
    call: impl FnOnce() -> Result<T, E>,
) -> Result<(), TestCaseError> {
    check_within(dir, 0, call)
}

/// [`check`], with `allowance` bytes of heap on top of [`HEAP_BOUND`]: for a case whose valid
/// input calls for memory in proportion to what it declares (the factors of a rank far above
/// the weight's dimensions are valid PEFT, and are held as f32).
pub fn check_within<T, E: std::fmt::Display>(
    dir: &Path,
    allowance: usize,
    call: impl FnOnce() -> Result<T, E>,
) -> Result<(), TestCaseError> {
    let label = format!("its files are in {}", dir.display());
    let (outcome, cost) = alloc::measure(&label, || catch_unwind(AssertUnwindSafe(call)));
    match outcome {
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(not a string)");
            return Err(TestCaseError::fail(format!("panicked: {what}")));
        }
        Ok(Err(err)) => {
            let message = err.to_string();
            tally(kind(&message));
            if message.trim().is_empty() || message.chars().any(char::is_control) {
                return Err(TestCaseError::fail(format!(
                    "error message is not one line of text ({}): {message:?}",
                    kind(&message)
                )));
            }
        }
        Ok(Ok(_)) => tally("(success)".to_string()),
    }
    if let Some(size) = cost.refused {
        return Err(TestCaseError::fail(format!(
            "asked for {size} bytes of heap in one allocation"
        )));
    }
    let bound = HEAP_BOUND + allowance;
    if cost.peak > bound {
        return Err(TestCaseError::fail(format!(
            "used {:.1} MiB of heap (bound {:.1} MiB)",
            cost.peak as f64 / (1 << 20) as f64,
            bound as f64 / (1 << 20) as f64
        )));
    }
    if cost.elapsed > time_bound() {
        return Err(TestCaseError::fail(format!(
            "took {:.1} s (bound {:?})",
            cost.elapsed.as_secs_f64(),
            time_bound()
        )));
    }
    Ok(())
}

/// The harness must be able to fail: each property, broken on purpose.
mod selftest {
    use super::*;

    fn failure(result: Result<(), TestCaseError>) -> String {
        match result {
            Ok(()) => panic!("check passed a call that breaks its property"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn check_reports_a_panic() {
        let _alone = alloc::alone();
        let dir = Path::new("/nonexistent");
        let err = failure(check(dir, || -> lorafs::Result<()> { panic!("boom") }));
        assert!(err.contains("panicked: boom"), "{err}");
    }

    #[test]
    fn check_reports_an_error_that_is_not_one_line_of_text() {
        let _alone = alloc::alone();
        let dir = Path::new("/nonexistent");
        let error = |what: &'static str| {
            move || -> Result<(), std::io::Error> { Err(std::io::Error::other(what)) }
        };
        for bad in ["a\nb", "red \u{1b}[31m", "", " "] {
            assert!(
                failure(check(dir, error(bad))).contains("not one line"),
                "{bad:?}"
            );
        }
        assert!(check(dir, error("a: b `c`")).is_ok());
    }

    #[test]
    fn check_reports_heap_over_the_bound_even_if_freed() {
        let _alone = alloc::alone();
        let dir = Path::new("/nonexistent");
        let err = failure(check(dir, || -> lorafs::Result<()> {
            // Twice the bound: other threads (libtest's) may free a little meanwhile.
            let v = vec![1u8; 2 * HEAP_BOUND];
            drop(std::hint::black_box(v));
            Ok(())
        }));
        assert!(err.contains("MiB of heap"), "{err}");
        assert!(check(dir, || -> lorafs::Result<()> {
            drop(std::hint::black_box(vec![1u8; HEAP_BOUND / 2]));
            Ok(())
        })
        .is_ok());
    }

    #[test]
    fn measure_counts_other_threads() {
        let _alone = alloc::alone();
        let (_, cost) = alloc::measure("selftest", || {
            std::thread::spawn(|| drop(std::hint::black_box(vec![1u8; 8 << 20])))
                .join()
                .unwrap()
        });
        // Less a little that libtest's threads may free meanwhile.
        assert!(cost.peak >= 7 << 20, "peak {}", cost.peak);
    }
}
