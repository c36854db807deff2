//! When pre-copy stops, and how hard the guest is slowed: the convergence rules (`--max-rounds`,
//! `--downtime-ms` estimated from the link's measured throughput and the pages still dirty) and the
//! per-vCPU dirty limit (QEMU's dirty-limit: a vCPU over its quota sleeps at its exits).
//!
//! [`Convergence`] is pure: it sees one [`RoundObservation`] per round and answers with a [`Step`], so
//! its decisions are unit-tested without a guest or a link. [`Throttle`] is the shared state the vCPU
//! threads consult at their ring-full (or batch) exits.
//!
//! The throttle trigger follows QEMU's `throttle-trigger-threshold`: when, in two rounds in a row, the
//! guest dirtied more than half as many bytes as the link moved, every vCPU dirtying faster than its
//! share gets a quota of a quarter of the link's page rate split between the vCPUs; each further round
//! that still does not converge halves the quota, down to [`MIN_QUOTA`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::units::PAGE_SIZE;

/// The smallest per-vCPU quota the automatic throttle sets, in pages/s.
pub const MIN_QUOTA: u64 = 64;
/// The longest a vCPU sleeps at one exit. Ring-full exits come once per ring's worth of dirty pages, so
/// a tight quota needs long sleeps; a pause ([`Throttle::interrupt`]) cuts a sleep short.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The user's convergence settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The most pre-copy rounds after the bulk copy (round 0) before stop-and-copy is forced.
    pub max_rounds: u32,
    /// The downtime the final round may take.
    pub downtime_target: Duration,
    /// Whether the automatic dirty limit may throttle vCPUs.
    pub dirty_limit: bool,
    /// A fixed per-vCPU quota in pages/s, instead of the computed one.
    pub vcpu_quota: Option<u64>,
}

/// What the source saw in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundObservation {
    /// The round (0: bulk copy).
    pub round: u32,
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Time spent sending them, acknowledgement included.
    pub send_time: Duration,
    /// Wall time of the round (sending plus harvesting).
    pub round_time: Duration,
    /// Pages that became dirty during the round (the harvest after it).
    pub dirtied: u64,
    /// Pages pending after that harvest.
    pub remaining: u64,
    /// Each vCPU's dirty rate over the round in pages/s, where the tracker can tell (ring); empty if not.
    pub vcpu_rates: Vec<f64>,
}

/// What to do after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Another pre-copy round.
    Continue,
    /// Stop the guest and send the rest.
    StopAndCopy {
        /// Whether the downtime estimate met the target.
        converged: bool,
        /// Why pre-copy stops, for the report.
        reason: String,
    },
}

/// The answer to one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Continue or stop.
    pub decision: Decision,
    /// Measured link throughput in bytes/s (smoothed).
    pub throughput: f64,
    /// The guest's dirty rate over the round, bytes/s.
    pub dirty_rate: f64,
    /// Downtime if the guest stopped now: remaining bytes over throughput.
    pub estimated_downtime: Duration,
    /// New per-vCPU quotas (pages/s, `None` = unthrottled) when they change.
    pub quotas: Option<Vec<Option<u64>>>,
}

/// The convergence state of one migration.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: Policy,
    vcpus: usize,
    throughput: Option<f64>,
    high_rounds: u32,
    quota: Option<u64>,
}

impl Convergence {
    /// Starts with no measurement for a guest of `vcpus` vCPUs.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tdp_cli::converge::{Convergence, Decision, Policy, RoundObservation};
    ///
    /// let policy = Policy { max_rounds: 5, downtime_target: Duration::from_millis(300), dirty_limit: true, vcpu_quota: None };
    /// let mut c = Convergence::new(policy, 2);
    /// // 1000 pages sent in 100 ms (40 MB/s), 50 pages left: 5 ms of downtime.
    /// let obs = RoundObservation { round: 0, pages_sent: 1000, send_time: Duration::from_millis(100),
    ///     round_time: Duration::from_millis(100), dirtied: 50, remaining: 50, vcpu_rates: vec![] };
    /// assert!(matches!(c.observe(&obs).decision, Decision::StopAndCopy { converged: true, .. }));
    /// ```
    #[must_use]
    pub fn new(policy: Policy, vcpus: usize) -> Convergence {
        Convergence { policy, vcpus: vcpus.max(1), throughput: None, high_rounds: 0, quota: None }
    }

    /// The current per-vCPU quota, if the throttle is on.
    #[must_use]
    pub fn quota(&self) -> Option<u64> {
        self.quota
    }

