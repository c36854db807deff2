//! The host's side of the MMU on the mock machine: MMU-notifier invalidation and the retry rule of a
//! fault that translated without the lock, the host MMU's swap / migration / KSM / copy-on-write, aging
//! and access tracking, memory types and pre-fault. Each test asserts what KVM documents for the case.
//!
//! Checks: I1 (no leaf to a frame the host took away: `check_all` against the host MMU's frames), I3
//! (aging's no-flush rule is allowed by the checker only for access-tracked leaves), I4 (a write racing
//! aging is reported).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, Pfn, SlotId};
use tdp_core::fault::{AccessKind, Fault, FaultKind};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultOutcome, InvalidateError, MmuConfig, PreFaultError, VcpuMmu};
use tdp_core::spte::{EptBits, SpteFormat};
use tdp_mock::{AccessResult, HostConfig, Machine, MockHost, Vcpu};

const EPT_NO_AD: MmuConfig = MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT };
/// The configurations aging and invalidation run on: A/D bits in hardware (EPT, NPT) and access
/// tracking (EPT without A/D).
const CONFIGS: [(&str, MmuConfig); 3] =
    [("ept", MmuConfig::EPT), ("ept-no-ad", EPT_NO_AD), ("npt", MmuConfig::NPT)];
/// Pages of the test slot.
const PAGES: u64 = 1024;
/// Spare guest-RAM frames the host may move pages to: far above the test slot.
const SPARE: u64 = 1 << 20;

fn machine(cfg: MmuConfig, host_level: Level) -> (Machine, Memslot) {
    let m = Machine::new(cfg, HostConfig { host_level, ..HostConfig::default() }).expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), PAGES, SlotFlags::empty());
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    m.host().add_spare_frames(Pfn((m.host().guest_ram_base() >> PAGE_SHIFT) + SPARE), 64);
    (m, slot)
}

fn fault(gfn: u64, access: AccessKind) -> Fault {
    Fault { as_id: AsId(0), gpa: Gfn(gfn).gpa(), access, kind: FaultKind::Violation { present: false } }
}

fn done(r: Result<AccessResult, tdp_mock::VcpuError>) -> Pfn {
    match r {
        Ok(AccessResult::Done { pfn, .. }) => pfn,
        other => panic!("access did not retire: {other:?}"),
    }
}

#[test]
fn invalidation_zaps_its_range_and_faults_there_retry_until_the_last_end() {
    for (name, cfg) in CONFIGS {
        let (m, _) = machine(cfg, Level::L1);
        let mmu = m.mmu();
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("root");
        for gfn in 0..16 {
            assert_eq!(
                mmu.handle_fault(&mut vcpu, fault(gfn, AccessKind::Read), &mut ()),
                Ok(FaultOutcome::Fixed)
            );
        }
        let root = vcpu.root().expect("root");
        // Two overlapping invalidations: [2, 6) and [4, 10); the union stays covered until both end.
        mmu.write().invalidate_range_start(AsId(0), Gfn(2), Gfn(6)).expect("range");
        mmu.write().invalidate_range_start(AsId(0), Gfn(4), Gfn(10)).expect("range");
        for gfn in 0..16 {
            assert_eq!(
                mmu.lookup(root, Gfn(gfn)).is_some(),
                !(2..10).contains(&gfn),
                "{name}: gfn {gfn} zapped?"
            );
        }
        assert_eq!(mmu.handle_fault(&mut vcpu, fault(3, AccessKind::Read), &mut ()), Ok(FaultOutcome::Retry));
        assert_eq!(mmu.handle_fault(&mut vcpu, fault(9, AccessKind::Read), &mut ()), Ok(FaultOutcome::Retry));
        assert_eq!(
            mmu.handle_fault(&mut vcpu, fault(12, AccessKind::Write), &mut ()),
            Ok(FaultOutcome::Spurious)
        );
        mmu.write().invalidate_range_end().expect("started");
        assert_eq!(
            mmu.handle_fault(&mut vcpu, fault(3, AccessKind::Read), &mut ()),
            Ok(FaultOutcome::Retry),
            "{name}: one still runs"
        );
        assert_eq!(mmu.write().invalidations_in_progress(), 1);
        mmu.write().invalidate_range_end().expect("started");
        assert_eq!(mmu.handle_fault(&mut vcpu, fault(3, AccessKind::Read), &mut ()), Ok(FaultOutcome::Fixed));
        assert_eq!(mmu.write().invalidate_range_end(), Err(InvalidateError::NotStarted));
        assert_eq!(
            mmu.write().invalidate_range_start(AsId(0), Gfn(5), Gfn(5)),
            Err(InvalidateError::EmptyRange { start: Gfn(5), end: Gfn(5) })
        );
        assert_eq!(mmu.write().invalidations_in_progress(), 0, "{name}: refused calls change nothing");
        mmu.release_vcpu(&mut vcpu);
    }
}

