//! The host's side under load: two vCPU threads write, read and execute in a slot while a host thread,
//! for a fixed number of operations, swaps pages out, migrates them, merges identical pages (KSM), ages
//! ranges (lockless), zaps ranges, toggles dirty logging (one start in two with a log that starts
//! all-set, then cleared range by range; each stop runs the in-place huge-page recovery, which the
//! host's page changes mostly refuse here, as they leave the host mapping at 4 KiB), invalidates roots,
//! write-tracks and untracks pages and recovers NX huge pages (the mitigation is on); the vCPUs' writes
//! to merged pages break the sharing (copy-on-write inside a translation), their writes to tracked pages
//! are emulated. The VM also has private memory (a mirror root, with external tables that answer busy
//! now and then): the vCPUs write there too, and the host zaps private ranges and invalidates roots
//! (which leave the mirror alone). Every so many host operations all threads park at a quiescent point
//! and the checkers run.
//!
//! Progress is counted, never timed: the host thread runs exactly `HOST_OPS` operations; the vCPUs run
//! at least `ACCESSES` accesses each and keep going until the host thread is done; the quiescent points
//! come every `CHECK_EVERY` host operations, with every thread parked on a barrier.
//!
//! Checks: I1 (no leaf maps a frame the host took away: `check_translations` against the host MMU's
//! current frames, at every quiescent point; no leaf lets a write reach a tracked page:
//! `check_write_tracking`; the external tables equal the mirror: `check_mirror`), I3 (`check_tlbs`,
//! with aging's no-flush rule), I4 (every other interval runs with plain dirty logging on throughout:
//! every page written in it was marked by the vCPUs' dirty sinks; each quiescent point harvests the
//! marks and re-protects their pages), "no write lost" (each vCPU's last value in each of its pages is
//! found where the host keeps the page now, swapped out or not), and I1-I3 with I2 (`check_all`) at the
//! end.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use common::{CONFIGS, Lcg, Vm};
use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, Pfn, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, Mmu};
use tdp_mock::checker::check_translations_in;
use tdp_mock::{
    HostConfig, HostMmuError, MockHost, Tlb, Vcpu, VcpuError, check_mirror, check_tlbs, check_write_tracking,
};

/// Pages in the slot. The last `KSM_PAGES` stay zero (the vCPUs write zeros there), so the host can merge
/// them and write-track them (an emulated write of a zero to a zero page is done by doing nothing); the
/// others are written by the vCPUs, vCPU `i` owning the gfns `g` with `g % 2 == i`.
const PAGES: u64 = 0x400;
const KSM_PAGES: u64 = 0x40;
const WRITTEN: u64 = PAGES - KSM_PAGES;
/// A second slot, 2 MiB right after the first, that the host MMU leaves alone: the vCPUs read and fetch
/// there, so that its range maps huge (not executable) and fetches split it (NX huge pages).
const CODE: u64 = PAGES;
const CODE_PAGES: u64 = 0x200;
/// Private memory after the code slot, mapped through the mirror root: vCPU `i` writes its own word of
/// each page.
const PRIVATE: u64 = CODE + CODE_PAGES;
const PRIVATE_PAGES: u64 = 0x100;
/// Every so many external-table calls answer busy (the fault retries).
const EXTERNAL_BUSY_EVERY: u64 = 13;
/// Host operations per configuration.
const HOST_OPS: u64 = 600;
/// Host operations between two quiescent points.
const CHECK_EVERY: u64 = 60;
/// Accesses each vCPU makes at least.
const ACCESSES: u64 = 4000;
/// Spare frames the host moves pages to.
const SPARES: u64 = 256;
/// Livelock reports (an access retried 64 times, e.g. while the host holds an invalidation) a vCPU
/// tolerates in a row before the test fails.
const MAX_LIVELOCKS: u32 = 100_000;

/// What the threads share.
struct Shared {
    /// Set by the host thread when a quiescent point is due; the vCPUs park on `barrier`.
    pause: AtomicBool,
    barrier: Barrier,
    /// Set when the host thread has run all its operations.
    host_done: AtomicBool,
    /// The last value written to each page (0: never).
    last: Vec<AtomicU64>,
    /// The last value each vCPU wrote in its word of each private page (`[page * 2 + vCPU]`).
    last_private: Vec<AtomicU64>,
    /// What went wrong. A failing thread records it and keeps taking part in the quiescent points
    /// (a panic would leave the others waiting on the barrier forever); the test fails after the join.
    errors: std::sync::Mutex<Vec<String>>,
    failed: AtomicBool,
    /// The gfns of slot 0 the vCPUs' dirty sinks were given since the last harvest (I4).
    marks: Arc<Mutex<BTreeSet<u64>>>,
}

