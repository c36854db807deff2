//! Counters the MMU keeps (KVM's `pages_4k/2m/1g` statistics), read as a snapshot. Fault outcomes are
//! counted per vCPU, in the page cache.

use crate::addr::Level;
use crate::sync::{AtomicU64, Ordering};

/// A snapshot of the MMU's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuStats {
    /// Present leaves per level: `[4 KiB, 2 MiB, 1 GiB]`.
    pub leaves: [u64; 3],
    /// Non-root table pages linked into trees.
    pub tables: u64,
    /// MMIO SPTEs installed.
    pub mmio_sptes_created: u64,
    /// Huge leaves split into tables.
    pub huge_splits: u64,
}

pub(super) struct Stats {
    leaves: [AtomicU64; 3],
    tables: AtomicU64,
    pub(super) mmio_sptes_created: AtomicU64,
    pub(super) huge_splits: AtomicU64,
}

// Counters are statistics: no other data is published through them, so Relaxed is enough everywhere.
impl Stats {
    pub(super) fn new() -> Self {
        Stats {
            leaves: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            tables: AtomicU64::new(0),
            mmio_sptes_created: AtomicU64::new(0),
            huge_splits: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(super) fn add_leaves(&self, level: Level, n: i64) {
        if let Some(c) = self.leaves.get(level.idx()) {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn add_tables(&self, n: i64) {
        self.tables.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> MmuStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MmuStats {
            leaves: [get(&self.leaves[0]), get(&self.leaves[1]), get(&self.leaves[2])],
            tables: get(&self.tables),
            mmio_sptes_created: get(&self.mmio_sptes_created),
            huge_splits: get(&self.huge_splits),
        }
    }
}
