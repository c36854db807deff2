//! The tracker on real `/dev/kvm` without guest code: clear-log collects with `INITIALLY_SET` (every page
//! starts dirty, so counts check what KVM did), restore, the error path keeping harvested pages, slot
//! registration rules, ring-mode attach and statistics.
//!
//! Keeps: I4 (a collect that fails part-way keeps what it took; restore reports pages again) and I5
//! (conflicting or empty slots are refused with the values).

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
use tdp_kvm::testing::{LogSetup, TestVm};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, TrackingMode, abi};

const A: u64 = 0x10_0000;
const B: u64 = 0x100_0000;

fn key(id: u16) -> RingSlot {
    RingSlot::new(AsId(0), SlotId(id))
}

#[test]
fn clear_log_collect_reports_initially_set_pages_once_then_restore_reports_them_again() {
    let Some(t) = TestVm::new_or_skip(&[(1, A, 1000), (2, B, 256)], LogSetup::ManualInitiallySet).unwrap()
    else {
        return;
    };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog).unwrap();
    tracker.register_slot(SlotSpec::new(1, A, 1000)).unwrap();
    tracker.register_slot(SlotSpec::new(2, B, 256)).unwrap();
    let before = tracker.stats().unwrap();

    let first = tracker.collect().unwrap();
    assert_eq!(first.get(key(1)).unwrap().count(), 1000);
    assert_eq!(first.get(key(2)).unwrap().count(), 256);
    assert_eq!(first.get(key(2)).unwrap().gpas().last(), Some(Gpa(B + 255 * 4096)));
    // KVM cleared exactly what was reported: nothing is left.
    assert!(tracker.collect().unwrap().is_empty());

    // A failed round gives its pages back; the next collect reports them (and only them).
    assert_eq!(tracker.restore(&first).unwrap(), 1256);
    assert_eq!(tracker.pending_pages().unwrap(), 1256);
    let again = tracker.collect().unwrap();
    assert_eq!(again, first);
    assert_eq!(tracker.pending_pages().unwrap(), 0);
    assert!(tracker.collect().unwrap().is_empty());

    let stats = tracker.stats().unwrap();
    assert_eq!((stats.harvested, stats.collects), (1256, 4), "bits taken from KVM, collects done");
    let rate = stats.rate_since(&before);
    assert_eq!(rate.pages, 1256);
    assert!(rate.per_vcpu.is_none(), "the bitmap has no per-vCPU attribution");
}

#[test]
fn collect_into_adds_to_what_the_caller_holds() {
    let Some(t) = TestVm::new_or_skip(&[(1, A, 128)], LogSetup::ManualInitiallySet).unwrap() else { return };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog).unwrap();
    tracker.register_slot(SlotSpec::new(1, A, 128)).unwrap();
    let mut out = DirtySets::default();
    out.add_slot(key(9), Gpa(0x9000_0000), 4).insert(3);
    assert_eq!(tracker.collect_into(&mut out).unwrap(), 128);
    assert_eq!(out.total(), 129, "the caller's page stays");
}

#[test]
fn i4_a_collect_that_fails_part_way_keeps_what_it_took() {
    // Slot 1 logged (every page dirty); slot 2 registered with the tracker but not with KVM.
    let Some(t) = TestVm::new_or_skip(&[(1, A, 640)], LogSetup::ManualInitiallySet).unwrap() else { return };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog).unwrap();
    tracker.register_slot(SlotSpec::new(1, A, 640)).unwrap();
    tracker.register_slot(SlotSpec::new(2, B, 64)).unwrap();
    let e = tracker.collect().unwrap_err();
    assert!(matches!(e, Error::SlotNotLogged { slot: 2, .. }), "{e:?}");
    // Slot 1 was read and cleared in KVM before slot 2 failed: its pages must not be lost.
    assert_eq!(tracker.pending_pages().unwrap(), 640);
    let pending = tracker.unregister_slot(key(2)).unwrap();
    assert!(pending.is_some_and(|p| p.is_empty()));
    let round = tracker.collect().unwrap();
    assert_eq!(round.get(key(1)).unwrap().count(), 640);
    assert!(tracker.collect().unwrap().is_empty());
}

#[test]
fn get_and_clear_collect_without_guest_writes_is_empty() {
    let Some(mut t) = TestVm::new_or_skip(&[(0, A, 512)], LogSetup::GetAndClear).unwrap() else { return };
    t.memory_mut(0).unwrap().fill(7); // host writes are not guest writes
    let tracker = DirtyTracker::with_bitmap(&t.vm).unwrap();
    tracker.register_slot(SlotSpec::new(0, A, 512)).unwrap();
    let round = tracker.collect().unwrap();
    assert_eq!((round.total(), round.iter().count()), (0, 1), "one slot, no page");
}

