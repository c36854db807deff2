//! Page-Modification Logging end to end on `MmuConfig::EPT_PML`: clean writable leaves for reads in a
//! logged slot, the first write logged by hardware without a fault, drains into the dirty sink (on
//! demand, on exits, on a log-full exit), no log for pages already dirty, logging again after
//! `reprotect_dirty` and its flush, and the broken variants the checkers must catch (a skipped drain,
//! a skipped flush after D was cleared).
//!
//! Checks: I4 (through `DirtyShadow` and the recorded marks) and I1-I3 after every step (`Vm::check`),
//! including the I3 rule that a TLB entry marked dirty needs a leaf with D set.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::Vm;
use tdp_core::addr::{AsId, Gfn, Gpa, Level, Pfn, SlotId};
use tdp_core::fault::AccessKind::{Read, Write};
use tdp_core::host::{DirtySink, TableMemory};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::Spte;
use tdp_mock::checker::{DirtyPage, DirtyShadow, Invariant};
use tdp_mock::pml::{PML_ENTRIES, PML_HEAD_INDEX, Pml};
use tdp_mock::walker::decode::ept;
use tdp_mock::{AccessResult, Hardware, HostConfig, Violation, WalkOutcome, check_tlbs, walk_access};

/// Records every dirty mark, shared between the vCPUs and the test.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<DirtyPage>>>);

impl DirtySink for Recorder {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: tdp_core::host::DirtySource) {
        self.0.lock().expect("recorder").push((slot.id, slot.offset_of(gfn)));
    }
}

impl Recorder {
    fn take(&self) -> BTreeSet<DirtyPage> {
        std::mem::take(&mut *self.0.lock().expect("recorder")).into_iter().collect()
    }
}

const SLOT: u16 = 1;
const BASE: u64 = 0x1000;
const PAGES: u64 = 1024;

/// An EPT_PML VM with two vCPUs sharing one recorder, one logged slot of [`PAGES`] pages, and a host that
/// maps guest RAM at 4 KiB (so stopping logging leaves 4 KiB leaves in place).
fn vm() -> (Vm, Recorder, Memslot) {
    let host = HostConfig { host_level: Level::L1, ..HostConfig::default() };
    let mut vm = Vm::new("ept-pml", MmuConfig::EPT_PML, host, 2);
    let slot = vm.add_slot(SLOT, BASE, PAGES, SlotFlags::LOG_DIRTY);
    let marks = Recorder::default();
    for v in &mut vm.vcpus {
        v.set_dirty_sink(Box::new(marks.clone()));
    }
    (vm, marks, slot)
}

fn gfn(offset: u64) -> u64 {
    BASE + offset
}

fn faults(vm: &Vm) -> u64 {
    vm.vcpus
        .iter()
        .map(|v| v.mmu_state().counters)
        .map(|c| c.fixed + c.spurious + c.retried + c.emulated)
        .sum()
}

fn pml(vm: &Vm, vcpu: usize) -> &Pml {
    vm.vcpus[vcpu].pml().expect("EPT_PML vCPUs have a log")
}

fn flush_all_pml(vm: &mut Vm) {
    let mmu = Arc::clone(vm.m.mmu());
    for v in &mut vm.vcpus {
        v.flush_pml(&mmu);
    }
}

/// Re-protects every harvested page and runs the flush, as a ring reset or bitmap clear does.
fn reprotect(vm: &Vm, pages: &BTreeSet<DirtyPage>) {
    let mut w = vm.mmu().write();
    for &(slot, off) in pages {
        w.reprotect_dirty(AsId(0), slot, off & !63, 1 << (off & 63)).run(vm.host());
    }
}

fn is_clean_writable(vm: &Vm, offset: u64) -> bool {
    let (spte, level) = vm.leaf(0, gfn(offset)).expect("mapped");
    let fmt = vm.mmu().format();
    level == Level::L1 && spte.is_writable() && !fmt.is_dirty(spte)
}

