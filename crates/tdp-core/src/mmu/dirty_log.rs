//! Dirty logging in the MMU: the pass that starts logging a memslot, eager splitting of its huge pages,
//! re-protection of harvested pages (ring reset, bitmap clear), and the pass that stops logging.
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

use lock_api::{RawRwLock, RwLockWriteGuard};

use crate::addr::{AsId, Gfn, Level, RingSlot, SlotId};
use crate::dirty_ring::{DirtyRingProducer, ReprotectBatch, ResetStats, ResetTarget};
use crate::flush::Flush;
use crate::host::{AllocError, Host};
use crate::iter::TdpIter;
use crate::memslot::Memslot;
use crate::spte::{EptBits, MMU_PRESENT, Spte};

/// The hardware W bit, bit 1 in both formats.
const WRITE_BIT: u64 = EptBits::WRITE.bits();
use crate::sync::Ordering;

use super::cache::PageCache;
use super::spte_ops::LockMode;
use super::{ExclusiveMmu, Mmu};

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Re-protects the pages of slot `id` named by `mask` (bit `i` is page `base_offset + i` of the
    /// slot), after they were harvested (KVM's `kvm_arch_mmu_enable_log_dirty_pt_masked`): 4 KiB leaves
    /// lose D with PML or W without; huge leaves lose W. Offsets outside the slot are ignored, so a
    /// batch built from consumer-writable ring memory cannot reach beyond its slot (I5).
    ///
    /// The caller owes the returned flush before it reads the pages' contents.
    pub fn reprotect_dirty(&mut self, as_id: AsId, id: SlotId, base_offset: u64, mask: u64) -> Flush {
        let Some(slot) = self.slots.get(as_id, id).copied() else {
            return Flush::none();
        };
        let mmu = self.mmu;
        let fmt = mmu.format();
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            let _walk = mmu.host.begin_walk();
            let mut bits = mask;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let Some(offset) = base_offset.checked_add(bit).filter(|o| *o < slot.pages) else {
                    continue;
                };
                let gfn = Gfn(slot.base_gfn.0 + offset);
                let (entry, level, old) = mmu.walk_to_leaf(root, gfn);
                if !old.is_present() || !old.is_leaf(level) {
                    continue;
                }
                let new = if level == Level::L1 && mmu.config.pml {
                    fmt.cleaned(old)
                } else {
                    fmt.write_protected(old)
                };
                if new == old {
                    continue;
                }
                let base = gfn.align_down(level);
                let old = mmu.write_spte_exclusive(entry, old, new);
                mmu.handle_changed_spte(as_id, base, old, new, level, LockMode::Exclusive);
                flush = flush.merge(Flush::range(as_id, base, level.pages()));
            }
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
    pub fn reset_dirty_ring(&mut self, ring: &mut DirtyRingProducer<'_>) -> (ResetStats, Flush) {
        let mut target = MmuResetTarget { mmu: self, flush: Flush::none() };
        let stats = ring.reset(&mut target);
        (stats, target.flush)
    }

    /// The pass that starts dirty logging on `slot` (KVM's `kvm_mmu_slot_remove_write_access` /
    /// `kvm_mmu_slot_leaf_clear_dirty`): touches only the leaves that must change.
    pub(super) fn start_dirty_logging(&mut self, slot: &Memslot) -> Flush {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(slot.as_id)) {
            let mut it = mmu.slot_iter(root, slot, Level::L1);
            while it.valid() {
                if self.cond_resched(&mut it, &mut flush) {
                    continue;
                }
                let old = it.old_spte;
                let level = it.level();
                if level == Level::L1
                    && it.gfn().is_aligned(Level::L2)
                    && it.gfn().0 + 512 <= slot.end_gfn().0
                {
                    if mmu.protect_leaf_table(slot.as_id, it.table_pfn(), it.gfn()) {
                        flush = flush.merge(Flush::range(slot.as_id, it.gfn(), Level::L2.pages()));
                    }
                    it.finish_table();
                    it.next();
                    continue;
                }
                if old.is_present() && old.is_leaf(level) {
                    let new = if level == Level::L1 && mmu.config.pml {
                        fmt.cleaned(old)
                    } else {
                        fmt.write_protected(old)
                    };
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

    /// The pass that stops dirty logging on `slot` (KVM's `kvm_mmu_zap_collapsible_sptes`): zaps every
    /// table that a huge leaf could replace, so that the next faults map huge pages again. It flushes
    /// itself, per root, before the zapped tables can be reused, so it owes nothing.
    pub(super) fn stop_dirty_logging(&mut self, slot: &Memslot) -> Flush {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let nonpresent = fmt.nonpresent();
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(slot.as_id)) {
            let mut it = mmu.slot_iter(root, slot, Level::L2);
            while it.valid() {
                let level = it.level();
                if it.old_spte.is_table(level)
                    && level <= fmt.max_leaf_level()
                    && self.could_be_huge(slot, it.gfn(), level)
                {
                    mmu.set_spte_exclusive(slot.as_id, &mut it, nonpresent);
                    flush = flush.merge(Flush::range(slot.as_id, it.gfn(), level.pages()));
                }
                it.next();
            }
            // The zapped tables are freed deferred: flush while this walk's guard (inside `it`) still
            // holds them back, so hardware never walks a reused page through a cached entry.
            core::mem::replace(&mut flush, Flush::none()).run(&mmu.host);
            drop(it);
            mmu.release_root(root);
        }
        flush
    }

    /// Whether a fault in `slot` could map the `level` entry at `gfn` with one huge leaf.
    fn could_be_huge(&self, slot: &Memslot, gfn: Gfn, level: Level) -> bool {
        let first = gfn.max(slot.base_gfn);
        slot.allows_huge(first, level)
            && self.mmu.host.translate(slot, first, false).is_ok_and(|h| h.level >= level)
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
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let fill = fmt.nonpresent();
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            let mut it = mmu.slot_iter(root, &slot, Level::L2);
            let mut result = Ok(());
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
                    result = it
                        .yield_with(|| RwLockWriteGuard::unlocked(slots, || cache.topup(&mmu.host, fill, 1)));
                    if result.is_err() {
                        break;
                    }
                    continue;
                };
                mmu.split_into(as_id, &mut it, old, child);
                // Step into the new table: at 2 MiB its entries are huge leaves again, split in turn.
                it.next();
            }
            mmu.release_root(root);
            result?;
        }
        Ok(())
    }
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// A walk of `slot`'s gfns in the tree at `root`, down to `min_level`.
    fn slot_iter(&self, root: crate::addr::Pfn, slot: &Memslot, min_level: Level) -> TdpIter<'_, H> {
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

    /// Protects (or, with PML, cleans) every present leaf of the 4 KiB table `table`, whose first gfn is
    /// `base`, in one loop: the enable-logging pass's common case. Returns whether any leaf changed.
    fn protect_leaf_table(&self, as_id: AsId, table: crate::addr::Pfn, base: Gfn) -> bool {
        // Everything the loop needs, in registers: the bit to clear (D with PML, else W) and what
        // decides whether hardware could write the entry while we do.
        let fmt = *self.format();
        let clear = if self.config.pml { fmt.dirty_mask() } else { WRITE_BIT };
        let accessed = fmt.accessed_mask();
        let dirty = fmt.dirty_mask();
        let mut any = false;
        for (i, entry) in self.host.table(table).iter().enumerate() {
            // Relaxed: the write lock excludes every other writer but hardware's A/D updates, which the
            // exchange below covers; the lock's release publishes the stores.
            let old = entry.load(Ordering::Relaxed);
            if old & MMU_PRESENT == 0 || old & clear == 0 {
                continue;
            }
            let new = old & !clear;
            // Hardware sets A, or D on a writable entry, with a locked update when the bit is clear
            // (KVM's `spte_needs_atomic_update`); the fast path cannot run under the write lock.
            let racy = old & accessed == 0 && accessed != 0
                || (old & WRITE_BIT != 0 && old & dirty == 0 && dirty != 0);
            let old = if racy {
                entry.swap(new, Ordering::AcqRel)
            } else {
                entry.store(new, Ordering::Relaxed);
                old
            };
            any = true;
            // A leaf that stays a leaf: no statistics change, only the event.
            self.host.spte_changed(as_id, Gfn(base.0 + i as u64), Level::L1, Spte(old), Spte(new));
        }
        any
    }

    /// Replaces the huge leaf `old` at the iterator with table `child`, filled with its split children,
    /// under the write lock.
    fn split_into(&self, as_id: AsId, it: &mut TdpIter<'_, H>, old: Spte, child: crate::addr::Pfn) {
        let level = it.level();
        self.fill_split_children(child, old, level);
        self.set_spte_exclusive(as_id, it, self.format().nonleaf(child));
        self.count_split(level);
    }
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