#[test]
fn i5_slot_registration_refuses_conflicts_and_empty_ranges() {
    let Some(t) = TestVm::new_or_skip(&[], LogSetup::Manual).unwrap() else { return };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog).unwrap();
    tracker.register_slot(SlotSpec::new(1, A, 16)).unwrap();
    let same_id = tracker.register_slot(SlotSpec::new(1, B, 16)).unwrap_err();
    assert!(matches!(same_id, Error::SlotConflict { why: "the same slot id", .. }), "{same_id:?}");
    let overlap = tracker.register_slot(SlotSpec::new(2, A + 15 * 4096, 16)).unwrap_err();
    assert!(matches!(overlap, Error::SlotConflict { why: "overlapping guest-physical ranges", .. }));
    // The same range in another address space (SMM) is fine.
    let smm = SlotSpec::new(1, A, 16).with_as_id(AsId(1));
    tracker.register_slot(smm).unwrap();
    assert!(matches!(tracker.register_slot(SlotSpec::new(3, B, 0)), Err(Error::BadSlot { pages: 0, .. })));
    assert!(matches!(
        tracker.register_slot(SlotSpec::new(3, u64::MAX - 4095, 2)),
        Err(Error::BadSlot { .. })
    ));
    // Larger than KVM's largest memslot: KVM would refuse it, and ring offsets are kept in 32 bits.
    let too_large = tdp_kvm::MAX_SLOT_PAGES + 1;
    assert!(matches!(
        tracker.register_slot(SlotSpec::new(3, B, too_large)),
        Err(Error::BadSlot { pages, .. }) if pages == too_large
    ));
    tracker.register_slot(SlotSpec::new(3, 1 << 44, tdp_kvm::MAX_SLOT_PAGES)).unwrap();
    tracker.unregister_slot(key(3)).unwrap();
    assert!(matches!(tracker.unregister_slot(key(7)), Err(Error::SlotNotRegistered { .. })));
    assert_eq!(tracker.slots().unwrap().len(), 2);
}

#[test]
fn ring_tracker_attaches_vcpus_and_collects_an_idle_vm_as_empty() {
    let Some(t) = TestVm::new_or_skip(&[(0, A, 256)], LogSetup::Ring(4096)).unwrap() else { return };
    let cfg = t.ring.unwrap();
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::Ring(cfg)).unwrap();
    tracker.register_slot(SlotSpec::new(0, A, 256)).unwrap();
    let vcpus: Vec<_> = (0..2).map(|i| t.vm.create_vcpu(i).unwrap()).collect();
    let handles: Vec<_> = vcpus.iter().map(|v| tracker.attach_vcpu(v).unwrap()).collect();
    assert_eq!(handles.iter().map(|h| h.index()).collect::<Vec<_>>(), [0, 1]);
    let round = tracker.collect().unwrap();
    assert!(round.is_empty());
    let stats = tracker.stats().unwrap();
    assert!(stats.per_vcpu_exact);
    assert_eq!(stats.per_vcpu.len(), 2);
    assert_eq!(
        (stats.harvested, stats.reset_entries, stats.invalid_slot, stats.invalid_offset),
        (0, 0, 0, 0)
    );
    assert!(stats.reset_time > std::time::Duration::ZERO, "the collect's KVM_RESET_DIRTY_RINGS was timed");
}

#[test]
fn ring_tracker_refuses_a_second_enable_after_vcpus() {
    let Some(t) = TestVm::new_or_skip(&[], LogSetup::NotLogged).unwrap() else { return };
    let _vcpu = t.vm.create_vcpu(0).unwrap();
    match DirtyTracker::with_ring(&t.vm, 4096) {
        Err(Error::RingAfterVcpus { .. } | Error::NoDirtyRing) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn i5_guest_memfd_slots_and_foreign_page_sizes_are_refused_with_the_slot() {
    let Some(t) = TestVm::new_or_skip(&[], LogSetup::NotLogged).unwrap() else { return };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::GetAndClear).unwrap();
    let memfd = SlotSpec::new(1, A, 16).with_flags(abi::KVM_MEM_LOG_DIRTY_PAGES | abi::KVM_MEM_GUEST_MEMFD);
    let e = tracker.register_slot(memfd).unwrap_err();
    assert!(matches!(e, Error::GuestMemfdSlot { slot } if slot == memfd.key()), "{e}");
    assert!(e.to_string().contains("guest_memfd"), "{e}");
    let arm64 = SlotSpec::new(1, A, 16).with_page_size(65536);
    let e = tracker.register_slot(arm64).unwrap_err();
    assert!(matches!(e, Error::UnsupportedPageSize { page_size: 65536, supported: 4096, .. }), "{e}");
    assert!(tracker.slots().unwrap().is_empty(), "nothing registered on error");
    tracker.register_slot(SlotSpec::new(1, A, 16).with_page_size(4096)).unwrap();
    assert_eq!(tracker.slots().unwrap().len(), 1);
}
