//! Mirror roots (KVM's, for TDX) on the mock machine with external tables, on EPT and NPT: private
//! memslots are mapped only through the mirror root and every change reaches the host's external
//! tables in an order a real external tree accepts; the copy equals the mirror after every operation
//! (faults, a busy or refusing host, slot deletion, MMU-notifier zaps, root invalidation, teardown,
//! faults on two threads racing zaps); private slots refuse what KVM refuses with guest_memfd.
//!
//! Checks: I1 and I2 (`Machine::check_all`, which includes `check_mirror`, after every step; no table
//! page left and the external tables empty after teardown).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::host::ExternalError;
use tdp_core::memslot::{Memslot, SlotError, SlotFlags, TrackError};
use tdp_core::mmu::{EmulateReason, FaultError, MmuConfig};
use tdp_mock::{AccessResult, ExternalEntry, HostConfig, Machine, Vcpu, VcpuError, Violation, check_mirror};

const CONFIGS: [(&str, MmuConfig); 2] = [("ept", MmuConfig::EPT), ("npt", MmuConfig::NPT)];
/// The private slot: 4 MiB from gfn 0 (two tables of 4 KiB leaves' worth).
const PRIVATE: SlotId = SlotId(0);
const PRIVATE_PAGES: u64 = 1024;
/// A shared slot after it, 2 MiB-aligned: mapped huge in the direct root.
const SHARED: SlotId = SlotId(1);
const SHARED_BASE: u64 = 0x400;
const SHARED_PAGES: u64 = 1024;

/// A machine with external tables, the two slots and `vcpus` vCPUs.
fn machine(cfg: MmuConfig, vcpus: usize) -> (Machine, [Memslot; 2], Vec<Vcpu>) {
    let m = Machine::new(cfg, HostConfig::default()).expect("valid config");
    m.host().enable_external_tables(cfg.root_level);
    let slots = [
        m.ram_slot(AsId(0), PRIVATE, Gfn(0), PRIVATE_PAGES, SlotFlags::PRIVATE),
        m.ram_slot(AsId(0), SHARED, Gfn(SHARED_BASE), SHARED_PAGES, SlotFlags::empty()),
    ];
    for s in slots {
        m.mmu().write().insert_memslot(s).expect("valid slot");
    }
    let vcpus = (0..vcpus).map(|_| m.new_vcpu(AsId(0))).collect();
    (m, slots, vcpus)
}

fn check(m: &Machine, vcpus: &[Vcpu], slots: &[Memslot], at: &str) {
    let vcpus: Vec<&Vcpu> = vcpus.iter().collect();
    m.check_all(&vcpus, slots).unwrap_or_else(|v| panic!("{at}: {v:#?}"));
}

fn gpa(gfn: u64) -> Gpa {
    Gpa(gfn << 12)
}

/// External leaves, as (gfn, level).
fn external_leaves(m: &Machine) -> Vec<(u64, Level)> {
    m.host()
        .external_entries()
        .into_iter()
        .filter(|e| matches!(e.3, ExternalEntry::Leaf(_)))
        .map(|(_, gfn, level, _)| (gfn.0, level))
        .collect()
}

/// Releases the vCPUs, drops the machine and checks that nothing is left: no table page, no external
/// entry, no call out of order.
fn teardown(m: Machine, mut vcpus: Vec<Vcpu>, name: &str) {
    for v in &mut vcpus {
        v.release(m.mmu());
    }
    let host = m.host().clone();
    drop(vcpus);
    drop(m);
    host.reclaim();
    assert_eq!(host.alloc_stats().live, 0, "{name}: every table page is back");
    assert_eq!(host.external_entries(), [], "{name}: the external tables are empty after teardown");
    assert_eq!(host.external_misuses(), [], "{name}: every external call in order");
}

