//! NX huge pages (KVM's `nx_huge_pages`, the iTLB-multihit mitigation): while the switch is on, huge
//! leaves are installed non-executable; an instruction fetch in a range that could be mapped huge maps
//! that 4 KiB page executable instead, splitting or linking the tables it needs, and every table a fetch
//! linked where a huge leaf could have been is tracked (KVM's possible-NX-huge-page list). Recovery
//! zaps a fraction of the tracked tables, oldest first, so that huge leaves come back once execution
//! there stops; tables in dirty-logged slots are only dropped from the list (they would refault small
//! anyway). Recovery runs under the read lock, as KVM's does since 6.18 ("recover NX huge pages under
//! read lock"): each table is unlinked by a compare-exchange on its parent entry.
//!
//! The host decides the switch (KVM's `auto` turns it on when the CPU has the iTLB-multihit erratum);
//! turning it on or off invalidates every root, as KVM's `kvm_mmu_zap_all_fast` does, so no huge leaf
//! built under the other setting survives.

use alloc::collections::BTreeMap;

use lock_api::RawRwLock;

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::flush::Flush;
use crate::host::Host;
use crate::spte::Spte;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

use super::{ExclusiveMmu, Mmu, SharedMmu};

/// What one recovery pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NxRecovery {
    /// Tables unlinked (their range refaults, huge where it can).
    pub zapped: u64,
    /// Tables dropped from the list without a zap: their slot is dirty-logged, or they were no longer
    /// linked.
    pub dropped: u64,
}

/// A table a fetch linked where a huge leaf could have been.
#[derive(Clone, Copy, Debug)]
struct NxTable {
    seq: u64,
    as_id: AsId,
    /// The first gfn the table maps.
    gfn: Gfn,
    /// The level of the entry that points to the table.
    level: Level,
}

/// The possible-NX-huge-page list, oldest first.
#[derive(Default)]
struct NxList {
    by_table: BTreeMap<Pfn, NxTable>,
    by_age: BTreeMap<u64, Pfn>,
    next_seq: u64,
}

/// The switch, the list and the counters.
pub(super) struct NxHugePages {
    enabled: AtomicBool,
    list: spin::Mutex<NxList>,
    /// Tables on the list (KVM's `nx_lpage_splits` statistic): read without the mutex.
    tracked: AtomicU64,
    recovered: AtomicU64,
}

impl NxHugePages {
    pub(super) fn new() -> Self {
        NxHugePages {
            enabled: AtomicBool::new(false),
            list: spin::Mutex::new(NxList::default()),
            tracked: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
        }
    }

