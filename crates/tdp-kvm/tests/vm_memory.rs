//! I4 for writes KVM never sees: a real CPL3 guest (`tdp-guest`) writes its data slot while the VMM, as a
//! device would, writes the same memory through vm-memory's `GuestMemoryMmap<VmmBitmap>` (between the
//! guest's batches of one round). Each collect must report exactly the union: the pages the guest wrote
//! this round (they hold the round's number) and the pages the device wrote (found by their marker), no
//! page more or less. One round's result is given back with `restore`, as after a failed send: the next
//! collect, with no write in between, reports exactly those pages again, guest's and device's.
//!
//! Runs with the dirty ring and with clear-log; prints `SKIPPED` without `/dev/kvm`. A third test has the
//! device write while the vCPU runs on its own thread (with a small ring: ring-full exits meanwhile),
//! parks the vCPU at a batch boundary after a counted number of batches, and checks the same union.

// kvm-ioctls drives the guest; vm-memory is the device's view of guest memory.
#![cfg(all(feature = "kvm-ioctls", feature = "vm-memory"))]

use std::collections::BTreeSet;

use std::time::{Duration, Instant};

use tdp_guest::{
    BatchGate, Decision, GuestError, GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload,
    classify_exit,
};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, VcpuHandle, VcpuRunner, VmmBitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PAGES: u64 = 512;
const ROUNDS: u64 = 6;
/// The round whose result is given back and must come back whole.
const RESTORED_ROUND: u64 = 3;
/// Where in a page the device writes (the guest writes word 0 only).
const DEVICE_OFFSET: u64 = 2048;
const DEVICE_MARK: u64 = 0xdead_0000;

/// Registers `vm`'s data slot with `tracker` and returns the device's view of it: vm-memory over the
/// slot's host memory, whose `VmmBitmap` is attached to the tracker. `vm` must outlive the view.
fn device_view(
    vm: &GuestVm,
    tracker: &DirtyTracker,
) -> Result<GuestMemoryMmap<VmmBitmap>, Box<dyn std::error::Error>> {
    let region = vm.data_region();
    let spec = SlotSpec::from_region(region.slot, region.guest_phys_addr, region.memory_size);
    tracker.register_slot(spec)?;
    let size = usize::try_from(region.memory_size)?;
    // SAFETY: `userspace_addr..+size` is the data slot's mapping, owned by `vm`, which the caller keeps
    // alive longer than the view; a raw-built region does not unmap it. The guest and the device access
    // it concurrently only through volatile/atomic accesses, as with any guest memory.
    let mmap = unsafe {
        MmapRegion::<VmmBitmap>::build_raw(
            region.userspace_addr as *mut u8,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }?;
    let mem = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(
        mmap,
        GuestAddress(region.guest_phys_addr),
    )?])?;
    let device_region = mem.find_region(GuestAddress(region.guest_phys_addr)).ok_or("no region")?;
    tracker.attach_vmm_bitmap(spec.key(), device_region.bitmap())?;
    Ok(mem)
}

fn offsets(sets: &DirtySets) -> BTreeSet<u64> {
    sets.iter().flat_map(|s| s.offsets().collect::<Vec<_>>()).collect()
}