#[test]
fn a_fault_whose_translation_raced_an_invalidation_retries_then_maps_the_new_frame() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (m.mmu(), m.host());
        let (a, b) = (slot.host_addr(Gfn(7)), slot.host_addr(Gfn(8)));
        host.ksm_merge(a, b).expect("two zero pages are identical");
        let shared = host.host_frame(a).expect("mapped");
        assert_eq!(host.host_frame(b), Some(shared));
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("root");
        // A read maps the shared frame read-only.
        assert_eq!(mmu.handle_fault(&mut vcpu, fault(8, AccessKind::Read), &mut ()), Ok(FaultOutcome::Fixed));
        let (leaf, _) = mmu.lookup(vcpu.root().expect("root"), Gfn(8)).expect("mapped");
        assert_eq!((leaf.pfn(), leaf.is_writable()), (shared, false), "{name}");
        // A write: the host breaks the sharing inside the translation, running the notifier (which takes
        // the MMU lock: the fault holds none). The translation the fault got may predate it: it retries.
        let outcome = mmu.handle_fault(&mut vcpu, fault(7, AccessKind::Write), &mut ());
        assert_eq!(outcome, Ok(FaultOutcome::Retry), "{name}: the copy-on-write bumped the sequence count");
        assert_eq!(
            mmu.handle_fault(&mut vcpu, fault(7, AccessKind::Write), &mut ()),
            Ok(FaultOutcome::Fixed)
        );
        let private = host.host_frame(a).expect("mapped");
        assert_ne!(private, shared);
        let (leaf, _) = mmu.lookup(vcpu.root().expect("root"), Gfn(7)).expect("mapped");
        assert_eq!((leaf.pfn(), leaf.is_writable()), (private, true), "{name}");
        assert_eq!(host.host_mmu_stats().cow_breaks, 1);
        mmu.release_vcpu(&mut vcpu);
        let mut check = m.new_vcpu(AsId(0));
        done(check.access(mmu, Gfn(8).gpa(), AccessKind::Read));
        m.check_all(&[&check], &[slot]).expect("I1-I3");
        check.release(mmu);
    }
}

#[test]
fn swap_out_and_migration_keep_the_bytes_and_leave_no_stale_leaf() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (m.mmu(), m.host());
        let mut vcpu = m.new_vcpu(AsId(0));
        for gfn in 0..8u64 {
            vcpu.write_u64(mmu, Gpa((gfn << PAGE_SHIFT) + 8), 0x1000 + gfn).expect("write");
        }
        let before: Vec<Pfn> =
            (0..8).map(|g| host.host_frame(slot.host_addr(Gfn(g))).expect("mapped")).collect();
        host.swap_out(slot.host_addr(Gfn(3))).expect("swap out");
        let moved = host.migrate_page(slot.host_addr(Gfn(5))).expect("migrate");
        assert_ne!(moved, before[5]);
        let root = vcpu.root().expect("root");
        assert_eq!(mmu.lookup(root, Gfn(3)), None, "{name}: the swapped page is unmapped");
        assert_eq!(mmu.lookup(root, Gfn(5)), None, "{name}: the migrated page is unmapped");
        m.check_all(&[&vcpu], &[slot]).expect("I1-I3 after the host's changes");
        for gfn in 0..8u64 {
            assert_eq!(
                vcpu.read_u64(mmu, Gpa((gfn << PAGE_SHIFT) + 8)).expect("read"),
                0x1000 + gfn,
                "{name}"
            );
        }
        let swapped_in = host.host_frame(slot.host_addr(Gfn(3))).expect("swapped back in");
        assert_ne!(swapped_in, before[3], "{name}: the page came back in another frame");
        assert_eq!(mmu.lookup(vcpu.root().expect("root"), Gfn(3)).map(|(s, _)| s.pfn()), Some(swapped_in));
        assert_eq!(host.host_mmu_stats().swap_ins, 1);
        m.check_all(&[&vcpu], &[slot]).expect("I1-I3 after the refaults");
        vcpu.release(mmu);
    }
}