/// A vCPU's dirty sink: the marks of slot 0 go to the shared set.
struct Marks(Arc<Mutex<BTreeSet<u64>>>);

impl DirtySink for Marks {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        if slot.id == SlotId(0) {
            self.0.lock().expect("not poisoned").insert(gfn.0);
        }
    }
}

impl Shared {
    fn fail(&self, error: String) {
        self.errors.lock().expect("not poisoned").push(error);
        self.failed.store(true, Ordering::Release);
    }

    /// A vCPU's side of the quiescent point: park while the host checks.
    fn park_if_asked(&self) {
        if self.pause.load(Ordering::Acquire) {
            self.barrier.wait();
            self.barrier.wait();
        }
    }
}

#[test]
fn host_side_stress_faults_race_swap_migration_ksm_aging_zaps_logging_and_root_invalidation() {
    for (name, cfg) in CONFIGS {
        let host_cfg = HostConfig { host_level: Level::L2, yield_every: Some(97), ..HostConfig::default() };
        let mut vm = Vm::new(name, cfg, host_cfg, 2);
        vm.host().enable_external_tables(cfg.root_level);
        vm.host().set_external_busy_every(EXTERNAL_BUSY_EVERY);
        let slot = vm.add_slot(0, 0, PAGES, SlotFlags::empty());
        let code = vm.add_slot(1, CODE, CODE_PAGES, SlotFlags::empty());
        let private = vm.add_slot(2, PRIVATE, PRIVATE_PAGES, SlotFlags::PRIVATE);
        let spare = Pfn((vm.host().guest_ram_base() >> PAGE_SHIFT) + (1 << 20));
        vm.host().add_spare_frames(spare, SPARES);
        let shared = Shared {
            pause: AtomicBool::new(false),
            barrier: Barrier::new(3),
            host_done: AtomicBool::new(false),
            last: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
            last_private: (0..PRIVATE_PAGES * 2).map(|_| AtomicU64::new(0)).collect(),
            errors: std::sync::Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            marks: Arc::default(),
        };
        let mmu = Arc::clone(vm.m.mmu());
        mmu.write().set_nx_huge_pages(true).run(vm.host());
        let mut vcpus = std::mem::take(&mut vm.vcpus);
        for vcpu in &mut vcpus {
            vcpu.set_dirty_sink(Box::new(Marks(Arc::clone(&shared.marks))));
        }
        let results: Vec<Vcpu> = std::thread::scope(|s| {
            let host = s.spawn(|| host_thread(name, &mmu, [slot, code, private], &shared));
            let threads: Vec<_> = vcpus
                .into_iter()
                .enumerate()
                .map(|(i, vcpu)| {
                    let (mmu, shared) = (&mmu, &shared);
                    s.spawn(move || vcpu_thread(name, i as u64, vcpu, mmu, shared))
                })
                .collect();
            let vcpus: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
            host.join().expect("the host thread panicked");
            vcpus.into_iter().map(|r| r.expect("a vCPU thread panicked")).collect()
        });
        vm.vcpus = results;
        let errors = shared.errors.lock().expect("not poisoned").clone();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        // Deterministic endings, so that every kind of change happened at least once whatever the
        // interleaving: a merge and a write to it (copy-on-write), a swap-out and a read (swap-in).
        let host = vm.host().clone();
        let (ka, kb) = (slot.host_addr(Gfn(WRITTEN)), slot.host_addr(Gfn(WRITTEN + 1)));
        for gfn in [WRITTEN, WRITTEN + 1] {
            // A write first: it breaks any sharing the run left, so the two pages can be merged as a pair.
            vm.vcpus[0].write_u64(&mmu, Gpa(gfn << PAGE_SHIFT), 0).expect("a write to a zero page");
        }
        host.ksm_merge(ka, kb).expect("zero pages merge");
        vm.vcpus[0].write_u64(&mmu, Gpa(WRITTEN << PAGE_SHIFT), 0).expect("a write to a merged page");
        host.swap_out(slot.host_addr(Gfn(2))).expect("swap out");
        vm.vcpus[0].read_u64(&mmu, Gpa(2 << PAGE_SHIFT)).expect("a read swaps it in");
        let stats = host.host_mmu_stats();
        eprintln!(
            "{name}: {stats:?} {:?} {:?}",
            mmu.stats(),
            vm.vcpus.iter().map(|v| v.mmu_state().counters).collect::<Vec<_>>()
        );
        assert!(stats.swap_outs > 1 && stats.swap_ins > 0 && stats.migrations > 0, "{name}: {stats:?}");
        assert!(stats.merges > 0 && stats.cow_breaks > 0, "{name}: {stats:?}");
        let mmu_stats = mmu.stats();
        assert!(mmu_stats.nx_recovered > 0, "{name}: NX recovery zapped nothing: {mmu_stats:?}");
        check_writes(name, &host, [slot, private], &shared).expect("no write lost");
        assert!(
            host.external_calls() > EXTERNAL_BUSY_EVERY,
            "{name}: private faults reached the external tables"
        );
        vm.check("the stress run");
        drop(mmu);
        vm.teardown();
    }
}

