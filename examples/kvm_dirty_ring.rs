//! Dirty tracking on real `/dev/kvm`, wired the way a rust-vmm VMM wires `tdp-kvm`: a two-vCPU guest
//! (`tdp-guest`'s CPL3 program) writes its iteration number into pseudo-random pages of a data memslot
//! of 4099 pages (not a multiple of 64, so the slot ends inside a bitmap word); a `DirtyTracker` with a
//! 256-entry dirty ring per vCPU (small, so `KVM_EXIT_DIRTY_RING_FULL` happens) follows it; each vCPU runs
//! on its own thread through a `VcpuRunner`, which harvests its ring at every ring-full exit; the main
//! thread, playing the migration thread, collects five rounds, checks every page of the slot, stops the
//! vCPUs, collects once more and prints per-vCPU dirty rates. Without a dirty ring it falls back to the
//! clear-log bitmap and says so; without `/dev/kvm` it prints `SKIPPED` and exits 0.
//!
//! Run: `cargo run --example kvm_dirty_ring`.

use std::process::ExitCode;
use std::time::Duration;

use tdp_guest::{
    BatchGate, DATA_SLOT, Decision, GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload,
    classify_exit,
};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, TrackingMode, VcpuHandle, VcpuRunner};

/// 16 MiB + 3 pages.
const DATA_PAGES: u64 = 4096 + 3;
const VCPUS: usize = 2;
/// Entries per vCPU ring: KVM's minimum size class, full after a few 64-page batches.
const RING_ENTRIES: u32 = 256;
const ROUNDS: u64 = 5;
const ROUND_GAP: Duration = Duration::from_millis(50);
/// How long the main thread waits for the vCPUs to park; longer means something is wrong.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvm_dirty_ring: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Failure> {
    let kvm = match tdp_kvm::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => {
            println!("SKIPPED: {e}");
            return Ok(());
        }
    };
    // 1. The VM and its memslots exist; no vCPU does yet, so the dirty ring can still be enabled.
    let mut vm = GuestVm::with_kvm(kvm, GuestSpec::new(DATA_PAGES, VCPUS))?;
    let tracker = match DirtyTracker::with_ring(vm.vm_fd(), RING_ENTRIES) {
        Ok(t) => t,
        Err(Error::NoDirtyRing) => {
            println!("this KVM offers no dirty ring: falling back to the clear-log bitmap (INITIALLY_SET)");
            DirtyTracker::with_clear_log(vm.vm_fd(), true)?
        }
        Err(e) => return Err(e.into()),
    };
    println!("tracking mode: {:?}", tracker.mode());

    // 2. Logging on for the data slot (after the capability: INITIALLY_SET applies when logging starts),
    //    and the same slot registered with the tracker. Each vCPU writes random pages of its half.
    vm.set_dirty_logging(true)?;
    let region = vm.data_region();
    tracker.register_slot(SlotSpec::from_region(region.slot, region.guest_phys_addr, region.memory_size))?;
    for i in 0..VCPUS {
        vm.set_workload(i, &Workload::share(DATA_PAGES, VCPUS as u64, i as u64, 64, Pattern::Random))?;
    }

    // 3. vCPUs: attaching one maps its ring. Round 0 runs before the guest does: with INITIALLY_SET it
    //    reports every page (a migration's first pass sends all memory); with the ring, nothing.
    let vcpus = vm.create_vcpus()?;
    let handles = vcpus.iter().map(|v| tracker.attach_vcpu(v.fd())).collect::<Result<Vec<_>, _>>()?;
    let at_start = tracker.stats()?;
    println!("round 0 (guest not started): {} pages", tracker.collect()?.total());

    // 4. Run the guest; the main thread parks it at batch boundaries to collect and check each round.
    let gate = BatchGate::new(VCPUS);
    let (host, vcpu_results) = std::thread::scope(|s| {
        let threads: Vec<_> = vcpus
            .into_iter()
            .zip(handles)
            .map(|(vcpu, handle)| {
                let (tracker, gate) = (&tracker, &gate);
                s.spawn(move || run_vcpu(tracker, handle, vcpu, gate))
            })
            .collect();
        let host = collect_rounds(&vm, &tracker, &gate);
        gate.stop(); // every vCPU thread leaves at its next batch boundary
        let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
        (host, results)
    });
    for (i, result) in vcpu_results.into_iter().enumerate() {
        result.map_err(|_| format!("vCPU thread {i} panicked"))?.map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    host?;

    // 5. The vCPUs are stopped: the last collect takes what they wrote since the last round.
    let last = tracker.collect()?;
    check_round(&vm, &last, vm.iteration())?;
    println!("final collect (vCPUs stopped): {} pages", last.total());
    if last.is_empty() {
        return Err("the guest ran after the last round but the final collect found nothing".into());
    }

    let stats = tracker.stats()?;
    let rate = stats.rate_since(&at_start);
    println!("dirty rate over {:.0?}: {:.0} pages/s VM-wide", rate.window, rate.pages_per_sec);
    match &rate.per_vcpu {
        Some(per_vcpu) => {
            for (i, v) in per_vcpu.iter().enumerate() {
                println!(
                    "  vCPU {i}: {} pages, {:.0} pages/s, {} ring-full exits",
                    v.pages, v.pages_per_sec, v.ring_full_exits
                );
            }
        }
        None => println!("  (per-vCPU rates need the dirty ring: KVM's bitmap is per memslot)"),
    }
    if stats.invalid_slot + stats.invalid_offset + stats.full_rings != 0 {
        return Err(format!("bad ring entries or an overflowed ring: {stats:?}").into());
    }
    if let TrackingMode::Ring(_) = tracker.mode() {
        if stats.per_vcpu.iter().any(|v| v.ring_full_exits == 0) {
            return Err(format!("a {RING_ENTRIES}-entry ring never filled: {stats:?}").into());
        }
        if stats.reset_entries != stats.harvested {
            return Err(format!(
                "KVM reset {} entries of {} harvested",
                stats.reset_entries, stats.harvested
            )
            .into());
        }
    }
    println!("every round: each reported page held the round's iteration, each unreported page an older one");
    Ok(())
}

