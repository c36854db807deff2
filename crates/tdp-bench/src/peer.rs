//! The peers and limits: the `x86_64` crate's `OffsetPageTable` building and tearing down the same
//! mappings in userspace memory, and sweeps over as many table bytes as a zap or a protection pass
//! touches (a plain and an atomic one for each).
//!
//! The peer's page tables are ordinary memory in one `Box<[PageTable]>`: "physical" address `i * 4096`
//! is frame `i` of the box, so the physical-memory offset is the box's address. The tables are never
//! loaded into CR3; they are data, which is what makes the `unsafe` calls below sound. The flushes the
//! mapper returns are ignored (running one would execute `invlpg`, a privileged instruction, and would
//! cost the peer a TLB flush that our side only counts).
//!
//! JUSTIFICATION for the `unsafe` here: `OffsetPageTable::new`, `Mapper::map_to` and
//! `CleanUp::clean_up_addr_range` are `unsafe fn`s and `FrameAllocator` an `unsafe trait` in `x86_64`'s
//! API; measuring the peer means calling them. Each use states why its contract holds.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use x86_64::structures::paging::mapper::CleanUp;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame,
    Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Where the peer's mapped (never touched) data frames start: the same 1 TiB as our guest RAM.
pub const DATA_PHYS_BASE: u64 = crate::ours::GUEST_RAM_HOST_BASE;

/// Memory for the peer's page tables, allocated and touched once.
pub struct PeerArena {
    frames: Box<[PageTable]>,
}

impl PeerArena {
    /// An arena of `frames` zeroed page-table frames; frame 0 is always the level-4 table.
    ///
    /// # Panics
    /// If `frames` is 0.
    #[must_use]
    pub fn new(frames: usize) -> Self {
        assert!(frames > 0, "the level-4 table needs a frame");
        PeerArena { frames: (0..frames).map(|_| PageTable::new()).collect() }
    }

    /// An empty tree: the level-4 table cleared, every other frame free. The tree borrows the arena
    /// mutably, so no two trees on one arena coexist.
    pub fn fresh(&mut self) -> PeerTree<'_> {
        let end = self.frames.len() as u64;
        let first: *mut PageTable = self.frames.as_mut_ptr();
        // The mapper turns "physical" addresses back into pointers with integer arithmetic; exposing the
        // box's provenance makes those pointers valid for the whole box.
        let base = first.expose_provenance() as u64;
        // SAFETY: `first` points to frame 0 of the box, which `self` borrows mutably for the tree's
        // lifetime; no other reference to it exists while the returned tree lives.
        let level_4 = unsafe { &mut *first };
        level_4.zero();
        // SAFETY: "physical" address p is box byte p for every frame the allocator below hands out
        // (frames 1.., all inside the box), and frame 0 holds the level-4 table of an empty hierarchy.
        // The mapper is the only user of the box while the tree lives.
        let mapper = unsafe { OffsetPageTable::new(level_4, VirtAddr::new(base)) };
        PeerTree { mapper, frames: BumpFrames { next: 1, end, freed: 0 } }
    }
}

/// The peer's frame allocator: hands out the arena's frames 1.. in order, each once per tree.
struct BumpFrames {
    next: u64,
    end: u64,
    freed: u64,
}

// SAFETY: every frame returned lies inside the arena (index < `end`), is not frame 0 (the level-4 table),
// and is returned at most once per tree because `next` only grows; a new `BumpFrames` (starting over)
// exists only in a new tree, made after the previous tree's mutable borrow of the arena has ended. So each
// frame is unique and unused by anything but the mapper that asked for it.
unsafe impl FrameAllocator<Size4KiB> for BumpFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next == self.end {
            return None;
        }
        let frame = PhysFrame::containing_address(PhysAddr::new(self.next * 4096));
        self.next += 1;
        Some(frame)
    }
}

impl FrameDeallocator<Size4KiB> for BumpFrames {
    unsafe fn deallocate_frame(&mut self, _frame: PhysFrame<Size4KiB>) {
        // A bump allocator cannot reuse frames; counting is the whole of a free here.
        self.freed += 1;
    }
}

/// One peer page-table tree.
pub struct PeerTree<'a> {
    mapper: OffsetPageTable<'a>,
    frames: BumpFrames,
}

