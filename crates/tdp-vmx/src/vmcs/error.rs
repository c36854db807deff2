//! VM-instruction error numbers: why a VMX instruction ended in VMfailValid.
//!
//! Source: Intel SDM Vol. 3C, section "VM Instruction Error Numbers", table "VM-Instruction Error
//! Numbers" (edition 325462-080, June 2023).

use core::fmt;

/// The value of the VM-instruction error field (VMCS 0x4400) after a VMfailValid.
///
/// ```
/// use tdp_vmx::vmcs::VmInstructionError;
/// let e = VmInstructionError::from_raw(8);
/// assert_eq!(e, VmInstructionError::INVALID_HOST_STATE);
/// assert_eq!(e.to_string(), "VM-instruction error 8: VM entry with invalid host-state field(s)");
/// assert_eq!(VmInstructionError::from_raw(99).description(), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct VmInstructionError(pub u32);

impl VmInstructionError {
    /// 7: VM entry with invalid control field(s).
    pub const INVALID_CONTROL: VmInstructionError = VmInstructionError(7);
    /// 8: VM entry with invalid host-state field(s) (e.g. host TR selector 0).
    pub const INVALID_HOST_STATE: VmInstructionError = VmInstructionError(8);
    /// 12: VMREAD/VMWRITE from/to an unsupported VMCS component.
    pub const UNSUPPORTED_COMPONENT: VmInstructionError = VmInstructionError(12);
    /// 13: VMWRITE to a read-only VMCS component.
    pub const WRITE_READ_ONLY: VmInstructionError = VmInstructionError(13);
    /// 28: invalid operand to INVEPT/INVVPID.
    pub const INVALID_INVEPT_INVVPID_OPERAND: VmInstructionError = VmInstructionError(28);

    /// Wraps a raw error number (any value: unknown numbers have no description).
    #[must_use]
    pub const fn from_raw(raw: u32) -> VmInstructionError {
        VmInstructionError(raw)
    }

    /// The SDM's description, or `None` for a number the table does not define.
    #[must_use]
    pub const fn description(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "invalid operand to INVEPT/INVVPID",
            _ => return None,
        })
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.description() {
            Some(d) => write!(f, "VM-instruction error {}: {d}", self.0),
            None => write!(f, "VM-instruction error {} (not defined by the SDM)", self.0),
        }
    }
}
