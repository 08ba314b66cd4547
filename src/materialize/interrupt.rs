//! Signals during `materialize`: SIGINT, SIGTERM and SIGHUP, and every other signal whose
//! default action ends the process without a core dump (SIGUSR1, SIGALRM, the real-time
//! signals ...). That action would end the run at once and leave the temporary directory
//! behind until the next run; instead they set a flag that the write loop checks per chunk,
//! so the run stops, removes what it wrote and reports the signal. SIGXFSZ (a file-size
//! limit) is caught too, so the write fails with EFBIG and the run cleans up. Not caught:
//! SIGKILL and SIGSTOP (cannot be), SIGQUIT (asks for a core dump), SIGPIPE (Rust ignores
//! it), and the faults (SIGSEGV ...), which are bugs.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use libc::{
    SIGALRM, SIGHUP, SIGINT, SIGIO, SIGPROF, SIGPWR, SIGSTKFLT, SIGTERM, SIGUSR1, SIGUSR2,
    SIGVTALRM, SIGXCPU, SIGXFSZ,
};

use crate::error::{Error, Result};

/// The named signals that stop a run cleanly; the real-time ones are added in
/// [`Interrupt::on_signals`].
const SIGNALS: [i32; 13] = [
    SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR,
    SIGSTKFLT, SIGXCPU, SIGXFSZ,
];

/// The signal that asked a run to stop, if any (0: none). The default is never set: a library
/// caller that does not install handlers gets a run that cannot be interrupted this way.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    /// A flag that SIGINT, SIGTERM, SIGHUP and the other signals above set from now on, for
    /// the rest of the process (they no longer end it by themselves).
    pub fn on_signals() -> std::io::Result<Interrupt> {
        let flag = Interrupt::default();
        let realtime = libc::SIGRTMIN()..=libc::SIGRTMAX();
        for signal in SIGNALS.into_iter().chain(realtime) {
            signal_hook::flag::register_usize(signal, Arc::clone(&flag.0), signal as usize)?;
        }
        Ok(flag)
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => i32::try_from(signal).ok(),
        }
    }

    /// Ok while no signal came; otherwise the error that ends the run writing `out`.
    pub(super) fn check(&self, out: &Path) -> Result<()> {
        match self.signal() {
            None => Ok(()),
            Some(signal) => Err(Error::Output {
                path: out.to_path_buf(),
                what: format!(
                    "interrupted by {}; the unfinished output was removed",
                    signal_hook::low_level::signal_name(signal)
                        .map_or_else(|| format!("signal {signal}"), String::from)
                ),
            }),
        }
    }
}
