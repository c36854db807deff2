//! The exit path end to end over the fake CPU and a fake physical region, with the #NPF error codes
//! Bochs reported (docs/recipes/bochs-svm.md): faults mapped, MMIO by not-present then reserved-bit
//! faults, write-protection dirty logging, malformed exits, the ASID flush chosen per model, and the
//! exit loop's limits.

use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::{AccessKind, FaultKind};
use tdp_core::host::{DirtySink, DirtySource, TlbFlush};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, Mmu, VcpuMmu};

use super::*;
use crate::asid::AsidAllocator;
use crate::caps::SvmCapabilities;
use crate::exit::code;
use crate::fake::{FakeExit, FakeSvm, bochs};
use crate::host::{IdentityRegion, PhysRange, SvmHost, TableFrames, TablePage};
use crate::raw::HsavePage;
use crate::vmcb::InterceptMisc2;

/// Error codes Bochs reported: a write during the guest's own page walk, a final write, a final read,
/// a read of an MMIO entry (reserved bit), a write to a write-protected page.
const WALK_WRITE: u64 = 0x2_0000_0006;
const WRITE: u64 = 0x1_0000_0006;
const READ: u64 = 0x1_0000_0004;
const MMIO_RSVD: u64 = 0x1_0000_000d;
const WP_WRITE: u64 = 0x1_0000_0007;

const RAM: [PhysRange; 1] = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
static HSAVE: HsavePage = HsavePage::new();

type TestMmu<'a> = Mmu<SvmHost<'a, 'a>>;

fn features(model: bochs::BochsModel) -> NptFeatures {
    let npt = SvmCapabilities::read(&FakeSvm::new(model)).npt_features().unwrap();
    // The test's "physical" pages are heap memory, above Bochs's 40-bit limit.
    NptFeatures { phys_bits: 48, ..npt }
}

/// RAM at gfn 0 (2 MiB, dirty-logged), nothing at gfn 0x800 (MMIO).
fn mmu<'a>(pages: &'a mut [TablePage], npt: &NptFeatures) -> TestMmu<'a> {
    let host = SvmHost::new(
        TableFrames::new(IdentityRegion::from_pages(pages)).unwrap(),
        IdentityTranslate::new(&RAM, Level::L2),
        npt,
    );
    let mmu = Mmu::new(host, npt.mmu_config()).unwrap();
    mmu.write()
        .insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, 0x100_0000, SlotFlags::LOG_DIRTY))
        .unwrap();
    mmu
}

use crate::host::IdentityTranslate;

#[derive(Default)]
struct Marks(Vec<u64>);

impl DirtySink for Marks {
    fn mark_dirty(&mut self, _: &Memslot, gfn: Gfn, _: DirtySource) {
        self.0.push(gfn.0);
    }
}

fn npf(error_code: u64, gpa: u64) -> Vmcb {
    let mut vmcb = Vmcb::new();
    vmcb.control.exit_code = code::NPF;
    vmcb.control.exit_info1 = error_code;
    vmcb.control.exit_info2 = gpa;
    vmcb
}

#[test]
fn bochs_error_codes_map_emulate_and_log() {
    let npt = features(bochs::RYZEN);
    let mut pages: Vec<TablePage> = (0..32).map(|_| TablePage::new()).collect();
    let mmu = mmu(&mut pages, &npt);
    let mut vcpu = VcpuMmu::new();
    mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    let mut marks = Marks::default();

    // The guest's page walk writes its PML4's A bit: a fault on a guest table, mapped like any write.
    let r = handle_exit(&npf(WALK_WRITE, 0x1000), &mmu, &mut vcpu, &mut marks).unwrap();
    let SvmExit::Npf(walk) = r.exit else { panic!("{r:?}") };
    assert!(walk.guest_walk);
    assert_eq!((walk.fault.access, r.action), (AccessKind::Write, ExitAction::Resume));
    assert_eq!(
        handle_exit(&npf(WRITE, 0x3008), &mmu, &mut vcpu, &mut marks).unwrap().action,
        ExitAction::Resume
    );
    // Both pages were marked (the slot logs), the table page first.
    assert_eq!(marks.0, [1, 3]);

    // MMIO: the first read finds nothing and installs an MMIO entry; the second hits its reserved bit.
    let mmio =
        ExitAction::Emulate { gpa: Gpa(0x80_0010), access: AccessKind::Read, reason: EmulateReason::Mmio };
    let r = handle_exit(&npf(READ, 0x80_0010), &mmu, &mut vcpu, &mut marks).unwrap();
    assert_eq!(r.action, mmio);
    let r = handle_exit(&npf(MMIO_RSVD, 0x80_0010), &mmu, &mut vcpu, &mut marks).unwrap();
    let SvmExit::Npf(rsvd) = r.exit else { panic!("{r:?}") };
    assert_eq!((rsvd.fault.kind, r.action), (FaultKind::Misconfig, mmio));

    // A read maps the page read-only (the slot logs); the write then faults present+write and logs it.
    handle_exit(&npf(READ, 0x5000), &mmu, &mut vcpu, &mut marks).unwrap();
    assert_eq!(marks.0, [1, 3]);
    assert_eq!(
        handle_exit(&npf(WP_WRITE, 0x5000), &mmu, &mut vcpu, &mut marks).unwrap().action,
        ExitAction::Resume
    );
    assert_eq!(marks.0, [1, 3, 5]);
    mmu.release_vcpu(&mut vcpu);
}

