//! I4 on real KVM with a real guest, in the spirit of KVM's `dirty_log_test`: two vCPUs run
//! `tdp-guest`'s CPL3 program, writing the iteration number into pseudo-random pages of a data slot whose
//! size is not a multiple of 64 pages; between iterations the host parks both vCPUs at batch
//! boundaries, collects through [`DirtyTracker`], and checks every page of the slot:
//!
//! - a page reported dirty holds the current iteration (the one documented exception: with
//!   `INITIALLY_SET`, the first collection reports every page, written or not);
//! - a page not reported holds exactly what it held at the previous check (no write lost, none invented);
//! - every reported slot and offset is valid, and the tracker counted no invalid ring entry;
//! - ring mode: KVM reset exactly as many entries as were harvested, and `KVM_EXIT_DIRTY_RING_FULL`
//!   happened during the run on both vCPUs, handled on the vCPU threads by [`VcpuRunner`] while the other
//!   vCPU kept running.
//!
//! Each test prints `SKIPPED` and returns when `/dev/kvm` (or the mode's capability) is missing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tdp_guest::{
    BatchGate, DATA_GPA, DATA_SLOT, Decision, GuestError, GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern,
    Workload, classify_exit,
};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, Throttle, TrackingMode, VcpuHandle, VcpuRunner};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 16 MiB + 3 pages: like dirty_log_test's 1 GiB + 3 pages, the slot ends inside a 64-page bitmap word.
const DATA_PAGES: u64 = 4096 + 3;
/// Iterations per mode (each: run, park, collect, verify every page).
const ITERATIONS: u64 = 48;
/// Batches each vCPU completes per iteration before the host parks it.
const BATCHES_PER_ITERATION: u64 = 6;
/// Pages per batch.
const BATCH: u64 = 64;
/// How long a phase may take before the test gives up (a hang is a failure, not a slow pass).
const PHASE_DEADLINE: Duration = Duration::from_secs(30);

/// How a mode's tracker is made; runs after the VM exists and before logging is on or vCPUs exist.
#[derive(Clone, Copy, Debug)]
enum Mode {
    GetAndClear,
    ClearLog { initially_set: bool },
    Ring { entries: u32 },
}

/// What one mode's run saw, for the mode-specific assertions.
#[derive(Debug, Default)]
struct Report {
    /// Pages reported per collection.
    reported: Vec<u64>,
    /// Ring-full exits seen by the runners' throttle hooks, per vCPU.
    ring_full_hook: [u64; 2],
    /// Ring-full exits the tracker counted, per vCPU.
    ring_full_tracker: Vec<u64>,
    /// Times a page of the slot's last, partial bitmap word (e.g. pages 4096..4099) was reported.
    tail_reported: u64,
    /// Collections made while the vCPUs ran.
    live_collects: u64,
    /// Entries harvested and reset (tracker totals).
    harvested: u64,
    reset: u64,
}

