//! The two-vCPU part (`tdp_metal::scenario::smp`, the description the mock re-run shares), run after the
//! scenario when a second processor answered, and everything about it that does not depend on the
//! vendor (both kernels use this file, `examples/bochs-svm` by path): each vCPU's code (vCPU 0 at
//! [`SMP_CODE0`], vCPU 1 at [`SMP_CODE1`], both in the system slot, beside the scenario's code) generated
//! from its program with the scenario guest's emitter (`crate::guest`), its hypercalls ([`hypercall`]),
//! what each vCPU saw ([`SmpOutcome`]) and the report ([`report`]: the shared checks and the `TDP-SMP`
//! line).
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
use tdp_metal::scenario::smp::{
    OWN_PAGES, RACE, RACE_SLOT, SHARED_PAGES, SmpObserved, SmpStep, program, write_smp_line,
};

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

/// Reads a u64 of guest RAM at `gpa` (after the run).
pub fn read_u64(gpa: u64) -> u64 {
    // SAFETY: guest RAM is identity-mapped host memory reserved for the guest (see `layout`); the guest
    // no longer runs, and the address is 8-byte aligned guest RAM.
    unsafe { core::ptr::read_volatile(host_addr(gpa) as *const u64) }
}

/// Writes both vCPUs' code from their programs (the scenario guest's page tables are already in
/// place); returns their entry points.
///
/// # Errors
/// When the code does not fit.
pub fn build() -> Result<[u64; 2], BuildError> {
    for (cpu, (at, end)) in [(SMP_CODE0, SMP_CODE1), (SMP_CODE1, SMP_CODE_END)].into_iter().enumerate() {
        let mut e = Emitter { at, end };
        for step in program(cpu) {
            match step {
                SmpStep::Barrier(n) => e.hypercall(HC_BARRIER, n, 0)?,
                SmpStep::Write { gfn, value } => e.write(Gpa(gfn << 12), value)?,
                SmpStep::HarvestMine(n) => e.hypercall(HC_HARVEST_MINE, n, 0)?,
            }
        }
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

/// Prints what each vCPU saw and the `TDP-SMP {json}` line: the shared checks
/// (`tdp_metal::scenario::smp::SmpObserved::check`) on both vCPUs' harvests and the memory they wrote.
pub fn report(model: &str, outs: [&SmpOutcome; 2]) {
    let mut seen = SmpObserved::default();
    for (cpu, out) in outs.iter().enumerate() {
        println!(
            "SMP vCPU {cpu}: tag {}, {} exits, {} entry flushes, faults {:?}, ring {:?}",
            out.tag, out.exits, out.entry_flushes, out.counters, out.ring
        );
        for (n, set) in out.own_harvests.iter().enumerate() {
            println!("SMP vCPU {cpu} own harvest {n}: {} pages {set:x?}", set.len());
        }
        seen.errors[cpu] = out.error.clone();
        seen.done[cpu] = out.done;
        seen.own_harvests[cpu] = out.own_harvests.clone();
    }
    seen.memory = SHARED_PAGES
        .chain(OWN_PAGES[0].clone())
        .chain(OWN_PAGES[1].clone())
        .map(|g| (g, read_u64(g << 12)))
        .collect();
    seen.memory.sort_unstable();
    let _ = write_smp_line(&mut crate::serial::Serial, "bochs", model, &seen);
}

/// Prints the `TDP-SMP` line of a run whose second vCPU never reported (`error`).
pub fn report_lost(model: &str, out0: &SmpOutcome, error: String) {
    let lost = SmpOutcome { error: Some(error), ..SmpOutcome::default() };
    report(model, [out0, &lost]);
}