/// The migration thread's loop: let the guest run, park it, collect, check, bump the iteration, resume.
fn collect_rounds(vm: &GuestVm, tracker: &DirtyTracker, gate: &BatchGate) -> Result<(), Failure> {
    for round in 1..=ROUNDS {
        std::thread::sleep(ROUND_GAP);
        // Parked at a batch boundary, no guest store is in flight: a reported page's data is final.
        if !gate.pause_all(PARK_TIMEOUT) {
            return Err(format!("round {round}: the vCPUs did not park within {PARK_TIMEOUT:?}").into());
        }
        // Pages come back write-protected again: later writes are reported by a later collect.
        let dirty = tracker.collect()?;
        check_round(vm, &dirty, vm.iteration())?;
        let exits: Vec<u64> = tracker.stats()?.per_vcpu.iter().map(|v| v.ring_full_exits).collect();
        println!("round {round}: {:>4} pages collected, ring-full exits so far {exits:?}", dirty.total());
        if dirty.is_empty() {
            return Err(format!("round {round}: the guest ran but nothing was reported").into());
        }
        vm.set_iteration(vm.iteration() + 1);
        gate.resume();
    }
    // Let the guest run on: the final collect, after the vCPUs stop, takes what it writes meanwhile.
    std::thread::sleep(ROUND_GAP);
    Ok(())
}

/// With the vCPUs parked at a batch boundary, every guest store of this round has landed, and every page
/// written since the last collect holds this round's iteration. So, as KVM's `dirty_log_test` checks:
/// every reported page holds `iteration` exactly, and every page not reported holds an older one (a
/// write that was not reported would show here as an unreported page holding `iteration`: a lost page).
fn check_round(vm: &GuestVm, dirty: &DirtySets, iteration: u64) -> Result<(), Failure> {
    if let Some(set) = dirty.iter().find(|s| !s.is_empty() && s.slot().raw() != DATA_SLOT) {
        return Err(format!("pages reported in unknown slot {:?}", set.slot()).into());
    }
    let reported = dirty.iter().find(|s| s.slot().raw() == DATA_SLOT);
    for page in 0..DATA_PAGES {
        let value = vm.page_iteration(page)?;
        let is_reported = reported.is_some_and(|s| s.contains(page));
        if is_reported && value != iteration {
            return Err(format!("page {page} reported dirty holds {value}, not iteration {iteration}").into());
        }
        if !is_reported && value >= iteration {
            return Err(
                format!("page {page} holds {value} (iteration {iteration}) but was not reported").into()
            );
        }
    }
    Ok(())
}

/// One vCPU thread: `KVM_RUN` through the runner (ring-full exits are harvested inside it, on this thread,
/// while the other vCPU keeps running) until the gate says stop.
fn run_vcpu(
    tracker: &DirtyTracker,
    handle: VcpuHandle,
    mut vcpu: GuestVcpu,
    gate: &BatchGate,
) -> Result<(), String> {
    let mut runner = VcpuRunner::new(tracker, handle);
    let outcome = loop {
        match runner.run(vcpu.fd_mut(), |exit| classify_exit(&exit)) {
            Ok(Ok(GuestExit::BatchDone { .. })) if gate.at_batch_boundary() == Decision::Stop => break Ok(()),
            Ok(Ok(GuestExit::BatchDone { .. } | GuestExit::Interrupted)) => {}
            Ok(Ok(GuestExit::DirtyRingFull)) => break Err("a ring-full exit escaped the runner".to_string()),
            Ok(Err(unexpected)) => break Err(vcpu.exit_error(unexpected).to_string()),
            Err(e) if e.is_interrupted() => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    gate.leave(); // a pause must not wait for a thread that is gone
    outcome
}
