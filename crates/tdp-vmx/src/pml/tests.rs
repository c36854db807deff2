//! The PML drain, exactly: full log (index 0xFFFF), partial log, empty log, index outside 0..=511,
//! GPAs outside any memslot or in unlogged slots, low address bits, a failing VMWRITE, a ring that
//! reaches its soft limit (and its hard limit) during a drain, and enabling errors.

use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Pfn, RingSlot, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
use tdp_core::mmu::MmuConfig;

use super::*;
use crate::caps::VmxCapabilities;
use crate::fake::{FakeVmx, bochs};
use crate::instr::VmFail;
use crate::ring_sink::RingSink;

/// Slot 0: gfns 0..0x1000, logged. Slot 1: gfns 0x1000..0x1100, not logged. Slot 2 in AS 1.
fn slots() -> MemslotSet {
    let mut s = MemslotSet::new(Gfn(1 << 36));
    s.insert(Memslot::new(AsId(0), SlotId(0), Gfn(0), 0x1000, 0x1000_0000, SlotFlags::LOG_DIRTY)).unwrap();
    s.insert(Memslot::new(AsId(0), SlotId(1), Gfn(0x1000), 0x100, 0x2000_0000, SlotFlags::empty())).unwrap();
    s.insert(Memslot::new(AsId(1), SlotId(2), Gfn(0x2000), 0x100, 0x3000_0000, SlotFlags::LOG_DIRTY))
        .unwrap();
    s
}

#[derive(Default)]
struct Recorder(Vec<(SlotId, u64, DirtySource)>);

impl DirtySink for Recorder {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, source: DirtySource) {
        self.0.push((slot.id, gfn.0, source));
    }
}

/// A fake CPU with PML enabled, and a log page.
fn setup(page: &PmlPage) -> (FakeVmx, Pml<'_>) {
    let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
    let ept = VmxCapabilities::read(&vmx).ept_features().unwrap();
    let eptp = Eptp::new(&ept, &MmuConfig::EPT_PML, Pfn(0x100)).unwrap();
    vmx.set_field(VmcsField::CPU_BASED_VM_EXEC_CONTROL, 0x8400_61f2);
    vmx.set_field(VmcsField::SECONDARY_VM_EXEC_CONTROL, 0x82);
    let pml = Pml::enable(&vmx, &ept, eptp, page).unwrap();
    (vmx, pml)
}

/// What the CPU does: log `gfns` in order from the current index down, wrapping to 0xFFFF after 0.
fn cpu_logs(vmx: &FakeVmx, page: &PmlPage, gfns: impl IntoIterator<Item = u64>) {
    for gfn in gfns {
        let index = vmx.field(VmcsField::GUEST_PML_INDEX).unwrap() as u16;
        assert!(usize::from(index) < PML_ENTRIES, "the CPU would have taken a log-full exit");
        page.set_entry(usize::from(index), gfn << 12);
        vmx.set_field(VmcsField::GUEST_PML_INDEX, u64::from(index.wrapping_sub(1)));
    }
}

#[test]
fn enable_sets_address_index_and_control_keeping_the_others() {
    let page = PmlPage::new();
    let (vmx, _pml) = setup(&page);
    assert_eq!(vmx.field(VmcsField::PML_ADDRESS), Some(page.identity_hpa()));
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(511));
    assert_eq!(vmx.field(VmcsField::SECONDARY_VM_EXEC_CONTROL), Some(0x82 | 1 << 17));
    assert_eq!(page.identity_hpa() % 4096, 0);
}

