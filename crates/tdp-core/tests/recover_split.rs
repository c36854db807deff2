//! Huge pages recovered in place when dirty logging stops (KVM 6.13's `recover_huge_pages`), and eager
//! splitting on clear with a log that starts all-set (KVM cb00a70b), on the mock.
//!
//! Checks: stopping logging brings the huge leaves back with no fault at all (counted per vCPU), the
//! translations stay right (I1-I3 checkers), a range the host maps at 4 KiB and a ragged slot end stay
//! 4 KiB, faults racing the recovery (at every yield, and on threads, driven by operation counts) leave
//! every checker passing and every page holding its last write; with `LOG_INITIALLY_SET`, turning logging
//! on changes no SPTE and clearing a range splits and protects exactly that range; without it, every
//! leaf is protected at once. I4 with initially-set logs: every write after a clear is reported.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tdp_core::addr::{AsId, Gfn, Level, SlotId};
use tdp_core::dirty_bitmap::DirtyBitmap;
use tdp_core::fault::AccessKind;
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, SlotError, SlotFlags};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::{Spte, SpteFormat};
use tdp_mock::{HostConfig, Machine, Vcpu};

/// Records every dirty mark as a slot offset.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<BTreeSet<u64>>>);

impl DirtySink for Recorder {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        self.0.lock().expect("recorder").insert(slot.offset_of(gfn));
    }
}

impl Recorder {
    fn take(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.0.lock().expect("recorder"))
    }
}

/// 8 MiB and a ragged end of 37 pages, which no huge leaf can map.
const SLOT_PAGES: u64 = 4 * 512 + 37;

/// Every format and logging method: write protection (EPT, EPT without A/D, NPT) and PML.
const CONFIGS: [MmuConfig; 4] = [
    MmuConfig::EPT,
    MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT },
    MmuConfig::NPT,
    MmuConfig::EPT_PML,
];

struct Vm {
    machine: Machine,
    vcpus: Vec<Vcpu>,
    marks: Recorder,
    slot: Memslot,
}

impl Vm {
    fn new(config: MmuConfig, host: HostConfig) -> Vm {
        let machine = Machine::new(config, host).expect("valid config");
        let slot = machine.ram_slot(AsId(0), SlotId(3), Gfn(0x200), SLOT_PAGES, SlotFlags::empty());
        machine.mmu().write().insert_memslot(slot).expect("slot");
        let marks = Recorder::default();
        let vcpus = (0..2)
            .map(|_| {
                let mut v = machine.new_vcpu(AsId(0));
                v.set_dirty_sink(Box::new(marks.clone()));
                v
            })
            .collect();
        Vm { machine, vcpus, marks, slot }
    }

    fn l2_host() -> HostConfig {
        HostConfig { host_level: Level::L2, ..HostConfig::default() }
    }

    fn access(&mut self, vcpu: usize, offset: u64, kind: AccessKind) {
        let gpa = Gfn(self.slot.base_gfn.0 + offset).gpa();
        self.vcpus[vcpu].access(self.machine.mmu(), gpa, kind).expect("access succeeds");
    }

    fn set_flags(&mut self, flags: SlotFlags) {
        let mmu = self.machine.mmu();
        mmu.write().set_memslot_flags(AsId(0), self.slot.id, flags).expect("slot exists").run(mmu.host());
        self.slot.flags = flags;
    }

    /// Faults taken by every vCPU so far, whatever their outcome.
    fn faults(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| {
                let c = v.mmu_state().counters;
                c.fixed + c.spurious + c.retried + c.emulated
            })
            .sum()
    }

    fn leaves(&self) -> [u64; 3] {
        self.machine.mmu().stats().leaves
    }

    /// The leaf mapping slot page `offset` in vCPU 0's root, with its level.
    fn leaf(&self, offset: u64) -> Option<(Spte, Level)> {
        let root = self.vcpus[0].root().expect("root");
        self.machine.mmu().lookup(root, Gfn(self.slot.base_gfn.0 + offset))
    }

    /// Whether the leaf at `offset` would record the next write: W clear, or with PML a clean 4 KiB leaf.
    fn protected(&self, offset: u64) -> bool {
        let (spte, level) = self.leaf(offset).expect("mapped");
        let mmu = self.machine.mmu();
        let fmt = mmu.format();
        !spte.is_writable() || (mmu.config().pml && level == Level::L1 && !fmt.is_dirty(spte))
    }

    fn check(&self) {
        let vcpus: Vec<&Vcpu> = self.vcpus.iter().collect();
        if let Err(v) = self.machine.check_all(&vcpus, &[self.slot]) {
            panic!("checkers: {v:?}");
        }
    }
}

