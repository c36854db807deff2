//! MMU dirty logging on the mock: which faults mark pages dirty, the fast path, the passes that start and
//! stop logging, re-protection after a harvest, eager splitting, and a random-write check that nothing
//! written after logging starts is missing from the next harvest (I4, write-protection method).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tdp_core::addr::{AsId, Gfn, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{MmuConfig, PageCache};
use tdp_core::spte::SpteFormat;
use tdp_mock::{HostConfig, Machine, Vcpu, check_tables, check_tlbs, check_translations};

/// Records every dirty mark, shared between the vCPUs and the test.
/// A broken variant can make it drop every mark of one path.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(SlotId, u64)>>>, Option<DirtySource>);

impl DirtySink for Recorder {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, source: DirtySource) {
        if self.1 != Some(source) {
            self.0.lock().expect("recorder").push((slot.id, slot.offset_of(gfn)));
        }
    }
}

impl Recorder {
    fn take(&self) -> Vec<(SlotId, u64)> {
        std::mem::take(&mut *self.0.lock().expect("recorder"))
    }
}

const SLOT_PAGES: u64 = 4 * 512 + 37; // 8 MiB and a ragged end

struct Vm {
    machine: Machine,
    vcpus: Vec<Vcpu>,
    marks: Recorder,
    slot: Memslot,
}

impl Vm {
    fn new(config: MmuConfig) -> Vm {
        Vm::dropping(config, None)
    }

    /// A VM whose recorder loses every mark from `dropped` (a broken variant).
    fn dropping(config: MmuConfig, dropped: Option<DirtySource>) -> Vm {
        let machine = Machine::new(config, HostConfig { host_level: Level::L2, ..HostConfig::default() })
            .expect("valid config");
        let slot = machine.ram_slot(AsId(0), SlotId(3), Gfn(0x200), SLOT_PAGES, SlotFlags::empty());
        machine.mmu().write().insert_memslot(slot).expect("slot");
        let marks = Recorder(Arc::default(), dropped);
        let vcpus = (0..2)
            .map(|_| {
                let mut v = machine.new_vcpu(AsId(0));
                v.set_dirty_sink(Box::new(marks.clone()));
                v
            })
            .collect();
        Vm { machine, vcpus, marks, slot }
    }

    fn access(&mut self, vcpu: usize, offset: u64, kind: AccessKind) {
        let gpa = Gfn(self.slot.base_gfn.0 + offset).gpa();
        self.vcpus[vcpu].access(self.machine.mmu(), gpa, kind).expect("access succeeds");
    }

    fn set_logging(&self, on: bool) {
        let flags = if on { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
        let mmu = self.machine.mmu();
        mmu.write().set_memslot_flags(AsId(0), self.slot.id, flags).expect("slot exists").run(mmu.host());
    }

    /// Harvests the marks (as a ring or bitmap consumer would, after draining every vCPU's PML) and
    /// re-protects them, with the flush.
    fn harvest(&mut self) -> BTreeSet<u64> {
        for v in &mut self.vcpus {
            v.flush_pml(self.machine.mmu());
        }
        let marks: BTreeSet<u64> = self.marks.take().into_iter().map(|(_, off)| off).collect();
        let mmu = self.machine.mmu();
        let mut w = mmu.write();
        for &off in &marks {
            w.reprotect_dirty(AsId(0), self.slot.id, off & !63, 1 << (off & 63)).run(mmu.host());
        }
        marks
    }

    fn check(&self) {
        let mmu = self.machine.mmu();
        let caches: Vec<_> = self.vcpus.iter().flat_map(|v| v.cache().pages().to_vec()).collect();
        check_tables(mmu, &caches).expect("I2");
        let root = self.vcpus[0].root().expect("root");
        check_translations(mmu, root, &[self.slot]).expect("I1");
        let tlbs: Vec<_> = self.vcpus.iter().map(|v| v.tlb()).collect();
        check_tlbs(mmu, &tlbs).expect("I3");
    }

    fn leaves(&self) -> [u64; 3] {
        self.machine.mmu().stats().leaves
    }
}

const WRITE_PROTECT_CONFIGS: [MmuConfig; 3] =
    [MmuConfig::EPT, MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT }, MmuConfig::NPT];

