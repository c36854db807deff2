//! The two-vCPU guest code, run after the scenario when a second processor answered: each vCPU's code
//! (vCPU 0 at [`SMP_CODE0`], vCPU 1 at [`SMP_CODE1`], both in the system slot, beside the scenario's
//! code) written with the scenario guest's emitter (`crate::guest`, `examples/bochs-hv`'s).
//!
//! What both do, in the race slot ([`RACE`], 512 pages, dirty-logged from its insertion): barrier 1;
//! phase A, both write the 16 shared pages (vCPU 0 ascending, vCPU 1 descending, so they meet) and then
//! 16 pages of their own; barrier 2; each harvests its own ring (which re-protects what it harvested);
//! barrier 3; phase B, each writes its own pages again (write-protected now: #NPF, logged); barrier 4;
//! each harvests again; barrier 5; done.
//!
//! Hypercalls: RBX holds the number, RDI the argument.

use tdp_core::addr::Gpa;

use crate::guest::{BuildError, Emitter, HC_DONE};
use crate::layout::host_addr;

/// Where vCPU 0's two-vCPU code starts.
pub const SMP_CODE0: u64 = 0x2_0000;
/// Where vCPU 1's starts.
pub const SMP_CODE1: u64 = 0x2_8000;
/// The end of both.
const SMP_CODE_END: u64 = 0x3_0000;

/// Hypercall: wait until both vCPUs reached barrier RDI.
pub const HC_BARRIER: u64 = 7;
/// Hypercall: harvest this vCPU's own ring (number RDI of the two-vCPU part) and reset it.
pub const HC_HARVEST_MINE: u64 = 8;

/// The race slot's first gfn: past the scenario's slots (which end at 0x480 and whose remap invalidates
/// up to 0x600) and below its MMIO gfn (0x800).
pub const RACE: u64 = 0x600;
/// Pages in the race slot.
pub const RACE_PAGES: u64 = 0x200;
/// Pages both vCPUs write.
pub const SHARED_PAGES: core::ops::Range<u64> = RACE..RACE + 16;
/// Each vCPU's own pages.
pub const OWN_PAGES: [core::ops::Range<u64>; 2] = [RACE + 16..RACE + 32, RACE + 32..RACE + 48];

/// What vCPU `cpu` writes to page `gfn` in phase `phase` (0 = A, 1 = B).
pub const fn race_value(phase: u64, cpu: u64, gfn: u64) -> u64 {
    ((0xa0 + phase * 0x10 + cpu) << 40) | gfn
}

/// Reads a u64 of guest RAM at `gpa` (after the run).
pub fn read_u64(gpa: u64) -> u64 {
    // SAFETY: guest RAM is identity-mapped host memory reserved for the guest (see `layout`); the guest
    // no longer runs, and the address is 8-byte aligned guest RAM.
    unsafe { core::ptr::read_volatile(host_addr(gpa) as *const u64) }
}

/// Writes phase `phase` of vCPU `cpu`'s race writes.
fn race(e: &mut Emitter, cpu: u64, phase: u64) -> Result<(), BuildError> {
    if phase == 0 {
        let shared: alloc::vec::Vec<u64> =
            if cpu == 0 { SHARED_PAGES.collect() } else { SHARED_PAGES.rev().collect() };
        for gfn in shared {
            e.write(Gpa(gfn << 12), race_value(0, cpu, gfn))?;
        }
    }
    for gfn in OWN_PAGES[cpu as usize].clone() {
        e.write(Gpa(gfn << 12), race_value(phase, cpu, gfn))?;
    }
    Ok(())
}

/// Writes both vCPUs' code (the scenario guest's page tables are already in place); returns their
/// entry points.
///
/// # Errors
/// When the code does not fit.
pub fn build() -> Result<[u64; 2], BuildError> {
    for (cpu, (at, end)) in [(SMP_CODE0, SMP_CODE1), (SMP_CODE1, SMP_CODE_END)].into_iter().enumerate() {
        let cpu = cpu as u64;
        let mut e = Emitter { at, end };
        e.hypercall(HC_BARRIER, 1, 0)?;
        race(&mut e, cpu, 0)?;
        e.hypercall(HC_BARRIER, 2, 0)?;
        e.hypercall(HC_HARVEST_MINE, 0, 0)?;
        e.hypercall(HC_BARRIER, 3, 0)?;
        race(&mut e, cpu, 1)?;
        e.hypercall(HC_BARRIER, 4, 0)?;
        e.hypercall(HC_HARVEST_MINE, 1, 0)?;
        e.hypercall(HC_BARRIER, 5, 0)?;
        e.hypercall(HC_DONE, 0, 0)?;
        e.bytes(&[0xf4, 0xeb, 0xfd])?; // hlt; jmp back to it
    }
    Ok([SMP_CODE0, SMP_CODE1])
}