/// Flushes every vCPU TLB: what time does to a TLB, so that the next accesses walk (and set A bits).
fn forget_tlbs(host: &MockHost) {
    host.tlbs().iter().for_each(|t| t.flush_all());
}

#[test]
fn aging_reports_young_exactly_the_pages_accessed_since_the_last_age() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (m.mmu(), m.host());
        let mut vcpu = m.new_vcpu(AsId(0));
        for gfn in 0..64 {
            done(vcpu.access(mmu, Gfn(gfn).gpa(), [AccessKind::Read, AccessKind::Write][gfn as usize % 2]));
        }
        assert!(mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(64)), "{name}: faulted pages are young");
        forget_tlbs(host);
        assert!(!mmu.test_age_gfn_range(AsId(0), Gfn(0), Gfn(64)), "{name}: nothing used since");
        m.check_all(&[&vcpu], &[slot]).expect("I1-I3 after aging");
        let used: BTreeSet<u64> = [1, 2, 17, 40, 63].into();
        for &gfn in &used {
            done(vcpu.access(mmu, Gfn(gfn).gpa(), AccessKind::Read));
        }
        for gfn in 0..64 {
            let young = mmu.test_age_gfn_range(AsId(0), Gfn(gfn), Gfn(gfn + 1));
            assert_eq!(young, used.contains(&gfn), "{name}: gfn {gfn}");
        }
        assert!(mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(64)));
        assert!(!mmu.test_age_gfn_range(AsId(0), Gfn(0), Gfn(64)));
        m.check_all(&[&vcpu], &[slot]).expect("I1-I3 at the end");
        vcpu.release(mmu);
    }
}