#[test]
fn i4_writes_in_a_logged_slot_are_marked_once_per_harvest() {
    for config in WRITE_PROTECT_CONFIGS {
        let mut vm = Vm::new(config);
        vm.set_logging(true);
        vm.access(0, 5, AccessKind::Read);
        assert!(vm.marks.take().is_empty(), "a read marks nothing");
        vm.access(0, 5, AccessKind::Write);
        vm.access(1, 5, AccessKind::Write);
        vm.access(0, 9, AccessKind::Write);
        assert_eq!(vm.harvest(), BTreeSet::from([5, 9]));
        vm.check();
        // Re-protected: the next writes are marked again, the pages read are not.
        vm.access(1, 9, AccessKind::Write);
        vm.access(0, 5, AccessKind::Read);
        assert_eq!(vm.harvest(), BTreeSet::from([9]), "{config:?}");
        assert!(vm.vcpus[0].mmu_state().counters.fixed + vm.vcpus[1].mmu_state().counters.fixed >= 4);
        vm.check();
    }
}

#[test]
fn starting_logging_write_protects_and_splits_huge_pages_on_demand() {
    for config in WRITE_PROTECT_CONFIGS {
        let mut vm = Vm::new(config);
        vm.access(0, 0x1ff, AccessKind::Write);
        assert_eq!(vm.leaves(), [0, 1, 0], "a 2 MiB leaf before logging");
        vm.set_logging(true);
        assert!(vm.marks.take().is_empty());
        vm.check();
        vm.access(1, 0x1ff, AccessKind::Write);
        assert_eq!(vm.leaves(), [512, 0, 0], "the write split the huge leaf");
        assert_eq!(vm.harvest(), BTreeSet::from([0x1ff]));
        vm.check();
        // Stopping logging replaces the table with a 2 MiB leaf in place (KVM 6.13), without a fault.
        vm.set_logging(false);
        assert_eq!(vm.leaves(), [0, 1, 0], "{config:?}: huge mappings come back");
        vm.check();
        vm.access(0, 0x1ff, AccessKind::Write);
        assert_eq!(vm.leaves(), [0, 1, 0], "{config:?}: the write keeps the huge leaf");
        assert!(vm.marks.take().is_empty(), "no marks once logging is off");
        vm.check();
    }
}

#[test]
fn eager_splitting_maps_a_logged_slot_at_4k_without_faults() {
    for config in WRITE_PROTECT_CONFIGS {
        let mut vm = Vm::new(config);
        for off in (0..SLOT_PAGES).step_by(512) {
            vm.access(0, off, AccessKind::Write);
        }
        let huge = vm.leaves()[1];
        assert_eq!(huge, 4, "four whole 2 MiB pages");
        vm.set_logging(true);
        let mmu = Arc::clone(vm.machine.mmu());
        let mut cache = PageCache::new();
        mmu.write().split_huge_pages(AsId(0), vm.slot.id, &mut cache).expect("pages for the split");
        cache.release(mmu.host());
        let leaves = vm.leaves();
        assert_eq!(leaves[1], 0, "no huge leaf left");
        assert!(leaves[0] >= huge * 512);
        vm.check();
        let splits_before = mmu.stats().huge_splits;
        vm.access(1, 700, AccessKind::Write);
        assert_eq!(mmu.stats().huge_splits, splits_before, "the write needed no split");
        assert_eq!(vm.harvest(), BTreeSet::from([700]));
        vm.check();
    }
}

/// Random reads and writes on two vCPUs across 20 harvests, logging started over existing huge and
/// small mappings, an eager split halfway. Returns the first round whose harvest missed a written page.
fn random_run(config: MmuConfig, dropped: Option<DirtySource>) -> Result<(), String> {
    let mut vm = Vm::dropping(config, dropped);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..200 {
        let off = next() % SLOT_PAGES;
        vm.access((next() % 2) as usize, off, AccessKind::Write);
    }
    vm.set_logging(true);
    vm.harvest();
    for round in 0..20 {
        let mut written = BTreeSet::new();
        for _ in 0..300 {
            let off = next() % SLOT_PAGES;
            let kind = if next() % 3 == 0 { AccessKind::Read } else { AccessKind::Write };
            vm.access((next() % 2) as usize, off, kind);
            if kind == AccessKind::Write {
                written.insert(off);
            }
        }
        if round == 10 {
            // Splitting eagerly mid-run changes nothing about what is reported.
            let mmu = Arc::clone(vm.machine.mmu());
            let mut cache = PageCache::new();
            mmu.write().split_huge_pages(AsId(0), vm.slot.id, &mut cache).expect("pages");
            cache.release(mmu.host());
        }
        let reported = vm.harvest();
        let missing: Vec<_> = written.difference(&reported).collect();
        if !missing.is_empty() {
            return Err(format!("round {round}: written but not reported: {missing:?}"));
        }
        assert!(reported.is_subset(&written), "{config:?}: reported pages nobody wrote this round");
        vm.check();
    }
    Ok(())
}

