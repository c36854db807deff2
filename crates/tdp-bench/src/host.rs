//! A lean, single-threaded backend for `tdp-core`: table pages from one preallocated arena, an
//! identity-style host translation, and a TLB flush that only counts.
//!
//! It does as little as a real backend could, so that the time measured is the core's. The arena outlives
//! the MMUs built on it ([`BenchHost`] borrows it), so every repetition of a benchmark reuses memory that
//! is already touched: no host page fault or kernel zeroing lands inside a timed region.
//!
//! Per table page the arena keeps one `u32`: the link to the next page of whichever list (free or
//! deferred-free) holds the page. That is the backend's share of the metadata figure in
//! [`crate::report::Metadata`].

use core::cell::Cell;

use tdp_core::addr::{Gfn, Level, PAGE_SHIFT, Pfn};
use tdp_core::host::{
    AllocError, ExternalTables, HostFaultError, HostPage, HostTranslate, MmuEvents, MmuYield, Table,
    TableMemory, TlbFlush,
};
use tdp_core::memslot::Memslot;
use tdp_core::spte::Spte;
use tdp_core::sync::{AtomicU64, Ordering};

/// The frame number of the arena's first table page. Any value works: frames are only names here.
pub const ARENA_BASE_PFN: u64 = 0x1000;

/// No page: the end of a list.
const NIL: u32 = u32::MAX;

/// Table pages for the MMUs of a benchmark, allocated and touched once.
///
/// Free pages form a list linked through [`Arena`]'s per-page `next` slots; so do pages freed with
/// [`TableMemory::free_table_deferred`], which are not reused until [`Arena::reclaim`] runs (the
/// benchmarks call it between repetitions, when no walk can be in progress). A page is in at most one
/// list, so one link per page serves both.
pub struct Arena {
    tables: Box<[Table]>,
    next: Box<[Cell<u32>]>,
    free_head: Cell<u32>,
    free_len: Cell<usize>,
    deferred_head: Cell<u32>,
}

impl Arena {
    /// Bytes the arena keeps per table page (the list link).
    pub const METADATA_BYTES_PER_PAGE: usize = size_of::<Cell<u32>>();

    /// An arena of `pages` table pages, every entry written once (so the memory is resident), handing
    /// pages out in ascending order.
    ///
    /// # Panics
    /// If `pages` does not fit in a `u32` (minus the end-of-list marker).
    #[must_use]
    pub fn new(pages: usize) -> Arena {
        assert!(pages < NIL as usize, "arena size fits in u32");
        let arena = Arena {
            tables: (0..pages).map(|_| core::array::from_fn(|_| AtomicU64::new(0))).collect(),
            next: (0..pages).map(|_| Cell::new(NIL)).collect(),
            free_head: Cell::new(NIL),
            free_len: Cell::new(0),
            deferred_head: Cell::new(NIL),
        };
        arena.forget_all();
        arena
    }

    /// Pages in the arena.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.tables.len()
    }

    /// Pages ready to be allocated now.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.free_len.get()
    }

    /// Makes every deferred-freed page allocatable again (the end of a grace period). Call only when no
    /// walk guard is alive, i.e. between operations. Returns how many pages came back.
    pub fn reclaim(&self) -> usize {
        let head = self.deferred_head.replace(NIL);
        if head == NIL {
            return 0;
        }
        let mut n = 1;
        let mut page = head;
        while self.next[page as usize].get() != NIL {
            page = self.next[page as usize].get();
            n += 1;
        }
        self.next[page as usize].set(self.free_head.get());
        self.free_head.set(head);
        self.free_len.set(self.free_len.get() + n);
        n
    }

    /// Reclaims, checks that every page is free (nothing leaked), and restores the initial allocation
    /// order so every repetition lays out its tables the same way.
    ///
    /// # Panics
    /// If a page is still allocated: a tree built on the arena is alive, or a page leaked.
    pub fn reset(&self) {
        self.reclaim();
        assert_eq!(self.free_pages(), self.tables.len(), "table pages leaked or still in use at reset");
        self.forget_all();
    }

    /// Takes every page back, allocated or not, in the initial order: for users that never free, like
    /// [`crate::floor`], once they are done with their tables.
    pub fn forget_all(&self) {
        let n = self.next.len();
        for (i, link) in self.next.iter().enumerate() {
            link.set(if i + 1 < n { i as u32 + 1 } else { NIL });
        }
        self.free_head.set(if n > 0 { 0 } else { NIL });
        self.free_len.set(n);
        self.deferred_head.set(NIL);
    }

    fn index(&self, pfn: Pfn) -> u32 {
        (pfn.0 - ARENA_BASE_PFN) as u32
    }

    fn pop_free(&self) -> Option<u32> {
        let page = self.free_head.get();
        if page == NIL {
            return None;
        }
        self.free_head.set(self.next[page as usize].get());
        self.free_len.set(self.free_len.get() - 1);
        Some(page)
    }

    fn push_free(&self, page: u32) {
        self.next[page as usize].set(self.free_head.replace(page));
        self.free_len.set(self.free_len.get() + 1);
    }

    fn push_deferred(&self, page: u32) {
        self.next[page as usize].set(self.deferred_head.replace(page));
    }
}