#[test]
fn an_access_tracked_leaf_comes_back_with_its_permissions() {
    let (m, slot) = machine(EPT_NO_AD, Level::L1);
    let (mmu, host) = (m.mmu(), m.host());
    let fmt = *mmu.format();
    // A read-only host page keeps its leaf read-only through aging.
    let ro = Gfn(9);
    host.set_host_readonly(host.host_frame(slot.host_addr(ro)).expect("mapped"), true);
    let mut vcpu = m.new_vcpu(AsId(0));
    done(vcpu.access(mmu, Gfn(4).gpa(), AccessKind::Write));
    done(vcpu.access(mmu, ro.gpa(), AccessKind::Read));
    let root = vcpu.root().expect("root").pfn();
    let (writable, _) = mmu.lookup_in(root, Gfn(4)).expect("mapped");
    let (readonly, _) = mmu.lookup_in(root, ro).expect("mapped");
    assert!(mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(16)));
    for (gfn, leaf) in [(Gfn(4), writable), (ro, readonly)] {
        let (aged, _) = mmu.lookup_in(root, gfn).expect("still mapped");
        assert!(fmt.is_access_tracked(aged) && fmt.access(aged).is_empty(), "{aged:?}");
        assert_eq!(fmt.is_mmu_writable(aged), fmt.is_mmu_writable(leaf));
        let walk = tdp_mock::walk(
            host,
            m.hardware(),
            root,
            Level::L4,
            gfn.gpa(),
            AccessKind::Read,
            tdp_mock::WalkMode::Peek,
        );
        assert!(matches!(walk, tdp_mock::WalkOutcome::Violation { .. }), "hardware faults on it: {walk:?}");
    }
    forget_tlbs(host);
    let fixed_before = vcpu.mmu_state().counters.fixed;
    // A read restores every saved right, W included: the leaf is as it was.
    done(vcpu.access(mmu, Gfn(4).gpa(), AccessKind::Read));
    assert_eq!(mmu.lookup_in(root, Gfn(4)).map(|(s, _)| s), Some(writable));
    done(vcpu.access(mmu, ro.gpa(), AccessKind::Exec));
    assert_eq!(mmu.lookup_in(root, ro).map(|(s, _)| s), Some(readonly), "R and X back, never W");
    assert_eq!(vcpu.mmu_state().counters.fixed, fixed_before + 2, "two fast-path fixes");
    // Write protection (dirty logging) reaches a tracked leaf's saved W; the write then gets W back
    // through MMU-writable, with the fast path again.
    assert!(mmu.age_gfn_range(AsId(0), Gfn(4), Gfn(5)));
    mmu.write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::LOG_DIRTY).expect("slot").run(host);
    let (protected, _) = mmu.lookup_in(root, Gfn(4)).expect("mapped");
    assert_eq!(fmt.access_restored(protected), fmt.write_protected(writable), "the saved W is gone");
    forget_tlbs(host);
    done(vcpu.access(mmu, Gfn(4).gpa(), AccessKind::Write));
    assert_eq!(mmu.lookup_in(root, Gfn(4)).map(|(s, _)| s), Some(writable));
    assert_eq!(vcpu.mmu_state().counters.fixed, fixed_before + 3, "a third fast-path fix");
    m.check_all(&[&vcpu], &[slot]).expect("I1-I3");
    vcpu.release(mmu);
}

/// A dirty sink shared by threads.
#[derive(Clone, Default)]
struct Marks(Arc<Mutex<BTreeSet<u64>>>);

impl DirtySink for Marks {
    fn mark_dirty(&mut self, _slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        self.0.lock().expect("not poisoned").insert(gfn.0);
    }
}

#[test]
fn a_write_racing_aging_is_never_lost() {
    const ROUNDS: u64 = 200;
    for (name, cfg) in CONFIGS {
        let (m, _) = machine(cfg, Level::L1);
        let mmu = Arc::clone(m.mmu());
        let logged = m.ram_slot(AsId(0), SlotId(1), Gfn(PAGES), 256, SlotFlags::LOG_DIRTY);
        mmu.write().insert_memslot(logged).expect("slot");
        let marks = Marks::default();
        let mut vcpu: Vcpu = m.new_vcpu(AsId(0));
        vcpu.set_dirty_sink(Box::new(marks.clone()));
        // Map every page writable first (marked dirty), then clear the marks: logging from here on.
        for page in 0..256 {
            vcpu.write_u64(&mmu, Gfn(PAGES + page).gpa(), 1).expect("write");
        }
        mmu.write().reprotect_dirty(AsId(0), SlotId(1), 0, u64::MAX).run(m.host());
        for base in (64..256).step_by(64) {
            mmu.write().reprotect_dirty(AsId(0), SlotId(1), base, u64::MAX).run(m.host());
        }
        marks.0.lock().expect("not poisoned").clear();
        let written = std::thread::scope(|s| {
            let ager = s.spawn(|| {
                for _ in 0..ROUNDS {
                    mmu.age_gfn_range(AsId(0), Gfn(PAGES), Gfn(PAGES + 256));
                    std::thread::yield_now();
                }
            });
            let mut written = BTreeSet::new();
            for n in 0..ROUNDS * 8 {
                let page = (n * 37) % 256;
                vcpu.write_u64(&mmu, Gpa(((PAGES + page) << PAGE_SHIFT) + 16), n).expect("write");
                written.insert(PAGES + page);
            }
            ager.join().expect("the aging thread");
            written
        });
        let reported = marks.0.lock().expect("not poisoned").clone();
        let lost: Vec<_> = written.difference(&reported).collect();
        assert!(lost.is_empty(), "{name}: writes racing aging went unreported: {lost:?}");
        if mmu.format().has_accessed_dirty() {
            let root = vcpu.root().expect("root").pfn();
            for &gfn in &written {
                let (leaf, _) = mmu.lookup_in(root, Gfn(gfn)).expect("mapped");
                assert!(
                    mmu.format().is_dirty(leaf) && leaf.is_writable(),
                    "{name}: aging lost D or W at {gfn}"
                );
            }
        }
        vcpu.release(&mmu);
    }
}

