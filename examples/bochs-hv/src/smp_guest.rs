//! The two-vCPU part, run after the scenario when a second processor answered, and everything about it
//! that does not depend on the vendor (both kernels use this file, `examples/bochs-svm` by path): each
//! vCPU's code (vCPU 0 at [`SMP_CODE0`], vCPU 1 at [`SMP_CODE1`], both in the system slot, beside the
//! scenario's code) written with the scenario guest's emitter (`crate::guest`), its hypercalls
//! ([`hypercall`]), what each vCPU saw ([`SmpOutcome`]) and the checks on both ([`check`]).
//!
//! What both do, in the race slot ([`RACE`], 512 pages, dirty-logged from its insertion): barrier 1;
//! phase A, both write the 16 shared pages (vCPU 0 ascending, vCPU 1 descending, so they meet) and then
//! 16 pages of their own; barrier 2; each harvests its own ring (which re-protects what it harvested);
//! barrier 3; phase B, each writes its own pages again (write-protected now: #NPF, logged); barrier 4;
//! each harvests again; barrier 5; done.
//!
//! Hypercalls: RBX holds the number, RDI the argument.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use tdp_core::addr::{Gpa, SlotId};
use tdp_core::dirty_ring::DirtyRingConsumer;
use tdp_core::host::Host;
use tdp_core::mmu::{FaultCounters, Mmu};
use tdp_metal::ring_sink::{RingSink, SinkStats};

use crate::guest::{BuildError, Emitter, HC_DONE};
use crate::host_steps;
use crate::layout::host_addr;
use crate::println;

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

/// The race slot's id (inserted after the scenario, dirty-logged from its insertion).
pub const RACE_SLOT: SlotId = SlotId(7);
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

/// What one vCPU's two-vCPU run saw.
#[derive(Default)]
pub struct SmpOutcome {
    /// The first error, if any.
    pub error: Option<String>,
    /// The guest reached its `done` hypercall.
    pub done: bool,
    /// Exits taken.
    pub exits: u64,
    /// The harvests of this vCPU's own ring.
    pub own_harvests: Vec<BTreeSet<u64>>,
    /// What the vCPU's faults came to.
    pub counters: Option<FaultCounters>,
    /// The ring's counters.
    pub ring: Option<SinkStats>,
    /// The vCPU's TLB tag (ASID or VPID; 0 when none).
    pub tag: u32,
    /// Flushes on entry (a flush request checked on entry). VMX: this vCPU's entry INVEPTs (its first
    /// entry's included). SVM: VMRUNs that carried TLB_CONTROL while this vCPU ran, both vCPUs' (tdp-svm
    /// counts them VM-wide).
    pub entry_flushes: u64,
}

/// The last barrier each vCPU reached (`u64::MAX`: it failed and will reach none).
static BARRIERS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Spins a barrier waits at most before it fails.
const BARRIER_SPINS: u64 = 50_000_000;

/// Tells the other vCPU that vCPU `cpu` failed: it will reach no barrier.
pub fn give_up(cpu: usize) {
    BARRIERS[cpu].store(u64::MAX, Ordering::Release);
}

/// Waits until the other vCPU reached barrier `n` (or gave up).
fn barrier(cpu: usize, n: u64) -> Result<(), String> {
    BARRIERS[cpu].store(n, Ordering::Release);
    for _ in 0..BARRIER_SPINS {
        match BARRIERS[1 - cpu].load(Ordering::Acquire) {
            u64::MAX => return Err(format!("the other vCPU failed before barrier {n}")),
            m if m >= n => return Ok(()),
            _ => core::hint::spin_loop(),
        }
    }
    Err(format!("barrier {n} not reached by the other vCPU"))
}