/// Maps the whole slot at 4 KiB with logging on, every page written last (as after a guest wrote all
/// of it since the last harvest).
fn logged_and_written(config: MmuConfig, host: HostConfig) -> Vm {
    let mut vm = Vm::new(config, host);
    vm.set_flags(SlotFlags::LOG_DIRTY);
    for off in 0..SLOT_PAGES {
        vm.access((off % 2) as usize, off, AccessKind::Write);
    }
    assert_eq!(vm.leaves(), [SLOT_PAGES, 0, 0], "{config:?}: logged, so mapped at 4 KiB");
    vm.marks.take();
    vm
}

#[test]
fn stopping_logging_recovers_huge_leaves_with_zero_refaults() {
    for config in CONFIGS {
        let mut vm = logged_and_written(config, Vm::l2_host());
        let splits = vm.machine.mmu().stats().huge_splits;
        vm.set_flags(SlotFlags::empty());
        assert_eq!(vm.leaves(), [37, 4, 0], "{config:?}: four 2 MiB leaves back, the ragged end at 4 KiB");
        vm.check();
        let before = vm.faults();
        for off in 0..SLOT_PAGES {
            vm.access((off % 2) as usize, off, AccessKind::Read);
            vm.access((off % 2) as usize, off, AccessKind::Write);
        }
        assert_eq!(vm.faults(), before, "{config:?}: no fault after recovery");
        assert_eq!(vm.machine.mmu().stats().huge_splits, splits, "nothing split again");
        assert!(vm.marks.take().is_empty(), "no marks once logging is off");
        vm.check();
    }
}

/// The slot mapped at 4 KiB with logging off: mapped huge, then split eagerly (the shape stopping
/// logging leaves, without going through the stop).
fn split_unlogged(config: MmuConfig) -> Vm {
    let vm = mapped_huge(config);
    let mmu = Arc::clone(vm.machine.mmu());
    let mut cache = tdp_core::mmu::PageCache::new();
    mmu.write().split_huge_pages(AsId(0), vm.slot.id, &mut cache).expect("pages");
    cache.release(mmu.host());
    assert_eq!(vm.leaves(), [SLOT_PAGES, 0, 0]);
    vm
}

#[test]
fn recovery_against_the_zap_baseline() {
    // KVM up to 6.12 zapped the collapsible tables: every 2 MiB page then refaults once. Recovery in
    // place takes no fault. Same shape, both ways.
    for config in CONFIGS {
        let mut zapped = split_unlogged(config);
        let mmu = Arc::clone(zapped.machine.mmu());
        let mut w = mmu.write();
        assert_eq!(w.zap_collapsible(AsId(0), zapped.slot.id), 4);
        drop(w);
        assert_eq!(zapped.leaves(), [37, 0, 0]);
        zapped.check();
        let before = zapped.faults();
        for off in 0..SLOT_PAGES {
            zapped.access(0, off, AccessKind::Read);
        }
        assert_eq!(zapped.faults() - before, 4, "{config:?}: one refault per 2 MiB page");
        assert_eq!(zapped.leaves(), [37, 4, 0]);
        zapped.check();

        let mut recovered = split_unlogged(config);
        let mmu = Arc::clone(recovered.machine.mmu());
        assert_eq!(mmu.read().recover_huge_pages(AsId(0), recovered.slot.id), 4);
        let before = recovered.faults();
        for off in 0..SLOT_PAGES {
            recovered.access(0, off, AccessKind::Read);
        }
        assert_eq!(recovered.faults(), before, "{config:?}: no refault");
        assert_eq!(recovered.leaves(), [37, 4, 0]);
        recovered.check();

        // Both refuse a logged slot.
        recovered.set_flags(SlotFlags::LOG_DIRTY);
        recovered.access(0, 3, AccessKind::Write);
        assert_eq!(mmu.write().zap_collapsible(AsId(0), recovered.slot.id), 0);
        assert_eq!(mmu.read().recover_huge_pages(AsId(0), recovered.slot.id), 0);
        assert_eq!(recovered.leaves()[0], 37 + 512);
    }
}

