//! The dirty ring on real `/dev/kvm`: probing, enabling (good sizes, bad sizes, after vCPUs exist),
//! mapping and unmapping, harvesting an empty ring, and resetting with nothing harvested.
//!
//! Keeps: I5 (bad sizes are refused with the rule that broke, before KVM sees them; enabling after vCPUs
//! exist is reported as such).

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use kvm_ioctls::{Kvm, VmFd};
use tdp_core::dirty_ring::{DIRTY_GFN_F_MASK, RingError};
use tdp_kvm::{
    DirtyRing, Error, RingCap, check_ring_size, enable_dirty_ring, probe_dirty_ring, reset_dirty_rings,
};

fn vm_or_skip() -> Option<(Kvm, VmFd)> {
    let kvm = match tdp_kvm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM on an opened /dev/kvm");
    Some((kvm, vm))
}

/// A VM whose host offers a ring, or `None` (SKIPPED printed).
fn ring_vm_or_skip() -> Option<(Kvm, VmFd, tdp_kvm::RingSupport)> {
    let (kvm, vm) = vm_or_skip()?;
    match probe_dirty_ring(&vm) {
        Ok(s) => Some((kvm, vm, s)),
        Err(Error::NoDirtyRing) => {
            eprintln!("SKIPPED: this host's KVM offers no dirty ring");
            None
        }
        Err(e) => panic!("probe failed: {e}"),
    }
}

#[test]
fn probe_prefers_acq_rel_and_reports_a_valid_maximum() {
    let Some((_kvm, vm, s)) = ring_vm_or_skip() else { return };
    // If the host offers 223 we must pick it; otherwise 192.
    let raw_223 = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
    assert_eq!(s.cap == RingCap::AcqRel, raw_223 > 0, "ACQ_REL chosen exactly when offered");
    let raw = vm.check_extension_raw(u64::from(s.cap.number()));
    assert_eq!(u64::try_from(raw).ok(), Some(s.max_bytes), "max is KVM's answer for the chosen cap");
    assert!(s.max_bytes.is_power_of_two() && s.max_bytes >= 4096, "max {} bytes", s.max_bytes);
    assert!(s.max_entries() <= 65536);
}

#[test]
fn ring_enables_at_good_sizes_smallest_typical_largest() {
    let Some((_k, _v, s)) = ring_vm_or_skip() else { return };
    for entries in [256, 4096, u32::try_from(s.max_entries()).unwrap_or(65536)] {
        let (kvm, vm) = vm_or_skip().expect("kvm opened above");
        let (support, cfg) =
            enable_dirty_ring(&vm, entries).unwrap_or_else(|e| panic!("{entries} entries: {e}"));
        assert_eq!((support, cfg.entries(), cfg.bytes()), (s, entries, entries * 16));
        // The vCPU created after the enable has a ring we can map, of exactly that size.
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let ring = DirtyRing::map(&vcpu, cfg).expect("map the ring");
        assert_eq!(ring.entries().len(), entries as usize);
        drop(kvm);
    }
}

#[test]
fn i5_bad_ring_sizes_are_refused_before_the_ioctl_with_the_rule() {
    let Some((_kvm, vm, s)) = ring_vm_or_skip() else { return };
    let bad = |entries| enable_dirty_ring(&vm, entries).expect_err("must be refused");
    assert!(matches!(
        bad(1000),
        Error::BadRingSize { bytes: 16000, source: RingError::NotPowerOfTwo { .. } }
    ));
    assert!(matches!(bad(0), Error::BadRingSize { source: RingError::NotPowerOfTwo { .. }, .. }));
    assert!(matches!(
        bad(128),
        Error::BadRingSize { source: RingError::TooSmall { entries: 128, min: 256 }, .. }
    ));
    assert!(matches!(
        bad(1 << 17),
        Error::BadRingSize { source: RingError::TooLarge { max: 65536, .. }, .. }
    ));
    // Larger than this host offers, if the host offers less than the ABI maximum.
    let host = tdp_kvm::RingSupport::new(s.cap, 8192);
    assert!(matches!(
        check_ring_size(&host, 1024),
        Err(Error::RingLargerThanOffered { bytes: 16384, max_bytes: 8192 })
    ));
    // None of these reached KVM: the VM still takes a valid ring.
    enable_dirty_ring(&vm, 4096).expect("a valid size after refused ones");
}

