//! Model-based property tests: random sequences of memslot changes, faults (read / write / exec, at
//! 4 KiB, 2 MiB and 1 GiB), range zaps, zap-all and root invalidations on three vCPUs in two address
//! spaces, for EPT (with and without A/D bits) and NPT. After every step the mock's checkers verify I1
//! (against the test's own reference slots), I2 (tables, stats, leaks) and I3 (every vCPU's TLB against
//! the tables), and every access's result is compared with the reference model.

use proptest::prelude::*;
use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, MmuConfig};
use tdp_core::spte::SpteFormat;
use tdp_mock::{AccessResult, HostConfig, Machine, Vcpu, check_tables, check_tlbs, check_translations};

/// The guest-physical space the model uses: 2 GiB, so 1 GiB leaves are reachable.
const GFN_SPACE: u64 = 1 << 19;
const SLOT_IDS: u16 = 4;

#[derive(Clone, Debug)]
enum Op {
    Insert { as_id: u16, id: u16, base: u64, pages: u64, readonly: bool, host_shift: u64 },
    Delete { as_id: u16, id: u16 },
    Access { vcpu: usize, gfn: u64, kind: AccessKind },
    Zap { as_id: u16, start: u64, len: u64 },
    Invalidate { as_id: Option<u16> },
    ZapInvalidated,
    ZapAll,
}

fn access_kind() -> impl Strategy<Value = AccessKind> {
    prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Exec)]
}

/// Slot sizes that make every page size reachable: odd small slots, whole 2 MiB pages, a whole GiB.
fn slot_shape() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        4 => (0..GFN_SPACE / 512, 1..1500u64).prop_map(|(b, p)| (b * 512 + (p % 3), p)),
        3 => (0..GFN_SPACE / 512 - 8, 1..8u64).prop_map(|(b, n)| (b * 512, n * 512)),
        1 => Just((0, 1 << 18)),
        1 => Just((1 << 18, 1 << 18)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2u16, 0..SLOT_IDS, slot_shape(), any::<bool>(), prop_oneof![9 => Just(0u64), 1 => Just(1u64)])
            .prop_map(|(as_id, id, (base, pages), readonly, host_shift)| Op::Insert {
                as_id, id, base, pages, readonly, host_shift,
            }),
        1 => (0..2u16, 0..SLOT_IDS).prop_map(|(as_id, id)| Op::Delete { as_id, id }),
        12 => (0..3usize, 0..GFN_SPACE, access_kind()).prop_map(|(vcpu, gfn, kind)| Op::Access { vcpu, gfn, kind }),
        2 => (0..2u16, 0..GFN_SPACE, 1..4096u64).prop_map(|(as_id, start, len)| Op::Zap { as_id, start, len }),
        1 => prop::option::of(0..2u16).prop_map(|as_id| Op::Invalidate { as_id }),
        1 => Just(Op::ZapInvalidated),
        1 => Just(Op::ZapAll),
    ]
}

/// The test's own memslot list: what the guest should see, kept apart from the core's `MemslotSet`.
#[derive(Default)]
struct Reference {
    slots: Vec<Memslot>,
}

impl Reference {
    fn find(&self, as_id: AsId, gfn: Gfn) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.as_id == as_id && s.contains(gfn))
    }
    fn in_as(&self, as_id: AsId) -> Vec<Memslot> {
        self.slots.iter().filter(|s| s.as_id == as_id).copied().collect()
    }
}

struct World {
    machine: Machine,
    vcpus: Vec<Vcpu>,
    reference: Reference,
}

