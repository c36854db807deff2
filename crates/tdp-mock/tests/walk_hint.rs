//! The fault's walk hint (the level-1 table of a vCPU's last full walk, `mmu/walk.rs`) is never used once
//! its table is removed: after a teardown under the write lock (`zap_all`) and after removals under the
//! read lock (NX recovery, huge pages recovered in place), the next fault in the same 2 MiB range maps
//! the right frame, and every checker (I1-I3) passes. The mock host panics on a read of a freed table
//! page, and a reused one would take the leaf out of the tree: checked by hand, leaving out the count of
//! removals (`free_removed_table` without its add) fails each test.
//!
//! Every test faults twice in one 2 MiB range first: the first fault links the table, the second walks
//! to it in full and takes the hint, which the third fault, after the removal, would use if it were
//! stale.

use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::Memslot;
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::SpteFormat;
use tdp_mock::{AccessResult, HostConfig, Machine, Vcpu};

const CONFIGS: [(&str, MmuConfig); 3] = [
    ("ept", MmuConfig::EPT),
    ("ept-no-ad", MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT }),
    ("npt", MmuConfig::NPT),
];

/// A machine with one 8 MiB slot (frames from the host's RAM), host pages of `host_level`, one vCPU.
fn machine(cfg: MmuConfig, host_level: Level, flags: SlotFlags) -> (Machine, Memslot, Vcpu) {
    let m = Machine::new(cfg, HostConfig { host_level, ..HostConfig::default() }).expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 4 * 512, flags);
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    let vcpu = m.new_vcpu(AsId(0));
    (m, slot, vcpu)
}

/// Every checker, against the slot as it is now.
fn check(m: &Machine, vcpu: &Vcpu, slot: Memslot, step: &str) {
    if let Err(violations) = m.check_all(&[vcpu], &[slot]) {
        let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
        panic!("{step}:\n  {}", list.join("\n  "));
    }
}

/// Accesses `gfn`; panics unless the access completes.
fn access(m: &Machine, vcpu: &mut Vcpu, gfn: u64, kind: AccessKind) {
    match vcpu.access(m.mmu(), Gpa(gfn * 4096), kind) {
        Ok(AccessResult::Done { .. }) => {}
        other => panic!("{kind:?} of gfn {gfn:#x} gave {other:?}"),
    }
}

/// The frame and level mapping `gfn` in the vCPU's tree, and the frame the slot says it should be.
fn mapped(m: &Machine, vcpu: &Vcpu, gfn: u64) -> Option<(u64, Level)> {
    let (spte, level) = m.mmu().lookup(vcpu.root().expect("a root"), Gfn(gfn))?;
    let base = spte.pfn().0;
    Some((base + (gfn & (level.pages() - 1)), level))
}

/// Faults 0x212 and 0x213 (the hint), runs `remove` (which leaves the slot as `after` and 0x214
/// unmapped), faults 0x214 and checks it and everything else.
fn hint_then(name: &str, m: &Machine, vcpu: &mut Vcpu, after: Memslot, remove: impl FnOnce(&Machine)) {
    access(m, vcpu, 0x212, AccessKind::Write);
    access(m, vcpu, 0x213, AccessKind::Write);
    let tables_before = m.mmu().stats().tables;
    remove(m);
    assert!(m.mmu().stats().tables < tables_before, "{name}: the removal removed tables");
    check(m, vcpu, after, &format!("{name}: after the removal"));
    access(m, vcpu, 0x214, AccessKind::Write);
    let expected = after.host_addr(Gfn(0x214)) >> PAGE_SHIFT;
    let (frame, _) = mapped(m, vcpu, 0x214).unwrap_or_else(|| panic!("{name}: 0x214 is mapped"));
    assert_eq!(frame, expected, "{name}: the fault after the removal maps the slot's frame");
    check(m, vcpu, after, &format!("{name}: after the fault"));
}

#[test]
fn a_hint_into_a_tree_torn_down_under_the_write_lock_is_not_used() {
    for (name, cfg) in CONFIGS {
        let (m, slot, mut vcpu) = machine(cfg, Level::L1, SlotFlags::empty());
        hint_then(name, &m, &mut vcpu, slot, |m| m.mmu().write().zap_all());
        vcpu.release(m.mmu());
    }
}

#[test]
fn a_hint_into_a_table_removed_by_nx_recovery_is_not_used() {
    for (name, cfg) in [("ept", MmuConfig::EPT), ("npt", MmuConfig::NPT)] {
        let (m, slot, mut vcpu) = machine(cfg, Level::L2, SlotFlags::empty());
        m.mmu().write().set_nx_huge_pages(true).run(m.host());
        // A fetch splits the range at 4 KiB and tracks its table; the writes below stay at 4 KiB in it.
        access(&m, &mut vcpu, 0x210, AccessKind::Exec);
        hint_then(name, &m, &mut vcpu, slot, |m| {
            assert_eq!(m.mmu().read().recover_nx_huge_pages(1).zapped, 1, "{name}: one table recovered");
        });
        assert_eq!(mapped(&m, &vcpu, 0x214).map(|(_, l)| l), Some(Level::L2), "{name}: huge again");
        vcpu.release(m.mmu());
    }
}

#[test]
fn a_hint_into_a_table_recovered_in_place_is_not_used() {
    for (name, cfg) in CONFIGS {
        // Logging keeps the faults at 4 KiB; stopping it recovers the huge leaf in place.
        let (m, slot, mut vcpu) = machine(cfg, Level::L2, SlotFlags::LOG_DIRTY);
        for gfn in (0x200..0x400).filter(|g| !(0x212..=0x213).contains(g)) {
            access(&m, &mut vcpu, gfn, AccessKind::Write);
        }
        let unlogged = Memslot { flags: SlotFlags::empty(), ..slot };
        hint_then(name, &m, &mut vcpu, unlogged, |m| {
            // Stopping logging recovers the 2 MiB leaf in place (under the read lock): the test's two
            // faults completed the table. Then the huge leaf is zapped (tables stay), so that the next
            // access faults in the range.
            let flush = m.mmu().write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::empty());
            flush.expect("the slot exists").run(m.host());
            assert_eq!(m.mmu().stats().leaves[1], 1, "{name}: recovered in place");
            m.mmu().write().zap_gfn_range(AsId(0), Gfn(0x200), Gfn(0x400)).run(m.host());
        });
        vcpu.release(m.mmu());
    }
}
