//! The dirty bitmap on real `/dev/kvm`: get and clear on logged slots (with `INITIALLY_SET`, every page
//! starts dirty, so the counts are a real check of what KVM did), clear-log range errors, unlogged and
//! unknown slots, a buffer smaller than KVM's slot, and the bitmap refused on a ring VM.
//!
//! Keeps: I5 (every bad request is refused with the values, and leaves KVM's log as it was).

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use tdp_core::dirty_bitmap::BitmapError;
use tdp_kvm::testing::{LogSetup, TestVm};
use tdp_kvm::{ClearRange, DirtyLogBuffer, Error, clear_dirty_log, get_dirty_log};

const BASE: u64 = 0x10_0000;

#[test]
fn initially_set_reports_every_page_and_clear_removes_exactly_the_mask() {
    // 1000 pages: not a multiple of 64, so the end-of-slot rule is exercised.
    let Some(t) = TestVm::new_or_skip(&[(3, BASE, 1000)], LogSetup::ManualInitiallySet).unwrap() else {
        return;
    };
    let mut buf = DirtyLogBuffer::new(1000).unwrap();
    get_dirty_log(&t.vm, 3, &mut buf).unwrap();
    assert_eq!(buf.count(), 1000);
    assert_eq!(buf.iter_dirty().last(), Some(999));
    // With manual protect the get only copies: asking again reports the same pages.
    get_dirty_log(&t.vm, 3, &mut buf).unwrap();
    assert_eq!(buf.count(), 1000);

    // Clear every other page of 64..192 and the whole tail 960..1000 (40 pages: allowed, it ends the slot).
    let alternate = 0x5555_5555_5555_5555u64;
    clear_dirty_log(
        &t.vm,
        &ClearRange {
            slot: 3,
            slot_pages: 1000,
            first_page: 64,
            num_pages: 128,
            mask: &[alternate, alternate],
        },
    )
    .unwrap();
    clear_dirty_log(
        &t.vm,
        &ClearRange { slot: 3, slot_pages: 1000, first_page: 960, num_pages: 40, mask: &[u64::MAX] },
    )
    .unwrap();
    get_dirty_log(&t.vm, 3, &mut buf).unwrap();
    assert_eq!(buf.count(), 1000 - 64 - 40);
    for p in 0..1000u64 {
        let cleared = ((64..192).contains(&p) && p % 2 == 0) || p >= 960;
        let dirty = buf.words()[(p / 64) as usize] & (1 << (p % 64)) != 0;
        assert_eq!(dirty, !cleared, "page {p}");
    }
    // Clearing what was reported leaves nothing.
    let words = buf.words().to_vec();
    clear_dirty_log(
        &t.vm,
        &ClearRange { slot: 3, slot_pages: 1000, first_page: 0, num_pages: 1000, mask: &words },
    )
    .unwrap();
    get_dirty_log(&t.vm, 3, &mut buf).unwrap();
    assert_eq!(buf.count(), 0);
}

#[test]
fn manual_without_initially_set_starts_clean() {
    let Some(t) = TestVm::new_or_skip(&[(0, BASE, 256)], LogSetup::Manual).unwrap() else { return };
    let mut buf = DirtyLogBuffer::new(256).unwrap();
    // Fill the buffer with garbage first: the get must overwrite every word.
    buf.words_mut().fill(u64::MAX);
    get_dirty_log(&t.vm, 0, &mut buf).unwrap();
    assert_eq!(buf.count(), 0);
}

#[test]
fn get_and_clear_without_guest_writes_reports_nothing() {
    // Host writes to guest memory do not dirty it in KVM: only vCPU writes do.
    let Some(mut t) = TestVm::new_or_skip(&[(0, BASE, 128)], LogSetup::GetAndClear).unwrap() else { return };
    t.memory_mut(0).unwrap()[4096 * 5] = 1;
    let mut buf = DirtyLogBuffer::new(128).unwrap();
    buf.words_mut().fill(u64::MAX);
    get_dirty_log(&t.vm, 0, &mut buf).unwrap();
    assert_eq!(buf.count(), 0);
}

