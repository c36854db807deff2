//! A real-mode (CPL0) guest that dirties 238 pages per pass, 20 passes, through a 256-entry ring.
//!
//! On `kvm_pvm` CPL0 code is emulated, and the emulator pushes past the soft limit without exiting: the
//! kernel overwrites entries of a full ring, its indices and ours drift apart, and a later
//! `KVM_EXIT_DIRTY_RING_FULL` finds nothing at the consumer's position while KVM can reset nothing. The
//! runner must then fail with [`Error::RingFullNothingToHarvest`] (naming the entries published out of
//! order) instead of resuming forever. On a host that runs the guest natively the guest completes, and the
//! collects must hold every page it wrote.
//!
//! Keeps: I5 (a broken producer cannot make the runner loop) and I4 where the kernel keeps it.

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use std::collections::BTreeSet;

use kvm_ioctls::VcpuExit;
use tdp_kvm::testing::{LogSetup, TestVm};
use tdp_kvm::{DirtyTracker, Error, SlotSpec, TrackingMode, VcpuRunner};

/// Real-mode code at 0x1000: 20 passes of one byte written to each page 0x2000..0xF0000, then `hlt`.
const CODE: [u8; 22] = [
    0xB9, 0x14, 0x00, // mov cx, 20
    0xB8, 0x00, 0x02, // pass: mov ax, 0x0200
    0x8E, 0xD8, //       page: mov ds, ax
    0xA2, 0x00, 0x00, //       mov [0], al
    0x05, 0x00, 0x01, //       add ax, 0x100 (one page)
    0x3D, 0x00, 0xF0, //       cmp ax, 0xF000
    0x72, 0xF3, //             jb page
    0xE2, 0xEE, //             loop pass
    0xF4, //                   hlt
];

#[test]
fn i5_a_ring_full_exit_with_nothing_to_harvest_is_a_clear_error_never_a_loop() {
    let Some(mut t) = TestVm::new_or_skip(&[(0, 0, 256)], LogSetup::Ring(256)).unwrap() else { return };
    let mem = t.memory_mut(0).unwrap();
    mem[0x1000..0x1000 + CODE.len()].copy_from_slice(&CODE);
    let tracker = DirtyTracker::new(&t.vm, TrackingMode::Ring(t.ring.unwrap())).unwrap();
    tracker.register_slot(SlotSpec::new(0, 0, 256)).unwrap();
    let mut vcpu = t.vm.create_vcpu(0).unwrap();
    let h = tracker.attach_vcpu(&vcpu).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let mut runner = VcpuRunner::new(&tracker, h);
    let outcome = runner.run(&mut vcpu, |exit| matches!(exit, VcpuExit::Hlt));
    let stats = tracker.stats().unwrap();
    eprintln!("outcome {outcome:?}; vCPU 0: {:?}", stats.per_vcpu[0]);
    match outcome {
        Err(Error::RingFullNothingToHarvest { vcpu: 0, published_elsewhere }) => {
            // Emulated CPL0: the kernel overflowed the ring. Resuming stays stuck, and says so again.
            assert!(published_elsewhere > 0, "the entries the kernel pushed are off our position");
            assert!(stats.full_rings > 0, "a harvest found the whole ring full: the overflow was seen");
            let again = runner.run(&mut vcpu, |exit| matches!(exit, VcpuExit::Hlt));
            assert!(matches!(again, Err(Error::RingFullNothingToHarvest { .. })), "{again:?}");
            // What was harvested before is still reported: nothing the tracker took is dropped.
            assert!(tracker.collect().unwrap().total() > 0);
        }
        Ok(true) => {
            let mut pages = BTreeSet::new();
            let round = tracker.collect().unwrap();
            pages.extend(round.iter().flat_map(|s| s.offsets().collect::<Vec<_>>()));
            assert_eq!(pages, (2..240).collect::<BTreeSet<u64>>(), "every page the guest wrote");
            assert_eq!(tracker.stats().unwrap().full_rings, 0);
        }
        other => panic!("neither a clean halt nor the clear error: {other:?}"),
    }
}
