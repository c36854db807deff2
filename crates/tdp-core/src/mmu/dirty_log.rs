//! Dirty logging in the MMU: the pass that starts logging a memslot, eager splitting of its huge pages,
//! re-protection of harvested pages (ring reset, bitmap clear), and the pass that stops logging, which
//! recovers huge pages in place (KVM 6.13's `kvm_tdp_mmu_recover_huge_pages`).
//!
//! With a log that starts all-set ([`crate::memslot::SlotFlags::LOG_INITIALLY_SET`], KVM's
//! `KVM_DIRTY_LOG_INITIALLY_SET`) nothing is protected when logging starts; each range is split and
//! protected when it is first cleared ([`ExclusiveMmu::reprotect_dirty`], KVM cb00a70b).
//!
//! How a write gets recorded depends on the hardware ([`super::MmuConfig::pml`]):
//! - with PML (Intel, EPT A/D bits): 4 KiB leaves keep W and lose D; hardware sets D at the next write and
//!   logs the GPA to the PML buffer, which the backend drains into the ring or bitmap;
//! - without (no A/D bits, or AMD, which has no PML): every leaf loses W (keeping MMU-writable); the next
//!   write faults and the fast path restores W together with a dirty mark.
//!
//! Huge leaves lose W in both cases, so their next write faults and splits: logged slots are mapped at
//! 4 KiB, one dirty mark per page.
//!
//! Keeps: I4. Every operation here returns the [`Flush`] the caller owes: a TLB entry that still allows a
//! write without fault (or with D already set) would let a write go unrecorded.

use lock_api::RawRwLock;

use crate::addr::{AsId, Gfn, Level, Pfn, RingSlot, SlotId};
use crate::dirty_ring::{DirtyRingProducer, ReprotectBatch, ResetStats, ResetTarget, RingMemory};
use crate::flush::Flush;
use crate::host::{AllocError, Host};
use crate::iter::TdpIter;
use crate::memslot::Memslot;
use crate::spte::{EptBits, MMU_PRESENT, Spte};

/// The hardware W bit, bit 1 in both formats.
const WRITE_BIT: u64 = EptBits::WRITE.bits();
use crate::sync::{AtomicU64, Ordering};

