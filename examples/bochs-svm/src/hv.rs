//! One vCPU on one processor: its VMCB, ASID, root and dirty ring, and the exit loop
//! (`tdp_svm::vcpu::run`, which hands #NPFs to tdp-core's fault handler on the MMU every processor
//! shares) up to the next exit the hypervisor handles ([`Vcpu`]); and the two-vCPU part's run on each
//! processor ([`run_cpu`], its hypercalls in `crate::smp_guest`), on the bootstrap processor for vCPU 0
//! and on the second processor ([`ap_run`], called by `crate::smp`) for vCPU 1.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use tdp_core::addr::Pfn;
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::fault::AccessKind;
use tdp_core::fault::npf_code;
use tdp_core::mmu::{Mmu, VcpuMmu};
use tdp_metal::scenario::{AS_ID, Observed, SCENARIO};
use tdp_svm::asid::AsidAllocator;
use tdp_svm::caps::NptFeatures;
use tdp_svm::exit::{SvmExit, code};
use tdp_svm::host::{RingSink, SvmHost};
use tdp_svm::instr::{GuestRegs, SvmInstructions};
use tdp_svm::msr;
use tdp_svm::raw::{HsavePage, X86Svm};
use tdp_svm::vcpu::{ExitAction, ExitReport, RunContext, SvmVcpu, install_root, run};
use tdp_svm::vmcb::{InterceptMisc1, InterceptMisc2, PAT_RESET, Vmcb, VmcbSegment};

use crate::guest;
use crate::smp_guest::{self, SmpOutcome};

/// The MMU every processor shares.
pub type SvmMmu = Mmu<SvmHost<'static, 'static>>;

/// What every processor shares, set up once by the bootstrap processor.
pub struct Shared {
    /// The MMU.
    pub mmu: SvmMmu,
    /// The nested-paging features.
    pub npt: NptFeatures,
    /// The two-vCPU part's entry points, per vCPU.
    pub smp_entries: [u64; 2],
    /// The VM's ASIDs, one per vCPU.
    pub asids: spin::Mutex<AsidAllocator>,
}

/// Set by the bootstrap processor before it wakes the other.
pub static SHARED: spin::Once<Shared> = spin::Once::new();

/// Exits after which a vCPU is declared stuck (the scenario takes about 1,150).
const MAX_EXITS: u64 = 10_000;
/// Entries of each two-vCPU ring.
const SMP_RING_ENTRIES: usize = 1024;
static SMP_RINGS: [[DirtyGfn; SMP_RING_ENTRIES]; 2] =
    [const { [const { DirtyGfn::zeroed() }; SMP_RING_ENTRIES] }; 2];

/// The guest's initial state for a vCPU entering at `entry`: 64-bit mode, identity paging at
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

/// One vCPU: what the exit loop needs, and what it counted.
pub struct Vcpu<'s> {
    svm: &'s X86Svm,
    shared: &'s Shared,
    /// The VMCB (guest state and the last exit).
    pub vmcb: Box<Vmcb>,
    /// The vCPU's MMU state: its root, page cache and fault counters.
    pub mmu_vcpu: VcpuMmu,
    /// Its ASID and flush state.
    pub svm_vcpu: SvmVcpu,
    /// The guest's registers the VMCB does not hold.
    pub regs: GuestRegs,
    /// Its dirty ring's producer, the MMU's dirty sink for its faults.
    pub sink: RingSink<'static>,
    /// The ring's consumer.
    pub consumer: DirtyRingConsumer<'static>,
    /// Exits taken.
    pub exits: u64,
    /// #NPFs that were not reserved-bit ones (EPT violations' counterpart).
    pub npfs: u64,
    /// Reserved-bit #NPFs (an MMIO entry hit again: EPT misconfigurations' counterpart).
    pub rsvd_npfs: u64,
    /// Of `npfs`, those at gfns in the scenario's non-system slots that were not only a stale root
    /// (`tdp_metal::scenario::Observed::count_fault`), and of those the fetches.
    pub slot_faults: (u64, u64),
}

