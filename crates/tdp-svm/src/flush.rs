//! [`AsidFlush`]: `tdp-core`'s [`TlbFlush`] for SVM, as a flush request each vCPU honours at its next
//! VMRUN through TLB_CONTROL.
//!
//! SVM has no instruction that flushes a guest's nested translations from the host (INVLPGA takes a
//! guest-virtual address and one ASID; there is no INVEPT). A hypervisor flushes a guest's ASID by
//! setting TLB_CONTROL in the VMCB before VMRUN (Linux's `svm_flush_tlb_asid` sets
//! `TLB_CONTROL_FLUSH_ASID`, or takes a new ASID where flush-by-ASID is missing). So the MMU's flush
//! bumps a generation number, and each vCPU compares the generation it last flushed at with the current
//! one on entry ([`crate::vcpu::SvmVcpu::prepare_entry`]): if it moved, that VMRUN carries the flush
//! value the CPU supports ([`crate::asid::TlbControl::for_one_guest`]). A vCPU is outside guest mode
//! whenever its own exit path runs the MMU, so on one CPU the flush reaches the guest before it runs
//! again. With vCPUs on several CPUs, one running in guest mode keeps its cached translations until it
//! exits: the hypervisor must kick it out (an IPI) after a flush, as KVM's `kvm_flush_remote_tlbs` does
//! with `KVM_REQ_TLB_FLUSH`; [`AsidFlush::generation`] is what the kicked vCPU then checks.
//!
//! INVLPGA has no nested-paging form either, so a range flush flushes the whole ASID.

use core::sync::atomic::{AtomicU64, Ordering};

use tdp_core::addr::{AsId, Gfn};
use tdp_core::host::TlbFlush;

use crate::asid::TlbControl;

/// Counters of an [`AsidFlush`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlushStats {
    /// Flushes the MMU asked for (whole and range).
    pub requests: u64,
    /// VMRUNs that carried a flush because of a request (or a new root).
    pub entry_flushes: u64,
}

/// VM-wide TLB flush requests, honoured by each vCPU at its next VMRUN.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn};
/// use tdp_core::host::TlbFlush;
/// use tdp_svm::asid::{AsidAllocator, TlbControl};
/// use tdp_svm::flush::AsidFlush;
/// use tdp_svm::vcpu::SvmVcpu;
/// use tdp_svm::vmcb::Vmcb;
/// let flush = AsidFlush::new(TlbControl::FlushAsid);
/// let mut vcpu = SvmVcpu::new(AsidAllocator::new(16).alloc()?, &flush);
/// let mut vmcb = Vmcb::new();
/// vcpu.prepare_entry(&mut vmcb, &flush);
/// assert_eq!(vmcb.control.tlb_control, TlbControl::DoNothing.raw()); // nothing asked yet
/// flush.flush_range(AsId(0), Gfn(0x42), 1); // the MMU write-protected a page
/// vcpu.prepare_entry(&mut vmcb, &flush);
/// assert_eq!((vmcb.control.tlb_control, vmcb.control.guest_asid), (3, 1)); // this ASID, at this VMRUN
/// vcpu.prepare_entry(&mut vmcb, &flush);
/// assert_eq!(vmcb.control.tlb_control, 0); // once
/// assert_eq!(flush.stats().requests, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct AsidFlush {
    flush_one: TlbControl,
    generation: AtomicU64,
    entry_flushes: AtomicU64,
}

impl AsidFlush {
    /// A flusher whose requests flush with `flush_one` ([`crate::caps::NptFeatures::flush_one`]).
    #[must_use]
    pub const fn new(flush_one: TlbControl) -> AsidFlush {
        AsidFlush { flush_one, generation: AtomicU64::new(0), entry_flushes: AtomicU64::new(0) }
    }

    /// The TLB_CONTROL value a flush uses.
    #[must_use]
    pub const fn flush_one(&self) -> TlbControl {
        self.flush_one
    }

    /// The number of flushes requested so far. A vCPU that entered the guest at generation `g` has no
    /// stale translation once it re-enters at a generation at least as new as the one a flush returned.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> FlushStats {
        FlushStats { requests: self.generation(), entry_flushes: self.entry_flushes.load(Ordering::Relaxed) }
    }

    pub(crate) fn count_entry_flush(&self) {
        self.entry_flushes.fetch_add(1, Ordering::Relaxed);
    }

    fn request(&self) {
        // Release: a vCPU that sees the new generation also sees every SPTE store before the request.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl TlbFlush for AsidFlush {
    fn flush_all(&self) {
        self.request();
    }

    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        // No nested-paging range flush exists: flush the ASID whole.
        let _ = (as_id, start, pages);
        self.request();
    }
}
