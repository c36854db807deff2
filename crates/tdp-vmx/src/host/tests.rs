//! The host traits over a fake physical region: INVEPT flush choices, and a run of `tdp-core`'s MMU with
//! them (the frame allocator and identity translation are `tdp-metal`'s, tested there)
//! (EPT-violation exit -> fault -> SPTE in the region's pages -> INVEPT when the core asks for a flush,
//! PML drain into the vCPU's ring).

extern crate std;

use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::host::{TableMemory, TlbFlush};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultOutcome, Mmu, VcpuMmu};
use tdp_core::spte::Spte;
use tdp_core::sync::Ordering;

use super::*;
use crate::caps::{EptFeatures, InveptSupport, VmxCapabilities};
use crate::eptp::Eptp;
use crate::exit::{VmExit, read_exit};
use crate::fake::{FakeVmx, Op, bochs};
use crate::instr::VmFail;
use crate::pml::{Pml, PmlPage};
use crate::raw::{IdentityRegion, TablePage};
use crate::ring_sink::RingSink;
use crate::vmcs::VmcsField;

fn pages(n: usize) -> Vec<TablePage> {
    (0..n).map(|_| TablePage::new()).collect()
}

fn skylake() -> (FakeVmx, EptFeatures) {
    let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
    let ept = VmxCapabilities::read(&vmx).ept_features().unwrap();
    (vmx, ept)
}

fn eptp(ept: &EptFeatures, root: u64) -> Eptp {
    Eptp::new(ept, &tdp_core::mmu::MmuConfig::EPT, Pfn(root)).unwrap()
}

#[test]
fn i3_flush_covers_every_loaded_and_retired_eptp_once() {
    let (vmx, ept) = skylake();
    let flush = InveptFlush::new(&vmx, ept.invept);
    flush.flush_all();
    assert_eq!((vmx.take_ops(), flush.stats().skipped), (Vec::new(), 1), "nothing loaded, nothing cached");
    let (e1, e2) = (eptp(&ept, 1), eptp(&ept, 2));
    flush.load_eptp(e1);
    flush.load_eptp(e2);
    flush.load_eptp(e1);
    flush.retire_eptp(e1);
    flush.flush_all();
    let single = |e: Eptp| Op::Invept { kind: crate::inv::InveptKind::SingleContext, eptp: e.raw() };
    assert_eq!(vmx.take_ops(), [single(e1), single(e2)]);
    flush.flush_range(AsId(0), Gfn(0), 1);
    assert_eq!(vmx.take_ops(), [single(e2)], "the retired EPTP was flushed once, then forgotten");
    let stats = flush.stats();
    assert_eq!(
        (stats.requests, stats.single_context, stats.delivered),
        (3, 3, 2),
        "two requests delivered (one with two INVEPTs), the skipped one not"
    );
}

#[test]
fn i3_all_context_when_single_is_missing_or_eptps_overflow() {
    let (vmx, ept) = skylake();
    let all = Op::Invept { kind: crate::inv::InveptKind::AllContext, eptp: 0 };
    let only_all = InveptFlush::new(&vmx, InveptSupport { single_context: false, all_context: true });
    only_all.load_eptp(eptp(&ept, 1));
    only_all.flush_all();
    assert_eq!(vmx.take_ops(), [all]);
    let flush = InveptFlush::new(&vmx, ept.invept);
    for root in 0..=MAX_EPTPS as u64 {
        flush.load_eptp(eptp(&ept, root + 1));
    }
    flush.flush_all();
    assert_eq!(vmx.take_ops(), [all], "more EPTPs than tracked: one all-context covers them");
    assert_eq!(flush.stats().all_context, 1);
    let single_only = InveptFlush::new(&vmx, InveptSupport { single_context: true, all_context: false });
    for root in 0..=MAX_EPTPS as u64 {
        single_only.load_eptp(eptp(&ept, root + 1));
    }
    single_only.flush_all();
    assert_eq!((vmx.take_ops().len(), single_only.stats().uncovered), (MAX_EPTPS, 1));
    assert_eq!((flush.stats().delivered, single_only.stats().delivered), (1, 0), "an uncovered one is not");
}

#[test]
fn i3_a_failing_invept_falls_back_to_all_context_and_is_reported() {
    let (vmx, ept) = skylake();
    let flush = InveptFlush::new(&vmx, ept.invept);
    let e = eptp(&ept, 9);
    flush.load_eptp(e);
    vmx.fail_next_invept(VmFail::Invalid);
    flush.flush_all();
    assert_eq!(vmx.take_ops(), [Op::Invept { kind: crate::inv::InveptKind::AllContext, eptp: 0 }]);
    let stats = flush.stats();
    assert_eq!((stats.errors, stats.all_context, stats.uncovered, stats.delivered), (1, 1, 0, 1));
    assert_eq!(flush.take_error().map(|e| e.fail), Some(VmFail::Invalid));
    assert_eq!(flush.take_error(), None);
}

/// Reads the leaf mapping `gfn` from the root down, as the CPU's EPT walker would.
fn walk(frames: &TableFrames<'_>, root: Pfn, gfn: Gfn) -> Option<(Spte, Level)> {
    let mut table = root;
    let mut level = Level::L4;
    loop {
        let spte = Spte(frames.table(table)[gfn.index_at(level).get()].load(Ordering::Relaxed));
        if !spte.is_present() {
            return None;
        }
        if spte.is_leaf(level) {
            return Some((spte, level));
        }
        table = spte.pfn();
        level = level.lower()?;
    }
}

