//! Entering VMX operation and the VM-entry/exit trampoline.
//!
//! VMXON needs CR0 and CR4 adjusted to the fixed bits of IA32_VMX_CR0/CR4_FIXED0/1 (with CR4.VMXE),
//! IA32_FEATURE_CONTROL locked with VMXON allowed, and a VMXON region holding the VMCS revision id
//! (Intel SDM Vol. 3C, section "Enabling and Entering VMX Operation"). The VMCS region is cleared and
//! made current the same way.
//!
//! [`enter`] saves the host's callee-saved registers, writes HOST_RSP, loads the guest's general
//! registers from a [`GuestRegs`] and executes VMLAUNCH or VMRESUME. A VM exit lands on `vmx_exit`
//! (HOST_RIP), which stores the guest's registers back and returns 0 from `vmx_enter` as if it had
//! returned normally; a failed VM entry returns 1 at once.

use core::arch::global_asm;

use alloc::format;
use alloc::string::String;

use tdp_vmx::caps::VmxCapabilities;
use tdp_vmx::instr::VmxInstructions;
use tdp_vmx::msr;
use tdp_vmx::raw::X86Vmx;

use tdp_vmx::vmcs::VmcsField;

use crate::boot::Page;
use crate::cpu;

/// The guest's general-purpose registers while it is not running (RSP and RIP live in the VMCS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8 to R15.
    pub r: [u64; 8],
}

global_asm!(
    ".section .text",
    ".globl vmx_enter",
    "vmx_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "jbe 9f",
    "cmp esi, 0",
    "mov rax, [rdi]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "jne 1f",
    "vmlaunch",
    "jmp 9f",
    "1:",
    "vmresume",
    "9:",
    "pop rdi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "mov eax, 1",
    "ret",
    ".globl vmx_exit",
    "vmx_exit:",
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi], rax",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 40], rax",
    "pop rdi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "xor eax, eax",
    "ret",
    host_rsp = const VmcsField::HOST_RSP.0,
);

unsafe extern "C" {
    fn vmx_enter(regs: *mut GuestRegs, launched: u32) -> u32;
    static vmx_exit: u8;
}

/// The address VM exits resume at (HOST_RIP).
pub fn exit_entry() -> u64 {
    core::ptr::addr_of!(vmx_exit) as u64
}

/// Runs the guest until its next VM exit. `launched` selects VMRESUME over VMLAUNCH.
///
/// # Errors
/// When VM entry itself failed (VMfailValid / VMfailInvalid): nothing ran.
pub fn enter(regs: &mut GuestRegs, launched: bool) -> Result<(), ()> {
    // SAFETY: a current, fully initialised VMCS whose host state returns to `vmx_exit` on this stack
    // (HOST_RSP is written here, HOST_RIP by `hv::setup_vmcs`); `vmx_exit` restores every callee-saved
    // register, so from Rust this is an ordinary call that reads and writes `*regs`.
    let failed = unsafe { vmx_enter(regs, u32::from(launched)) };
    if failed == 0 { Ok(()) } else { Err(()) }
}

/// Adjusts CR0 and CR4 to the fixed bits (with CR4.VMXE), executes VMXON on `vmxon_region`, then
/// VMCLEAR and VMPTRLD on `vmcs` ([`load_vmcs`]), so that `vmcs` is current.
///
/// # Errors
/// IA32_FEATURE_CONTROL forbidding VMXON, or the failing instruction with its VM-instruction error.
pub fn vmxon(vmx: &X86Vmx, caps: &VmxCapabilities, vmxon_region: &Page, vmcs: &Page) -> Result<(), String> {
    VmxCapabilities::check_feature_control(vmx.rdmsr(msr::IA32_FEATURE_CONTROL))
        .map_err(|e| format!("{e}"))?;
    // SAFETY: only bits VMX requires are set (CR0's fixed-0 bits: PE, NE, PG; CR4.VMXE and its fixed-0
    // bits) and none the kernel depends on is cleared (the fixed-1 MSRs allow every bit it uses).
    unsafe {
        cpu::set_cr0(caps.cr0.adjust(cpu::cr0()));
        cpu::set_cr4(caps.cr4.adjust(cpu::cr4() | CR4_VMXE));
    }
    let revision = u64::from(caps.basic.revision_id());
    // SAFETY: the page is the kernel's own static, not yet handed to the CPU.
    unsafe { (*vmxon_region.0.get())[0] = revision };
    // SAFETY: CPL 0, CR0/CR4 adjusted above with VMXE, IA32_FEATURE_CONTROL checked; the region is a
    // 4 KiB-aligned static that the kernel never touches again (the CPU owns it).
    unsafe { vmx.vmxon(vmxon_region.addr()).map_err(|e| format!("{e}"))? };
    load_vmcs(vmx, caps, vmcs)
}

/// VMCLEAR and VMPTRLD on `vmcs` (after writing its revision id), so that `vmcs` is this processor's
/// current VMCS, in its clear launch state.
///
/// # Errors
/// The failing instruction with its VM-instruction error.
pub fn load_vmcs(vmx: &X86Vmx, caps: &VmxCapabilities, vmcs: &Page) -> Result<(), String> {
    // SAFETY: the page is one of the kernel's own statics, used as no other VMCS and not yet handed to
    // the CPU (each VMCS page is loaded once).
    unsafe { (*vmcs.0.get())[0] = u64::from(caps.basic.revision_id()) };
    // SAFETY: this processor is in VMX operation (`vmxon` ran); the region is a 4 KiB-aligned static
    // distinct from every VMXON region and other VMCS, which the kernel never touches again.
    unsafe {
        vmx.vmclear(vmcs.addr()).map_err(|e| format!("{e}"))?;
        vmx.vmptrld(vmcs.addr()).map_err(|e| format!("{e}"))?;
    }
    Ok(())
}

/// CR4.VMXE (bit 13).
const CR4_VMXE: u64 = 1 << 13;