impl World {
    fn new(config: MmuConfig, host_level: Level) -> Self {
        let host = HostConfig { host_level, table_capacity: 8192, ..HostConfig::default() };
        let machine = Machine::new(config, host).expect("valid MMU config");
        let vcpus = vec![machine.new_vcpu(AsId(0)), machine.new_vcpu(AsId(0)), machine.new_vcpu(AsId(1))];
        World { machine, vcpus, reference: Reference::default() }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mmu = self.machine.mmu();
        let host = self.machine.host();
        match *op {
            Op::Insert { as_id, id, base, pages, readonly, host_shift } => {
                let flags = if readonly { SlotFlags::READONLY } else { SlotFlags::empty() };
                let host_base = host.guest_ram_base() + (base + host_shift) * 4096;
                let slot = Memslot::new(AsId(as_id), SlotId(id), Gfn(base), pages, host_base, flags);
                let clash = self.reference.slots.iter().any(|s| {
                    s.as_id == slot.as_id
                        && (s.id == slot.id || (s.base_gfn < slot.end_gfn() && slot.base_gfn < s.end_gfn()))
                });
                let result = mmu.write().insert_memslot(slot);
                prop_assert_eq!(result.is_ok(), !clash, "insert {:?}: {:?}", slot, result);
                if result.is_ok() {
                    self.reference.slots.push(slot);
                }
            }
            Op::Delete { as_id, id } => {
                let at =
                    self.reference.slots.iter().position(|s| s.as_id == AsId(as_id) && s.id == SlotId(id));
                let result = mmu.write().delete_memslot(AsId(as_id), SlotId(id));
                prop_assert_eq!(result.is_ok(), at.is_some());
                if let (Ok(flush), Some(at)) = (result, at) {
                    flush.run(mmu.host());
                    self.reference.slots.remove(at);
                }
            }
            Op::Access { vcpu, gfn, kind } => {
                let v = &mut self.vcpus[vcpu];
                let as_id = v.as_id();
                let result = v.access(mmu, Gpa(gfn << 12), kind);
                let expected = self.reference.find(as_id, Gfn(gfn));
                match (expected, result) {
                    (Some(slot), Ok(AccessResult::Emulated(EmulateReason::ReadOnlySlot))) => {
                        prop_assert!(!slot.is_writable() && kind == AccessKind::Write);
                    }
                    (Some(slot), Ok(AccessResult::Done { pfn, .. })) => {
                        prop_assert!(
                            slot.is_writable() || kind != AccessKind::Write,
                            "wrote a read-only slot"
                        );
                        prop_assert_eq!(
                            pfn.0,
                            slot.host_addr(Gfn(gfn)) >> 12,
                            "wrong frame for gfn {:#x}",
                            gfn
                        );
                    }
                    (None, Ok(AccessResult::Emulated(EmulateReason::Mmio))) => {}
                    (expected, got) => {
                        prop_assert!(false, "gfn {gfn:#x} {kind:?}: slot {expected:?}, got {got:?}")
                    }
                }
            }
            Op::Zap { as_id, start, len } => {
                mmu.write().zap_gfn_range(AsId(as_id), Gfn(start), Gfn(start + len)).run(mmu.host());
            }
            Op::Invalidate { as_id } => mmu.write().invalidate_roots(as_id.map(AsId)).run(mmu.host()),
            Op::ZapInvalidated => mmu.read().zap_invalidated_roots(),
            Op::ZapAll => mmu.write().zap_all(),
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let mmu = self.machine.mmu();
        let cache_pages: Vec<_> = self.vcpus.iter().flat_map(|v| v.cache().pages().to_vec()).collect();
        if let Err(v) = check_tables(mmu, &cache_pages) {
            return Err(TestCaseError::fail(format!("I2: {v:?}")));
        }
        for vcpu in &self.vcpus {
            if let Some(root) = vcpu.root()
                && mmu.root_is_valid(root)
                && let Err(v) = check_translations(mmu, root, &self.reference.in_as(vcpu.as_id()))
            {
                return Err(TestCaseError::fail(format!("I1: {v:?}")));
            }
        }
        let tlbs: Vec<_> = self.vcpus.iter().map(|v| v.tlb()).collect();
        if let Err(v) = check_tlbs(mmu, &tlbs) {
            return Err(TestCaseError::fail(format!("I3: {v:?}")));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), TestCaseError> {
        let mmu = self.machine.mmu().clone();
        for v in &mut self.vcpus {
            v.release(&mmu);
        }
        mmu.write().invalidate_roots(None).run(mmu.host());
        mmu.read().zap_invalidated_roots();
        check_tables(&mmu, &[]).map_err(|v| TestCaseError::fail(format!("I2 at teardown: {v:?}")))?;
        prop_assert!(mmu.roots().is_empty(), "roots left after every vCPU put its root: {:?}", mmu.roots());
        Ok(())
    }
}

fn run(config: MmuConfig, host_level: Level, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World::new(config, host_level);
    for (i, op) in ops.iter().enumerate() {
        world.apply(op).map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
        world.check().map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {e}")))?;
    }
    world.finish()
}

fn host_level() -> impl Strategy<Value = Level> {
    prop_oneof![Just(Level::L1), Just(Level::L2), Just(Level::L3), Just(Level::L3)]
}

proptest! {
    #![proptest_config(ProptestConfig { max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn i1_i2_i3_hold_for_ept_with_ad(level in host_level(), ops in prop::collection::vec(op(), 1..40)) {
        run(MmuConfig::EPT, level, &ops)?;
    }

    #[test]
    fn i1_i2_i3_hold_for_ept_without_ad(level in host_level(), ops in prop::collection::vec(op(), 1..40)) {
        run(MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT }, level, &ops)?;
    }

