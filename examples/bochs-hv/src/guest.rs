//! The guest, generated from the scenario: identity page tables (the first GiB in 2 MiB pages) and
//! straight-line 64-bit code with one short instruction sequence per step, written into guest RAM
//! through the host's identity mapping before the first VM entry.
//!
//! Each step becomes (`moffs` forms address guest-linear = guest-physical, as the tables are identity):
//! - read / MMIO read: `mov rax, [gpa]`, `mov rcx, expected`, `cmp rax, rcx`, `je` over a fail stub;
//! - write / MMIO write: `mov rax, value`, `mov [gpa], rax`;
//! - range write: `mov rax, gpa`, `mov rdx, value`, `mov ecx, pages`, then a loop of `mov [rax], rdx`,
//!   `add rax, 4096`, `dec ecx`, `jnz`;
//! - exec: `mov rax, target`, `jmp rax`; at the target a stub `mov rcx, back`, `jmp rcx` returns;
//! - start logging / harvest / age / remap / end / fail, and the host steps of NX huge pages, write
//!   tracking, stopping logging and snapshots: a hypercall: `mov edi, arg`, `mov ebx, code`, `vmcall`
//!   (`vmmcall` in `examples/bochs-svm`, which includes this file: `crate::HYPERCALL`) (age, remap and
//!   the host steps pass their step's index: the hypervisor reads the step).
//!
//! A write to a write-tracked page is the same `mov [moffs64], rax` as any write, so the hypervisor
//! can emulate it (`host_steps::emulate_tracked_write`).
//!
//! MMIO accesses use exactly the two `moffs` forms (REX.W A1 and REX.W A3, 10 bytes), which is all the
//! hypervisor's MMIO emulation decodes.

use tdp_core::addr::Gpa;
use tdp_metal::scenario::{Scenario, SlotSpec, Step};

use crate::layout::host_addr;

/// Guest-physical addresses of the guest's page tables (the gfns in
/// `tdp_metal::scenario::GUEST_TABLE_GFNS`).
pub const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// Where the guest's code starts, and its first instruction.
pub const CODE: u64 = 0x1_0000;
/// The end of the scenario's code area.
pub const CODE_END: u64 = 0x2_0000;
/// The guest's initial stack pointer (nothing is pushed: no step calls).
pub const STACK_TOP: u64 = 0x9000;

/// Hypercall numbers (in RBX at VMCALL; the argument is in RDI).
pub const HC_DONE: u64 = 1;
/// A read returned the wrong value: RDI = the step, RAX = what was read.
pub const HC_FAIL: u64 = 2;
/// Start dirty logging on slot RDI.
pub const HC_START_LOGGING: u64 = 3;
/// Harvest number RDI.
pub const HC_HARVEST: u64 = 4;
/// Run step RDI, an age of a range (`Step::Age`).
pub const HC_AGE: u64 = 5;
/// Run step RDI, a move of a page to another host frame (`Step::Remap`).
pub const HC_REMAP: u64 = 6;
/// Run step RDI, one of the host steps of NX huge pages, write tracking, stopping logging and
/// snapshots (`host_steps::run_step`).
pub const HC_STEP: u64 = 7;

/// Why the guest could not be built.
#[derive(Clone, Copy, Debug, thiserror::Error)]
pub enum BuildError {
    /// The generated code does not fit in its area (`CODE..CODE_END` for the scenario).
    #[error("the guest code does not fit in {0:#x} bytes")]
    CodeTooLarge(u64),
    /// An address does not fit the instruction form.
    #[error("step {0}: an immediate does not fit in 32 bits")]
    Immediate(usize),
}

/// Writes guest code into guest RAM from `at`, never past `end`.
pub(crate) struct Emitter {
    /// Where the next instruction goes.
    pub(crate) at: u64,
    /// The first byte it may not write.
    pub(crate) end: u64,
}

impl Emitter {
    /// Raw bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> Result<(), BuildError> {
        if self.at + b.len() as u64 > self.end {
            return Err(BuildError::CodeTooLarge(self.end));
        }
        write_guest(self.at, b);
        self.at += b.len() as u64;
        Ok(())
    }
    fn imm64(&mut self, prefix: &[u8], v: u64) -> Result<(), BuildError> {
        self.bytes(prefix)?;
        self.bytes(&v.to_le_bytes())
    }
    /// `mov edi, arg`, `mov ebx, code`, the hypercall instruction; `step` names the step in errors.
    pub(crate) fn hypercall(&mut self, code: u64, arg: u64, step: usize) -> Result<(), BuildError> {
        let arg = u32::try_from(arg).map_err(|_| BuildError::Immediate(step))?;
        self.bytes(&[0xbf])?; // mov edi, imm32
        self.bytes(&arg.to_le_bytes())?;
        self.bytes(&[0xbb])?; // mov ebx, imm32
        self.bytes(&(code as u32).to_le_bytes())?;
        self.bytes(&crate::HYPERCALL) // VMCALL or VMMCALL
    }
    /// `mov rax, [gpa]`, then compare with `expected` and fail with step `i` if it differs.
    fn read_check(&mut self, gpa: Gpa, expected: u64, i: usize) -> Result<(), BuildError> {
        self.imm64(&[0x48, 0xa1], gpa.0)?; // mov rax, [moffs64]
        self.imm64(&[0x48, 0xb9], expected)?; // mov rcx, imm64
        self.bytes(&[0x48, 0x39, 0xc8])?; // cmp rax, rcx
        self.bytes(&[0x74, 13])?; // je over the 13-byte fail hypercall
        self.hypercall(HC_FAIL, i as u64, i)
    }
    /// `mov rax, value`, `mov [gpa], rax`.
    pub(crate) fn write(&mut self, gpa: Gpa, value: u64) -> Result<(), BuildError> {
        self.imm64(&[0x48, 0xb8], value)?; // mov rax, imm64
        self.imm64(&[0x48, 0xa3], gpa.0) // mov [moffs64], rax
    }
}

