//! [`TableFrames`]: `tdp-core`'s [`TableMemory`] over a caller-given, identity-mapped physical region:
//! a free list of table pages and a deferred free that reuses a page only after the walk guards that
//! could still see it have dropped.
//!
//! # Deferred free on one CPU (or a few)
//! The MMU frees a page that was reachable from a live tree with
//! [`TableMemory::free_table_deferred`]; a lockless walker that started before may still read it, so it
//! must not be reused while any walk guard that existed at the free is alive. The scheme here is a
//! count and an epoch: `active` counts live guards; whenever it drops to 0 the epoch advances (a
//! quiescent point: no walker can hold a pointer into a removed table). A page freed while guards were
//! alive is stamped with the current epoch and becomes free once the epoch has moved past it, since
//! by then every guard alive at the free has dropped. A page freed with no guard alive is free at once.
//! On one CPU, with walks that do not nest forever, quiescent points come after every walk; with
//! several CPUs they come whenever all walks end at the same time, which a hypervisor should make
//! sure happens (e.g. at VM exits) if it keeps walks running continuously.
//!
//! The CPU's own EPT walks take no guard. Its paging-structure caches may still point into a removed
//! table until the INVEPT the core asks for (the [`tdp_core::flush::Flush`] a zap returns) has run, so
//! the hypervisor runs that flush before another vCPU can fault and allocate; on one CPU, before the
//! next VM entry, which the exit path does anyway.
//!
//! Keeps: I2 with the core (a page is not reused while a guard that could see it lives; a double free or
//! a foreign frame is a core bug and panics with "I2 violation").

use alloc::vec::Vec;

use tdp_core::addr::Pfn;
use tdp_core::host::{AllocError, Table, TableMemory};
use tdp_core::spte::Spte;
use tdp_core::sync::Ordering;

use crate::region::IdentityRegion;

/// Counters of a [`TableFrames`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameStats {
    /// Pages in the region.
    pub pages: u64,
    /// Pages handed out and not freed.
    pub in_use: u64,
    /// The largest `in_use` seen.
    pub peak: u64,
    /// Pages waiting for a quiescent point.
    pub deferred: u64,
    /// Allocations served.
    pub allocs: u64,
    /// Allocations refused (region exhausted).
    pub alloc_failures: u64,
    /// Deferred pages that became free.
    pub deferred_released: u64,
    /// Quiescent points (the live guard count dropped to 0).
    pub epochs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageState {
    Free,
    Live,
    /// Freed deferred in this epoch, while guards were alive.
    Deferred(u64),
}

#[derive(Debug)]
struct State {
    /// Indices of free pages; allocation pops from the end.
    free: Vec<u32>,
    /// Indices of deferred pages, in free order.
    deferred: Vec<u32>,
    pages: Vec<PageState>,
    active: u32,
    epoch: u64,
    stats: FrameStats,
}

/// A region's frame allocator, implementing [`TableMemory`].
///
/// ```
/// use tdp_core::host::TableMemory;
/// use tdp_core::spte::Spte;
/// use tdp_metal::frames::TableFrames;
/// use tdp_metal::region::{IdentityRegion, TablePage};
/// let mut pages: Vec<TablePage> = (0..2).map(|_| TablePage::new()).collect();
/// let frames = TableFrames::new(IdentityRegion::from_pages(&mut pages))?;
/// let a = frames.alloc_table(Spte(1 << 63))?; // EPT's non-present value (suppress #VE)
/// assert!(frames.table(a).iter().all(|e| e.load(core::sync::atomic::Ordering::Relaxed) == 1 << 63));
/// let walk = frames.begin_walk();
/// frames.free_table_deferred(a);
/// let b = frames.alloc_table(Spte(0))?;
/// assert_ne!(a, b, "a walker may still read a");
/// assert!(frames.alloc_table(Spte(0)).is_err(), "a is not reusable yet");
/// drop(walk);
/// assert_eq!(frames.alloc_table(Spte(0))?, a);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TableFrames<'a> {
    region: IdentityRegion<'a>,
    state: spin::Mutex<State>,
}

/// The region is larger than the allocator can index, or its bookkeeping could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramesError {
    /// More than `u32::MAX` pages.
    #[error("a table region of {pages} pages is larger than 2^32 pages")]
    TooLarge {
        /// The region's size.
        pages: u64,
    },
    /// No memory for the free list.
    #[error("no memory for the free list of {pages} table pages")]
    NoMemory {
        /// The region's size.
        pages: u64,
    },
}

/// A walk guard of [`TableFrames`]: pages freed while it lives are not reused until it drops.
#[derive(Debug)]
pub struct FramesWalkGuard<'f, 'a> {
    frames: &'f TableFrames<'a>,
}

impl Drop for FramesWalkGuard<'_, '_> {
    fn drop(&mut self) {
        let mut s = self.frames.state.lock();
        s.active -= 1;
        if s.active == 0 {
            s.epoch += 1;
            s.stats.epochs += 1;
            release_deferred(&mut s);
        }
    }
}

