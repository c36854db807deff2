//! The per-vCPU cache of table pages, filled before the MMU lock is taken (KVM's
//! `kvm_mmu_memory_cache`), so that a fault never allocates halfway through an update.

use crate::addr::Pfn;
use crate::host::{AllocError, TableMemory};
use crate::spte::Spte;

/// How many pages a cache holds at most: enough for two faults in a 5-level tree.
pub const PAGE_CACHE_CAPACITY: usize = 10;

/// Table pages set aside for one vCPU, each already filled with the non-present value.
///
/// Pages in the cache belong to it until [`PageCache::release`] returns them to the host; a cache
/// dropped without release leaks its pages (the mock's checker counts them).
///
/// ```
/// use tdp_core::host::TableMemory;
/// use tdp_core::mmu::PageCache;
/// use tdp_core::spte::SpteFormat;
/// let host = tdp_mock::MockHost::new(tdp_mock::HostConfig::default());
/// let mut cache = PageCache::new();
/// cache.topup(&host, SpteFormat::EPT_AD.nonpresent(), 4).unwrap();
/// assert!(cache.len() >= 4);
/// cache.release(&host);
/// assert!(cache.is_empty());
/// ```
#[derive(Debug)]
pub struct PageCache {
    pages: [Pfn; PAGE_CACHE_CAPACITY],
    len: usize,
}

/// Fault outcomes counted per vCPU (in [`super::VcpuMmu::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Faults handled (KVM's `pf_taken`): the sum of the four outcomes below.
    pub taken: u64,
    /// Faults that installed a mapping.
    pub fixed: u64,
    /// Of `fixed`, those the fast path fixed with one compare-exchange (KVM's `pf_fast`).
    pub fast: u64,
    /// Faults that found the mapping already there.
    pub spurious: u64,
    /// Faults that lost a race (or met an invalid root) and asked the vCPU to retry.
    pub retried: u64,
    /// Faults handed back for emulation (MMIO, read-only slots).
    pub emulated: u64,
}

impl FaultCounters {
    /// Counts `outcome`; the common one, [`super::FaultOutcome::Fixed`], with one increment.
    #[inline]
    pub(crate) fn count(&mut self, outcome: super::FaultOutcome) {
        self.taken += 1;
        if outcome == super::FaultOutcome::Fixed {
            self.fixed += 1;
        } else {
            self.count_other(outcome);
        }
    }

    /// [`FaultCounters::count`] for the outcomes other than `Fixed`, out of line.
    #[inline(never)]
    fn count_other(&mut self, outcome: super::FaultOutcome) {
        use super::FaultOutcome as O;
        let counter = match outcome {
            O::Fixed => &mut self.fixed,
            O::Spurious => &mut self.spurious,
            O::Retry | O::ReloadRoot => &mut self.retried,
            O::Emulate(_) => &mut self.emulated,
        };
        *counter += 1;
    }
}

impl Default for PageCache {
    fn default() -> Self {
        Self::new()
    }
}

impl PageCache {
    /// An empty cache.
    #[must_use]
    pub const fn new() -> Self {
        PageCache { pages: [Pfn(0); PAGE_CACHE_CAPACITY], len: 0 }
    }
    /// Pages held.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }
    /// Whether no page is held.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The frames held (for checkers).
    #[must_use]
    pub fn pages(&self) -> &[Pfn] {
        &self.pages[..self.len]
    }

    /// Ensures at least `min` pages; when below, fills to capacity (as KVM does, to allocate in bursts).
    ///
    /// # Errors
    /// [`AllocError`] when the host runs out before `min` is reached; pages allocated so far stay.
    #[inline]
    pub fn topup<M: TableMemory + ?Sized>(
        &mut self,
        mem: &M,
        fill: Spte,
        min: usize,
    ) -> Result<(), AllocError> {
        if self.len >= min {
            return Ok(());
        }
        self.refill(mem, fill, min)
    }

    /// The allocating part of [`PageCache::topup`].
    fn refill<M: TableMemory + ?Sized>(&mut self, mem: &M, fill: Spte, min: usize) -> Result<(), AllocError> {
        while self.len < PAGE_CACHE_CAPACITY {
            match mem.alloc_table(fill) {
                Ok(pfn) => {
                    self.pages[self.len] = pfn;
                    self.len += 1;
                }
                Err(e) if self.len < min => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Returns every page to the host.
    pub fn release<M: TableMemory + ?Sized>(&mut self, mem: &M) {
        while let Some(pfn) = self.take() {
            mem.free_table_now(pfn);
        }
    }

    pub(crate) fn take(&mut self) -> Option<Pfn> {
        self.len = self.len.checked_sub(1)?;
        Some(self.pages[self.len])
    }

    /// Puts back a page that was never published, after its entries were reset to the fill value.
    pub(crate) fn put_back(&mut self, pfn: Pfn) -> Result<(), Pfn> {
        if self.len == PAGE_CACHE_CAPACITY {
            return Err(pfn);
        }
        self.pages[self.len] = pfn;
        self.len += 1;
        Ok(())
    }
}
