//! The fast path (KVM's `fast_page_fault`): a fault on a leaf that is present to the MMU but does not
//! allow the access for a reason the MMU set itself: write-protected for dirty logging (MMU-writable, W
//! clear), or access-tracked by aging (EPT without A/D bits: R, W and X cleared, R and X saved). One
//! compare-exchange restores what the access needs, without allocating, without translating and
//! without the bookkeeping of a full fault.
//!
//! KVM runs it without the MMU lock; here it runs under the read side, which the memslot lookup for the
//! dirty mark needs (KVM uses SRCU for that). It is still concurrent with every other fault, with
//! lockless aging and with hardware, and never waits for any of them.
//!
//! Keeps: I4. A leaf in a dirty-logged slot becomes writable here only together with a dirty mark; a
//! huge leaf in a logged slot is never made writable here (it must be split first, so that one write
//! does not make 512 or 262144 pages writable unrecorded).

use crate::addr::{Gfn, Level};
use crate::fault::AccessKind;
use crate::host::{DirtySink, DirtySource, Host};
use crate::memslot::Memslot;
use crate::spte::{Access, Spte};
use crate::sync::Ordering;

use super::root::RootRef;
use super::{FaultOutcome, SharedMmu};

/// KVM retries the fast path this many times before falling back to the slow path.
const FAST_PATH_TRIES: usize = 4;

impl<H: Host, R: lock_api::RawRwLock> SharedMmu<'_, H, R> {
    /// Fixes a fault on `gfn` for `access` on a write-protected or access-tracked leaf. `None` sends the
    /// fault down the slow path (no leaf, a huge leaf in a logged slot, rights the MMU never gave, or
    /// too much contention).
    pub(super) fn fast_fault(
        &self,
        root: &RootRef,
        slot: &Memslot,
        gfn: Gfn,
        access: AccessKind,
        dirty: &mut dyn DirtySink,
    ) -> Option<FaultOutcome> {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let need = match access {
            AccessKind::Read => Access::READ,
            AccessKind::Write => Access::WRITE,
            AccessKind::Exec => Access::EXEC,
        };
        let logged = slot.is_dirty_logged();
        let _walk = mmu.host.begin_walk();
        let (entry, level, _) = mmu.walk_gfn(root.pfn(), gfn).leaf(gfn);
        for _ in 0..FAST_PATH_TRIES {
            // Acquire pairs with the Release of whichever compare-exchange installed this value.
            let old = Spte(entry.load(Ordering::Acquire));
            if !old.is_present() || !old.is_leaf(level) {
                return None;
            }
            if fmt.access(old).contains(need) {
                // Another vCPU (or an earlier round) fixed it; the TLB entry that faulted was stale.
                return Some(FaultOutcome::Spurious);
            }
            let mut new = fmt.access_restored(old);
            let mut made_writable = false;
            if access == AccessKind::Write && fmt.is_mmu_writable(old) {
                // A tracked gfn's leaves are never MMU-writable; a leaf installed before the tracking
                // began is protected by it, but the test costs nothing when nothing is tracked.
                if self.slots.write_track().is_tracked(root.as_id(), gfn) {
                    return None;
                }
                if level > Level::L1 && logged {
                    return None;
                }
                new = fmt.made_writable(new);
                made_writable = true;
            }
            if new == old || !fmt.access(new).contains(need) {
                return None;
            }
            debug_assert!(fmt.check(new, level).is_ok(), "the fast path broke {new:?}");
            // AcqRel: the new rights must not become visible before this thread's view of the entry; no
            // data is published through it. A leaf changing its rights changes no statistics.
            if entry.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                mmu.host.spte_changed(root.as_id(), gfn.align_down(level), level, old, new);
                if made_writable && logged {
                    dirty.mark_dirty(slot, gfn, DirtySource::FastPath);
                }
                return Some(FaultOutcome::Fixed);
            }
        }
        None
    }
}
