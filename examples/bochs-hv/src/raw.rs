//! VMREAD, VMWRITE, INVEPT and RDMSR as functions that report failure, plus the MSR numbers and VMCS
//! field encodings the hypervisor uses (Intel SDM Vol. 3D, appendix "Field Encoding in VMCS").

use core::arch::asm;

pub use crate::cpu::rdmsr;

/// A VMX instruction failed: which one, on what, and the VM-instruction error number when there is one.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("{op} of {operand:#x} failed (VM-instruction error {error:?})")]
pub struct VmxFail {
    /// The instruction.
    pub op: &'static str,
    /// The field or descriptor it was given.
    pub operand: u64,
    /// VM-instruction error (VMfailValid), `None` for VMfailInvalid.
    pub error: Option<u64>,
}

fn fail(op: &'static str, operand: u64, zf: bool) -> VmxFail {
    let error = if zf { vmread(field::VM_INSTRUCTION_ERROR).ok() } else { None };
    VmxFail { op, operand, error }
}

/// VMREAD of `field` from the current VMCS.
///
/// # Errors
/// [`VmxFail`] for an unsupported field or no current VMCS.
pub fn vmread(field: u32) -> Result<u64, VmxFail> {
    let (value, cf, zf): (u64, u8, u8);
    // SAFETY: VMREAD reads the current VMCS into a register; it touches no memory.
    unsafe {
        asm!("vmread {v}, {f}", "setc {c}", "setz {z}", f = in(reg) u64::from(field), v = out(reg) value,
            c = out(reg_byte) cf, z = out(reg_byte) zf, options(nostack, nomem));
    }
    if cf | zf != 0 {
        return Err(VmxFail { op: "VMREAD", operand: u64::from(field), error: None });
    }
    Ok(value)
}

/// VMWRITE of `value` to `field` of the current VMCS.
///
/// # Errors
/// [`VmxFail`] for an unsupported or read-only field.
pub fn vmwrite(field: u32, value: u64) -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMWRITE changes the current VMCS, which only the next VM entry reads.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {c}", "setz {z}", f = in(reg) u64::from(field), v = in(reg) value,
            c = out(reg_byte) cf, z = out(reg_byte) zf, options(nostack, nomem));
    }
    if cf | zf != 0 {
        return Err(fail("VMWRITE", u64::from(field), zf != 0));
    }
    Ok(())
}

/// INVEPT single-context (type 1) for `eptp`.
///
/// # Errors
/// [`VmxFail`] when the CPU refuses the type or the EPTP.
pub fn invept_single(eptp: u64) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVEPT only reads the 16-byte descriptor and drops cached EPT translations.
    unsafe {
        asm!("invept {t}, [{d}]", "setc {c}", "setz {z}", t = in(reg) 1u64, d = in(reg) &desc,
            c = out(reg_byte) cf, z = out(reg_byte) zf, options(nostack, readonly));
    }
    if cf | zf != 0 {
        return Err(fail("INVEPT", eptp, zf != 0));
    }
    Ok(())
}

/// MSR numbers (Intel SDM Vol. 4, "IA-32 Architectural MSRs").
pub mod msr {
    /// IA32_FEATURE_CONTROL.
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    /// Bit 0: locked.
    pub const FEATURE_CONTROL_LOCKED: u64 = 1;
    /// Bit 2: VMXON outside SMX.
    pub const FEATURE_CONTROL_VMXON_OUTSIDE_SMX: u64 = 4;
    /// IA32_VMX_BASIC.
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS.
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS.
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS.
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS.
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    /// IA32_VMX_CR0_FIXED0.
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1.
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0.
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1.
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_PROCBASED_CTLS2.
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    /// IA32_VMX_EPT_VPID_CAP.
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    /// IA32_VMX_TRUE_PINBASED_CTLS.
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    /// IA32_VMX_TRUE_PROCBASED_CTLS.
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    /// IA32_VMX_TRUE_EXIT_CTLS.
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    /// IA32_VMX_TRUE_ENTRY_CTLS.
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// VMCS field encodings.
#[allow(missing_docs)]
pub mod field {
    pub const GUEST_ES_SELECTOR: u32 = 0x0800;
    pub const GUEST_PML_INDEX: u32 = 0x0812;
    pub const HOST_ES_SELECTOR: u32 = 0x0c00;
    pub const HOST_CS_SELECTOR: u32 = 0x0c02;
    pub const HOST_SS_SELECTOR: u32 = 0x0c04;
    pub const HOST_DS_SELECTOR: u32 = 0x0c06;
    pub const HOST_FS_SELECTOR: u32 = 0x0c08;
    pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
    pub const HOST_TR_SELECTOR: u32 = 0x0c0c;
    pub const PML_ADDRESS: u32 = 0x200e;
    pub const EPT_POINTER: u32 = 0x201a;
    pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
    pub const VMCS_LINK_POINTER: u32 = 0x2800;
    pub const GUEST_IA32_EFER: u32 = 0x2806;
    pub const HOST_IA32_EFER: u32 = 0x2c02;
    pub const PIN_BASED: u32 = 0x4000;
    pub const PRIMARY_PROC: u32 = 0x4002;
    pub const EXCEPTION_BITMAP: u32 = 0x4004;
    pub const EXIT_CONTROLS: u32 = 0x400c;
    pub const ENTRY_CONTROLS: u32 = 0x4012;
    pub const SECONDARY_PROC: u32 = 0x401e;
    pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
    pub const EXIT_REASON: u32 = 0x4402;
    pub const EXIT_INTR_INFO: u32 = 0x4404;
    pub const EXIT_INSTRUCTION_LEN: u32 = 0x440c;
    pub const GUEST_ES_LIMIT: u32 = 0x4800;
    pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
    pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
    pub const GUEST_ES_AR: u32 = 0x4814;
    pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
    pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
    pub const EXIT_QUALIFICATION: u32 = 0x6400;
    pub const GUEST_CR0: u32 = 0x6800;
    pub const GUEST_CR3: u32 = 0x6802;
    pub const GUEST_CR4: u32 = 0x6804;
    pub const GUEST_ES_BASE: u32 = 0x6806;
    pub const GUEST_GDTR_BASE: u32 = 0x6816;
    pub const GUEST_IDTR_BASE: u32 = 0x6818;
    pub const GUEST_DR7: u32 = 0x681a;
    pub const GUEST_RSP: u32 = 0x681c;
    pub const GUEST_RIP: u32 = 0x681e;
    pub const GUEST_RFLAGS: u32 = 0x6820;
    pub const HOST_CR0: u32 = 0x6c00;
    pub const HOST_CR3: u32 = 0x6c02;
    pub const HOST_CR4: u32 = 0x6c04;
    pub const HOST_FS_BASE: u32 = 0x6c06;
    pub const HOST_GS_BASE: u32 = 0x6c08;
    pub const HOST_TR_BASE: u32 = 0x6c0a;
    pub const HOST_GDTR_BASE: u32 = 0x6c0c;
    pub const HOST_IDTR_BASE: u32 = 0x6c0e;
    pub const HOST_RIP: u32 = 0x6c16;
}
