//! SIGINT, SIGTERM and SIGHUP during `materialize`. Their default action ends the process at
//! once and leaves the temporary directory behind; instead they set a flag that the write
//! loop checks per chunk, so the run stops, removes what it wrote and reports the signal.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::error::{Error, Result};

/// The signals that stop a run cleanly.
const SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// The signal that asked a run to stop, if any (0: none). The default is never set: a library
/// caller that does not install handlers gets a run that cannot be interrupted this way.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    /// A flag that SIGINT, SIGTERM and SIGHUP set from now on, for the rest of the process
    /// (they no longer end it by themselves).
    pub fn on_signals() -> std::io::Result<Interrupt> {
        let flag = Interrupt::default();
        for signal in SIGNALS {
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
                    signal_hook::low_level::signal_name(signal).unwrap_or("a signal")
                ),
            }),
        }
    }
}
