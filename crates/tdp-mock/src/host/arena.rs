//! The mock host's table-page arena: a fixed pool of 4 KiB pages allocated once, a state per page
//! (free, live, deferred), poisoning on free, failure injection, and an RCU-like deferred free.
//!
//! Checks: I2. A page is poisoned with [`POISON`] the moment it becomes free, so a stray read of a
//! freed page is loud; freeing a page twice, or handing out a free page through `table()`, panics with
//! a message starting "I2 violation:". A page freed with deferral is reused only once no walk guard
//! that could have seen it is alive.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};

use tdp_core::addr::{ENTRIES_PER_TABLE, Pfn};
use tdp_core::host::Table;

use crate::lock;

/// The host frame of the first arena page. Table pages live below guest RAM, so a table frame can
/// never be mistaken for a guest page.
pub const TABLE_BASE_PFN: u64 = 0x100;

/// What every entry of a free page holds. It has bit 11 (the core's software "present" bit) and low
/// garbage bits, so a walker or the core reading a freed page sees nonsense and fails loudly.
pub const POISON: u64 = 0xdead_0000_0000_0fff;

/// The life-cycle state of one arena page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// On the free list, poisoned; nobody may read it.
    Free,
    /// Allocated: in a tree, in a page cache, or a root.
    Live,
    /// Unlinked and waiting for every walker that could have seen it to finish.
    Deferred,
}

/// Counters of the arena, for leak checks and failure-injection tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Pages currently [`PageState::Live`].
    pub live: u64,
    /// Pages currently [`PageState::Deferred`].
    pub deferred: u64,
    /// The largest `live` ever seen.
    pub peak_live: u64,
    /// Successful allocations since the host was created.
    pub total_allocs: u64,
    /// Allocations refused (arena full, or the budget set by `set_alloc_budget` used up).
    pub failed_allocs: u64,
}

const FREE: u8 = 0;
const LIVE: u8 = 1;
const DEFERRED: u8 = 2;
/// `budget` value meaning "no limit".
const UNLIMITED: u64 = u64::MAX;

pub(crate) struct Arena {
    pages: Box<[Table]>,
    states: Box<[AtomicU8]>,
    free: Mutex<Vec<u32>>,
    pending: Mutex<Vec<Pfn>>,
    readers: AtomicUsize,
    budget: AtomicU64,
    live: AtomicU64,
    deferred: AtomicU64,
    peak_live: AtomicU64,
    total_allocs: AtomicU64,
    failed_allocs: AtomicU64,
    /// TLB flushes applied so far (any kind): a table page unlinked at flush count `n` may be reused only
    /// once the count has moved past `n`, or hardware could still walk it through a cached paging-structure
    /// entry (KVM flushes before `rcu_read_unlock` for this reason).
    flush_seq: AtomicU64,
    /// The flush count at which each unlinked table page was unlinked, by page index.
    unlinked_at: Mutex<std::collections::HashMap<usize, u64>>,
    /// Table pages reclaimed with no flush between their unlink and their reuse.
    freed_unflushed: AtomicU64,
}

fn state_of(raw: u8) -> PageState {
    match raw {
        LIVE => PageState::Live,
        DEFERRED => PageState::Deferred,
        _ => PageState::Free,
    }
}

impl Arena {
    pub(crate) fn new(capacity: usize) -> Arena {
        let pages: Vec<Table> =
            (0..capacity).map(|_| std::array::from_fn(|_| AtomicU64::new(POISON))).collect();
        let states: Vec<AtomicU8> = (0..capacity).map(|_| AtomicU8::new(FREE)).collect();
        let index_limit =
            u32::try_from(capacity).expect("table_capacity fits in u32 (checked by MockHost::new)");
        // Reversed, so that `pop` hands out the lowest frames first (readable dumps).
        let free: Vec<u32> = (0..index_limit).rev().collect();
        Arena {
            pages: pages.into_boxed_slice(),
            states: states.into_boxed_slice(),
            free: Mutex::new(free),
            pending: Mutex::new(Vec::new()),
            readers: AtomicUsize::new(0),
            budget: AtomicU64::new(UNLIMITED),
            live: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            peak_live: AtomicU64::new(0),
            total_allocs: AtomicU64::new(0),
            failed_allocs: AtomicU64::new(0),
            flush_seq: AtomicU64::new(0),
            unlinked_at: Mutex::new(std::collections::HashMap::new()),
            freed_unflushed: AtomicU64::new(0),
        }
    }