#[test]
fn private_faults_go_through_the_mirror_and_the_external_copy_follows_every_change() {
    for (name, cfg) in CONFIGS {
        let (m, slots, mut vcpus) = machine(cfg, 1);
        let mmu = std::sync::Arc::clone(m.mmu());
        // Private pages in both 2 MiB halves, and a shared page.
        for (i, gfn) in [3u64, 4, 511, 512, 1000].into_iter().enumerate() {
            vcpus[0].write_u64(&mmu, gpa(gfn), 100 + i as u64).expect("a private write");
            check(&m, &vcpus, &slots, &format!("{name}: after writing private gfn {gfn}"));
        }
        // A read maps a private page writable: the write after it takes no fault.
        assert_eq!(vcpus[0].read_u64(&mmu, gpa(700)).expect("a private read"), 0, "{name}");
        let taken = vcpus[0].mmu_state().counters.taken;
        vcpus[0].write_u64(&mmu, gpa(700), 9).expect("a private write");
        assert_eq!(vcpus[0].mmu_state().counters.taken, taken, "{name}: the read mapped it writable");
        vcpus[0].write_u64(&mmu, gpa(SHARED_BASE + 9), 7).expect("a shared write");
        check(&m, &vcpus, &slots, &format!("{name}: after the shared write"));
        let (mirror, direct) = (vcpus[0].mmu_state().mirror_root(), vcpus[0].root());
        let (mirror, direct) = (mirror.expect("a mirror root"), direct.expect("a root"));
        assert_eq!(mmu.lookup(mirror, Gfn(512)).map(|l| l.1), Some(Level::L1), "{name}: private is 4 KiB");
        assert_eq!(mmu.lookup(direct, Gfn(512)), None, "{name}: no private page in the direct root");
        assert_eq!(
            mmu.lookup(direct, Gfn(SHARED_BASE + 9)).map(|l| l.1),
            Some(Level::L2),
            "{name}: shared huge"
        );
        assert_eq!(mmu.lookup(mirror, Gfn(SHARED_BASE + 9)), None, "{name}: no shared page in the mirror");
        assert_eq!(
            external_leaves(&m),
            [
                (3, Level::L1),
                (4, Level::L1),
                (511, Level::L1),
                (512, Level::L1),
                (700, Level::L1),
                (1000, Level::L1)
            ],
            "{name}"
        );
        for (i, gfn) in [3u64, 4, 511, 512, 1000].into_iter().enumerate() {
            assert_eq!(vcpus[0].read_u64(&mmu, gpa(gfn)).expect("read"), 100 + i as u64, "{name}: gfn {gfn}");
        }

        // Root invalidation (a memslot generation wrap, a fast zap) leaves the mirror alone.
        mmu.write().invalidate_roots(None).run(m.host());
        mmu.read().zap_invalidated_roots();
        assert_eq!(external_leaves(&m).len(), 6, "{name}: private pages survive a fast zap");
        assert_eq!(vcpus[0].read_u64(&mmu, gpa(511)).expect("read"), 102, "{name}");
        check(&m, &vcpus, &slots, &format!("{name}: after invalidating the roots"));

        // A zap of a range (the MMU-notifier path) removes the private leaves in it, and only those.
        mmu.write().zap_gfn_range(AsId(0), Gfn(0), Gfn(512)).run(m.host());
        let left = [(512, Level::L1), (700, Level::L1), (1000, Level::L1)];
        assert_eq!(external_leaves(&m), left, "{name}: after the zap");
        check(&m, &vcpus, &slots, &format!("{name}: after zapping [0, 512)"));
        assert_eq!(vcpus[0].read_u64(&mmu, gpa(4)).expect("read"), 101, "{name}: refaulted, same page");
        check(&m, &vcpus, &slots, &format!("{name}: after the refault"));

        // Deleting the private slot removes its leaves; its gfns are then MMIO.
        mmu.write().delete_memslot(AsId(0), PRIVATE).expect("the slot").run(m.host());
        assert_eq!(external_leaves(&m), [], "{name}: no private leaf after the slot is gone");
        let left = [slots[1]];
        check(&m, &vcpus, &left, &format!("{name}: after deleting the private slot"));
        let after = vcpus[0].access(&mmu, gpa(4), tdp_core::fault::AccessKind::Read).expect("access");
        assert_eq!(after, AccessResult::Emulated(EmulateReason::Mmio), "{name}");
        drop(mmu);
        teardown(m, vcpus, name);
    }
}

