//! tdp-core's host traits for this identity-mapped, single-CPU hypervisor: EPT table pages from a fixed
//! pool of physical memory, guest frames translated by memslot arithmetic, and TLB flushes as
//! single-context INVEPTs of the guest's EPTP (every flush the core asks for is counted, and so is every
//! INVEPT executed for one: the result compares them).
//!
//! Deferred frees wait on a pending list until [`HvHost::quiesce`], which the run loop calls before
//! each VM entry, after every flush of that exit has run: no walk guard is alive then, the guest is not
//! running, and the CPU has dropped whatever it cached from the freed tables.

use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use tdp_core::addr::{Gfn, Level, Pfn};
use tdp_core::host::{
    AllocError, HostFaultError, HostPage, HostTranslate, MmuEvents, MmuYield, Table, TableMemory, TlbFlush,
};
use tdp_core::memslot::Memslot;
use tdp_core::spte::Spte;
use tdp_core::sync::Ordering;

use tdp_vmx::caps::EptFeatures;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::inv::{InvError, invept_context};
use tdp_vmx::raw::X86Vmx;

use crate::layout::{GUEST_HOST_BASE, RAM_END, TABLE_POOL_END, TABLE_POOL_START};

/// The host side of the MMU.
#[derive(Debug)]
pub struct HvHost<'v> {
    vmx: &'v X86Vmx,
    features: EptFeatures,
    /// Next never-used page of the pool.
    next: Cell<u64>,
    free: RefCell<Vec<Pfn>>,
    pending: RefCell<Vec<Pfn>>,
    walkers: Cell<usize>,
    /// The EPTP to invalidate; none until the root is loaded (nothing can be cached before).
    eptp: Cell<Option<Eptp>>,
    flushes: Cell<u64>,
    invepts: Cell<u64>,
    /// The first INVEPT failure, reported by the run loop (a flush cannot return an error).
    error: Cell<Option<InvError>>,
}

/// Held for the duration of a walk of the tables.
pub struct WalkGuard<'a>(&'a Cell<usize>);

impl Drop for WalkGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl<'v> HvHost<'v> {
    /// A host with an empty pool whose flushes execute INVEPT through `vmx`.
    pub fn new(vmx: &'v X86Vmx, features: EptFeatures) -> HvHost<'v> {
        HvHost {
            vmx,
            features,
            next: Cell::new(TABLE_POOL_START >> 12),
            free: RefCell::default(),
            pending: RefCell::default(),
            walkers: Cell::new(0),
            eptp: Cell::new(None),
            flushes: Cell::new(0),
            invepts: Cell::new(0),
            error: Cell::new(None),
        }
    }
    /// Sets the EPTP that flushes invalidate.
    pub fn set_eptp(&self, eptp: Eptp) {
        self.eptp.set(Some(eptp));
    }
    /// Flushes the core asked for so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.get()
    }
    /// INVEPTs executed for them.
    pub fn invepts(&self) -> u64 {
        self.invepts.get()
    }
    /// The first INVEPT failure, if any.
    pub fn take_error(&self) -> Option<InvError> {
        self.error.take()
    }
    /// Returns deferred-freed pages to the pool. Call only with no walk guard alive and after the
    /// flushes owed for the frees have run.
    pub fn quiesce(&self) {
        if self.walkers.get() == 0 {
            self.free.borrow_mut().append(&mut self.pending.borrow_mut());
        }
    }
    /// Pages of the pool in use.
    pub fn pages_in_use(&self) -> u64 {
        self.next.get() - (TABLE_POOL_START >> 12) - self.free.borrow().len() as u64
    }
    /// Whether `pfn` is a page of the table pool.
    pub fn in_pool(pfn: u64) -> bool {
        (TABLE_POOL_START >> 12..TABLE_POOL_END >> 12).contains(&pfn)
    }
    /// Entry `index` of table page `pfn`, or 0 when `pfn` is not a pool page (a corrupted entry).
    pub fn read_entry(&self, pfn: u64, index: usize) -> u64 {
        if Self::in_pool(pfn) { self.table(Pfn(pfn))[index % 512].load(Ordering::Relaxed) } else { 0 }
    }
}

impl TableMemory for HvHost<'_> {
    type WalkGuard<'a>
        = WalkGuard<'a>
    where
        Self: 'a;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        let pfn = match self.free.borrow_mut().pop() {
            Some(pfn) => pfn,
            None => {
                let next = self.next.get();
                if next >= TABLE_POOL_END >> 12 {
                    return Err(AllocError);
                }
                self.next.set(next + 1);
                Pfn(next)
            }
        };
        for entry in self.table(pfn) {
            // Relaxed: the page is private until the core publishes it with a Release compare-exchange.
            entry.store(fill.0, Ordering::Relaxed);
        }
        Ok(pfn)
    }

    fn table(&self, pfn: Pfn) -> &Table {
        // The core only passes frames it allocated from this pool (its contract); anything else is a bug
        // that must not become a read of arbitrary memory.
        assert!(Self::in_pool(pfn.0), "table({pfn:?}) is not a page of the EPT pool");
        // SAFETY: pool pages are identity-mapped, 4 KiB-aligned RAM used for nothing else; `Table` is
        // 512 atomics, valid for any bit pattern, and shared access goes through atomics only.
        unsafe { &*((pfn.0 << 12) as *const Table) }
    }

    fn free_table_deferred(&self, pfn: Pfn) {
        self.pending.borrow_mut().push(pfn);
    }

    fn free_table_now(&self, pfn: Pfn) {
        self.free.borrow_mut().push(pfn);
    }

    fn begin_walk(&self) -> WalkGuard<'_> {
        self.walkers.set(self.walkers.get() + 1);
        WalkGuard(&self.walkers)
    }
}

impl HostTranslate for HvHost<'_> {
    fn translate(&self, slot: &Memslot, gfn: Gfn, _write: bool) -> Result<HostPage, HostFaultError> {
        let addr = slot.host_addr(gfn);
        if !(GUEST_HOST_BASE..RAM_END).contains(&addr) {
            return Err(HostFaultError::NoPage { gfn });
        }
        // Guest RAM is contiguous and the kernel maps it with 2 MiB pages.
        Ok(HostPage { pfn: Pfn(addr >> 12), writable: true, level: Level::L2 })
    }
}

impl TlbFlush for HvHost<'_> {
    fn flush_all(&self) {
        self.flushes.set(self.flushes.get() + 1);
        let Some(eptp) = self.eptp.get() else {
            return;
        };
        match invept_context(self.vmx, &self.features, eptp) {
            Ok(_) => self.invepts.set(self.invepts.get() + 1),
            Err(e) => {
                let first = self.error.take().unwrap_or(e);
                self.error.set(Some(first));
            }
        }
    }
}

impl MmuYield for HvHost<'_> {}
impl MmuEvents for HvHost<'_> {}
