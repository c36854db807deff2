//! The guest: identity page tables (the first GiB in 2 MiB pages) and straight-line 64-bit code, written
//! into guest RAM through the host's identity mapping before the first VMRUN.
//!
//! What the code does, in order (every address is guest-linear = guest-physical):
//! 1. writes `DATA` and `DATA + 0x1000` (slot 1, not yet logged): #NPF, mapped;
//! 2. reads `MMIO` twice (no slot): the first #NPF installs an MMIO entry, the second hits its reserved
//!    bit; both are emulated (`mov rax, [moffs64]`, REX.W A1, 10 bytes);
//! 3. `VMMCALL` start logging slot 1: the MMU write-protects it;
//! 4. writes `DATA + 0x1000` (write-protected: #NPF present+write, marked dirty) and `DATA + 0x3000`
//!    (not present: mapped and marked);
//! 5. `VMMCALL` harvest 0 (expects gfns 0x201 and 0x203), then writes `DATA + 0x1000` again;
//! 6. `VMMCALL` harvest 1 (expects gfn 0x201), then `VMMCALL` done.
//!
//! With a second processor, vCPU 0 continues (before `done`) and vCPU 1 runs its own code at `CODE1`,
//! both in the dirty-logged race slot (`RACE`): barrier 1; phase A, both write the 16 shared pages (vCPU 0
//! ascending, vCPU 1 descending, so they meet) and then 16 pages of their own; barrier 2; each harvests
//! its own ring (which re-protects what it harvested); barrier 3; phase B, each writes its own pages
//! again (write-protected now: #NPF, logged); barrier 4; each harvests again; barrier 5; done.
//!
//! Hypercalls: RBX holds the number, RDI the argument.

use crate::layout::host_addr;

/// Guest-physical addresses of the guest's page tables.
pub const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// Where vCPU 0's code starts, and its first instruction.
pub const CODE: u64 = 0x1_0000;
/// Where vCPU 1's code starts.
pub const CODE1: u64 = 0x1_8000;
/// The end of both.
pub const CODE_END: u64 = 0x2_0000;
/// The guest's initial stack pointer (nothing is pushed).
pub const STACK_TOP: u64 = 0x9000;
/// The dirty-logged slot's first byte (gfn 0x200).
pub const DATA: u64 = 0x20_0000;
/// An MMIO address (no memslot).
pub const MMIO: u64 = 0x1000_0000;

/// Values the guest writes.
pub const WRITES: [(u64, u64); 5] = [
    (DATA, 0x11),
    (DATA + 0x1000, 0x22),
    (DATA + 0x1000, 0x33),
    (DATA + 0x3000, 0x44),
    (DATA + 0x1000, 0x55),
];

/// Hypercall: the guest is done.
pub const HC_DONE: u64 = 1;
/// Hypercall: start dirty logging on slot RDI.
pub const HC_START_LOGGING: u64 = 3;
/// Hypercall: harvest number RDI.
pub const HC_HARVEST: u64 = 4;
/// Hypercall: an MMIO read returned the wrong value (RDI = which read, RAX = what was read).
pub const HC_FAIL: u64 = 2;
/// Hypercall: wait until both vCPUs reached barrier RDI.
pub const HC_BARRIER: u64 = 5;
/// Hypercall: harvest this vCPU's own ring (number RDI of the two-vCPU part) and reset it.
pub const HC_HARVEST_MINE: u64 = 6;

/// The race slot's first gfn (512 pages, dirty-logged from the start).
pub const RACE: u64 = 0x400;
/// Pages both vCPUs write.
pub const SHARED_PAGES: core::ops::Range<u64> = RACE..RACE + 16;
/// Each vCPU's own pages.
pub const OWN_PAGES: [core::ops::Range<u64>; 2] = [RACE + 16..RACE + 32, RACE + 32..RACE + 48];

/// What vCPU `cpu` writes to page `gfn` in phase `phase` (0 = A, 1 = B).
pub const fn race_value(phase: u64, cpu: u64, gfn: u64) -> u64 {
    ((0xa0 + phase * 0x10 + cpu) << 40) | gfn
}

/// The value an emulated MMIO read of `gpa` returns.
pub const fn mmio_value(gpa: u64) -> u64 {
    0x5a5a_0000_0000_0000 ^ gpa
}

struct Emitter {
    at: u64,
}

