//! Aging and access tracking (KVM's `kvm_tdp_mmu_age_gfn_range` and `kvm_tdp_mmu_test_age_gfn`, lockless
//! since 6.15): how a host learns which guest pages were used since it last looked, to pick pages to
//! reclaim or to estimate a working set.
//!
//! Aging runs under a walk guard only, **not** the MMU lock, so it never waits for faults or for a
//! dirty-logging pass and never makes them wait. Every change it makes is one atomic operation that keeps
//! whatever a racing writer did:
//! - with A/D bits (EPT with A/D, NPT): a compare-exchange clears A, retried from the new value when
//!   hardware, a fault or the fast path changed the leaf meanwhile, so a D or W they set is never lost.
//!   (Not an atomic AND as KVM uses: the frozen value has the A bit of both formats set, and an AND
//!   landing on an entry frozen since the walk read it would unfreeze it.)
//! - without (EPT without A/D): a compare-exchange to the access-tracked form (R and X saved, R, W and X
//!   cleared). If it loses a race it leaves the leaf alone, which only reports the page young once more.
//!   The next access faults and the fast path restores the leaf's rights; W comes back at the next
//!   write through MMU-writable, so it is never lost either.
//!
//! **No TLB flush** is owed, by KVM's rule: a stale young translation in a TLB only makes the page look
//! unused for longer. Dirty logging, which cannot tolerate a stale writable translation, flushes the
//! access-tracked leaves it meets (see `dirty_log.rs`).
//!
//! Like the dirty-logging passes that rewrite leaves in bulk, aging bypasses `handle_changed_spte` (it
//! changes no statistics and frees nothing) but emits the same `spte_changed` event and runs
//! [`crate::spte::SpteFormat::check`] on every new value in debug builds.

use crate::addr::{AsId, Gfn, Level};
use crate::host::Host;
use crate::iter::TdpIter;
use crate::spte::Spte;
use crate::sync::Ordering;