#[test]
fn i5_ring_enabled_after_a_vcpu_exists_is_reported_as_such() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    let _vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let e = enable_dirty_ring(&vm, 4096).expect_err("KVM refuses after KVM_CREATE_VCPU");
    assert!(matches!(e, Error::RingAfterVcpus { bytes: 65536, pml_note: "" }), "{e:?}");
    assert!(e.to_string().contains("before KVM_CREATE_VCPU"), "{e}");
}

#[test]
fn i5_ring_enabled_twice_is_refused() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    enable_dirty_ring(&vm, 4096).expect("first enable");
    assert!(matches!(enable_dirty_ring(&vm, 4096), Err(Error::RingAfterVcpus { .. })));
}

#[test]
fn ring_maps_clean_unmaps_and_maps_again() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    let (_, cfg) = enable_dirty_ring(&vm, 1024).expect("enable");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let first = DirtyRing::map(&vcpu, cfg).expect("map");
    let flags_set = first
        .entries()
        .iter()
        .filter(|e| e.flags.load(std::sync::atomic::Ordering::Acquire) & DIRTY_GFN_F_MASK != 0)
        .count();
    assert_eq!(flags_set, 0, "a vCPU that never ran has a clean ring");
    let addr = first.entries().as_ptr() as usize;
    // A second mapping of the same ring works while the first lives and sees the same (kernel) pages.
    let second = DirtyRing::map(&vcpu, cfg).expect("second map");
    assert_ne!(second.entries().as_ptr() as usize, addr);
    drop(first);
    drop(second);
    // After both were unmapped (Drop), mapping again still works: nothing leaked a broken state.
    let third = DirtyRing::map(&vcpu, cfg).expect("map after unmap");
    assert_eq!(third.entries().len(), 1024);
    // The ring outlives the vCPU fd: the mapping holds the file.
    drop(vcpu);
    assert_eq!(
        third.entries().iter().filter(|e| e.flags.load(std::sync::atomic::Ordering::Relaxed) != 0).count(),
        0
    );
}

#[test]
fn i5_mapping_a_ring_on_a_vm_without_one_is_refused_not_sigbus() {
    let Some((_kvm, vm)) = vm_or_skip() else { return };
    let cfg = tdp_core::dirty_ring::RingConfig::new(1024, 0).expect("valid geometry");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let e = DirtyRing::map(&vcpu, cfg).expect_err("no ring enabled: KVM refuses the mapping");
    assert!(matches!(e, Error::RingNotMapped { entries: 1024 }), "{e:?}");
}

#[test]
fn i5_mapping_more_entries_than_the_vm_ring_has_is_refused() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    let (_, _) = enable_dirty_ring(&vm, 1024).expect("enable");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let larger = tdp_core::dirty_ring::RingConfig::new(4096, 0).expect("valid geometry");
    assert!(matches!(DirtyRing::map(&vcpu, larger), Err(Error::RingNotMapped { entries: 4096 })));
}

#[test]
fn i5_mapping_fewer_entries_than_the_vm_ring_has_is_refused() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    let (_, cfg) = enable_dirty_ring(&vm, 1024).expect("enable");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let smaller = tdp_core::dirty_ring::RingConfig::new(512, 0).expect("valid geometry");
    assert!(matches!(DirtyRing::map(&vcpu, smaller), Err(Error::RingNotMapped { entries: 512 })));
    assert!(DirtyRing::map(&vcpu, cfg).is_ok(), "the exact size maps");
}

#[test]
fn empty_ring_harvests_nothing_and_reset_returns_zero() {
    let Some((_kvm, vm, _)) = ring_vm_or_skip() else { return };
    let (_, cfg) = enable_dirty_ring(&vm, 4096).expect("enable");
    let vcpus: Vec<_> = (0..2).map(|i| vm.create_vcpu(i).expect("KVM_CREATE_VCPU")).collect();
    let mut rings: Vec<_> = vcpus.iter().map(|v| DirtyRing::map(v, cfg).expect("map")).collect();
    for r in &mut rings {
        assert_eq!(r.harvest(usize::MAX, |e| panic!("unexpected entry {e:?}")), 0);
        assert_eq!(r.fetch_index(), 0);
    }
    assert_eq!(reset_dirty_rings(&vm).expect("reset"), 0);
}

#[test]
fn i5_reset_on_a_vm_without_ring_is_a_clear_error() {
    let Some((_kvm, vm)) = vm_or_skip() else { return };
    let e = reset_dirty_rings(&vm).expect_err("no ring");
    assert!(matches!(e, Error::RingNotEnabled { op: "KVM_RESET_DIRTY_RINGS" }), "{e:?}");
}