#[test]
fn enable_refuses_what_would_log_nothing_or_fault() {
    let page = PmlPage::new();
    let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
    let ept = VmxCapabilities::read(&vmx).ept_features().unwrap();
    let no_ad = Eptp::new(&ept, &MmuConfig { pml: false, ..MmuConfig::EPT }, Pfn(1)).unwrap();
    let no_ad = Eptp::from_raw(no_ad.raw() & !crate::eptp::EPTP_ACCESSED_DIRTY).unwrap();
    assert_eq!(
        Pml::enable(&vmx, &ept, no_ad, &page).unwrap_err(),
        PmlError::AccessedDirtyOff { eptp: no_ad }
    );
    let eptp = Eptp::new(&ept, &MmuConfig::EPT_PML, Pfn(1)).unwrap();
    assert_eq!(
        Pml::enable_at(&vmx, &ept, eptp, &page, 0x1008).unwrap_err(),
        PmlError::Misaligned { hpa: 0x1008 }
    );
    // EPT not enabled in the VMCS yet.
    assert_eq!(
        Pml::enable(&vmx, &ept, eptp, &page).unwrap_err(),
        PmlError::EptNotEnabled { primary: 0, secondary: 0 }
    );
    assert_eq!(vmx.field(VmcsField::PML_ADDRESS), None, "nothing written on refusal");
    let sandy =
        VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SANDY_BRIDGE_2600K)).ept_features().unwrap();
    assert_eq!(Pml::enable(&vmx, &sandy, eptp, &page).unwrap_err(), PmlError::Unsupported);
}

#[test]
fn i4_a_partial_log_drains_oldest_first_exactly_once() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    cpu_logs(&vmx, &page, [5, 9, 5, 0x20]);
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(507), "as Bochs showed after 4 logged pages");
    let mut rec = Recorder::default();
    let d = pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap();
    assert_eq!(d, PmlDrain { entries: 4, was_full: false, marked: 4, not_logged: 0, outside_slots: 0 });
    let gfns: Vec<u64> = rec.0.iter().map(|m| m.1).collect();
    assert_eq!(gfns, [5, 9, 5, 0x20]);
    assert!(rec.0.iter().all(|m| m.0 == SlotId(0) && m.2 == DirtySource::HardwareLog));
    // Stale entries below the index stay in the page but are never read again.
    let again = pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap();
    assert_eq!(again.entries, 0);
    assert_eq!(rec.0.len(), 4);
}

#[test]
fn i4_a_full_log_index_0xffff_drains_all_512() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    cpu_logs(&vmx, &page, 0..512);
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(0xffff));
    let mut rec = Recorder::default();
    let d = pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap();
    assert_eq!((d.entries, d.was_full, d.marked), (512, true, 512));
    let gfns: Vec<u64> = rec.0.iter().map(|m| m.1).collect();
    assert_eq!(gfns, (0..512).collect::<Vec<u64>>(), "every entry once, in write order");
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(511));
    // The log is usable again: the next write goes to 511.
    cpu_logs(&vmx, &page, [0x77]);
    rec.0.clear();
    assert_eq!(pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap().marked, 1);
    assert_eq!(rec.0[0].1, 0x77);
    assert_eq!((pml.stats().drains, pml.stats().full_logs, pml.stats().entries), (2, 1, 513));
}

#[test]
fn i4_index_zero_means_511_entries_and_any_index_above_511_means_full() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    cpu_logs(&vmx, &page, 0..511);
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(0));
    let mut rec = Recorder::default();
    assert_eq!(pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap().entries, 511);
    for i in 0..512 {
        page.set_entry(i, (i as u64) << 12);
    }
    for index in [512u64, 0x8000, 0xfffe] {
        vmx.set_field(VmcsField::GUEST_PML_INDEX, index);
        let d = pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap();
        assert_eq!((d.entries, d.was_full), (512, true), "index {index:#x}");
    }
}

#[test]
fn empty_log_touches_nothing() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    let mut rec = Recorder::default();
    assert_eq!(pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap(), PmlDrain::default());
    assert!(rec.0.is_empty());
    assert_eq!(pml.stats().drains, 0);
}