    fn index(&self, pfn: Pfn) -> Option<usize> {
        let i = usize::try_from(pfn.0.checked_sub(TABLE_BASE_PFN)?).ok()?;
        (i < self.pages.len()).then_some(i)
    }

    fn pfn_of(index: usize) -> Pfn {
        Pfn(TABLE_BASE_PFN + index as u64)
    }

    /// The state of the page in `pfn`, or `None` when `pfn` is not an arena page.
    pub(crate) fn state(&self, pfn: Pfn) -> Option<PageState> {
        // Acquire pairs with the Release store that changed the state, so a reader that sees Live also
        // sees the entries written before the page was handed out.
        self.index(pfn).map(|i| state_of(self.states[i].load(Ordering::Acquire)))
    }

    /// The page whatever its state (`None` outside the arena): for checkers that report instead of panic.
    pub(crate) fn page(&self, pfn: Pfn) -> Option<&Table> {
        self.index(pfn).map(|i| &self.pages[i])
    }

    /// The page for the core. Panics on a frame outside the arena or a free page.
    pub(crate) fn table(&self, pfn: Pfn) -> &Table {
        let Some(i) = self.index(pfn) else {
            panic!("I2 violation: {pfn:?} is not a table page of the mock host");
        };
        if self.states[i].load(Ordering::Acquire) == FREE {
            panic!("I2 violation: {pfn:?} is read after it was freed");
        }
        &self.pages[i]
    }

