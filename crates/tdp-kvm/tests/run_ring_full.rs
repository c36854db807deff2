//! A small real-guest smoke test of [`VcpuRunner`]: a CPL3 guest (`tdp-guest`) writes known pages through
//! a small dirty ring, so the vCPU hits `KVM_EXIT_DIRTY_RING_FULL` many times; the runner harvests and
//! resets at each, and the collects return exactly the pages written. The thorough real-guest tests live
//! in `real_guest*.rs`.
//!
//! Keeps: I4 across ring-full exits and concurrent collects (the union of every collect is exactly the set
//! of pages the guest wrote: none lost, none invented).

// The tests drive VMs through kvm-ioctls (the default feature).
#![cfg(feature = "kvm-ioctls")]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use tdp_core::addr::{AsId, RingSlot, SlotId};
use tdp_guest::{GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload, classify_exit};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, Throttle, VcpuHandle, VcpuRunner};

const DATA_PAGES: u64 = 8192;
const SHARE: u64 = 4096;
const BATCH: u64 = 256;
const BATCHES: u64 = 12;
/// 256 entries: the vCPU exits at 192 in use, so 3072 writes need many ring-full exits.
const RING_ENTRIES: u32 = 256;

/// The guest, its ring tracker, and its vCPUs attached to the tracker.
type Setup = (GuestVm, DirtyTracker, Vec<(GuestVcpu, VcpuHandle)>);

fn guest_or_skip(vcpus: usize) -> Option<Setup> {
    let vm = match GuestVm::new(GuestSpec::new(DATA_PAGES, vcpus).with_dirty_logging(true)) {
        Ok(vm) => vm,
        Err(tdp_guest::GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
            return None;
        }
        Err(e) => panic!("guest setup: {e}"),
    };
    let tracker = match DirtyTracker::with_ring(vm.vm_fd(), RING_ENTRIES) {
        Ok(t) => t,
        Err(Error::NoDirtyRing) => {
            eprintln!("SKIPPED: no dirty ring on this host");
            return None;
        }
        Err(e) => panic!("enable ring: {e}"),
    };
    tracker.register_slot(SlotSpec::new(vm.data_slot() as u16, vm.data_gpa(), vm.data_pages())).unwrap();
    let mut vm = vm;
    let created = vm.create_vcpus().unwrap();
    let attached = created
        .into_iter()
        .map(|v| {
            let h = tracker.attach_vcpu(v.fd()).unwrap();
            (v, h)
        })
        .collect();
    for i in 0..vcpus {
        vm.set_workload(i, &Workload::new(i as u64 * SHARE, SHARE, BATCH, Pattern::Sequential)).unwrap();
    }
    Some((vm, tracker, attached))
}

/// Runs `BATCHES` batches on one vCPU through the runner; ring-full exits never reach the closure. Without
/// a concurrent collector, every ring-full exit must find entries itself (with one, a collect may have
/// taken and reset them first).
fn run_batches(tracker: &DirtyTracker, vcpu: &mut GuestVcpu, h: VcpuHandle, concurrent: bool) -> u64 {
    let mut throttled = 0u64;
    let mut runner = VcpuRunner::new(tracker, h).with_throttle(|ev| {
        assert!(concurrent || ev.harvested > 0, "a ring-full exit with its ring to itself harvests: {ev:?}");
        throttled += 1;
        Throttle::Resume
    });
    let mut done = 0;
    while done < BATCHES {
        match runner.run(vcpu.fd_mut(), |exit| classify_exit(&exit)) {
            Ok(Ok(GuestExit::BatchDone { .. })) => done += 1,
            Ok(Ok(GuestExit::Interrupted)) => {}
            Ok(Ok(GuestExit::DirtyRingFull)) => panic!("the runner must handle ring-full exits itself"),
            Ok(Err(u)) => panic!("unexpected exit: {}", vcpu.exit_error(u)),
            Err(e) if e.is_interrupted() => {}
            Err(e) => panic!("run: {e}"),
        }
    }
    drop(runner);
    throttled
}

fn expected(vcpus: u64) -> BTreeSet<u64> {
    (0..vcpus).flat_map(|i| i * SHARE..i * SHARE + BATCH * BATCHES).collect()
}

fn pages(sets: &DirtySets, slot: RingSlot) -> BTreeSet<u64> {
    sets.get(slot).map(|s| s.offsets().collect()).unwrap_or_default()
}