use super::cache::PageCache;
use super::groups::SlotsRead;
use super::spte_ops::LockMode;
use super::{ExclusiveMmu, Mmu, SharedMmu};

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Re-protects the pages of slot `id` named by `mask` (bit `i` is page `base_offset + i` of the
    /// slot), after they were harvested (KVM's `kvm_arch_mmu_enable_log_dirty_pt_masked`): 4 KiB leaves
    /// lose D with PML or W without; huge leaves lose W. Offsets outside the slot are ignored, so a
    /// batch built from consumer-writable ring memory cannot reach beyond its slot (I5).
    ///
    /// In a slot whose log started all-set ([`Memslot::is_log_initially_set`]), the huge leaves that
    /// map the window from the mask's first to its last page are first split down to 4 KiB (KVM's
    /// `kvm_arch_mmu_enable_log_dirty_pt_masked`, which eagerly splits since cb00a70b): those huge
    /// leaves were left writable when logging started. The split runs under the write lock, as KVM's
    /// does under `KVM_CLEAR_DIRTY_LOG`; its table pages are allocated with the lock dropped. When none
    /// can be had, the huge leaves are only write-protected, and the next write splits them.
    ///
    /// The caller owes the returned flush before it reads the pages' contents.
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
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(1), Gfn(0), 1024, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    /// for gpa in [0, 0x20_0000] {
    ///     let fault = Fault { as_id: AsId(0), gpa: Gpa(gpa), access: AccessKind::Write,
    ///                         kind: FaultKind::Violation { present: false } };
    ///     mmu.handle_fault(&mut vcpu, fault, &mut ()).unwrap();
    /// }
    /// assert_eq!(mmu.stats().leaves, [0, 2, 0], "two 2 MiB leaves");
    ///
    /// // Logging with a log that starts all-set: nothing is protected or split yet.
    /// let logging = SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET;
    /// mmu.write().set_memslot_flags(AsId(0), SlotId(1), logging)?.run(mmu.host());
    /// assert_eq!(mmu.stats().leaves, [0, 2, 0]);
    /// // Clearing pages 512..576 splits the second huge page only, and protects those 64 pages.
    /// mmu.write().reprotect_dirty(AsId(0), SlotId(1), 512, u64::MAX).run(mmu.host());
    /// assert_eq!(mmu.stats().leaves, [512, 1, 0]);
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn reprotect_dirty(&mut self, as_id: AsId, id: SlotId, base_offset: u64, mask: u64) -> Flush {
        if let Some(slot) = self.slots.get(as_id, id).copied()
            && slot.is_log_initially_set()
            && let Some(window) = MaskWindow::new(&slot, base_offset, mask)
        {
            let mut cache = PageCache::new();
            // A failure leaves the huge leaves to the write protection below (KVM's "try" split).
            let _ = self.split_range(as_id, (window.start, window.end), &mut cache, true);
            cache.release(&self.mmu.host);
        }
        // Looked up again: the split may have dropped the lock, and the slot may have changed meanwhile.
        let Some(slot) = self.slots.get(as_id, id).copied() else {
            return Flush::none();
        };
        // The window the mask names, clipped to the slot: one walk over it per root.
        let Some(window) = MaskWindow::new(&slot, base_offset, mask) else {
            return Flush::none();
        };
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            let (start, end) = (window.start, window.end);
            let mut it = TdpIter::new(&mmu.host, &fmt, root, mmu.config.root_level, Level::L1, start, end);
            while it.valid() {
                let (old, level) = (it.old_spte, it.level());
                if !(old.is_present() && old.is_leaf(level) && window.names(it.gfn(), level)) {
                    it.next();
                    continue;
                }
                let new = if level == Level::L1 && mmu.config.pml {
                    fmt.cleaned(old)
                } else {
                    fmt.write_protected(old)
                };
                if new != old {
                    mmu.set_spte_exclusive(as_id, &mut it, new);
                    flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
                }
                it.next();
            }
            drop(it);
            mmu.release_root(root);
        }
        flush
    }

    /// KVM's `KVM_RESET_DIRTY_RINGS` for one vCPU's ring: frees the entries its consumer harvested and
    /// re-protects their pages ([`ExclusiveMmu::reprotect_dirty`] per coalesced batch). Entries naming
    /// no memslot, or pages outside theirs, are counted and skipped: the ring memory is
    /// consumer-writable (I5). Returns the reset's statistics and the flush the caller owes before the
    /// VMM reads the pages.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
    /// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{Mmu, MmuConfig};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(1), Gfn(0), 512, ram, SlotFlags::LOG_DIRTY))?;
    ///
    /// let cfg = RingConfig::new(256, 0).unwrap();
    /// let ring: Vec<DirtyGfn> = (0..256).map(|_| DirtyGfn::default()).collect();
    /// let mut producer = DirtyRingProducer::new(&ring, cfg).unwrap();
    /// let _ = producer.push(RingSlot::new(AsId(0), SlotId(1)), 7).unwrap();
    /// let _ = producer.push(RingSlot::new(AsId(0), SlotId(1)), 9999).unwrap(); // beyond the slot
    /// DirtyRingConsumer::new(&ring, cfg).unwrap().harvest(usize::MAX, |_| {});
    ///
    /// let (stats, flush) = mmu.write().reset_dirty_ring(&mut producer);
    /// flush.run(mmu.host());
    /// assert_eq!((stats.reset, stats.invalid), (2, 1));
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn reset_dirty_ring<M: RingMemory>(
        &mut self,
        ring: &mut DirtyRingProducer<'_, M>,
    ) -> (ResetStats, Flush) {
        let mut target = MmuResetTarget { mmu: self, flush: Flush::none() };
        let stats = ring.reset(&mut target);
        (stats, target.flush)
    }

    /// The pass that starts dirty logging on `slot` (KVM's `kvm_mmu_slot_remove_write_access` /
    /// `kvm_mmu_slot_leaf_clear_dirty`): touches only the leaves that must change.
    ///
    /// The walk stops at level 2: tables of 4 KiB leaves are never entered by the iterator but handled
    /// whole, a run of up to [`RUN`] of them at a time ([`Mmu::protect_leaf_tables`]); huge leaves lose W
    /// (with PML too: their next write must fault and split). The yield check runs before every run.
    pub(super) fn start_dirty_logging(&mut self, slot: &Memslot) -> Flush {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(slot.as_id)) {
            let mut it = mmu.slot_iter(root, slot, Level::L2);
            while it.valid() {
                if self.cond_resched(&mut it, &mut flush) {
                    continue;
                }
                let old = it.old_spte;
                let level = it.level();
                if level == Level::L2 && old.is_table(level) {
                    let run = mmu.protect_leaf_tables(slot, &it, &mut flush);
                    // The run's other entries are done: step over them (sideways, within the table).
                    for _ in 1..run {
                        it.next();
                    }
                } else if old.is_present() && old.is_leaf(level) {
                    let new = fmt.write_protected(old);
                    if new != old {
                        mmu.set_spte_exclusive(slot.as_id, &mut it, new);
                        flush = flush.merge(Flush::range(slot.as_id, it.gfn(), level.pages()));
                    }
                }
                it.next();
            }
            mmu.release_root(root);
        }
        flush
    }

    /// The pass that stops dirty logging on `slot` (KVM 6.13's `kvm_mmu_recover_huge_pages`, which
    /// `kvm_mmu_slot_apply_flags` runs under the read lock): drops the write lock, recovers the slot's
    /// huge pages in place with [`SharedMmu::recover_huge_pages`] under the read lock, and takes the
    /// write lock again. The recovery flushes itself, so nothing is owed.
    pub(super) fn stop_dirty_logging(&mut self, slot: &Memslot) -> Flush {
        let mmu = self.mmu;
        let (as_id, id) = (slot.as_id, slot.id);
        ExclusiveMmu::unlocked(mmu, &mut self.slots, || mmu.read().recover_huge_pages(as_id, id));
        Flush::none()
    }

    /// The stop-logging pass of KVM up to 6.12 (`kvm_mmu_zap_collapsible_sptes`): zaps every table of
    /// slot `id` that a huge leaf could replace, so that the next faults map huge pages again, one
    /// fault per huge page. [`ExclusiveMmu::set_memslot_flags`] no longer uses it (KVM 6.13 removed
    /// it for [`SharedMmu::recover_huge_pages`]); it stays as the baseline the benchmarks measure
    /// recovery against. Does nothing in a dirty-logged slot. Returns how many tables it zapped; it
    /// flushes itself, per root, before the zapped tables can be reused.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, SlotId};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{Mmu, MmuConfig};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(1), Gfn(0), 512, ram, SlotFlags::empty()))?;
    /// assert_eq!(mmu.write().zap_collapsible(AsId(0), SlotId(1)), 0, "nothing mapped");
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn zap_collapsible(&mut self, as_id: AsId, id: SlotId) -> usize {
        let Some(slot) = self.slots.get(as_id, id).copied() else {
            return 0;
        };
        if slot.is_dirty_logged() {
            return 0;
        }
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let nonpresent = fmt.nonpresent();
        let mut zapped = 0;
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            let mut flush = Flush::none();
            let mut it = mmu.slot_iter(root, &slot, Level::L2);
            while it.valid() {
                let level = it.level();
                if it.old_spte.is_table(level)
                    && level <= fmt.max_leaf_level()
                    && mmu.could_be_huge(&slot, it.gfn(), level)
                {
                    mmu.set_spte_exclusive(as_id, &mut it, nonpresent);
                    flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
                    zapped += 1;
                }
                it.next();
            }
            // The zapped tables are freed deferred: flush while this walk's guard (inside `it`) still
            // holds them back, so hardware never walks a reused page through a cached entry.
            flush.run(&mmu.host);
            drop(it);
            mmu.release_root(root);
        }
        zapped
    }

    /// Splits every huge leaf of slot `id` down to 4 KiB now, instead of at the first write (KVM's eager
    /// page splitting): the vCPUs then take no split faults while logging. Table pages come from `cache`;
    /// when it runs dry the lock is dropped to refill it, so no allocation happens under the lock.
    /// Splitting keeps every translation, so no flush is owed.
    ///
    /// # Errors
    /// [`AllocError`] when the cache cannot be refilled; what was split so far stays split (consistent).
    pub fn split_huge_pages(
        &mut self,
        as_id: AsId,
        id: SlotId,
        cache: &mut PageCache,
    ) -> Result<(), AllocError> {
        let Some(slot) = self.slots.get(as_id, id).copied() else {
            return Ok(());
        };
        self.split_range(as_id, (slot.base_gfn, slot.end_gfn()), cache, false)
    }

    /// Splits every huge leaf that maps a gfn of `[start, end)` in the roots of `as_id` down to 4 KiB
    /// (KVM's `kvm_tdp_mmu_try_split_huge_pages` with the write lock): table pages from `cache`, refilled
    /// with the lock dropped (KVM's `tdp_mmu_alloc_sp_for_split`, which drops the lock and retries).
    ///
    /// With `one_at_a_time`, each refill allocates what one split needs (one page, three for a 1 GiB
    /// leaf), as KVM allocates one page per split, rather than a burst: for the short ranges of a clear,
    /// whose unused pages would go straight back.
    fn split_range(
        &mut self,
        as_id: AsId,
        (start, end): (Gfn, Gfn),
        cache: &mut PageCache,
        one_at_a_time: bool,
    ) -> Result<(), AllocError> {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let fill = fmt.nonpresent();
        let mut result = Ok(());
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            if result.is_err() {
                // Out of pages: the other roots' references are only given back.
                mmu.release_root(root);
                continue;
            }
            let mut it = TdpIter::new(&mmu.host, &fmt, root, mmu.config.root_level, Level::L2, start, end);
            while it.valid() {
                let level = it.level();
                let old = it.old_spte;
                if !(old.is_present() && old.is_leaf(level) && level > Level::L1) {
                    it.next();
                    continue;
                }
                let Some(child) = cache.take() else {
                    if !it.may_yield() {
                        result = Err(AllocError);
                        break;
                    }
                    let slots = &mut self.slots;
                    // What splitting this leaf down to 4 KiB needs: a 1 GiB leaf's split leaves a 2 MiB
                    // leaf at the same gfn, where the walk may not yield again, and a short range may
                    // cross into a second one.
                    let need = if level > Level::L2 { 3 } else { 1 };
                    let refill = |cache: &mut PageCache| {
                        if !one_at_a_time {
                            return cache.topup(&mmu.host, fill, need);
                        }
                        for _ in 0..need {
                            let pfn = mmu.host.alloc_table(fill)?;
                            // The cache was empty, and holds far more than three pages.
                            cache
                                .put_back(pfn)
                                .map_err(|pfn| mmu.host.free_table_now(pfn))
                                .map_err(|()| AllocError)?;
                        }
                        Ok(())
                    };
                    result = it.yield_with(|| ExclusiveMmu::unlocked(mmu, slots, || refill(cache)));
                    if result.is_err() {
                        break;
                    }
                    continue;
                };
                mmu.split_into(as_id, &mut it, old, child);
                // Step into the new table: at 2 MiB its entries are huge leaves again, split in turn.
                it.next();
            }
            drop(it);
            mmu.release_root(root);
        }
        result
    }
}

