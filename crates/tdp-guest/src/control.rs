//! Host-side coordination of vCPU threads at batch boundaries: a gate that pauses every vCPU between
//! batches (so the host can harvest and read memory while no guest write is in flight), and a pacer that
//! holds a vCPU to a target write rate.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What a vCPU thread does after a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run the next batch.
    Continue,
    /// Stop running (the host called [`BatchGate::stop`]).
    Stop,
}

#[derive(Debug, Default)]
struct GateState {
    pause: bool,
    stop: bool,
    parked: usize,
    active: usize,
}

/// Pauses, resumes and stops a set of vCPU threads at batch boundaries.
///
/// Each vCPU thread calls [`BatchGate::at_batch_boundary`] after every [`crate::GuestExit::BatchDone`]
/// and [`BatchGate::leave`] when it stops (for any reason, errors included, so a pause never waits for
/// a thread that is gone). The host calls [`BatchGate::pause_all`]: when it returns `true`, every active
/// vCPU is parked between batches, outside `KVM_RUN`, so guest memory and dirty logs are quiescent.
///
/// ```
/// use std::time::Duration;
/// use tdp_guest::{BatchGate, Decision};
/// let gate = BatchGate::new(1);
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         while gate.at_batch_boundary() == Decision::Continue {}
///         gate.leave();
///     });
///     assert!(gate.pause_all(Duration::from_secs(10)));
///     gate.resume();
///     gate.stop();
/// });
/// ```
#[derive(Debug, Default)]
pub struct BatchGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl BatchGate {
    /// A gate for `vcpus` vCPU threads, all running.
    #[must_use]
    pub fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(GateState { active: vcpus, ..GateState::default() }),
            changed: Condvar::new(),
        }
    }

    // The state is a few flags and counters, each update complete before the lock is released, so a
    // panic elsewhere cannot leave it half-written: recovering from poison is sound.
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a vCPU thread between batches: parks while a pause is requested.
    pub fn at_batch_boundary(&self) -> Decision {
        let mut s = self.lock();
        if s.pause && !s.stop {
            s.parked += 1;
            self.changed.notify_all();
            while s.pause && !s.stop {
                s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.parked -= 1;
        }
        if s.stop { Decision::Stop } else { Decision::Continue }
    }

    /// Called by a vCPU thread when it stops running for good.
    pub fn leave(&self) {
        let mut s = self.lock();
        s.active = s.active.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Asks every vCPU to park at its next batch boundary and waits until all active ones have, or until
    /// `timeout`. Returns whether they all parked (on `false` the pause stays requested).
    pub fn pause_all(&self, timeout: Duration) -> bool {
        // A timeout too large for an `Instant` means "wait as long as it takes".
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.lock();
        s.pause = true;
        while s.parked < s.active {
            s = match deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    self.changed.wait_timeout(s, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                }
                None => self.changed.wait(s).unwrap_or_else(PoisonError::into_inner),
            };
        }
        true
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().pause = false;
        self.changed.notify_all();
    }

    /// Tells every vCPU thread to stop at its next batch boundary (parked ones wake and stop).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// Whether [`BatchGate::stop`] was called.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.lock().stop
    }

    /// vCPU threads that have not left.
    #[must_use]
    pub fn active(&self) -> usize {
        self.lock().active
    }
}

/// Holds one vCPU to a target rate of page writes by sleeping between batches.
///
/// ```
/// use tdp_guest::Pacer;
/// let mut pacer = Pacer::new(1_000_000.0);
/// let slept = pacer.after_batch(100); // 100 writes at 1M/s: due 100 us after start
/// assert!(slept <= std::time::Duration::from_millis(1));
/// ```
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    pages_per_sec: f64,
    written: u64,
}

impl Pacer {
    /// A pacer for `pages_per_sec` writes per second (non-positive or non-finite: no pacing).
    #[must_use]
    pub fn new(pages_per_sec: f64) -> Self {
        Self { start: Instant::now(), pages_per_sec, written: 0 }
    }

    /// Accounts `writes` more writes and sleeps until they are due; returns how long it slept.
    pub fn after_batch(&mut self, writes: u64) -> Duration {
        self.written = self.written.saturating_add(writes);
        let delay = self.delay(Instant::now());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        delay
    }

    /// How long after `now` the writes accounted so far are due: zero when they are late or pacing is
    /// off, at most [`Pacer::MAX_SLEEP`] (only absurdly low rates reach it; the cap keeps the arithmetic
    /// from overflowing). The thread sleeps the whole delay, so keep `batch / pages_per_sec` short enough
    /// for the caller's stop latency.
    #[must_use]
    pub fn delay(&self, now: Instant) -> Duration {
        if !(self.pages_per_sec.is_finite() && self.pages_per_sec > 0.0) {
            return Duration::ZERO;
        }
        let offset =
            Duration::try_from_secs_f64(self.written as f64 / self.pages_per_sec).unwrap_or(Duration::MAX);
        match self.start.checked_add(offset) {
            Some(due) => due.saturating_duration_since(now).min(Self::MAX_SLEEP),
            None => Self::MAX_SLEEP,
        }
    }

    /// The longest single sleep: an hour.
    pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn pause_parks_every_thread_and_stop_releases_them() {
        let gate = BatchGate::new(2);
        let batches = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while gate.at_batch_boundary() == Decision::Continue {
                        batches.fetch_add(1, Ordering::Relaxed);
                    }
                    gate.leave();
                });
            }
            assert!(gate.pause_all(Duration::from_secs(30)));
            // Both threads are parked: the count cannot move while paused.
            let frozen = batches.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(batches.load(Ordering::Relaxed), frozen);
            gate.resume();
            gate.stop();
        });
        assert_eq!(gate.active(), 0);
        assert!(gate.is_stopped());
    }

    #[test]
    fn pacer_delays_are_bounded_for_any_rate() {
        let now = Instant::now();
        let paced = |rate: f64, written: u64| Pacer { start: now, pages_per_sec: rate, written }.delay(now);
        assert_eq!(paced(f64::NAN, u64::MAX), Duration::ZERO, "no pacing");
        assert_eq!(paced(0.0, 10), Duration::ZERO, "no pacing");
        assert_eq!(paced(1e300, 1), Duration::ZERO, "due at once");
        assert_eq!(paced(1e-300, 1), Pacer::MAX_SLEEP, "due in 1e300 s: capped, no overflow");
        assert_eq!(paced(1000.0, 500), Duration::from_millis(500));
        assert_eq!(paced(0.5, 64), Duration::from_secs(128), "low rates are honoured, not capped early");
        assert_eq!(paced(1000.0, u64::MAX), Pacer::MAX_SLEEP);
        let gate = BatchGate::new(0);
        assert!(gate.pause_all(Duration::MAX), "nobody to wait for, even with an endless timeout");
    }

    #[test]
    fn pause_does_not_wait_for_threads_that_left() {
        let gate = BatchGate::new(2);
        gate.leave();
        gate.leave();
        assert!(gate.pause_all(Duration::from_millis(1)));
        let lonely = BatchGate::new(1);
        assert!(!lonely.pause_all(Duration::from_millis(1)), "nobody parks: times out");
    }
}
