//! SIGINT and SIGTERM as a request to stop: [`install`] makes them set a process-wide flag (through
//! `signal-hook`, so no `unsafe` here) instead of killing the process, and the migration checks
//! [`received`] between page runs and inside every socket wait ([`crate::deadline`] wakes at least
//! every [`CHECK_EVERY`]), so it can tell the destination with an `Error` frame, shut the guest down and
//! exit with 130 or 143, as a shell expects of a process ended by those signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

/// The longest a socket wait goes without looking at the flag.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The signal received (0: none). Written only by the signal handler `signal-hook` installs.
static RECEIVED: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

/// Makes SIGINT and SIGTERM set the stop flag (once per process; later calls do nothing).
///
/// # Errors
/// The error of registering the handlers.
pub fn install() -> std::io::Result<()> {
    let flag = RECEIVED.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for sig in [SIGINT, SIGTERM] {
        // The handler stores the signal number: the last one received wins.
        signal_hook::flag::register_usize(sig, Arc::clone(flag), sig as usize)?;
    }
    Ok(())
}

/// The stop signal received since [`install`], if any.
#[must_use]
pub fn received() -> Option<Signal> {
    // Acquire pairs with the handler's store (SeqCst in signal-hook): the flag carries no other data.
    let n = RECEIVED.get()?.load(Ordering::Acquire);
    match i32::try_from(n).ok()? {
        SIGINT => Some(Signal::Int),
        SIGTERM => Some(Signal::Term),
        _ => None,
    }
}

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM (`kill`, a service manager).
    Term,
}

impl Signal {
    /// The exit code a shell reports for a process this signal ended: 128 + its number.
    #[must_use]
    pub fn exit_code(self) -> i32 {
        128 + match self {
            Signal::Int => SIGINT,
            Signal::Term => SIGTERM,
        }
    }

    /// `SIGINT` or `SIGTERM`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_shells() {
        assert_eq!((Signal::Int.exit_code(), Signal::Term.exit_code()), (130, 143));
    }
}