fn run(ring: bool) -> TestResult {
    let mut vm = match GuestVm::new(GuestSpec::new(PAGES, 1)) {
        Ok(vm) => vm,
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let tracker = match if ring {
        DirtyTracker::with_ring(vm.vm_fd(), 4096)
    } else {
        DirtyTracker::with_clear_log(vm.vm_fd(), false)
    } {
        Ok(t) => t,
        Err(e @ (Error::NoDirtyRing | Error::CapabilityMissing { .. })) => {
            eprintln!("SKIPPED: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    vm.set_dirty_logging(true)?;
    let region = vm.data_region();
    let mem = device_view(&vm, &tracker)?;

    vm.set_workload(0, &Workload::new(0, PAGES, 48, Pattern::Random).with_tag(false))?;
    vm.set_iteration(1);
    let mut vcpus = vm.create_vcpus()?;
    let mut vcpu = vcpus.pop().ok_or("no vCPU")?;
    tracker.attach_vcpu(vcpu.fd())?;
    let mut run_batch = || -> TestResult {
        loop {
            match vcpu.run()? {
                GuestExit::BatchDone { .. } => return Ok(()),
                GuestExit::Interrupted => {}
                GuestExit::DirtyRingFull => return Err("a 4096-entry ring filled by 48-page batches".into()),
            }
        }
    };
    let mut device_total = 0;
    let mut device_only_total = 0;
    for round in 1..=ROUNDS {
        vm.set_iteration(round);
        run_batch()?;
        // The device writes 16 pages, half of them chosen among pages the guest does not touch this round
        // (odd rounds: pages 0..16 of a stride the guest's random pages rarely all hit).
        let device: BTreeSet<u64> = (0..16).map(|i| (round * 37 + i * 29) % PAGES).collect();
        for &p in &device {
            mem.write_obj(
                DEVICE_MARK | round,
                GuestAddress(region.guest_phys_addr + p * 4096 + DEVICE_OFFSET),
            )?;
        }
        run_batch()?;
        let got = tracker.collect()?;
        let guest: BTreeSet<u64> =
            (0..PAGES).filter(|&p| vm.page_iteration(p).is_ok_and(|v| v == round)).collect();
        let mut expected: BTreeSet<u64> = guest.union(&device).copied().collect();
        // Check the device pages by content too: the marker of this round is there.
        for &p in &device {
            assert_eq!(vm.data_word(p, DEVICE_OFFSET / 8)?, DEVICE_MARK | round, "round {round} page {p}");
        }
        device_total += device.len();
        device_only_total += device.difference(&guest).count();
        assert!(guest.len() >= 40, "round {round}: the guest wrote only {} pages", guest.len());
        assert_eq!(offsets(&got), expected, "round {round}: collect != guest pages + device pages");
        if round == RESTORED_ROUND {
            // The send failed: give everything back; the next collect (no write meanwhile) returns it.
            assert_eq!(tracker.restore(&got)?, expected.len() as u64);
            let again = tracker.collect()?;
            assert_eq!(offsets(&again), expected, "restore gave back exactly the round's pages");
            expected.clear();
            assert!(tracker.collect()?.is_empty(), "nothing left after the restored pages were taken");
        }
    }
    assert!(
        device_only_total >= 10,
        "only {device_only_total} of {device_total} device pages were device-only"
    );
    Ok(())
}

#[test]
fn i4_device_writes_through_vm_memory_are_collected_with_the_guests_dirty_ring() -> TestResult {
    run(true)
}

#[test]
fn i4_device_writes_through_vm_memory_are_collected_with_the_guests_clear_log() -> TestResult {
    run(false)
}

/// The vCPU thread of the concurrent test: batches until the gate says stop, ring-full exits handled by
/// the runner.
fn vcpu_loop(
    tracker: &DirtyTracker,
    handle: VcpuHandle,
    mut vcpu: GuestVcpu,
    gate: &BatchGate,
) -> Result<(), String> {
    let mut runner = VcpuRunner::new(tracker, handle);
    let outcome = loop {
        match runner.run(vcpu.fd_mut(), |exit| classify_exit(&exit)) {
            Ok(Ok(GuestExit::BatchDone { .. })) => {
                if gate.at_batch_boundary() == Decision::Stop {
                    break Ok(());
                }
            }
            Ok(Ok(GuestExit::Interrupted)) => {}
            Ok(Ok(GuestExit::DirtyRingFull)) => break Err("a ring-full exit escaped the runner".to_string()),
            Ok(Err(unexpected)) => break Err(vcpu.exit_error(unexpected).to_string()),
            Err(e) if e.is_interrupted() => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    gate.leave();
    outcome
}

#[test]
fn i4_device_writes_while_the_guest_runs_are_collected_exactly() -> TestResult {
    let mut vm = match GuestVm::new(GuestSpec::new(PAGES, 1)) {
        Ok(vm) => vm,
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // 256 entries (soft limit 192) against 5 x 64 random writes over 512 pages a round (~240 distinct
    // pages): ring-full exits on the vCPU thread.
    let tracker = match DirtyTracker::with_ring(vm.vm_fd(), 256) {
        Ok(t) => t,
        Err(e @ Error::NoDirtyRing) => {
            eprintln!("SKIPPED: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    vm.set_dirty_logging(true)?;
    let region = vm.data_region();
    let mem = device_view(&vm, &tracker)?;
    vm.set_workload(0, &Workload::new(0, PAGES, 64, Pattern::Random).with_tag(false))?;
    vm.set_iteration(1);
    let vcpu = vm.create_vcpus()?.pop().ok_or("no vCPU")?;
    let handle = tracker.attach_vcpu(vcpu.fd())?;
    let gate = BatchGate::new(1);
    let mut device_only = 0;
    let (host, vcpu_result) = std::thread::scope(|s| {
        let thread = s.spawn(|| vcpu_loop(&tracker, handle, vcpu, &gate));
        let host = (|| -> TestResult {
            for round in 1..=ROUNDS {
                let start = vm.vcpu_stats(0)?.batches;
                // The device writes while the vCPU runs.
                let device: BTreeSet<u64> = (0..16).map(|i| (round * 41 + i * 31) % PAGES).collect();
                for &p in &device {
                    let at = GuestAddress(region.guest_phys_addr + p * 4096 + DEVICE_OFFSET);
                    mem.write_obj(DEVICE_MARK | round, at)?;
                }
                // Counted progress: five more batches (the deadline only turns a hang into a failure).
                let deadline = Instant::now() + Duration::from_secs(30);
                while vm.vcpu_stats(0)?.batches < start + 5 && gate.active() == 1 {
                    if Instant::now() > deadline {
                        return Err("the vCPU made no progress".into());
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                if !gate.pause_all(Duration::from_secs(30)) {
                    return Err("the vCPU did not park".into());
                }
                let got = tracker.collect()?;
                let guest: BTreeSet<u64> =
                    (0..PAGES).filter(|&p| vm.page_iteration(p).is_ok_and(|v| v == round)).collect();
                let expected: BTreeSet<u64> = guest.union(&device).copied().collect();
                assert_eq!(offsets(&got), expected, "round {round}: collect != guest pages + device pages");
                device_only += device.difference(&guest).count();
                vm.set_iteration(round + 1);
                gate.resume();
            }
            Ok(())
        })();
        gate.stop();
        (host, thread.join())
    });
    vcpu_result.map_err(|_| "the vCPU thread panicked")??;
    host?;
    let stats = tracker.stats()?;
    assert!(stats.per_vcpu[0].ring_full_exits > 0, "no ring-full exit: the ring never filled");
    assert!(device_only >= 10, "only {device_only} device pages were device-only");
    Ok(())
}
