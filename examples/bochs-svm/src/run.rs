//! The probe: capabilities, enabling SVM, the MMU and the VMCB, the exit loop (`tdp_svm::vcpu::run`,
//! which hands #NPFs to tdp-core's fault handler), MMIO emulation, the hypercalls (start logging,
//! harvest, done), and the checks whose outcome is the `SVM-RESULT` line.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, Mmu, VcpuMmu};
use tdp_core::sync::Ordering;
use tdp_svm::asid::{AsidAllocator, TlbControl};
use tdp_svm::caps::{LEAF_EXT_FEATURES, LEAF_SVM, NptFeatures, SvmCapabilities};
use tdp_svm::exit::{SvmExit, code};
use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, RingSink, SvmHost, TableFrames};
use tdp_svm::instr::{GuestRegs, SvmInstructions};
use tdp_svm::msr;
use tdp_svm::raw::{HsavePage, X86Svm};
use tdp_svm::vcpu::{ExitAction, ExitReport, RunContext, SvmVcpu, install_root, run};
use tdp_svm::vmcb::{InterceptMisc1, InterceptMisc2, PAT_RESET, Vmcb, VmcbSegment};

use crate::guest::{self, DATA, HC_DONE, HC_FAIL, HC_HARVEST, HC_START_LOGGING};
use crate::layout::{GUEST_HOST_BASE, RAM_END, TABLE_POOL_END, TABLE_POOL_START, host_addr};
use crate::println;

static HSAVE: HsavePage = HsavePage::new();
static GUEST_RAM: [PhysRange; 1] = [PhysRange { start: GUEST_HOST_BASE, end: RAM_END }];
const RING_ENTRIES: usize = 1024;
static RING: [DirtyGfn; RING_ENTRIES] = [const { DirtyGfn::zeroed() }; RING_ENTRIES];

/// Exits after which the run is declared stuck.
const MAX_EXITS: u64 = 1000;
const AS_ID: AsId = AsId(0);
/// (slot, first gfn, pages): slot 0 holds the guest's tables, code and stack; slot 1 is the logged data.
const SLOTS: [(u16, u64, u64); 2] = [(0, 0, 512), (1, DATA >> 12, 512)];
/// The gfns each harvest must hold.
const HARVESTS: [&[u64]; 2] = [&[0x201, 0x203], &[0x201]];

unsafe extern "C" {
    static __kernel_end: u8;
}

type ProbeMmu = Mmu<SvmHost<'static, 'static>>;

