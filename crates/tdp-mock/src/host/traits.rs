//! The `tdp-core` host traits for [`MockHost`]: table memory over the arena, translation of memslot
//! gfns to guest-RAM frames, flushes fanned out to the registered vCPU TLBs (or dropped, for broken
//! variants), the yield hint with its test hook, and event counters.
//!
//! Checks: I2 through the arena (`table` and the frees panic with "I2 violation:" on misuse); I1's host
//! side (a read-only host page is never reported writable, and no huge host mapping covers it).

use std::sync::atomic::Ordering;

use tdp_core::addr::{AsId, Gfn, Level, PAGE_SHIFT, Pfn};
use tdp_core::host::{
    AllocError, HostFaultError, HostPage, HostTranslate, MmuEvents, MmuYield, Table, TableMemory, TlbFlush,
};
use tdp_core::memslot::Memslot;
use tdp_core::spte::Spte;

use super::{MockHost, MockWalkGuard};
use crate::lock;

impl TableMemory for MockHost {
    type WalkGuard<'a> = MockWalkGuard<'a>;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        self.0.arena.alloc(fill.0).ok_or(AllocError)
    }

    /// # Panics
    /// "I2 violation: ..." when `pfn` is not an arena page or the page is free.
    fn table(&self, pfn: Pfn) -> &Table {
        self.jitter();
        self.0.arena.table(pfn)
    }

    /// # Panics
    /// "I2 violation: ..." when the page is not live (double free).
    fn free_table_deferred(&self, pfn: Pfn) {
        self.0.arena.free_deferred(pfn);
    }

    /// # Panics
    /// "I2 violation: ..." when the page is not live (double free).
    fn free_table_now(&self, pfn: Pfn) {
        self.0.arena.free_now(pfn);
    }

    fn begin_walk(&self) -> MockWalkGuard<'_> {
        self.0.arena.begin_walk();
        MockWalkGuard { host: self }
    }
}

impl HostTranslate for MockHost {
    fn translate(&self, slot: &Memslot, gfn: Gfn, write: bool) -> Result<HostPage, HostFaultError> {
        let page = self.translate_page(slot, gfn, write, true);
        self.after_translate(gfn);
        page
    }

    fn mapping_level(&self, slot: &Memslot, gfn: Gfn) -> Option<tdp_core::addr::Level> {
        // Never swaps in or breaks sharing: the MMU asks this under its write lock.
        self.translate_page(slot, gfn, false, false).ok().map(|page| page.level)
    }
}

impl MockHost {
    /// The host MMU's answer for `gfn` of `slot`: the page's current frame, swapped in (when
    /// `fault_in`) or copied on a write to a shared page. A copy-on-write runs the VM's invalidation
    /// hook, as Linux's fault path runs the MMU notifier; no MMU lock is held here.
    fn translate_page(
        &self,
        slot: &Memslot,
        gfn: Gfn,
        write: bool,
        fault_in: bool,
    ) -> Result<HostPage, HostFaultError> {
        if !slot.contains(gfn) {
            return Err(HostFaultError::NoPage { gfn });
        }
        let page = slot.host_addr(gfn) >> PAGE_SHIFT;
        // A write to a shared page breaks the sharing, then looks again (another change may follow).
        for _ in 0..8 {
            match self.0.host_mmu.resolve(page, write, fault_in, &self.0.data) {
                super::host_mmu::Resolved::Frame { pfn, changed, shared } => {
                    let default_level = self.host_level(pfn).ok_or(HostFaultError::NoPage { gfn })?;
                    let level = if changed { Level::L1 } else { default_level };
                    let writable = !shared && !self.is_host_readonly(pfn);
                    return Ok(HostPage { pfn, writable, level, memory: self.memory_kind(pfn) });
                }
                super::host_mmu::Resolved::NeedsCow => {
                    self.0
                        .host_mmu
                        .break_cow(page, self.huge_pages(), &self.0.data)
                        .map_err(|_| HostFaultError::NoPage { gfn })?;
                }
                super::host_mmu::Resolved::Unavailable => return Err(HostFaultError::NoPage { gfn }),
            }
        }
        Err(HostFaultError::NoPage { gfn })
    }
}

impl TlbFlush for MockHost {
    fn flush_all(&self) {
        self.0.flushes_all.fetch_add(1, Ordering::Relaxed);
        if self.flushes_applied() {
            self.tlbs().iter().for_each(|t| t.flush_all());
            self.0.arena.note_flush();
        }
    }

    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        // TLB entries are tagged by root, not address space: flushing the range in every root is a
        // superset of what was asked.
        let _ = as_id;
        self.0.flushes_range.fetch_add(1, Ordering::Relaxed);
        if self.flushes_applied() {
            self.tlbs().iter().for_each(|t| t.flush_range(start, pages));
            self.0.arena.note_flush();
        }
    }
}

impl MmuYield for MockHost {
    fn should_yield(&self) -> bool {
        match self.0.config.yield_every {
            Some(n) if n > 0 => (self.0.yield_calls.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n),
            _ => false,
        }
    }

    fn yield_now(&self) {
        self.0.yields.fetch_add(1, Ordering::Relaxed);
        // Cloned out first: the hook may yield again (and so re-enter here) through the MMU.
        let hook = lock(&self.0.yield_hook).clone();
        match hook {
            Some(hook) => hook(),
            None => std::thread::yield_now(),
        }
    }
}

impl MmuEvents for MockHost {
    fn spte_changed(&self, as_id: AsId, gfn: Gfn, level: Level, old: Spte, new: Spte) {
        let _ = (as_id, gfn, level, old, new);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }

    fn table_linked(&self, pfn: Pfn, level: Level, linked: bool) {
        let _ = (pfn, level);
        if !linked {
            self.0.tables_unlinked.fetch_add(1, Ordering::Relaxed);
            self.0.arena.note_unlinked(pfn);
        }
    }

    fn fault_handled(&self, fault: &tdp_core::fault::Fault, outcome: tdp_core::mmu::FaultOutcome) {
        let _ = (fault, outcome);
        self.0.trace.faults.fetch_add(1, Ordering::Relaxed);
    }

    fn mmio_spte_installed(&self, as_id: AsId, gfn: Gfn) {
        let _ = (as_id, gfn);
        self.0.trace.mmio_sptes.fetch_add(1, Ordering::Relaxed);
    }

    fn huge_split(&self, as_id: AsId, gfn: Gfn, level: Level) {
        let _ = (as_id, gfn, level);
        self.0.trace.huge_splits.fetch_add(1, Ordering::Relaxed);
    }

    fn nx_recovered(&self, as_id: AsId, gfn: Gfn, level: Level) {
        let _ = (as_id, gfn, level);
        self.0.trace.nx_recovered.fetch_add(1, Ordering::Relaxed);
    }
}