#[test]
fn a_busy_host_makes_faults_retry_and_a_refusal_fails_them_with_the_mirror_unchanged() {
    for (name, cfg) in CONFIGS {
        let (m, slots, mut vcpus) = machine(cfg, 1);
        let mmu = std::sync::Arc::clone(m.mmu());
        // Every second call is busy: each level's link and the leaf are retried until they go through.
        m.host().set_external_busy_every(2);
        for gfn in [10u64, 600, 601] {
            vcpus[0].write_u64(&mmu, gpa(gfn), gfn).expect("retried until the host takes it");
            check(&m, &vcpus, &slots, &format!("{name}: busy host, gfn {gfn}"));
        }
        let retried = vcpus[0].mmu_state().counters.retried;
        assert!(retried >= 3, "{name}: busy answers came back as retries ({retried})");
        m.host().set_external_busy_every(0);
        // A refusal fails the fault; the entry it froze goes back, so the copies still agree.
        m.host().set_external_refusing(true);
        let refused = vcpus[0].write_u64(&mmu, gpa(20), 1);
        assert!(
            matches!(refused, Err(VcpuError::Fault(FaultError::External(ExternalError::Refused)))),
            "{name}: {refused:?}"
        );
        assert_eq!(mmu.lookup(vcpus[0].mmu_state().mirror_root().expect("mirror"), Gfn(20)), None, "{name}");
        check(&m, &vcpus, &slots, &format!("{name}: after a refusal"));
        m.host().set_external_refusing(false);
        vcpus[0].write_u64(&mmu, gpa(20), 1).expect("taken now");
        check(&m, &vcpus, &slots, &format!("{name}: after the refusal ended"));
        drop(mmu);
        teardown(m, vcpus, name);
    }
}

#[test]
fn the_mirror_checker_catches_an_external_copy_that_missed_a_change() {
    let (m, slots, mut vcpus) = machine(MmuConfig::EPT, 1);
    let mmu = std::sync::Arc::clone(m.mmu());
    vcpus[0].write_u64(&mmu, gpa(5), 1).expect("write");
    assert_eq!(check_mirror(&mmu), Ok(4), "three tables and a leaf");
    // The host loses a leaf behind the MMU's back: the mirror still maps it.
    tdp_core::host::ExternalTables::remove_external_leaf(m.host(), AsId(0), Gfn(5), Level::L1, {
        let root = vcpus[0].mmu_state().mirror_root().expect("mirror");
        mmu.lookup(root, Gfn(5)).expect("mapped").0.pfn()
    });
    let found = check_mirror(&mmu).expect_err("the copies differ");
    assert!(
        matches!(
            found[..],
            [Violation::MirrorMismatch { gfn: Gfn(5), level: Level::L1, external: None, .. }]
        ),
        "{found:?}"
    );
    // Mend it so teardown's own checks hold: zap the mirror's leaf, whose removal is then a misuse.
    let _ = slots;
    mmu.write().zap_gfn_range(AsId(0), Gfn(5), Gfn(6)).run(m.host());
    assert!(
        m.host()
            .external_misuses()
            .iter()
            .any(|e| matches!(e, tdp_mock::ExternalMisuse::WrongRemoval { .. })),
        "removing a leaf the host no longer has is reported"
    );
    for v in &mut vcpus {
        v.release(&mmu);
    }
}

