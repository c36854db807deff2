//! The memslot id limit set through [`MmuConfig::slot_limit`]: the constants carry KVM's
//! (`KVM_USER_MEM_SLOTS`, 32764 on x86), the builders change only the field they name, and an MMU built
//! with a limit accepts the highest id below it in every address space (a vCPU writes through it) and
//! refuses the id at the limit with `SlotError::IdOutOfRange`, the memslots unchanged.
//!
//! Checks: I5 (an out-of-range memslot id is refused with its value, nothing changed).

use core::num::NonZeroU16;

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{KVM_USER_MEM_SLOTS, SlotError, SlotFlags};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::SpteFormat;
use tdp_mock::{AccessResult, HostConfig, Machine};

#[test]
fn the_constants_use_kvms_limit_and_the_builders_change_one_field() {
    for cfg in [MmuConfig::EPT, MmuConfig::EPT_PML, MmuConfig::NPT] {
        assert_eq!(cfg.slot_limit, KVM_USER_MEM_SLOTS);
    }
    let eight = NonZeroU16::new(8).expect("not zero");
    let cfg = MmuConfig::EPT.with_slot_limit(eight);
    assert_eq!(cfg, MmuConfig { slot_limit: eight, ..MmuConfig::EPT });
    assert_eq!(cfg.with_pml(true), MmuConfig { slot_limit: eight, ..MmuConfig::EPT_PML });
    assert_eq!(MmuConfig::EPT.with_format(SpteFormat::NPT), MmuConfig::NPT);
    assert_eq!(MmuConfig::EPT.with_root_level(Level::L5).root_level, Level::L5);
    assert_eq!(MmuConfig::EPT.with_root_level(Level::L5).with_root_level(Level::L4), MmuConfig::EPT);
}

#[test]
fn an_mmu_refuses_ids_at_its_configured_limit_in_every_address_space() {
    let limits =
        [NonZeroU16::MIN, NonZeroU16::new(509).expect("not zero"), KVM_USER_MEM_SLOTS, NonZeroU16::MAX];
    for base in [MmuConfig::EPT, MmuConfig::EPT_PML, MmuConfig::NPT] {
        for limit in limits {
            let cfg = base.with_slot_limit(limit);
            let m = Machine::new(cfg, HostConfig::default()).expect("valid config");
            assert_eq!(m.mmu().read().memslots().slot_limit(), limit);
            let top = SlotId(limit.get() - 1);
            for (i, as_id) in [AsId(0), AsId(1)].into_iter().enumerate() {
                let base_gfn = Gfn(0x100 * i as u64);
                let slot = m.ram_slot(as_id, top, base_gfn, 16, SlotFlags::empty());
                m.mmu().write().insert_memslot(slot).unwrap_or_else(|e| panic!("{limit} {as_id:?}: {e}"));
                if limit != NonZeroU16::MAX {
                    let generation = m.mmu().read().memslots().generation();
                    let above = m.ram_slot(as_id, SlotId(limit.get()), Gfn(0x1000), 16, SlotFlags::empty());
                    let err = m.mmu().write().insert_memslot(above).unwrap_err();
                    assert_eq!(
                        err,
                        SlotError::IdOutOfRange { as_id, id: SlotId(limit.get()), limit },
                        "{limit}"
                    );
                    assert_eq!(m.mmu().read().memslots().generation(), generation, "nothing changed");
                    assert!(m.mmu().read().memslots().get(as_id, SlotId(limit.get())).is_none());
                }
            }
            // The highest id works: a vCPU writes through it.
            let mut vcpu = m.new_vcpu(AsId(0));
            let done = vcpu.access(m.mmu(), Gpa(0x3008), AccessKind::Write).expect("the access completes");
            assert!(matches!(done, AccessResult::Done { .. }), "{limit}: {done:?}");
        }
    }
}
