//! The fast path for write faults on write-protected leaves (KVM's `fast_page_fault`, the dirty-logging
//! part): restore W with one compare-exchange and mark the page dirty, without allocating and without
//! the bookkeeping of a full fault.
//!
//! KVM runs it without the MMU lock; here it runs under the read side, which the memslot lookup needs
//! (KVM uses SRCU for that). It is still concurrent with every other fault and never waits for one.
//!
//! Keeps: I4. A write-protected, MMU-writable leaf in a dirty-logged slot becomes writable only together
//! with a dirty mark; a huge leaf in a logged slot is never made writable here (it must be split first,
//! so that one write does not make 512 or 262144 pages writable unrecorded).

use crate::addr::{Gfn, Level, Pfn};
use crate::host::{DirtySink, DirtySource, Host};
use crate::memslot::Memslot;
use crate::spte::Spte;
use crate::sync::{AtomicU64, Ordering};

use super::root::RootRef;
use super::{FaultOutcome, Mmu, SharedMmu};

/// KVM retries the fast path this many times before falling back to the slow path.
const FAST_PATH_TRIES: usize = 4;

impl<H: Host, R: lock_api::RawRwLock> SharedMmu<'_, H, R> {
    /// Makes the write-protected, MMU-writable leaf mapping `gfn` writable. `None` sends the fault down
    /// the slow path (no such leaf, a huge leaf in a logged slot, or too much contention).
    pub(super) fn fast_write_fault(
        &self,
        root: &RootRef,
        slot: &Memslot,
        gfn: Gfn,
        dirty: &mut dyn DirtySink,
    ) -> Option<FaultOutcome> {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let _walk = mmu.host.begin_walk();
        let (entry, level, _) = mmu.walk_to_leaf(root.pfn(), gfn);
        for _ in 0..FAST_PATH_TRIES {
            // Acquire pairs with the Release of whichever compare-exchange installed this value.
            let old = Spte(entry.load(Ordering::Acquire));
            if !old.is_present() || !old.is_leaf(level) {
                return None;
            }
            if old.is_writable() {
                // Another vCPU (or an earlier round) fixed it; the TLB entry that faulted was stale.
                return Some(FaultOutcome::Spurious);
            }
            if !fmt.is_mmu_writable(old) || (level > Level::L1 && slot.is_dirty_logged()) {
                return None;
            }
            let new = fmt.made_writable(old);
            debug_assert!(fmt.check(new, level).is_ok(), "the fast path broke {new:?}");
            // AcqRel: the W bit must not become visible before this thread's view of the entry; no data is
            // published through it. A leaf changing from read-only to writable changes no statistics.
            if entry.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                mmu.host.spte_changed(root.as_id(), gfn.align_down(level), level, old, new);
                if slot.is_dirty_logged() {
                    dirty.mark_dirty(slot, gfn, DirtySource::FastPath);
                }
                return Some(FaultOutcome::Fixed);
            }
        }
        None
    }
}

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Walks from the root at `root` towards `gfn` and stops at the first entry that is not a table (a
    /// leaf, a non-present or MMIO value) or at level 1. Returns the entry, its level and its value.
    /// The caller holds a walk guard for as long as it uses the entry.
    pub(super) fn walk_to_leaf(&self, root: Pfn, gfn: Gfn) -> (&AtomicU64, Level, Spte) {
        let fmt = self.format();
        let mut table = self.host.table(root);
        let mut level = self.config.root_level;
        loop {
            let entry = &table[gfn.index_at(level).get()];
            // Acquire pairs with the Release of the compare-exchange that linked a child table here.
            let spte = Spte(entry.load(Ordering::Acquire));
            match (fmt.child_table(spte, level), level.lower()) {
                (Some(child), Some(lower)) => {
                    table = self.host.table(child);
                    level = lower;
                }
                _ => return (entry, level, spte),
            }
        }
    }
}
