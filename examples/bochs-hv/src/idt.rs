//! The hypervisor's own exception handlers: every CPU exception in the kernel is fatal, so each vector's
//! stub passes its number and the stack pointer to [`exception`], which prints what happened as a
//! `TDP-PANIC` line and shuts Bochs down, instead of the triple fault (a silent reset) an empty IDT gives.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use crate::boot::KERNEL_CS;

global_asm!(
    ".section .text",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "isr_\\n:",
    "mov edi, \\n",
    "mov rsi, rsp",
    "and rsp, -16",
    "call {handler}",
    ".endr",
    ".section .rodata",
    ".balign 8",
    ".globl ISR_TABLE",
    "ISR_TABLE:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad isr_\\n",
    ".endr",
    ".section .text",
    handler = sym exception,
);

unsafe extern "C" {
    /// The 32 stub addresses, in vector order.
    static ISR_TABLE: [u64; 32];
}

/// The vectors that push an error code (Intel SDM Vol. 3A, table "Protected-Mode Exceptions and
/// Interrupts").
const HAS_ERROR_CODE: u32 = (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 17);

extern "C" fn exception(vector: u32, frame: *const u64) -> ! {
    let (code, at) = if HAS_ERROR_CODE & (1 << vector) != 0 { (Some(0), 1) } else { (None, 0) };
    // SAFETY: `frame` is the stack pointer at the stub, where the CPU pushed the (optional) error code,
    // RIP, CS, RFLAGS, RSP and SS.
    let (error, rip) = unsafe { (code.map(|_| *frame), *frame.add(at)) };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::println!("TDP-PANIC exception {vector} at rip {rip:#x}, error code {error:?}, cr2 {cr2:#x}");
    crate::rt::shutdown()
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 64]>);
// SAFETY: written once by `init` before `lidt`, then only read by the CPU.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([0; 64]));

#[repr(C, packed)]
struct IdtPtr {
    limit: u16,
    base: u64,
}

/// Fills the IDT with the 32 exception stubs (64-bit interrupt gates, DPL 0) and loads it.
pub fn init() {
    // SAFETY: `ISR_TABLE` is 32 initialised addresses in .rodata, defined in the assembly above.
    let stubs = unsafe { &*core::ptr::addr_of!(ISR_TABLE) };
    // SAFETY: nothing else uses the IDT before `lidt` below loads it.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, &addr) in stubs.iter().enumerate() {
        idt[2 * vector] =
            (addr & 0xffff) | (u64::from(KERNEL_CS) << 16) | (0x8e << 40) | (((addr >> 16) & 0xffff) << 48);
        idt[2 * vector + 1] = addr >> 32;
    }
    let ptr = IdtPtr { limit: (size_of::<[u64; 64]>() - 1) as u16, base: IDT.0.get() as u64 };
    // SAFETY: the IDT holds valid gates for vectors 0-31 and lives for the whole run.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// The IDT's base address, for the VMCS host state.
pub fn base() -> u64 {
    IDT.0.get() as u64
}