#[test]
fn leaves_carry_the_memory_type_kvm_gives_them() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (m.mmu(), m.host());
        let fmt = *mmu.format();
        let device = Gfn(20);
        host.set_device_memory(host.host_frame(slot.host_addr(device)).expect("mapped"), true);
        let mut vcpu = VcpuMmu::new();
        let mut leaf_of = |gfn: Gfn| {
            mmu.load_root(&mut vcpu, AsId(0)).expect("root");
            assert_eq!(
                mmu.handle_fault(&mut vcpu, fault(gfn.0, AccessKind::Read), &mut ()),
                Ok(FaultOutcome::Fixed)
            );
            mmu.lookup(vcpu.root().expect("root"), gfn).expect("mapped").0.0
        };
        let ram = leaf_of(Gfn(1));
        let dev = leaf_of(device);
        mmu.write().set_noncoherent_dma(true).run(host);
        mmu.read().zap_invalidated_roots();
        let ram_nc = leaf_of(Gfn(1));
        let memtype = |spte: u64| spte & (EptBits::MEMTYPE.bits() | EptBits::IGNORE_PAT.bits());
        if fmt.kind() == tdp_core::spte::TdpKind::Ept {
            // SDM: type in bits 5:3 (6 = WB, 0 = UC), IPAT bit 6.
            assert_eq!(memtype(ram), (6 << 3) | (1 << 6), "{name}: RAM is WB, guest PAT ignored");
            assert_eq!(memtype(ram_nc), 6 << 3, "{name}: with non-coherent DMA the guest PAT counts");
            assert_eq!(memtype(dev), 0, "{name}: device memory is UC and honours the guest PAT");
        } else {
            // APM: no memory type in nested leaves; PWT, PCD and PAT stay clear (the guest PAT decides).
            let pat_bits = (1 << 3) | (1 << 4) | (1 << 7);
            assert_eq!((ram & pat_bits, dev & pat_bits, ram_nc & pat_bits), (0, 0, 0), "{name}");
        }
        mmu.release_vcpu(&mut vcpu);
        let mut check = m.new_vcpu(AsId(0));
        done(check.access(mmu, device.gpa(), AccessKind::Read));
        m.check_all(&[&check], &[slot]).expect("the mock's walker accepts every type");
        check.release(mmu);
    }
}

#[test]
fn pre_fault_maps_ahead_at_the_largest_level_and_stops_cleanly() {
    for (name, cfg) in CONFIGS {
        let (m, _) = machine(cfg, Level::L3);
        let (mmu, host) = (m.mmu(), m.host());
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("root");
        // 1024 pages from gfn 0, 2 MiB-aligned: two 2 MiB leaves.
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(0), 8192),
            Ok(2 << 20),
            "{name}: to the end of the leaf"
        );
        assert_eq!(mmu.stats().leaves[1], 1);
        assert_eq!(mmu.pre_fault_memory(&mut vcpu, Gpa(2 << 20), PAGES * 4096 - (2 << 20)), Ok(2 << 20));
        assert_eq!(mmu.stats().leaves[1], 2);
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(4 << 20), 4096),
            Err(PreFaultError::NoMemslot(Gpa(4 << 20)))
        );
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(5), 4096),
            Err(PreFaultError::BadRange { gpa: Gpa(5), len: 4096 })
        );
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(0), 0),
            Err(PreFaultError::BadRange { gpa: Gpa(0), len: 0 })
        );
        // A pending invalidation stops it there; what came before stays mapped.
        mmu.write().zap_all();
        mmu.write().invalidate_range_start(AsId(0), Gfn(512), Gfn(513)).expect("range");
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(0), 4 << 20),
            Ok(2 << 20),
            "{name}: stops at the invalidation"
        );
        assert_eq!(
            mmu.pre_fault_memory(&mut vcpu, Gpa(2 << 20), 4096),
            Err(PreFaultError::Invalidation(Gpa(2 << 20)))
        );
        mmu.write().invalidate_range_end().expect("started");
        assert_eq!(mmu.pre_fault_memory(&mut vcpu, Gpa(2 << 20), 4096), Ok(2 << 20));
        // An empty page cache that cannot be refilled stops it cleanly too.
        mmu.write().zap_all();
        vcpu.cache_mut().release(host);
        host.set_alloc_budget(Some(0));
        assert!(
            matches!(mmu.pre_fault_memory(&mut vcpu, Gpa(0), 4096), Err(PreFaultError::Alloc(_))),
            "{name}"
        );
        host.set_alloc_budget(None);
        assert_eq!(mmu.pre_fault_memory(&mut vcpu, Gpa(0), 4096), Ok(2 << 20));
        mmu.release_vcpu(&mut vcpu);
    }
}

