//! The memory type of a leaf (KVM's `vmx_get_mt_mask`, 6.15): device frames uncacheable; RAM
//! write-back, with EPT's "ignore guest PAT" bit unless a device in the VM does non-coherent DMA, when the
//! guest's PAT must be honoured so that the guest can map its DMA buffers uncached. NPT leaves carry no
//! memory type: the guest PAT combines with the host's, and KVM's SVM code sets nothing either.

use crate::host::{Host, HostMemory};
use crate::spte::MemType;
use crate::sync::Ordering;

use super::{ExclusiveMmu, Mmu};

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// The memory-type bits of a leaf mapping a frame of kind `memory`, for this MMU's format and the
    /// VM's non-coherent-DMA state ([`crate::spte::SpteFormat::memtype_bits`]).
    #[inline]
    pub(super) fn memtype_bits(&self, memory: HostMemory) -> u64 {
        match memory {
            // Relaxed: changed under the write lock, which then invalidates every root; read under the
            // read lock.
            HostMemory::Ram => self.ram_memtype.load(Ordering::Relaxed),
            HostMemory::Device => self.device_memtype,
        }
    }

    /// Whether the VM has a device doing non-coherent DMA (see [`ExclusiveMmu::set_noncoherent_dma`]).
    pub fn noncoherent_dma(&self) -> bool {
        self.noncoherent_dma.load(Ordering::Relaxed)
    }
}

impl<H: Host, R: lock_api::RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Records whether a device in the VM does non-coherent DMA (KVM's
    /// `kvm_arch_register_noncoherent_dma` / `unregister`). RAM leaves then honour the guest PAT (EPT:
    /// write-back without IPAT) or, when it goes away, ignore it again (write-back with IPAT). A change
    /// invalidates every root, as KVM zaps every SPTE, so that no leaf keeps the old type; the caller owes
    /// the returned flush and the zap of the invalidated roots (see [`ExclusiveMmu::invalidate_roots`]).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
    /// use tdp_core::spte::EptBits;
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// let read = Fault { as_id: AsId(0), gpa: Gpa(0x1000), access: AccessKind::Read,
    ///                    kind: FaultKind::Violation { present: false } };
    /// let ipat_of = |mmu: &Mmu<MockHost>, vcpu: &mut VcpuMmu| {
    ///     mmu.load_root(vcpu, AsId(0)).unwrap();
    ///     assert_eq!(mmu.handle_fault(vcpu, read, &mut ()), Ok(FaultOutcome::Fixed));
    ///     let (leaf, _) = mmu.lookup(vcpu.root().unwrap(), Gfn(1)).unwrap();
    ///     leaf.0 & EptBits::IGNORE_PAT.bits() != 0
    /// };
    /// assert!(ipat_of(&mmu, &mut vcpu), "coherent RAM: write-back, guest PAT ignored");
    /// mmu.write().set_noncoherent_dma(true).run(mmu.host());
    /// mmu.read().zap_invalidated_roots();
    /// assert!(!ipat_of(&mmu, &mut vcpu), "non-coherent DMA: the guest PAT is honoured");
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    pub fn set_noncoherent_dma(&mut self, noncoherent: bool) -> crate::flush::Flush {
        if self.mmu.noncoherent_dma.swap(noncoherent, Ordering::Relaxed) == noncoherent {
            return crate::flush::Flush::none();
        }
        self.mmu.ram_memtype.store(ram_bits(self.mmu.format(), noncoherent), Ordering::Relaxed);
        self.invalidate_roots(None)
    }
}

/// The memory-type bits of a RAM leaf: write-back, the guest PAT ignored unless a device does
/// non-coherent DMA.
pub(super) fn ram_bits(fmt: &crate::spte::SpteFormat, noncoherent_dma: bool) -> u64 {
    fmt.memtype_bits(MemType::WriteBack, !noncoherent_dma)
}

/// The memory-type bits of a device leaf: uncacheable, the guest PAT honoured (it can only make the type
/// stronger).
pub(super) fn device_bits(fmt: &crate::spte::SpteFormat) -> u64 {
    fmt.memtype_bits(MemType::Uncacheable, false)
}