impl<H: Host, R: RawRwLock> SharedMmu<'_, H, R> {
    /// Recovers the huge pages of slot `id` in place, under the read lock (KVM 6.13's
    /// `kvm_tdp_mmu_recover_huge_pages`, "Recover TDP MMU huge page mappings in-place instead of
    /// zapping"): each table that one huge leaf can replace is replaced by it with one
    /// compare-exchange, so no translation is lost and no vCPU refaults. A table qualifies when the
    /// slot allows a huge leaf there ([`Memslot::allows_huge`]), the host maps its gfns at that level
    /// or above ([`crate::host::HostTranslate::mapping_level`]), no invalidation in progress covers it,
    /// and it holds a present leaf; the huge leaf is that first leaf's frame aligned down, with its
    /// rights and bits ([`crate::spte::SpteFormat::huge_from`], KVM's `make_huge_spte`). The table
    /// removed goes the usual way (frozen, children handled, freed deferred). Tables of 4 KiB leaves
    /// become 2 MiB leaves; tables under a 1 GiB entry, if the format and host allow it, a 1 GiB leaf.
    ///
    /// Does nothing in a dirty-logged slot (KVM warns there), and stops if the slot changes while a
    /// yield has dropped the lock. Flushes itself before any removed table can be reused. Returns how
    /// many tables were replaced.
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
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// let logged = Memslot::new(AsId(0), SlotId(1), Gfn(0), 512, ram, SlotFlags::LOG_DIRTY);
    /// mmu.write().insert_memslot(logged)?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    /// for page in 0..4 {
    ///     let fault = Fault { as_id: AsId(0), gpa: Gpa(page * 4096), access: AccessKind::Write,
    ///                         kind: FaultKind::Violation { present: false } };
    ///     mmu.handle_fault(&mut vcpu, fault, &mut ()).unwrap();
    /// }
    /// assert_eq!(mmu.stats().leaves, [4, 0, 0], "logged: mapped at 4 KiB");
    /// // Stopping logging recovers the 2 MiB leaf in place (set_memslot_flags runs this pass).
    /// mmu.write().set_memslot_flags(AsId(0), SlotId(1), SlotFlags::empty())?.run(mmu.host());
    /// assert_eq!(mmu.stats().leaves, [0, 1, 0]);
    /// assert_eq!(mmu.read().recover_huge_pages(AsId(0), SlotId(1)), 0, "nothing left to recover");
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn recover_huge_pages(&mut self, as_id: AsId, id: SlotId) -> usize {
        let mmu = self.mmu;
        let Some(slot) = self.slots.get(as_id, id).copied() else {
            return 0;
        };
        if slot.is_dirty_logged() {
            return 0;
        }
        let fmt = *mmu.format();
        let mut recovered = 0;
        let mut stop = false;
        for (root, _) in mmu.roots.acquire_valid(as_id) {
            if stop {
                mmu.release_root(root);
                continue;
            }
            let mut flush = Flush::none();
            let mut it = mmu.slot_iter(root, &slot, Level::L2);
            while it.valid() {
                if it.may_yield() && mmu.host.should_yield() {
                    // The yield drops the walk guard, which lets the tables removed so far be reused.
                    core::mem::replace(&mut flush, Flush::none()).run(&mmu.host);
                    let slots = &mut self.slots;
                    it.yield_with(|| SlotsRead::unlocked(slots, &mmu.lock, || mmu.host.yield_now()));
                    // Logging may have started again (or the slot gone) while the lock was dropped.
                    if self.slots.get(as_id, id) != Some(&slot) {
                        stop = true;
                        break;
                    }
                    continue;
                }
                let level = it.level();
                if level <= fmt.max_leaf_level()
                    && it.old_spte.is_table(level)
                    // No huge leaf over a write-tracked gfn (KVM's `lpage_info` disallow count).
                    && !self.slots.write_track().any_in(as_id, it.gfn(), level.pages())
                    && let Some(huge) = mmu.huge_replacement(&slot, &it)
                {
                    if mmu.set_spte_atomic(as_id, &mut it, huge).is_err() {
                        // Another writer changed the entry: look at its new value.
                        continue;
                    }
                    flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
                    recovered += 1;
                }
                it.next();
            }
            // The removed tables are freed deferred: flush while this walk's guard still holds them back.
            flush.run(&mmu.host);
            drop(it);
            mmu.release_root(root);
        }
        recovered
    }
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// Whether a fault in `slot` could map the `level` entry at `gfn` with one huge leaf (KVM's
    /// `kvm_mmu_max_mapping_level` against `level`): the slot allows it and the host maps the gfn at
    /// `level` or above.
    fn could_be_huge(&self, slot: &Memslot, gfn: Gfn, level: Level) -> bool {
        slot.allows_huge(gfn, level)
            && self.host.mapping_level(slot, gfn).is_some_and(|host_level| host_level >= level)
    }

    /// The huge leaf that can replace the table linked at the iterator (KVM's `recover_huge_pages_range`
    /// and `tdp_mmu_make_huge_spte`), or `None`: a huge leaf is not allowed there, an invalidation in
    /// progress covers the range, a fetch linked the table under the NX mitigation, the table holds no
    /// present leaf, or its first leaf's frame does not sit at its gfn's offset in the huge page. Under
    /// the NX mitigation the leaf is not executable.
    fn huge_replacement(&self, slot: &Memslot, it: &TdpIter<'_, H>) -> Option<Spte> {
        let fmt = self.format();
        let (gfn, level) = (it.gfn(), it.level());
        let end = Gfn(gfn.0 + level.pages());
        // KVM 6.13 does not look at invalidations here: a range being invalidated has had its leaves
        // zapped, so it holds no leaf to build from, unless the host changes part of a huge mapping
        // without invalidating all of it. Skipping such a range costs nothing and trusts no host.
        if !self.could_be_huge(slot, gfn, level) || self.invalidation.in_progress_over(gfn, end) {
            return None;
        }
        let child = fmt.child_table(it.old_spte, level)?;
        // A table a fetch linked under the NX mitigation holds executable pages: leave it to NX recovery.
        if self.nx.is_tracked(child) {
            return None;
        }
        let (small, small_gfn) = self.first_leaf(child, level.lower()?, gfn)?;
        let huge = fmt.huge_from(small, level);
        // Under the NX mitigation a huge leaf is not executable (KVM's `make_huge_spte`).
        let huge = if self.nx.enabled() { fmt.non_executable(huge) } else { huge };
        (huge.pfn().0 + (small_gfn.0 - gfn.0) == small.pfn().0).then_some(huge)
    }

    /// The first present leaf, in pre-order, of the table `table` whose entries are at `level` and map
    /// from `base`, with the gfn it maps. Reads under the caller's walk guard; a frozen entry (a table
    /// being removed by another thread) reads as not present.
    fn first_leaf(&self, table: Pfn, level: Level, base: Gfn) -> Option<(Spte, Gfn)> {
        for (i, entry) in self.host.table(table).iter().enumerate() {
            // Acquire: pairs with the Release that linked a child table here.
            let spte = Spte(entry.load(Ordering::Acquire));
            if !spte.is_present() {
                continue;
            }
            let gfn = Gfn(base.0 + i as u64 * level.pages());
            if spte.is_leaf(level) {
                return Some((spte, gfn));
            }
            if let Some(found) = self.first_leaf(spte.pfn(), level.lower()?, gfn) {
                return Some(found);
            }
        }
        None
    }

    /// A walk of `slot`'s gfns in the tree at `root`, down to `min_level`.
    fn slot_iter(&self, root: Pfn, slot: &Memslot, min_level: Level) -> TdpIter<'_, H> {
        TdpIter::new(
            &self.host,
            &self.config.format,
            root,
            self.config.root_level,
            min_level,
            slot.base_gfn,
            slot.end_gfn(),
        )
    }

    /// The enable-logging pass at the level-2 entry under `it`, which links a table of 4 KiB leaves:
    /// protects (or, with PML, cleans) that table and those of the entries after it in the same level-2
    /// table, up to [`RUN`] entries in all and stopping before one that maps gfns outside `slot`; a huge
    /// leaf among them loses W. Returns how many entries it handled (at least 1), merging the flush owed
    /// into `flush`.
    ///
    /// The run's leaf tables are visited in the order of their frames, not of their gfns: page caches
    /// hand out pages last-in first-out, so consecutive gfns often sit in descending frames, which
    /// defeats the hardware prefetchers; in frame order the pass streams through memory.
    fn protect_leaf_tables(&self, slot: &Memslot, it: &TdpIter<'_, H>, flush: &mut Flush) -> usize {
        let fmt = *self.format();
        let as_id = slot.as_id;
        let (start, end) = (slot.base_gfn.0, slot.end_gfn().0);
        let base = it.gfn().0;
        let l2_pages = Level::L2.pages();
        if base < start || base + l2_pages > end {
            // The slot's first or last 2 MiB, partly outside it: only the entries inside change.
            let (lo, hi) = (start.max(base) - base, end.min(base + l2_pages) - base);
            let table = self.host.table(it.old_spte.pfn());
            let entries = &table[lo as usize..hi as usize];
            if self.protect_leaves_one_by_one(as_id, entries, Gfn(base + lo), self.clear_mask()) {
                *flush = flush.merge(Flush::range(as_id, Gfn(base + lo), hi - lo));
            }
            return 1;
        }
        let first = it.gfn().index_at(Level::L2).get();
        let len = RUN.min(512 - first).min(((end - base) / l2_pages) as usize);
        let l2 = &self.host.table(it.table_pfn())[first..first + len];
        // The run's tables, as frame << 9 | index in the run: sorted, they come in frame order.
        let mut tables = [0u64; RUN];
        let mut count = 0;
        for (i, entry) in l2.iter().enumerate() {
            // Acquire, as the iterator's reads: pairs with the Release that linked a table here.
            let spte = Spte(entry.load(Ordering::Acquire));
            let gfn = Gfn(base + i as u64 * l2_pages);
            if let Some(table) = fmt.child_table(spte, Level::L2) {
                tables[count] = table.0 << 9 | i as u64;
                count += 1;
            } else if spte.is_present() && spte.is_leaf(Level::L2) && fmt.write_protected(spte) != spte {
                let new = fmt.write_protected(spte);
                let old = self.write_spte_exclusive(entry, spte, new);
                self.handle_changed_spte(as_id, gfn, old, new, Level::L2, LockMode::Exclusive);
                *flush = flush.merge(Flush::range(as_id, gfn, l2_pages));
            }
        }
        let tables = &mut tables[..count];
        tables.sort_unstable();
        let (mut lo, mut hi) = (u64::MAX, 0);
        for &key in &*tables {
            let gfn = base + (key & 511) * l2_pages;
            if self.protect_leaf_table(as_id, Pfn(key >> 9), Gfn(gfn)) {
                (lo, hi) = (lo.min(gfn), hi.max(gfn + l2_pages));
            }
        }
        if lo < hi {
            *flush = flush.merge(Flush::range(as_id, Gfn(lo), hi - lo));
        }
        len
    }

    /// What write protection clears in a 4 KiB leaf: [`Mmu::clear_bit`], plus the saved W of an
    /// access-tracked leaf (aging owes no flush, so a TLB may still hold the W it saved: clearing it
    /// changes the leaf, and the change's flush removes that W). Formats with A/D bits, which PML needs,
    /// have no saved W: the bit is 0 there.
    fn clear_mask(&self) -> u64 {
        self.clear_bit() | self.format().access_tracked_write_bit()
    }

    /// The bit the enable-logging pass clears in 4 KiB leaves: D with PML, else W.
    fn clear_bit(&self) -> u64 {
        if self.config.pml { self.format().dirty_mask() } else { WRITE_BIT }
    }

    /// Protects (or, with PML, cleans) every present leaf of the 4 KiB table `table`, whose first gfn is
    /// `base`. Returns whether any leaf changed.
    ///
    /// The table goes by spans of [`SPAN`] entries. The AND of a span's entries tells whether all of
    /// them hold the bit to clear and cannot change under us (present, and with A/D bits, A and D set):
    /// such a span is rewritten with one load-AND-store instruction per entry and no branch, about three
    /// instructions per entry with the test (a plain sweep is one). A span where the OR shows no bit to
    /// clear is left alone (a pass over protected leaves costs the test alone). In any other span, each
    /// chunk of [`CHUNK`] entries is tested the same way, and one that is not all ready goes entry by
    /// entry ([`Mmu::protect_leaves_one_by_one`]: holes, entries hardware may update).
    fn protect_leaf_table(&self, as_id: AsId, table: Pfn, base: Gfn) -> bool {
        let fmt = *self.format();
        let clear = self.clear_bit();
        // What every entry of a chunk must hold for the blind rewrite. Hardware sets A, or D on a
        // writable entry, only when the bit is clear (KVM's `spte_needs_atomic_update`), and only lock
        // holders clear them: with both set (or without A/D bits) nothing but us writes the entry.
        let ready = MMU_PRESENT | fmt.accessed_mask() | fmt.dirty_mask() | clear;
        // Access-tracked leaves (EPT without A/D) keep their W in a saved bit, which protection clears
        // too; no ready entry has it (a ready entry has W, a tracked one has not).
        let look_at = self.clear_mask();
        let (spans, _) = self.host.table(table).as_chunks::<SPAN>();
        let mut changed = false;
        for (n, span) in spans.iter().enumerate() {
            let first = Gfn(base.0 + (n * SPAN) as u64);
            // Relaxed, here and below: the write lock excludes every other software writer (lock holders,
            // and the fast path, which runs under the read side); the values read only decide whether
            // hardware could write too. The lock's release and the flush the caller runs publish the
            // stores; leaves publish no memory.
            if and_all(span) & ready == ready {
                self.clear_ready(as_id, span, first, clear);
                changed = true;
                continue;
            }
            if or_all(span) & look_at == 0 {
                // No entry has the bit: already protected (a second pass lands here), or not present.
                continue;
            }
            // Not all ready: the same test per chunk, and the entry-by-entry loop where it fails.
            let (chunks, _) = span.as_chunks::<CHUNK>();
            for (c, chunk) in chunks.iter().enumerate() {
                let first = Gfn(first.0 + (c * CHUNK) as u64);
                if and_all(chunk) & ready == ready {
                    self.clear_ready(as_id, chunk, first, clear);
                    changed = true;
                } else if or_all(chunk) & look_at != 0 {
                    // Some entry has the bit (or is access-tracked), but not every entry is ready.
                    changed |= self.protect_leaves_one_by_one(as_id, chunk, first, look_at);
                }
            }
        }
        changed
    }

    /// Clears `clear` in every entry of `entries` (4 KiB leaves, the first mapping `first`), which the
    /// caller found all ready: present, holding the bit, and (with A/D bits) with A and D set, so that
    /// no entry can have changed since.
    #[inline(always)]
    fn clear_ready(&self, as_id: AsId, entries: &[AtomicU64], first: Gfn, clear: u64) {
        // Each entry is read again rather than kept in a register from the test, so that the load, the
        // AND and the store are one instruction. Keeping the test's values instead (one load per entry:
        // load, AND into the test, AND, store), or part of each chunk, was measured slower (the figures
        // are in docs/benchmarks.md, "Measurements behind choices in the code"): the pass is bound by
        // instructions as much as by loads, and LLVM folds neither atomic load into the test's AND.
        // Relaxed: see `protect_leaf_table`.
        for (i, entry) in entries.iter().enumerate() {
            let old = entry.load(Ordering::Relaxed);
            entry.store(old & !clear, Ordering::Relaxed);
            // The bulk path's share of `handle_changed_spte`'s debug check (nothing in release builds).
            debug_assert!(
                self.format().check(Spte(old & !clear), Level::L1).is_ok(),
                "{:?}",
                Spte(old & !clear)
            );
            // A leaf that stays a leaf: no statistics change, only the event (free for a host without
            // events: the default method is empty and the loop compiles to the ANDs).
            let gfn = Gfn(first.0 + i as u64);
            self.host.spte_changed(as_id, gfn, Level::L1, Spte(old), Spte(old & !clear));
        }
    }

    /// Clears `clear` in each present leaf of `entries` (4 KiB leaves, the first mapping `first`) that
    /// has it, with a plain store where no hardware writer can race (KVM's `spte_needs_atomic_update`),
    /// else with an atomic AND, which keeps any A/D bit hardware sets meanwhile. Returns whether any leaf
    /// changed.
    #[inline(never)]
    fn protect_leaves_one_by_one(&self, as_id: AsId, entries: &[AtomicU64], first: Gfn, clear: u64) -> bool {
        let fmt = *self.format();
        let accessed = fmt.accessed_mask();
        let dirty = fmt.dirty_mask();
        let mut changed = false;
        for (i, entry) in entries.iter().enumerate() {
            // Relaxed: see `protect_leaf_table`; the AND below covers hardware's updates.
            let old = entry.load(Ordering::Relaxed);
            if old & MMU_PRESENT == 0 || old & clear == 0 {
                continue;
            }
            // Hardware sets A, or D on a writable entry, with a locked update when the bit is clear.
            let racy = old & accessed == 0 && accessed != 0
                || (old & WRITE_BIT != 0 && old & dirty == 0 && dirty != 0);
            let old = if racy {
                // AcqRel, as the exchange it replaces: it pairs with hardware's locked update, whose bits
                // the returned value carries (and which the AND keeps in the entry).
                entry.fetch_and(!clear, Ordering::AcqRel)
            } else {
                entry.store(old & !clear, Ordering::Relaxed);
                old
            };
            changed = true;
            debug_assert!(fmt.check(Spte(old & !clear), Level::L1).is_ok(), "{:?}", Spte(old & !clear));
            // A leaf that stays a leaf: no statistics change, only the event.
            let gfn = Gfn(first.0 + i as u64);
            self.host.spte_changed(as_id, gfn, Level::L1, Spte(old), Spte(old & !clear));
        }
        changed
    }

    /// Replaces the huge leaf `old` at the iterator with table `child`, filled with its split children,
    /// under the write lock.
    fn split_into(&self, as_id: AsId, it: &mut TdpIter<'_, H>, old: Spte, child: Pfn) {
        let level = it.level();
        self.fill_split_children(child, old, level);
        self.set_spte_exclusive(as_id, it, self.format().nonleaf(child));
        self.count_split(as_id, it.gfn(), level);
    }
}