#[test]
fn private_memory_refuses_logging_read_only_tracking_and_hosts_without_external_tables() {
    let (m, _, vcpus) = machine(MmuConfig::EPT, 1);
    let mut w = m.mmu().write();
    let logged = m.ram_slot(AsId(0), SlotId(5), Gfn(0x1000), 16, SlotFlags::PRIVATE | SlotFlags::LOG_DIRTY);
    assert!(matches!(w.insert_memslot(logged), Err(SlotError::PrivateFlags { .. })));
    let read_only = m.ram_slot(AsId(0), SlotId(5), Gfn(0x1000), 16, SlotFlags::PRIVATE | SlotFlags::READONLY);
    assert!(matches!(w.insert_memslot(read_only), Err(SlotError::PrivateFlags { .. })));
    assert!(matches!(
        w.set_memslot_flags(AsId(0), PRIVATE, SlotFlags::PRIVATE | SlotFlags::LOG_DIRTY),
        Err(SlotError::PrivateFlags { .. })
    ));
    assert!(matches!(
        w.set_memslot_flags(AsId(0), SHARED, SlotFlags::PRIVATE),
        Err(SlotError::PrivateFlags { .. })
    ));
    assert_eq!(
        w.track_write(AsId(0), Gfn(3)).err(),
        Some(TrackError::Private { as_id: AsId(0), gfn: Gfn(3) })
    );
    drop(w);
    teardown(m, vcpus, "ept");

    let plain = Machine::new(MmuConfig::EPT, HostConfig::default()).expect("valid config");
    let private = plain.ram_slot(AsId(0), PRIVATE, Gfn(0), 16, SlotFlags::PRIVATE);
    assert_eq!(
        plain.mmu().write().insert_memslot(private),
        Err(SlotError::NoExternalTables { as_id: AsId(0), id: PRIVATE }),
        "a host without external tables cannot map private memory"
    );
}

/// Operations per thread; the zapper runs as many zaps as each vCPU makes writes, whatever the
/// scheduler does, and waits for the vCPUs' progress between them.
const WRITES: usize = 300;
const ZAPS: usize = 30;

#[test]
fn private_faults_on_two_vcpus_racing_zaps_keep_the_copies_equal() {
    for (name, cfg) in CONFIGS {
        let (m, slots, mut vcpus) = machine(cfg, 2);
        m.host().set_external_busy_every(7);
        let mmu = std::sync::Arc::clone(m.mmu());
        let progress = AtomicUsize::new(0);
        let barrier = Barrier::new(3);
        let last: Vec<BTreeMap<u64, u64>> = std::thread::scope(|s| {
            let writers: Vec<_> = vcpus
                .iter_mut()
                .enumerate()
                .map(|(i, vcpu)| {
                    let (mmu, progress, barrier) = (&mmu, &progress, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let mut last = BTreeMap::new();
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
                        for n in 0..WRITES {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Both vCPUs write the same 64 pages (own word each), spread over both halves.
                            let gfn = (x % 64) * 16;
                            let value = ((i as u64) << 32) | n as u64;
                            vcpu.write_u64(mmu, Gpa((gfn << 12) + 8 * i as u64), value)
                                .expect("a private write");
                            last.insert(gfn, value);
                            progress.fetch_add(1, Ordering::Release);
                        }
                        last
                    })
                })
                .collect();
            let (mmu, progress, barrier) = (&mmu, &progress, &barrier);
            s.spawn(move || {
                barrier.wait();
                for z in 0..ZAPS {
                    // Wait until the vCPUs made their share of writes for this zap (bounded by op counts).
                    while progress.load(Ordering::Acquire) < z * 2 * WRITES / ZAPS {
                        std::thread::yield_now();
                    }
                    let start = (z as u64 * 37) % PRIVATE_PAGES;
                    mmu.write().zap_gfn_range(AsId(0), Gfn(start), Gfn(start + 64)).run(mmu.host());
                }
            });
            writers.into_iter().map(|w| w.join().expect("a vCPU thread")).collect()
        });
        check(&m, &vcpus, &slots, &format!("{name}: after the race"));
        // Every page holds each vCPU's last value for it, read back through the mirror.
        for (i, last) in last.iter().enumerate() {
            for (&gfn, &value) in last {
                let read = vcpus[0].read_u64(&mmu, Gpa((gfn << 12) + 8 * i as u64)).expect("a private read");
                assert_eq!(read, value, "{name}: vCPU {i}'s last write to gfn {gfn}");
            }
        }
        // The reads mapped every page written, whatever the zaps left: exactly those are external leaves.
        let written: Vec<(u64, Level)> = last
            .iter()
            .flat_map(|l| l.keys())
            .copied()
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .map(|g| (g, Level::L1))
            .collect();
        assert_eq!(external_leaves(&m), written, "{name}: the external leaves are the pages written");
        check(&m, &vcpus, &slots, &format!("{name}: after reading back"));
        drop(mmu);
        teardown(m, vcpus, name);
    }
}
