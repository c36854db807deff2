//! Mirror roots (what KVM added for TDX): a second tree per address space for private memslots
//! ([`SlotFlags::PRIVATE`](crate::memslot::SlotFlags::PRIVATE)), whose every change the host copies
//! into its external tables ([`ExternalTables`](crate::host::ExternalTables)), the tables a confidential VM really runs on (the TDX
//! module's Secure EPT, which the host cannot write directly).
//!
//! The rules are KVM's: a change of a mirror entry under the read lock freezes the entry (one
//! compare-exchange from the value seen to the frozen value), tells the host, and only then stores the
//! new value, so a racing fault sees the frozen entry and retries instead of overtaking the host's
//! copy; when the host refuses, the old value goes back. Removal happens under the write lock only, leaf
//! by leaf, the host told after each entry is cleared; teardown removes every leaf under a table before
//! freeing the table. The mirror maps 4 KiB pages only, always writable, and nothing else walks it:
//! dirty logging, aging, write tracking, NX recovery and huge-page recovery never see private memory
//! (KVM refuses dirty logging on guest_memfd, and the hardware's A/D bits live in the external tables).
//!
//! Keeps: I1 (a private leaf maps the frame the host translated, in a private slot only), I2 (a mirror
//! table is freed after everything below it is removed, deferred as any other), I3 (a zap of private
//! leaves returns the flush the caller owes, and the host flushes its own copy when told of a removal).

use lock_api::RawRwLock;

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::flush::Flush;
use crate::host::{ExternalError, Host, HostPage};
use crate::iter::TdpIter;
use crate::spte::{LeafWrite, Spte};
use crate::sync::{AtomicU64, Ordering};

use super::cache::PageCache;
use super::fault::{FaultError, FaultOutcome};
use super::root::RootRef;
use super::spte_ops::LockMode;
use super::{ExclusiveMmu, Mmu, SharedMmu};