impl PeerTree<'_> {
    /// Maps virtual pages `0..count` (4 KiB) to data frames, as many `map_to` calls. Returns how many
    /// failed (0 on a fresh tree).
    pub fn map_4k(&mut self, count: u64) -> u64 {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        let mut failed = 0;
        for i in 0..count {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(i * 4096));
            let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(DATA_PHYS_BASE + i * 4096));
            // SAFETY: the tree is never used for translation (see the module docs), so no mapping it
            // holds can alias memory that is in use.
            let result = unsafe { self.mapper.map_to(black_box(page), frame, flags, &mut self.frames) };
            match result {
                Ok(flush) => flush.ignore(),
                Err(_) => failed += 1,
            }
        }
        failed
    }

    /// Maps virtual 2 MiB pages `0..count` to data frames with `map_to`. Returns how many failed.
    pub fn map_2m(&mut self, count: u64) -> u64 {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        let size = 2 << 20;
        let mut failed = 0;
        for i in 0..count {
            let page = Page::<Size2MiB>::containing_address(VirtAddr::new(i * size));
            let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(DATA_PHYS_BASE + i * size));
            // SAFETY: as in `map_4k`: the tree is never used for translation.
            let result = unsafe { self.mapper.map_to(black_box(page), frame, flags, &mut self.frames) };
            match result {
                Ok(flush) => flush.ignore(),
                Err(_) => failed += 1,
            }
        }
        failed
    }

    /// Unmaps virtual pages `0..count` (4 KiB) with `unmap`; tables stay. Returns how many failed.
    pub fn unmap_4k(&mut self, count: u64) -> u64 {
        let mut failed = 0;
        for i in 0..count {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(i * 4096));
            match self.mapper.unmap(black_box(page)) {
                Ok((_frame, flush)) => flush.ignore(),
                Err(_) => failed += 1,
            }
        }
        failed
    }

    /// Frees the now empty tables below the level-4 table that cover `0..count` 4 KiB pages
    /// (`CleanUp::clean_up_addr_range`). Returns how many frames were freed.
    pub fn clean_up_4k(&mut self, count: u64) -> u64 {
        let start = Page::<Size4KiB>::containing_address(VirtAddr::new(0));
        let end = Page::<Size4KiB>::containing_address(VirtAddr::new((count - 1) * 4096));
        let before = self.frames.freed;
        // SAFETY: the tree is never used for translation and the mapper holds the only references to
        // its tables, so freeing (here: forgetting) empty tables invalidates nothing.
        unsafe { self.mapper.clean_up_addr_range(Page::range_inclusive(start, end), &mut self.frames) };
        self.frames.freed - before
    }

    /// Table frames allocated so far, the level-4 table included.
    #[must_use]
    pub fn frames_used(&self) -> u64 {
        self.frames.next
    }
}

/// The plain-write limit: stores one value per entry, as a full pass over tables at memory (or cache)
/// bandwidth would. The values depend on the index and the buffer escapes, so nothing is elided.
pub fn plain_write_sweep(entries: &mut [u64], seed: u64) {
    for (i, entry) in entries.iter_mut().enumerate() {
        *entry = seed ^ i as u64;
    }
    black_box(entries);
}

/// The atomic limit: one locked read-modify-write (`xchg`, what a zap of a live SPTE needs) per entry.
pub fn atomic_swap_sweep(entries: &[AtomicU64], seed: u64) -> u64 {
    let mut acc = 0;
    for (i, entry) in entries.iter().enumerate() {
        // AcqRel as a zap's exchange on a live SPTE would use; on x86 every ordering is the same `xchg`.
        acc ^= entry.swap(seed ^ i as u64, Ordering::AcqRel);
    }
    black_box(acc)
}

/// The plain limit of a protection pass: clears `mask` in every entry with ordinary loads and stores,
/// as a pass that needs no atomics could (the compiler vectorises it). The buffer escapes, so no pass is
/// elided, even one that finds the bits already clear.
pub fn plain_clear_sweep(entries: &mut [u64], mask: u64) {
    for entry in entries.iter_mut() {
        *entry &= !mask;
    }
    black_box(entries);
}

/// The plain limit for tables made of atomics: the same clearing pass with relaxed atomic loads and stores,
/// which compile to ordinary `mov`s but, unlike [`plain_clear_sweep`], are never vectorised: one load and
/// one store per entry, as `tdp-core`'s write-locked passes do.
pub fn scalar_clear_sweep(entries: &[AtomicU64], mask: u64) {
    for entry in entries {
        // Relaxed load and store: plain moves on x86, no lock prefix.
        entry.store(entry.load(Ordering::Relaxed) & !mask, Ordering::Relaxed);
    }
    black_box(entries);
}

/// The atomic limit of a protection pass: one locked read-modify-write per entry (`lock and`, KVM's
/// `clear_bit` on an SPTE that hardware may update), whatever the entry holds.
pub fn atomic_clear_sweep(entries: &[AtomicU64], mask: u64) {
    for entry in entries {
        // The result is unused, so x86 gets `lock and` rather than a compare-exchange loop. Relaxed: the
        // pass publishes nothing; a lock prefix is a full barrier on x86 whatever the ordering.
        entry.fetch_and(!mask, Ordering::Relaxed);
    }
    black_box(entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_maps_unmaps_and_cleans_up_a_small_range() {
        let mut arena = PeerArena::new(16);
        let mut tree = arena.fresh();
        assert_eq!(tree.map_4k(1024), 0);
        assert_eq!(tree.frames_used(), 1 + 1 + 1 + 2, "L4 + L3 + L2 + two L1 tables");
        assert_eq!(tree.map_4k(1), 1, "remapping a mapped page fails");
        assert_eq!(tree.unmap_4k(1024), 0);
        assert_eq!(tree.clean_up_4k(1024), 4);
        let mut tree = arena.fresh();
        assert_eq!(tree.map_2m(3), 0);
        assert_eq!(tree.frames_used(), 3);
    }

    #[test]
    fn sweeps_write_every_entry() {
        let mut plain = vec![0u64; 8];
        plain_write_sweep(&mut plain, 1);
        assert_eq!(plain[5], 4);
        let atomic: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
        atomic_swap_sweep(&atomic, 1);
        assert_eq!(atomic[5].load(Ordering::Relaxed), 4);
        plain[..2].copy_from_slice(&[0b111, 0b101]);
        plain_clear_sweep(&mut plain, 0b10);
        assert_eq!(plain[..2], [0b101, 0b101]);
        atomic[0].store(0b111, Ordering::Relaxed);
        atomic_clear_sweep(&atomic, 0b10);
        assert_eq!(atomic[0].load(Ordering::Relaxed), 0b101);
        atomic[1].store(0b110, Ordering::Relaxed);
        scalar_clear_sweep(&atomic, 0b100);
        assert_eq!(atomic[1].load(Ordering::Relaxed), 0b010);
    }
}
