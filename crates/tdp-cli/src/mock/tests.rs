//! Mock guest tests: ring-full exits happen and lose nothing (no push refused, every written page
//! harvested, in both memslots), pause really stops the writes, and the bitmap modes harvest what was
//! written.

use std::time::Duration;

use super::*;
use crate::guest::Pattern;

fn cfg(mode: Mode, ring_entries: u32) -> GuestConfig {
    GuestConfig {
        memory: 4 << 20,
        vcpus: 2,
        pattern: Pattern::Random,
        rate_pages: 0,
        mode,
        ring_entries,
        fill: false,
    }
}

/// Pages, of every memslot, that are not all zero: what the guest has written so far.
fn written_pages(g: &MockGuest) -> PendingSet {
    let mut set = PendingSet::new(g.slots());
    let mut buf = vec![0u8; crate::proto::PAGE_SIZE];
    for s in g.slots() {
        for p in 0..s.pages {
            g.read_page(s.slot, p, &mut buf).unwrap();
            if buf.iter().any(|&b| b != 0) {
                set.insert(s.slot, p);
            }
        }
    }
    let control = u32::from(CONTROL_SLOT.0);
    assert_eq!(set.len_of(control), 2, "each of the 2 vCPUs wrote its page of the control slot");
    set
}

#[test]
fn i4_ring_full_exits_lose_no_page() {
    let mut g = MockGuest::start(cfg(Mode::Ring, 512)).unwrap();
    let mut harvested = PendingSet::new(g.slots());
    g.harvest(&mut harvested).unwrap();
    g.run_for(Duration::from_millis(300), &mut harvested).unwrap();
    g.pause().unwrap();
    g.harvest(&mut harvested).unwrap();
    let exits: u64 = g.figures().iter().map(|f| f.ring_full_exits).sum();
    assert!(exits > 0, "the rings filled and the vCPUs exited");
    assert_eq!(g.refused_pushes(), 0, "no push was refused: no mark lost");
    let written = written_pages(&g);
    let missing: Vec<(u32, u64)> = written.iter().filter(|&(s, p)| !harvested.contains(s, p)).collect();
    assert!(missing.is_empty(), "written but never harvested: {missing:?}");
    g.shutdown().unwrap();
}

#[test]
fn pause_stops_the_writes_and_resume_restarts_them() {
    let mut g = MockGuest::start(cfg(Mode::Bitmap, 512)).unwrap();
    let mut pending = PendingSet::new(g.slots());
    g.run_for(Duration::from_millis(50), &mut pending).unwrap();
    g.pause().unwrap();
    assert!(!g.is_running());
    g.harvest(&mut pending).unwrap();
    let writes = |g: &MockGuest| g.figures().iter().map(|f| f.writes).sum::<u64>();
    let before = writes(&g);
    std::thread::sleep(Duration::from_millis(50));
    let mut after_pause = PendingSet::new(g.slots());
    g.harvest(&mut after_pause).unwrap();
    assert_eq!((writes(&g), after_pause.len()), (before, 0), "nothing is written while paused");
    g.resume().unwrap();
    assert!(g.is_running());
    g.run_for(Duration::from_millis(50), &mut after_pause).unwrap();
    assert!(writes(&g) > before && !after_pause.is_empty(), "the guest writes again");
    g.shutdown().unwrap();
}

#[test]
fn i4_pages_given_back_are_harvested_again() {
    let mut g = MockGuest::start(cfg(Mode::Ring, 512)).unwrap();
    g.pause().unwrap();
    g.harvest(&mut PendingSet::new(g.slots())).unwrap();
    let mut owed = PendingSet::new(g.slots());
    owed.insert_run(0, 10, 5);
    owed.insert(u32::from(CONTROL_SLOT.0), 3);
    assert_eq!(g.give_back(&owed).unwrap(), 6);
    let mut again = PendingSet::new(g.slots());
    g.harvest(&mut again).unwrap();
    assert_eq!(again, owed, "exactly the pages given back (the guest is paused)");
    g.shutdown().unwrap();
}

#[test]
fn i4_clear_log_harvests_every_written_page() {
    let mut g = MockGuest::start(cfg(Mode::ClearLog, 512)).unwrap();
    let mut harvested = PendingSet::new(g.slots());
    g.run_for(Duration::from_millis(100), &mut harvested).unwrap();
    g.pause().unwrap();
    g.harvest(&mut harvested).unwrap();
    let written = written_pages(&g);
    assert!(!written.is_empty());
    assert!(written.iter().all(|(s, p)| harvested.contains(s, p)), "every written page was reported");
    g.shutdown().unwrap();
}