#[test]
fn i4_pml_read_maps_clean_and_the_first_write_is_logged_without_a_fault() {
    let (mut vm, marks, _) = vm();
    vm.must_map(0, gfn(5), Read);
    assert!(is_clean_writable(&vm, 5), "a read in a logged slot installs a clean writable 4K leaf");
    vm.check("read");
    let before = faults(&vm);
    let done = vm.access(0, gfn(5), Write).expect("the write retires");
    assert!(matches!(done, AccessResult::Done { from_tlb: false, .. }), "a clean TLB entry walks: {done:?}");
    assert_eq!(faults(&vm), before, "no fault: hardware set D");
    assert_eq!(pml(&vm, 0).entries(), [Gpa(gfn(5) << 12)]);
    assert!(marks.take().is_empty(), "nothing reaches the sink before a drain");
    vm.check("first write");
    flush_all_pml(&mut vm);
    assert_eq!(marks.take(), BTreeSet::from([(SlotId(SLOT), 5)]));
    assert_eq!((pml(&vm, 0).index(), pml(&vm, 0).stats().marked), (PML_HEAD_INDEX, 1));
    vm.check("drain");
    vm.teardown();
}

#[test]
fn i4_pml_write_to_a_dirty_page_logs_nothing() {
    let (mut vm, marks, _) = vm();
    vm.must_map(0, gfn(7), Read);
    vm.must_map(0, gfn(7), Write);
    let again = vm.access(0, gfn(7), Write).expect("retires");
    assert!(matches!(again, AccessResult::Done { from_tlb: true, .. }), "the TLB entry is dirty now");
    vm.must_map(1, gfn(7), Write); // the other vCPU walks, finds D set
    assert_eq!((pml(&vm, 0).len(), pml(&vm, 1).len()), (1, 0));
    flush_all_pml(&mut vm);
    assert_eq!(marks.take(), BTreeSet::from([(SlotId(SLOT), 7)]));
    vm.check("writes");
    vm.teardown();
}

#[test]
fn i4_pml_log_full_exit_drains_and_retries_without_loss() {
    let (mut vm, marks, _) = vm();
    let n = PML_ENTRIES as u64 + 10;
    for off in 0..n {
        vm.must_map(0, gfn(off), Read);
    }
    let before = faults(&vm);
    for off in 0..n {
        vm.must_map(0, gfn(off), Write);
        if off == PML_ENTRIES as u64 - 1 {
            assert!(pml(&vm, 0).is_full(), "512 writes fill the log");
            assert_eq!(pml(&vm, 0).index(), 0xffff);
        }
    }
    assert_eq!(faults(&vm), before, "no EPT fault: every write was a D 0->1 by hardware");
    let stats = pml(&vm, 0).stats();
    assert_eq!((stats.full_exits, stats.drains, stats.marked), (1, 1, PML_ENTRIES as u64));
    assert_eq!(pml(&vm, 0).len(), 10, "the write that exited was logged after the drain");
    assert_eq!(marks.take().len(), PML_ENTRIES);
    flush_all_pml(&mut vm);
    assert_eq!(marks.take(), (PML_ENTRIES as u64..n).map(|o| (SlotId(SLOT), o)).collect());
    vm.check("log full");
    vm.teardown();
}

#[test]
fn i4_pml_reprotect_and_flush_make_the_next_write_log_again() {
    let (mut vm, marks, slot) = vm();
    let mut shadow = DirtyShadow::new(vm.host(), &[slot], &[0]);
    let mmu = Arc::clone(vm.m.mmu());
    for round in 1..=3u64 {
        for off in [3, 64, 65, 200] {
            vm.vcpus[(off % 2) as usize].write_u64(&mmu, Gpa(gfn(off) << 12), round).expect("write");
        }
        flush_all_pml(&mut vm);
        let harvested = marks.take();
        assert_eq!(shadow.check_harvest(vm.host(), &harvested), Ok(4), "round {round}");
        reprotect(&vm, &harvested);
        assert!(is_clean_writable(&vm, 64), "reprotect with PML clears D and keeps W");
        assert!(
            vm.vcpus
                .iter()
                .all(|v| v.tlb().lookup_entry(vm.vcpus[0].root().unwrap().pfn(), Gfn(gfn(64))).is_none())
        );
        vm.check(&format!("round {round}"));
    }
    let logged: u64 = (0..2).map(|v| pml(&vm, v).stats().logged).sum();
    assert_eq!(logged, 8, "rounds 2 and 3 were logged by PML (round 1 by the write faults)");
    drop(mmu);
    vm.teardown();
}

