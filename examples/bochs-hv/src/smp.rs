//! The second processor: wakes it with INIT-SIPI-SIPI through the local APIC and brings it from real
//! mode to long mode (a trampoline copied to 0x8000), where it calls the kernel's `crate::ap_run`
//! (which enables VMX or SVM on it and runs vCPU 1 on the MMU the bootstrap processor set up) and
//! publishes vCPU 1's outcome. Vendor-neutral: both kernels use this file (`examples/bochs-svm` by
//! path).
//!
//! The trampoline prints `A` on Bochs's port 0xE9 and increments a counter first, so the count of
//! processors that woke up is known even if the rest fails. With `cpu: count=1` none answers.
//!
//! Source: Intel SDM Vol. 3A, section "MP Initialization Protocol Algorithm for MP Systems" (INIT, then
//! two STARTUP IPIs whose vector is the trampoline's page number below 1 MiB) and section "Interrupt
//! Command Register (ICR)" (xAPIC: low dword at APIC base + 0x300, bits 19:18 = 11b "all excluding
//! self", delivery mode 101b INIT, 110b STARTUP); AMD APM Vol. 2 section 16.5 says the same for AMD.
//! The trampoline's mode switches follow `examples/bochs-hv`'s boot code.

use alloc::format;
use alloc::string::String;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot::Page;
use crate::cpu;
use crate::smp_guest::SmpOutcome;

/// Where the trampoline goes: page 8 (STARTUP vector 0x08), free low memory once GRUB is done.
const TRAMPOLINE: u64 = 0x8000;
/// The local APIC's default base (Bochs leaves IA32_APIC_BASE at it).
const APIC_BASE: u64 = 0xfee0_0000;
const ICR_LOW: u64 = APIC_BASE + 0x300;
const ICR_HIGH: u64 = APIC_BASE + 0x310;

// The trampoline: data slots at fixed offsets first (memory operands can only name constants), then
// the code at offset 0x60. `wake_others` checks the offsets the assembler computed against `SLOT_*`.
global_asm!(
    ".pushsection .rodata.ap_trampoline, \"a\"",
    ".balign 16",
    "ap_tramp_start:",
    ".code16",
    "jmp 3f",
    ".balign 8, 0",
    "ap_cr3:",
    ".quad 0",
    "ap_stack:",
    ".quad 0",
    "ap_entry:",
    ".quad 0",
    "ap_counter:",
    ".quad 0",
    "ap_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00cf9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "ap_gdtr:",
    ".short 39",
    ".long ap_gdt - ap_tramp_start + 0x8000",
    ".balign 16, 0",
    "3:",
    "cli",
    "xor ax, ax",
    "mov ds, ax",
    "mov al, 0x41",
    "mov dx, 0xe9",
    "out dx, al",
    "lock inc dword ptr [0x8020]",
    "lgdt [0x8050]",
    "mov eax, cr0",
    "or eax, 1",
    "mov cr0, eax",
    // jmp far 0x18:ap_pm32 (32-bit offset, operand-size prefix)
    ".byte 0x66, 0xea",
    ".long ap_pm32 - ap_tramp_start + 0x8000",
    ".short 0x18",
    ".code32",
    "ap_pm32:",
    "mov ax, 0x20",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    // CR4: PAE, OSFXSR, OSXMMEXCPT; the bootstrap processor's page tables; EFER.LME|NXE; CR0.PG|NE|MP|PE.
    "mov eax, cr4",
    "or eax, 0x620",
    "mov cr4, eax",
    "mov eax, dword ptr [0x8008]",
    "mov cr3, eax",
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, 0x900",
    "wrmsr",
    "mov eax, cr0",
    "and eax, 0xfffffffb",
    "or eax, 0x80000023",
    "mov cr0, eax",
    // jmp far 0x08:ap_lm64
    ".byte 0xea",
    ".long ap_lm64 - ap_tramp_start + 0x8000",
    ".short 0x08",
    ".code64",
    "ap_lm64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov rsp, qword ptr [0x8010]",
    "mov rax, qword ptr [0x8018]",
    "call rax",
    "7:",
    "cli",
    "hlt",
    "jmp 7b",
    "ap_tramp_end:",
    ".balign 8",
    ".globl AP_TRAMPOLINE_LAYOUT",
    "AP_TRAMPOLINE_LAYOUT:",
    ".quad ap_tramp_end - ap_tramp_start",
    ".quad ap_cr3 - ap_tramp_start",
    ".quad ap_stack - ap_tramp_start",
    ".quad ap_entry - ap_tramp_start",
    ".quad ap_counter - ap_tramp_start",
    ".quad ap_gdtr - ap_tramp_start",
    ".quad 3b - ap_tramp_start",
    ".globl AP_TRAMPOLINE",
    ".set AP_TRAMPOLINE, ap_tramp_start",
    ".popsection",
);

unsafe extern "C" {
    /// The trampoline's first byte.
    static AP_TRAMPOLINE: u8;
    /// Its length and the offsets of its CR3, stack, entry and counter slots, GDTR and code.
    static AP_TRAMPOLINE_LAYOUT: [u64; 7];
}

/// A page directory for 3-4 GiB holding only the APIC's 2 MiB page (uncached); written once by
/// `map_apic`, then read by the MMU.
static APIC_PD: Page = Page::zeroed();

/// The second processor's stack.
#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; 128 * 1024]>);
// SAFETY: only the second processor uses it, as its stack.
unsafe impl Sync for Stack {}
static AP_STACK: Stack = Stack(UnsafeCell::new([0; 128 * 1024]));