    /// Takes one round's figures and decides.
    pub fn observe(&mut self, o: &RoundObservation) -> Step {
        let secs = o.send_time.as_secs_f64();
        if o.pages_sent > 0 && secs > 0.0 {
            let measured = (o.pages_sent * PAGE_SIZE) as f64 / secs;
            // Smoothed (as QEMU's mbps), so one short round does not swing the estimate.
            self.throughput = Some(self.throughput.map_or(measured, |t| 0.5 * t + 0.5 * measured));
        }
        let throughput = self.throughput.unwrap_or(f64::INFINITY);
        let round_secs = o.round_time.as_secs_f64();
        let dirty_rate = if round_secs > 0.0 { (o.dirtied * PAGE_SIZE) as f64 / round_secs } else { 0.0 };
        let remaining_bytes = (o.remaining * PAGE_SIZE) as f64;
        let estimated_downtime = if o.remaining == 0 {
            Duration::ZERO
        } else if throughput.is_finite() && throughput > 0.0 {
            Duration::from_secs_f64((remaining_bytes / throughput).min(1e6))
        } else {
            Duration::ZERO
        };

        let quotas = self.throttle(o, throughput);
        let decision = if estimated_downtime <= self.policy.downtime_target {
            Decision::StopAndCopy {
                converged: true,
                reason: format!(
                    "converged: {} pages left, estimated downtime {} ms <= target {} ms",
                    o.remaining,
                    estimated_downtime.as_millis(),
                    self.policy.downtime_target.as_millis()
                ),
            }
        } else if o.round >= self.policy.max_rounds {
            Decision::StopAndCopy {
                converged: false,
                reason: format!(
                    "did not converge in {} rounds: {} pages left, estimated downtime {} ms > target {} ms \
                     (link {:.1} MiB/s, guest dirtying {:.1} MiB/s{})",
                    self.policy.max_rounds,
                    o.remaining,
                    estimated_downtime.as_millis(),
                    self.policy.downtime_target.as_millis(),
                    throughput / (1 << 20) as f64,
                    dirty_rate / (1 << 20) as f64,
                    match self.quota {
                        Some(q) => format!(", vCPUs throttled to {q} pages/s each"),
                        None if !self.policy.dirty_limit => ", dirty limit off".to_owned(),
                        None => String::new(),
                    }
                ),
            }
        } else {
            Decision::Continue
        };
        Step { decision, throughput, dirty_rate, estimated_downtime, quotas }
    }

    /// QEMU's trigger: dirtied bytes over half the bytes sent, two rounds in a row. Returns new quotas.
    fn throttle(&mut self, o: &RoundObservation, throughput: f64) -> Option<Vec<Option<u64>>> {
        if !self.policy.dirty_limit || o.round == 0 {
            return None;
        }
        let high = o.dirtied * 2 > o.pages_sent;
        self.high_rounds = if high { self.high_rounds + 1 } else { 0 };
        if self.high_rounds < 2 {
            return None;
        }
        let link_pages = if throughput.is_finite() { throughput / PAGE_SIZE as f64 } else { return None };
        let quota = match (self.policy.vcpu_quota, self.quota) {
            (Some(fixed), _) => fixed,
            (None, None) => ((link_pages / 4.0 / self.vcpus as f64) as u64).max(MIN_QUOTA),
            (None, Some(q)) => (q / 2).max(MIN_QUOTA),
        };
        if self.quota == Some(quota) {
            return None;
        }
        self.quota = Some(quota);
        let per_vcpu = (0..self.vcpus)
            .map(|i| match o.vcpu_rates.get(i) {
                // A vCPU already under its quota is left alone, as dirty-limit does.
                Some(&rate) if rate <= quota as f64 => None,
                _ => Some(quota),
            })
            .collect();
        Some(per_vcpu)
    }
}

/// Per-vCPU quotas and the pacing the vCPU threads apply at their exits. Shared by reference.
#[derive(Debug)]
pub struct Throttle {
    quotas: Vec<AtomicU64>,
    slept_us: Vec<AtomicU64>,
    exits: Vec<AtomicU64>,
    /// Bumped by [`Throttle::interrupt`]; sleepers wait on `wake` and leave when it changes.
    generation: Mutex<u64>,
    wake: Condvar,
    /// Set while the guest is being paused: no sleeping.
    held: std::sync::atomic::AtomicBool,
}