fn vcpu_thread(name: &str, i: u64, mut vcpu: Vcpu, mmu: &Mmu<MockHost>, shared: &Shared) -> Vcpu {
    let mut rng = Lcg(0xab5 + i);
    let mut n = 0u64;
    while n < ACCESSES || !shared.host_done.load(Ordering::Acquire) {
        shared.park_if_asked();
        if shared.failed.load(Ordering::Acquire) {
            std::thread::yield_now();
            continue;
        }
        n += 1;
        let pick = rng.below(10);
        if pick == 9 {
            // A write to its own word of a private page, through the mirror root.
            let page = rng.below(PRIVATE_PAGES);
            let value = ((i + 1) << 40) | n;
            let gpa = Gpa(((PRIVATE + page) << PAGE_SHIFT) + 8 * i);
            match retry(|| vcpu.write_u64(mmu, gpa, value).map(|_| ()), shared) {
                Ok(()) => shared.last_private[(page * 2 + i) as usize].store(value, Ordering::Relaxed),
                Err(e) => shared.fail(format!("{name}: vCPU {i} private write {n} at page {page:#x}: {e}")),
            }
            continue;
        }
        if pick == 8 {
            // A fetch or a read in the code slot: reads map it huge (not executable), a fetch maps its
            // page small and executable, splits the range and tracks the table.
            let gfn = CODE + rng.below(CODE_PAGES);
            let kind = if rng.below(2) == 0 { AccessKind::Exec } else { AccessKind::Read };
            match retry(|| vcpu.access(mmu, Gpa(gfn << PAGE_SHIFT), kind).map(|_| ()), shared) {
                Ok(()) => {}
                Err(e) => shared.fail(format!("{name}: vCPU {i} fetch {n} at gfn {gfn:#x}: {e}")),
            }
            continue;
        }
        let (gfn, store) = match pick {
            // Its own pages: a value that says who wrote it and when.
            0..=4 => (rng.below(WRITTEN / 2) * 2 + i, Some(((i + 1) << 40) | n)),
            // The mergeable pages: only zeros, so they stay identical (a write breaks a merge).
            5 => (WRITTEN + rng.below(KSM_PAGES), Some(0)),
            _ => (rng.below(PAGES), None),
        };
        let gpa = Gpa((gfn << PAGE_SHIFT) + 8 * i);
        let mut livelocks = 0;
        while !shared.failed.load(Ordering::Acquire) {
            let result = match store {
                Some(value) => vcpu.write_u64(mmu, gpa, value).map(|_| ()),
                None => vcpu.read_u64(mmu, gpa).map(|_| ()),
            };
            match result {
                Ok(()) => break,
                // A tracked (zero) page: the emulated write of a zero changes nothing.
                Err(VcpuError::Emulate { reason: EmulateReason::WriteTracked, .. }) if gfn >= WRITTEN => {
                    break;
                }
                // Faults retry while an invalidation over the page runs; the host thread may be
                // descheduled inside one. Keep trying, but let a quiescent point through.
                Err(VcpuError::Livelock { .. }) if livelocks < MAX_LIVELOCKS => {
                    livelocks += 1;
                    shared.park_if_asked();
                    std::thread::yield_now();
                }
                Err(e) => shared.fail(format!("{name}: vCPU {i} access {n} to gfn {gfn:#x}: {e}")),
            }
        }
        if let Some(value) = store.filter(|_| gfn < WRITTEN) {
            shared.last[gfn as usize].store(value, Ordering::Relaxed);
        }
    }
    vcpu
}

