//! The shared scenario (`tdp_metal::scenario::SCENARIO`) on one vCPU under SVM: the guest that
//! `examples/bochs-hv`'s generator writes (with VMMCALL as its hypercall), nested tables that tdp-core's
//! MMU builds from the #NPF exits, MMIO emulated from reserved-bit #NPFs, dirty logging by write
//! protection into a tdp-core dirty ring, writes to a tracked page emulated, and the host's steps
//! (harvests, aging, moving a page, stopping logging, tracking, NX huge pages, snapshots) through
//! `host_steps`, the code `bochs-hv` runs for them. What the run saw becomes the `TDP-RESULT` line.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{Pfn, SlotId};
use tdp_core::dirty_ring::DirtyGfn;
use tdp_core::mmu::EmulateReason;
use tdp_core::sync::Ordering;
use tdp_metal::scenario::{Broken, Observed, Paging, SCENARIO, Translation};
use tdp_svm::exit::code;
use tdp_svm::raw::X86Svm;
use tdp_svm::vcpu::ExitAction;

use crate::hv::{Shared, Vcpu};
use crate::{BROKEN, guest, host_steps};

/// Entries of the scenario's ring: room for its largest harvest (560 pages) below the soft limit.
const RING_ENTRIES: usize = 2048;
static RING: [DirtyGfn; RING_ENTRIES] = [const { DirtyGfn::zeroed() }; RING_ENTRIES];

/// Runs the scenario on vCPU 0 (the guest's code is in place) and returns what it saw; `bases` are the
/// slots' (and the remap pool's) host bases for decoding translations.
pub fn run(svm: &X86Svm, shared: &Shared, bases: &[(u16, u64, u64)]) -> Observed {
    let mut seen = Observed::default();
    match Vcpu::new(svm, shared, guest::CODE, &RING, 64) {
        Ok(mut vcpu) => {
            if let Err(e) = steps(&mut vcpu, bases, &mut seen) {
                seen.guest_error = Some(e);
            }
            (seen.slot_faults, seen.exec_faults) = vcpu.slot_faults;
            seen.ept_violations = vcpu.npfs;
            seen.ept_misconfigs = vcpu.rsvd_npfs;
            seen.flushes = shared.mmu.host().tlb.stats().requests;
            seen.invepts = vcpu.svm_vcpu.flushed_generation();
            seen.ring_lost = vcpu.sink.stats().lost;
            if seen.translations.is_empty() {
                // Taken at the NX step when the run reached it (turning NX on replaces the root).
                seen.translations = sample(&vcpu, bases);
            }
            seen.host_reads = host_steps::host_reads(&SCENARIO, &shared.mmu.host().translate);
            crate::println!(
                "bochs-svm: scenario on ASID {}: {} exits, faults {:?}, ring {:?}, flushes {:?}",
                vcpu.svm_vcpu.asid().raw(),
                vcpu.exits,
                vcpu.mmu_vcpu.counters,
                vcpu.sink.stats(),
                shared.mmu.host().tlb.stats()
            );
            vcpu.release();
        }
        Err(e) => seen.guest_error = Some(format!("vCPU 0: {e}")),
    }
    seen
}

/// The translations of the scenario's sample gfns in the vCPU's nested tables.
fn sample(vcpu: &Vcpu<'_>, bases: &[(u16, u64, u64)]) -> Vec<Translation> {
    let Some(root) = vcpu.root() else { return Vec::new() };
    let region = vcpu.mmu().host().frames.region();
    let read = |t: u64, i: usize| region.table(Pfn(t)).map_or(0, |t| t[i % 512].load(Ordering::Relaxed));
    host_steps::sample(&SCENARIO, Paging::Npt, read, root.0, bases)
}

/// The translations of `gfns` in the vCPU's nested tables.
fn sample_gfns(vcpu: &Vcpu<'_>, bases: &[(u16, u64, u64)], gfns: Vec<u64>) -> Vec<Translation> {
    let Some(root) = vcpu.root() else { return Vec::new() };
    let region = vcpu.mmu().host().frames.region();
    let read = |t: u64, i: usize| region.table(Pfn(t)).map_or(0, |t| t[i % 512].load(Ordering::Relaxed));
    host_steps::sample_gfns(gfns, Paging::Npt, read, root.0, bases)
}

