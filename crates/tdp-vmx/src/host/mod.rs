//! The `tdp-core` host traits for an identity-mapped bare-metal hypervisor: table pages from a
//! physical region ([`TableFrames`]), host translation over memslots that name physical RAM
//! ([`IdentityTranslate`]), TLB flushes by INVEPT ([`InveptFlush`]), and [`BareMetalHost`], which
//! combines them into a [`tdp_core::host::Host`] for [`tdp_core::mmu::Mmu`]. The first two are
//! `tdp-metal`'s (vendor-neutral, shared with `tdp-svm`), re-exported here.

mod flush;

pub use flush::{FlushStats, InveptFlush, MAX_EPTPS};
pub use tdp_metal::frames::{FrameStats, FramesError, FramesWalkGuard, TableFrames};
pub use tdp_metal::translate::{IdentityTranslate, MoveError, MovedPage, PhysRange};

use tdp_core::addr::{AsId, Gfn, Pfn};
use tdp_core::host::{
    AllocError, ExternalTables, HostFaultError, HostPage, HostTranslate, MmuEvents, MmuYield, Table,
    TableMemory, TlbFlush,
};
use tdp_core::memslot::Memslot;
use tdp_core::spte::Spte;

use crate::instr::VmxInstructions;

/// Everything `tdp-core`'s MMU needs from a bare-metal hypervisor: pass it to
/// [`tdp_core::mmu::Mmu::new`]. Walks never yield (one CPU) and trace events cost nothing.
///
/// ```
/// use tdp_core::addr::Level;
/// use tdp_core::mmu::Mmu;
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, PhysRange, TableFrames};
/// use tdp_vmx::raw::{IdentityRegion, TablePage};
///
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let mut pages: Vec<TablePage> = (0..64).map(|_| TablePage::new()).collect();
/// let ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
/// let host = BareMetalHost {
///     frames: TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///     translate: IdentityTranslate::new(&ram, Level::L2),
///     tlb: InveptFlush::new(&vmx, ept.invept),
/// };
/// let mmu: Mmu<_> = Mmu::new(host, ept.mmu_config(true)?)?;
/// assert_eq!(mmu.host().frames.stats().in_use, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct BareMetalHost<'a, 'r, V> {
    /// Table pages.
    pub frames: TableFrames<'a>,
    /// Guest RAM translation.
    pub translate: IdentityTranslate<'r>,
    /// TLB flushes.
    pub tlb: InveptFlush<V>,
}

impl<'a, V> TableMemory for BareMetalHost<'a, '_, V> {
    type WalkGuard<'g>
        = FramesWalkGuard<'g, 'a>
    where
        Self: 'g;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        self.frames.alloc_table(fill)
    }
    fn table(&self, pfn: Pfn) -> &Table {
        self.frames.table(pfn)
    }
    fn free_table_deferred(&self, pfn: Pfn) {
        self.frames.free_table_deferred(pfn);
    }
    fn free_table_now(&self, pfn: Pfn) {
        self.frames.free_table_now(pfn);
    }
    fn begin_walk(&self) -> FramesWalkGuard<'_, 'a> {
        self.frames.begin_walk()
    }
}

impl<V> HostTranslate for BareMetalHost<'_, '_, V> {
    fn translate(&self, slot: &Memslot, gfn: Gfn, write: bool) -> Result<HostPage, HostFaultError> {
        self.translate.translate(slot, gfn, write)
    }
}

impl<V: VmxInstructions> TlbFlush for BareMetalHost<'_, '_, V> {
    fn flush_all(&self) {
        self.tlb.flush_all();
    }
    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        self.tlb.flush_range(as_id, start, pages);
    }
}

impl<V> MmuYield for BareMetalHost<'_, '_, V> {}

impl<V> MmuEvents for BareMetalHost<'_, '_, V> {}

/// No external tables: no mirror roots.
impl<V> ExternalTables for BareMetalHost<'_, '_, V> {}

#[cfg(test)]
mod tests;