impl Emitter {
    fn bytes(&mut self, b: &[u8]) -> Result<(), &'static str> {
        if self.at + b.len() as u64 > CODE_END {
            return Err("the guest code does not fit");
        }
        write_guest(self.at, b);
        self.at += b.len() as u64;
        Ok(())
    }
    fn imm64(&mut self, prefix: &[u8], v: u64) -> Result<(), &'static str> {
        self.bytes(prefix)?;
        self.bytes(&v.to_le_bytes())
    }
    fn write(&mut self, gpa: u64, value: u64) -> Result<(), &'static str> {
        self.imm64(&[0x48, 0xb8], value)?; // mov rax, imm64
        self.imm64(&[0x48, 0xa3], gpa) // mov [moffs64], rax
    }
    fn hypercall(&mut self, code: u64, arg: u32) -> Result<(), &'static str> {
        self.bytes(&[0xbf])?; // mov edi, imm32
        self.bytes(&arg.to_le_bytes())?;
        self.bytes(&[0xbb])?; // mov ebx, imm32
        self.bytes(&(code as u32).to_le_bytes())?;
        self.bytes(&[0x0f, 0x01, 0xd9]) // vmmcall
    }
    fn mmio_read_check(&mut self, gpa: u64, which: u32) -> Result<(), &'static str> {
        self.imm64(&[0x48, 0xa1], gpa)?; // mov rax, [moffs64]
        self.imm64(&[0x48, 0xb9], mmio_value(gpa))?; // mov rcx, imm64
        self.bytes(&[0x48, 0x39, 0xc8])?; // cmp rax, rcx
        self.bytes(&[0x74, 13])?; // je over the 13-byte fail hypercall
        self.hypercall(HC_FAIL, which)
    }
}

/// Copies `bytes` into guest RAM at `gpa`.
fn write_guest(gpa: u64, bytes: &[u8]) {
    // SAFETY: guest RAM is identity-mapped host memory reserved for the guest (see `layout`); the guest
    // is not running while it is built, and nothing else holds a reference into it.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), host_addr(gpa) as *mut u8, bytes.len()) }
}

/// Zeroes `pages` pages of guest RAM from `gpa`.
pub fn zero(gpa: u64, pages: u64) {
    // SAFETY: as `write_guest`.
    unsafe { core::ptr::write_bytes(host_addr(gpa) as *mut u8, 0, (pages * 4096) as usize) }
}

/// Reads a u64 of guest RAM at `gpa` (after the run).
pub fn read_u64(gpa: u64) -> u64 {
    // SAFETY: as `write_guest`; the guest no longer runs, the address is 8-byte aligned guest RAM.
    unsafe { core::ptr::read_volatile(host_addr(gpa) as *const u64) }
}

/// Writes phase `phase` of vCPU `cpu`'s race writes.
fn race(e: &mut Emitter, cpu: u64, phase: u64) -> Result<(), &'static str> {
    if phase == 0 {
        let shared: alloc::vec::Vec<u64> =
            if cpu == 0 { SHARED_PAGES.collect() } else { SHARED_PAGES.rev().collect() };
        for gfn in shared {
            e.write(gfn << 12, race_value(0, cpu, gfn))?;
        }
    }
    for gfn in OWN_PAGES[cpu as usize].clone() {
        e.write(gfn << 12, race_value(phase, cpu, gfn))?;
    }
    Ok(())
}

/// The two-vCPU part of vCPU `cpu`'s code.
fn two_vcpus(e: &mut Emitter, cpu: u64) -> Result<(), &'static str> {
    e.hypercall(HC_BARRIER, 1)?;
    race(e, cpu, 0)?;
    e.hypercall(HC_BARRIER, 2)?;
    e.hypercall(HC_HARVEST_MINE, 0)?;
    e.hypercall(HC_BARRIER, 3)?;
    race(e, cpu, 1)?;
    e.hypercall(HC_BARRIER, 4)?;
    e.hypercall(HC_HARVEST_MINE, 1)?;
    e.hypercall(HC_BARRIER, 5)
}

/// Writes the page tables and the code; returns vCPU 0's and vCPU 1's entry points. With `smp`, both
/// run the two-vCPU part (vCPU 0 after its own steps).
///
/// # Errors
/// When the code does not fit.
pub fn build(smp: bool) -> Result<(u64, u64), &'static str> {
    write_guest(PML4, &(PDPT | 3).to_le_bytes());
    write_guest(PDPT, &(PD | 3).to_le_bytes());
    for i in 0..512u64 {
        write_guest(PD + 8 * i, &((i << 21) | 0x83).to_le_bytes()); // present, writable, 2 MiB
    }
    let mut e = Emitter { at: CODE };
    e.write(WRITES[0].0, WRITES[0].1)?;
    e.write(WRITES[1].0, WRITES[1].1)?;
    e.mmio_read_check(MMIO, 0)?;
    e.mmio_read_check(MMIO + 8, 1)?;
    e.hypercall(HC_START_LOGGING, 1)?;
    e.write(WRITES[2].0, WRITES[2].1)?;
    e.write(WRITES[3].0, WRITES[3].1)?;
    e.hypercall(HC_HARVEST, 0)?;
    e.write(WRITES[4].0, WRITES[4].1)?;
    e.hypercall(HC_HARVEST, 1)?;
    if smp {
        two_vcpus(&mut e, 0)?;
    }
    e.hypercall(HC_DONE, 0)?;
    e.bytes(&[0xf4, 0xeb, 0xfd])?; // hlt; jmp back to it
    if e.at > CODE1 {
        return Err("vCPU 0's code runs into vCPU 1's");
    }
    let mut e = Emitter { at: CODE1 };
    if smp {
        two_vcpus(&mut e, 1)?;
    }
    e.hypercall(HC_DONE, 0)?;
    e.bytes(&[0xf4, 0xeb, 0xfd])?;
    Ok((CODE, CODE1))
}
