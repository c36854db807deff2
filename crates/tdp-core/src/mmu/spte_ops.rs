//! Changing SPTEs: the compare-exchange setter for the shared lock, the exclusive setter for the write
//! lock, and `handle_changed_spte`, the bookkeeping every change goes through.
//!
//! Every change of a live SPTE goes through the two setters, except three documented bulk paths that
//! skip `handle_changed_spte` because they change no statistics and free nothing, and that still run
//! [`crate::spte::SpteFormat::check`] on the new value in debug builds and emit the same `spte_changed`
//! event: the enable-logging and re-protect passes over tables of 4 KiB leaves (`dirty_log.rs`:
//! `clear_ready`, `protect_leaves_one_by_one`), the fast path (`fast_path.rs`) and aging (`age.rs`), the
//! last two lock-free compare-exchanges. (Filling a private table before it is linked, in a split, is
//! not a change of a live SPTE: nothing can see it until the linking compare-exchange, which is one.)
//!
//! Keeps: I2. When a non-leaf SPTE stops pointing to its table, the table is removed: each of its
//! entries is frozen (exchanged with the frozen value, so a racing compare-exchange on it fails and its
//! writer retries), each child is handled in turn (recursively for subtables), and the page goes to
//! [`TableMemory::free_table_deferred`](crate::host::TableMemory::free_table_deferred).

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::host::Host;
use crate::iter::TdpIter;
use crate::spte::Spte;
use crate::sync::{AtomicU64, Ordering};

use super::{Mmu, SharedMmu};

/// Which side of the MMU lock the caller holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LockMode {
    /// Read side: other writers race; every write is a compare-exchange or an exchange.
    Shared,
    /// Write side: only hardware (A/D bits) and the lockless fast path race.
    Exclusive,
}

