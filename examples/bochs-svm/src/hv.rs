//! One processor's hypervisor: its VMCB, ASID, root and dirty ring, the exit loop
//! (`tdp_svm::vcpu::run`, which hands #NPFs to tdp-core's fault handler on the MMU both processors
//! share), MMIO emulation and the hypercalls. [`run_cpu`] runs on the bootstrap processor for vCPU 0 and
//! on the second processor (from `ap`) for vCPU 1.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use tdp_core::addr::{AsId, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::{EmulateReason, FaultCounters, Mmu, VcpuMmu};
use tdp_svm::asid::AsidAllocator;
use tdp_svm::caps::NptFeatures;
use tdp_svm::exit::{SvmExit, code};
use tdp_svm::host::{RingSink, SvmHost};
use tdp_svm::instr::GuestRegs;
use tdp_svm::msr;
use tdp_svm::raw::X86Svm;
use tdp_svm::vcpu::{ExitAction, ExitReport, RunContext, SvmVcpu, install_root, run};
use tdp_svm::vmcb::{InterceptMisc1, InterceptMisc2, PAT_RESET, Vmcb, VmcbSegment};

use crate::guest::{self, HC_BARRIER, HC_DONE, HC_FAIL, HC_HARVEST, HC_HARVEST_MINE, HC_START_LOGGING};
use crate::layout::host_addr;

/// The MMU both processors share.
pub type ProbeMmu = Mmu<SvmHost<'static, 'static>>;
/// The address space of every memslot.
pub const AS_ID: AsId = AsId(0);
/// (slot, first gfn, pages, flags): slot 0 holds the guest's tables, code and stack; slot 1 is the data
/// vCPU 0 logs by hypercall; slot 2 the race slot, logged from the start.
pub const SLOTS: [(u16, u64, u64, SlotFlags); 3] = [
    (0, 0, 512, SlotFlags::empty()),
    (1, guest::DATA >> 12, 512, SlotFlags::empty()),
    (2, guest::RACE, 512, SlotFlags::LOG_DIRTY),
];

/// What both processors share, set up once by the bootstrap processor.
pub struct Shared {
    /// The MMU.
    pub mmu: ProbeMmu,
    /// The nested-paging features.
    pub npt: NptFeatures,
    /// The guest's entry points, per vCPU.
    pub entries: [u64; 2],
    /// The VM's ASIDs, one per vCPU.
    pub asids: spin::Mutex<AsidAllocator>,
}

/// Set by the bootstrap processor before it wakes the other.
pub static SHARED: spin::Once<Shared> = spin::Once::new();

/// Exits after which a vCPU is declared stuck.
const MAX_EXITS: u64 = 10_000;
const RING_ENTRIES: usize = 1024;
static RINGS: [[DirtyGfn; RING_ENTRIES]; 2] = [const { [const { DirtyGfn::zeroed() }; RING_ENTRIES] }; 2];
/// The last barrier each vCPU reached.
static BARRIERS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Spins a barrier waits at most before it fails.
const BARRIER_SPINS: u64 = 50_000_000;

/// What one vCPU's run saw.
#[derive(Default)]
pub struct Outcome {
    /// The first error, if any.
    pub error: Option<String>,
    /// The guest reached its `done` hypercall.
    pub done: bool,
    /// Exits taken.
    pub exits: u64,
    /// The first #NPFs: (EXITINFO1, EXITINFO2).
    pub npfs: Vec<(u64, u64)>,
    /// (RIP, nRIP) at each VMMCALL exit.
    pub nrips: Vec<(u64, u64)>,
    /// Harvests of the one-vCPU part (vCPU 0).
    pub harvests: Vec<BTreeSet<u64>>,
    /// Harvests of the two-vCPU part (this vCPU's own ring).
    pub own_harvests: Vec<BTreeSet<u64>>,
    /// MMIO reads emulated.
    pub mmio_reads: u64,
    /// What the vCPU's faults came to.
    pub counters: Option<FaultCounters>,
    /// The vCPU's root (for the walk after the run).
    pub root: Option<tdp_core::addr::Pfn>,
    /// The ring's counters.
    pub ring: Option<tdp_svm::host::SinkStats>,
    /// The vCPU's ASID.
    pub asid: u32,
}

