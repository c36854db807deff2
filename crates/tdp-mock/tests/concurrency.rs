//! vCPUs on threads faulting the same random pages of one slot at the same time, alone or while a third
//! thread disturbs them: zapping ranges and invalidating roots, or turning host pages read-only (with an
//! MMU-notifier zap) and writable again, which makes faults replace 4 KiB tables with huge leaves while
//! the other vCPU faults inside them. Every access must retire on the reference frame (checked as it
//! happens); the disturbing thread runs the I1 and I3 checkers while the vCPUs run; afterwards every
//! checker passes and all vCPUs see identical frames.
//!
//! Checks: I1 under races (compare-exchange losers retry, never install a wrong frame or a writable
//! leaf over a read-only host page), I2 under concurrent unlinking (the walker never reaches a freed
//! table; nothing leaks), I3 while running and after the threads join.

mod common;

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{CONFIGS, Lcg, Vm};
use tdp_core::addr::{AsId, Gfn, Level, Pfn};
use tdp_core::fault::AccessKind::{Exec, Read, Write};
use tdp_core::host::HostFaultError;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultError, Mmu, MmuConfig};
use tdp_mock::checker::check_translations_in;
use tdp_mock::{AccessResult, HostConfig, MockHost, Tlb, Vcpu, VcpuError, check_tlbs};

/// Accesses per vCPU thread, at least: with a disturbing thread the vCPUs keep going until it has run
/// all its rounds, so that every round races with running vCPUs whatever the scheduler does.
const ACCESSES: usize = 20_000;
/// Accesses a vCPU may find livelocked (retried `MAX_ROUNDS` times while an invalidation runs) in all.
const MAX_LIVELOCKS: u32 = 100_000;
/// Rounds of the disturbing thread (a check every fourth).
const DISTURB_ROUNDS: u64 = 48;
/// Every how many table reads a walk yields while a third thread disturbs the vCPUs.
const JITTER: u64 = 29;
/// Pages in the slot: 16 MiB, 8 L1 tables when mapped with 4 KiB pages.
const PAGES: u64 = 0x1000;

/// What the third thread does while the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disturb {
    Nothing,
    /// Zap random ranges (running their flushes) and now and then invalidate and zap every root.
    Zap,
    /// Make random host pages read-only (zapping them, as an MMU notifier does) and writable again.
    HostReadOnly,
}

/// Frames each gfn was seen at, per vCPU.
type Seen = BTreeMap<u64, Pfn>;

