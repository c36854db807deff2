//! The design floor of a 4 KiB fault: the least a fault handler built like `tdp-core`'s must do, written
//! out flat, over the same arena and the same SPTE values.
//!
//! Per fault: take the read side of a reader/writer lock (one locked add), walk four levels with
//! acquire loads, link each missing table with a compare-exchange, install the leaf with a
//! compare-exchange, count it in a shared counter (one locked add), release the lock (one locked sub).
//! No memslot lookup, host translation, huge-page decision, iterator state or trace hooks: those are
//! what separates `tdp-core`'s figure from this one. It is a limit, not a peer: it shows how much of the
//! gap to `x86_64`'s `map_to` the required atomics explain, and how much is software overhead.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use tdp_core::addr::{Gfn, Level, Pfn};
use tdp_core::host::TableMemory;
use tdp_core::spte::{LeafAttrs, LeafWrite, MemType, Spte, SpteFormat};

use crate::host::BenchHost;
use crate::ours::GUEST_RAM_HOST_BASE;

/// Lock word and leaf counter, shared as an MMU's would be.
#[derive(Debug, Default)]
pub struct FloorShared {
    lock: AtomicU64,
    leaves: AtomicU64,
}

impl FloorShared {
    /// Leaves installed so far.
    #[must_use]
    pub fn leaves(&self) -> u64 {
        self.leaves.load(Ordering::Relaxed)
    }
}

/// Faults gfns `0..count` in order into the 4-level EPT tree at `root`, allocating tables from `host`.
/// Returns how many faults installed nothing (0 on an empty tree).
///
/// # Panics
/// If the arena runs out of table pages.
pub fn fault_each(host: &BenchHost<'_>, root: Pfn, shared: &FloorShared, count: u64) -> u64 {
    const READER: u64 = 4;
    let fmt = SpteFormat::EPT_AD;
    let attrs =
        LeafAttrs { write: LeafWrite::Writable, exec: true, memtype: MemType::WriteBack, accessed: true };
    let host_base = GUEST_RAM_HOST_BASE >> 12;
    let mut missed = 0;
    for i in 0..count {
        let gfn = Gfn(black_box(i));
        // Acquire / Release on the lock word and the table entries mirror tdp-core's: the read lock orders
        // the walk after a writer's critical section, and the compare-exchanges publish a new table's
        // initialised entries to walkers that Acquire-load the entry pointing to it.
        shared.lock.fetch_add(READER, Ordering::Acquire);
        let mut table = host.table(root);
        let mut level = Level::L4;
        while let Some(lower) = level.lower() {
            let entry = &table[gfn.index_at(level).get()];
            let mut spte = Spte(entry.load(Ordering::Acquire));
            if !spte.is_present() {
                let child = host.alloc_table(fmt.nonpresent()).expect("the arena has room");
                let new = fmt.nonleaf(child);
                match entry.compare_exchange(spte.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => spte = new,
                    Err(current) => {
                        host.free_table_now(child);
                        spte = Spte(current);
                    }
                }
            }
            table = host.table(spte.pfn());
            level = lower;
        }
        let entry = &table[gfn.index_at(Level::L1).get()];
        let old = entry.load(Ordering::Acquire);
        let leaf = fmt.leaf(Pfn(host_base + gfn.0), Level::L1, attrs);
        if old != leaf.0 && entry.compare_exchange(old, leaf.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // A statistic: nothing is published through it.
            shared.leaves.fetch_add(1, Ordering::Relaxed);
        } else {
            missed += 1;
        }
        shared.lock.fetch_sub(READER, Ordering::Release);
    }
    missed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Arena;

    #[test]
    fn floor_builds_the_same_tree_shape() {
        let arena = Arena::new(8);
        let host = BenchHost::new(&arena, Level::L1);
        let root = host.alloc_table(SpteFormat::EPT_AD.nonpresent()).unwrap();
        let shared = FloorShared::default();
        assert_eq!(fault_each(&host, root, &shared, 1024), 0);
        assert_eq!(shared.leaves(), 1024);
        assert_eq!(arena.free_pages(), 8 - 1 - 1 - 1 - 2, "root, L3, L2 and two L1 tables");
        assert_eq!(fault_each(&host, root, &shared, 1), 1, "a mapped gfn installs nothing");
        arena.forget_all();
        assert_eq!(arena.free_pages(), 8);
    }
}
