//! Memslot ids on real `/dev/kvm`: the limit tdp-kvm checks is the kernel's. `KVM_CAP_NR_MEMSLOTS`
//! answers it; the highest id below it is accepted by KVM and by tdp-kvm (get-log of it reaches the
//! kernel), the first id at it is refused by KVM (`EINVAL`) and by tdp-kvm before any ioctl, with an error
//! naming the limit. `DirtyTracker::register_slot` refuses such an id at registration, with the same error.
//!
//! Keeps: I5 (a bad slot id is refused with its value before the kernel sees it).

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use kvm_bindings::kvm_userspace_memory_region;
use tdp_core::addr::AsId;
use tdp_core::memslot::{KVM_USER_MEM_SLOTS, MemslotSet};
use tdp_kvm::testing::{LogSetup, TestVm};
use tdp_kvm::{
    ClearRange, DirtyLogBuffer, DirtyTracker, Error, SlotSpec, TrackingMode, clear_dirty_log, get_dirty_log,
    max_memslots,
};

const BASE: u64 = 0x10_0000;

#[test]
fn the_highest_id_kvm_accepts_is_the_highest_tdp_accepts() {
    let top = KVM_USER_MEM_SLOTS.get() - 1;
    let Some(t) = TestVm::new_or_skip(&[(top, BASE, 64)], LogSetup::ManualInitiallySet).unwrap() else {
        return;
    };
    let limit = max_memslots(&t.vm).unwrap();
    eprintln!("KVM_CAP_NR_MEMSLOTS: {limit}");
    assert_eq!(limit, KVM_USER_MEM_SLOTS, "this host's KVM (x86, Linux 5.15+) has 32764 user memslots");
    assert_eq!(MemslotSet::with_slot_limit(tdp_core::addr::Gfn(1 << 36), limit).slot_limit(), limit);

    // Id 32763 exists and logs: INITIALLY_SET reports its 64 pages.
    let mut buf = DirtyLogBuffer::new(64).unwrap();
    get_dirty_log(&t.vm, u32::from(top), &mut buf).unwrap();
    assert_eq!(buf.count(), 64);
    // An id below the limit that was never created reaches KVM, which has no such slot (ENOENT).
    let absent = u32::from(top) - 1;
    let r = get_dirty_log(&t.vm, absent, &mut buf);
    assert!(matches!(r, Err(Error::SlotNotLogged { slot, .. }) if slot == absent), "{r:?}");

    // Id 32764: KVM refuses to create it ...
    let region = kvm_userspace_memory_region {
        slot: u32::from(top) + 1,
        flags: 0,
        guest_phys_addr: 0x100_0000,
        memory_size: 0x1000,
        userspace_addr: 0,
    };
    // SAFETY: KVM refuses the id before it looks at the (null, unmapped) host address, which the test
    // asserts; were it accepted, the guest never runs, so nothing would access the range.
    let created = unsafe { t.vm.set_user_memory_region(region) };
    assert_eq!(created.map_err(|e| e.errno()), Err(libc::EINVAL), "KVM's own limit");
    // ... and tdp-kvm refuses it, and any name above, before any ioctl.
    for slot in [u32::from(top) + 1, 0xffff, 2 << 16, u32::MAX] {
        let err = get_dirty_log(&t.vm, slot, &mut buf).unwrap_err();
        assert!(
            matches!(err, Error::SlotOutOfRange { op: "KVM_GET_DIRTY_LOG", slot: s, limit } if s == slot && limit == KVM_USER_MEM_SLOTS),
            "{err:?}"
        );
        assert!(err.to_string().contains("ids 0 to 32763"), "{err}");
        let range = ClearRange { slot, slot_pages: 64, first_page: 0, num_pages: 64, mask: &[u64::MAX] };
        let err = clear_dirty_log(&t.vm, &range).unwrap_err();
        assert!(matches!(err, Error::SlotOutOfRange { op: "KVM_CLEAR_DIRTY_LOG", .. }), "{err:?}");
    }
    // Nothing was cleared by the refused requests.
    get_dirty_log(&t.vm, u32::from(top), &mut buf).unwrap();
    assert_eq!(buf.count(), 64);
}

#[test]
fn the_test_vm_refuses_an_id_kvm_would_refuse() {
    let err =
        TestVm::new_or_skip(&[(KVM_USER_MEM_SLOTS.get(), BASE, 64)], LogSetup::GetAndClear).unwrap_err();
    assert!(
        matches!(err, Error::SlotOutOfRange { op: "KVM_SET_USER_MEMORY_REGION", slot: 32764, .. }),
        "{err:?}"
    );
}

#[test]
fn the_tracker_refuses_an_out_of_range_id_at_registration() {
    let top = KVM_USER_MEM_SLOTS.get() - 1;
    let Some(t) = TestVm::new_or_skip(&[(top, BASE, 64)], LogSetup::ManualInitiallySet).unwrap() else {
        return;
    };
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog).unwrap();
    let refused = [
        SlotSpec::new(top + 1, 0x100_0000, 64),
        SlotSpec::new(u16::MAX, 0x100_0000, 64),
        SlotSpec::new(1, 0x100_0000, 64).with_as_id(AsId(AsId::MAX_COUNT)),
    ];
    for spec in refused {
        let err = tracker.register_slot(spec).unwrap_err();
        assert!(
            matches!(err, Error::SlotOutOfRange { op: "DirtyTracker::register_slot", slot, limit }
                if slot == spec.key().raw() && limit == KVM_USER_MEM_SLOTS),
            "{err:?}"
        );
        assert!(err.to_string().contains("ids 0 to 32763"), "{err}");
    }
    assert!(tracker.slots().unwrap().is_empty(), "nothing was registered by the refused calls");
    // The highest id KVM accepts registers, and its first collect reaches the kernel: INITIALLY_SET
    // reports all 64 pages.
    tracker.register_slot(SlotSpec::new(top, BASE, 64)).unwrap();
    assert_eq!(tracker.slots().unwrap(), [SlotSpec::new(top, BASE, 64)]);
    assert_eq!(tracker.collect().unwrap().total(), 64);
}
