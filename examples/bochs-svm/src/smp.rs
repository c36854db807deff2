//! The two-processor probe: wakes every other processor with INIT-SIPI-SIPI through the local APIC and
//! counts the ones that run a real-mode stub. Each woken processor prints `A` on Bochs's port 0xE9,
//! increments a counter next to the stub and halts. With `cpu: count=2` one processor answers; with
//! `count=1` none does.
//!
//! Source: Intel SDM Vol. 3A, section "MP Initialization Protocol Algorithm for MP Systems" (INIT, then
//! two STARTUP IPIs whose vector is the stub's page number below 1 MiB) and section "Interrupt Command
//! Register (ICR)" (xAPIC: low dword at APIC base + 0x300, bits 19:18 = 11b "all excluding self",
//! delivery mode 101b INIT, 110b STARTUP); AMD APM Vol. 2 section 16.5 describes the same for AMD.

use crate::boot::Page;
use crate::cpu;

/// Where the stub goes: page 8 (STARTUP vector 0x08), free low memory once GRUB is done.
const STUB: u64 = 0x8000;
/// The counter the stub increments (`lock inc dword [cs:0x100]`).
const COUNTER: u64 = STUB + 0x100;
/// The local APIC's default base (Bochs leaves IA32_APIC_BASE at it).
const APIC_BASE: u64 = 0xfee0_0000;
const ICR_LOW: u64 = APIC_BASE + 0x300;

/// Real mode at CS = 0x0800: `cli; mov al, 'A'; mov dx, 0xe9; out dx, al; lock inc dword [cs:0x100];
/// 1: cli; hlt; jmp 1b`.
const STUB_CODE: [u8; 19] = [
    0xfa, 0xb0, 0x41, 0xba, 0xe9, 0x00, 0xee, 0xf0, 0x2e, 0x66, 0xff, 0x06, 0x00, 0x01, 0xfa, 0xf4, 0xeb,
    0xfc, 0x90,
];

/// A page directory for 3-4 GiB holding only the APIC's 2 MiB page (uncached); written once by
/// `map_apic`, then read by the MMU.
static APIC_PD: Page = Page::zeroed();

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
        core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack));
    }
}

fn icr(low: u32) {
    // SAFETY: the APIC page is mapped uncached (`map_apic`); writing the ICR's low dword sends the IPI
    // and touches no memory.
    unsafe {
        core::ptr::write_volatile((ICR_LOW + 0x10) as *mut u32, 0);
        core::ptr::write_volatile(ICR_LOW as *mut u32, low);
    }
}

fn spin(n: u64) {
    for i in 0..n {
        core::hint::black_box(i);
    }
}

/// Wakes the other processors and returns how many ran the stub (within a bounded wait).
pub fn wake_others() -> u32 {
    // SAFETY: the stub page and the counter lie in low RAM nothing else uses after boot; the other
    // processors only run the stub once woken below.
    unsafe {
        core::ptr::copy_nonoverlapping(STUB_CODE.as_ptr(), STUB as *mut u8, STUB_CODE.len());
        core::ptr::write_volatile(COUNTER as *mut u32, 0);
    }
    map_apic();
    icr(0x000c_4500); // INIT, all excluding self
    spin(100_000);
    for _ in 0..2 {
        icr(0x000c_4600 | (STUB >> 12) as u32); // STARTUP, all excluding self
        spin(100_000);
    }
    for _ in 0..2_000_000u64 {
        // SAFETY: as above; the other processor writes it with a locked increment.
        let n = unsafe { core::ptr::read_volatile(COUNTER as *const u32) };
        if n != 0 {
            spin(100_000);
            // SAFETY: as above.
            return unsafe { core::ptr::read_volatile(COUNTER as *const u32) };
        }
        core::hint::spin_loop();
    }
    0
}
