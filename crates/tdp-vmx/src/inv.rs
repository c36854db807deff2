//! INVEPT and INVVPID: descriptors, types, the choice of type from the CPU's support, and wrappers that
//! issue them through the instruction layer.
//!
//! Source: Intel SDM Vol. 3C, chapter "VMX Instruction Reference", sections "INVEPT—Invalidate
//! Translations Derived from EPT" and "INVVPID—Invalidate Translations Based on VPID" (descriptor
//! figures and type tables), edition 325462-080, June 2023.

use static_assertions::const_assert_eq;

use crate::caps::{EptFeatures, InveptSupport};
use crate::eptp::Eptp;
use crate::instr::{VmxError, VmxInstructions};

/// The INVEPT type (register operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum InveptKind {
    /// Type 1: translations derived from the descriptor's EPTP.
    SingleContext = 1,
    /// Type 2: translations derived from every EPTP (the descriptor is ignored).
    AllContext = 2,
}

/// The INVVPID type (register operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum InvvpidKind {
    /// Type 0: one linear address of one VPID.
    IndividualAddress = 0,
    /// Type 1: everything of one VPID.
    SingleContext = 1,
    /// Type 2: every VPID except 0.
    AllContext = 2,
    /// Type 3: one VPID, keeping global translations.
    SingleContextRetainingGlobals = 3,
}

/// The 128-bit INVEPT descriptor: the EPTP in bits 63:0, bits 127:64 reserved (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C, align(16))]
pub struct InveptDescriptor {
    /// The EPTP whose translations go (single-context).
    pub eptp: u64,
    /// Reserved, must be 0.
    pub reserved: u64,
}

/// The 128-bit INVVPID descriptor: VPID in bits 15:0, bits 63:16 reserved (0), the linear address in
/// bits 127:64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C, align(16))]
pub struct InvvpidDescriptor {
    /// The VPID in bits 15:0; bits 63:16 must be 0.
    pub vpid: u64,
    /// The linear address (individual-address type).
    pub linear_address: u64,
}

const_assert_eq!(core::mem::size_of::<InveptDescriptor>(), 16);
const_assert_eq!(core::mem::size_of::<InvvpidDescriptor>(), 16);
const_assert_eq!(core::mem::offset_of!(InvvpidDescriptor, linear_address), 8);

impl InveptDescriptor {
    /// The descriptor for `eptp`.
    #[must_use]
    pub const fn new(eptp: Eptp) -> InveptDescriptor {
        InveptDescriptor { eptp: eptp.raw(), reserved: 0 }
    }
}

impl InvvpidDescriptor {
    /// The descriptor for `vpid` and `linear_address`.
    #[must_use]
    pub const fn new(vpid: u16, linear_address: u64) -> InvvpidDescriptor {
        InvvpidDescriptor { vpid: vpid as u64, linear_address }
    }
}

impl InveptSupport {
    /// The type that flushes one EPTP's translations: single-context when the CPU has it, else
    /// all-context (which flushes more, never less). `None` when the CPU has neither, which
    /// [`crate::caps::VmxCapabilities::ept_features`] already refuses.
    ///
    /// ```
    /// use tdp_vmx::caps::InveptSupport;
    /// use tdp_vmx::inv::InveptKind;
    /// let both = InveptSupport { single_context: true, all_context: true };
    /// assert_eq!(both.for_one_context(), Some(InveptKind::SingleContext));
    /// let all_only = InveptSupport { single_context: false, all_context: true };
    /// assert_eq!(all_only.for_one_context(), Some(InveptKind::AllContext));
    /// ```
    #[must_use]
    pub const fn for_one_context(&self) -> Option<InveptKind> {
        if self.single_context {
            Some(InveptKind::SingleContext)
        } else if self.all_context {
            Some(InveptKind::AllContext)
        } else {
            None
        }
    }

    /// The type that flushes every EPTP's translations: all-context when the CPU has it, else `None`
    /// (the caller issues single-context for each EPTP it has loaded).
    #[must_use]
    pub const fn for_all_contexts(&self) -> Option<InveptKind> {
        if self.all_context { Some(InveptKind::AllContext) } else { None }
    }
}