    /// Whether huge leaves must not be executable.
    #[inline]
    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Tables on the list, and tables recovered so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        (self.tracked.load(Ordering::Relaxed), self.recovered.load(Ordering::Relaxed))
    }

    /// Puts `table` (linked at `level` for the range from `gfn`) on the list.
    pub(super) fn track(&self, table: Pfn, as_id: AsId, gfn: Gfn, level: Level) {
        let mut list = self.list.lock();
        let seq = list.next_seq;
        list.next_seq += 1;
        if list.by_table.insert(table, NxTable { seq, as_id, gfn, level }).is_none() {
            list.by_age.insert(seq, table);
            self.tracked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes `table` off the list (it is being removed from its tree).
    #[inline]
    pub(super) fn untrack(&self, table: Pfn) {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut list = self.list.lock();
        if let Some(t) = list.by_table.remove(&table) {
            list.by_age.remove(&t.seq);
            self.tracked.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether `table` is on the list (a fetch linked it where a huge leaf could have been).
    pub(super) fn is_tracked(&self, table: Pfn) -> bool {
        self.tracked.load(Ordering::Relaxed) != 0 && self.list.lock().by_table.contains_key(&table)
    }

    /// Takes the oldest table off the list.
    fn pop_oldest(&self) -> Option<(Pfn, NxTable)> {
        let mut list = self.list.lock();
        let (_, table) = list.by_age.pop_first()?;
        let t = list.by_table.remove(&table)?;
        self.tracked.fetch_sub(1, Ordering::Relaxed);
        Some((table, t))
    }
}

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Turns the NX huge-page mitigation on or off. A change invalidates every root (the caller owes
    /// the returned flush, makes the vCPUs reload their roots and zaps the invalid roots, as after
    /// [`ExclusiveMmu::invalidate_roots`]); no change owes nothing.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Level, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::SlotFlags;
    /// use tdp_core::mmu::{FaultOutcome, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, Machine};
    ///
    /// let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })?;
    /// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, SlotFlags::empty()))?;
    /// m.mmu().write().set_nx_huge_pages(true).run(m.host());
    /// let mut vcpu = VcpuMmu::new();
    /// m.mmu().load_root(&mut vcpu, AsId(0))?;
    /// let fault = |gfn: u64, access| Fault {
    ///     as_id: AsId(0), gpa: Gfn(gfn).gpa(), access, kind: FaultKind::Violation { present: false } };
    /// // A fetch maps its page executable at 4 KiB, and the table it linked is tracked.
    /// assert_eq!(m.mmu().handle_fault(&mut vcpu, fault(3, AccessKind::Exec), &mut ()), Ok(FaultOutcome::Fixed));
    /// assert_eq!(m.mmu().stats().nx_huge_splits, 1);
    /// // Recovery zaps it; the next data access maps 2 MiB again (not executable).
    /// assert_eq!(m.mmu().read().recover_nx_huge_pages(1).zapped, 1);
    /// assert_eq!(m.mmu().handle_fault(&mut vcpu, fault(3, AccessKind::Read), &mut ()), Ok(FaultOutcome::Fixed));
    /// assert_eq!(m.mmu().stats().leaves[1], 1);
    /// m.mmu().release_vcpu(&mut vcpu);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_nx_huge_pages(&mut self, on: bool) -> Flush {
        if self.mmu.nx.enabled.swap(on, Ordering::Relaxed) == on {
            return Flush::none();
        }
        self.invalidate_roots(None)
    }
}

impl<H: Host, R: RawRwLock> SharedMmu<'_, H, R> {
    /// One recovery pass (KVM's `kvm_recover_nx_huge_pages`): unlinks the oldest `1/ratio` of the
    /// tracked tables (at least one when any is tracked; `ratio` 0 does nothing, as KVM's knob), each
    /// with a compare-exchange on its parent entry, so that the next access maps huge again. Tables of
    /// dirty-logged slots are dropped from the list without a zap. It runs the flush itself, before the
    /// unlinked tables can be reused (hardware may cache entries that point into them), so the caller
    /// owes none.
    pub fn recover_nx_huge_pages(&self, ratio: u32) -> NxRecovery {
        let mmu = self.mmu;
        let mut done = NxRecovery::default();
        let mut flush = Flush::none();
        let (tracked, _) = mmu.nx.counts();
        if ratio == 0 || tracked == 0 {
            return done;
        }
        let to_zap = tracked.div_ceil(u64::from(ratio));
        // Keeps every table reachable now allocated while the pass looks at it.
        let _walk = mmu.host.begin_walk();
        for _ in 0..to_zap {
            let Some((table, t)) = mmu.nx.pop_oldest() else { break };
            let logged = self.slots.find(t.as_id, t.gfn).is_some_and(|s| s.is_dirty_logged());
            if !logged && self.unlink_table(table, t) {
                done.zapped += 1;
                mmu.host.nx_recovered(t.as_id, t.gfn, t.level);
                flush = flush.merge(Flush::range(t.as_id, t.gfn, t.level.pages()));
            } else {
                done.dropped += 1;
            }
        }
        mmu.nx.recovered.fetch_add(done.zapped, Ordering::Relaxed);
        // Before the walk guard drops: the tables go back to the host only after no TLB can hold them.
        flush.run(&mmu.host);
        done
    }

    /// Finds the entry pointing to `table` in a valid root of its address space and unlinks it with a
    /// compare-exchange (the removed table is then frozen and freed as any other). False when it is no
    /// longer linked there, or another writer changed the entry first.
    fn unlink_table(&self, table: Pfn, t: NxTable) -> bool {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let linked = fmt.nonleaf(table);
        let mut unlinked = false;
        for (root, _) in mmu.roots.acquire_valid(t.as_id) {
            if !unlinked && let Some(entry) = mmu.entry_at(root, t.gfn, t.level) {
                let old = Spte(entry.load(Ordering::Acquire));
                unlinked = old == linked
                    && mmu.cmpxchg_spte(t.as_id, entry, old, fmt.nonpresent(), t.gfn, t.level).is_ok();
            }
            mmu.release_root(root);
        }
        unlinked
    }
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// KVM's `disallowed_hugepage_adjust`: the level a fault that would map huge at `level` maps at
    /// instead, one level down for as long as the entry at its level holds a table that a fetch linked
    /// under the mitigation (a huge leaf there would unmap the executable small pages). The caller holds
    /// a walk guard.
    pub(super) fn nx_disallowed_adjust(&self, root: Pfn, gfn: Gfn, mut level: Level) -> Level {
        let fmt = *self.format();
        while level > Level::L1 {
            let child = self
                .entry_at(root, gfn, level)
                .and_then(|entry| fmt.child_table(Spte(entry.load(Ordering::Acquire)), level));
            match child {
                Some(table) if self.nx.is_tracked(table) => level = level.lower().unwrap_or(Level::L1),
                _ => break,
            }
        }
        level
    }

    /// The entry at `level` on `gfn`'s path in the tree at `root`, if the tables down to it are linked.
    /// The caller holds a walk guard.
    fn entry_at(&self, root: Pfn, gfn: Gfn, level: Level) -> Option<&crate::sync::AtomicU64> {
        let fmt = self.format();
        let mut table = self.host.table(root);
        let mut at = self.config.root_level;
        loop {
            let entry = &table[((gfn.0 >> at.shift_in_frames()) & 0x1ff) as usize];
            if at == level {
                return Some(entry);
            }
            let child = fmt.child_table(Spte(entry.load(Ordering::Acquire)), at)?;
            table = self.host.table(child);
            at = at.lower()?;
        }
    }
}
