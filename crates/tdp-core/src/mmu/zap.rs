//! Zapping: removing leaves in a gfn range, tearing down whole trees, and invalidating roots (KVM's
//! `tdp_mmu_zap_leafs`, `tdp_mmu_zap_root`, `kvm_tdp_mmu_invalidate_roots` and
//! `kvm_tdp_mmu_zap_invalidated_roots`).
//!
//! Long walks yield when the host asks, after flushing what they have zapped so far (a vCPU must not
//! keep using a zapped translation while the lock is dropped), and restart at the first unfinished gfn.
//!
//! Keeps: I3. Zapping leaves of a live root returns the [`Flush`] the caller owes; zapping an invalid
//! root owes none, because [`ExclusiveMmu::invalidate_roots`] already returned a full flush and no vCPU
//! can create new translations through an invalid root.

use lock_api::RawRwLock;

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::flush::Flush;
use crate::host::Host;
use crate::iter::TdpIter;
use crate::spte::Spte;
use crate::sync::Ordering;

use super::groups::SlotsRead;
use super::spte_ops::LockMode;
use super::{ExclusiveMmu, Mmu, SharedMmu};

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Zaps every leaf that maps a gfn in `[start, end)` in every root of `as_id`, valid or not (the
    /// MMU-notifier path), the mirror root's included (telling the host of each private leaf). A huge
    /// leaf that overlaps the range is zapped whole.
    ///
    /// Tables stay linked (they are reused by the next faults). The caller owes the returned flush.
    pub fn zap_gfn_range(&mut self, as_id: AsId, start: Gfn, end: Gfn) -> Flush {
        let mmu = self.mmu;
        let mut flush = Flush::none();
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            flush = self.zap_leafs(root, as_id, start, end, flush);
            mmu.release_root(root);
        }
        self.zap_mirror_leafs(as_id, start, end, flush)
    }

    /// Tears down the contents of every direct root (VM teardown, or "zap all" before a reset). Roots
    /// stay allocated; faults rebuild their trees. Mirror roots keep their private mappings (a
    /// confidential VM's private memory cannot be rebuilt by faults): [`ExclusiveMmu::zap_gfn_range`]
    /// removes them range by range, and the MMU's drop tears them down.
    ///
    /// It runs the full flush itself, before the freed tables can be reused (hardware may cache
    /// paging-structure entries that point into them), so the caller owes none.
    pub fn zap_all(&mut self) {
        let mmu = self.mmu;
        for (root, as_id) in mmu.roots.acquire_all(None) {
            let slots = &mut self.slots;
            mmu.zap_root(root, as_id, LockMode::Exclusive, &mut || {
                ExclusiveMmu::unlocked(mmu, slots, || mmu.host.yield_now());
            });
            mmu.release_root(root);
        }
    }

    /// Marks the roots of `as_id` (or of every address space) invalid, so that each vCPU reloads a new
    /// root at its next fault (KVM's fast zap). Their trees are zapped later, under the read lock, by
    /// [`SharedMmu::zap_invalidated_roots`], which the caller must run (a worker, or the next vCPU).
    ///
    /// Contract, as with KVM's `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`: the caller runs the returned full flush
    /// and makes every vCPU check [`Mmu::root_is_valid`] before it next enters the guest, reloading an
    /// invalid root; then no vCPU holds or creates a translation through an invalid root, and zapping
    /// one owes no flush.
    pub fn invalidate_roots(&mut self, as_id: Option<AsId>) -> Flush {
        if self.mmu.roots.invalidate(as_id) > 0 { Flush::all() } else { Flush::none() }
    }

    /// KVM's `tdp_mmu_iter_cond_resched` under the write lock: when the host wants the CPU and the
    /// forward-progress rule allows, runs `flush` (nothing zapped or protected so far may stay cached
    /// while others hold the lock), drops and retakes the lock, and restarts the walk. Returns whether
    /// it yielded.
    pub(super) fn cond_resched(&mut self, it: &mut TdpIter<'_, H>, flush: &mut Flush) -> bool {
        let mmu = self.mmu;
        if !(it.may_yield() && mmu.host.should_yield()) {
            return false;
        }
        core::mem::replace(flush, Flush::none()).run(&mmu.host);
        let slots = &mut self.slots;
        it.yield_with(|| ExclusiveMmu::unlocked(mmu, slots, || mmu.host.yield_now()));
        true
    }

    fn zap_leafs(&mut self, root: Pfn, as_id: AsId, start: Gfn, end: Gfn, mut flush: Flush) -> Flush {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let nonpresent = fmt.nonpresent();
        let root_level = mmu.config.root_level;
        let mut it = TdpIter::new(&mmu.host, fmt, root, root_level, Level::L1, start, end);
        while it.valid() {
            if self.cond_resched(&mut it, &mut flush) {
                continue;
            }
            let level = it.level();
            if level == Level::L1 && it.gfn().is_aligned(Level::L2) && it.gfn().0 + 512 <= end.0 {
                // A whole table of 4 KiB entries in range: one tight loop, one flush for the table.
                if mmu.zap_leaf_table(as_id, it.table_pfn(), it.gfn()) {
                    flush = flush.merge(Flush::range(as_id, it.gfn(), Level::L2.pages()));
                }
                it.finish_table();
                it.next();
                continue;
            }
            let old = it.old_spte;
            if old.is_present() && old.is_leaf(level) {
                mmu.set_spte_exclusive(as_id, &mut it, nonpresent);
                flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
            }
            it.next();
        }
        flush
    }
}

