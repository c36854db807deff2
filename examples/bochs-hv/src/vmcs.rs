//! The VMCS for the scenario's guest: a 64-bit guest with its own page tables under EPT, every guest
//! exception and HLT exiting, host state returning to `vmx::vmx_exit` on the kernel's stack.
//!
//! Control values come from `tdp_vmx::caps` (the SDM's algorithm: `(wanted | allowed-0) & allowed-1`
//! from the TRUE_* MSRs when IA32_VMX_BASIC bit 55 says they exist; a wanted bit the CPU cannot set is
//! an error naming the control word). PML is switched on afterwards by `tdp_vmx::pml::Pml::enable`.

use alloc::format;
use alloc::string::String;

use tdp_vmx::caps::VmxCapabilities;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::instr::VmxInstructions;
use tdp_vmx::vmcs::{EntryControls, ExitControls, PrimaryControls, SecondaryControls, VmcsField as F};

use crate::{boot, cpu, guest, idt, vmx};

/// Segment register order of the guest-state encodings (ES, CS, SS, DS, FS, GS, LDTR, TR): each field
/// kind is its ES encoding plus `2 * index`.
const CS: u32 = 1;
const LDTR: u32 = 6;
const TR: u32 = 7;

/// Guest CR0: PG (31), NE (5), ET (4), PE (0); guest CR4: PAE (5). VMX's fixed bits are added.
const GUEST_CR0: u64 = 0x8000_0031;
const GUEST_CR4: u64 = 0x20;
/// Guest IA32_EFER: LME (8) and LMA (10).
const GUEST_EFER: u64 = 0x500;

/// Writes every control, guest-state and host-state field of the current VMCS.
///
/// # Errors
/// A control the CPU does not allow, or a failed VMWRITE, described.
pub fn setup(
    vmx: &impl VmxInstructions,
    caps: &VmxCapabilities,
    eptp: Eptp,
    entry: u64,
) -> Result<(), String> {
    let w = |field: F, value: u64| vmx.vmwrite(field, value).map_err(|e| format!("{e}"));
    let ctl = |r: Result<u32, tdp_vmx::caps::ControlError>| r.map(u64::from).map_err(|e| format!("{e}"));
    w(F::PIN_BASED_VM_EXEC_CONTROL, ctl(caps.pin.adjust(0))?)?;
    let primary = PrimaryControls::HLT_EXITING | PrimaryControls::ACTIVATE_SECONDARY_CONTROLS;
    w(F::CPU_BASED_VM_EXEC_CONTROL, ctl(caps.primary.adjust(primary.bits()))?)?;
    w(F::SECONDARY_VM_EXEC_CONTROL, ctl(caps.secondary.adjust(SecondaryControls::ENABLE_EPT.bits()))?)?;
    let exit =
        ExitControls::HOST_ADDRESS_SPACE_SIZE | ExitControls::SAVE_IA32_EFER | ExitControls::LOAD_IA32_EFER;
    w(F::VM_EXIT_CONTROLS, ctl(caps.exit.adjust(exit.bits()))?)?;
    let entry_ctl = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER;
    w(F::VM_ENTRY_CONTROLS, ctl(caps.entry.adjust(entry_ctl.bits()))?)?;
    w(F::EXCEPTION_BITMAP, 0xffff_ffff)?;
    w(F::EPT_POINTER, eptp.raw())?;
    w(F::VMCS_LINK_POINTER, u64::MAX)?;

    // Guest: 64-bit, paging with its own tables, flat segments.
    w(F::GUEST_CR0, caps.cr0.adjust(GUEST_CR0))?;
    w(F::GUEST_CR3, guest::PML4)?;
    w(F::GUEST_CR4, caps.cr4.adjust(GUEST_CR4))?;
    w(F::GUEST_IA32_EFER, GUEST_EFER)?;
    for seg in 0..8 {
        let (sel, limit, ar) = match seg {
            CS => (u64::from(boot::KERNEL_CS), 0xffff_ffff, 0xa09b),
            LDTR => (0, 0, 0x1_0000),
            TR => (u64::from(boot::KERNEL_TR), 0x67, 0x8b),
            _ => (u64::from(boot::KERNEL_DS), 0xffff_ffff, 0xc093),
        };
        w(F(F::GUEST_ES_SELECTOR.0 + 2 * seg), sel)?;
        w(F(F::GUEST_ES_LIMIT.0 + 2 * seg), limit)?;
        w(F(F::GUEST_ES_AR_BYTES.0 + 2 * seg), ar)?;
        w(F(F::GUEST_ES_BASE.0 + 2 * seg), 0)?;
    }
    w(F::GUEST_GDTR_BASE, 0)?;
    w(F::GUEST_GDTR_LIMIT, 0xffff)?;
    w(F::GUEST_IDTR_BASE, 0)?;
    w(F::GUEST_IDTR_LIMIT, 0xffff)?;
    w(F::GUEST_DR7, 0x400)?;
    w(F::GUEST_RSP, guest::STACK_TOP)?;
    w(F::GUEST_RIP, entry)?;
    w(F::GUEST_RFLAGS, 0x2)?;
    w(F::GUEST_INTERRUPTIBILITY_INFO, 0)?;
    w(F::GUEST_ACTIVITY_STATE, 0)?;

    // Host: this kernel, resuming at `vmx_exit`.
    w(F::HOST_CR0, cpu::cr0())?;
    w(F::HOST_CR3, cpu::cr3())?;
    w(F::HOST_CR4, cpu::cr4())?;
    w(F::HOST_CS_SELECTOR, u64::from(boot::KERNEL_CS))?;
    for sel in [
        F::HOST_ES_SELECTOR,
        F::HOST_SS_SELECTOR,
        F::HOST_DS_SELECTOR,
        F::HOST_FS_SELECTOR,
        F::HOST_GS_SELECTOR,
    ] {
        w(sel, u64::from(boot::KERNEL_DS))?;
    }
    w(F::HOST_TR_SELECTOR, u64::from(boot::KERNEL_TR))?;
    w(F::HOST_FS_BASE, 0)?;
    w(F::HOST_GS_BASE, 0)?;
    w(F::HOST_TR_BASE, boot::tss_base())?;
    w(F::HOST_GDTR_BASE, boot::gdt_base())?;
    w(F::HOST_IDTR_BASE, idt::base())?;
    w(F::HOST_IA32_EFER, vmx.rdmsr(cpu::IA32_EFER))?;
    w(F::HOST_RIP, vmx::exit_entry())?;
    Ok(())
}

/// The names of the hardware features a run with `features` uses, for the result line.
pub fn feature_names(features: &tdp_vmx::caps::EptFeatures) -> &'static [&'static str] {
    match (features.accessed_dirty, features.pml) {
        (true, true) => &["vmx", "ept", "ept_4level", "ept_ad", "pml", "ept_2m", "invept_single"],
        (true, false) => &["vmx", "ept", "ept_4level", "ept_ad", "ept_2m", "invept_single"],
        _ => &["vmx", "ept", "ept_4level", "ept_2m", "invept_single"],
    }
}