fn run(name: &'static str, cfg: MmuConfig, host: HostConfig, disturb: Disturb) {
    let mut vm = Vm::new(name, cfg, host, 2);
    if disturb == Disturb::HostReadOnly {
        // Pause now and then inside walks, so that faults replacing tables race with walks inside them.
        // (Zapping ranges removes no tables, and invalidated roots are zapped only after the flush that
        // makes the vCPUs reload, so the zap scenario gains nothing from it.)
        vm.host().set_walk_jitter(Some(JITTER));
    }
    let slot = vm.add_slot(0, 0, PAGES, SlotFlags::empty());
    let expected = move |gfn: u64| Pfn((slot.host_base >> 12) + gfn);
    let vcpus = std::mem::take(&mut vm.vcpus);
    // Set when the disturbing thread has run all its rounds (at once when there is none).
    let done = AtomicBool::new(disturb == Disturb::Nothing);
    let start = Barrier::new(if disturb == Disturb::Nothing { 2 } else { 3 });
    let mmu = &**vm.m.mmu();
    let results: Vec<(Vcpu, Seen)> = std::thread::scope(|s| {
        let disturber = (disturb != Disturb::Nothing).then(|| {
            s.spawn(|| {
                // Sets `done` however this thread ends: a failed check must not leave the vCPUs running.
                let _done_on_exit = SetOnDrop(&done);
                let mut rng = Lcg(0x5eed);
                let mut checks = 0u64;
                start.wait();
                for round in 1..=DISTURB_ROUNDS {
                    match disturb {
                        Disturb::Zap => zap_something(mmu, &mut rng, round),
                        _ => flip_a_host_page(mmu, &mut rng, expected),
                    }
                    if round.is_multiple_of(4) {
                        check_while_running(name, mmu, slot, round);
                        checks += 1;
                    }
                    std::thread::yield_now();
                }
                done.store(true, Ordering::Release);
                checks
            })
        });
        let threads: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, mut vcpu)| {
                let (start, done) = (&start, &done);
                s.spawn(move || {
                    // Same gfns in the same order, so the vCPUs fault the same pages at the same time;
                    // the access kinds differ.
                    let mut gfns = Lcg(0xc0ffee);
                    let mut kinds = Lcg(i as u64 + 1);
                    let mut seen = Seen::new();
                    start.wait();
                    let (mut n, mut livelocks) = (0, 0);
                    while n < ACCESSES || !done.load(Ordering::Acquire) {
                        n += 1;
                        let gfn = gfns.below(PAGES);
                        let kind = [Read, Write, Read, Exec][kinds.below(4) as usize];
                        match vcpu.access(mmu, Gfn(gfn).gpa(), kind) {
                            Ok(AccessResult::Done { pfn, .. }) if pfn == expected(gfn) => {
                                seen.insert(gfn, pfn);
                            }
                            // The page was read-only on the host at that moment.
                            Err(VcpuError::Fault(FaultError::Host(HostFaultError::ReadOnly { gfn: g })))
                                if disturb == Disturb::HostReadOnly && kind == Write && g == Gfn(gfn) => {}
                            // Faults retry while an invalidation over the page runs, and the disturbing
                            // thread may be descheduled inside one: the access is simply not done (KVM's
                            // vCPU would keep re-entering). Bounded: a real livelock still fails.
                            Err(VcpuError::Livelock { .. })
                                if disturb == Disturb::HostReadOnly && livelocks < MAX_LIVELOCKS =>
                            {
                                livelocks += 1;
                                std::thread::yield_now();
                            }
                            other => panic!("{name}: vCPU {i} access {n} ({kind:?} gfn {gfn:#x}): {other:?}"),
                        }
                    }
                    (vcpu, seen)
                })
            })
            .collect();
        // Join everything before propagating a panic.
        let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
        if let Some(disturber) = disturber {
            let checks = disturber.join().expect("the disturbing thread panicked");
            assert_eq!(checks, DISTURB_ROUNDS / 4, "{name}: every check ran while the vCPUs ran");
        }
        results.into_iter().map(|r| r.expect("a vCPU thread panicked")).collect()
    });
    let (vcpus, seen): (Vec<Vcpu>, Vec<Seen>) = results.into_iter().unzip();
    vm.vcpus = vcpus;
    // Shown when the test fails: how much racing actually happened.
    let unlinked = vm.host().tables_unlinked();
    let faults: Vec<_> = vm.vcpus.iter().map(|v| v.mmu_state().counters).collect();
    eprintln!(
        "{name} {disturb:?}: {:?} {faults:?} {:?} unlinked {unlinked}",
        vm.mmu().stats(),
        vm.host().flush_stats()
    );
    vm.check("the concurrent run");
    assert!(seen.iter().all(|s| s.len() as u64 > PAGES / 2), "{name}: the vCPUs touched most pages");
    // Both vCPUs now read every page either touched, and see the same frame.
    let touched: Vec<u64> = seen.iter().flat_map(|s| s.keys().copied()).collect();
    for gfn in touched {
        let a = vm.must_map(0, gfn, Read);
        let b = vm.must_map(1, gfn, Read);
        assert_eq!((a, b), (expected(gfn), expected(gfn)), "{name} gfn {gfn:#x}");
    }
    vm.check("the final reads");
    vm.teardown();
}

/// Sets its flag when dropped, also while a panic unwinds.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn zap_something(mmu: &Mmu<MockHost>, rng: &mut Lcg, round: u64) {
    let host = mmu.host();
    if round.is_multiple_of(16) {
        mmu.write().invalidate_roots(None).run(host);
        mmu.read().zap_invalidated_roots();
    } else {
        let start = rng.below(PAGES);
        let end = (start + 1 + rng.below(0x300)).min(PAGES);
        mmu.write().zap_gfn_range(AsId(0), Gfn(start), Gfn(end)).run(host);
    }
}

/// Turns one page read-only, as a host does under an MMU notifier: the invalidation covers the whole
/// host huge page the change splits (a fault that translated before the change may otherwise install a
/// huge writable leaf over it), zaps it and makes faults there retry until it ends. Or turns every
/// read-only page writable again (adding rights needs no notifier), which lets the next faults map huge
/// pages over 4 KiB tables.
fn flip_a_host_page(mmu: &Mmu<MockHost>, rng: &mut Lcg, frame: impl Fn(u64) -> Pfn) {
    let host = mmu.host();
    if rng.below(4) == 0 {
        (0..PAGES)
            .filter(|&g| host.is_host_readonly(frame(g)))
            .for_each(|g| host.set_host_readonly(frame(g), false));
        return;
    }
    let gfn = rng.below(PAGES);
    let huge = host.config().host_level.min(Level::L3).pages();
    let first = gfn - gfn % huge;
    mmu.write().invalidate_range_start(AsId(0), Gfn(first), Gfn(first + huge)).expect("a range");
    host.set_host_readonly(frame(gfn), true);
    mmu.write().invalidate_range_end().expect("started above");
}