impl<H: Host, R: RawRwLock> SharedMmu<'_, H, R> {
    /// Zaps the trees of invalidated roots and drops the list's reference to each; a root nobody else
    /// references is freed. Runs under the read lock, concurrently with faults on valid roots.
    ///
    /// No flush is owed: see [`ExclusiveMmu::invalidate_roots`].
    pub fn zap_invalidated_roots(&mut self) {
        let mmu = self.mmu;
        while let Some((root, as_id)) = mmu.roots.take_invalid() {
            let slots = &mut self.slots;
            mmu.zap_root(root, as_id, LockMode::Shared, &mut || {
                SlotsRead::unlocked(slots, &mmu.lock, || mmu.host.yield_now());
            });
            mmu.release_root(root);
        }
    }
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// Zaps every entry of the root table at `root`, freeing the whole tree below it. `relock` drops and
    /// retakes the MMU lock when the host asks to yield. It flushes
    /// before each yield and at the end, while its walk guard still defers the frees.
    fn zap_root(&self, root: Pfn, as_id: AsId, mode: LockMode, relock: &mut dyn FnMut()) {
        let fmt = self.format();
        let nonpresent = fmt.nonpresent();
        let level = self.config.root_level;
        let end = self.config.max_gfn();
        // Zapped since the last flush. Under the write lock, what is zapped must be flushed before the
        // lock is dropped: others would see the entries non-present and owe no flush for them.
        let mut unflushed = false;
        let mut it = TdpIter::new(&self.host, fmt, root, level, level, Gfn(0), end);
        while it.valid() {
            if it.may_yield() && self.host.should_yield() {
                // The yield drops the walk guard, which lets the tables freed so far be reused: flush
                // first (in both modes; under the write lock it is also owed before others see the
                // entries non-present).
                if unflushed {
                    Flush::all().run(&self.host);
                    unflushed = false;
                }
                it.yield_with(&mut *relock);
                continue;
            }
            let old = it.old_spte;
            if !old.is_present() && !fmt.is_mmio(old) {
                it.next();
                continue;
            }
            unflushed |= old.is_present();
            match mode {
                LockMode::Exclusive => {
                    self.set_spte_exclusive(as_id, &mut it, nonpresent);
                }
                LockMode::Shared => {
                    if self.set_spte_atomic(as_id, &mut it, nonpresent).is_err() {
                        // Lost to another writer: look at the entry again before moving on.
                        continue;
                    }
                }
            }
            it.next();
        }
        // The tables just freed must not become reusable before hardware forgets them: flush while this
        // walk's guard (inside `it`) still holds the deferred frees back, as KVM flushes before
        // `rcu_read_unlock`. For an invalid root (shared mode) KVM relies on the invalidation's flush and
        // on every vCPU having left the root; flushing once more here costs one flush per torn-down root
        // and keeps the rule unconditional: no table page is reused before a flush that follows its unlink.
        if unflushed {
            Flush::all().run(&self.host);
        }
        drop(it);
    }

    /// Zaps every present entry of the 4 KiB-level table `table` (whose first gfn is `base`) under the
    /// write lock; returns whether any was present.
    fn zap_leaf_table(&self, as_id: AsId, table: Pfn, base: Gfn) -> bool {
        let nonpresent = self.format().nonpresent();
        let mut any = false;
        for (i, entry) in self.host.table(table).iter().enumerate() {
            // Relaxed: the write lock excludes other writers; what hardware A/D updates could race is
            // caught by the exchange in `write_spte_exclusive`.
            let old = Spte(entry.load(Ordering::Relaxed));
            if !old.is_present() {
                continue;
            }
            any = true;
            let old = self.write_spte_exclusive(entry, old, nonpresent);
            self.handle_changed_spte(
                as_id,
                Gfn(base.0 + i as u64),
                old,
                nonpresent,
                Level::L1,
                LockMode::Exclusive,
            );
        }
        any
    }

    /// Gives back a reference taken by `acquire_all` / `take_invalid`; frees the root if it was the last.
    pub(super) fn release_root(&self, root: Pfn) {
        if let Some(pfn) = self.roots.release(root) {
            self.free_removed_table(pfn);
        }
    }
}