/// Everything from the capabilities to the result line.
pub fn probe() -> Result<(), String> {
    let end = core::ptr::addr_of!(__kernel_end) as u64;
    if end > TABLE_POOL_START {
        return Err(format!("kernel ends at {end:#x}, inside the table pool"));
    }
    // SAFETY: CPL 0; the first GiB is identity-mapped (boot code), so every address below is physical;
    // VM_CR, VM_HSAVE_PA and EFER.SVME are touched only after `npt_features` found SVM present and not
    // disabled, and VMRUN only after both; the one VMCB runs a guest confined by nested tables tdp-core
    // builds over the two memslots in guest RAM, with VMRUN intercepted.
    let svm = unsafe { X86Svm::new() };
    let ext = svm.cpuid(LEAF_EXT_FEATURES, 0);
    let leaf_a = svm.cpuid(LEAF_SVM, 0);
    println!(
        "SVM-PROBE cpuid 8000_0001 ecx={:#010x} edx={:#010x}; 8000_000a eax={:#x} ebx={:#x} edx={:#x}",
        ext.ecx, ext.edx, leaf_a.eax, leaf_a.ebx, leaf_a.edx
    );
    let caps = SvmCapabilities::read(&svm);
    println!("SVM-PROBE caps {caps:?}");
    let npt = caps.npt_features().map_err(|e| format!("SVM capabilities: {e}"))?;
    println!("SVM-PROBE VM_CR={:#x} EFER before={:#x}", svm.rdmsr(msr::VM_CR), svm.rdmsr(msr::EFER));
    svm.set_hsave(&HSAVE);
    svm.enable_svme();
    println!(
        "SVM-PROBE EFER after={:#x} VM_HSAVE_PA={:#x} (page at {:#x})",
        svm.rdmsr(msr::EFER),
        svm.rdmsr(msr::VM_HSAVE_PA),
        HSAVE.addr()
    );

    let pages = (TABLE_POOL_END - TABLE_POOL_START) >> 12;
    // SAFETY: the pool is RAM below RAM_END, identity-mapped by the boot page tables, 4 KiB-aligned, and
    // used by nothing else: the kernel ends below it (checked above) and guest RAM starts above it.
    let region = unsafe { IdentityRegion::from_raw(TABLE_POOL_START, pages) };
    let frames = TableFrames::new(region).map_err(|e| format!("table pool: {e}"))?;
    // The `no-tlb-flush` experiment: flush requests are honoured with TLB_CONTROL 00h.
    let flushing = if cfg!(feature = "no-tlb-flush") {
        NptFeatures { flush_one: TlbControl::DoNothing, ..npt }
    } else {
        npt
    };
    let host = SvmHost::new(frames, IdentityTranslate::new(&GUEST_RAM, Level::L2), &flushing);
    let config = npt.mmu_config();
    let mmu: ProbeMmu = Mmu::new(host, config).map_err(|e| format!("MMU: {e}"))?;
    for (id, gfn, pages) in SLOTS {
        guest::zero(gfn << 12, pages);
        let slot = Memslot::new(AS_ID, SlotId(id), Gfn(gfn), pages, host_addr(gfn << 12), SlotFlags::empty());
        mmu.write().insert_memslot(slot).map_err(|e| format!("memslot {id}: {e}"))?;
    }
    let entry = guest::build()?;

    let mut vmcb = Box::new(Vmcb::new());
    setup_vmcb(&mut vmcb, entry);
    let mut mmu_vcpu = VcpuMmu::new();
    mmu.load_root(&mut mmu_vcpu, AS_ID).map_err(|e| format!("root: {e}"))?;
    let asid = AsidAllocator::new(npt.asids).alloc().map_err(|e| format!("ASID: {e}"))?;
    let mut svm_vcpu = SvmVcpu::new(asid, &mmu.host().tlb);
    let root = mmu_vcpu.root().ok_or("no root")?;
    let ncr3 = install_root(&mut vmcb, &mut svm_vcpu, &npt, &config, root).map_err(|e| format!("{e}"))?;
    println!(
        "SVM-PROBE nCR3={:#x} ASID={} flush value={:?}",
        ncr3.raw(),
        asid.raw(),
        mmu.host().tlb.flush_one()
    );

    let cfg = RingConfig::new(RING_ENTRIES as u32, 64).map_err(|e| format!("ring: {e}"))?;
    let producer = DirtyRingProducer::new(&RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let mut consumer = DirtyRingConsumer::new(&RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let mut sink = RingSink::new(producer).map_err(|e| format!("ring sink: {e}"))?;

    let mut p = Probe::default();
    let mut regs = GuestRegs::default();
    let mut npf_log: Vec<(u64, u64)> = Vec::new();
    let mut exits = 0u64;
    let mut observe = |vmcb: &Vmcb, report: &ExitReport| {
        exits += 1;
        if let SvmExit::Npf(npf) = report.exit
            && npf_log.len() < 16
        {
            npf_log.push((npf.error_code, vmcb.control.exit_info2));
        }
    };
    let mut cx = RunContext {
        mmu_vcpu: &mut mmu_vcpu,
        svm_vcpu: &mut svm_vcpu,
        regs: &mut regs,
        features: &npt,
        observe: &mut observe,
    };
    let outcome = loop {
        let report = match run(
            &svm,
            &mmu,
            &mmu.host().tlb,
            &mut vmcb,
            &mut cx,
            &mut sink,
            RingSink::must_exit,
            MAX_EXITS,
        ) {
            Ok(r) => r,
            Err(e) => break Err(format!("exit loop: {e}")),
        };
        if sink.must_exit() {
            break Err(format!("dirty ring soft-full: {:?}", sink.stats()));
        }
        let rip = vmcb.save.rip;
        let step = match report.action {
            ExitAction::Emulate { gpa, reason: EmulateReason::Mmio, .. } => p.emulate_mmio(&mut vmcb, gpa.0),
            ExitAction::Unhandled(code::VMMCALL) => {
                let next = if npt.nrip_save { vmcb.control.next_rip } else { rip + 3 };
                p.nrips.push((rip, vmcb.control.next_rip));
                let r = p.hypercall(&mmu, &mut sink, &mut consumer, cx.regs);
                vmcb.save.rip = next;
                r
            }
            other => Err(format!(
                "unexpected exit {other:?} (code {:#x}, info1 {:#x}, info2 {:#x}) at rip {rip:#x}",
                vmcb.control.exit_code, vmcb.control.exit_info1, vmcb.control.exit_info2
            )),
        };
        match step {
            Ok(false) => {}
            Ok(true) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    for (i, (info1, info2)) in npf_log.iter().enumerate() {
        println!("SVM-PROBE npf {i}: EXITINFO1={info1:#x} EXITINFO2={info2:#x}");
    }
    println!("SVM-PROBE nRIP at VMMCALLs (rip, nrip): {:x?}", p.nrips);
    println!(
        "SVM-PROBE {exits} exits; flushes {:?}; ring {:?}; table pages in use {}",
        mmu.host().tlb.stats(),
        sink.stats(),
        mmu.host().frames.stats().in_use
    );
    let root = mmu_vcpu.root().map(|r| r.pfn());
    let mut failures = Vec::new();
    if let Err(e) = outcome {
        failures.push(e);
    }
    p.check(&mut failures);
    if let Some(root) = root {
        for gfn in [0x10, 0x200, 0x201, 0x202, 0x203] {
            let (level, spte) = walk(&mmu, root, gfn);
            println!(
                "SVM-PROBE npt gfn {gfn:#x}: {level:?} leaf {spte:#018x} (A={} D={} W={})",
                spte >> 5 & 1,
                spte >> 6 & 1,
                spte >> 1 & 1
            );
        }
    }
    mmu.release_vcpu(&mut mmu_vcpu);
    if failures.is_empty() {
        println!(
            "SVM-RESULT pass: {} harvests as expected, {} MMIO reads emulated",
            p.harvests.len(),
            p.mmio_reads
        );
    } else {
        println!("SVM-RESULT fail: {failures:?}");
    }
    Ok(())
}

/// The guest's initial state: 64-bit mode, identity paging at `guest::PML4`, flat segments; HLT,
/// shutdown, every exception, VMRUN and VMMCALL intercepted.
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

/// The leaf mapping `gfn` in the nested tables at `root`: its level and value (0 when none).
fn walk(mmu: &ProbeMmu, root: Pfn, gfn: u64) -> (Option<Level>, u64) {
    let region = mmu.host().frames.region();
    let mut table = root;
    for (level, shift) in [(Level::L4, 27), (Level::L3, 18), (Level::L2, 9), (Level::L1, 0)] {
        let Some(t) = region.table(table) else { return (None, 0) };
        let e = t[((gfn >> shift) & 511) as usize].load(Ordering::Relaxed);
        if e & 1 == 0 {
            return (None, e);
        }
        if level == Level::L1 || e & 0x80 != 0 {
            return (Some(level), e);
        }
        table = Pfn((e & 0x000f_ffff_ffff_f000) >> 12);
    }
    (None, 0)
}

/// What the run saw.
#[derive(Default)]
struct Probe {
    logging: bool,
    harvests: Vec<BTreeSet<u64>>,
    mmio_reads: u64,
    nrips: Vec<(u64, u64)>,
    done: bool,
}

impl Probe {
    /// Emulates `mov rax, [moffs64]` (REX.W A1) at the guest's RIP.
    fn emulate_mmio(&mut self, vmcb: &mut Vmcb, gpa: u64) -> Result<bool, String> {
        let rip = vmcb.save.rip;
        if !(guest::CODE..guest::CODE + 0x1_0000 - 10).contains(&rip) {
            return Err(format!("MMIO at {gpa:#x} from rip {rip:#x} outside the guest code"));
        }
        let mut insn = [0u8; 10];
        // SAFETY: `rip` lies in the guest's code area (checked above), identity-mapped guest RAM nothing
        // else writes while the guest is stopped.
        unsafe { core::ptr::copy_nonoverlapping(host_addr(rip) as *const u8, insn.as_mut_ptr(), 10) };
        let mut moffs = [0u8; 8];
        moffs.copy_from_slice(&insn[2..]);
        if insn[..2] != [0x48, 0xa1] || u64::from_le_bytes(moffs) != gpa {
            return Err(format!("cannot emulate {insn:x?} at rip {rip:#x} for MMIO at {gpa:#x}"));
        }
        vmcb.save.rax = guest::mmio_value(gpa);
        vmcb.save.rip = rip + 10;
        self.mmio_reads += 1;
        Ok(false)
    }

    fn hypercall(
        &mut self,
        mmu: &ProbeMmu,
        sink: &mut RingSink<'static>,
        consumer: &mut DirtyRingConsumer<'static>,
        regs: &GuestRegs,
    ) -> Result<bool, String> {
        match regs.rbx {
            HC_DONE => {
                self.done = true;
                Ok(true)
            }
            HC_FAIL => Err(format!("MMIO read {} returned the wrong value", regs.rdi)),
            HC_START_LOGGING => {
                let slot = SlotId(u16::try_from(regs.rdi).map_err(|_| "slot out of range")?);
                let mut w = mmu.write();
                let flags = w.memslots().get(AS_ID, slot).map(|s| s.flags).ok_or("no such slot")?;
                let flush = w
                    .set_memslot_flags(AS_ID, slot, flags | SlotFlags::LOG_DIRTY)
                    .map_err(|e| format!("{e}"))?;
                drop(w);
                flush.run(mmu.host());
                self.logging = true;
                Ok(false)
            }
            HC_HARVEST => {
                if regs.rdi != self.harvests.len() as u64 {
                    return Err(format!("harvest {} out of order", regs.rdi));
                }
                let mut set = BTreeSet::new();
                consumer.harvest(usize::MAX, |e| {
                    let base = SLOTS.iter().find(|s| s.0 == e.slot.id().0).map_or(u64::MAX, |s| s.1);
                    set.insert(base.wrapping_add(e.offset));
                });
                let (_, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring));
                flush.run(mmu.host());
                println!("SVM-PROBE harvest {}: {set:x?}", regs.rdi);
                self.harvests.push(set);
                Ok(false)
            }
            other => Err(format!("unknown hypercall {other}")),
        }
    }

    fn check(&self, failures: &mut Vec<String>) {
        if !self.done {
            failures.push(String::from("the guest did not finish"));
        }
        for (i, want) in HARVESTS.iter().enumerate() {
            let got: Vec<u64> = self.harvests.get(i).map(|s| s.iter().copied().collect()).unwrap_or_default();
            if got != *want {
                failures.push(format!("harvest {i}: {got:x?}, expected {want:x?}"));
            }
        }
        if self.mmio_reads != 2 {
            failures.push(format!("{} MMIO reads emulated, expected 2", self.mmio_reads));
        }
        let mut last = BTreeSet::new();
        for &(gpa, value) in guest::WRITES.iter().rev() {
            if last.insert(gpa) && guest::read_u64(gpa) != value {
                failures.push(format!(
                    "guest memory at {gpa:#x} holds {:#x}, expected {value:#x}",
                    guest::read_u64(gpa)
                ));
            }
        }
    }
}