#[test]
fn i4_random_writes_are_all_reported_by_the_next_harvest() {
    for config in WRITE_PROTECT_CONFIGS.into_iter().chain([MmuConfig::EPT_PML]) {
        if let Err(e) = random_run(config, None) {
            panic!("{config:?}: {e}");
        }
    }
}

/// Each path that marks pages is needed: losing the marks of any one of them loses writes, and the
/// harvest check sees it. (Write protection marks through faults and the fast path; PML through faults
/// and the hardware log.)
#[test]
fn i4_dropping_the_marks_of_any_one_path_is_caught() {
    let cases = [
        (MmuConfig::EPT, DirtySource::Fault),
        (MmuConfig::EPT, DirtySource::FastPath),
        (MmuConfig::NPT, DirtySource::FastPath),
        (MmuConfig::EPT_PML, DirtySource::Fault),
        (MmuConfig::EPT_PML, DirtySource::HardwareLog),
    ];
    for (config, dropped) in cases {
        let result = random_run(config, Some(dropped));
        assert!(result.is_err(), "{config:?} without {dropped:?} marks still reported every write");
    }
}

#[test]
fn pml_configs_need_accessed_dirty_bits() {
    let bad = MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT_PML };
    assert!(Machine::new(bad, HostConfig::default()).is_err());
}

/// The MMU as a dirty-ring reset target: harvested pages are re-protected (their next write is marked
/// again), and entries a hostile consumer pointed outside their slot are counted, never re-protected.
#[test]
fn i4_i5_ring_reset_through_the_mmu_reprotects_harvested_pages_only() {
    use tdp_core::addr::RingSlot;
    use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
    for config in WRITE_PROTECT_CONFIGS.into_iter().chain([MmuConfig::EPT_PML]) {
        let mut vm = Vm::new(config);
        vm.set_logging(true);
        for off in [3, 4, 700] {
            vm.access(0, off, AccessKind::Write);
        }
        for v in &mut vm.vcpus {
            v.flush_pml(vm.machine.mmu());
        }
        let cfg = RingConfig::new(256, 0).expect("valid size");
        let ring: Vec<DirtyGfn> = (0..256).map(|_| DirtyGfn::default()).collect();
        let mut producer = DirtyRingProducer::new(&ring, cfg).expect("ring");
        let slot = RingSlot::new(AsId(0), vm.slot.id);
        for (_, off) in vm.marks.take() {
            let _ = producer.push(slot, off).expect("room");
        }
        let _ = producer.push(slot, SLOT_PAGES + 5).expect("room"); // outside the slot
        let _ = producer.push(RingSlot::new(AsId(1), SlotId(9)), 0).expect("room"); // no such slot
        let mut harvested = Vec::new();
        DirtyRingConsumer::new(&ring, cfg).expect("ring").harvest(usize::MAX, |e| harvested.push(e.offset));
        assert_eq!(harvested.len(), 5);
        let mmu = Arc::clone(vm.machine.mmu());
        let (stats, flush) = mmu.write().reset_dirty_ring(&mut producer);
        flush.run(mmu.host());
        assert_eq!((stats.reset, stats.invalid), (5, 2), "{config:?}");
        assert!(producer.is_empty());
        vm.check();
        // Re-protected: writing the harvested pages again marks them again.
        for off in [3, 700] {
            vm.access(1, off, AccessKind::Write);
        }
        assert_eq!(vm.harvest(), BTreeSet::from([3, 700]), "{config:?}");
    }
}
