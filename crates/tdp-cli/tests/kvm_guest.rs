//! The KVM guest behind `tdp` through the library: in every tracking mode, every page the guest wrote
//! is reported by the harvests (collects plus ring-full exits), in both memslots, each under its slot;
//! pause really stops the writes, and the throttle slows a vCPU at its exits. Skipped without
//! `/dev/kvm`.
//!
//! Checks: I4 for the adapter over tdp-kvm (nothing written goes unreported).

mod common;

use std::time::Duration;

use tdp_cli::guest::{Guest, GuestConfig, Mode, Pattern};
use tdp_cli::kvm::KvmGuest;
use tdp_cli::pending::PendingSet;
use tdp_guest::layout::CONTROL_PAGE;
use tdp_guest::{CODE_SLOT, DATA_SLOT};

/// The data pages the guest wrote (the data slot starts zeroed; the guest writes non-zero numbers).
fn written_pages(g: &KvmGuest) -> PendingSet {
    let mut set = PendingSet::new(g.slots());
    let mut buf = vec![0u8; 4096];
    let data = g.slots().iter().find(|s| s.slot == DATA_SLOT).expect("a data slot").pages;
    for p in 0..data {
        g.read_page(DATA_SLOT, p, &mut buf).expect("page in range");
        if buf.iter().any(|&b| b != 0) {
            set.insert(DATA_SLOT, p);
        }
    }
    set
}

#[test]
fn i4_every_written_page_is_harvested_in_every_mode() {
    if !common::kvm_or_skip("i4_every_written_page_is_harvested_in_every_mode") {
        return;
    }
    for mode in [Mode::Ring, Mode::Bitmap, Mode::ClearLog] {
        let cfg = GuestConfig {
            memory: 8 << 20,
            vcpus: 2,
            pattern: Pattern::Random,
            rate_pages: 0,
            mode,
            ring_entries: 512,
            fill: false,
        };
        let mut g = KvmGuest::start(cfg).expect("a KVM guest");
        let mut harvested = PendingSet::new(g.slots());
        // Run until the rings have filled (or a generous deadline passes): on a busy machine the vCPU
        // threads may get little CPU in any fixed window.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            g.run_for(Duration::from_millis(200), &mut harvested).expect("harvests");
            let exits: u64 = g.figures().iter().map(|f| f.ring_full_exits).sum();
            if mode != Mode::Ring || exits > 0 || std::time::Instant::now() > deadline {
                break;
            }
        }
        g.pause().expect("pause");
        g.harvest(&mut harvested).expect("final harvest");
        let written = written_pages(&g);
        assert!(written.len() > 100, "{mode:?}: the guest wrote pages ({})", written.len());
        let missing: Vec<(u32, u64)> = written.iter().filter(|&(s, p)| !harvested.contains(s, p)).collect();
        assert!(missing.is_empty(), "{mode:?}: written but never harvested: {missing:?}");
        assert!(
            harvested.contains(CODE_SLOT, CONTROL_PAGE),
            "{mode:?}: the guest's writes to its control page (code memslot) are harvested under that slot"
        );
        if mode == Mode::Ring {
            let exits: u64 = g.figures().iter().map(|f| f.ring_full_exits).sum();
            assert!(exits > 0, "ring: 512-entry rings filled between collects");
        }
        // Paused: nothing more is written or reported.
        let writes = |g: &KvmGuest| g.figures().iter().map(|f| f.writes).sum::<u64>();
        let before = writes(&g);
        std::thread::sleep(Duration::from_millis(30));
        let mut later = PendingSet::new(g.slots());
        g.harvest(&mut later).expect("harvest while paused");
        assert_eq!((writes(&g), later.len()), (before, 0), "{mode:?}: nothing is written while paused");
        // Pages given back are reported by the next harvest (the tracker's pending set).
        let mut owed = PendingSet::new(g.slots());
        owed.insert_run(DATA_SLOT, 100, 7);
        owed.insert(CODE_SLOT, 1);
        g.give_back(&owed).expect("give back");
        let mut again = PendingSet::new(g.slots());
        g.harvest(&mut again).expect("harvest");
        assert_eq!(again, owed, "{mode:?}: exactly the pages given back (the guest is paused)");
        g.resume().expect("resume");
        g.shutdown().expect("shutdown");
    }
}

#[test]
fn the_throttle_slows_a_vcpu_over_its_quota() {
    if !common::kvm_or_skip("the_throttle_slows_a_vcpu_over_its_quota") {
        return;
    }
    let cfg = GuestConfig {
        memory: 8 << 20,
        vcpus: 2,
        pattern: Pattern::Sequential,
        rate_pages: 0,
        mode: Mode::Bitmap,
        ring_entries: 512,
        fill: false,
    };
    let mut g = KvmGuest::start(cfg).expect("a KVM guest");
    g.throttle().set_quota(0, Some(100)); // one 64-page batch every 0.64 s
    let mut pending = PendingSet::new(g.slots());
    g.run_for(Duration::from_millis(300), &mut pending).expect("run");
    let f = g.figures();
    assert!(f[0].throttled_exits > 0 && f[1].throttled_exits == 0, "only vCPU 0 has a quota: {f:?}");
    assert!(f[0].writes < f[1].writes, "the throttled vCPU wrote less: {f:?}");
    g.shutdown().expect("shutdown");
}
