//! Counters the MMU keeps (KVM's `pages_4k/2m/1g` statistics), read as a snapshot. Fault outcomes are
//! counted per vCPU, in the page cache; leaves per level per vCPU group, on the groups' cache lines
//! (`groups`), since every fault adds one.

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
    /// Tables linked by instruction fetches under the NX huge-page mitigation, still linked (KVM's
    /// `nx_lpage_splits`).
    pub nx_huge_splits: u64,
    /// Such tables unlinked by NX huge-page recovery so far.
    pub nx_recovered: u64,
}

pub(super) struct Stats {
    tables: AtomicU64,
    pub(super) mmio_sptes_created: AtomicU64,
    pub(super) huge_splits: AtomicU64,
}

// Counters are statistics: no other data is published through them, so Relaxed is enough everywhere.
impl Stats {
    pub(super) fn new() -> Self {
        Stats {
            tables: AtomicU64::new(0),
            mmio_sptes_created: AtomicU64::new(0),
            huge_splits: AtomicU64::new(0),
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
            // Kept per vCPU group, on the groups' lines: `Mmu::stats` fills them in.
            leaves: [0; 3],
            tables: get(&self.tables),
            mmio_sptes_created: get(&self.mmio_sptes_created),
            huge_splits: get(&self.huge_splits),
            // Kept by the NX list: `Mmu::stats` fills them in.
            nx_huge_splits: 0,
            nx_recovered: 0,
        }
    }
}
