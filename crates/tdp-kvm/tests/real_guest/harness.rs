//! The real-guest run harness: builds a two-vCPU `tdp-guest` VM with a tracker in one mode, runs the
//! vCPU threads through `VcpuRunner`, parks them between iterations, collects and verifies every page.
//! See the parent module for what is checked and why it is exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tdp_guest::{
    BatchGate, DATA_GPA, DATA_SLOT, Decision, GuestError, GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern,
    Workload, classify_exit,
};
use tdp_kvm::{DirtySets, DirtyTracker, Error, SlotSpec, Throttle, TrackingMode, VcpuHandle, VcpuRunner};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 16 MiB + 3 pages: like dirty_log_test's 1 GiB + 3 pages, the slot ends inside a 64-page bitmap word.
pub const DATA_PAGES: u64 = 4096 + 3;
/// Iterations per mode (each: run, park, collect, verify every page).
pub const ITERATIONS: u64 = 48;
/// Batches each vCPU completes per iteration before the host parks it.
pub const BATCHES_PER_ITERATION: u64 = 6;
/// Pages per batch.
pub const BATCH: u64 = 64;
/// How long a phase may take before the test gives up (a hang is a failure, not a slow pass).
pub const PHASE_DEADLINE: Duration = Duration::from_secs(30);

/// How a mode's tracker is made; runs after the VM exists and before logging is on or vCPUs exist.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    GetAndClear,
    ClearLog { initially_set: bool },
    Ring { entries: u32 },
}

/// What one mode's run saw, for the mode-specific assertions.
#[derive(Debug, Default)]
pub struct Report {
    /// Pages reported per collection.
    pub reported: Vec<u64>,
    /// Ring-full exits seen by the runners' throttle hooks, per vCPU.
    pub ring_full_hook: [u64; 2],
    /// Ring-full exits the tracker counted, per vCPU.
    pub ring_full_tracker: Vec<u64>,
    /// Times a page of the slot's last, partial bitmap word (e.g. pages 4096..4099) was reported.
    pub tail_reported: u64,
    /// Pages the guest wrote during the unlogged iteration.
    pub unlogged_pages: u64,
    /// Collections made while the vCPUs ran.
    pub live_collects: u64,
    /// Entries harvested and reset (tracker totals).
    pub harvested: u64,
    pub reset: u64,
}