/// How far the second processor got: 0 not started, 1 in long mode, 2 VMX / SVM enabled (set by
/// `crate::ap_run`), 3 finished.
pub static AP_STAGE: AtomicU32 = AtomicU32::new(0);
/// What vCPU 1's run saw, once `AP_STAGE` is 3.
static AP_OUTCOME: spin::Mutex<Option<SmpOutcome>> = spin::Mutex::new(None);

/// Maps the APIC's page: PDPT[3] of the boot tables points at [`APIC_PD`], whose entry for 0xFEE00000
/// is a 2 MiB page, present, writable, PWT and PCD.
fn map_apic() {
    // SAFETY: the boot tables are identity-mapped pages in the first GiB; PML4[0] points at the PDPT
    // the boot code built, whose entry 3 (3-4 GiB) it left empty; only this processor runs long-mode
    // code, and CR3 is reloaded afterwards so no stale translation remains.
    unsafe {
        let pml4 = (cpu::cr3() & !0xfff) as *const u64;
        let pdpt = (*pml4 & 0x000f_ffff_ffff_f000) as *mut u64;
        let pd = APIC_PD.0.get();
        (*pd)[((APIC_BASE >> 21) & 511) as usize] = APIC_BASE | 0x9b;
        *pdpt.add(3) = pd as u64 | 3;
        asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack));
    }
}

fn icr(low: u32) {
    // SAFETY: the APIC page is mapped uncached (`map_apic`); writing the ICR sends the IPI and touches
    // no memory.
    unsafe {
        core::ptr::write_volatile(ICR_HIGH as *mut u32, 0);
        core::ptr::write_volatile(ICR_LOW as *mut u32, low);
    }
}

fn spin(n: u64) {
    for i in 0..n {
        core::hint::black_box(i);
    }
}

fn slot(offset: u64) -> *mut u64 {
    (TRAMPOLINE + offset) as *mut u64
}

/// The slot offsets the trampoline's code uses as constants (0x8008, 0x8010, 0x8018, 0x8020, 0x8050).
const SLOTS: [u64; 5] = [0x08, 0x10, 0x18, 0x20, 0x50];

/// Copies the trampoline to 0x8000, fills in its slots, wakes the other processors, and returns how
/// many ran the trampoline's first instructions (within a bounded wait).
///
/// # Errors
/// When the assembled trampoline's slots are not where its code expects them.
pub fn wake_others() -> Result<u64, String> {
    // SAFETY: the layout is initialised data in .rodata (the assembly above).
    let layout = unsafe { AP_TRAMPOLINE_LAYOUT };
    if layout[1..6] != SLOTS || layout[6] != 0x60 || layout[0] > 0x1000 {
        return Err(format!("the trampoline's layout is {layout:x?}"));
    }
    // SAFETY: the trampoline is initialised code in .rodata; its page and slots lie in low RAM nothing
    // else uses after boot; the other processors run it only once woken below.
    let counter = unsafe {
        let [len, cr3, stack, entry, counter, ..] = layout;
        core::ptr::copy_nonoverlapping(&raw const AP_TRAMPOLINE, TRAMPOLINE as *mut u8, len as usize);
        slot(cr3).write_volatile(cpu::cr3());
        slot(stack).write_volatile(AP_STACK.0.get() as u64 + 128 * 1024);
        slot(entry).write_volatile(ap_main as *const () as u64);
        slot(counter).write_volatile(0);
        slot(counter)
    };
    map_apic();
    icr(0x000c_4500); // INIT, all excluding self
    spin(100_000);
    for _ in 0..2 {
        icr(0x000c_4600 | (TRAMPOLINE >> 12) as u32); // STARTUP, all excluding self
        spin(100_000);
    }
    for _ in 0..2_000_000u64 {
        // SAFETY: as above; the other processor writes it with a locked increment.
        if unsafe { counter.read_volatile() } != 0 {
            spin(100_000);
            // SAFETY: as above.
            return Ok(unsafe { counter.read_volatile() });
        }
        core::hint::spin_loop();
    }
    Ok(0)
}

/// Waits for the second processor to finish vCPU 1 and returns its outcome.
pub fn wait_for_ap() -> Result<SmpOutcome, String> {
    for _ in 0..200_000_000u64 {
        if AP_STAGE.load(Ordering::Acquire) == 3 {
            return AP_OUTCOME
                .lock()
                .take()
                .ok_or_else(|| String::from("the second processor left no outcome"));
        }
        core::hint::spin_loop();
    }
    Err(format!("the second processor stopped at stage {}", AP_STAGE.load(Ordering::Acquire)))
}

/// Loads the bootstrap processor's IDT (its 32 exception gates) on this processor.
fn load_idt() {
    #[repr(C, packed)]
    struct IdtPtr {
        limit: u16,
        base: u64,
    }
    let ptr = IdtPtr { limit: 64 * 8 - 1, base: crate::idt::base() };
    // SAFETY: the IDT was filled by `idt::init` on the bootstrap processor before this processor woke,
    // and lives for the whole run; LIDT only reads the pseudo-descriptor.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// The second processor's Rust entry, called by the trampoline in long mode on its own stack.
extern "C" fn ap_main() -> ! {
    load_idt();
    AP_STAGE.store(1, Ordering::Release);
    let outcome = crate::ap_run();
    *AP_OUTCOME.lock() = Some(outcome);
    AP_STAGE.store(3, Ordering::Release);
    loop {
        // SAFETY: `hlt` with interrupts off parks this processor for good.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}
