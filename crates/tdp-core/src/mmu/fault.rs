//! The page-fault handler (KVM's `kvm_tdp_mmu_page_fault` / `kvm_tdp_mmu_map`), under the read side of
//! the MMU lock.
//!
//! A fault maps the gfn at the largest level that the memslot's alignment, the host's own mapping level
//! and the format allow (4 KiB in dirty-logged slots). On the way down it links missing tables and
//! splits huge leaves that are too big, each with one compare-exchange; losing a race returns
//! [`FaultOutcome::Retry`] and the vCPU re-executes, exactly as hardware and KVM do.
//!
//! Keeps: I1: a leaf is writable only when the memslot is writable and the host page is; a gfn without a
//! memslot gets an MMIO SPTE (or nothing), never a frame.

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::fault::{AccessKind, Fault, FaultKind};
use crate::flush::Flush;
use crate::host::{AllocError, DirtySink, DirtySource, Host, HostFaultError};
use crate::iter::TdpIter;
use crate::memslot::Memslot;
use crate::spte::{LeafAttrs, LeafWrite, MemType, Spte, SpteCheckError};
use crate::sync::{AtomicU64, Ordering};

use super::cache::PageCache;
use super::root::RootRef;
use super::stats::Stats;
use super::{Mmu, SharedMmu};

/// What a handled fault asks the vCPU to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A mapping was installed; re-execute the access.
    Fixed,
    /// The mapping was already there (another vCPU won, or the TLB was stale); re-execute.
    Spurious,
    /// A race was lost; nothing this fault did is visible; re-execute.
    Retry,
    /// The vCPU's root was invalidated: put it, load a new one, re-execute.
    ReloadRoot,
    /// The access cannot be satisfied by a mapping; the VMM emulates it.
    Emulate(EmulateReason),
}

/// Why a fault is handed back for emulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulateReason {
    /// No memslot covers the gfn: an MMIO access.
    Mmio,
    /// A write to a read-only memslot (KVM exits to the VMM as MMIO).
    ReadOnlySlot,
}