/// Another writer changed the entry first; the iterator's `old_spte` now holds the current value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Busy;

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Sets the iterator's entry from `it.old_spte` to `new` with compare-exchange (KVM's
    /// `tdp_mmu_set_spte_atomic`). Caller holds the lock for read.
    ///
    /// On success `it.old_spte` becomes `new` and the change has been handled. On failure nothing
    /// changed except that `it.old_spte` holds the value that won.
    pub(super) fn set_spte_atomic(
        &self,
        as_id: AsId,
        it: &mut TdpIter<'_, H>,
        new: Spte,
    ) -> Result<(), Busy> {
        match self.cmpxchg_spte(as_id, it.entry(), it.old_spte, new, it.gfn(), it.level()) {
            Ok(()) => {
                it.old_spte = new;
                Ok(())
            }
            Err(current) => {
                it.old_spte = current;
                Err(Busy)
            }
        }
    }

    /// Changes `entry` (at `level`, mapping from `gfn`) from `old` to `new` with compare-exchange and
    /// handles the change; on failure returns the value that won and changes nothing.
    #[inline]
    pub(super) fn cmpxchg_spte(
        &self,
        as_id: AsId,
        entry: &AtomicU64,
        old: Spte,
        new: Spte,
        gfn: Gfn,
        level: Level,
    ) -> Result<(), Spte> {
        debug_assert!(!self.format().is_frozen(old), "a frozen SPTE belongs to another writer");
        exchange_spte(entry, old, new)?;
        self.handle_changed_spte(as_id, gfn, old, new, level, LockMode::Shared);
        Ok(())
    }

    /// The bookkeeping of a leaf appearing where nothing was, counted in group `group`: the common case
    /// of [`Mmu::handle_changed_spte`].
    #[inline(always)]
    pub(super) fn leaf_appeared(
        &self,
        line: &super::groups::GroupLine,
        as_id: AsId,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: Level,
    ) {
        #[cfg(debug_assertions)]
        if let Err(e) = self.format().check(new, level) {
            panic!("SPTE change at {gfn:?} {level:?} in {as_id:?}: {e}");
        }
        self.host.spte_changed(as_id, gfn, level, old, new);
        line.add_leaves(level, 1);
    }

    /// Sets the iterator's entry to `new` under the write lock (KVM's `tdp_mmu_iter_set_spte`). Uses an
    /// exchange when hardware or the fast path could change the old value meanwhile, a plain store
    /// otherwise. Returns the value replaced.
    pub(super) fn set_spte_exclusive(&self, as_id: AsId, it: &mut TdpIter<'_, H>, new: Spte) -> Spte {
        let old = self.write_spte_exclusive(it.entry(), it.old_spte, new);
        it.old_spte = new;
        self.handle_changed_spte(as_id, it.gfn(), old, new, it.level(), LockMode::Exclusive);
        old
    }

    pub(super) fn write_spte_exclusive(&self, entry: &AtomicU64, old: Spte, new: Spte) -> Spte {
        if self.needs_atomic_update(old) {
            // Pairs with hardware's locked A/D update: the exchange returns the bits it set.
            Spte(entry.swap(new.0, Ordering::AcqRel))
        } else {
            // Release publishes a new child table's entries, as in `set_spte_atomic`.
            entry.store(new.0, Ordering::Release);
            old
        }
    }

    /// KVM's `spte_needs_atomic_update`: whether something besides lock holders may write `old`.
    fn needs_atomic_update(&self, old: Spte) -> bool {
        let fmt = self.format();
        if !old.is_present() {
            return false;
        }
        // The fast path may make a write-protected, MMU-writable SPTE writable without the lock.
        if !old.is_writable() && fmt.is_mmu_writable(old) {
            return true;
        }
        // Hardware sets A (and D on writes) with a locked operation when they are clear.
        fmt.has_accessed_dirty() && (!fmt.is_accessed(old) || (old.is_writable() && !fmt.is_dirty(old)))
    }

    /// The bookkeeping for one SPTE change at `level` mapping `gfn` (KVM's `handle_changed_spte`):
    /// statistics, trace event, invariant check, and removal of a table that is no longer linked.
    #[inline(always)]
    pub(super) fn handle_changed_spte(
        &self,
        as_id: AsId,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: Level,
        mode: LockMode,
    ) {
        if old == new {
            return;
        }
        // The fault path's common case, kept short: a leaf appears where nothing was.
        if !old.is_present() && new.is_present() && new.is_leaf(level) {
            self.leaf_appeared(self.groups.line(0), as_id, gfn, old, new, level);
            return;
        }
        #[cfg(debug_assertions)]
        if let Err(e) = self.format().check(new, level) {
            panic!("SPTE change at {gfn:?} {level:?} in {as_id:?}: {e}");
        }
        self.host.spte_changed(as_id, gfn, level, old, new);
        // Dirty logging's case: a leaf changes only its rights or A/D bits; nothing to count.
        if old.is_present() && old.is_leaf(level) && new.is_present() && new.is_leaf(level) {
            debug_assert_eq!(old.pfn(), new.pfn(), "a present leaf changed frame without being zapped first");
            return;
        }
        self.handle_changed_slow(as_id, gfn, old, new, level, mode);
    }

    /// Everything but the common case of [`Mmu::handle_changed_spte`].
    #[inline(never)]
    fn handle_changed_slow(&self, as_id: AsId, gfn: Gfn, old: Spte, new: Spte, level: Level, mode: LockMode) {
        let fmt = self.format();
        let was_leaf = old.is_present() && old.is_leaf(level);
        let is_leaf = new.is_present() && new.is_leaf(level);
        debug_assert!(
            !(was_leaf && is_leaf) || old.pfn() == new.pfn() || !old.is_present(),
            "a present leaf changed frame without being zapped first: {old:?} -> {new:?}"
        );
        if was_leaf {
            self.groups.line(0).add_leaves(level, -1);
        }
        if is_leaf {
            self.groups.line(0).add_leaves(level, 1);
        }
        if let Some(child) = fmt.child_table(old, level)
            && fmt.child_table(new, level) != Some(child)
        {
            let child_level = level.lower().expect("a table entry is above level 1");
            self.remove_table(as_id, child, child_level, gfn, mode);
        }
        if let Some(child) = fmt.child_table(new, level)
            && fmt.child_table(old, level) != Some(child)
        {
            self.stats.add_tables(1);
            self.host.table_linked(child, level, true);
        }
    }

    /// Freezes every entry of the unlinked table `pfn` (whose entries are at `level` and start at
    /// `base`), handles each child, and frees the page deferred (KVM's `handle_removed_pt`).
    fn remove_table(&self, as_id: AsId, pfn: Pfn, level: Level, base: Gfn, mode: LockMode) {
        let fmt = self.format();
        let frozen = fmt.frozen();
        self.stats.add_tables(-1);
        self.nx.untrack(pfn);
        self.host.table_linked(pfn, level, false);
        let table = self.host.table(pfn);
        // Leaves removed, counted once at the end: one add on the counter's line per table instead of
        // one per leaf (halves the locked operations of removing a table of leaves under the read lock).
        let mut leaves = 0i64;
        for (i, entry) in table.iter().enumerate() {
            let gfn = Gfn(base.0 + i as u64 * level.pages());
            let old = match mode {
                LockMode::Shared => loop {
                    // A writer that saw this table before it was unlinked may still own an entry (frozen
                    // it for a zap-then-flush); wait for its final value. Exchanging in the frozen value
                    // makes every later compare-exchange on the entry fail.
                    let old = Spte(entry.swap(frozen.0, Ordering::AcqRel));
                    if !fmt.is_frozen(old) {
                        break old;
                    }
                    crate::sync::spin_loop();
                },
                LockMode::Exclusive => {
                    let old = Spte(entry.load(Ordering::Acquire));
                    if !old.is_present() {
                        continue;
                    }
                    self.write_spte_exclusive(entry, old, frozen)
                }
            };
            if old.is_present() && old.is_leaf(level) {
                // What `handle_changed_spte` does for a leaf becoming frozen: the event and the count.
                self.host.spte_changed(as_id, gfn, level, old, frozen);
                leaves += 1;
                continue;
            }
            self.handle_changed_spte(as_id, gfn, old, frozen, level, mode);
        }
        if leaves != 0 {
            self.groups.line(0).add_leaves(level, -leaves);
        }
        self.free_removed_table(pfn);
    }

    /// Fills the private table `child` with the children of huge leaf `huge` at `level` (KVM's
    /// `make_small_spte` for each index). Relaxed stores: the page is published later by the store or
    /// compare-exchange that links it, with Release.
    pub(super) fn fill_split_children(&self, child: Pfn, huge: Spte, level: Level) {
        let fmt = self.format();
        for (i, entry) in self.host.table(child).iter().enumerate() {
            let index = crate::addr::PtIndex::new(i).expect("a table has 512 entries");
            entry.store(fmt.split_child(huge, level, index).0, Ordering::Relaxed);
        }
    }

    /// Counts a huge leaf at `level`, mapping from `gfn` in `as_id`, split into a linked table: its 512
    /// children appear one level down (the leaf itself and the new table were counted when the SPTE
    /// changed); and tells the host.
    pub(super) fn count_split(&self, as_id: AsId, gfn: Gfn, level: Level) {
        let child_level = level.lower().expect("only huge leaves are split");
        self.groups.line(0).add_leaves(child_level, 512);
        super::stats::Stats::bump(&self.stats.huge_splits);
        self.host.huge_split(as_id, gfn, level);
    }
}

impl<H: Host, R: lock_api::RawRwLock> SharedMmu<'_, H, R> {
    /// [`Mmu::cmpxchg_spte`] for a leaf appearing where nothing was (the fault's common case), counted
    /// in the faulting vCPU's reader group, so that faults of vCPUs in different groups write different
    /// cache lines.
    #[inline]
    pub(super) fn cmpxchg_new_leaf(
        &self,
        as_id: AsId,
        entry: &AtomicU64,
        old: Spte,
        new: Spte,
        gfn: Gfn,
        level: Level,
    ) -> Result<(), Spte> {
        debug_assert!(!old.is_present() && new.is_present() && new.is_leaf(level));
        exchange_spte(entry, old, new)?;
        self.mmu.leaf_appeared(self.line(), as_id, gfn, old, new, level);
        Ok(())
    }
}

/// The compare-exchange of a live SPTE from `old` to `new`; on failure, the value that won. Release
/// publishes a new child table's entries to walkers that Acquire-load this SPTE; Acquire on failure
/// makes the winner's value (and its child table) visible to the retry.
#[inline(always)]
fn exchange_spte(entry: &AtomicU64, old: Spte, new: Spte) -> Result<(), Spte> {
    entry.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire).map(|_| ()).map_err(Spte)
}