impl<H: Host, R: RawRwLock> SharedMmu<'_, H, R> {
    /// The fault on `gfn` of a private memslot, whose page `host` translated writable: walks `mirror`
    /// (the vCPU's mirror root) down to 4 KiB, linking missing tables and installing the leaf, each change frozen
    /// while the host copies it into its external tables.
    ///
    /// # Errors
    /// [`FaultError::External`] when the host refuses a change for good (the mirror entry is back as it
    /// was); a busy host makes the fault retry.
    #[cold]
    #[inline(never)]
    pub(super) fn private_fault(
        &self,
        cache: &mut PageCache,
        mirror: Option<&RootRef>,
        gfn: Gfn,
        host: HostPage,
    ) -> Result<FaultOutcome, FaultError> {
        let Some(mirror) = mirror else {
            // The vCPU loaded its roots before the host had external tables: load them again.
            return Ok(FaultOutcome::ReloadRoot);
        };
        let mmu = self.mmu;
        let fmt = mmu.format();
        let as_id = mirror.as_id();
        let _walk = mmu.host.begin_walk();
        let mut table = mmu.host.table(mirror.pfn());
        let mut level = mmu.config.root_level;
        loop {
            let shift = level.shift_in_frames();
            let entry = &table[((gfn.0 >> shift) & 0x1ff) as usize];
            // Acquire pairs with the Release store that published a child table here.
            let old = Spte(entry.load(Ordering::Acquire));
            if fmt.is_frozen(old) {
                return Ok(FaultOutcome::Retry);
            }
            if level == Level::L1 {
                if old.is_present() {
                    // Another vCPU mapped it first; mirror leaves allow every access.
                    return Ok(FaultOutcome::Spurious);
                }
                debug_assert!(host.writable, "private pages are translated writable");
                let memtype = mmu.memtype_bits(host.memory);
                let leaf = mmu.leaf_templates.leaf(host.pfn, Level::L1, LeafWrite::Writable, memtype);
                let set = |h: &H| h.set_external_leaf(as_id, gfn, Level::L1, host.pfn);
                return match self.change_frozen(entry, old, leaf, set) {
                    Ok(true) => {
                        mmu.leaf_appeared(self.line(), as_id, gfn, old, leaf, Level::L1);
                        Ok(FaultOutcome::Fixed)
                    }
                    Ok(false) => Ok(FaultOutcome::Retry),
                    Err(e) => Err(FaultError::External(e)),
                };
            }
            let child = if old.is_present() {
                debug_assert!(!old.is_large(), "mirror roots hold no huge leaves: {old:?}");
                old.pfn()
            } else {
                let Some(child) = cache.take() else {
                    return Ok(FaultOutcome::Retry);
                };
                let base = gfn.align_down(level);
                let link = |h: &H| h.link_external_table(as_id, base, level, child);
                let linked = fmt.nonleaf(child);
                match self.change_frozen(entry, old, linked, link) {
                    Ok(true) => mmu.handle_changed_spte(as_id, base, old, linked, level, LockMode::Shared),
                    outcome => {
                        // Never published: the page is as the cache gave it.
                        if let Err(pfn) = cache.put_back(child) {
                            mmu.host.free_table_now(pfn);
                        }
                        return outcome.map(|_| FaultOutcome::Retry).map_err(FaultError::External);
                    }
                }
                child
            };
            table = mmu.host.table(child);
            // Above level 1 here: the level below exists.
            level = level.lower().unwrap_or(Level::L1);
        }
    }

    /// KVM's `set_external_spte_present`: freezes `entry` (from `old`), lets `tell` copy the change into
    /// the host's tables, and stores `new`, or `old` again when the host refused. `Ok(false)`: another
    /// writer changed the entry first, or the host was busy; nothing changed.
    fn change_frozen(
        &self,
        entry: &AtomicU64,
        old: Spte,
        new: Spte,
        tell: impl FnOnce(&H) -> Result<(), ExternalError>,
    ) -> Result<bool, ExternalError> {
        let frozen = self.mmu.format().frozen();
        if entry.compare_exchange(old.0, frozen.0, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Ok(false);
        }
        match tell(&self.mmu.host) {
            Ok(()) => {
                // Release publishes a new child table's entries to walkers that Acquire-load this one.
                entry.store(new.0, Ordering::Release);
                Ok(true)
            }
            Err(e) => {
                entry.store(old.0, Ordering::Release);
                if e == ExternalError::Busy { Ok(false) } else { Err(e) }
            }
        }
    }
}

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Zaps the private leaves mapping a gfn in `[start, end)` in the mirror root of `as_id`, telling the
    /// host after each one (KVM's `remove_external_spte`). Tables stay. Part of
    /// [`ExclusiveMmu::zap_gfn_range`]; the caller owes the returned flush.
    pub(super) fn zap_mirror_leafs(&mut self, as_id: AsId, start: Gfn, end: Gfn, mut flush: Flush) -> Flush {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let nonpresent = fmt.nonpresent();
        for (root, _) in mmu.mirror_roots.acquire_all(Some(as_id)) {
            let mut it = TdpIter::new(&mmu.host, fmt, root, mmu.config.root_level, Level::L1, start, end);
            while it.valid() {
                if self.cond_resched(&mut it, &mut flush) {
                    continue;
                }
                let (old, level) = (it.old_spte, it.level());
                if old.is_present() && old.is_leaf(level) {
                    mmu.set_spte_exclusive(as_id, &mut it, nonpresent);
                    mmu.host.remove_external_leaf(as_id, it.gfn(), level, old.pfn());
                    flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
                }
                it.next();
            }
            drop(it);
            // The list keeps its own reference until teardown, so this is never the last.
            let _ = mmu.mirror_roots.release(root);
        }
        flush
    }
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// The mirror roots at teardown: removes every leaf and frees every table of each, bottom up,
    /// telling the host of each, then frees the root pages.
    pub(super) fn tear_down_mirror_roots(&self) {
        let mut any = false;
        for (root, as_id) in self.mirror_roots.drain() {
            self.tear_down_mirror_table(root, as_id, self.config.root_level, Gfn(0));
            self.free_removed_table(root);
            any = true;
        }
        if any {
            // Nothing may keep a translation through the freed tables once their pages can be reused.
            Flush::all().run(&self.host);
        }
    }

    /// Removes everything below the mirror table `table` (its entries at `level`, the first mapping
    /// from `base`).
    fn tear_down_mirror_table(&self, table: Pfn, as_id: AsId, level: Level, base: Gfn) {
        let fmt = *self.format();
        let nonpresent = fmt.nonpresent();
        for (i, entry) in self.host.table(table).iter().enumerate() {
            let gfn = Gfn(base.0 + i as u64 * level.pages());
            // A swap: the mock's walker may still set A/D bits on a private leaf.
            let old = Spte(entry.swap(nonpresent.0, Ordering::AcqRel));
            if !old.is_present() {
                continue;
            }
            if let Some(child) = fmt.child_table(old, level) {
                let child_level = level.lower().expect("a table entry is above level 1");
                self.tear_down_mirror_table(child, as_id, child_level, gfn);
                self.host.free_external_table(as_id, gfn, level, child);
                self.stats.add_tables(-1);
                self.host.table_linked(child, level, false);
                self.free_removed_table(child);
            } else {
                self.host.remove_external_leaf(as_id, gfn, level, old.pfn());
                self.host.spte_changed(as_id, gfn, level, old, nonpresent);
                self.groups.line(0).add_leaves(level, -1);
            }
        }
    }
}