#[test]
fn malformed_and_other_exits_are_reported() {
    let npt = features(bochs::RYZEN);
    let mut pages: Vec<TablePage> = (0..8).map(|_| TablePage::new()).collect();
    let mmu = mmu(&mut pages, &npt);
    let mut vcpu = VcpuMmu::new();
    assert_eq!(handle_exit(&npf(WRITE, 0), &mmu, &mut vcpu, &mut ()), Err(HandleError::NoRoot));
    mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    // Neither bit 32 nor bit 33: not a nested fault the MMU can take.
    let bad = handle_exit(&npf(0x6, 0x3000), &mmu, &mut vcpu, &mut ());
    assert!(matches!(bad, Err(HandleError::Exit(ExitError::NotNested { .. }))), "{bad:?}");
    let mut vmcb = Vmcb::new();
    vmcb.control.exit_code = code::INVALID;
    assert_eq!(handle_exit(&vmcb, &mmu, &mut vcpu, &mut ()).unwrap().action, ExitAction::EntryFailed);
    vmcb.control.exit_code = code::VMMCALL;
    assert_eq!(
        handle_exit(&vmcb, &mmu, &mut vcpu, &mut ()).unwrap().action,
        ExitAction::Unhandled(code::VMMCALL)
    );
    // A fault beyond what the tables can map (a GPA no memslot can hold) is emulated, not a panic.
    let far = handle_exit(&npf(WRITE, 1 << 52), &mmu, &mut vcpu, &mut ()).unwrap();
    let want =
        ExitAction::Emulate { gpa: Gpa(1 << 52), access: AccessKind::Write, reason: EmulateReason::Mmio };
    assert_eq!(far.action, want);
    mmu.release_vcpu(&mut vcpu);
}

fn enabled(model: bochs::BochsModel) -> FakeSvm {
    let svm = FakeSvm::new(model);
    svm.set_hsave(&HSAVE);
    svm.enable_svme();
    svm
}

fn guest_vmcb() -> Vmcb {
    let mut vmcb = Vmcb::new();
    vmcb.control.intercept_misc2 = InterceptMisc2::VMRUN | InterceptMisc2::VMMCALL;
    vmcb.save.efer = crate::msr::EFER_SVME;
    vmcb
}

#[test]
fn the_asid_flush_follows_the_model() {
    for (model, want) in
        [(bochs::RYZEN, TlbControl::FlushAsid), (bochs::PHENOM_8650_TOLIMAN, TlbControl::FlushAll)]
    {
        let npt = features(model);
        let svm = enabled(model);
        let flush = AsidFlush::new(npt.flush_one);
        let mut vcpu = SvmVcpu::new(AsidAllocator::new(npt.asids).alloc().unwrap(), &flush);
        let mut vmcb = guest_vmcb();
        let mut regs = GuestRegs::default();
        vcpu.enter(&svm, &mut vmcb, &mut regs, &flush);
        flush.flush_range(AsId(0), Gfn(1), 1);
        vcpu.enter(&svm, &mut vmcb, &mut regs, &flush);
        vcpu.enter(&svm, &mut vmcb, &mut regs, &flush);
        let tlb: Vec<u8> = svm.entries().iter().map(|e| e.tlb_control).collect();
        assert_eq!(tlb, [0, want.raw(), 0], "{}", model.name);
        assert_eq!(vmcb.control.tlb_control, 0, "reset after the exit");
        assert!(svm.entries().iter().all(|e| e.asid == 1));
        assert_eq!(vmcb.control.exit_code, code::HLT, "{}: every VMRUN was accepted", model.name);
    }
    // The choice matters: asking a CPU without flush-by-ASID for 03h makes VMRUN fail.
    let svm = enabled(bochs::PHENOM_8650_TOLIMAN);
    let mut vmcb = guest_vmcb();
    vmcb.control.guest_asid = 1;
    vmcb.control.tlb_control = TlbControl::FlushAsid.raw();
    svm.vmrun(&mut vmcb, &mut GuestRegs::default());
    assert_eq!(vmcb.control.exit_code, code::INVALID);
    assert!(svm.faults().is_empty());
}