#[test]
fn a_range_the_host_maps_at_4k_stays_4k() {
    for config in CONFIGS {
        let mut vm = Vm::new(config, Vm::l2_host());
        // The host maps the slot's second 2 MiB at 4 KiB: one of its pages is read-only to the host.
        let ro = vm.machine.host().guest_ram_base() / 4096 + vm.slot.base_gfn.0 + 512 + 77;
        vm.machine.host().set_host_readonly(tdp_core::addr::Pfn(ro), true);
        vm.set_flags(SlotFlags::LOG_DIRTY);
        for off in 0..SLOT_PAGES {
            let kind = if off == 512 + 77 { AccessKind::Read } else { AccessKind::Write };
            vm.access(0, off, kind);
        }
        vm.set_flags(SlotFlags::empty());
        assert_eq!(vm.leaves(), [512 + 37, 3, 0], "{config:?}: the 4 KiB host range stays 4 KiB");
        assert_eq!(vm.leaf(512).map(|(_, l)| l), Some(Level::L1));
        assert_eq!(vm.leaf(1024).map(|(_, l)| l), Some(Level::L2));
        vm.check();
    }
}

#[test]
fn a_table_with_holes_is_recovered_from_its_first_present_leaf() {
    for config in CONFIGS {
        let mut vm = Vm::new(config, Vm::l2_host());
        vm.set_flags(SlotFlags::LOG_DIRTY);
        // A few pages of the first 2 MiB, the first present one not at index 0.
        for off in [300, 5, 511] {
            vm.access(0, off, AccessKind::Write);
        }
        assert_eq!(vm.leaves(), [3, 0, 0]);
        vm.set_flags(SlotFlags::empty());
        assert_eq!(vm.leaves(), [0, 1, 0], "{config:?}");
        let before = vm.faults();
        for off in [0, 5, 200, 300, 511] {
            vm.access(1, off, AccessKind::Read);
        }
        assert_eq!(vm.faults(), before, "{config:?}: the holes are mapped too");
        vm.check();
    }
}

#[test]
fn recovery_races_faults_at_every_yield() {
    // The recovery yields wherever it may; at each yield (the MMU lock dropped) the other vCPU writes
    // pages, on 4 KiB leaves not yet recovered and on huge leaves already back.
    for config in CONFIGS {
        let host = HostConfig { host_level: Level::L2, yield_every: Some(1), ..HostConfig::default() };
        let mut vm = logged_and_written(config, host);
        let other = Arc::new(Mutex::new(vm.vcpus.pop().expect("two vCPUs")));
        let mmu = Arc::clone(vm.machine.mmu());
        let base = vm.slot.base_gfn.0;
        let step = Arc::new(Mutex::new(0u64));
        let hook = {
            let (other, mmu, step) = (Arc::clone(&other), Arc::clone(&mmu), Arc::clone(&step));
            Arc::new(move || {
                let mut n = step.lock().expect("step");
                *n += 1;
                let off = (*n * 193) % SLOT_PAGES;
                let value = 0xabc0_0000 + *n;
                let mut v = other.lock().expect("vcpu");
                v.write_u64(&mmu, Gfn(base + off).gpa(), value).expect("write");
            }) as tdp_mock::host::YieldHook
        };
        vm.machine.host().set_yield_hook(Some(hook));
        vm.set_flags(SlotFlags::empty());
        vm.machine.host().set_yield_hook(None);
        let steps = *step.lock().expect("step");
        assert!(steps >= 5, "{config:?}: the recovery yielded {steps} times");
        let Ok(other) = Arc::try_unwrap(other) else { panic!("the hook still holds the vCPU") };
        vm.vcpus.push(other.into_inner().expect("vcpu"));
        assert_eq!(vm.leaves()[1], 4, "{config:?}: every 2 MiB page recovered despite the races");
        vm.check();
        // Every write made at a yield is there.
        for n in 1..=steps {
            let off = (n * 193) % SLOT_PAGES;
            let last = (n..=steps).rev().find(|m| (m * 193) % SLOT_PAGES == off).expect("n itself");
            let got = vm.vcpus[0].read_u64(&mmu, Gfn(base + off).gpa()).expect("read");
            assert_eq!(got, 0xabc0_0000 + last, "{config:?}: page {off}");
        }
    }
}