/// Runs `access` until it is not a livelock report (faults retry while an invalidation runs), letting
/// quiescent points through.
fn retry(mut access: impl FnMut() -> Result<(), VcpuError>, shared: &Shared) -> Result<(), VcpuError> {
    let mut livelocks = 0;
    loop {
        match access() {
            Err(VcpuError::Livelock { .. }) if livelocks < MAX_LIVELOCKS => {
                livelocks += 1;
                shared.park_if_asked();
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

fn host_thread(name: &str, mmu: &Mmu<MockHost>, [slot, code, private]: [Memslot; 3], shared: &Shared) {
    let host = mmu.host();
    let mut rng = Lcg(0x4057);
    // Logging off, on, off, on with a log that starts all-set (then split and protected range by range
    // as it is cleared), and so on; every stop runs the in-place recovery under the read lock.
    let mut logging = 0u64;
    let mut tracked: Vec<u64> = Vec::new();
    // I4: whether plain logging (no INITIALLY_SET) runs through the whole interval since the last
    // quiescent point (every other interval), and each page's last value then.
    let mut steady = false;
    let mut before: Vec<u64> = shared.last.iter().map(|v| v.load(Ordering::Relaxed)).collect();
    let mut i4_checks = 0u64;
    for op in 1..=HOST_OPS {
        let gfn = rng.below(PAGES);
        match rng.below(10) {
            8 => {
                // Track a zero page (at most four), or untrack one.
                if tracked.len() < 4 && rng.below(2) == 0 {
                    let page = WRITTEN + gfn % KSM_PAGES;
                    match mmu.write().track_write(AsId(0), Gfn(page)) {
                        Ok(flush) => {
                            flush.run(host);
                            tracked.push(page);
                        }
                        Err(e) => shared.fail(format!("{name}: tracking gfn {page:#x}: {e}")),
                    }
                } else if let Some(page) = tracked.pop()
                    && let Err(e) = mmu.write().untrack_write(AsId(0), Gfn(page))
                {
                    shared.fail(format!("{name}: untracking gfn {page:#x}: {e}"));
                }
            }
            9 => {
                mmu.read().recover_nx_huge_pages(2);
            }
            0 => {
                // Swap out a written page (a swapped one refuses: nothing to do).
                let _ = host.swap_out(slot.host_addr(Gfn(gfn % WRITTEN)));
            }
            1 => match host.migrate_page(slot.host_addr(Gfn(gfn))) {
                Ok(_) | Err(HostMmuError::Swapped { .. }) => {}
                Err(e) => shared.fail(format!("{name}: migrating gfn {gfn:#x}: {e}")),
            },
            2 => {
                let other = WRITTEN + rng.below(KSM_PAGES);
                let _ = host
                    .ksm_merge(slot.host_addr(Gfn(WRITTEN + gfn % KSM_PAGES)), slot.host_addr(Gfn(other)));
            }
            3 => {
                mmu.age_gfn_range(AsId(0), Gfn(gfn), Gfn(gfn + 1 + rng.below(0x80)));
            }
            4 => {
                let end = (gfn + 1 + rng.below(0x40)).min(PAGES);
                mmu.write().zap_gfn_range(AsId(0), Gfn(gfn), Gfn(end)).run(host);
                // And a private range: its leaves leave the external tables too.
                let start = PRIVATE + gfn % PRIVATE_PAGES;
                mmu.write().zap_gfn_range(AsId(0), Gfn(start), Gfn(start + 8)).run(host);
            }
            // Logging toggles, except in the intervals kept steady for the I4 check.
            5 if !steady => {
                logging = (logging + 1) % 4;
                let flags = match logging {
                    1 => SlotFlags::LOG_DIRTY,
                    3 => SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET,
                    _ => SlotFlags::empty(),
                };
                let flush =
                    mmu.write().set_memslot_flags(AsId(0), SlotId(0), flags).expect("the slot exists");
                flush.run(host);
            }
            6 => {
                mmu.write().invalidate_roots(None).run(host);
                mmu.read().zap_invalidated_roots();
            }
            _ if logging == 3 => {
                // A clear of the all-set log: the window's huge pages split (pages allocated with the
                // lock dropped), its pages protected.
                mmu.write().reprotect_dirty(AsId(0), SlotId(0), gfn & !63, rng.next() | 1).run(host);
            }
            _ => {
                mmu.test_age_gfn_range(AsId(0), Gfn(gfn), Gfn(gfn + 8));
            }
        }
        if op % CHECK_EVERY == 0 {
            shared.pause.store(true, Ordering::Release);
            shared.barrier.wait();
            if let Err(e) = check_quiescent(name, mmu, &[slot, code, private], op)
                .and_then(|()| check_writes(name, host, [slot, private], shared))
                .and_then(|()| {
                    harvest_and_check_i4(name, mmu, shared, &mut before, steady && logging == 1, op)
                })
            {
                shared.fail(e);
            }
            i4_checks += u64::from(steady && logging == 1);
            // Every other interval runs with plain logging on throughout, from this quiescent point.
            steady = (op / CHECK_EVERY) % 2 == 1;
            if steady && logging != 1 {
                let mut w = mmu.write();
                if logging == 3 {
                    // INITIALLY_SET cannot change while logging stays on: off first.
                    w.set_memslot_flags(AsId(0), SlotId(0), SlotFlags::empty()).expect("the slot").run(host);
                }
                w.set_memslot_flags(AsId(0), SlotId(0), SlotFlags::LOG_DIRTY).expect("the slot").run(host);
                logging = 1;
            }
            shared.pause.store(false, Ordering::Release);
            shared.barrier.wait();
        }
        if shared.failed.load(Ordering::Acquire) {
            break;
        }
    }
    shared.host_done.store(true, Ordering::Release);
    eprintln!("{name}: I4 checked at {i4_checks} quiescent points");
}

/// I4 at a quiescent point (every vCPU parked): when plain dirty logging ran through the whole interval
/// since the last one (`check`), every page of slot 0 whose value changed in it was marked. Then the
/// harvest: the marks are taken and, while logging is on, their pages re-protected (the flush run), so
/// the next interval's first write to each is marked again.
fn harvest_and_check_i4(
    name: &str,
    mmu: &Mmu<MockHost>,
    shared: &Shared,
    before: &mut [u64],
    check: bool,
    op: u64,
) -> Result<(), String> {
    let marks = std::mem::take(&mut *shared.marks.lock().expect("not poisoned"));
    let mut missing = Vec::new();
    for (gfn, (last, was)) in shared.last.iter().zip(before.iter_mut()).enumerate() {
        let now = last.load(Ordering::Relaxed);
        if check && now != *was && !marks.contains(&(gfn as u64)) {
            missing.push(gfn);
        }
        *was = now;
    }
    let mut w = mmu.write();
    if w.memslots().get(AsId(0), SlotId(0)).is_some_and(|s| s.is_dirty_logged()) {
        let mut words: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        for &gfn in &marks {
            *words.entry(gfn & !63).or_default() |= 1 << (gfn & 63);
        }
        for (base, mask) in words {
            w.reprotect_dirty(AsId(0), SlotId(0), base, mask).run(mmu.host());
        }
    }
    drop(w);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: host op {op}: I4: written while logged, not marked: {missing:#x?}"))
    }
}

/// I1 and I3 with every vCPU parked: each valid root against the host's current frames, every TLB.
fn check_quiescent(name: &str, mmu: &Mmu<MockHost>, slots: &[Memslot], op: u64) -> Result<(), String> {
    let tlbs = mmu.host().tlbs();
    let tlbs: Vec<&Tlb> = tlbs.iter().map(|t| &**t).collect();
    let mut errors = check_tlbs(mmu, &tlbs).err().unwrap_or_default();
    errors.extend(check_write_tracking(mmu).err().unwrap_or_default());
    errors.extend(check_mirror(mmu).err().unwrap_or_default());
    for root in mmu.roots().into_iter().filter(|r| r.valid) {
        errors.extend(check_translations_in(mmu, root.pfn, root.as_id, slots).err().unwrap_or_default());
    }
    if errors.is_empty() { Ok(()) } else { Err(format!("{name}: host op {op}: {errors:#?}")) }
}

/// No write lost: each page holds, where the host keeps it now, the last value its vCPU wrote.
fn check_writes(
    name: &str,
    host: &MockHost,
    [slot, private]: [Memslot; 2],
    shared: &Shared,
) -> Result<(), String> {
    for gfn in 0..WRITTEN {
        let expected = shared.last[gfn as usize].load(Ordering::Relaxed);
        let found = host.read_hva_u64(slot.host_addr(Gfn(gfn)), 8 * (gfn % 2));
        if found != expected {
            return Err(format!(
                "{name}: gfn {gfn:#x} lost a write: holds {found:#x}, last written {expected:#x}"
            ));
        }
    }
    for (word, last) in shared.last_private.iter().enumerate() {
        let (page, vcpu) = (word as u64 / 2, word as u64 % 2);
        let expected = last.load(Ordering::Relaxed);
        let found = host.read_hva_u64(private.host_addr(Gfn(PRIVATE + page)), 8 * vcpu);
        if found != expected {
            return Err(format!(
                "{name}: private page {page:#x} lost vCPU {vcpu}'s write: holds {found:#x}, last written {expected:#x}"
            ));
        }
    }
    Ok(())
}