#[test]
fn every_vcpu_flushes_once_per_request() {
    let flush = AsidFlush::new(TlbControl::FlushAsid);
    let mut asids = AsidAllocator::new(4);
    let mut vcpus =
        [SvmVcpu::new(asids.alloc().unwrap(), &flush), SvmVcpu::new(asids.alloc().unwrap(), &flush)];
    let mut vmcb = Vmcb::new();
    flush.flush_all();
    flush.flush_all(); // two requests before either vCPU runs: one flush each
    for vcpu in &mut vcpus {
        assert_eq!(vcpu.flushed_generation(), 0, "created before both requests");
        assert_eq!(vcpu.prepare_entry(&mut vmcb, &flush), TlbControl::FlushAsid);
        assert_eq!(vcpu.flushed_generation(), 2, "one VMRUN delivered both");
        assert_eq!(vcpu.prepare_entry(&mut vmcb, &flush), TlbControl::DoNothing);
    }
    assert_eq!(vmcb.control.guest_asid, 2);
    assert_eq!(flush.stats(), crate::flush::FlushStats { requests: 2, entry_flushes: 2 });
    // A vCPU created after a request owes nothing for it.
    let mut late = SvmVcpu::new(asids.alloc().unwrap(), &flush);
    assert_eq!(late.prepare_entry(&mut vmcb, &flush), TlbControl::DoNothing);
}

#[test]
fn the_exit_loop_stops_at_its_limit_and_at_the_hypervisors_exits() {
    let npt = features(bochs::ZAMBEZI);
    let svm = enabled(bochs::ZAMBEZI);
    let mut pages: Vec<TablePage> = (0..32).map(|_| TablePage::new()).collect();
    let mmu = mmu(&mut pages, &npt);
    let mut mmu_vcpu = VcpuMmu::new();
    mmu.load_root(&mut mmu_vcpu, AsId(0)).unwrap();
    let mut svm_vcpu = SvmVcpu::new(AsidAllocator::new(npt.asids).alloc().unwrap(), &mmu.host().tlb);
    let mut vmcb = guest_vmcb();
    install_root(&mut vmcb, &mut svm_vcpu, &npt, mmu.config(), mmu_vcpu.root().unwrap()).unwrap();
    let mut regs = GuestRegs::default();
    let mut seen = Vec::new();
    let mut observe = |_: &Vmcb, r: &ExitReport| seen.push(r.action);
    let mut cx = RunContext {
        mmu_vcpu: &mut mmu_vcpu,
        svm_vcpu: &mut svm_vcpu,
        regs: &mut regs,
        features: &npt,
        observe: &mut observe,
    };
    for page in 0..3 {
        svm.push_npf(WRITE, page * 0x1000);
    }
    let mut marks = Marks::default();
    let limited = run(&svm, &mmu, &mmu.host().tlb, &mut vmcb, &mut cx, &mut marks, |_| false, 2);
    assert_eq!(limited, Err(RunError::TooManyExits { max_exits: 2 }));
    svm.push_exit(FakeExit { code: code::VMMCALL, info1: 0, info2: 0, next_rip: 0x1003 });
    let report = run(&svm, &mmu, &mmu.host().tlb, &mut vmcb, &mut cx, &mut marks, |_| false, 10).unwrap();
    assert_eq!((report.action, vmcb.control.next_rip), (ExitAction::Unhandled(code::VMMCALL), 0x1003));
    // A sink that asks for an exit stops the loop after the fault that filled it.
    svm.push_npf(WRITE, 0x4000);
    let report =
        run(&svm, &mmu, &mmu.host().tlb, &mut vmcb, &mut cx, &mut marks, |m: &Marks| m.0.len() >= 4, 10)
            .unwrap();
    assert_eq!(report.action, ExitAction::Resume);
    assert_eq!(marks.0, [0, 1, 2, 4]);
    assert_eq!(seen.len(), 5);
    // Only the first VMRUN carried a flush (for the new root): faults that map flush nothing.
    let tlb: Vec<u8> = svm.entries().iter().map(|e| e.tlb_control).collect();
    assert_eq!(tlb, [3, 0, 0, 0, 0]);
    mmu.release_vcpu(&mut mmu_vcpu);
}