/// The backend handed to `tdp_core::mmu::Mmu`: borrows an [`Arena`] and maps guest frames the simplest
/// way: gfn `g` of a slot is host frame `slot.host_base / 4096 + (g - slot.base_gfn)`, writable, mapped by
/// the host at a fixed level (L1 for the 4 KiB benchmarks, L2 for the 2 MiB one).
pub struct BenchHost<'a> {
    arena: &'a Arena,
    host_level: Level,
    flushes: Cell<u64>,
}

impl<'a> BenchHost<'a> {
    /// A backend on `arena` whose host maps guest memory at `host_level`.
    #[must_use]
    pub fn new(arena: &'a Arena, host_level: Level) -> Self {
        BenchHost { arena, host_level, flushes: Cell::new(0) }
    }

    /// TLB flushes requested so far.
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.flushes.get()
    }
}

impl TableMemory for BenchHost<'_> {
    type WalkGuard<'g>
        = ()
    where
        Self: 'g;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        let index = self.arena.pop_free().ok_or(AllocError)?;
        for entry in &self.arena.tables[index as usize] {
            entry.store(fill.0, Ordering::Relaxed);
        }
        Ok(Pfn(ARENA_BASE_PFN + u64::from(index)))
    }

    fn table(&self, pfn: Pfn) -> &Table {
        &self.arena.tables[self.arena.index(pfn) as usize]
    }

    fn free_table_deferred(&self, pfn: Pfn) {
        self.arena.push_deferred(self.arena.index(pfn));
    }

    fn free_table_now(&self, pfn: Pfn) {
        self.arena.push_free(self.arena.index(pfn));
    }

    fn begin_walk(&self) -> Self::WalkGuard<'_> {}
}

impl HostTranslate for BenchHost<'_> {
    fn translate(&self, slot: &Memslot, gfn: Gfn, _write: bool) -> Result<HostPage, HostFaultError> {
        Ok(HostPage {
            pfn: Pfn(slot.host_addr(gfn) >> PAGE_SHIFT),
            writable: true,
            level: self.host_level,
            memory: tdp_core::host::HostMemory::Ram,
        })
    }
}

impl TlbFlush for BenchHost<'_> {
    fn flush_all(&self) {
        self.flushes.set(self.flushes.get() + 1);
    }
}

impl MmuYield for BenchHost<'_> {}

impl MmuEvents for BenchHost<'_> {}

/// No external tables: no mirror roots.
impl ExternalTables for BenchHost<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_pages_come_back_only_on_reclaim() {
        let arena = Arena::new(4);
        let host = BenchHost::new(&arena, Level::L1);
        let a = host.alloc_table(Spte(7)).unwrap();
        assert_eq!(a, Pfn(ARENA_BASE_PFN), "a fresh arena hands out pages in ascending order");
        assert!(host.table(a).iter().all(|e| e.load(Ordering::Relaxed) == 7));
        let b = host.alloc_table(Spte(0)).unwrap();
        host.free_table_deferred(a);
        host.free_table_deferred(b);
        assert_eq!(arena.free_pages(), 2);
        assert_eq!(arena.reclaim(), 2);
        assert_eq!(arena.free_pages(), 4);
        let c = host.alloc_table(Spte(0)).unwrap();
        host.free_table_now(c);
        assert_eq!(host.alloc_table(Spte(0)), Ok(c), "a page freed now is reused at once");
        host.free_table_now(c);
        arena.reset();
        assert_eq!(host.alloc_table(Spte(0)), Ok(a), "reset restores ascending order");
    }

    #[test]
    fn reset_catches_a_page_still_in_use() {
        let arena = Arena::new(2);
        let host = BenchHost::new(&arena, Level::L1);
        let _page = host.alloc_table(Spte(0)).unwrap();
        let reset = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| arena.reset()));
        assert!(reset.is_err(), "a reset with a page allocated must refuse");
    }
}