use super::Mmu;

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Ages gfns `[start, end)` of `as_id` in every valid root: clears the accessed state of each leaf
    /// that has it and returns whether any had it (the range was young). Takes no MMU lock and owes no
    /// TLB flush (see the module documentation).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    /// let read = Fault { as_id: AsId(0), gpa: Gpa(0x3000), access: AccessKind::Read,
    ///                    kind: FaultKind::Violation { present: false } };
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read, &mut ()), Ok(FaultOutcome::Fixed));
    /// assert!(mmu.test_age_gfn_range(AsId(0), Gfn(0), Gfn(16)), "a fault's leaf is born accessed");
    /// assert!(mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(16)));
    /// assert!(!mmu.test_age_gfn_range(AsId(0), Gfn(0), Gfn(16)), "nothing used since");
    /// assert!(!mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(16)));
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn age_gfn_range(&self, as_id: AsId, start: Gfn, end: Gfn) -> bool {
        self.age_range(as_id, start, end, true)
    }

    /// Whether any leaf mapping gfns `[start, end)` of `as_id` in a valid root was accessed since it was
    /// last aged (KVM's `kvm_tdp_mmu_test_age_gfn`); changes nothing and stops at the first young leaf.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{Mmu, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::NPT)?;
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0))?;
    /// assert!(!mmu.test_age_gfn_range(AsId(0), Gfn(0), Gfn(16)), "nothing mapped, nothing young");
    /// let write = Fault { as_id: AsId(0), gpa: Gpa(0x5000), access: AccessKind::Write,
    ///                     kind: FaultKind::Violation { present: false } };
    /// mmu.handle_fault(&mut vcpu, write, &mut ())?;
    /// // Testing twice finds it young twice: only aging clears.
    /// assert!(mmu.test_age_gfn_range(AsId(0), Gfn(5), Gfn(6)));
    /// assert!(mmu.test_age_gfn_range(AsId(0), Gfn(5), Gfn(6)));
    /// assert!(!mmu.test_age_gfn_range(AsId(0), Gfn(6), Gfn(16)), "other gfns were not touched");
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn test_age_gfn_range(&self, as_id: AsId, start: Gfn, end: Gfn) -> bool {
        self.age_range(as_id, start, end, false)
    }

    fn age_range(&self, as_id: AsId, start: Gfn, end: Gfn, clear: bool) -> bool {
        let end = end.min(self.config.max_gfn());
        if start >= end {
            return false;
        }
        let mut young = false;
        for (root, _) in self.roots.acquire_valid(as_id) {
            young |= self.age_root(root, as_id, start, end, clear);
            self.release_root(root);
            if young && !clear {
                break;
            }
        }
        young
    }

    /// Ages (or, without `clear`, tests) the leaves of `[start, end)` in the tree at `root`.
    ///
    /// The walk stops at level 2: a table of 4 KiB leaves is scanned whole ([`Mmu::age_leaf_table`]),
    /// one load and one test per entry, as the enable-logging pass does; huge leaves are aged where the
    /// walk meets them.
    fn age_root(&self, root: crate::addr::Pfn, as_id: AsId, start: Gfn, end: Gfn, clear: bool) -> bool {
        let fmt = *self.format();
        let mut young = false;
        // The iterator holds a walk guard for as long as it walks: no table it can reach is reused.
        let mut it = TdpIter::new(&self.host, &fmt, root, self.config.root_level, Level::L2, start, end);
        while it.valid() {
            let old = it.old_spte;
            let level = it.level();
            if let Some(table) = fmt.child_table(old, level).filter(|_| level == Level::L2) {
                let base = it.gfn();
                let lo = start.0.saturating_sub(base.0).min(512) as usize;
                let hi = end.0.saturating_sub(base.0).min(512) as usize;
                young |= self.age_leaf_table(table, as_id, base, lo..hi, clear);
                if young && !clear {
                    return true;
                }
            } else if old.is_present() && old.is_leaf(level) && self.is_young(old) {
                young = true;
                if !clear {
                    return true;
                }
                self.age_entry(it.entry(), old, level, as_id, it.gfn());
            }
            it.next();
        }
        young
    }

    /// Ages (or tests) entries `range` of the table of 4 KiB leaves at `table`, whose first gfn is
    /// `base`; returns whether any was young. The caller holds a walk guard.
    fn age_leaf_table(
        &self,
        table: crate::addr::Pfn,
        as_id: AsId,
        base: Gfn,
        range: core::ops::Range<usize>,
        clear: bool,
    ) -> bool {
        let mut young = false;
        for (i, entry) in self.host.table(table)[range.clone()].iter().enumerate() {
            // Acquire, as the iterator's loads: pairs with the Release of whichever change installed it.
            let old = Spte(entry.load(Ordering::Acquire));
            if !(old.is_present() && self.is_young(old)) {
                continue;
            }
            young = true;
            if !clear {
                return true;
            }
            let gfn = Gfn(base.0 + (range.start + i) as u64);
            self.age_entry(entry, old, Level::L1, as_id, gfn);
        }
        young
    }

    /// Whether the present leaf `spte` was used since it was last aged.
    #[inline]
    fn is_young(&self, spte: Spte) -> bool {
        let fmt = self.format();
        if fmt.has_accessed_dirty() { fmt.is_accessed(spte) } else { !fmt.is_access_tracked(spte) }
    }

    /// Ages the young leaf `entry` (last read as `old`) at `level`, mapping from `gfn`: clears A, or makes
    /// it access-tracked; emits the event.
    fn age_entry(&self, entry: &crate::sync::AtomicU64, old: Spte, level: Level, as_id: AsId, gfn: Gfn) {
        let fmt = self.format();
        let new = if fmt.has_accessed_dirty() {
            clear_accessed(entry, old, level, fmt.accessed_mask())
        } else {
            let tracked = fmt.access_tracked(old);
            // Losing the race leaves the leaf as the winner made it: at worst young once more (KVM).
            entry
                .compare_exchange(old.0, tracked.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
                .then_some((old, tracked))
        };
        if let Some((was, now)) = new
            && was != now
        {
            debug_assert!(fmt.check(now, level).is_ok(), "aging made {now:?}");
            self.host.spte_changed(as_id, gfn, level, was, now);
        }
    }
}

/// Clears `accessed` in the leaf `entry` (at `level`, last read as `old`) with compare-exchange, retrying
/// from the current value while it is still a present leaf with the bit set. Returns the values before
/// and after the change, or `None` when the leaf went away or lost the bit meanwhile.
fn clear_accessed(
    entry: &crate::sync::AtomicU64,
    mut old: Spte,
    level: Level,
    accessed: u64,
) -> Option<(Spte, Spte)> {
    loop {
        let new = Spte(old.0 & !accessed);
        // AcqRel, as every atomic rewrite of a live SPTE; Acquire on failure to see the winner's value.
        match entry.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some((old, new)),
            Err(current) => {
                old = Spte(current);
                if !old.is_present() || !old.is_leaf(level) || old.0 & accessed == 0 {
                    return None;
                }
            }
        }
    }
}
