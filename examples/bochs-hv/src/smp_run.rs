//! The two-vCPU part under VMX, after the scenario: the race slot is inserted, the second processor is
//! woken (`crate::smp`) and enters VMX operation with its own VMXON region and VMCS ([`ap_run`]), and
//! each processor runs one vCPU on the MMU the bootstrap processor built ([`run_cpu`]): its own VMCS,
//! PML page (when the CPU logs with PML) and dirty ring, the guest code and hypercalls of
//! `crate::smp_guest`. INVEPT acts on the processor that executes it only, so a flush the MMU asks for
//! on one processor must reach the other's TLB too: each vCPU compares the count of flushes the MMU has
//! asked for with the count at its previous entry and, if it moved, runs a single-context INVEPT on its
//! own processor before it enters (a flush request checked on entry, as SVM's vCPUs do with their ASID
//! flush; no IPI is needed as both vCPUs leave guest mode at every barrier).

use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;

use tdp_core::addr::Gfn;
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::VcpuMmu;
use tdp_metal::ring_sink::RingSink;
use tdp_metal::scenario::AS_ID;
use tdp_vmx::caps::{EptFeatures, VmxCapabilities};
use tdp_vmx::eptp::Eptp;
use tdp_vmx::instr::VmxInstructions;
use tdp_vmx::inv::invept_context;
use tdp_vmx::pml::{Pml, PmlPage};
use tdp_vmx::raw::X86Vmx;
use tdp_vmx::vcpu::{ExitAction, handle_exit};
use tdp_vmx::vmcs::{VmInstructionError, VmcsField as F};

use crate::boot::Page;
use crate::layout::host_addr;
use crate::smp_guest::{self, SmpOutcome};
use crate::vmx::{self, GuestRegs};
use crate::{MMU, VMX, println, smp};
use tdp_metal::scenario::smp::{RACE, RACE_PAGES, RACE_SLOT, SMP_PREFIX};

/// What the second processor needs from the first, set before it is woken.
struct SmpShared {
    caps: VmxCapabilities,
    features: EptFeatures,
    entries: [u64; 2],
}

static SMP: spin::Once<SmpShared> = spin::Once::new();

/// The second processor's VMXON region.
static AP_VMXON_REGION: Page = Page::zeroed();
/// Each vCPU's VMCS for the two-vCPU part (the first processor's scenario VMCS stays as it was).
static SMP_VMCS: [Page; 2] = [Page::zeroed(), Page::zeroed()];
/// Each vCPU's page-modification log.
static SMP_PML: [PmlPage; 2] = [PmlPage::new(), PmlPage::new()];
/// Entries of each vCPU's ring: the reserve covers a full PML log, the soft limit (1024 - 64 - 512 =
/// 448) is far above the 32 pages a vCPU writes between harvests.
const RING_ENTRIES: usize = 1024;
static SMP_RINGS: [[DirtyGfn; RING_ENTRIES]; 2] = [const { [const { DirtyGfn::zeroed() }; RING_ENTRIES] }; 2];

/// Exits after which a vCPU is declared stuck (each takes about 50).
const MAX_EXITS: u64 = 10_000;
/// The VMCALL exit reason (Intel SDM Vol. 3D, appendix "VMX Basic Exit Reasons").
const EXIT_VMCALL: u16 = 18;

/// Inserts the race slot, wakes the second processor and runs vCPU 0 here while it runs vCPU 1, then
/// prints the `TDP-SMP` line (`TDP-SMP skipped` when no second processor answered).
///
/// # Errors
/// The race slot or the two-vCPU guest cannot be set up, or the trampoline is malformed.
pub fn two_vcpus(
    model: &str,
    vmx: &X86Vmx,
    caps: VmxCapabilities,
    features: EptFeatures,
) -> Result<(), String> {
    let mmu = MMU.get().ok_or("no MMU")?;
    let entries = smp_guest::build().map_err(|e| format!("two-vCPU guest: {e}"))?;
    SMP.call_once(|| SmpShared { caps, features, entries });
    let race =
        Memslot::new(AS_ID, RACE_SLOT, Gfn(RACE), RACE_PAGES, host_addr(RACE << 12), SlotFlags::LOG_DIRTY);
    mmu.write().insert_memslot(race).map_err(|e| format!("race memslot: {e}"))?;
    let others = smp::wake_others()?;
    if others == 0 {
        println!("{SMP_PREFIX}skipped: one processor");
        return Ok(());
    }
    let out0 = run_cpu(0, vmx);
    match smp::wait_for_ap() {
        Err(e) => smp_guest::report_lost(model, &out0, e),
        Ok(out1) => smp_guest::report(model, [&out0, &out1]),
    }
    println!("SMP flushes: {:?}, other processors: {others}", mmu.host().tlb.stats());
    Ok(())
}

