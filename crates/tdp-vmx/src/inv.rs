//! INVEPT and INVVPID: the choice of type from the CPU's support, and wrappers that issue them through
//! the instruction layer. Their descriptors and types are the instructions' operands, defined with the
//! instructions in [`crate::instr`] and re-exported here.
//!
//! Source: Intel SDM Vol. 3C, chapter "VMX Instruction Reference", sections "INVEPT—Invalidate
//! Translations Derived from EPT" and "INVVPID—Invalidate Translations Based on VPID" (descriptor
//! figures and type tables), edition 325462-080, June 2023.

use crate::caps::{EptFeatures, InveptSupport};
use crate::eptp::Eptp;
pub use crate::instr::{InveptDescriptor, InveptKind, InvvpidDescriptor, InvvpidKind};
use crate::instr::{VmxError, VmxInstructions};

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
/// ```
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx, Op};
/// use tdp_vmx::inv::{invept_all, InveptKind};
/// let vmx = FakeVmx::with_msrs(bochs::TIGERLAKE);
/// invept_all(&vmx, &VmxCapabilities::read(&vmx).ept_features()?)?;
/// assert_eq!(vmx.ops(), [Op::Invept { kind: InveptKind::AllContext, eptp: 0 }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
/// ```
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx, Op};
/// use tdp_vmx::inv::{invvpid_context, InvError, InvvpidKind};
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SANDY_BRIDGE_2600K);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// assert_eq!(invvpid_context(&vmx, &ept, 1)?, InvvpidKind::SingleContext);
/// assert_eq!(invvpid_context(&vmx, &ept, 0), Err(InvError::VpidZero));
/// assert_eq!(vmx.ops(), [Op::Invvpid { kind: InvvpidKind::SingleContext, vpid: 1, linear_address: 0 }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
/// ```
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx, Op};
/// use tdp_vmx::inv::{invvpid_address, InvvpidKind};
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// assert_eq!(invvpid_address(&vmx, &ept, 3, 0x7000_1000)?, InvvpidKind::IndividualAddress);
/// assert_eq!(vmx.ops(), [Op::Invvpid { kind: InvvpidKind::IndividualAddress, vpid: 3, linear_address: 0x7000_1000 }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::{EptVpidCap, VmxCapabilities};
    use crate::fake::{FakeVmx, Op, bochs};
    use crate::instr::VmFail;
    use crate::vmcs::VmInstructionError;
    use tdp_core::addr::Pfn;
    use tdp_core::mmu::MmuConfig;

    fn with_cap(cap: u64) -> (FakeVmx, EptFeatures) {
        let mut msrs = bochs::COREI7_SKYLAKE_X.to_vec();
        for m in &mut msrs {
            if m.0 == crate::msr::IA32_VMX_EPT_VPID_CAP {
                m.1 = cap;
            }
        }
        let vmx = FakeVmx::with_msrs(&msrs);
        let ept = VmxCapabilities::read(&vmx).ept_features().unwrap();
        (vmx, ept)
    }

    const SKY: u64 = 0x0000_0f01_0633_4141;

    #[test]
    fn descriptors_have_the_sdm_layout() {
        let d = InvvpidDescriptor::new(0xbeef, 0x1234_5000);
        // VPID in the low qword, the linear address in the high one.
        assert_eq!((d.vpid, d.linear_address), (0xbeef, 0x1234_5000));
        assert_eq!(core::mem::align_of::<InveptDescriptor>(), 16);
        let eptp =
            Eptp::build(crate::caps::VmxMemoryType::WriteBack, crate::caps::WalkLength::Four, true, Pfn(5))
                .unwrap();
        assert_eq!(InveptDescriptor::new(eptp), InveptDescriptor { eptp: eptp.raw(), reserved: 0 });
    }

    #[test]
    fn invept_context_uses_all_context_when_single_is_missing() {
        let (vmx, ept) = with_cap(SKY & !EptVpidCap::INVEPT_SINGLE_CONTEXT.bits());
        let eptp = Eptp::new(&ept, &MmuConfig::EPT, Pfn(9)).unwrap();
        assert_eq!(invept_context(&vmx, &ept, eptp), Ok(InveptKind::AllContext));
        assert_eq!(vmx.ops(), [Op::Invept { kind: InveptKind::AllContext, eptp: eptp.raw() }]);
        // And all-context is refused where the CPU lacks it, before any instruction runs.
        let (vmx, ept) = with_cap(SKY & !EptVpidCap::INVEPT_ALL_CONTEXT.bits());
        assert_eq!(invept_all(&vmx, &ept), Err(InvError::Unsupported { what: "all-context INVEPT" }));
        assert_eq!(vmx.ops(), []);
    }

    #[test]
    fn a_failing_invept_is_reported_with_the_instruction() {
        let (vmx, ept) = with_cap(SKY);
        let eptp = Eptp::new(&ept, &MmuConfig::EPT, Pfn(9)).unwrap();
        vmx.fail_next_invept(VmFail::Valid(VmInstructionError::INVALID_INVEPT_INVVPID_OPERAND));
        let err = invept_context(&vmx, &ept, eptp).unwrap_err();
        assert_eq!(
            alloc::string::ToString::to_string(&err),
            alloc::format!(
                "INVEPT SingleContext of EPTP {:#x} failed: VMfailValid: VM-instruction error 28: invalid \
                 operand to INVEPT/INVVPID",
                eptp.raw()
            )
        );
    }

    #[test]
    fn invvpid_falls_back_and_refuses_what_the_cpu_lacks() {
        let (vmx, ept) = with_cap(SKY & !EptVpidCap::INVVPID_INDIVIDUAL_ADDRESS.bits());
        assert_eq!(invvpid_address(&vmx, &ept, 2, 0x1000), Ok(InvvpidKind::SingleContext));
        let (vmx, ept) = with_cap(SKY & !EptVpidCap::INVVPID_SINGLE_CONTEXT.bits());
        assert_eq!(invvpid_context(&vmx, &ept, 2), Ok(InvvpidKind::AllContext));
        assert_eq!(vmx.ops(), [Op::Invvpid { kind: InvvpidKind::AllContext, vpid: 2, linear_address: 0 }]);
        let (vmx, ept) = with_cap(SKY & !(0xf << 40));
        assert_eq!(
            invvpid_context(&vmx, &ept, 2),
            Err(InvError::Unsupported { what: "single- or all-context INVVPID" })
        );
        let (_, ept) = with_cap(SKY & !EptVpidCap::INVVPID.bits());
        assert_eq!(ept.vpid, None);
        assert_eq!(invvpid_context(&vmx, &ept, 2), Err(InvError::Unsupported { what: "INVVPID" }));
        assert_eq!(invvpid_address(&vmx, &ept, 0, 0), Err(InvError::VpidZero));
    }

    #[test]
    fn the_fake_rejects_operands_the_cpu_rejects() {
        let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
        let bad = |r: Result<(), crate::instr::VmxError>| {
            r.map_err(|e| e.fail) == Err(VmFail::Valid(VmInstructionError::INVALID_INVEPT_INVVPID_OPERAND))
        };
        assert!(bad(vmx.invept(
            InveptKind::SingleContext,
            &InveptDescriptor { eptp: 0x1000 | 6 | 3 << 3, reserved: 1 }
        )));
        assert!(bad(vmx.invept(InveptKind::SingleContext, &InveptDescriptor { eptp: 0x1007, reserved: 0 })));
        assert!(bad(vmx.invvpid(InvvpidKind::SingleContext, &InvvpidDescriptor::new(0, 0))));
        assert!(bad(
            vmx.invvpid(InvvpidKind::AllContext, &InvvpidDescriptor { vpid: 1 << 16, linear_address: 0 })
        ));
        assert!(vmx.invvpid(InvvpidKind::AllContext, &InvvpidDescriptor::new(0, 0)).is_ok());
        assert_eq!(vmx.ops().len(), 1);
    }
}