/// An invalidation could not be issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum InvError {
    /// The CPU does not support the type needed.
    #[error("the CPU does not support {what}")]
    Unsupported {
        /// What was missing.
        what: &'static str,
    },
    /// INVVPID with VPID 0, which the SDM rejects for every type but all-context.
    #[error("INVVPID needs a VPID other than 0")]
    VpidZero,
    /// The instruction failed.
    #[error(transparent)]
    Instruction(#[from] VmxError),
}

/// Flushes the translations derived from `eptp` (single-context, or all-context when the CPU has only
/// that) and returns the type used.
///
/// ```
/// use tdp_core::addr::Pfn;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::eptp::Eptp;
/// use tdp_vmx::fake::{bochs, FakeVmx, Op};
/// use tdp_vmx::inv::{invept_context, InveptKind};
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let eptp = Eptp::new(&ept, &MmuConfig::EPT, Pfn(0x42))?;
/// assert_eq!(invept_context(&vmx, &ept, eptp)?, InveptKind::SingleContext);
/// assert_eq!(vmx.ops(), [Op::Invept { kind: InveptKind::SingleContext, eptp: eptp.raw() }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`InvError::Unsupported`] without INVEPT, [`InvError::Instruction`] when INVEPT fails.
pub fn invept_context(
    vmx: &impl VmxInstructions,
    features: &EptFeatures,
    eptp: Eptp,
) -> Result<InveptKind, InvError> {
    let kind = features.invept.for_one_context().ok_or(InvError::Unsupported { what: "INVEPT" })?;
    vmx.invept(kind, &InveptDescriptor::new(eptp))?;
    Ok(kind)
}

/// Flushes the translations of every EPTP (all-context INVEPT).
///
/// # Errors
/// [`InvError::Unsupported`] without all-context INVEPT, [`InvError::Instruction`] when it fails.
pub fn invept_all(vmx: &impl VmxInstructions, features: &EptFeatures) -> Result<(), InvError> {
    let kind =
        features.invept.for_all_contexts().ok_or(InvError::Unsupported { what: "all-context INVEPT" })?;
    vmx.invept(kind, &InveptDescriptor::default())?;
    Ok(())
}

/// Flushes the linear and combined translations of `vpid` (single-context INVVPID, or all-context when
/// the CPU has only that).
///
/// # Errors
/// [`InvError::VpidZero`], [`InvError::Unsupported`] without VPID support or a usable type,
/// [`InvError::Instruction`] when INVVPID fails.
pub fn invvpid_context(
    vmx: &impl VmxInstructions,
    features: &EptFeatures,
    vpid: u16,
) -> Result<InvvpidKind, InvError> {
    if vpid == 0 {
        return Err(InvError::VpidZero);
    }
    let support = features.vpid.ok_or(InvError::Unsupported { what: "INVVPID" })?;
    let kind = if support.single_context {
        InvvpidKind::SingleContext
    } else if support.all_context {
        InvvpidKind::AllContext
    } else {
        return Err(InvError::Unsupported { what: "single- or all-context INVVPID" });
    };
    vmx.invvpid(kind, &InvvpidDescriptor::new(vpid, 0))?;
    Ok(kind)
}

/// Flushes one linear address of `vpid` (individual-address INVVPID, or single-context when the CPU
/// lacks that type).
///
/// # Errors
/// As [`invvpid_context`].
pub fn invvpid_address(
    vmx: &impl VmxInstructions,
    features: &EptFeatures,
    vpid: u16,
    linear_address: u64,
) -> Result<InvvpidKind, InvError> {
    if vpid == 0 {
        return Err(InvError::VpidZero);
    }
    let support = features.vpid.ok_or(InvError::Unsupported { what: "INVVPID" })?;
    if !support.individual_address {
        return invvpid_context(vmx, features, vpid);
    }
    vmx.invvpid(InvvpidKind::IndividualAddress, &InvvpidDescriptor::new(vpid, linear_address))?;
    Ok(InvvpidKind::IndividualAddress)
}