/// A fault that could not be handled. The tables are consistent after every one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// Topping up the page cache failed; nothing changed.
    #[error("no table page for the fault: {0}")]
    Alloc(#[from] AllocError),
    /// The cache holds fewer pages than a fault may need (the caller skipped the top-up); nothing changed.
    #[error("the page cache holds {have} pages, a fault may need {need}")]
    CacheTooSmall {
        /// Pages in the cache.
        have: usize,
        /// Pages a fault may need.
        need: usize,
    },
    /// The host could not provide the page.
    #[error("host translation failed: {0}")]
    Host(#[from] HostFaultError),
    /// A misconfiguration exit on an SPTE the MMU did not make: a bug, reported with the entry.
    #[error("EPT misconfiguration / reserved-bit fault at {gfn:?} on {spte:?}: {cause}")]
    Misconfig {
        /// The faulting gfn.
        gfn: Gfn,
        /// The entry that hardware rejected.
        spte: Spte,
        /// What is wrong with it.
        cause: SpteCheckError,
    },
}

impl<H: Host, R: lock_api::RawRwLock> SharedMmu<'_, H, R> {
    /// Handles `fault` taken by a vCPU running on `root`, allocating tables from `cache`.
    ///
    /// Flushes the TLBs itself when it replaces a table with a huge leaf; otherwise it only adds
    /// permissions, which needs no flush.
    ///
    /// # Errors
    /// [`FaultError`]; no SPTE is left half-changed by any of them.
    pub fn page_fault(
        &self,
        cache: &mut PageCache,
        root: &RootRef,
        fault: Fault,
        dirty: &mut dyn DirtySink,
    ) -> Result<FaultOutcome, FaultError> {
        let outcome = self.page_fault_inner(cache, root, fault, dirty)?;
        // Per-vCPU counters, as KVM's `vcpu->stat.pf_*`: no shared cache line on the fault path.
        cache.counters.count(outcome);
        Ok(outcome)
    }

    fn page_fault_inner(
        &self,
        cache: &mut PageCache,
        root: &RootRef,
        fault: Fault,
        dirty: &mut dyn DirtySink,
    ) -> Result<FaultOutcome, FaultError> {
        let mmu = self.mmu;
        let need = mmu.pages_per_fault() - 1;
        if cache.len() < need {
            return Err(FaultError::CacheTooSmall { have: cache.len(), need });
        }
        if !mmu.root_is_valid(root) {
            return Ok(FaultOutcome::ReloadRoot);
        }
        let gfn = fault.gpa.gfn();
        if gfn >= self.slots.max_gfn() {
            // Beyond what the tables can map: nothing to cache, the access is emulated every time.
            return Ok(FaultOutcome::Emulate(EmulateReason::Mmio));
        }
        if fault.kind == FaultKind::Misconfig
            && let Some(outcome) = self.mmio_fault(root, gfn)?
        {
            return Ok(outcome);
        }
        let Some(slot) = self.slots.find(root.as_id(), gfn) else {
            let Some(mmio) = mmu.format().mmio(gfn, self.slots.generation()) else {
                return Ok(FaultOutcome::Emulate(EmulateReason::Mmio));
            };
            return Ok(match self.map(cache, root, gfn, Level::L1, mmio) {
                FaultOutcome::Fixed => {
                    Stats::bump(&mmu.stats.mmio_sptes_created);
                    FaultOutcome::Emulate(EmulateReason::Mmio)
                }
                FaultOutcome::Spurious => FaultOutcome::Emulate(EmulateReason::Mmio),
                other => other,
            });
        };
        let write = fault.access == AccessKind::Write;
        if write && !slot.is_writable() {
            return Ok(FaultOutcome::Emulate(EmulateReason::ReadOnlySlot));
        }
        if write
            && fault.kind == (FaultKind::Violation { present: true })
            && let Some(outcome) = self.fast_write_fault(root, slot, gfn, dirty)
        {
            return Ok(outcome);
        }
        let host = mmu.host.translate(slot, gfn, write)?;
        if write && !host.writable {
            return Err(HostFaultError::ReadOnly { gfn }.into());
        }
        let level = self.goal_level(slot, gfn, host.pfn, host.level);
        let logged = slot.is_dirty_logged();
        let attrs = LeafAttrs {
            write: match (slot.is_writable(), host.writable) {
                (true, true) if write || !logged => LeafWrite::Writable,
                // A read in a logged slot must leave the first write visible: to the fast path
                // (write-protected) or, with PML, to hardware's D bit and log (clean).
                (true, true) if mmu.config.pml => LeafWrite::WritableClean,
                (true, true) => LeafWrite::WriteProtected,
                (_, host_writable) => LeafWrite::ReadOnly { host_writable },
            },
            exec: true,
            memtype: MemType::WriteBack,
            accessed: true,
        };
        let pfn = Pfn(host.pfn.0 & !(level.pages() - 1));
        let leaf = mmu.format().leaf(pfn, level, attrs);
        let outcome = self.map(cache, root, gfn, level, leaf);
        if logged && attrs.write == LeafWrite::Writable && outcome == FaultOutcome::Fixed {
            dirty.mark_dirty(slot, gfn, DirtySource::Fault);
        }
        Ok(outcome)
    }

    /// The largest level at which `gfn` may be mapped (KVM's `kvm_mmu_hugepage_adjust`).
    fn goal_level(&self, slot: &Memslot, gfn: Gfn, pfn: Pfn, host_level: Level) -> Level {
        if slot.is_dirty_logged() {
            return Level::L1;
        }
        let mut level = host_level.min(self.mmu.format().max_leaf_level());
        while level > Level::L1 {
            let mask = level.pages() - 1;
            if slot.allows_huge(gfn, level) && (pfn.0 ^ gfn.0) & mask == 0 {
                break;
            }
            level = level.lower().unwrap_or(Level::L1);
        }
        level
    }

    /// An EPT misconfiguration / NPF-RSVD exit: emulate if it hit a current MMIO SPTE. `None` sends a
    /// stale MMIO SPTE down the normal path, which replaces it.
    fn mmio_fault(&self, root: &RootRef, gfn: Gfn) -> Result<Option<FaultOutcome>, FaultError> {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let mut it =
            TdpIter::new(&mmu.host, fmt, root.pfn(), mmu.config.root_level, Level::L1, gfn, Gfn(gfn.0 + 1));
        while it.valid() {
            let spte = it.old_spte;
            if fmt.is_mmio(spte) {
                if fmt.mmio_generation_matches(spte, self.slots.generation()) && fmt.mmio_gfn(spte) == gfn {
                    return Ok(Some(FaultOutcome::Emulate(EmulateReason::Mmio)));
                }
                return Ok(None);
            }
            if let Err(cause) = fmt.check(spte, it.level()) {
                return Err(FaultError::Misconfig { gfn, spte, cause });
            }
            it.next();
        }
        // The MMIO SPTE went away after the exit (zapped or replaced): just re-execute.
        Ok(Some(FaultOutcome::Retry))
    }

    /// Walks from `root` to `goal` for `gfn`, linking or splitting tables, and installs `new` there
    /// (KVM's `kvm_tdp_mmu_map`). A single-gfn walk needs none of the range iterator's machinery, so it
    /// is written flat: one load per level, one compare-exchange per change.
    fn map(&self, cache: &mut PageCache, root: &RootRef, gfn: Gfn, goal: Level, new: Spte) -> FaultOutcome {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let as_id = root.as_id();
        // Keeps every table this walk can reach allocated until it returns.
        let _walk = mmu.host.begin_walk();
        let mut table = mmu.host.table(root.pfn());
        let mut level = mmu.config.root_level;
        loop {
            let entry = &table[gfn.index_at(level).get()];
            // Acquire pairs with the Release of the compare-exchange that linked a child table here.
            let old = Spte(entry.load(Ordering::Acquire));
            if level == goal {
                if fmt.is_frozen(old) {
                    return FaultOutcome::Retry;
                }
                return self.install(as_id, entry, old, new, gfn.align_down(level), level);
            }
            // Above the goal (so at level 2 or more) a present entry is a table unless PS says leaf.
            let child = if old.is_present() && !old.is_large() {
                old.pfn()
            } else if fmt.is_frozen(old) {
                return FaultOutcome::Retry;
            } else {
                match self.link_table(cache, as_id, entry, old, gfn.align_down(level), level) {
                    Ok(child) => child,
                    Err(outcome) => return outcome,
                }
            };
            let Some(lower) = level.lower() else {
                return FaultOutcome::Retry;
            };
            table = mmu.host.table(child);
            level = lower;
        }
    }

    /// Installs `new` in `entry` (the goal level), flushing if the old value was a table or a leaf with
    /// more rights or another frame.
    fn install(
        &self,
        as_id: AsId,
        entry: &AtomicU64,
        old: Spte,
        new: Spte,
        gfn: Gfn,
        level: Level,
    ) -> FaultOutcome {
        let mmu = self.mmu;
        let fmt = mmu.format();
        if old == new {
            return FaultOutcome::Spurious;
        }
        if mmu.cmpxchg_spte(as_id, entry, old, new, gfn, level).is_err() {
            return FaultOutcome::Retry;
        }
        // Replacing a table with a huge leaf freed the subtree: drop the paging-structure caches and
        // leaves that pointed into it. A leaf that changed frame or lost rights is likewise stale. A leaf
        // that only gained rights needs no flush: hardware re-walks on a permission fault.
        let stale = old.is_present()
            && (old.is_table(level) || old.pfn() != new.pfn() || !fmt.access(new).contains(fmt.access(old)));
        if stale {
            Flush::range(as_id, gfn, level.pages()).run(&mmu.host);
        }
        FaultOutcome::Fixed
    }

    /// Replaces `entry` (holding `old`: non-present, or a huge leaf bigger than wanted) with a new table
    /// from `cache` and returns the table. `Err` carries the outcome to return.
    fn link_table(
        &self,
        cache: &mut PageCache,
        as_id: AsId,
        entry: &AtomicU64,
        old: Spte,
        gfn: Gfn,
        level: Level,
    ) -> Result<Pfn, FaultOutcome> {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let Some(child) = cache.take() else {
            return Err(FaultOutcome::Retry);
        };
        let table = mmu.host.table(child);
        let splitting = old.is_present();
        if splitting {
            mmu.fill_split_children(child, old, level);
        }
        if mmu.cmpxchg_spte(as_id, entry, old, fmt.nonleaf(child), gfn, level).is_err() {
            // Never published: reset and keep it for the next fault.
            if splitting {
                for e in table {
                    e.store(fmt.nonpresent().0, Ordering::Relaxed);
                }
            }
            if let Err(pfn) = cache.put_back(child) {
                mmu.host.free_table_now(pfn);
            }
            return Err(FaultOutcome::Retry);
        }
        if splitting {
            mmu.count_split(level);
        }
        Ok(child)
    }
}

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// The leaf currently mapping `gfn` in `root` and its level, if any (for checkers and tests).
    pub fn lookup(&self, root: &RootRef, gfn: Gfn) -> Option<(Spte, Level)> {
        let _walk = self.host.begin_walk();
        let (_, level, spte) = self.walk_to_leaf(root.pfn(), gfn);
        (spte.is_present() && spte.is_leaf(level)).then_some((spte, level))
    }
}