#[test]
fn i5_clear_log_range_errors_are_caught_before_the_ioctl_and_change_nothing() {
    let Some(t) = TestVm::new_or_skip(&[(1, BASE, 1000)], LogSetup::ManualInitiallySet).unwrap() else {
        return;
    };
    let mask = [u64::MAX; 16];
    let err = |first, num, mask: &[u64]| match clear_dirty_log(
        &t.vm,
        &ClearRange { slot: 1, slot_pages: 1000, first_page: first, num_pages: num, mask },
    ) {
        Err(Error::BadLogRange { slot: 1, source }) => source,
        other => panic!("{first}+{num}: expected a range error, got {other:?}"),
    };
    assert_eq!(err(3, 64, &mask), BitmapError::Misaligned { first_page: 3 });
    assert_eq!(err(0, 40, &mask), BitmapError::BadLength { first_page: 0, num_pages: 40, pages: 1000 });
    assert_eq!(err(960, 64, &mask), BitmapError::OutOfRange { first_page: 960, num_pages: 64, pages: 1000 });
    assert_eq!(err(1024, 0, &mask), BitmapError::OutOfRange { first_page: 1024, num_pages: 0, pages: 1000 });
    assert_eq!(err(0, 1000, &mask[..15]), BitmapError::ShortMask { have: 15, need: 16 });
    // Nothing was cleared by any of them.
    let mut buf = DirtyLogBuffer::new(1000).unwrap();
    get_dirty_log(&t.vm, 1, &mut buf).unwrap();
    assert_eq!(buf.count(), 1000);
}

#[test]
fn i5_unlogged_and_unknown_slots_are_named_in_the_error() {
    let Some(t) = TestVm::new_or_skip(&[(0, BASE, 64)], LogSetup::NotLogged).unwrap() else { return };
    let mut buf = DirtyLogBuffer::new(64).unwrap();
    let e = get_dirty_log(&t.vm, 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::SlotNotLogged { op: "KVM_GET_DIRTY_LOG", slot: 0 }), "{e:?}");
    let e = get_dirty_log(&t.vm, 7, &mut buf).unwrap_err();
    assert!(matches!(e, Error::SlotNotLogged { slot: 7, .. }), "{e:?}");
    let e = clear_dirty_log(
        &t.vm,
        &ClearRange { slot: 0, slot_pages: 64, first_page: 0, num_pages: 64, mask: &[1] },
    )
    .unwrap_err();
    assert!(matches!(e, Error::SlotNotLogged { op: "KVM_CLEAR_DIRTY_LOG", slot: 0 }), "{e:?}");
}

#[test]
fn i5_a_buffer_smaller_than_the_kvm_slot_hits_the_guard_page_not_the_heap() {
    // KVM's slot has 4096 pages (a 512-byte bitmap); the caller claims 64 (8 bytes). Without the guard the
    // kernel would write 504 bytes past the buffer.
    let Some(t) = TestVm::new_or_skip(&[(0, BASE, 4096)], LogSetup::ManualInitiallySet).unwrap() else {
        return;
    };
    let mut small = DirtyLogBuffer::new(64).unwrap();
    let e = get_dirty_log(&t.vm, 0, &mut small).unwrap_err();
    assert!(matches!(e, Error::SlotLargerThanRegistered { slot: 0, pages: 64 }), "{e:?}");
    // The right size works.
    let mut right = DirtyLogBuffer::new(4096).unwrap();
    get_dirty_log(&t.vm, 0, &mut right).unwrap();
    assert_eq!(right.count(), 4096);
}

#[test]
fn i5_bitmap_ioctls_on_a_ring_vm_say_the_ring_disables_them() {
    let Some(t) = TestVm::new_or_skip(&[(0, BASE, 64)], LogSetup::Ring(4096)).unwrap() else { return };
    let mut buf = DirtyLogBuffer::new(64).unwrap();
    let e = get_dirty_log(&t.vm, 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::BitmapDisabledByRing { op: "KVM_GET_DIRTY_LOG" }), "{e:?}");
    let e = clear_dirty_log(
        &t.vm,
        &ClearRange { slot: 0, slot_pages: 64, first_page: 0, num_pages: 64, mask: &[1] },
    )
    .unwrap_err();
    assert!(matches!(e, Error::BitmapDisabledByRing { op: "KVM_CLEAR_DIRTY_LOG" }), "{e:?}");
}