#[test]
fn i4_ring_full_exits_are_harvested_and_the_collect_returns_exactly_the_written_pages() {
    let Some((vm, tracker, mut vcpus)) = guest_or_skip(1) else { return };
    let slot = RingSlot::new(AsId(0), SlotId(vm.data_slot() as u16));
    let (vcpu, h) = &mut vcpus[0];
    let start = tracker.stats().unwrap();
    let hook_calls = run_batches(&tracker, vcpu, *h, false);

    let stats = tracker.stats().unwrap();
    let exits = stats.per_vcpu[0].ring_full_exits;
    // 3072 entries through a 256-entry ring cannot happen with fewer than 11 harvests.
    assert!(exits >= 11, "only {exits} ring-full exits");
    assert_eq!(hook_calls, exits, "the throttle hook runs once per ring-full exit");
    assert!(tracker.pending_pages().unwrap() > 0, "ring-full harvests wait in the pending set");
    // The ring attributes every entry to its vCPU: the per-vCPU rate is the VM's.
    let rate = stats.rate_since(&start);
    let per_vcpu = rate.per_vcpu.as_deref().unwrap_or_default();
    assert_eq!(per_vcpu.len(), 1);
    assert_eq!((per_vcpu[0].pages, per_vcpu[0].ring_full_exits), (rate.pages, exits));
    assert!(rate.pages > 0 && rate.pages_per_sec > 0.0);

    let round = tracker.collect().unwrap();
    let want = expected(1);
    assert_eq!(pages(&round, slot), want, "exactly the written pages");
    for &p in &want {
        assert_eq!(vm.page_iteration(p).unwrap(), 1, "page {p} holds the guest's write");
    }
    let stats = tracker.stats().unwrap();
    assert!(stats.per_vcpu[0].harvested >= want.len() as u64);
    assert_eq!((stats.invalid_slot, stats.invalid_offset, stats.full_rings), (0, 0, 0));
    assert!(tracker.collect().unwrap().is_empty(), "nothing new after the vCPU stopped");
    eprintln!("1 vCPU: {exits} ring-full exits, {} entries harvested", stats.per_vcpu[0].harvested);
}

#[test]
fn i4_concurrent_collects_and_ring_full_exits_lose_nothing() {
    let Some((vm, tracker, vcpus)) = guest_or_skip(2) else { return };
    let slot = RingSlot::new(AsId(0), SlotId(vm.data_slot() as u16));
    let running = AtomicBool::new(true);
    let mut union = BTreeSet::new();
    let mut rounds = 0u32;
    std::thread::scope(|s| {
        let workers: Vec<_> = vcpus
            .into_iter()
            .map(|(mut v, h)| {
                let tracker = &tracker;
                s.spawn(move || run_batches(tracker, &mut v, h, true))
            })
            .collect();
        let collector = s.spawn(|| {
            let mut seen = BTreeSet::new();
            let mut n = 0;
            while running.load(Ordering::Acquire) {
                seen.extend(pages(&tracker.collect().unwrap(), slot));
                n += 1;
                std::thread::yield_now();
            }
            (seen, n)
        });
        // Join every worker before judging, and stop the collector whatever they did: a panicking
        // worker must fail the test, not leave the collector spinning.
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        running.store(false, Ordering::Release);
        let (seen, n) = collector.join().unwrap();
        union = seen;
        rounds = n;
        for r in results {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
    });
    // The vCPUs stopped: one last collect takes what is left in the rings and the pending set.
    union.extend(pages(&tracker.collect().unwrap(), slot));
    assert_eq!(union, expected(2), "union over {rounds} concurrent collects");
    for p in expected(2) {
        assert_eq!(vm.page_iteration(p).unwrap(), 1);
    }
    let stats = tracker.stats().unwrap();
    eprintln!("2 vCPUs: {rounds} concurrent collects, per vCPU {:?}", stats.per_vcpu);
    for (i, v) in stats.per_vcpu.iter().enumerate() {
        assert!(v.harvested >= BATCH * BATCHES, "vCPU {i}: {} entries", v.harvested);
    }
    assert_eq!(stats.harvested, stats.per_vcpu.iter().map(|v| v.harvested).sum::<u64>(), "exact per vCPU");
}