/// Handles vCPU `cpu`'s hypercall `number` with argument `arg`; returns whether the vCPU is done.
///
/// # Errors
/// An unknown hypercall, a harvest out of order, a barrier the other vCPU never reached.
pub fn hypercall<H: Host>(
    cpu: usize,
    number: u64,
    arg: u64,
    mmu: &Mmu<H>,
    sink: &mut RingSink<'static>,
    consumer: &mut DirtyRingConsumer<'static>,
    out: &mut SmpOutcome,
) -> Result<bool, String> {
    match number {
        HC_DONE => {
            out.done = true;
            BARRIERS[cpu].store(u64::MAX - 1, Ordering::Release);
            Ok(true)
        }
        HC_BARRIER => barrier(cpu, arg).map(|()| false),
        HC_HARVEST_MINE => {
            if arg != out.own_harvests.len() as u64 {
                return Err(format!("own harvest {arg} out of order"));
            }
            let base = |id: SlotId| if id == RACE_SLOT { RACE } else { u64::MAX };
            out.own_harvests.push(host_steps::harvest_slots(mmu, base, sink, consumer));
            Ok(false)
        }
        other => Err(format!("unknown hypercall {other}")),
    }
}

/// The two-vCPU checks: both finished; phase A's harvests together hold every page written exactly
/// (each vCPU's own pages in its own ring); phase B's hold each vCPU's own pages in its own ring; memory
/// holds the last values (a shared page one of the two vCPUs' values). Returns the failures.
pub fn check(outs: [&SmpOutcome; 2]) -> Vec<String> {
    let mut failures = Vec::new();
    for (cpu, out) in outs.iter().enumerate() {
        println!(
            "SMP vCPU {cpu}: tag {}, {} exits, {} entry flushes, faults {:?}, ring {:?}",
            out.tag, out.exits, out.entry_flushes, out.counters, out.ring
        );
        if let Some(e) = &out.error {
            failures.push(e.clone());
        }
        if !out.done {
            failures.push(format!("vCPU {cpu} did not finish"));
        }
        for (n, set) in out.own_harvests.iter().enumerate() {
            println!("SMP vCPU {cpu} own harvest {n}: {} pages {set:x?}", set.len());
        }
        if out.own_harvests.len() != 2 {
            failures.push(format!("vCPU {cpu}: {} own harvests, expected 2", out.own_harvests.len()));
        }
    }
    let empty = BTreeSet::new();
    let h = |cpu: usize, n: usize| outs[cpu].own_harvests.get(n).unwrap_or(&empty);
    let all: BTreeSet<u64> = SHARED_PAGES.chain(OWN_PAGES[0].clone()).chain(OWN_PAGES[1].clone()).collect();
    let union: BTreeSet<u64> = h(0, 0).union(h(1, 0)).copied().collect();
    if union != all {
        failures
            .push(format!("phase A: the rings hold {union:x?}, expected the {} pages written", all.len()));
    }
    let both: Vec<u64> = h(0, 0).intersection(h(1, 0)).copied().collect();
    println!("SMP phase A: {} pages in both rings {both:x?}", both.len());
    for (cpu, pages) in OWN_PAGES.iter().enumerate() {
        let own: BTreeSet<u64> = pages.clone().collect();
        if !own.is_subset(h(cpu, 0)) {
            failures.push(format!("phase A: vCPU {cpu}'s own pages are not all in its ring"));
        }
        if *h(cpu, 1) != own {
            failures
                .push(format!("phase B: vCPU {cpu}'s ring holds {:x?}, expected its own pages", h(cpu, 1)));
        }
        for gfn in pages.clone() {
            let want = race_value(1, cpu as u64, gfn);
            let got = read_u64(gfn << 12);
            if got != want {
                failures.push(format!("gfn {gfn:#x} holds {got:#x}, expected {want:#x}"));
            }
        }
    }
    let winners: Vec<u64> = SHARED_PAGES
        .map(|gfn| {
            let got = read_u64(gfn << 12);
            if got == race_value(0, 0, gfn) {
                0
            } else if got == race_value(0, 1, gfn) {
                1
            } else {
                failures.push(format!("shared gfn {gfn:#x} holds {got:#x}"));
                9
            }
        })
        .collect();
    println!("SMP shared pages, last writer per page: {winners:?}");
    failures
}
