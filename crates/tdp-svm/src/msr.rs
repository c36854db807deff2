//! Model-specific registers the SVM backend reads and writes, and their bits.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), sections
//! "Enabling SVM" (15.4), "VM_CR MSR (C001_0114h)" (15.30.1) and "VM_HSAVE_PA MSR (C001_0117h)"
//! (15.30.4), and section "Extended Feature Enable Register (EFER)" (3.1.7). Cross-checked against
//! Linux's `arch/x86/include/asm/msr-index.h`.

/// EFER, the extended feature enable register.
pub const EFER: u32 = 0xc000_0080;
/// EFER bit 12: secure virtual machine enable. VMRUN, VMLOAD, VMSAVE, CLGI, STGI and INVLPGA raise #UD
/// while it is clear.
pub const EFER_SVME: u64 = 1 << 12;
/// EFER bit 8: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER bit 10: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER bit 11: no-execute enable.
pub const EFER_NXE: u64 = 1 << 11;

/// VM_CR: SVM control.
pub const VM_CR: u32 = 0xc001_0114;
/// VM_CR bit 0: debug port disable.
pub const VM_CR_DPD: u64 = 1 << 0;
/// VM_CR bit 1: intercept INIT (turned into #SX).
pub const VM_CR_R_INIT: u64 = 1 << 1;
/// VM_CR bit 2: disable A20 masking.
pub const VM_CR_DIS_A20M: u64 = 1 << 2;
/// VM_CR bit 3: SVMDIS is locked (read-only until reset).
pub const VM_CR_LOCK: u64 = 1 << 3;
/// VM_CR bit 4: SVM disabled; setting EFER.SVME raises #GP while it is set.
pub const VM_CR_SVMDIS: u64 = 1 << 4;

/// VM_HSAVE_PA: the physical address of the 4 KiB host save area VMRUN stores host state in. Must be
/// 4 KiB-aligned and below the physical address limit (else WRMSR raises #GP); VMRUN with it 0 raises
/// #GP.
pub const VM_HSAVE_PA: u32 = 0xc001_0117;
