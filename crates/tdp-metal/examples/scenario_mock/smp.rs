//! The `tdp-mock` runner of the two-vCPU part (`tdp_metal::scenario::smp`): two mock vCPUs on one MMU,
//! each with its own dirty ring, run their programs interleaved one step at a time (vCPU 0, vCPU 1,
//! vCPU 0, ...) and meet at each barrier, so they fault the same shared pages in turn; each harvest
//! resets its own ring against the MMU. Prints the same `TDP-SMP {json}` line as the Bochs kernels for
//! `cargo xtask bochs` to compare (the parts that do not depend on the interleaving).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use tdp_core::addr::{Gpa, Level};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::memslot::SlotFlags;
use tdp_metal::scenario::AS_ID;
use tdp_metal::scenario::smp::{
    OWN_PAGES, RACE, RACE_PAGES, RACE_SLOT, SHARED_PAGES, SmpObserved, SmpStep, program,
};
use tdp_mock::{HostConfig, Machine, Vcpu};

use crate::run::{Mode, RingSink, SharedSink};

/// One vCPU of the run: the mock vCPU, its program and where it is in it, its ring.
struct Runner {
    vcpu: Vcpu,
    program: Vec<SmpStep>,
    at: usize,
    sink: SharedSink,
    consumer: DirtyRingConsumer<'static>,
}

/// Runs the two-vCPU part on the mock in `mode` and returns what it saw.
///
/// # Errors
/// When the machine, the slot or a ring cannot be set up; what goes wrong while the vCPUs run is
/// recorded in the result instead.
pub fn run(mode: Mode) -> Result<SmpObserved, String> {
    let m = Machine::new(mode.config(), HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .map_err(|e| format!("mock machine: {e}"))?;
    let slot = m.ram_slot(AS_ID, RACE_SLOT, tdp_core::addr::Gfn(RACE), RACE_PAGES, SlotFlags::LOG_DIRTY);
    m.mmu().write().insert_memslot(slot).map_err(|e| format!("race memslot: {e}"))?;
    let cfg = RingConfig::new(1024, PML_ENTRIES).map_err(|e| format!("ring: {e}"))?;
    let mut runners = Vec::new();
    for cpu in 0..2 {
        let ring: &'static [DirtyGfn] = Box::leak((0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect());
        let producer = DirtyRingProducer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
        let consumer = DirtyRingConsumer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
        let sink = SharedSink(Arc::new(Mutex::new(RingSink { producer, lost: 0 })));
        let mut vcpu = m.new_vcpu(AS_ID);
        vcpu.set_dirty_sink(Box::new(sink.clone()));
        runners.push(Runner { vcpu, program: program(cpu), at: 0, sink, consumer });
    }
    let mut seen = SmpObserved::default();
    // Round robin: each turn, every vCPU not waiting at a barrier the other has not reached runs one
    // step. Bounded by the programs' length (each turn moves at least one vCPU, or the run is stuck).
    let total: usize = runners.iter().map(|r| r.program.len()).sum();
    for _ in 0..=total {
        if runners.iter().all(|r| r.at == r.program.len()) {
            break;
        }
        let mut moved = false;
        for cpu in 0..2 {
            let other_barrier = barrier_reached(&runners[1 - cpu]);
            let r = &mut runners[cpu];
            let Some(&step) = r.program.get(r.at) else { continue };
            if let SmpStep::Barrier(n) = step
                && other_barrier < n
            {
                continue;
            }
            if let Err(e) = exec(&m, r, step, &mut seen.own_harvests[cpu]) {
                seen.errors[cpu] = Some(format!("step {} ({step:?}): {e}", r.at));
                r.at = r.program.len();
                continue;
            }
            r.at += 1;
            moved = true;
        }
        if !moved {
            break;
        }
    }
    for (cpu, r) in runners.iter_mut().enumerate() {
        seen.done[cpu] = r.at == r.program.len() && seen.errors[cpu].is_none();
        if seen.errors[cpu].is_none() && !seen.done[cpu] {
            seen.errors[cpu] = Some(format!("stuck at step {}", r.at));
        }
        r.vcpu.release(m.mmu());
    }
    let host = m.host();
    let mut pages: Vec<u64> = SHARED_PAGES.chain(OWN_PAGES[0].clone()).chain(OWN_PAGES[1].clone()).collect();
    pages.sort_unstable();
    // The race slot is backed by guest RAM at its gfn's offset (`Machine::ram_slot`).
    seen.memory =
        pages.into_iter().map(|g| (g, host.read_hva_u64(host.guest_ram_base() + g * 4096, 0))).collect();
    Ok(seen)
}

/// The highest barrier `r` has passed or is waiting at (`u64::MAX` once it is done).
fn barrier_reached(r: &Runner) -> u64 {
    if r.at == r.program.len() {
        return u64::MAX;
    }
    r.program[..=r.at]
        .iter()
        .rev()
        .find_map(|s| if let SmpStep::Barrier(n) = s { Some(*n) } else { None })
        .unwrap_or(0)
}

/// Runs one step of `r`.
fn exec(m: &Machine, r: &mut Runner, step: SmpStep, harvests: &mut Vec<BTreeSet<u64>>) -> Result<(), String> {
    let mmu = m.mmu();
    match step {
        SmpStep::Barrier(_) => Ok(()),
        SmpStep::Write { gfn, value } => {
            r.vcpu.write_u64(mmu, Gpa(gfn << 12), value).map(drop).map_err(|e| format!("{e}"))
        }
        SmpStep::HarvestMine(n) => {
            if n != harvests.len() as u64 {
                return Err(format!("own harvest {n} out of order"));
            }
            r.vcpu.flush_pml(mmu);
            let mut set = BTreeSet::new();
            r.consumer.harvest(usize::MAX, |e| {
                set.insert(if e.slot.id() == RACE_SLOT { RACE.wrapping_add(e.offset) } else { u64::MAX });
            });
            let mut ring = r.sink.0.lock().unwrap_or_else(PoisonError::into_inner);
            let (_stats, flush) = mmu.write().reset_dirty_ring(&mut ring.producer);
            drop(ring);
            flush.run(m.host());
            harvests.push(set);
            Ok(())
        }
    }
}