#[test]
fn i4_pml_drained_gpas_outside_logged_slots_are_dropped_and_counted() {
    let (mut vm, marks, _) = vm();
    let mmu = Arc::clone(vm.m.mmu());
    vm.must_map(0, gfn(1), Read);
    vm.must_map(0, gfn(2), Read);
    vm.must_map(0, gfn(1), Write);
    // Logging stops before the drain: KVM marks only slots that are dirty-tracked.
    let off = mmu.write().set_memslot_flags(AsId(0), SlotId(SLOT), SlotFlags::empty()).expect("slot");
    off.run(vm.host());
    assert_eq!(vm.vcpus[0].flush_pml(&mmu), 0);
    assert!(is_clean_writable(&vm, 2), "the host maps 4 KiB: the leaves stay");
    vm.must_map(0, gfn(2), Write);
    // The slot goes away before the next drain.
    vm.delete_slot(SLOT);
    assert_eq!(vm.vcpus[0].flush_pml(&mmu), 0);
    let stats = pml(&vm, 0).stats();
    assert_eq!((stats.logged, stats.dropped_not_logged, stats.dropped_no_slot), (2, 1, 1));
    assert!(marks.take().is_empty());
    vm.check("dropped");
    drop(mmu);
    vm.teardown();
}

/// The deliberately broken variant: harvest without draining the logs first. The I4 shadow check
/// names every page whose GPA was still sitting in a log.
#[test]
fn i4_checker_catches_a_harvest_that_skips_the_pml_drain() {
    let (mut vm, marks, slot) = vm();
    let mmu = Arc::clone(vm.m.mmu());
    for off in 0..8 {
        vm.must_map(0, gfn(off), Read);
    }
    let mut shadow = DirtyShadow::new(vm.host(), &[slot], &[0]);
    for off in 0..8 {
        vm.vcpus[0].write_u64(&mmu, Gpa(gfn(off) << 12), 0xd1e7).expect("write");
    }
    let harvested = marks.take(); // no flush_pml: deliberately broken
    assert!(harvested.is_empty(), "every GPA is still in the log");
    let errors = shadow.check_harvest(vm.host(), &harvested).expect_err("pages lost");
    assert_eq!(errors.len(), 8);
    assert!(errors.iter().all(|v| v.invariant() == Invariant::I4), "{errors:?}");
    assert!(matches!(errors[3], Violation::UnreportedWrite { offset: 3, .. }), "{errors:?}");
    // Draining late still delivers them: nothing was lost by the hardware, only by the harvest.
    flush_all_pml(&mut vm);
    assert_eq!(marks.take().len(), 8);
    vm.check("late drain");
    drop(mmu);
    vm.teardown();
}