    #[test]
    fn i1_i2_i3_hold_for_npt(level in host_level(), ops in prop::collection::vec(op(), 1..40)) {
        run(MmuConfig::NPT, level, &ops)?;
    }

    #[test]
    fn i1_i2_i3_hold_with_five_level_tables(ops in prop::collection::vec(op(), 1..30)) {
        run(MmuConfig { root_level: Level::L5, ..MmuConfig::EPT }, Level::L3, &ops)?;
    }
}

/// The harness above must fail when the MMU's promises are broken; these two runs break one each.
mod broken_variants {
    use super::*;
    use tdp_core::iter::TdpIter;

    fn rw_slot(readonly: bool) -> Op {
        Op::Insert { as_id: 0, id: 0, base: 0, pages: 512, readonly, host_shift: 0 }
    }

    #[test]
    fn i3_a_missing_flush_is_caught() {
        let ops = [
            rw_slot(false),
            Op::Access { vcpu: 0, gfn: 5, kind: AccessKind::Write },
            Op::Zap { as_id: 0, start: 0, len: 512 },
        ];
        // Sound: the zap's flush reaches the TLBs.
        run(MmuConfig::EPT, Level::L2, &ops).expect("the sound MMU passes");
        // Broken: the host loses every flush the core asks for; vCPU 0 keeps the zapped translation.
        let mut world = World::new(MmuConfig::EPT, Level::L2);
        world.machine.host().set_drop_flushes(true);
        let mut failure = None;
        for op in &ops {
            world.apply(op).expect("the ops themselves succeed");
            if let Err(e) = world.check() {
                failure = Some(e.to_string());
                break;
            }
        }
        let failure = failure.expect("a dropped flush must be reported");
        assert!(failure.contains("I3"), "{failure}");
    }

    #[test]
    fn i1_a_permission_above_the_slot_is_caught() {
        let mut world = World::new(MmuConfig::NPT, Level::L2);
        world.apply(&rw_slot(true)).expect("insert");
        world.apply(&Op::Access { vcpu: 0, gfn: 5, kind: AccessKind::Read }).expect("read");
        world.check().expect("the sound MMU passes");
        // Break it: make the read-only slot's leaf writable, as a fault handler that ignored the slot's
        // flags would (W with both software bits, so the SPTE itself is well-formed and only I1 is broken).
        let mmu = world.machine.mmu();
        let root = world.vcpus[0].root().expect("vCPU 0 has a root");
        let fmt = *mmu.format();
        let mut it = TdpIter::new(mmu.host(), &fmt, root.pfn(), Level::L4, Level::L1, Gfn(5), Gfn(6));
        while it.valid() && !(it.old_spte.is_present() && it.old_spte.is_leaf(it.level())) {
            it.next();
        }
        assert!(it.valid(), "the read mapped gfn 5");
        let writable = tdp_core::spte::NptBits::WRITE.bits()
            | tdp_core::spte::NPT_HOST_WRITABLE
            | tdp_core::spte::NPT_MMU_WRITABLE;
        it.entry().fetch_or(writable, std::sync::atomic::Ordering::SeqCst);
        drop(it);
        let failure = world.check().expect_err("a writable leaf in a read-only slot must be reported");
        assert!(failure.to_string().contains("I1"), "{failure}");
    }
}
