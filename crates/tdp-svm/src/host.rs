//! The `tdp-core` host traits for an identity-mapped bare-metal hypervisor on SVM: [`SvmHost`] combines
//! table pages from a physical region, host translation over memslots that name physical RAM, and
//! [`AsidFlush`] for TLB flushes.
//!
//! The table-frame allocator, the identity translation, the identity region and the dirty-ring sink
//! are vendor-neutral and are `tdp-metal`'s (shared with `tdp-vmx`), re-exported here so a user of this
//! crate names only `tdp_svm`.

pub use tdp_metal::frames::{FrameStats, FramesError, FramesWalkGuard, TableFrames};
pub use tdp_metal::region::{IdentityRegion, TablePage};
pub use tdp_metal::ring_sink::{RingSink, SinkAllocError, SinkStats};
pub use tdp_metal::translate::{IdentityTranslate, MoveError, MovedPage, PhysRange};

use tdp_core::addr::{AsId, Gfn, Pfn};
use tdp_core::host::{
    AllocError, ExternalTables, HostFaultError, HostPage, HostTranslate, MmuEvents, MmuYield, Table,
    TableMemory, TlbFlush,
};
use tdp_core::memslot::Memslot;
use tdp_core::spte::Spte;

use crate::caps::NptFeatures;
use crate::flush::AsidFlush;

/// Everything `tdp-core`'s MMU needs from a bare-metal SVM hypervisor: pass it to
/// [`tdp_core::mmu::Mmu::new`]. Walks never yield and trace events cost nothing.
///
/// ```
/// use tdp_core::addr::Level;
/// use tdp_core::mmu::Mmu;
/// use tdp_svm::caps::SvmCapabilities;
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, SvmHost, TableFrames, TablePage};
///
/// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN)).npt_features()?;
/// let mut pages: Vec<TablePage> = (0..64).map(|_| TablePage::new()).collect();
/// let ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
/// let host = SvmHost::new(TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///                         IdentityTranslate::new(&ram, Level::L2), &npt);
/// let mmu: Mmu<_> = Mmu::new(host, npt.mmu_config())?;
/// assert_eq!(mmu.host().frames.stats().in_use, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SvmHost<'a, 'r> {
    /// Table pages.
    pub frames: TableFrames<'a>,
    /// Guest RAM translation.
    pub translate: IdentityTranslate<'r>,
    /// TLB flush requests.
    pub tlb: AsidFlush,
}

impl<'a, 'r> SvmHost<'a, 'r> {
    /// The host over `frames` and `translate`, flushing as `features` allow.
    #[must_use]
    pub const fn new(
        frames: TableFrames<'a>,
        translate: IdentityTranslate<'r>,
        features: &NptFeatures,
    ) -> Self {
        SvmHost { frames, translate, tlb: AsidFlush::new(features.flush_one) }
    }
}

impl<'a> TableMemory for SvmHost<'a, '_> {
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

impl HostTranslate for SvmHost<'_, '_> {
    fn translate(&self, slot: &Memslot, gfn: Gfn, write: bool) -> Result<HostPage, HostFaultError> {
        self.translate.translate(slot, gfn, write)
    }
}

impl TlbFlush for SvmHost<'_, '_> {
    fn flush_all(&self) {
        self.tlb.flush_all();
    }
    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        self.tlb.flush_range(as_id, start, pages);
    }
}

impl MmuYield for SvmHost<'_, '_> {}

impl MmuEvents for SvmHost<'_, '_> {}

/// No external tables: no mirror roots.
impl ExternalTables for SvmHost<'_, '_> {}