/// Counts a thread done when dropped.
struct Done(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

#[test]
fn recovery_races_faulting_threads() {
    // Two vCPU threads write a counted number of pages, and a third thread runs a counted number of
    // MMU-notifier invalidations (start, then end) over random 2 MiB ranges, while this thread turns
    // logging on and off a counted number of times; every page then holds its last write and every
    // checker passes.
    const ROUNDS: usize = 12;
    const WRITES: u64 = 2000;
    for config in CONFIGS {
        let host = HostConfig { host_level: Level::L2, yield_every: Some(7), ..HostConfig::default() };
        let mut vm = Vm::new(config, host);
        let mmu = Arc::clone(vm.machine.mmu());
        let base = vm.slot.base_gfn.0;
        let vcpus = std::mem::take(&mut vm.vcpus);
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(t, mut v)| {
                let (mmu, done) = (Arc::clone(&mmu), Arc::clone(&done));
                std::thread::spawn(move || {
                    // Counts this thread done even if it panics, so the others stop waiting for it.
                    let _done = Done(done);
                    for n in 0..WRITES {
                        // Thread t writes pages of its parity only, so the last write of each is known.
                        let off = (n % (SLOT_PAGES / 2)) * 2 + t as u64;
                        let gpa = Gfn(base + off).gpa();
                        // An access may find its range invalidated at every retry of one round.
                        let mut rounds = 0;
                        while let Err(e) = v.write_u64(&mmu, gpa, n << 8 | t as u64) {
                            rounds += 1;
                            assert!(
                                matches!(e, tdp_mock::VcpuError::Livelock { .. }) && rounds < 1000,
                                "write {n}: {e}"
                            );
                        }
                    }
                    v
                })
            })
            .collect();
        let invalidator = {
            let (mmu, done) = (Arc::clone(&mmu), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while n < 500 || done.load(std::sync::atomic::Ordering::Acquire) < 2 {
                    n += 1;
                    let start = Gfn(base + (n * 7 % 4) * 512);
                    let end = Gfn(start.0 + 512);
                    mmu.write().invalidate_range_start(AsId(0), start, end).expect("a range");
                    std::thread::yield_now();
                    mmu.write().invalidate_range_end().expect("started");
                }
            })
        };
        let mut toggles = 0;
        while toggles < ROUNDS * 2 || done.load(std::sync::atomic::Ordering::Acquire) < 2 {
            let on = toggles % 2 == 0;
            let flags = if on { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
            mmu.write().set_memslot_flags(AsId(0), vm.slot.id, flags).expect("slot").run(mmu.host());
            toggles += 1;
        }
        if toggles % 2 == 1 {
            mmu.write()
                .set_memslot_flags(AsId(0), vm.slot.id, SlotFlags::empty())
                .expect("slot")
                .run(mmu.host());
        }
        vm.vcpus = handles.into_iter().map(|h| h.join().expect("vCPU thread")).collect();
        invalidator.join().expect("invalidating thread");
        vm.check();
        let mut last = std::collections::BTreeMap::new();
        for t in 0..2u64 {
            for n in 0..WRITES {
                last.insert((n % (SLOT_PAGES / 2)) * 2 + t, n << 8 | t);
            }
        }
        for (&off, &value) in &last {
            let got = vm.vcpus[0].read_u64(&mmu, Gfn(base + off).gpa()).expect("read");
            assert_eq!(got, value, "{config:?}: page {off}");
        }
        // Logging is off: whatever the vCPUs left at 4 KiB in whole 2 MiB ranges is recovered now.
        mmu.read().recover_huge_pages(AsId(0), vm.slot.id);
        assert_eq!(vm.leaves()[1], 4, "{config:?}");
        vm.check();
    }
}

/// Maps the slot with four 2 MiB leaves and the 4 KiB ragged end, all written.
fn mapped_huge(config: MmuConfig) -> Vm {
    let mut vm = Vm::new(config, Vm::l2_host());
    for off in (0..4 * 512).step_by(512).chain(4 * 512..SLOT_PAGES) {
        vm.access(0, off, AccessKind::Write);
    }
    assert_eq!(vm.leaves(), [37, 4, 0]);
    vm
}