#[test]
fn i5_gpas_outside_slots_or_unlogged_are_counted_and_low_bits_ignored() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    // In order: logged slot 0, unlogged slot 1, no slot, AS 1's slot (not AS 0's), a GPA with low bits,
    // and the largest GPA a hostile log could hold.
    cpu_logs(&vmx, &page, [0x10, 0x1010, 0x5000, 0x2001]);
    cpu_logs(&vmx, &page, [0]);
    page.set_entry(507, 0x0000_0000_0003_0fff); // gfn 0x30, low bits set
    cpu_logs(&vmx, &page, [u64::MAX >> 12]);
    let mut rec = Recorder::default();
    let d = pml.drain(&vmx, &slots(), AsId(0), &mut rec).unwrap();
    assert_eq!(d, PmlDrain { entries: 6, was_full: false, marked: 2, not_logged: 1, outside_slots: 3 });
    assert_eq!(rec.0.iter().map(|m| m.1).collect::<Vec<_>>(), [0x10, 0x30]);
    // The same log drained for AS 1 finds gfn 0x2001 there.
    cpu_logs(&vmx, &page, [0x2001]);
    rec.0.clear();
    let d = pml.drain(&vmx, &slots(), AsId(1), &mut rec).unwrap();
    assert_eq!((d.marked, rec.0[0].0), (1, SlotId(2)));
}

/// A VMCS whose PML-index VMWRITE fails once.
struct FailingWrite<'v>(&'v FakeVmx, core::cell::Cell<bool>);

impl crate::instr::VmxInstructions for FailingWrite<'_> {
    fn rdmsr(&self, msr: u32) -> u64 {
        self.0.rdmsr(msr)
    }
    fn vmread(&self, field: VmcsField) -> Result<u64, VmxError> {
        self.0.vmread(field)
    }
    fn vmwrite(&self, field: VmcsField, value: u64) -> Result<(), VmxError> {
        if self.1.replace(false) {
            return Err(VmxError {
                op: crate::instr::VmxOp::Vmwrite { field, value },
                fail: VmFail::Invalid,
            });
        }
        self.0.vmwrite(field, value)
    }
    fn invept(&self, k: crate::inv::InveptKind, d: &crate::inv::InveptDescriptor) -> Result<(), VmxError> {
        self.0.invept(k, d)
    }
    fn invvpid(&self, k: crate::inv::InvvpidKind, d: &crate::inv::InvvpidDescriptor) -> Result<(), VmxError> {
        self.0.invvpid(k, d)
    }
}

#[test]
fn i4_a_failing_index_reset_marks_nothing_and_keeps_the_log() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    cpu_logs(&vmx, &page, [1, 2, 3]);
    let failing = FailingWrite(&vmx, core::cell::Cell::new(true));
    let mut rec = Recorder::default();
    assert!(matches!(pml.drain(&failing, &slots(), AsId(0), &mut rec), Err(PmlError::Vmx(_))));
    assert!(rec.0.is_empty());
    assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(508));
    assert_eq!(pml.drain(&failing, &slots(), AsId(0), &mut rec).unwrap().marked, 3);
    assert_eq!(rec.0.iter().map(|m| m.1).collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn i4_ring_soft_full_during_a_drain_asks_for_an_exit_and_keeps_every_mark() {
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    // 1024 entries with the PML reserve: soft limit 1024 - 576 = 448.
    let cfg = RingConfig::new(1024, tdp_core::dirty_ring::PML_ENTRIES).unwrap();
    let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
    let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg).unwrap()).unwrap();
    let slot0 = Memslot::new(AsId(0), SlotId(0), Gfn(0), 0x1000, 0x1000_0000, SlotFlags::LOG_DIRTY);
    // Faults filled the ring to just below the soft limit.
    for g in 0..400 {
        sink.mark_dirty(&slot0, Gfn(0x800 + g), DirtySource::Fault);
    }
    assert!(!sink.must_exit());
    cpu_logs(&vmx, &page, 0..512);
    let d = pml.drain(&vmx, &slots(), AsId(0), &mut sink).unwrap();
    assert_eq!(d.marked, 512);
    assert!(sink.must_exit(), "the drain crossed the soft limit: the vCPU must exit");
    let stats = sink.stats();
    assert_eq!((stats.pushed, stats.from_pml, stats.overflowed, stats.lost), (912, 512, 0, 0));
    assert_eq!(stats.soft_full_pushes, 912 - 447);
    // The VMM harvests exactly the 912 marks, in order.
    let mut consumer = DirtyRingConsumer::new(&ring, cfg).unwrap();
    let mut seen = Vec::new();
    consumer.harvest(usize::MAX, |e| seen.push((e.slot, e.offset)));
    let want: Vec<(RingSlot, u64)> =
        (0x800..0x800 + 400).chain(0..512).map(|o| (RingSlot::new(AsId(0), SlotId(0)), o)).collect();
    assert_eq!(seen, want);
}

