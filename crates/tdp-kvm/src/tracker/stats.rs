//! Dirty-rate figures: cumulative counters the tracker keeps, snapshots of them, and rates over the window
//! between two snapshots.
//!
//! With the dirty ring every entry comes from one vCPU's ring, so the per-vCPU figures are exact. With the
//! bitmap KVM keeps one log per memslot, shared by all vCPUs: only the VM-wide figure exists, and
//! [`DirtyRate::per_vcpu`] is `None`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters of one vCPU (cumulative since it was attached).
#[derive(Debug, Default)]
pub(crate) struct VcpuCounters {
    /// Ring entries harvested from this vCPU's ring, by collects and at its ring-full exits.
    pub(crate) harvested: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub(crate) ring_full_exits: AtomicU64,
}

/// Counters of the tracker (cumulative since it was created).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) harvested: AtomicU64,
    pub(crate) collects: AtomicU64,
    pub(crate) invalid_slot: AtomicU64,
    pub(crate) invalid_offset: AtomicU64,
    pub(crate) reset_entries: AtomicU64,
    pub(crate) reset_nanos: AtomicU64,
    pub(crate) full_rings: AtomicU64,
}

// Relaxed everywhere: these are statistics; they publish no data and order nothing.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One vCPU's cumulative figures in a [`TrackerStats`] snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VcpuStats {
    /// Pages (ring entries) harvested from this vCPU's ring so far; 0 in bitmap modes.
    pub harvested: u64,
    /// Ring-full exits handled by [`RingFullHandler`](crate::RingFullHandler) (or `VcpuRunner`) so far.
    pub ring_full_exits: u64,
}

/// A snapshot of the tracker's cumulative counters. Two snapshots give a [`DirtyRate`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TrackerStats {
    /// When the snapshot was taken.
    pub at: Instant,
    /// Whether the per-vCPU figures are exact (dirty ring) or absent (bitmap: VM-wide only).
    pub per_vcpu_exact: bool,
    /// Per attached vCPU, by index.
    pub per_vcpu: Vec<VcpuStats>,
    /// Pages harvested from KVM so far: ring entries (a page dirtied again after its reset counts again)
    /// or set bits of the bitmap.
    pub harvested: u64,
    /// Completed collects.
    pub collects: u64,
    /// Ring entries naming a memslot the tracker does not know: counted and skipped.
    pub invalid_slot: u64,
    /// Ring entries whose offset lies beyond their memslot: counted and skipped.
    pub invalid_offset: u64,
    /// Entries KVM reported resetting (`KVM_RESET_DIRTY_RINGS`' answers, summed).
    pub reset_entries: u64,
    /// Time spent in `KVM_RESET_DIRTY_RINGS` (by collects and at ring-full exits): KVM's re-protection of
    /// the harvested pages, which is most of a ring collect's time. A collect's time minus this is the
    /// tracker's own work.
    pub reset_time: Duration,
    /// Harvests that found a ring entirely full: the producer went past its soft limit and its reserve,
    /// so it may have overwritten entries (pages lost). Always 0 on a healthy KVM.
    pub full_rings: u64,
}

impl TrackerStats {
    /// The rate over the window from `earlier` to `self`. Counters only grow, so a window whose snapshots
    /// came in the wrong order reads as zero, never as a huge number.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// let before = tracker.stats()?;
    /// tracker.collect()?; // INITIALLY_SET: 256 pages
    /// let rate = tracker.stats()?.rate_since(&before);
    /// assert_eq!(rate.pages, 256);
    /// assert_eq!(before.rate_since(&tracker.stats()?).pages, 0, "snapshots in the wrong order read as zero");
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn rate_since(&self, earlier: &TrackerStats) -> DirtyRate {
        let window = self.at.saturating_duration_since(earlier.at);
        let secs = window.as_secs_f64();
        let per_sec = |pages: u64| if secs > 0.0 { pages as f64 / secs } else { 0.0 };
        let pages = self.harvested.saturating_sub(earlier.harvested);
        let per_vcpu = self.per_vcpu_exact.then(|| {
            self.per_vcpu
                .iter()
                .enumerate()
                .map(|(i, now)| {
                    let before = earlier.per_vcpu.get(i).copied().unwrap_or_default();
                    let pages = now.harvested.saturating_sub(before.harvested);
                    VcpuRate {
                        pages,
                        pages_per_sec: per_sec(pages),
                        ring_full_exits: now.ring_full_exits.saturating_sub(before.ring_full_exits),
                    }
                })
                .collect()
        });
        DirtyRate { window, pages, pages_per_sec: per_sec(pages), per_vcpu }
    }
}

/// One vCPU's dirty rate over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct VcpuRate {
    /// Pages harvested from its ring in the window.
    pub pages: u64,
    /// `pages` per second of the window.
    pub pages_per_sec: f64,
    /// Ring-full exits in the window.
    pub ring_full_exits: u64,
}

/// Dirty rate over a window between two [`TrackerStats`] snapshots.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DirtyRate {
    /// The window's length.
    pub window: Duration,
    /// Pages harvested in the window, VM-wide.
    pub pages: u64,
    /// `pages` per second.
    pub pages_per_sec: f64,
    /// Per vCPU, exact, with the dirty ring; `None` with the bitmap, which has no per-vCPU attribution.
    pub per_vcpu: Option<Vec<VcpuRate>>,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{TrackerStats, VcpuStats};

    #[test]
    fn rates_per_vcpu_are_per_second_of_the_window() {
        let t0 = Instant::now();
        let snap = |at, a, b| TrackerStats {
            at,
            per_vcpu_exact: true,
            per_vcpu: vec![
                VcpuStats { harvested: a, ring_full_exits: 0 },
                VcpuStats { harvested: b, ring_full_exits: 0 },
            ],
            harvested: a + b,
            collects: 0,
            invalid_slot: 0,
            invalid_offset: 0,
            reset_entries: 0,
            reset_time: Duration::ZERO,
            full_rings: 0,
        };
        let rate = snap(t0 + Duration::from_secs(2), 300, 100).rate_since(&snap(t0, 100, 100));
        assert_eq!(rate.pages, 200);
        assert!((rate.pages_per_sec - 100.0).abs() < 1e-9);
        let per_vcpu = rate.per_vcpu.unwrap();
        assert!((per_vcpu[0].pages_per_sec - 100.0).abs() < 1e-9 && per_vcpu[1].pages == 0);
    }
}
