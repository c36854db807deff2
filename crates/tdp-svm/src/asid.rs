//! ASIDs and TLB control: which address-space identifier a guest's translations are tagged with, and
//! the TLB_CONTROL value that flushes them at the next VMRUN.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), section
//! 15.16 "TLB Control": ASID 0 is the host's; the guest's ASID (VMCB 0x058) tags its TLB entries, so
//! no flush is needed on VMRUN or #VMEXIT; TLB_CONTROL (VMCB 0x05C) asks VMRUN to flush: 00h nothing,
//! 01h every entry of every ASID, 03h every entry of this guest's ASID, 07h this guest's non-global
//! entries. Values 03h and 07h need the FlushByAsid feature (CPUID 8000_000Ah EDX bit 6); without it
//! only 00h and 01h are valid. Nested-paging translations are tagged with the ASID too, so a change to
//! a guest's nested tables is flushed with its ASID (Linux's `svm_flush_tlb_asid`).

use crate::caps::SvmFeatureBits;

/// A TLB_CONTROL value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TlbControl {
    /// 00h: no flush.
    DoNothing = 0,
    /// 01h: flush every TLB entry, of every ASID.
    FlushAll = 1,
    /// 03h: flush this guest's entries (FlushByAsid only).
    FlushAsid = 3,
    /// 07h: flush this guest's non-global entries (FlushByAsid only).
    FlushAsidNonGlobal = 7,
}

impl TlbControl {
    /// The value that flushes one guest's translations on a CPU with `features`: 03h with
    /// flush-by-ASID, else 01h (which flushes more, never less).
    ///
    /// ```
    /// use tdp_svm::asid::TlbControl;
    /// use tdp_svm::caps::SvmFeatureBits;
    /// assert_eq!(TlbControl::for_one_guest(SvmFeatureBits::FLUSH_BY_ASID), TlbControl::FlushAsid);
    /// assert_eq!(TlbControl::for_one_guest(SvmFeatureBits::NESTED_PAGING), TlbControl::FlushAll);
    /// ```
    #[must_use]
    pub const fn for_one_guest(features: SvmFeatureBits) -> TlbControl {
        if features.contains(SvmFeatureBits::FLUSH_BY_ASID) {
            TlbControl::FlushAsid
        } else {
            TlbControl::FlushAll
        }
    }

    /// The raw byte for the VMCB.
    #[must_use]
    pub const fn raw(self) -> u8 {
        self as u8
    }

    /// Decodes a raw byte (`None` for values the APM does not define).
    #[must_use]
    pub const fn from_raw(raw: u8) -> Option<TlbControl> {
        match raw {
            0 => Some(TlbControl::DoNothing),
            1 => Some(TlbControl::FlushAll),
            3 => Some(TlbControl::FlushAsid),
            7 => Some(TlbControl::FlushAsidNonGlobal),
            _ => None,
        }
    }

    /// Whether a CPU with `features` accepts this value.
    #[must_use]
    pub const fn supported(self, features: SvmFeatureBits) -> bool {
        match self {
            TlbControl::DoNothing | TlbControl::FlushAll => true,
            TlbControl::FlushAsid | TlbControl::FlushAsidNonGlobal => {
                features.contains(SvmFeatureBits::FLUSH_BY_ASID)
            }
        }
    }
}

/// A guest ASID: 1 to (number of ASIDs - 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Asid(u32);

impl Asid {
    /// The raw value for the VMCB.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// No ASID is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("all {asids} ASIDs are in use (ASID 0 is the host's)")]
pub struct AsidsExhausted {
    /// The CPU's number of ASIDs.
    pub asids: u32,
}

/// Hands out guest ASIDs, one per vCPU (Linux gives each vCPU of a VM its own ASID per physical CPU;
/// with one VM per hypervisor here, one per vCPU is enough). Freed ASIDs are not reused: a freed ASID
/// may still tag translations, and handing it out again needs a flush of it first, which the allocator
/// cannot issue; a hypervisor that runs out flushes all (TLB_CONTROL 01h) and calls
/// [`AsidAllocator::reset`].
///
/// ```
/// use tdp_svm::asid::{AsidAllocator, AsidsExhausted};
/// let mut asids = AsidAllocator::new(3); // ASIDs 1 and 2 for guests
/// assert_eq!(asids.alloc().map(|a| a.raw()), Ok(1));
/// assert_eq!(asids.alloc().map(|a| a.raw()), Ok(2));
/// assert_eq!(asids.alloc(), Err(AsidsExhausted { asids: 3 }));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsidAllocator {
    asids: u32,
    next: u32,
}

impl AsidAllocator {
    /// An allocator over a CPU with `asids` ASIDs ([`crate::caps::NptFeatures::asids`]).
    #[must_use]
    pub const fn new(asids: u32) -> AsidAllocator {
        AsidAllocator { asids, next: 1 }
    }

    /// The next unused ASID.
    ///
    /// # Errors
    /// [`AsidsExhausted`] when every guest ASID was handed out since the last reset.
    pub fn alloc(&mut self) -> Result<Asid, AsidsExhausted> {
        if self.next >= self.asids {
            return Err(AsidsExhausted { asids: self.asids });
        }
        let asid = Asid(self.next);
        self.next += 1;
        Ok(asid)
    }

    /// Makes every ASID available again. Only after a VMRUN with TLB_CONTROL 01h (flush all) on every
    /// CPU, as no ASID handed out before may tag translations any more.
    pub fn reset(&mut self) {
        self.next = 1;
    }
}
