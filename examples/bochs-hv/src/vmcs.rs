//! What the CPU offers (read from the VMX capability MSRs) and the VMCS for the scenario's guest: a
//! 64-bit guest with its own page tables under EPT (A/D and PML when the CPU has them), every guest
//! exception and HLT exiting, host state returning to `vmx::vmx_exit` on the kernel's stack.
//!
//! Control values follow the SDM's algorithm (Vol. 3D, appendix "VMX Capability Reporting Facility"):
//! a control is `(wanted | allowed-0) & allowed-1`, read from the TRUE_* MSRs when IA32_VMX_BASIC bit
//! 55 says they exist; a wanted bit the CPU cannot set is an error naming the MSR.

use crate::raw::{self, VmxFail, field, msr};
use crate::{boot, cpu, guest, idt, vmx};

/// What the run uses of the CPU.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// EPT accessed/dirty flags (IA32_VMX_EPT_VPID_CAP bit 21).
    pub ept_ad: bool,
    /// Page-modification logging (secondary control bit 17).
    pub pml: bool,
    /// The TRUE_* control MSRs exist.
    true_controls: bool,
}

impl Features {
    /// The names of the features used, for the result line.
    pub fn names(&self) -> &'static [&'static str] {
        match (self.ept_ad, self.pml) {
            (true, true) => &["vmx", "ept", "ept_4level", "ept_ad", "pml", "ept_2m", "invept_single"],
            (true, false) => &["vmx", "ept", "ept_4level", "ept_ad", "ept_2m", "invept_single"],
            _ => &["vmx", "ept", "ept_4level", "ept_2m", "invept_single"],
        }
    }
}