/// Copies `bytes` into guest RAM at `gpa`.
fn write_guest(gpa: u64, bytes: &[u8]) {
    // SAFETY: guest RAM is identity-mapped host memory reserved for the guest (see `layout`); the guest
    // is not running while it is built, and nothing else holds a reference into it.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), host_addr(gpa) as *mut u8, bytes.len()) }
}

/// Zeroes the slot's backing memory.
fn zero_slot(slot: &SlotSpec) {
    let start = host_addr(slot.base_gfn.gpa().0) as *mut u8;
    // SAFETY: as `write_guest`: the slot's backing lies in guest RAM, unused by anything else.
    unsafe { core::ptr::write_bytes(start, 0, (slot.pages * 4096) as usize) }
}

/// Zeroes every slot, writes the page tables, the code for every step and the exec stubs. Returns the
/// guest's entry point.
///
/// # Errors
/// [`BuildError`] when the code does not fit.
pub fn build(scenario: &Scenario) -> Result<u64, BuildError> {
    scenario.slots.iter().for_each(zero_slot);
    write_guest(PML4, &(PDPT | 3).to_le_bytes());
    write_guest(PDPT, &(PD | 3).to_le_bytes());
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        write_guest(PD + 8 * i, &((i << 21) | 0x83).to_le_bytes());
    }
    let mut e = Emitter { at: CODE, end: CODE_END };
    let mut harvest = 0;
    for (i, step) in scenario.steps.iter().enumerate() {
        match *step {
            Step::Read { gpa } | Step::MmioRead { gpa } => {
                let expected = scenario.expected_read(i).unwrap_or_default();
                e.read_check(gpa, expected, i)?;
            }
            Step::Write { gpa, value } | Step::MmioWrite { gpa, value } => e.write(gpa, value)?,
            Step::WriteRange { gpa, pages, value } => {
                let pages = u32::try_from(pages).map_err(|_| BuildError::Immediate(i))?;
                e.imm64(&[0x48, 0xb8], gpa.0)?; // mov rax, imm64 (first address)
                e.imm64(&[0x48, 0xba], value)?; // mov rdx, imm64
                e.bytes(&[0xb9])?; // mov ecx, imm32 (pages)
                e.bytes(&pages.to_le_bytes())?;
                // loop: mov [rax], rdx; add rax, 4096; dec ecx; jnz loop (back 13 bytes).
                e.bytes(&[0x48, 0x89, 0x10, 0x48, 0x05, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf3])?;
            }
            Step::Exec { gpa } => {
                e.imm64(&[0x48, 0xb8], gpa.0)?; // mov rax, imm64
                e.bytes(&[0xff, 0xe0])?; // jmp rax
                let mut stub = [0u8; 12];
                stub[..2].copy_from_slice(&[0x48, 0xb9]); // mov rcx, imm64
                stub[2..10].copy_from_slice(&e.at.to_le_bytes());
                stub[10..].copy_from_slice(&[0xff, 0xe1]); // jmp rcx
                write_guest(gpa.0, &stub);
            }
            Step::StartLogging { slot } => e.hypercall(HC_START_LOGGING, u64::from(slot.0), i)?,
            Step::Age { .. } => e.hypercall(HC_AGE, i as u64, i)?,
            Step::Remap { .. } => e.hypercall(HC_REMAP, i as u64, i)?,
            Step::StopLogging { .. }
            | Step::Track { .. }
            | Step::Untrack { .. }
            | Step::NxHugePages
            | Step::NxRecover
            | Step::Snapshot(_) => e.hypercall(HC_STEP, i as u64, i)?,
            Step::Harvest => {
                e.hypercall(HC_HARVEST, harvest, i)?;
                harvest += 1;
            }
        }
    }
    e.hypercall(HC_DONE, scenario.steps.len() as u64, scenario.steps.len())?;
    e.bytes(&[0xf4, 0xeb, 0xfd])?; // hlt; jmp back to it
    Ok(CODE)
}