    pub(crate) fn alloc(&self, fill: u64) -> Option<Pfn> {
        if !self.take_budget() {
            self.failed_allocs.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut index = lock(&self.free).pop();
        if index.is_none() {
            // Pages waiting for walkers may be reclaimable by now.
            self.reclaim();
            index = lock(&self.free).pop();
        }
        let Some(index) = index else {
            self.failed_allocs.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let i = index as usize;
        for entry in self.pages[i].iter() {
            entry.store(fill, Ordering::Relaxed);
        }
        // Release publishes the fill to whoever sees the page Live.
        let prev = self.states[i].swap(LIVE, Ordering::AcqRel);
        assert_eq!(prev, FREE, "page {i} on the free list was not free");
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_live.fetch_max(live, Ordering::Relaxed);
        self.total_allocs.fetch_add(1, Ordering::Relaxed);
        Some(Self::pfn_of(i))
    }

    fn take_budget(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| match b {
                UNLIMITED => Some(UNLIMITED),
                b => b.checked_sub(1),
            })
            .is_ok()
    }

    pub(crate) fn set_budget(&self, budget: Option<u64>) {
        self.budget.store(budget.map_or(UNLIMITED, |b| b.min(UNLIMITED - 1)), Ordering::Relaxed);
    }

    /// Moves `pfn` from Live to `to`, panicking with an I2 message on any other state.
    fn leave_live(&self, pfn: Pfn, to: u8, what: &str) -> usize {
        let Some(i) = self.index(pfn) else {
            panic!("I2 violation: {what} of {pfn:?}, which is not a table page of the mock host");
        };
        if let Err(state) = self.states[i].compare_exchange(LIVE, to, Ordering::AcqRel, Ordering::Acquire) {
            panic!("I2 violation: {what} of {pfn:?}, which is {:?} (double free)", state_of(state));
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        i
    }

    pub(crate) fn free_now(&self, pfn: Pfn) {
        let i = self.leave_live(pfn, FREE, "immediate free");
        self.poison_and_recycle(i);
    }

    pub(crate) fn free_deferred(&self, pfn: Pfn) {
        self.leave_live(pfn, DEFERRED, "deferred free");
        self.deferred.fetch_add(1, Ordering::Relaxed);
        let mut pending = lock(&self.pending);
        pending.push(pfn);
        // If the caller holds a walk guard the reader count is non-zero and nothing is reclaimed here.
        self.reclaim_locked(&mut pending);
    }

    /// Poisons page `i` (already marked free) and puts it on the free list.
    fn poison_and_recycle(&self, i: usize) {
        for entry in self.pages[i].iter() {
            entry.store(POISON, Ordering::Relaxed);
        }
        let index = u32::try_from(i).expect("arena indices fit in u32");
        lock(&self.free).push(index);
    }

    pub(crate) fn begin_walk(&self) {
        self.readers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `reclaim_locked` (store-buffering pattern): either the reclaimer sees
        // this reader, or this reader's loads see every unlink that preceded the reclaimer's check.
        fence(Ordering::SeqCst);
    }

    pub(crate) fn end_walk(&self) {
        if self.readers.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last walker left: reclaim unless someone else holds the list (they will check the
            // count themselves after taking it).
            if let Ok(mut pending) = self.pending.try_lock() {
                self.reclaim_locked(&mut pending);
            }
        }
    }

    pub(crate) fn reclaim(&self) {
        let mut pending = lock(&self.pending);
        self.reclaim_locked(&mut pending);
    }

    /// Frees every pending page if no walker is active. Sound because each pending page was unlinked
    /// before it was pushed: a zero count after the push means every walker that could have seen it
    /// has finished, and later walkers cannot reach it.
    fn reclaim_locked(&self, pending: &mut Vec<Pfn>) {
        if pending.is_empty() {
            return;
        }
        fence(Ordering::SeqCst);
        if self.readers.load(Ordering::SeqCst) != 0 {
            return;
        }
        for pfn in pending.drain(..) {
            let i = self.index(pfn).expect("only arena pages are pending");
            let prev = self.states[i].swap(FREE, Ordering::AcqRel);
            assert_eq!(prev, DEFERRED, "a pending page was not deferred");
            self.deferred.fetch_sub(1, Ordering::Relaxed);
            let unlinked_at = lock(&self.unlinked_at).remove(&i);
            if unlinked_at == Some(self.flush_seq.load(Ordering::SeqCst)) {
                self.freed_unflushed.fetch_add(1, Ordering::SeqCst);
            }
            self.poison_and_recycle(i);
        }
    }

    /// A TLB flush was applied.
    pub(crate) fn note_flush(&self) {
        self.flush_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Table page `pfn` was unlinked from a live tree.
    pub(crate) fn note_unlinked(&self, pfn: Pfn) {
        if let Some(i) = self.index(pfn) {
            let seq = self.flush_seq.load(Ordering::SeqCst);
            lock(&self.unlinked_at).insert(i, seq);
        }
    }

    /// Table pages reclaimed (reusable) before any TLB flush since they were unlinked.
    pub(crate) fn freed_before_flush(&self) -> u64 {
        self.freed_unflushed.load(Ordering::SeqCst)
    }

    pub(crate) fn pending(&self) -> usize {
        lock(&self.pending).len()
    }

    pub(crate) fn readers(&self) -> usize {
        self.readers.load(Ordering::SeqCst)
    }

    pub(crate) fn stats(&self) -> AllocStats {
        AllocStats {
            live: self.live.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            peak_live: self.peak_live.load(Ordering::Relaxed),
            total_allocs: self.total_allocs.load(Ordering::Relaxed),
            failed_allocs: self.failed_allocs.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.pages.len()
    }
}

const _: () = assert!(ENTRIES_PER_TABLE == 512, "Table is [AtomicU64; 512]");