/// Why the guest cannot be set up.
#[derive(Clone, Copy, Debug, thiserror::Error)]
pub enum SetupError {
    /// A capability the run needs is missing.
    #[error("the CPU lacks {0}")]
    Missing(&'static str),
    /// A control bit cannot be set.
    #[error("MSR {msr:#x} does not allow controls {wanted:#x} (allowed-1 {allowed1:#x})")]
    Control {
        /// The capability MSR.
        msr: u32,
        /// What was wanted.
        wanted: u32,
        /// Its allowed-1 half.
        allowed1: u32,
    },
    /// A VMWRITE failed.
    #[error(transparent)]
    Vmx(#[from] VmxFail),
}

/// Reads the capabilities the run depends on.
///
/// # Errors
/// [`SetupError::Missing`] when secondary controls, EPT, 4-level walks, WB EPT memory, 2 MiB leaves or
/// single-context INVEPT are missing.
pub fn detect() -> Result<Features, SetupError> {
    let basic = raw::rdmsr(msr::IA32_VMX_BASIC);
    let primary = raw::rdmsr(msr::IA32_VMX_PROCBASED_CTLS);
    if primary >> 63 == 0 {
        return Err(SetupError::Missing("secondary processor-based controls"));
    }
    let secondary = raw::rdmsr(msr::IA32_VMX_PROCBASED_CTLS2) >> 32;
    if secondary & (1 << 1) == 0 {
        return Err(SetupError::Missing("EPT"));
    }
    let cap = raw::rdmsr(msr::IA32_VMX_EPT_VPID_CAP);
    for (bit, what) in [
        (6, "4-level EPT"),
        (14, "write-back EPT structures"),
        (16, "2 MiB EPT pages"),
        (20, "INVEPT"),
        (25, "single-context INVEPT"),
    ] {
        if cap & (1 << bit) == 0 {
            return Err(SetupError::Missing(what));
        }
    }
    let ept_ad = cap & (1 << 21) != 0;
    Ok(Features { ept_ad, pml: ept_ad && secondary & (1 << 17) != 0, true_controls: basic & (1 << 55) != 0 })
}

fn adjust(msr: u32, wanted: u32) -> Result<u64, SetupError> {
    let caps = raw::rdmsr(msr);
    let (allowed0, allowed1) = (caps as u32, (caps >> 32) as u32);
    let value = (wanted | allowed0) & allowed1;
    if value & wanted != wanted {
        return Err(SetupError::Control { msr, wanted, allowed1 });
    }
    Ok(u64::from(value))
}

/// The EPTP for a 4-level tree at `root_pfn`: write-back (6), walk length 4 - 1 in bits 5:3, A/D enable
/// in bit 6 (Intel SDM Vol. 3C, "Extended-Page-Table Pointer (EPTP)").
pub fn eptp(root_pfn: u64, ad: bool) -> u64 {
    (root_pfn << 12) | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
}

/// Segment register order of the guest-state encodings (ES, CS, SS, DS, FS, GS, LDTR, TR): each field
/// kind is `base + 2 * index`.
const CS: u32 = 1;
const LDTR: u32 = 6;
const TR: u32 = 7;

/// Writes every control, guest-state and host-state field.
///
/// # Errors
/// [`SetupError`]: a control the CPU does not allow, or a failed VMWRITE.
pub fn setup(f: &Features, eptp: u64, pml_log: u64, entry: u64) -> Result<(), SetupError> {
    let w = raw::vmwrite;
    let (pin, proc1, exit, entry_msr) = if f.true_controls {
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
    w(field::PIN_BASED, adjust(pin, 0)?)?;
    // HLT exiting (7), activate secondary controls (31).
    w(field::PRIMARY_PROC, adjust(proc1, (1 << 7) | (1 << 31))?)?;
    // Enable EPT (1), enable PML (17).
    let secondary = (1 << 1) | if f.pml { 1 << 17 } else { 0 };
    w(field::SECONDARY_PROC, adjust(msr::IA32_VMX_PROCBASED_CTLS2, secondary)?)?;
    // Host address-space size (9), save IA32_EFER (20), load IA32_EFER (21).
    w(field::EXIT_CONTROLS, adjust(exit, (1 << 9) | (1 << 20) | (1 << 21))?)?;
    // IA-32e mode guest (9), load IA32_EFER (15).
    w(field::ENTRY_CONTROLS, adjust(entry_msr, (1 << 9) | (1 << 15))?)?;
    w(field::EXCEPTION_BITMAP, 0xffff_ffff)?;
    w(field::EPT_POINTER, eptp)?;
    if f.pml {
        w(field::PML_ADDRESS, pml_log)?;
        w(field::GUEST_PML_INDEX, crate::ring::PML_EMPTY_INDEX)?;
    }
    w(field::VMCS_LINK_POINTER, u64::MAX)?;

    // Guest: 64-bit, paging with its own tables, flat segments.
    let fixed = |v: u64, f0, f1| (v | raw::rdmsr(f0)) & raw::rdmsr(f1);
    w(field::GUEST_CR0, fixed(0x8000_0031, msr::IA32_VMX_CR0_FIXED0, msr::IA32_VMX_CR0_FIXED1))?;
    w(field::GUEST_CR3, guest::PML4)?;
    w(field::GUEST_CR4, fixed(0x20, msr::IA32_VMX_CR4_FIXED0, msr::IA32_VMX_CR4_FIXED1))?;
    w(field::GUEST_IA32_EFER, 0x500)?;
    for seg in 0..8 {
        let (sel, limit, ar) = match seg {
            CS => (u64::from(boot::KERNEL_CS), 0xffff_ffff, 0xa09b),
            LDTR => (0, 0, 0x1_0000),
            TR => (u64::from(boot::KERNEL_TR), 0x67, 0x8b),
            _ => (u64::from(boot::KERNEL_DS), 0xffff_ffff, 0xc093),
        };
        w(field::GUEST_ES_SELECTOR + 2 * seg, sel)?;
        w(field::GUEST_ES_LIMIT + 2 * seg, limit)?;
        w(field::GUEST_ES_AR + 2 * seg, ar)?;
        w(field::GUEST_ES_BASE + 2 * seg, 0)?;
    }
    w(field::GUEST_GDTR_BASE, 0)?;
    w(field::GUEST_GDTR_LIMIT, 0xffff)?;
    w(field::GUEST_IDTR_BASE, 0)?;
    w(field::GUEST_IDTR_LIMIT, 0xffff)?;
    w(field::GUEST_DR7, 0x400)?;
    w(field::GUEST_RSP, guest::STACK_TOP)?;
    w(field::GUEST_RIP, entry)?;
    w(field::GUEST_RFLAGS, 0x2)?;
    w(field::GUEST_INTERRUPTIBILITY, 0)?;
    w(field::GUEST_ACTIVITY_STATE, 0)?;

    // Host: this kernel, resuming at `vmx_exit`.
    w(field::HOST_CR0, cpu::cr0())?;
    w(field::HOST_CR3, cpu::cr3())?;
    w(field::HOST_CR4, cpu::cr4())?;
    w(field::HOST_CS_SELECTOR, u64::from(boot::KERNEL_CS))?;
    for sel in [
        field::HOST_ES_SELECTOR,
        field::HOST_SS_SELECTOR,
        field::HOST_DS_SELECTOR,
        field::HOST_FS_SELECTOR,
        field::HOST_GS_SELECTOR,
    ] {
        w(sel, u64::from(boot::KERNEL_DS))?;
    }
    w(field::HOST_TR_SELECTOR, u64::from(boot::KERNEL_TR))?;
    w(field::HOST_FS_BASE, 0)?;
    w(field::HOST_GS_BASE, 0)?;
    w(field::HOST_TR_BASE, boot::tss_base())?;
    w(field::HOST_GDTR_BASE, boot::gdt_base())?;
    w(field::HOST_IDTR_BASE, idt::base())?;
    w(field::HOST_IA32_EFER, raw::rdmsr(cpu::IA32_EFER))?;
    w(field::HOST_RIP, vmx::exit_entry())?;
    Ok(())
}