pub fn make_tracker(vm: &GuestVm, mode: Mode) -> Result<Option<DirtyTracker>, Error> {
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
pub fn vcpu_thread(
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
/// them has stopped (its error is reported when it is joined), calling `poll` before each look (so at
/// least once).
pub fn wait_for_batches(
    vm: &GuestVm,
    gate: &BatchGate,
    start: [u64; 2],
    mut poll: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + PHASE_DEADLINE;
    loop {
        poll()?;
        let done = (0..2).all(|i| {
            vm.vcpu_stats(i).map(|s| s.batches >= start[i] + BATCHES_PER_ITERATION).unwrap_or(false)
        });
        if done || gate.active() < 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("vCPUs made no progress in {PHASE_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Checks one collection against every page of the slot (see the module docs). `last` is what each page
/// held at the previous check; it is updated.
pub fn verify(
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
pub fn check_the_checker(vm: &GuestVm, sets: &DirtySets, iteration: u64, last: &[u64]) -> Result<(), String> {
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
    // Every page written (a long host stall can allow it): nothing unwritten to invent.
    let Some(clean) = (0..vm.data_pages()).find(|&p| !set.contains(p)) else { return Ok(()) };
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
pub fn run_mode(
    mode: Mode,
    pattern: Pattern,
    live: bool,
) -> Result<Option<Report>, Box<dyn std::error::Error + Send + Sync>> {
    let both = |i: u64| {
        let seed = 0x1234_5678_9abc_def1 ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Workload::new(0, DATA_PAGES, BATCH, pattern).with_seed(seed).with_tag(false)
    };
    run(&Run {
        mode,
        pages: DATA_PAGES,
        workloads: [both(0), both(1)],
        live,
        iterations: ITERATIONS,
        unlogged_iteration: None,
    })
}

/// The end of an iteration run without logging (vCPUs parked): the bitmap modes must refuse to collect
/// (`SlotNotLogged`), the ring must hold nothing; then logging goes back on and the expected contents
/// are re-read (the guest's unlogged writes are, by design, reported by nobody). Returns how many pages
/// the guest wrote during the iteration.
fn unlogged_round(
    vm: &mut GuestVm,
    tracker: &DirtyTracker,
    sets: &mut DirtySets,
    iteration: u64,
    last: &mut [u64],
) -> Result<u64, String> {
    let outcome = tracker.collect_into(sets);
    match (tracker.mode(), outcome) {
        (TrackingMode::Ring(_), Ok(_)) if sets.total() == 0 => {}
        (TrackingMode::Ring(_), other) => {
            return Err(format!("unlogged iteration: ring collect gave {other:?}, {} pages", sets.total()));
        }
        (_, Err(Error::SlotNotLogged { .. })) => {}
        (_, other) => return Err(format!("unlogged iteration: bitmap collect gave {other:?}")),
    }
    vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
    let mut written = 0;
    for (page, expected) in last.iter_mut().enumerate() {
        let value = vm.page_iteration(page as u64).map_err(|e| e.to_string())?;
        written += u64::from(value == iteration);
        *expected = value;
    }
    Ok(written)
}

/// One run's shape: the tracking mode, the slot size, each vCPU's workload, live collects or not.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub mode: Mode,
    pub pages: u64,
    pub workloads: [Workload; 2],
    pub live: bool,
    pub iterations: u64,
    /// An iteration run with the data slot's logging switched off (re-registered without
    /// `KVM_MEM_LOG_DIRTY_PAGES`), switched back on after it: what the guest wrote meanwhile is not
    /// reported, the bitmap modes refuse to collect, and tracking resumes cleanly afterwards.
    pub unlogged_iteration: Option<u64>,
}

/// The whole run (see [`run_mode`]); `None` when skipped.
pub fn run(r: &Run) -> Result<Option<Report>, Box<dyn std::error::Error + Send + Sync>> {
    let Run { mode, pages, workloads, live, iterations, unlogged_iteration } = *r;
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
    let region = vm.data_region();
    assert_eq!(region.flags, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES, "the data slot is logged");
    tracker.register_slot(SlotSpec::from_region(region.slot, region.guest_phys_addr, region.memory_size))?;
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
    // The iteration whose collection reports every page (INITIALLY_SET: the first, and the first after
    // logging comes back on).
    let mut everything_at = initially_set.then_some(1);

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
                let unlogged = unlogged_iteration == Some(iteration);
                // With the ring, live collects start once each vCPU has had a ring-full exit: each
                // vCPU's batches of an iteration dirty more pages than its ring holds, so without
                // collects both rings fill in the first iteration, whatever the scheduler does, and the
                // ring-full harvests then race the collects.
                let rings_filled = !matches!(mode, Mode::Ring { .. })
                    || ring_full_seen.iter().all(|seen| seen.load(Ordering::Relaxed) > 0);
                wait_for_batches(&vm, &gate, start, || {
                    if live && !unlogged && rings_filled {
                        tracker.collect_into(&mut sets).map_err(|e| format!("live collect: {e}"))?;
                        report.live_collects += 1;
                    }
                    Ok(())
                })?;
                if !gate.pause_all(PHASE_DEADLINE) {
                    return Err(format!("iteration {iteration}: vCPUs did not park"));
                }
                if unlogged {
                    report.unlogged_pages =
                        unlogged_round(&mut vm, &tracker, &mut sets, iteration, &mut last)?;
                    if initially_set {
                        everything_at = Some(iteration + 1);
                    }
                    vm.set_iteration(iteration + 1);
                    gate.resume();
                    continue;
                }
                tracker
                    .collect_into(&mut sets)
                    .map_err(|e| format!("iteration {iteration}: collect: {e}"))?;
                let first = everything_at == Some(iteration);
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
                if unlogged_iteration == Some(iteration + 1) {
                    vm.set_dirty_logging(false).map_err(|e| e.to_string())?;
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