/// Moves every deferred page whose epoch has passed to the free list.
fn release_deferred(s: &mut State) {
    let epoch = s.epoch;
    let mut i = 0;
    while i < s.deferred.len() {
        let page = s.deferred[i] as usize;
        if matches!(s.pages[page], PageState::Deferred(e) if e < epoch) {
            s.deferred.swap_remove(i);
            s.pages[page] = PageState::Free;
            // Cannot fail: `free` was reserved for every page of the region.
            s.free.push(page as u32);
            s.stats.deferred -= 1;
            s.stats.deferred_released += 1;
        } else {
            i += 1;
        }
    }
}

impl<'a> TableFrames<'a> {
    /// An allocator owning every page of `region`, all free.
    ///
    /// # Errors
    /// [`FramesError`] when the region is too large or its bookkeeping cannot be allocated.
    pub fn new(region: IdentityRegion<'a>) -> Result<TableFrames<'a>, FramesError> {
        let pages = region.pages();
        let n = u32::try_from(pages).map_err(|_| FramesError::TooLarge { pages })?;
        let no_memory = |_| FramesError::NoMemory { pages };
        let mut free = Vec::new();
        free.try_reserve_exact(n as usize).map_err(no_memory)?;
        // Highest index first, so the first allocations take the lowest frames.
        free.extend((0..n).rev());
        let mut deferred = Vec::new();
        deferred.try_reserve_exact(n as usize).map_err(no_memory)?;
        let mut states = Vec::new();
        states.try_reserve_exact(n as usize).map_err(no_memory)?;
        states.resize(n as usize, PageState::Free);
        let stats = FrameStats { pages, ..FrameStats::default() };
        let state = State { free, deferred, pages: states, active: 0, epoch: 0, stats };
        Ok(TableFrames { region, state: spin::Mutex::new(state) })
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> FrameStats {
        self.state.lock().stats
    }

    /// The region.
    #[must_use]
    pub fn region(&self) -> &IdentityRegion<'a> {
        &self.region
    }

    /// The index of `pfn` in the region.
    ///
    /// # Panics
    /// "I2 violation" when `pfn` is outside the region: the core only passes frames it got here.
    fn index(&self, pfn: Pfn) -> usize {
        match pfn.0.checked_sub(self.region.base().0) {
            Some(i) if i < self.region.pages() => i as usize,
            _ => panic!("I2 violation: {pfn:?} is not a frame of the table region"),
        }
    }

    fn free(&self, pfn: Pfn, deferred: bool) {
        let page = self.index(pfn);
        let mut s = self.state.lock();
        if s.pages[page] != PageState::Live {
            panic!("I2 violation: {pfn:?} freed while {:?}", s.pages[page]);
        }
        s.stats.in_use -= 1;
        if deferred && s.active > 0 {
            s.pages[page] = PageState::Deferred(s.epoch);
            // Cannot fail: reserved for every page.
            s.deferred.push(page as u32);
            s.stats.deferred += 1;
        } else {
            s.pages[page] = PageState::Free;
            s.free.push(page as u32);
        }
    }
}

impl<'a> TableMemory for TableFrames<'a> {
    type WalkGuard<'g>
        = FramesWalkGuard<'g, 'a>
    where
        Self: 'g;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        let page = {
            let mut s = self.state.lock();
            let Some(page) = s.free.pop() else {
                s.stats.alloc_failures += 1;
                return Err(AllocError);
            };
            s.pages[page as usize] = PageState::Live;
            s.stats.allocs += 1;
            s.stats.in_use += 1;
            s.stats.peak = s.stats.peak.max(s.stats.in_use);
            page
        };
        let pfn = self.region.base().add(u64::from(page));
        // The page is ours alone until the pfn is published by the caller; Relaxed stores are
        // published by the core's Release store of the SPTE that links the table.
        for entry in self.table(pfn) {
            entry.store(fill.0, Ordering::Relaxed);
        }
        Ok(pfn)
    }

    /// # Panics
    /// "I2 violation" when `pfn` is outside the region.
    fn table(&self, pfn: Pfn) -> &Table {
        match self.region.table(pfn) {
            Some(table) => table,
            None => panic!("I2 violation: {pfn:?} is not a frame of the table region"),
        }
    }

    /// # Panics
    /// "I2 violation" when `pfn` is outside the region or not allocated.
    fn free_table_deferred(&self, pfn: Pfn) {
        self.free(pfn, true);
    }

    /// # Panics
    /// "I2 violation" when `pfn` is outside the region or not allocated.
    fn free_table_now(&self, pfn: Pfn) {
        self.free(pfn, false);
    }

    fn begin_walk(&self) -> FramesWalkGuard<'_, 'a> {
        self.state.lock().active += 1;
        FramesWalkGuard { frames: self }
    }
}