/// The guest's initial state for the vCPU entering at `entry`: 64-bit mode, identity paging at
/// `guest::PML4`, flat segments; HLT, shutdown, every exception, VMRUN and VMMCALL intercepted.
fn setup_vmcb(vmcb: &mut Vmcb, entry: u64) {
    let c = &mut vmcb.control;
    c.intercept_exceptions = 0xffff_ffff;
    c.intercept_misc1 = InterceptMisc1::HLT | InterceptMisc1::SHUTDOWN;
    c.intercept_misc2 = InterceptMisc2::VMRUN | InterceptMisc2::VMMCALL;
    let s = &mut vmcb.save;
    s.cs = VmcbSegment::from_descriptor(0x08, 0x00af_9b00_0000_ffff);
    let data = VmcbSegment::from_descriptor(0x10, 0x00cf_9300_0000_ffff);
    (s.ds, s.es, s.ss) = (data, data, data);
    s.efer = msr::EFER_SVME | msr::EFER_LME | msr::EFER_LMA;
    s.cr0 = 0x8000_0031; // PG, NE, ET, PE
    s.cr4 = 0x20; // PAE
    s.cr3 = guest::PML4;
    s.rflags = 0x2;
    s.rip = entry;
    s.rsp = guest::STACK_TOP;
    s.dr6 = 0xffff_0ff0;
    s.dr7 = 0x400;
    s.g_pat = PAT_RESET;
}

/// Runs vCPU `cpu` (0 or 1) on this processor, whose SVM is enabled, to its end or first error.
pub fn run_cpu(cpu: usize, svm: &X86Svm, shared: &Shared) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = run_inner(cpu, svm, shared, &mut out) {
        out.error = Some(e);
    }
    if out.error.is_some() {
        // Release the other vCPU from any barrier: this one will never reach it.
        BARRIERS[cpu].store(u64::MAX, Ordering::Release);
    }
    out
}

fn run_inner(cpu: usize, svm: &X86Svm, shared: &Shared, out: &mut Outcome) -> Result<(), String> {
    let mmu = &shared.mmu;
    let npt = &shared.npt;
    let mut vmcb = Box::new(Vmcb::new());
    setup_vmcb(&mut vmcb, shared.entries[cpu]);
    let mut mmu_vcpu = VcpuMmu::new();
    mmu.load_root(&mut mmu_vcpu, AS_ID).map_err(|e| format!("root: {e}"))?;
    let asid = shared.asids.lock().alloc().map_err(|e| format!("ASID: {e}"))?;
    out.asid = asid.raw();
    let mut svm_vcpu = SvmVcpu::new(asid, &mmu.host().tlb);
    let root = mmu_vcpu.root().ok_or("no root")?;
    install_root(&mut vmcb, &mut svm_vcpu, npt, mmu.config(), root).map_err(|e| format!("{e}"))?;
    out.root = Some(root.pfn());

    let cfg = RingConfig::new(RING_ENTRIES as u32, 64).map_err(|e| format!("ring: {e}"))?;
    let producer = DirtyRingProducer::new(&RINGS[cpu], cfg).map_err(|e| format!("ring: {e}"))?;
    let mut consumer = DirtyRingConsumer::new(&RINGS[cpu], cfg).map_err(|e| format!("ring: {e}"))?;
    let mut sink = RingSink::new(producer).map_err(|e| format!("ring sink: {e}"))?;

    let mut regs = GuestRegs::default();
    let mut exits = 0u64;
    let mut npfs: Vec<(u64, u64)> = Vec::new();
    let mut observe = |vmcb: &Vmcb, report: &ExitReport| {
        exits += 1;
        if let SvmExit::Npf(npf) = report.exit
            && npfs.len() < 16
        {
            npfs.push((npf.error_code, vmcb.control.exit_info2));
        }
    };
    let mut cx = RunContext {
        mmu_vcpu: &mut mmu_vcpu,
        svm_vcpu: &mut svm_vcpu,
        regs: &mut regs,
        features: npt,
        observe: &mut observe,
    };
    let result = loop {
        let report = match run(
            svm,
            mmu,
            &mmu.host().tlb,
            &mut vmcb,
            &mut cx,
            &mut sink,
            RingSink::must_exit,
            MAX_EXITS,
        ) {
            Ok(r) => r,
            Err(e) => break Err(format!("vCPU {cpu}: exit loop: {e}")),
        };
        if sink.must_exit() {
            break Err(format!("vCPU {cpu}: dirty ring soft-full: {:?}", sink.stats()));
        }
        let rip = vmcb.save.rip;
        let step = match report.action {
            ExitAction::Emulate { gpa, reason: EmulateReason::Mmio, .. } => {
                emulate_mmio(&mut vmcb, gpa.0, out)
            }
            ExitAction::Unhandled(code::VMMCALL) => {
                let next = if npt.nrip_save { vmcb.control.next_rip } else { rip.wrapping_add(3) };
                out.nrips.push((rip, vmcb.control.next_rip));
                let r = hypercall(cpu, mmu, &mut sink, &mut consumer, cx.regs, out);
                vmcb.save.rip = next;
                r
            }
            other => Err(format!(
                "vCPU {cpu}: unexpected exit {other:?} (code {:#x}, info1 {:#x}, info2 {:#x}) at rip {rip:#x}",
                vmcb.control.exit_code, vmcb.control.exit_info1, vmcb.control.exit_info2
            )),
        };
        match step {
            Ok(false) => {}
            Ok(true) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    out.exits = exits;
    out.npfs = npfs;
    out.counters = Some(mmu_vcpu.counters);
    out.ring = Some(sink.stats());
    mmu.release_vcpu(&mut mmu_vcpu);
    result
}

/// Emulates `mov rax, [moffs64]` (REX.W A1) at the guest's RIP.
fn emulate_mmio(vmcb: &mut Vmcb, gpa: u64, out: &mut Outcome) -> Result<bool, String> {
    let rip = vmcb.save.rip;
    if !(guest::CODE..guest::CODE_END - 10).contains(&rip) {
        return Err(format!("MMIO at {gpa:#x} from rip {rip:#x} outside the guest code"));
    }
    let mut insn = [0u8; 10];
    // SAFETY: `rip` lies in the guest's code area (checked above), identity-mapped guest RAM nothing
    // writes while the guest runs.
    unsafe { core::ptr::copy_nonoverlapping(host_addr(rip) as *const u8, insn.as_mut_ptr(), 10) };
    let mut moffs = [0u8; 8];
    moffs.copy_from_slice(&insn[2..]);
    if insn[..2] != [0x48, 0xa1] || u64::from_le_bytes(moffs) != gpa {
        return Err(format!("cannot emulate {insn:x?} at rip {rip:#x} for MMIO at {gpa:#x}"));
    }
    vmcb.save.rax = guest::mmio_value(gpa);
    vmcb.save.rip = rip + 10;
    out.mmio_reads += 1;
    Ok(false)
}

/// Waits until the other vCPU reached barrier `n` (or gave up).
fn barrier(cpu: usize, n: u64) -> Result<(), String> {
    BARRIERS[cpu].store(n, Ordering::Release);
    for _ in 0..BARRIER_SPINS {
        match BARRIERS[1 - cpu].load(Ordering::Acquire) {
            u64::MAX => return Err(format!("vCPU {cpu}: the other vCPU failed before barrier {n}")),
            m if m >= n => return Ok(()),
            _ => core::hint::spin_loop(),
        }
    }
    Err(format!("vCPU {cpu}: barrier {n} not reached by the other vCPU"))
}

/// Harvests this vCPU's ring into a set of gfns and resets it (re-protecting what was harvested), then
/// runs the flush the reset owes.
fn harvest(
    mmu: &ProbeMmu,
    sink: &mut RingSink<'static>,
    consumer: &mut DirtyRingConsumer<'static>,
) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    consumer.harvest(usize::MAX, |e| {
        let base = SLOTS.iter().find(|s| s.0 == e.slot.id().0).map_or(u64::MAX, |s| s.1);
        set.insert(base.wrapping_add(e.offset));
    });
    let (_, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring));
    flush.run(mmu.host());
    set
}