/// The pages of a memslot that a re-protect mask names: gfns `[start, end)`, clipped to the slot.
struct MaskWindow {
    /// The gfn of mask bit 0 (it may lie outside the slot; only bits inside it count).
    bit0: u64,
    mask: u64,
    start: Gfn,
    end: Gfn,
}

impl MaskWindow {
    /// The window of `mask` at `base_offset` in `slot`, or `None` when no bit names a page of the slot.
    fn new(slot: &Memslot, base_offset: u64, mask: u64) -> Option<Self> {
        if mask == 0 || base_offset >= slot.pages {
            return None;
        }
        let first = base_offset + u64::from(mask.trailing_zeros());
        let last = base_offset.saturating_add(63 - u64::from(mask.leading_zeros()));
        let (first, end) = (first.min(slot.pages), last.saturating_add(1).min(slot.pages));
        (first < end).then(|| MaskWindow {
            bit0: slot.base_gfn.0 + base_offset,
            mask,
            start: Gfn(slot.base_gfn.0 + first),
            end: Gfn(slot.base_gfn.0 + end),
        })
    }

    /// Whether the mask names a page of the leaf at `level` mapping from `gfn` (inside the window).
    fn names(&self, gfn: Gfn, level: Level) -> bool {
        let lo = gfn.0.max(self.start.0);
        let hi = (gfn.0 + level.pages()).min(self.end.0);
        if lo >= hi {
            return false;
        }
        // Bits lo - bit0 ..= hi - 1 - bit0, all within 0..64 since the window is.
        let (from, to) = (lo - self.bit0, hi - 1 - self.bit0);
        let upto = if to >= 63 { u64::MAX } else { (1u64 << (to + 1)) - 1 };
        self.mask & upto & !((1u64 << from) - 1) != 0
    }
}

