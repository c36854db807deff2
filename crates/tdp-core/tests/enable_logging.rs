//! The enable-logging pass (`set_memslot_flags(.., LOG_DIRTY)`) against a reference, entry by entry.
//!
//! The slot's tree mixes every case the pass tells apart: a first and a last 2 MiB only partly inside
//! the slot, more level-2 entries than one run of the pass ([`RUN`]), huge leaves between tables of
//! 4 KiB leaves, empty level-2 entries, holes inside leaf tables, leaves already protected, and leaves
//! hardware could still update (A clear, or W set with D clear: set here behind the MMU's back, as
//! aging or a clean would leave them). Every translation is read before and after the pass: 4 KiB leaves
//! must lose W (or, with PML, D and nothing else), huge leaves W, nothing else may change, one event
//! per changed SPTE, and the I1-I3 checkers must pass. Run with and without yields in the pass.

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::host::{TableMemory, TlbFlush};
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::{MmuConfig, PageCache};
use tdp_core::spte::{EptBits, Spte, SpteFormat};
use tdp_core::sync::{AtomicU64, Ordering};
use tdp_mock::{HostConfig, Machine, MockHost};

/// The pass's run length (level-2 entries handled between yield checks); the slot spans more.
const RUN: u64 = 64;
/// From gfn 3 (so the first 2 MiB is partly outside), 70 full 2 MiB regions and a ragged end.
const BASE: u64 = 3;
const PAGES: u64 = (RUN + 6) * 512 + 100;
const W: u64 = EptBits::WRITE.bits();

const CONFIGS: [MmuConfig; 4] = [
    MmuConfig::EPT,
    MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT },
    MmuConfig::NPT,
    MmuConfig::EPT_PML,
];

/// The level-1 entry mapping `gfn` (which must be mapped by a 4 KiB leaf) in the tree at `root`.
fn leaf_entry<'h>(host: &'h MockHost, fmt: &SpteFormat, root: Pfn, gfn: u64) -> &'h AtomicU64 {
    let mut table = host.table(root);
    let mut level = Level::L4;
    loop {
        let entry = &table[Gfn(gfn).index_at(level).get()];
        let spte = Spte(entry.load(Ordering::Acquire));
        match (fmt.child_table(spte, level), level.lower()) {
            (Some(child), Some(lower)) => {
                table = host.table(child);
                level = lower;
            }
            _ => {
                assert_eq!(level, Level::L1, "gfn {gfn:#x} is mapped by a 4 KiB leaf");
                return entry;
            }
        }
    }
}

fn run(config: MmuConfig, yield_every: Option<u64>) {
    let host = HostConfig { host_level: Level::L2, yield_every, ..HostConfig::default() };
    let m = Machine::new(config, host).expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(1), Gfn(BASE), PAGES, SlotFlags::empty());
    let mmu = m.mmu();
    mmu.write().insert_memslot(slot).expect("slot");
    let mut vcpu = m.new_vcpu(AsId(0));
    let end = BASE + PAGES;
    let touch = |vcpu: &mut tdp_mock::Vcpu, gfn: u64| {
        vcpu.access(mmu, Gfn(gfn).gpa(), AccessKind::Write).expect("access succeeds");
    };
    // Map everything (huge where the slot allows), then split it all to 4 KiB tables.
    for gfn in (BASE..end).step_by(256) {
        touch(&mut vcpu, gfn);
    }
    touch(&mut vcpu, end - 1);
    let mut cache = PageCache::new();
    mmu.write().split_huge_pages(AsId(0), SlotId(1), &mut cache).expect("pages for the split");
    cache.release(mmu.host());
    // Every fifth 2 MiB region becomes a huge leaf again, every seventh empty; some holes in tables.
    for region in 1..RUN + 6 {
        let start = region * 512;
        let mut w = mmu.write();
        if region % 5 == 0 || region % 7 == 0 {
            w.zap_gfn_range(AsId(0), Gfn(start), Gfn(start + 512)).run(mmu.host());
        } else if region % 3 == 0 {
            w.zap_gfn_range(AsId(0), Gfn(start + 17), Gfn(start + 18)).run(mmu.host());
            w.zap_gfn_range(AsId(0), Gfn(start + 300), Gfn(start + 330)).run(mmu.host());
        }
        drop(w);
        if region % 5 == 0 {
            touch(&mut vcpu, start + 5);
        }
    }
    // Entries hardware could update, and entries already protected, behind the MMU's back (nothing
    // runs: no TLB can hold them writable once W is cleared, and A/D are only hints).
    let fmt = *mmu.format();
    let root = vcpu.root().expect("root").pfn();
    for (gfn, clear) in [
        (BASE, W),
        (512 + 1, fmt.accessed_mask()),
        (2 * 512 + 2, fmt.dirty_mask()),
        (4 * 512 + 8, W),
        (4 * 512 + 9, fmt.accessed_mask() | fmt.dirty_mask()),
        (8 * 512 + 511, fmt.dirty_mask()),
        (end - 1, fmt.accessed_mask()),
    ] {
        leaf_entry(mmu.host(), &fmt, root, gfn).fetch_and(!clear, Ordering::Relaxed);
    }
    mmu.host().flush_all();

    let rootref = vcpu.root().expect("root");
    let before: Vec<_> = (BASE..end).map(|gfn| mmu.lookup(rootref, Gfn(gfn))).collect();
    assert!(before.iter().any(|l| matches!(l, Some((_, Level::L2)))), "some huge leaves");
    assert!(before.iter().any(Option::is_none), "some holes");
    let events = mmu.host().events();
    mmu.write().set_memslot_flags(AsId(0), SlotId(1), SlotFlags::LOG_DIRTY).expect("slot").run(mmu.host());

    let mut changed = 0;
    for (gfn, old) in (BASE..end).zip(before) {
        let expected = old.map(|(spte, level)| {
            let clear = if level == Level::L1 && config.pml { fmt.dirty_mask() } else { W };
            (Spte(spte.0 & !clear), level)
        });
        // One event per SPTE: a huge leaf counts at its first gfn.
        if let (Some((o, level)), Some((n, _))) = (old, expected)
            && o != n
            && (level == Level::L1 || Gfn(gfn).is_aligned(level))
        {
            changed += 1;
        }
        assert_eq!(mmu.lookup(rootref, Gfn(gfn)), expected, "{config:?}: gfn {gfn:#x}");
    }
    assert!(changed > 20_000, "the pass had work: {changed}");
    assert_eq!(mmu.host().events() - events, changed, "{config:?}: one event per changed SPTE");
    m.check_all(&[&vcpu], &[slot]).expect("I1-I3 after the pass");
    if yield_every.is_some() {
        assert!(mmu.host().yields() > 0, "the pass yielded");
    }
    vcpu.release(mmu);
}

#[test]
fn enabling_logging_changes_exactly_what_kvm_changes() {
    for config in CONFIGS {
        run(config, None);
    }
}

#[test]
fn enabling_logging_with_yields_changes_exactly_what_kvm_changes() {
    for config in CONFIGS {
        run(config, Some(3));
    }
}