/// Runs the guest to its end or first error.
fn steps(vcpu: &mut Vcpu<'_>, bases: &[(u16, u64, u64)], seen: &mut Observed) -> Result<(), String> {
    let mmu = vcpu.mmu();
    loop {
        let action = vcpu.next_exit()?;
        match action {
            ExitAction::Emulate { gpa, reason: EmulateReason::Mmio, .. } => {
                let rip = vcpu.vmcb.save.rip;
                let code = guest::CODE..guest::CODE_END;
                let (rax, len) = host_steps::emulate_mmio(code, rip, gpa.0, vcpu.vmcb.save.rax, seen)?;
                vcpu.vmcb.save.rax = rax;
                vcpu.vmcb.save.rip = rip + len;
                continue;
            }
            ExitAction::Emulate { gpa, reason: EmulateReason::WriteTracked, .. } => {
                let rip = vcpu.vmcb.save.rip;
                let code = guest::CODE..guest::CODE_END;
                let len = host_steps::emulate_tracked_write(code, rip, gpa.0, vcpu.vmcb.save.rax, seen)?;
                vcpu.vmcb.save.rip = rip + len;
                continue;
            }
            ExitAction::Unhandled(code::VMMCALL) => {}
            other => return Err(vcpu.describe_exit(&other)),
        }
        vcpu.skip_vmmcall();
        (seen.slot_faults, seen.exec_faults) = vcpu.slot_faults;
        // The guest's RAX lives in the VMCB under SVM.
        let (number, arg, rax) = (vcpu.regs.rbx, vcpu.regs.rdi, vcpu.vmcb.save.rax);
        match number {
            guest::HC_DONE => {
                seen.steps_completed = SCENARIO.steps.len();
                return Ok(());
            }
            guest::HC_FAIL => {
                let step = usize::try_from(arg).unwrap_or(usize::MAX);
                seen.steps_completed = step;
                let want = SCENARIO.expected_read(step);
                return Err(format!("step {step}: read {rax:#x}, expected {want:x?}"));
            }
            guest::HC_START_LOGGING => {
                let slot =
                    u16::try_from(arg).map_err(|_| format!("start logging: slot {arg:#x} out of range"))?;
                seen.early_translations = sample(vcpu, bases);
                host_steps::start_logging(mmu, SlotId(slot))?;
                if BROKEN == Some(Broken::Npt) {
                    unprotect_slot(vcpu, SlotId(slot))?;
                }
            }
            guest::HC_HARVEST => {
                if arg != seen.harvests.len() as u64 {
                    return Err(format!("harvest {arg} out of order"));
                }
                seen.harvests.push(host_steps::harvest(mmu, &SCENARIO, &mut vcpu.sink, &mut vcpu.consumer));
                seen.ring_lost = vcpu.sink.stats().lost;
            }
            guest::HC_AGE => {
                seen.young.push(host_steps::age(mmu, &SCENARIO, arg, BROKEN == Some(Broken::Age))?);
            }
            guest::HC_REMAP => {
                let broken = BROKEN == Some(Broken::Remap);
                host_steps::remap(mmu, &mmu.host().translate, &SCENARIO, arg, broken)?;
            }
            guest::HC_STEP => {
                let sample = |gfns: Vec<u64>| sample_gfns(vcpu, bases, gfns);
                let after = host_steps::run_step(mmu, &SCENARIO, arg, BROKEN, seen, sample)?;
                if after == host_steps::After::ReloadRoot {
                    vcpu.reload_root_if_invalid()?;
                }
                continue;
            }
            other => return Err(format!("unknown hypercall {other} at rip {:#x}", vcpu.vmcb.save.rip)),
        }
        // Host steps start a new fault count for the next snapshot (`run_step` does it for its own).
        seen.host_step();
    }
}

/// The must-fail variant `broken-npt`: right after the core started dirty logging on `slot`, sets W
/// and D again on every present nested leaf of the slot (`tdp_metal::scenario::unprotect_leaves`),
/// behind the core's back, and asks for a flush (Bochs flushes at every VMRUN anyway). Guest writes
/// then escape the dirty log and the harvest checks must fail.
fn unprotect_slot(vcpu: &Vcpu<'_>, slot: SlotId) -> Result<u64, String> {
    let mmu = vcpu.mmu();
    let (base, pages) = {
        let shared = mmu.read();
        let s = shared
            .memslots()
            .get(tdp_metal::scenario::AS_ID, slot)
            .ok_or_else(|| format!("broken-npt: no slot {}", slot.0))?;
        (s.base_gfn.0, s.pages)
    };
    let root = vcpu.root().ok_or("broken-npt: no root")?;
    let frames = mmu.host().frames.region();
    let changed = tdp_metal::scenario::unprotect_leaves(
        Paging::Npt,
        |pfn| frames.table(Pfn(pfn)),
        root.0,
        base,
        pages,
        true,
    );
    tdp_core::host::TlbFlush::flush_all(&mmu.host().tlb);
    Ok(changed)
}