#[test]
fn mmu_on_bare_metal_host_fault_to_spte_to_invept_and_pml_to_ring() {
    let (vmx, ept) = skylake();
    let mut mem = pages(64);
    let ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
    let host = BareMetalHost {
        frames: TableFrames::new(IdentityRegion::from_pages(&mut mem)).unwrap(),
        translate: IdentityTranslate::new(&ram, Level::L2),
        tlb: InveptFlush::new(&vmx, ept.invept),
    };
    let config = ept.mmu_config(true).unwrap();
    let mmu: Mmu<_> = Mmu::new(host, config).unwrap();
    let data = Memslot::new(AsId(0), SlotId(1), Gfn(0x200), 0x200, 0x140_0000, SlotFlags::empty());
    mmu.write().insert_memslot(data).unwrap();
    let mut vcpu = VcpuMmu::new();
    let root = mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    let eptp = Eptp::new(&ept, &config, root).unwrap();
    mmu.host().tlb.load_eptp(eptp);
    vmx.set_field(VmcsField::EPT_POINTER, eptp.raw());

    // The guest writes gpa 0x20_3008: Bochs' exit for a write to a missing entry.
    vmx.set_exit_ept_violation(0x182, 0x20_3008, 0x4000_3008);
    let VmExit::EptViolation(v) = read_exit(&vmx, AsId(0)).unwrap() else { panic!("not an EPT violation") };
    let ring_mem: Vec<DirtyGfn> = (0..1024).map(|_| DirtyGfn::zeroed()).collect();
    let cfg = RingConfig::new(1024, PML_ENTRIES).unwrap();
    let mut sink = RingSink::new(DirtyRingProducer::new(&ring_mem, cfg).unwrap()).unwrap();
    assert_eq!(mmu.handle_fault(&mut vcpu, v.fault, &mut sink), Ok(FaultOutcome::Fixed));
    // The slot is 2 MiB-aligned in both spaces and in RAM: one 2 MiB leaf to host frame 0x1400.
    let (leaf, level) = walk(&mmu.host().frames, root, Gfn(0x203)).unwrap();
    assert_eq!((leaf.pfn(), level, leaf.is_writable()), (Pfn(0x1400), Level::L2, true));
    assert!(mmu.host().frames.region().contains(root));
    assert_eq!(vmx.take_ops(), [], "installing a mapping needs no flush");

    // Dirty logging on: the core write-protects the huge leaf and asks for a flush: INVEPT of our EPTP.
    let flush = mmu.write().set_memslot_flags(AsId(0), SlotId(1), SlotFlags::LOG_DIRTY).unwrap();
    flush.run(mmu.host());
    let single = Op::Invept { kind: crate::inv::InveptKind::SingleContext, eptp: eptp.raw() };
    assert_eq!(vmx.take_ops(), [single]);

    // A write now faults again (write-protected) and is split to a 4 KiB leaf, marked in the ring.
    vmx.set_exit_ept_violation(0x182 | 0x8 | 0x20, 0x20_3008, 0x4000_3008);
    let VmExit::EptViolation(v) = read_exit(&vmx, AsId(0)).unwrap() else { panic!("not an EPT violation") };
    let outcome = mmu.handle_fault(&mut vcpu, v.fault, &mut sink).unwrap();
    assert_eq!(outcome, FaultOutcome::Fixed);
    let (leaf, level) = walk(&mmu.host().frames, root, Gfn(0x203)).unwrap();
    assert_eq!((leaf.pfn(), level), (Pfn(0x1403), Level::L1));
    // Whatever the split needed flushed went through INVEPT of the same EPTP.
    assert!(vmx.take_ops().iter().all(|op| *op == single));

    // PML: the CPU logged two more pages of the slot; the drain puts them after the fault's mark.
    vmx.set_field(VmcsField::CPU_BASED_VM_EXEC_CONTROL, 0x8400_61f2);
    vmx.set_field(VmcsField::SECONDARY_VM_EXEC_CONTROL, 0x82);
    let page = PmlPage::new();
    let mut pml = Pml::enable(&vmx, &ept, eptp, &page).unwrap();
    page.set_entry(511, 0x20_5000);
    page.set_entry(510, 0x20_6000);
    vmx.set_field(VmcsField::GUEST_PML_INDEX, 509);
    let slots = mmu.read().memslots().clone();
    assert_eq!(pml.drain(&vmx, &slots, AsId(0), &mut sink).unwrap().marked, 2);
    let mut consumer = DirtyRingConsumer::new(&ring_mem, cfg).unwrap();
    let mut offsets = Vec::new();
    consumer.harvest(usize::MAX, |e| offsets.push(e.offset));
    assert_eq!(offsets, [3, 5, 6]);

    // Deleting the slot zaps and flushes; the tables go back to the region after the walkers.
    let flush = mmu.write().delete_memslot(AsId(0), SlotId(1)).unwrap();
    flush.run(mmu.host());
    assert!(vmx.take_ops().contains(&single));
    assert_eq!(walk(&mmu.host().frames, root, Gfn(0x203)), None);
    let tlb = mmu.host().tlb.stats();
    assert_eq!((tlb.errors, tlb.uncovered, tlb.all_context), (0, 0, 0));
    assert!(tlb.single_context >= 2);
    mmu.release_vcpu(&mut vcpu);
    drop(mmu);
}