/// The deliberately broken variant for the TLB dirty rule: clear D with `reprotect_dirty` and skip
/// its flush. The I3 checker names the dirty TLB entry, and the write it would let through shows why.
#[test]
fn i3_checker_catches_a_dirty_tlb_entry_over_a_cleaned_leaf() {
    let (mut vm, marks, _) = vm();
    vm.must_map(0, gfn(9), Write);
    flush_all_pml(&mut vm);
    let harvested = marks.take();
    assert_eq!(harvested, BTreeSet::from([(SlotId(SLOT), 9)]), "the write fault marked it");
    vm.mmu().write().reprotect_dirty(AsId(0), SlotId(SLOT), 0, 1 << 9).ignore(); // deliberately broken
    let tlbs = [vm.vcpus[0].tlb(), vm.vcpus[1].tlb()];
    let errors = check_tlbs(vm.mmu(), &tlbs).expect_err("a dirty entry over a clean leaf");
    assert!(
        matches!(errors.as_slice(), [Violation::StaleDirtyTlb { at, .. }] if *at == Gfn(gfn(9))),
        "{errors:?}"
    );
    assert_eq!(errors[0].invariant(), Invariant::I3);
    // What the stale entry allows: a write that retires from the TLB, sets no D and logs nothing.
    let done = vm.access(0, gfn(9), Write).expect("retires");
    assert!(matches!(done, AccessResult::Done { from_tlb: true, .. }));
    assert_eq!(pml(&vm, 0).len(), 0, "lost to PML");
    tdp_core::host::TlbFlush::flush_all(vm.host());
    vm.check("flushed");
    vm.must_map(0, gfn(9), Write);
    assert_eq!(pml(&vm, 0).len(), 1, "after the flush the write walks and logs");
    vm.check("repair");
    vm.teardown();
}

/// SDM "Page-Modification Logging": with the log full, an access that needs an accessed flag set takes
/// the log-full exit too, with nothing set; one that needs no flag retires.
#[test]
fn i4_pml_full_log_blocks_any_accessed_or_dirty_update_and_sets_nothing() {
    let host = tdp_mock::MockHost::new(HostConfig { table_capacity: 8, ..HostConfig::default() });
    let [l4, l3, l2, l1] = [(); 4].map(|_| host.alloc_table(Spte(1 << 63)).expect("a page"));
    let rwx = ept::R | ept::W | ept::X;
    for (t, next) in [(l4, l3), (l3, l2), (l2, l1)] {
        host.table(t)[0].store(rwx | ept::A | next.hpa(), Ordering::SeqCst);
    }
    let leaf = rwx | (6 << 3) | (0x4_0000 << 12); // not accessed, not dirty
    host.table(l1)[0].store(leaf, Ordering::SeqCst);
    let hw = Hardware::for_config(&MmuConfig::EPT_PML);
    let mut full = Pml::new();
    for i in 0..PML_ENTRIES as u64 {
        assert!(full.try_log(Gpa(i << 12)));
    }
    for access in [Read, Write] {
        let w = walk_access(&host, hw, l4, Level::L4, Gpa(0x10), access, Some(&mut full));
        assert_eq!(w.outcome, WalkOutcome::PmlFull, "{access:?}");
        assert_eq!(host.table(l1)[0].load(Ordering::SeqCst), leaf, "{access:?}: no flag set");
    }
    let mut empty = Pml::new();
    let read = walk_access(&host, hw, l4, Level::L4, Gpa(0x10), Read, Some(&mut empty));
    assert_eq!((read.dirty, read.logged, empty.len()), (false, None, 0), "A alone is not logged");
    let w = walk_access(&host, hw, l4, Level::L4, Gpa(0x10), Read, Some(&mut full));
    assert!(matches!(w.outcome, WalkOutcome::Translated { pfn: Pfn(0x4_0000), .. }), "A set: no update");
    let w = walk_access(&host, hw, l4, Level::L4, Gpa(0x18), Write, Some(&mut empty));
    assert_eq!((w.dirty, w.logged, empty.entries()), (true, Some(Gpa(0)), vec![Gpa(0)]));
    for t in [l4, l3, l2, l1] {
        host.free_table_now(t);
    }
}

/// AMD has no Page-Modification Logging (APM Vol. 2, rev. 3.41): an MMU that cleaned D bits instead of
/// write-protecting would lose every write after a re-protection, so the core refuses the configuration.
#[test]
fn i4_npt_cannot_be_configured_for_pml() {
    let cfg = MmuConfig { format: tdp_core::spte::SpteFormat::NPT, ..MmuConfig::EPT_PML };
    assert!(matches!(
        tdp_mock::Machine::new(cfg, HostConfig::default()),
        Err(tdp_core::mmu::ConfigError::PmlNeedsEpt)
    ));
}