#[test]
fn i4_a_hard_full_ring_keeps_marks_in_order_until_the_reset() {
    // A ring whose reserve does not cover a PML log: 256 entries, soft limit 192.
    let cfg = RingConfig::new(256, 0).unwrap();
    let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
    let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg).unwrap()).unwrap();
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    cpu_logs(&vmx, &page, 0..300);
    let slots = slots();
    pml.drain(&vmx, &slots, AsId(0), &mut sink).unwrap();
    assert_eq!((sink.stats().pushed, sink.overflowed(), sink.stats().lost), (256, 44, 0));
    assert!(sink.must_exit());
    // The VMM harvests 256, resets; the overflow goes in after them.
    let mut consumer = DirtyRingConsumer::new(&ring, cfg).unwrap();
    let mut seen = Vec::new();
    consumer.harvest(usize::MAX, |e| seen.push(e.offset));
    let mut batches = 0;
    let reset = sink.reset_with(&slots, |_| batches += 1);
    assert!(batches > 0);
    assert_eq!(reset.reset, 256);
    assert_eq!(sink.overflowed(), 0);
    consumer.harvest(usize::MAX, |e| seen.push(e.offset));
    assert_eq!(seen, (0..300).collect::<Vec<u64>>(), "every mark once, in order, across the full ring");
}

/// A deterministic xorshift, for the randomised comparison below.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn i4_drains_agree_with_tdp_mock_pml_model_over_random_runs() {
    // tdp-mock's `Pml` is an independent model of the CPU's log (index, wrap to 0xFFFF, full); the
    // CPU here writes each GPA where the model says and the drain must return exactly the model's log.
    let page = PmlPage::new();
    let (vmx, mut pml) = setup(&page);
    let slots = slots();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = 0u64;
    for run in 0..200 {
        let mut model = tdp_mock::Pml::new();
        // Mirror the model's fresh index in the VMCS (the previous run's drain left 511 too).
        assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(u64::from(model.index())));
        let writes = next(&mut seed) % 1400;
        let mut drained_ours = Vec::new();
        let mut drained_model = Vec::new();
        let mut drain = |model: &mut tdp_mock::Pml, ours: &mut Vec<u64>, theirs: &mut Vec<u64>| {
            vmx.set_field(VmcsField::GUEST_PML_INDEX, u64::from(model.index()));
            let mut rec = Recorder::default();
            let d = pml.drain(&vmx, &slots, AsId(0), &mut rec).unwrap();
            assert_eq!(d.entries as usize, model.len(), "run {run}");
            ours.extend(rec.0.iter().map(|m| m.1));
            theirs.extend(model.drain().iter().map(|g| g.gfn().0));
        };
        for _ in 0..writes {
            let gfn = next(&mut seed) % 0x1000; // inside logged slot 0
            let index = model.index();
            if !model.try_log(tdp_core::addr::Gfn(gfn).gpa()) {
                // A log-full exit: drain, then the CPU retries the access.
                drain(&mut model, &mut drained_ours, &mut drained_model);
                let index = model.index();
                assert!(model.try_log(tdp_core::addr::Gfn(gfn).gpa()));
                page.set_entry(usize::from(index), gfn << 12);
            } else {
                page.set_entry(usize::from(index), gfn << 12);
            }
            total += 1;
            // Sometimes an ordinary exit drains a partial log.
            if next(&mut seed).is_multiple_of(97) {
                drain(&mut model, &mut drained_ours, &mut drained_model);
            }
        }
        drain(&mut model, &mut drained_ours, &mut drained_model);
        assert_eq!(drained_ours, drained_model, "run {run}");
        assert_eq!(drained_ours.len() as u64, writes, "run {run}: every logged write drained once");
    }
    assert_eq!(pml.stats().marked, total);
    assert!(pml.stats().full_logs > 0, "the runs must reach full logs");
}