impl Throttle {
    /// No quota on any of `vcpus` vCPUs.
    #[must_use]
    pub fn new(vcpus: usize) -> Throttle {
        let zeros = || (0..vcpus).map(|_| AtomicU64::new(0)).collect();
        Throttle {
            quotas: zeros(),
            slept_us: zeros(),
            exits: zeros(),
            generation: Mutex::new(0),
            wake: Condvar::new(),
            held: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sets vCPU `vcpu`'s quota in pages/s (`None`: unthrottled).
    pub fn set_quota(&self, vcpu: usize, quota: Option<u64>) {
        if let Some(q) = self.quotas.get(vcpu) {
            q.store(quota.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// vCPU `vcpu`'s quota.
    #[must_use]
    pub fn quota(&self, vcpu: usize) -> Option<u64> {
        self.quotas.get(vcpu).map(|q| q.load(Ordering::Relaxed)).filter(|&q| q > 0)
    }

    /// Time vCPU `vcpu` has slept in the throttle so far.
    #[must_use]
    pub fn slept(&self, vcpu: usize) -> Duration {
        Duration::from_micros(self.slept_us.get(vcpu).map_or(0, |s| s.load(Ordering::Relaxed)))
    }

    /// Throttled exits vCPU `vcpu` has taken (exits at which it slept).
    #[must_use]
    pub fn throttled_exits(&self, vcpu: usize) -> u64 {
        self.exits.get(vcpu).map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Wakes every vCPU sleeping in the throttle and keeps them from sleeping again until
    /// [`Throttle::release`]: the guest is being paused, and a sleeping vCPU would only delay the pause
    /// (it dirties nothing while paused anyway).
    pub fn interrupt(&self) {
        self.held.store(true, Ordering::SeqCst);
        *self.generation.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.wake.notify_all();
    }

    /// Lets the throttle sleep again after [`Throttle::interrupt`] (the guest resumed).
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Sleeps up to `d`, less if interrupted; returns the time slept.
    fn sleep(&self, d: Duration) -> Duration {
        let start = Instant::now();
        let mut g = self.generation.lock().unwrap_or_else(PoisonError::into_inner);
        let at = *g;
        // SeqCst: pairs with `interrupt`, which sets `held` before it bumps the generation under the
        // lock held here; either this load sees `held`, or the bump comes later and ends the wait.
        while *g == at && !self.held.load(Ordering::SeqCst) {
            let left = d.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            g = self.wake.wait_timeout(g, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        start.elapsed()
    }

    /// Called by vCPU `vcpu`'s thread at an exit after it dirtied `pages` pages since its last call:
    /// sleeps as long as keeps the vCPU within its quota (at most [`MAX_SLEEP`]) and returns the time
    /// slept. `pacer` is the thread's own bookkeeping.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tdp_cli::converge::{Pacer, Throttle};
    /// let throttle = Throttle::new(2);
    /// let mut pacer = Pacer::new();
    /// assert_eq!(throttle.pace(0, &mut pacer, 10_000), Duration::ZERO, "no quota: no sleep");
    /// throttle.set_quota(0, Some(1000)); // 1000 pages/s
    /// assert!(throttle.pace(0, &mut pacer, 20) > Duration::ZERO, "20 pages at once is over 1000/s");
    /// assert_eq!(throttle.throttled_exits(0), 1);
    /// ```
    pub fn pace(&self, vcpu: usize, pacer: &mut Pacer, pages: u64) -> Duration {
        let Some(quota) = self.quota(vcpu) else {
            *pacer = Pacer::new();
            return Duration::ZERO;
        };
        if pacer.quota != quota {
            *pacer = Pacer { start: Instant::now(), pages: 0, quota };
        }
        pacer.pages += pages;
        let allowed = Duration::from_secs_f64(pacer.pages as f64 / quota as f64);
        let elapsed = pacer.start.elapsed();
        if allowed <= elapsed {
            // Under quota: restart the window now and then so idle time is not banked for a burst.
            if elapsed > Duration::from_secs(1) {
                *pacer = Pacer { start: Instant::now(), pages: 0, quota };
            }
            return Duration::ZERO;
        }
        if self.held.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        // Counted when the sleep starts, so a vCPU asleep right now shows as throttled.
        if let Some(e) = self.exits.get(vcpu) {
            e.fetch_add(1, Ordering::Relaxed);
        }
        let sleep = self.sleep((allowed - elapsed).min(MAX_SLEEP));
        if let Some(s) = self.slept_us.get(vcpu) {
            s.fetch_add(sleep.as_micros() as u64, Ordering::Relaxed);
        }
        sleep
    }
}

/// One vCPU thread's throttle window: pages dirtied since `start` under `quota`.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    start: Instant,
    pages: u64,
    quota: u64,
}

impl Pacer {
    /// A fresh window.
    #[must_use]
    pub fn new() -> Pacer {
        Pacer { start: Instant::now(), pages: 0, quota: 0 }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

#[cfg(test)]
mod tests;