fn make_tracker(vm: &GuestVm, mode: Mode) -> Result<Option<DirtyTracker>, Error> {
    let made = match mode {
        Mode::GetAndClear => DirtyTracker::with_bitmap(vm.vm_fd()),
        Mode::ClearLog { initially_set } => DirtyTracker::with_clear_log(vm.vm_fd(), initially_set),
        Mode::Ring { entries } => DirtyTracker::with_ring(vm.vm_fd(), entries),
    };
    match made {
        Ok(t) => Ok(Some(t)),
        Err(e @ (Error::NoDirtyRing | Error::CapabilityMissing { .. })) => {
            eprintln!("SKIPPED: {mode:?}: the host lacks it: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Runs one vCPU until the gate says stop, through the tracker's runner (ring-full exits are handled
/// inside it, on this thread).
fn vcpu_thread(
    tracker: &DirtyTracker,
    handle: VcpuHandle,
    mut vcpu: GuestVcpu,
    gate: &BatchGate,
    ring_full_seen: &AtomicU64,
) -> Result<(), String> {
    let mut runner = VcpuRunner::new(tracker, handle).with_throttle(|_| {
        ring_full_seen.fetch_add(1, Ordering::Relaxed);
        Throttle::Resume
    });
    let outcome = loop {
        match runner.run(vcpu.fd_mut(), |exit| classify_exit(&exit)) {
            Ok(Ok(GuestExit::BatchDone { tag })) => {
                if tag as usize != vcpu.index() {
                    break Err(format!("vCPU {} reported tag {tag}", vcpu.index()));
                }
                if gate.at_batch_boundary() == Decision::Stop {
                    break Ok(());
                }
            }
            Ok(Ok(GuestExit::Interrupted)) => {}
            Ok(Ok(GuestExit::DirtyRingFull)) => {
                break Err("a ring-full exit escaped the runner".to_string());
            }
            Ok(Err(unexpected)) => break Err(vcpu.exit_error(unexpected).to_string()),
            Err(e) if e.is_interrupted() => {}
            Err(e) => break Err(format!("vCPU {}: {e}", vcpu.index())),
        }
    };
    gate.leave();
    outcome
}

/// Waits until both vCPUs have finished `BATCHES_PER_ITERATION` more batches than at `start`, or one of
/// them has stopped (its error is reported when it is joined), calling `poll` between looks.
fn wait_for_batches(
    vm: &GuestVm,
    gate: &BatchGate,
    start: [u64; 2],
    mut poll: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    loop {
        let done = (0..2).all(|i| {
            vm.vcpu_stats(i).map(|s| s.batches >= start[i] + BATCHES_PER_ITERATION).unwrap_or(false)
        });
        if done || gate.active() < 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("vCPUs made no progress in {PHASE_DEADLINE:?}"));
        }
        poll()?;
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Checks one collection against every page of the slot (see the module docs). `last` is what each page
/// held at the previous check; it is updated.
fn verify(
    vm: &GuestVm,
    sets: &DirtySets,
    iteration: u64,
    everything_reported: bool,
    last: &mut [u64],
) -> Result<u64, String> {
    let pages = vm.data_pages();
    let mut reported = vec![false; pages as usize];
    let mut count = 0;
    for set in sets.iter() {
        if set.slot().raw() != DATA_SLOT || set.guest_base().0 != DATA_GPA || set.pages() != pages {
            if set.is_empty() {
                continue;
            }
            return Err(format!("iteration {iteration}: pages reported for unknown slot {:?}", set.slot()));
        }
        for offset in set.offsets() {
            let slot = reported
                .get_mut(offset as usize)
                .ok_or_else(|| format!("iteration {iteration}: offset {offset} beyond the slot"))?;
            *slot = true;
            count += 1;
        }
    }
    if everything_reported && count != pages {
        return Err(format!("INITIALLY_SET: first collection reported {count} of {pages} pages"));
    }
    for page in 0..pages {
        let value = vm.page_iteration(page).map_err(|e| e.to_string())?;
        let before = last[page as usize];
        if reported[page as usize] {
            let ok = value == iteration || (everything_reported && value == before);
            if !ok {
                return Err(format!(
                    "iteration {iteration}: page {page} reported dirty but holds {value} (was {before})"
                ));
            }
        } else if value != before {
            return Err(format!(
                "iteration {iteration}: page {page} holds {value} (was {before}) but was not reported: \
                 a write was lost"
            ));
        }
        last[page as usize] = value;
    }
    Ok(count)
}

/// Proves [`verify`] has teeth on real data: the same collection with one reported page dropped must be
/// caught as a lost write, and with one unwritten page added as a page that should not be dirty.
fn check_the_checker(vm: &GuestVm, sets: &DirtySets, iteration: u64, last: &[u64]) -> Result<(), String> {
    let set = sets
        .iter()
        .find(|s| s.slot().raw() == DATA_SLOT && !s.is_empty())
        .ok_or_else(|| format!("iteration {iteration}: nothing reported"))?;
    let victim = set.offsets().next().unwrap_or(0);
    let mut fewer = DirtySets::default();
    let dst = fewer.add_slot(set.slot(), set.guest_base(), set.pages());
    for offset in set.offsets().filter(|&o| o != victim) {
        dst.insert(offset);
    }
    match verify(vm, &fewer, iteration, false, &mut last.to_vec()) {
        Err(e) if e.contains("lost") => {}
        other => return Err(format!("dropping page {victim} from the result was not caught: {other:?}")),
    }
    let clean = (0..vm.data_pages())
        .find(|&p| !set.contains(p))
        .ok_or_else(|| format!("iteration {iteration}: every page reported"))?;
    let mut more = sets.clone();
    more.insert(set.slot(), clean);
    match verify(vm, &more, iteration, false, &mut last.to_vec()) {
        Err(e) if e.contains("reported dirty but holds") => Ok(()),
        other => Err(format!("reporting unwritten page {clean} was not caught: {other:?}")),
    }
}

/// The whole run for one mode; `None` when skipped.
///
/// With `live`, the host also collects while the vCPUs run (racing ring-full harvests on the vCPU
/// threads, and guest writes between `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG`), and verifies the
/// union of an iteration's collections: every page in it was written during the iteration (the previous
/// iteration's pages were all collected while parked), so the checks stay exact.
fn run_mode(
    mode: Mode,
    pattern: Pattern,
    live: bool,
) -> Result<Option<Report>, Box<dyn std::error::Error + Send + Sync>> {
    let both = |i: u64| {
        let seed = 0x1234_5678_9abc_def1 ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Workload::new(0, DATA_PAGES, BATCH, pattern).with_seed(seed).with_tag(false)
    };
    run(&Run { mode, pages: DATA_PAGES, workloads: [both(0), both(1)], live, iterations: ITERATIONS })
}

/// One run's shape: the tracking mode, the slot size, each vCPU's workload, live collects or not.
#[derive(Clone, Copy, Debug)]
struct Run {
    mode: Mode,
    pages: u64,
    workloads: [Workload; 2],
    live: bool,
    iterations: u64,
}

/// The whole run (see [`run_mode`]); `None` when skipped.
fn run(r: &Run) -> Result<Option<Report>, Box<dyn std::error::Error + Send + Sync>> {
    let Run { mode, pages, workloads, live, iterations } = *r;
    let mut vm = match GuestVm::new(GuestSpec::new(pages, 2)) {
        Ok(vm) => vm,
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: {mode:?}: cannot open /dev/kvm: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let Some(tracker) = make_tracker(&vm, mode)? else { return Ok(None) };
    // Logging goes on after the capability (INITIALLY_SET applies when a slot's logging is enabled).
    vm.set_dirty_logging(true)?;
    tracker.register_slot(SlotSpec::from_region(DATA_SLOT, DATA_GPA, pages * 4096))?;
    for (i, w) in workloads.iter().enumerate() {
        vm.set_workload(i, w)?;
    }
    vm.set_iteration(1);
    let vcpus = vm.create_vcpus()?;
    let handles = vcpus.iter().map(|v| tracker.attach_vcpu(v.fd())).collect::<Result<Vec<_>, _>>()?;

    let gate = BatchGate::new(2);
    let ring_full_seen = [AtomicU64::new(0), AtomicU64::new(0)];
    let mut report = Report::default();
    let mut last = vec![0u64; pages as usize];
    let initially_set = matches!(mode, Mode::ClearLog { initially_set: true });

    let (host, threads) = std::thread::scope(|s| {
        let threads: Vec<_> = vcpus
            .into_iter()
            .zip(handles)
            .zip(&ring_full_seen)
            .map(|((vcpu, handle), seen)| {
                let (tracker, gate) = (&tracker, &gate);
                s.spawn(move || vcpu_thread(tracker, handle, vcpu, gate, seen))
            })
            .collect();
        let host = (|| -> Result<(), String> {
            for iteration in 1..=iterations {
                let start = [0, 1].map(|i| vm.vcpu_stats(i).map(|s| s.batches).unwrap_or(0));
                let mut sets = DirtySets::default();
                wait_for_batches(&vm, &gate, start, || {
                    if live {
                        tracker.collect_into(&mut sets).map_err(|e| format!("live collect: {e}"))?;
                        report.live_collects += 1;
                    }
                    Ok(())
                })?;
                if !gate.pause_all(PHASE_DEADLINE) {
                    return Err(format!("iteration {iteration}: vCPUs did not park"));
                }
                tracker
                    .collect_into(&mut sets)
                    .map_err(|e| format!("iteration {iteration}: collect: {e}"))?;
                let first = initially_set && iteration == 1;
                if iteration == 2 {
                    check_the_checker(&vm, &sets, iteration, &last)?;
                }
                report.reported.push(verify(&vm, &sets, iteration, first, &mut last)?);
                if !first {
                    report.tail_reported += sets
                        .iter()
                        .filter(|set| set.slot().raw() == DATA_SLOT)
                        .map(|set| set.offsets().filter(|&o| o >= pages / 64 * 64).count() as u64)
                        .sum::<u64>();
                }
                if let TrackingMode::Ring(_) = tracker.mode() {
                    let stats = tracker.stats().map_err(|e| e.to_string())?;
                    if stats.reset_entries != stats.harvested {
                        return Err(format!(
                            "iteration {iteration}: KVM reset {} entries, {} were harvested",
                            stats.reset_entries, stats.harvested
                        ));
                    }
                }
                vm.set_iteration(iteration + 1);
                gate.resume();
            }
            Ok(())
        })();
        gate.stop();
        let threads: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
        (host, threads)
    });
    for (i, t) in threads.into_iter().enumerate() {
        match t {
            Ok(r) => r.map_err(|e| format!("{mode:?}: vCPU thread {i}: {e}"))?,
            Err(_) => return Err(format!("{mode:?}: vCPU thread {i} panicked").into()),
        }
    }
    host.map_err(|e| format!("{mode:?}: {e}"))?;

    let stats = tracker.stats()?;
    if stats.invalid_slot != 0 || stats.invalid_offset != 0 {
        return Err(format!("{mode:?}: invalid ring entries: {stats:?}").into());
    }
    report.ring_full_hook = ring_full_seen.map(|a| a.load(Ordering::Relaxed));
    report.ring_full_tracker = stats.per_vcpu.iter().map(|v| v.ring_full_exits).collect();
    report.harvested = stats.harvested;
    report.reset = stats.reset_entries;
    eprintln!(
        "{mode:?} {pages} pages {:?} live={live}: {} iterations ({} live collects), pages reported per iteration {:?}, \
         ring-full exits {:?}, harvested {}, reset {}, tail pages reported {}",
        workloads.map(|w| w.pattern),
        report.reported.len(),
        report.live_collects,
        report.reported,
        report.ring_full_tracker,
        report.harvested,
        report.reset,
        report.tail_reported
    );
    Ok(Some(report))
}

/// Every mode must see real work: at least this many pages per collection (each collection follows
/// 2 x 6 batches of 64 random writes over 4099 pages: ~700 distinct pages expected).
/// The slot's last 3 pages live in a partial bitmap word (and a partial `KVM_CLEAR_DIRTY_LOG` range): they
/// must have been written and reported several times, and every such report was verified.
fn assert_non_trivial(report: &Report) {
    assert_eq!(report.reported.len() as u64, ITERATIONS);
    assert!(report.reported.iter().all(|&n| n >= 200), "too few dirty pages: {:?}", report.reported);
    assert!(report.tail_reported >= 3, "the slot's last pages were reported {} times", report.tail_reported);
}

#[test]
fn i4_get_and_clear_bitmap_reports_every_guest_write() -> TestResult {
    let Some(report) = run_mode(Mode::GetAndClear, Pattern::Random, false)? else { return Ok(()) };
    assert_non_trivial(&report);
    Ok(())
}

#[test]
fn i4_clear_log_reports_every_guest_write() -> TestResult {
    let Some(report) = run_mode(Mode::ClearLog { initially_set: false }, Pattern::Random, false)? else {
        return Ok(());
    };
    assert_non_trivial(&report);
    Ok(())
}

#[test]
fn i4_clear_log_initially_set_reports_everything_first_then_every_write() -> TestResult {
    let Some(report) = run_mode(Mode::ClearLog { initially_set: true }, Pattern::Random, false)? else {
        return Ok(());
    };
    assert_non_trivial(&report);
    assert_eq!(report.reported[0], DATA_PAGES, "the first collection reports every page");
    assert!(report.reported[1..].iter().all(|&n| n < DATA_PAGES), "{:?}", report.reported);
    Ok(())
}

/// Rings of 256 entries (soft limit 192) against ~380 writes per vCPU per iteration: ring-full exits
/// must happen on both vCPUs in most iterations, and be harvested on the vCPU threads.
#[test]
fn i4_dirty_ring_with_ring_full_exits_loses_nothing() -> TestResult {
    let Some(report) = run_mode(Mode::Ring { entries: 256 }, Pattern::Random, false)? else { return Ok(()) };
    assert_non_trivial(&report);
    assert_ring_full_exits(&report);
    Ok(())
}

/// A hot set re-dirties the same pages after every reset: the same pages go through the ring again and
/// again, including across ring-full exits.
#[test]
fn i4_dirty_ring_hot_set_redirtied_pages_are_reported_again() -> TestResult {
    let pattern = Pattern::Hot { hot_pages: 300, percent: 80 };
    let Some(report) = run_mode(Mode::Ring { entries: 256 }, pattern, false)? else { return Ok(()) };
    assert_eq!(report.reported.len() as u64, ITERATIONS);
    assert!(report.reported.iter().all(|&n| n >= 250), "too few dirty pages: {:?}", report.reported);
    assert!(report.tail_reported >= 1, "the slot's last pages were never reported");
    assert_ring_full_exits(&report);
    Ok(())
}

fn assert_ring_full_exits(report: &Report) {
    assert_eq!(report.ring_full_tracker.len(), 2);
    for vcpu in 0..2 {
        assert!(report.ring_full_hook[vcpu] > 0, "vCPU {vcpu} never had a ring-full exit: {report:?}");
        assert_eq!(report.ring_full_hook[vcpu], report.ring_full_tracker[vcpu], "hook and tracker disagree");
    }
    assert_eq!(report.harvested, report.reset, "every harvested entry was reset, once");
    let reported: u64 = report.reported.iter().sum();
    assert!(report.harvested >= reported, "harvested {} entries for {reported} pages", report.harvested);
}

/// Collects race the vCPUs: ring-full harvests on the vCPU threads against the host's collects, which
/// share the pending set and the ring locks. The union of an iteration's collections must still be exact.
#[test]
fn i4_dirty_ring_collects_racing_ring_full_exits_lose_nothing() -> TestResult {
    let Some(report) = run_mode(Mode::Ring { entries: 256 }, Pattern::Random, true)? else { return Ok(()) };
    assert_non_trivial(&report);
    assert_ring_full_exits(&report);
    assert!(report.live_collects > 0, "no collect raced the vCPUs");
    Ok(())
}

/// Clear-log collects while the guest writes: a page dirtied between `KVM_GET_DIRTY_LOG` and
/// `KVM_CLEAR_DIRTY_LOG` must survive the clear and be reported by a later collect.
#[test]
fn i4_clear_log_collects_racing_guest_writes_lose_nothing() -> TestResult {
    let mode = Mode::ClearLog { initially_set: false };
    let Some(report) = run_mode(mode, Pattern::Hot { hot_pages: 200, percent: 50 }, true)? else {
        return Ok(());
    };
    assert_non_trivial(&report);
    assert!(report.live_collects > 0, "no collect raced the vCPUs");
    Ok(())
}

/// Sequential writes sweep the whole slot in order, so every page (the partial last word included) is
/// written and reported over and over with the get-and-clear bitmap.
#[test]
fn i4_get_and_clear_sequential_sweeps_report_every_page() -> TestResult {
    let Some(report) = run_mode(Mode::GetAndClear, Pattern::Sequential, false)? else { return Ok(()) };
    assert_non_trivial(&report);
    let total: u64 = report.reported.iter().sum();
    assert!(total >= 5 * DATA_PAGES, "{total} reports: the sweeps covered the slot fewer than 5 times");
    Ok(())
}

/// dirty_log_test's own size, 1 GiB + 3 pages, with clear-log: `KVM_CLEAR_DIRTY_LOG` over a slot of 4097
/// bitmap words whose last holds 3 pages. vCPU 0 writes randomly over the whole GiB; vCPU 1 sweeps the
/// last 1027 pages in order, so the partial word is written and cleared every iteration. Only the touched
/// pages are ever allocated (about 50 MiB).
#[test]
fn i4_clear_log_one_gib_plus_three_pages() -> TestResult {
    let pages = (1 << 18) + 3;
    let workloads = [
        Workload::new(0, pages, BATCH, Pattern::Random).with_seed(0x5eed_0001).with_tag(false),
        Workload::new(pages - 1027, 1027, BATCH, Pattern::Sequential).with_tag(false),
    ];
    let run_shape =
        Run { mode: Mode::ClearLog { initially_set: false }, pages, workloads, live: false, iterations: 12 };
    let Some(report) = run(&run_shape)? else { return Ok(()) };
    assert_eq!(report.reported.len(), 12);
    assert!(report.reported.iter().all(|&n| n >= 500), "too few dirty pages: {:?}", report.reported);
    assert!(report.tail_reported >= 12, "the last word was reported {} times", report.tail_reported);
    Ok(())
}