/// I3 and I1 while the vCPUs run: each checker holds the MMU lock for write while it looks.
fn check_while_running(name: &str, mmu: &Mmu<MockHost>, slot: Memslot, round: u64) {
    let tlbs = mmu.host().tlbs();
    let tlbs: Vec<&Tlb> = tlbs.iter().map(|t| &**t).collect();
    let mut errors = check_tlbs(mmu, &tlbs).err().unwrap_or_default();
    for root in mmu.roots().into_iter().filter(|r| r.valid) {
        errors.extend(check_translations_in(mmu, root.pfn, root.as_id, &[slot]).err().unwrap_or_default());
    }
    assert!(errors.is_empty(), "{name}: round {round}: {errors:#?}");
}

#[test]
fn i1_two_vcpus_fault_overlapping_4k_pages_concurrently() {
    for (name, cfg) in CONFIGS {
        run(name, cfg, HostConfig { host_level: Level::L1, ..HostConfig::default() }, Disturb::Nothing);
    }
}

#[test]
fn i1_two_vcpus_fault_overlapping_huge_pages_concurrently() {
    for (name, cfg) in CONFIGS {
        run(name, cfg, HostConfig::default(), Disturb::Nothing);
    }
}

#[test]
fn i2_vcpus_run_while_ranges_are_zapped_and_roots_invalidated() {
    for (name, cfg) in CONFIGS {
        let host = HostConfig { host_level: Level::L1, yield_every: Some(64), ..HostConfig::default() };
        run(name, cfg, host, Disturb::Zap);
    }
}

#[test]
fn i1_vcpus_run_while_host_pages_turn_read_only_and_back() {
    for (name, cfg) in CONFIGS {
        run(name, cfg, HostConfig::default(), Disturb::HostReadOnly);
    }
}

/// Cycles of "map 4 KiB under a table, then replace the table with a huge leaf" per configuration.
const CYCLES: u64 = 3000;

#[test]
fn i2_walks_race_with_tables_replaced_by_huge_leaves() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 2);
        vm.host().set_walk_jitter(Some(3));
        let slot = vm.add_slot(0, 0, 0x200, SlotFlags::empty());
        let frame = move |gfn: u64| Pfn((slot.host_base >> 12) + gfn);
        vm.must_map(0, 0, Read);
        let root = vm.vcpus[0].root().expect("loaded").pfn();
        let (hw, level) = (vm.m.hardware(), vm.mmu().config().root_level);
        let host = vm.host().clone();
        let mmu = std::sync::Arc::clone(vm.m.mmu());
        let mut changer = vm.vcpus.pop().expect("two vCPUs");
        let stop = AtomicBool::new(false);
        let walks = std::thread::scope(|s| {
            let walker = s.spawn(|| {
                let (mut walks, mut gfn) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    gfn = (gfn + 37) % 0x200;
                    match tdp_mock::walk(
                        &host,
                        hw,
                        root,
                        level,
                        Gfn(gfn).gpa(),
                        Read,
                        tdp_mock::WalkMode::Access,
                    ) {
                        tdp_mock::WalkOutcome::Translated { pfn, .. } => {
                            assert_eq!(pfn, frame(gfn), "{name}")
                        }
                        tdp_mock::WalkOutcome::Violation { .. } => {}
                        other => panic!("{name}: walk {walks} at gfn {gfn:#x}: {other:?}"),
                    }
                    walks += 1;
                }
                walks
            });
            for cycle in 0..CYCLES {
                // The host splits its huge page (an MMU-notifier zap); the next fault maps 4 KiB.
                host.set_host_readonly(frame(0x100), true);
                mmu.write().zap_gfn_range(AsId(0), Gfn(0x100), Gfn(0x101)).run(&host);
                let small = 1 + cycle % 0xff;
                assert!(matches!(
                    changer.access(&mmu, Gfn(small).gpa(), Write),
                    Ok(AccessResult::Done { .. })
                ));
                // The host collapses it again; the next fault replaces the table with a huge leaf.
                host.set_host_readonly(frame(0x100), false);
                assert!(matches!(
                    changer.access(&mmu, Gfn(0x1ff).gpa(), Write),
                    Ok(AccessResult::Done { .. })
                ));
            }
            stop.store(true, Ordering::Relaxed);
            walker.join()
        });
        let walks = walks.expect("the walker thread panicked");
        let unlinked = host.tables_unlinked();
        assert!(unlinked >= CYCLES, "{name}: {unlinked} tables replaced in {CYCLES} cycles");
        eprintln!("{name}: {walks} walks raced with {unlinked} table removals");
        vm.vcpus.push(changer);
        vm.check("the race");
        drop(mmu);
        vm.teardown();
    }
}