impl<'s> Vcpu<'s> {
    /// vCPU entering at `entry` on this processor (whose SVM is enabled), with the ring in `ring`.
    ///
    /// # Errors
    /// No root, no ASID left, or a ring the configuration refuses.
    pub fn new(
        svm: &'s X86Svm,
        shared: &'s Shared,
        entry: u64,
        ring: &'static [DirtyGfn],
        reserve: u32,
    ) -> Result<Vcpu<'s>, String> {
        let mmu = &shared.mmu;
        let mut vmcb = Box::new(Vmcb::new());
        setup_vmcb(&mut vmcb, entry);
        let mut mmu_vcpu = VcpuMmu::new();
        mmu.load_root(&mut mmu_vcpu, AS_ID).map_err(|e| format!("root: {e}"))?;
        let asid = shared.asids.lock().alloc().map_err(|e| format!("ASID: {e}"))?;
        let mut svm_vcpu = SvmVcpu::new(asid, &mmu.host().tlb);
        let root = mmu_vcpu.root().ok_or("no root")?;
        install_root(&mut vmcb, &mut svm_vcpu, &shared.npt, mmu.config(), root)
            .map_err(|e| format!("{e}"))?;
        let entries = u32::try_from(ring.len()).map_err(|_| "ring too large")?;
        let cfg = RingConfig::new(entries, reserve).map_err(|e| format!("ring: {e}"))?;
        let producer = DirtyRingProducer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
        let consumer = DirtyRingConsumer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
        let sink = RingSink::new(producer).map_err(|e| format!("ring sink: {e}"))?;
        Ok(Vcpu {
            svm,
            shared,
            vmcb,
            mmu_vcpu,
            svm_vcpu,
            regs: GuestRegs::default(),
            sink,
            consumer,
            exits: 0,
            npfs: 0,
            rsvd_npfs: 0,
            slot_faults: (0, 0),
        })
    }

    /// The MMU.
    pub fn mmu(&self) -> &'s SvmMmu {
        &self.shared.mmu
    }

    /// The vCPU's root.
    pub fn root(&self) -> Option<Pfn> {
        self.mmu_vcpu.root().map(|r| r.pfn())
    }

    /// VMRUNs until an exit the hypervisor handles (MMIO to emulate, a VMMCALL, anything else), and
    /// returns what to do about it.
    ///
    /// # Errors
    /// The exit loop's error, or a ring at its soft limit (the scenario sizes rings so that it never
    /// is between harvests).
    pub fn next_exit(&mut self) -> Result<ExitAction, String> {
        let mmu = self.mmu();
        let (mut exits, mut npfs, mut rsvd) = (0u64, 0u64, 0u64);
        let mut counted = Observed::default();
        let mut observe = |_: &Vmcb, report: &ExitReport| {
            exits += 1;
            if let SvmExit::Npf(npf) = report.exit {
                if npf.error_code & npf_code::RSVD != 0 {
                    rsvd += 1;
                } else {
                    npfs += 1;
                    if !matches!(report.action, ExitAction::ReloadRoot) {
                        let exec = npf.fault.access == AccessKind::Exec;
                        counted.count_fault(&SCENARIO, npf.fault.gpa.gfn().0, exec);
                    }
                }
            }
        };
        let mut cx = RunContext {
            mmu_vcpu: &mut self.mmu_vcpu,
            svm_vcpu: &mut self.svm_vcpu,
            regs: &mut self.regs,
            features: &self.shared.npt,
            observe: &mut observe,
        };
        let report = run(
            self.svm,
            mmu,
            &mmu.host().tlb,
            &mut self.vmcb,
            &mut cx,
            &mut self.sink,
            RingSink::must_exit,
            MAX_EXITS,
        );
        self.exits += exits;
        self.npfs += npfs;
        self.rsvd_npfs += rsvd;
        self.slot_faults.0 += counted.slot_faults;
        self.slot_faults.1 += counted.exec_faults;
        let report = report.map_err(|e| format!("exit loop: {e}"))?;
        if self.sink.must_exit() {
            return Err(format!("dirty ring soft-full between harvests: {:?}", self.sink.stats()));
        }
        Ok(report.action)
    }

    /// Loads a new root when the current one was invalidated (turning NX huge pages on invalidates
    /// every root), as the exit loop does when a fault reports it, and installs it in the VMCB.
    ///
    /// # Errors
    /// The root cannot be loaded or installed.
    pub fn reload_root_if_invalid(&mut self) -> Result<(), String> {
        let mmu = self.mmu();
        if self.mmu_vcpu.root().is_some_and(|r| mmu.root_is_valid(r)) {
            return Ok(());
        }
        mmu.load_root(&mut self.mmu_vcpu, AS_ID).map_err(|e| format!("reloading the root: {e}"))?;
        let root = self.mmu_vcpu.root().ok_or("no root after a reload")?;
        install_root(&mut self.vmcb, &mut self.svm_vcpu, &self.shared.npt, mmu.config(), root)
            .map_err(|e| format!("installing the new root: {e}"))?;
        Ok(())
    }

    /// Moves RIP past the VMMCALL that exited: to nRIP where the CPU saves it, else by its 3 bytes.
    pub fn skip_vmmcall(&mut self) {
        let rip = self.vmcb.save.rip;
        self.vmcb.save.rip =
            if self.shared.npt.nrip_save { self.vmcb.control.next_rip } else { rip.wrapping_add(3) };
    }

    /// A description of the last exit, for an error.
    pub fn describe_exit(&self, action: &ExitAction) -> String {
        let c = &self.vmcb.control;
        format!(
            "unexpected exit {action:?} (code {:#x}, info1 {:#x}, info2 {:#x}) at rip {:#x}",
            c.exit_code, c.exit_info1, c.exit_info2, self.vmcb.save.rip
        )
    }

    /// Gives the root back to the MMU.
    pub fn release(&mut self) {
        self.mmu().release_vcpu(&mut self.mmu_vcpu);
    }
}

