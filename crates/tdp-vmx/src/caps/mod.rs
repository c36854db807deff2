//! VMX capability MSRs: reading them (only those that exist), decoding them, and choosing the EPT
//! options a hypervisor can use.
//!
//! [`VmxCapabilities::read`] reads IA32_VMX_BASIC, the four control MSRs (their TRUE_ variants when
//! BASIC bit 55 says they exist), IA32_VMX_PROCBASED_CTLS2 only when the primary controls allow
//! "activate secondary controls", IA32_VMX_EPT_VPID_CAP only when the secondary controls allow EPT or
//! VPID, and the CR0/CR4 fixed MSRs: on hardware reading an absent MSR raises #GP. Then
//! [`VmxCapabilities::ept_features`] picks walk length, A/D flags, page sizes, PML, INVEPT/INVVPID types
//! and the paging-structure memory type, or says clearly what is missing.
//!
//! Source: Intel SDM Vol. 3D, appendix "VMX Capability Reporting Facility" (sections "Basic VMX
//! Information", "VM-Execution Controls", "VMX-Fixed Bits in CR0", "VMX-Fixed Bits in CR4", "VPID and
//! EPT Capabilities"), edition 325462-080, June 2023.

mod basic;
mod controls;
mod ept_cap;
mod features;

pub use basic::{VmxBasic, VmxMemoryType};
pub use controls::{AllowedControls, ControlError, ControlKind, FixedBits, FixedBitsError};
pub use ept_cap::EptVpidCap;
pub use features::{CapsError, EptFeatures, InveptSupport, InvvpidSupport, WalkLength};

use crate::instr::VmxInstructions;
use crate::msr;
use crate::vmcs::{PrimaryControls, SecondaryControls};

/// Every VMX capability MSR the backend uses, decoded.
///
/// ```
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// let caps = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X));
/// assert_eq!((caps.basic.revision_id(), caps.basic.vmcs_size()), (0x2b, 4096));
/// assert!(caps.basic.has_true_controls());
/// // The control set that ran under Bochs (recipes/bochs-vmx.md): HLT exiting + secondary controls.
/// assert_eq!(caps.primary.adjust(0x8000_0080), Ok(0x8400_61f2));
/// let ept = caps.ept_features()?;
/// assert!(ept.accessed_dirty && ept.pml);
/// # Ok::<(), tdp_vmx::caps::CapsError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCapabilities {
    /// IA32_VMX_BASIC.
    pub basic: VmxBasic,
    /// Pin-based controls (from the TRUE_ MSR when it exists).
    pub pin: AllowedControls,
    /// Primary processor-based controls (TRUE_ when it exists).
    pub primary: AllowedControls,
    /// Secondary processor-based controls; [`AllowedControls::none`] when the CPU has none.
    pub secondary: AllowedControls,
    /// VM-exit controls (TRUE_ when it exists).
    pub exit: AllowedControls,
    /// VM-entry controls (TRUE_ when it exists).
    pub entry: AllowedControls,
    /// EPT and VPID capabilities; empty when the CPU has neither.
    pub ept_vpid: EptVpidCap,
    /// CR0 bits fixed in VMX operation.
    pub cr0: FixedBits,
    /// CR4 bits fixed in VMX operation.
    pub cr4: FixedBits,
}

impl VmxCapabilities {
    /// Reads the capability MSRs through `vmx`, skipping those the CPU says it does not have.
    ///
    /// The caller has checked CPUID.1:ECX.VMX (bit 5): without VMX, IA32_VMX_BASIC itself is absent.
    pub fn read(vmx: &impl VmxInstructions) -> VmxCapabilities {
        let basic = VmxBasic::from_raw(vmx.rdmsr(msr::IA32_VMX_BASIC));
        let (pin, proc, exit, entry) = if basic.has_true_controls() {
            (
                msr::IA32_VMX_TRUE_PINBASED_CTLS,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
                msr::IA32_VMX_TRUE_EXIT_CTLS,
                msr::IA32_VMX_TRUE_ENTRY_CTLS,
            )
        } else {
            (
                msr::IA32_VMX_PINBASED_CTLS,
                msr::IA32_VMX_PROCBASED_CTLS,
                msr::IA32_VMX_EXIT_CTLS,
                msr::IA32_VMX_ENTRY_CTLS,
            )
        };
        let primary = AllowedControls::from_msr(ControlKind::Primary, vmx.rdmsr(proc));
        let secondary = if primary.allows(PrimaryControls::ACTIVATE_SECONDARY_CONTROLS.bits()) {
            AllowedControls::from_msr(ControlKind::Secondary, vmx.rdmsr(msr::IA32_VMX_PROCBASED_CTLS2))
        } else {
            AllowedControls::none(ControlKind::Secondary)
        };
        let ept_or_vpid = SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID;
        let ept_vpid = if secondary.allowed1() & ept_or_vpid.bits() != 0 {
            EptVpidCap::from_bits_retain(vmx.rdmsr(msr::IA32_VMX_EPT_VPID_CAP))
        } else {
            EptVpidCap::empty()
        };
        VmxCapabilities {
            basic,
            pin: AllowedControls::from_msr(ControlKind::Pin, vmx.rdmsr(pin)),
            primary,
            secondary,
            exit: AllowedControls::from_msr(ControlKind::Exit, vmx.rdmsr(exit)),
            entry: AllowedControls::from_msr(ControlKind::Entry, vmx.rdmsr(entry)),
            ept_vpid,
            cr0: FixedBits::new(vmx.rdmsr(msr::IA32_VMX_CR0_FIXED0), vmx.rdmsr(msr::IA32_VMX_CR0_FIXED1)),
            cr4: FixedBits::new(vmx.rdmsr(msr::IA32_VMX_CR4_FIXED0), vmx.rdmsr(msr::IA32_VMX_CR4_FIXED1)),
        }
    }

    /// Checks IA32_FEATURE_CONTROL: locked with VMXON allowed outside SMX (Bochs reads 0x5).
    ///
    /// ```
    /// use tdp_vmx::caps::{CapsError, VmxCapabilities};
    /// assert_eq!(VmxCapabilities::check_feature_control(0x5), Ok(()));
    /// assert_eq!(VmxCapabilities::check_feature_control(0x1),
    ///            Err(CapsError::VmxonDisabled { feature_control: 0x1 }));
    /// ```
    ///
    /// # Errors
    /// [`CapsError::FeatureControlUnlocked`] when the lock bit is clear (firmware left it open: VMXON
    /// raises #GP until it is locked), [`CapsError::VmxonDisabled`] when VMXON outside SMX is off.
    pub const fn check_feature_control(feature_control: u64) -> Result<(), CapsError> {
        if feature_control & msr::FEATURE_CONTROL_LOCKED == 0 {
            return Err(CapsError::FeatureControlUnlocked { feature_control });
        }
        if feature_control & msr::FEATURE_CONTROL_VMXON_OUTSIDE_SMX == 0 {
            return Err(CapsError::VmxonDisabled { feature_control });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
