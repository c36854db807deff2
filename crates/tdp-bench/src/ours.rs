//! Our side of each benchmark: a `tdp_core::mmu::Mmu` on a [`BenchHost`], one memslot, one vCPU's root
//! and page cache, driven only through `tdp-core`'s public API.

use std::hint::black_box;

use tdp_core::addr::{AsId, Gfn, Level, SlotId};
use tdp_core::fault::{AccessKind, Fault, FaultKind};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, RootRef, VcpuMmu};

use crate::config::PAGES_2M;
use crate::host::{Arena, BenchHost};

/// Where guest RAM sits in the host: 1 TiB, aligned for every page size.
pub const GUEST_RAM_HOST_BASE: u64 = 1 << 40;

/// A fresh MMU (4-level EPT with A/D bits unless built [`OurTree::with_config`]) with one writable memslot
/// of `pages` 4 KiB pages at gfn 0, and a loaded root.
///
/// Dropping it returns the root and the cache pages and drops the MMU, which tears its tree down; after
/// that [`Arena::reset`] finds every page free.
pub struct OurTree<'a> {
    mmu: Mmu<BenchHost<'a>>,
    vcpu: VcpuMmu,
}

impl<'a> OurTree<'a> {
    /// Builds the MMU on `arena`; the host maps guest memory at `host_level`.
    ///
    /// # Panics
    /// If the slot is refused or the arena has no page for the root.
    #[must_use]
    pub fn new(arena: &'a Arena, host_level: Level, pages: u64) -> Self {
        OurTree::with_config(arena, host_level, pages, MmuConfig::EPT)
    }

    /// As [`OurTree::new`], with the MMU built for `config` (EPT without A/D bits, with PML, ...).
    ///
    /// # Panics
    /// If `config` is invalid, the slot is refused or the arena has no page for the root.
    #[must_use]
    pub fn with_config(arena: &'a Arena, host_level: Level, pages: u64, config: MmuConfig) -> Self {
        let mmu = Mmu::new(BenchHost::new(arena, host_level), config).expect("a valid MMU config");
        let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), pages, GUEST_RAM_HOST_BASE, SlotFlags::empty());
        mmu.write().insert_memslot(slot).expect("the benchmark slot is valid");
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("the arena has a page for the root");
        OurTree { mmu, vcpu }
    }

    /// The MMU.
    #[must_use]
    pub fn mmu(&self) -> &Mmu<BenchHost<'a>> {
        &self.mmu
    }

    /// The vCPU's root.
    #[must_use]
    pub fn root(&self) -> &RootRef {
        self.vcpu.root().expect("the root is held until drop")
    }

    /// Turns dirty logging of the slot on or off (`set_memslot_flags` under the write lock) and runs the
    /// flush it returns before the lock drops. Turning it on is the enable-logging pass: every leaf of
    /// the slot is write-protected, or cleaned with PML.
    ///
    /// # Panics
    /// If the MMU refuses the change (it cannot: the slot exists and stays writable).
    pub fn set_logging(&mut self, on: bool) {
        let flags = if on { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
        let mut exclusive = self.mmu.write();
        let flush = exclusive.set_memslot_flags(AsId(0), SlotId(0), flags).expect("the bench slot exists");
        flush.run(self.mmu.host());
    }

    /// Handles a write fault (EPT violation, nothing present) at each of `count` gfns `0, step, 2*step,
    /// ...`, the way a vCPU's exit handler calls the MMU. Returns how many were not `Fixed` (0 when the
    /// table started empty).
    pub fn fault_each(&mut self, count: u64, step: u64) -> u64 {
        self.fault_each_for(count, step, AccessKind::Write)
    }

    /// As [`OurTree::fault_each`], with instruction fetches.
    pub fn fetch_each(&mut self, count: u64, step: u64) -> u64 {
        self.fault_each_for(count, step, AccessKind::Exec)
    }

    /// Write faults at every gfn of the first `tables` 2 MiB ranges but each range's first, one range
    /// after another in turn (gfns 1, 513, 1025, ..., then 2, 514, ...): no fault is in the level-1
    /// table of the one before, so none starts from the vCPU's walk hint. Map the ranges' first gfns
    /// first (`fault_each(tables, 512)`), so that every table is linked and no fault here links one.
    pub fn fault_scattered(&mut self, tables: u64) -> u64 {
        let grid = Grid { rows: PAGES_2M - 1, row_step: 1, columns: tables, column_step: PAGES_2M, first: 1 };
        self.fault_grid(grid, AccessKind::Write)
    }

    fn fault_each_for(&mut self, count: u64, step: u64, access: AccessKind) -> u64 {
        self.fault_grid(Grid { rows: 1, row_step: 0, columns: count, column_step: step, first: 0 }, access)
    }

    /// The benches' one call of the fault handler (a second call site changes how the compiler inlines
    /// it, and with that the figures), over the gfns of `grid`.
    fn fault_grid(&mut self, grid: Grid, access: AccessKind) -> u64 {
        let mut not_fixed = 0;
        for row in 0..grid.rows {
            let row_first = grid.first + row * grid.row_step;
            for column in 0..grid.columns {
                let fault = Fault {
                    as_id: AsId(0),
                    gpa: Gfn(row_first + column * grid.column_step).gpa(),
                    access,
                    kind: FaultKind::Violation { present: false },
                };
                let outcome = self.mmu.handle_fault(&mut self.vcpu, black_box(fault), &mut ());
                not_fixed += u64::from(outcome != Ok(FaultOutcome::Fixed));
            }
        }
        not_fixed
    }

    /// Turns the NX huge-page mitigation on: the root is invalidated, its tree zapped, and a new root
    /// loaded.
    ///
    /// # Panics
    /// If the arena has no page for the new root.
    pub fn enable_nx_huge_pages(&mut self) {
        self.mmu.write().set_nx_huge_pages(true).run(self.mmu.host());
        self.mmu.read().zap_invalidated_roots();
        self.mmu.load_root(&mut self.vcpu, AsId(0)).expect("the arena has a page for the new root");
    }

    /// Zaps the leaves mapping `[0, pages)` under the write lock and runs the flush it owes (the
    /// MMU-notifier path), flushing before the lock drops as KVM does. Tables stay linked.
    pub fn zap_range(&mut self, pages: u64) {
        let mut exclusive = self.mmu.write();
        exclusive.zap_gfn_range(AsId(0), Gfn(0), Gfn(pages)).run(self.mmu.host());
    }

    /// Tears the whole tree down below the root ("zap all"), flush included.
    pub fn zap_all(&mut self) {
        self.mmu.write().zap_all();
    }
}

impl Drop for OurTree<'_> {
    fn drop(&mut self) {
        self.mmu.release_vcpu(&mut self.vcpu);
    }
}

/// The gfns `first + row * row_step + column * column_step`, row by row.
#[derive(Clone, Copy)]
struct Grid {
    rows: u64,
    row_step: u64,
    columns: u64,
    column_step: u64,
    first: u64,
}