fn hypercall(
    cpu: usize,
    mmu: &ProbeMmu,
    sink: &mut RingSink<'static>,
    consumer: &mut DirtyRingConsumer<'static>,
    regs: &GuestRegs,
    out: &mut Outcome,
) -> Result<bool, String> {
    match regs.rbx {
        HC_DONE => {
            out.done = true;
            BARRIERS[cpu].store(u64::MAX - 1, Ordering::Release);
            Ok(true)
        }
        HC_FAIL => Err(format!("vCPU {cpu}: MMIO read {} returned the wrong value", regs.rdi)),
        HC_START_LOGGING => {
            let slot = SlotId(u16::try_from(regs.rdi).map_err(|_| "slot out of range")?);
            let mut w = mmu.write();
            let flags = w.memslots().get(AS_ID, slot).map(|s| s.flags).ok_or("no such slot")?;
            let flush =
                w.set_memslot_flags(AS_ID, slot, flags | SlotFlags::LOG_DIRTY).map_err(|e| format!("{e}"))?;
            drop(w);
            flush.run(mmu.host());
            Ok(false)
        }
        HC_HARVEST => {
            if regs.rdi != out.harvests.len() as u64 {
                return Err(format!("harvest {} out of order", regs.rdi));
            }
            out.harvests.push(harvest(mmu, sink, consumer));
            Ok(false)
        }
        HC_BARRIER => barrier(cpu, regs.rdi).map(|()| false),
        HC_HARVEST_MINE => {
            if regs.rdi != out.own_harvests.len() as u64 {
                return Err(format!("vCPU {cpu}: own harvest {} out of order", regs.rdi));
            }
            out.own_harvests.push(harvest(mmu, sink, consumer));
            Ok(false)
        }
        other => Err(format!("vCPU {cpu}: unknown hypercall {other}")),
    }
}