#[test]
fn initially_set_clearing_a_range_splits_and_protects_exactly_that_range() {
    for config in CONFIGS {
        let mut vm = mapped_huge(config);
        let bitmap = DirtyBitmap::new(SLOT_PAGES, true).expect("bitmap");
        let sptes: Vec<_> = (0..SLOT_PAGES).map(|off| vm.leaf(off)).collect();
        vm.set_flags(SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET);
        let now: Vec<_> = (0..SLOT_PAGES).map(|off| vm.leaf(off)).collect();
        assert_eq!(now, sptes, "{config:?}: turning logging on changed no SPTE");
        let faults = vm.faults();
        vm.access(1, 600, AccessKind::Write);
        assert_eq!(vm.faults(), faults, "the huge leaves stay writable until cleared");
        // Clear pages 576..704 of the second 2 MiB page (two words).
        let mmu = Arc::clone(vm.machine.mmu());
        let slot_id = vm.slot.id;
        let flush = bitmap
            .clear(576, 128, &[u64::MAX, u64::MAX], |base, mask| {
                mmu.write().reprotect_dirty(AsId(0), slot_id, base, mask)
            })
            .expect("a valid clear");
        flush.run(mmu.host());
        assert_eq!(vm.leaves(), [37 + 512, 3, 0], "{config:?}: only the second 2 MiB page was split");
        for off in 512..1024 {
            let (_, level) = vm.leaf(off).expect("mapped");
            assert_eq!(level, Level::L1);
            assert_eq!(vm.protected(off), (576..704).contains(&off), "{config:?}: page {off}");
        }
        for off in [0, 1024, 1536, 2048] {
            assert!(!vm.protected(off), "{config:?}: page {off} outside the range untouched");
        }
        vm.check();
        // The next writes: inside the range recorded (a fault, or PML), outside not needed.
        vm.marks.take();
        vm.access(0, 600, AccessKind::Write);
        vm.access(0, 700, AccessKind::Write);
        vm.access(0, 800, AccessKind::Write);
        vm.vcpus[0].flush_pml(vm.machine.mmu());
        assert_eq!(vm.marks.take(), BTreeSet::from([600, 700]), "{config:?}");
        vm.check();
        // Clearing the same range again splits nothing more.
        let splits = mmu.stats().huge_splits;
        mmu.write().reprotect_dirty(AsId(0), slot_id, 576, u64::MAX).run(mmu.host());
        assert_eq!(mmu.stats().huge_splits, splits);
        vm.set_flags(SlotFlags::empty());
        assert_eq!(vm.leaves(), [37, 4, 0], "{config:?}: recovered when logging stops");
        vm.check();
    }
}

#[test]
fn without_initially_set_enabling_protects_everything() {
    for config in CONFIGS {
        let mut vm = mapped_huge(config);
        vm.set_flags(SlotFlags::LOG_DIRTY);
        for off in (0..SLOT_PAGES).step_by(37) {
            assert!(vm.protected(off), "{config:?}: page {off}");
        }
        assert_eq!(vm.leaves(), [37, 4, 0], "not split until written (or split eagerly)");
        vm.check();
    }
}

#[test]
fn initially_set_changes_only_with_logging() {
    let mut vm = Vm::new(MmuConfig::EPT, Vm::l2_host());
    vm.set_flags(SlotFlags::LOG_DIRTY);
    let mmu = Arc::clone(vm.machine.mmu());
    let both = SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET;
    assert_eq!(
        mmu.write().set_memslot_flags(AsId(0), vm.slot.id, both),
        Err(SlotError::InitiallySetChange { as_id: AsId(0), id: vm.slot.id })
    );
    vm.set_flags(SlotFlags::LOG_INITIALLY_SET); // allowed while logging is off (no effect)
    vm.set_flags(both);
    vm.set_flags(SlotFlags::empty());
    vm.check();
}

#[test]
fn i4_initially_set_writes_after_a_clear_are_all_reported() {
    // The VMM's round with an all-set log: clear (re-protect) a chunk, copy it, and any write after
    // the clear is in the next get.
    for config in CONFIGS {
        let mut vm = mapped_huge(config);
        let bitmap = Arc::new(DirtyBitmap::new(SLOT_PAGES, true).expect("bitmap"));
        // The vCPUs' marks go to the bitmap.
        #[derive(Clone)]
        struct ToBitmap(Arc<DirtyBitmap>);
        impl DirtySink for ToBitmap {
            fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
                self.0.mark(slot.offset_of(gfn)).expect("in the slot");
            }
        }
        for v in &mut vm.vcpus {
            v.set_dirty_sink(Box::new(ToBitmap(Arc::clone(&bitmap))));
        }
        vm.set_flags(SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET);
        let mmu = Arc::clone(vm.machine.mmu());
        let slot_id = vm.slot.id;
        let words = SLOT_PAGES.div_ceil(64) as usize;
        let mut lcg = 0x2545_f491_4f6c_dd1du64;
        for round in 0..6u64 {
            // Clear everything, in chunks of 256 pages, the last one ragged.
            let mut first = 0;
            while first < SLOT_PAGES {
                let n = (SLOT_PAGES - first).min(256) as u32;
                let mask = vec![u64::MAX; (n as u64).div_ceil(64) as usize];
                let flush = bitmap
                    .clear(first, n, &mask, |base, m| mmu.write().reprotect_dirty(AsId(0), slot_id, base, m))
                    .expect("a valid clear");
                flush.run(mmu.host());
                first += u64::from(n);
            }
            let mut written = BTreeSet::new();
            for _ in 0..200 {
                lcg = lcg.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let off = (lcg >> 33) % SLOT_PAGES;
                vm.access((lcg & 1) as usize, off, AccessKind::Write);
                written.insert(off);
            }
            for v in &mut vm.vcpus {
                v.flush_pml(&mmu);
            }
            let mut out = vec![0u64; words];
            bitmap.get(&mut out).expect("buffer");
            for off in written {
                assert!(out[(off / 64) as usize] & (1 << (off % 64)) != 0, "{config:?} round {round}: {off}");
            }
            vm.check();
        }
    }
}

