//! The few CPU instructions the kernel itself needs besides VMX's: control registers and MSRs.

use core::arch::asm;

/// IA32_EFER.
pub const IA32_EFER: u32 = 0xc000_0080;

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The CPU's brand string (CPUID 0x8000_0002..4), which Bochs sets per CPU model.
pub fn brand(buf: &mut [u8; 48]) -> &str {
    for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
        let (a, b, c, d) = cpuid(leaf);
        for (j, reg) in [a, b, c, d].into_iter().enumerate() {
            buf[i * 16 + j * 4..i * 16 + j * 4 + 4].copy_from_slice(&reg.to_le_bytes());
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    core::str::from_utf8(&buf[..end]).map_or("?", str::trim)
}

/// Reads CR0.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR3.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR4.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// `v` must keep the kernel's paging and protection set up (only VMX's fixed bits are added).
pub unsafe fn set_cr0(v: u64) {
    // SAFETY: the caller keeps PE, PG and the rest of the kernel's environment.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// Writes CR4.
///
/// # Safety
/// As [`set_cr0`].
pub unsafe fn set_cr4(v: u64) {
    // SAFETY: the caller keeps PAE and the rest of the kernel's environment.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}