/// The second processor's host save area.
static AP_HSAVE: HsavePage = HsavePage::new();

/// The second processor's work (called by `crate::smp` in long mode): enables SVM on it with its own
/// host save area and runs vCPU 1's two-vCPU part.
pub fn ap_run() -> SmpOutcome {
    let Some(shared) = SHARED.get() else {
        return SmpOutcome { error: Some(String::from("vCPU 1: no shared MMU")), ..SmpOutcome::default() };
    };
    // SAFETY: CPL 0 on the same identity mapping as the bootstrap processor; CPUID reported SVM with
    // nested paging there (every processor of a Bochs machine is the same model) before the shared state
    // was set; the VMCB `run_cpu` runs confines its guest to tdp-core's tables.
    let svm = unsafe { X86Svm::new() };
    svm.set_hsave(&AP_HSAVE);
    svm.enable_svme();
    crate::smp::AP_STAGE.store(2, core::sync::atomic::Ordering::Release);
    run_cpu(1, &svm, shared)
}

/// Runs vCPU `cpu`'s (0 or 1) two-vCPU part on this processor, whose SVM is enabled, to its end or
/// first error.
pub fn run_cpu(cpu: usize, svm: &X86Svm, shared: &Shared) -> SmpOutcome {
    let mut out = SmpOutcome::default();
    match Vcpu::new(svm, shared, shared.smp_entries[cpu], &SMP_RINGS[cpu], 64) {
        Ok(mut vcpu) => {
            out.tag = vcpu.svm_vcpu.asid().raw();
            let entry_flushes = shared.mmu.host().tlb.stats().entry_flushes;
            if let Err(e) = smp_loop(cpu, &mut vcpu, &mut out) {
                out.error = Some(format!("vCPU {cpu}: {e}"));
            }
            // Both vCPUs' flushing VMRUNs together (the counter is VM-wide); the report prints it once.
            out.entry_flushes = shared.mmu.host().tlb.stats().entry_flushes - entry_flushes;
            out.exits = vcpu.exits;
            out.counters = Some(vcpu.mmu_vcpu.counters);
            out.ring = Some(vcpu.sink.stats());
            vcpu.release();
        }
        Err(e) => out.error = Some(format!("vCPU {cpu}: {e}")),
    }
    if out.error.is_some() {
        smp_guest::give_up(cpu);
    }
    out
}

fn smp_loop(cpu: usize, vcpu: &mut Vcpu<'_>, out: &mut SmpOutcome) -> Result<(), String> {
    loop {
        let action = vcpu.next_exit()?;
        if action != ExitAction::Unhandled(code::VMMCALL) {
            return Err(vcpu.describe_exit(&action));
        }
        vcpu.skip_vmmcall();
        let (number, arg) = (vcpu.regs.rbx, vcpu.regs.rdi);
        let mmu = vcpu.mmu();
        if smp_guest::hypercall(cpu, number, arg, mmu, &mut vcpu.sink, &mut vcpu.consumer, out)? {
            return Ok(());
        }
    }
}