/// Level-2 entries (tables of 4 KiB leaves: 2 MiB of guest memory each) the enable-logging pass handles
/// between two yield checks, and sorts by frame: 128 MiB, some 10 µs of work.
const RUN: usize = 64;

/// Entries per span of [`Mmu::protect_leaf_table`]: four cache lines tested with one branch.
const SPAN: usize = 32;

/// Entries per chunk of [`Mmu::protect_leaf_table`] (one cache line), the unit in a span not all ready.
const CHUNK: usize = 8;

/// The AND of `N` entries, read in four independent chains (no long chain of dependent ANDs).
#[inline(always)]
fn and_all<const N: usize>(entries: &[AtomicU64; N]) -> u64 {
    let mut acc = [u64::MAX; 4];
    for (i, entry) in entries.iter().enumerate() {
        // Relaxed: see `Mmu::protect_leaf_table`.
        acc[i % 4] &= entry.load(Ordering::Relaxed);
    }
    (acc[0] & acc[1]) & (acc[2] & acc[3])
}

/// The OR of `N` entries, as [`and_all`].
#[inline(always)]
fn or_all<const N: usize>(entries: &[AtomicU64; N]) -> u64 {
    let mut acc = [0; 4];
    for (i, entry) in entries.iter().enumerate() {
        // Relaxed: see `Mmu::protect_leaf_table`.
        acc[i % 4] |= entry.load(Ordering::Relaxed);
    }
    (acc[0] | acc[1]) | (acc[2] | acc[3])
}

/// The MMU, with its write lock held, as the target of a dirty-ring reset.
struct MmuResetTarget<'m, 'a, H: Host, R: RawRwLock> {
    mmu: &'m mut ExclusiveMmu<'a, H, R>,
    flush: Flush,
}

impl<H: Host, R: RawRwLock> ResetTarget for MmuResetTarget<'_, '_, H, R> {
    fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
        self.mmu.memslots().get(slot.as_id(), slot.id()).copied()
    }

    fn reprotect(&mut self, batch: ReprotectBatch) {
        let slot = batch.slot();
        let flush = self.mmu.reprotect_dirty(slot.as_id(), slot.id(), batch.offset(), batch.mask());
        self.flush = self.flush.merge(flush);
    }
}