#[test]
fn a_1g_table_is_recovered_as_a_1g_leaf_where_the_host_maps_1g() {
    // EPT and NPT both map 1 GiB pages; the host maps guest RAM at 1 GiB (the mock's default).
    for config in [MmuConfig::EPT, MmuConfig::NPT] {
        let machine = Machine::new(config, HostConfig::default()).expect("valid config");
        let pages = Level::L3.pages();
        let slot = machine.ram_slot(AsId(0), SlotId(1), Gfn(pages), pages, SlotFlags::LOG_DIRTY);
        machine.mmu().write().insert_memslot(slot).expect("slot");
        let mut vcpu = machine.new_vcpu(AsId(0));
        // A few pages in three 2 MiB ranges, the first present one not at the start.
        for off in [513, 1000, 7 * 512 + 3, 300 * 512] {
            vcpu.write_u64(machine.mmu(), Gfn(pages + off).gpa(), off).expect("write");
        }
        assert_eq!(machine.mmu().stats().leaves, [4, 0, 0]);
        let mmu = machine.mmu();
        mmu.write().set_memslot_flags(AsId(0), slot.id, SlotFlags::empty()).expect("slot").run(mmu.host());
        assert_eq!(mmu.stats().leaves, [0, 0, 1], "{config:?}: one 1 GiB leaf");
        let reference = Memslot { flags: SlotFlags::empty(), ..slot };
        if let Err(v) = machine.check_all(&[&vcpu], &[reference]) {
            panic!("{config:?}: {v:?}");
        }
        let faults = vcpu.mmu_state().counters.fixed;
        for off in [0, 513, 1000, 7 * 512 + 3, 300 * 512, pages - 1] {
            let want = if off == 0 || off == pages - 1 { 0 } else { off };
            assert_eq!(vcpu.read_u64(mmu, Gfn(pages + off).gpa()).expect("read"), want, "{config:?}: {off}");
        }
        assert_eq!(vcpu.mmu_state().counters.fixed, faults, "no refault");
        vcpu.release(mmu);
    }
}

#[test]
fn initially_set_clearing_64_pages_of_a_1g_leaf_splits_only_down_their_path() {
    for config in [MmuConfig::EPT, MmuConfig::NPT] {
        let machine = Machine::new(config, HostConfig::default()).expect("valid config");
        let pages = Level::L3.pages();
        let slot = machine.ram_slot(AsId(0), SlotId(1), Gfn(pages), pages, SlotFlags::empty());
        machine.mmu().write().insert_memslot(slot).expect("slot");
        let mut vcpu = machine.new_vcpu(AsId(0));
        vcpu.write_u64(machine.mmu(), Gfn(pages).gpa(), 1).expect("write");
        let mmu = machine.mmu();
        assert_eq!(mmu.stats().leaves, [0, 0, 1], "{config:?}: one 1 GiB leaf");
        let logging = SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET;
        mmu.write().set_memslot_flags(AsId(0), slot.id, logging).expect("slot").run(mmu.host());
        mmu.write().reprotect_dirty(AsId(0), slot.id, 5 * 512 + 64, u64::MAX).run(mmu.host());
        assert_eq!(mmu.stats().leaves, [512, 511, 0], "{config:?}: 1 GiB -> 2 MiB -> 4 KiB on the path");
        let reference = Memslot { flags: logging, ..slot };
        if let Err(v) = machine.check_all(&[&vcpu], &[reference]) {
            panic!("{config:?}: {v:?}");
        }
        vcpu.release(mmu);
    }
}