/// KVM's retry rule: the host migrates the page right after answering the fault's translation (the
/// translate hook runs between the answer and the install, as a host thread could). The fault must not
/// install the frame it was given: it retries, and the next fault maps the page's new frame. Without
/// the rule the first fault would report `Fixed` with a leaf to the old frame.
#[test]
fn i1_a_translation_made_stale_before_the_install_is_not_installed() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (Arc::clone(m.mmu()), m.host().clone());
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("root");
        let old = host.host_frame(slot.host_addr(Gfn(6))).expect("mapped");
        let once = std::sync::atomic::AtomicBool::new(true);
        let racer = host.clone();
        host.set_translate_hook(Some(Arc::new(move |gfn| {
            if gfn == Gfn(6) && once.swap(false, std::sync::atomic::Ordering::Relaxed) {
                racer.migrate_page(slot.host_addr(gfn)).expect("a spare frame");
            }
        })));
        assert_eq!(
            mmu.handle_fault(&mut vcpu, fault(6, AccessKind::Write), &mut ()),
            Ok(FaultOutcome::Retry),
            "{name}"
        );
        assert_eq!(mmu.lookup(vcpu.root().expect("root"), Gfn(6)), None, "{name}: nothing stale installed");
        assert_eq!(
            mmu.handle_fault(&mut vcpu, fault(6, AccessKind::Write), &mut ()),
            Ok(FaultOutcome::Fixed)
        );
        let new = host.host_frame(slot.host_addr(Gfn(6))).expect("mapped");
        assert_ne!(new, old);
        assert_eq!(mmu.lookup(vcpu.root().expect("root"), Gfn(6)).map(|(s, _)| s.pfn()), Some(new), "{name}");
        host.set_translate_hook(None);
        mmu.release_vcpu(&mut vcpu);
    }
}

/// Migrations between accesses: every access after one reads what was written before it, through a
/// leaf to the page's current frame.
#[test]
fn i1_no_translation_from_before_an_invalidation_is_installed() {
    for (name, cfg) in CONFIGS {
        let (m, slot) = machine(cfg, Level::L1);
        let (mmu, host) = (m.mmu(), m.host());
        let mut vcpu = m.new_vcpu(AsId(0));
        for round in 0..50u64 {
            let gfn = Gfn(round % 16);
            vcpu.write_u64(mmu, Gpa((gfn.0 << PAGE_SHIFT) + 24), round).expect("write");
            host.migrate_page(slot.host_addr(gfn)).expect("migrate");
            assert_eq!(vcpu.read_u64(mmu, Gpa((gfn.0 << PAGE_SHIFT) + 24)).expect("read"), round, "{name}");
            let mapped = mmu.lookup(vcpu.root().expect("root"), gfn).map(|(s, _)| s.pfn());
            assert_eq!(mapped, host.host_frame(slot.host_addr(gfn)), "{name} round {round}");
        }
        m.check_all(&[&vcpu], &[slot]).expect("I1-I3");
        vcpu.release(mmu);
    }
}