/// The second processor's work (called by `crate::smp` in long mode): VMXON with its own region, then
/// vCPU 1's two-vCPU part.
pub fn ap_run() -> SmpOutcome {
    let Some(shared) = SMP.get() else {
        return SmpOutcome { error: Some(String::from("vCPU 1: nothing shared")), ..SmpOutcome::default() };
    };
    if let Err(e) = vmx::vmxon(&VMX, &shared.caps, &AP_VMXON_REGION, &SMP_VMCS[1]) {
        smp_guest::give_up(1);
        return SmpOutcome { error: Some(format!("vCPU 1: VMXON: {e}")), ..SmpOutcome::default() };
    }
    smp::AP_STAGE.store(2, Ordering::Release);
    run_cpu(1, &VMX)
}

/// Runs vCPU `cpu`'s (0 or 1) two-vCPU part on this processor (in VMX operation; vCPU 1's VMCS is
/// current already) to its end or first error.
fn run_cpu(cpu: usize, vmx: &X86Vmx) -> SmpOutcome {
    let mut out = SmpOutcome::default();
    if let Err(e) = run_inner(cpu, vmx, &mut out) {
        out.error = Some(format!("vCPU {cpu}: {e}"));
    }
    if out.error.is_some() {
        smp_guest::give_up(cpu);
    }
    out
}

fn run_inner(cpu: usize, vmx: &X86Vmx, out: &mut SmpOutcome) -> Result<(), String> {
    let mmu = MMU.get().ok_or("no MMU")?;
    let shared = SMP.get().ok_or("nothing shared")?;
    let features = &shared.features;
    if cpu == 0 {
        vmx::load_vmcs(vmx, &shared.caps, &SMP_VMCS[0])?;
    }
    let mut vcpu = VcpuMmu::new();
    let root = mmu.load_root(&mut vcpu, AS_ID).map_err(|e| format!("root: {e}"))?;
    let eptp = Eptp::new(features, mmu.config(), root).map_err(|e| format!("EPTP: {e}"))?;
    mmu.host().tlb.load_eptp(eptp);
    crate::vmcs::setup(vmx, &shared.caps, eptp, shared.entries[cpu]).map_err(|e| format!("VMCS: {e}"))?;
    let mut pml = if mmu.config().pml {
        Some(Pml::enable(vmx, features, eptp, &SMP_PML[cpu]).map_err(|e| format!("PML: {e}"))?)
    } else {
        None
    };
    let cfg = RingConfig::new(RING_ENTRIES as u32, PML_ENTRIES).map_err(|e| format!("ring: {e}"))?;
    let producer = DirtyRingProducer::new(&SMP_RINGS[cpu], cfg).map_err(|e| format!("ring: {e}"))?;
    let mut consumer = DirtyRingConsumer::new(&SMP_RINGS[cpu], cfg).map_err(|e| format!("ring: {e}"))?;
    let mut sink = RingSink::new(producer).map_err(|e| format!("ring sink: {e}"))?;

    let mut regs = GuestRegs::default();
    let mut launched = false;
    // A fresh VMCS's first entry: flush whatever this processor cached for the EPTP before.
    let mut seen_flushes = u64::MAX;
    let result = (|| {
        for _ in 0..MAX_EXITS {
            let requests = mmu.host().tlb.stats().requests;
            if requests != seen_flushes {
                invept_context(vmx, features, eptp).map_err(|e| format!("INVEPT on entry: {e}"))?;
                out.entry_flushes += 1;
                seen_flushes = requests;
            }
            if vmx::enter(&mut regs, launched).is_err() {
                let error =
                    vmx.vmread(F::VM_INSTRUCTION_ERROR).map(|n| VmInstructionError::from_raw(n as u32));
                return Err(format!("VM entry failed: {error:?}"));
            }
            launched = true;
            out.exits += 1;
            let report = handle_exit(vmx, mmu, &mut vcpu, pml.as_mut(), &mut sink)
                .map_err(|e| format!("exit: {e}"))?;
            if sink.must_exit() {
                return Err(format!("dirty ring soft-full: {:?}", sink.stats()));
            }
            match report.action {
                ExitAction::Resume => {}
                ExitAction::Unhandled(reason) if reason.basic() == EXIT_VMCALL => {
                    let rip = vmx.vmread(F::GUEST_RIP).map_err(|e| format!("{e}"))?;
                    let len = vmx.vmread(F::VM_EXIT_INSTRUCTION_LEN).map_err(|e| format!("{e}"))?;
                    vmx.vmwrite(F::GUEST_RIP, rip + len).map_err(|e| format!("{e}"))?;
                    if smp_guest::hypercall(cpu, regs.rbx, regs.rdi, mmu, &mut sink, &mut consumer, out)? {
                        return Ok(());
                    }
                }
                other => {
                    let rip = vmx.vmread(F::GUEST_RIP).unwrap_or_default();
                    return Err(format!("unexpected exit {other:?} at rip {rip:#x}"));
                }
            }
        }
        Err(format!("no end after {MAX_EXITS} exits"))
    })();
    out.counters = Some(vcpu.counters);
    out.ring = Some(sink.stats());
    mmu.release_vcpu(&mut vcpu);
    result
}
