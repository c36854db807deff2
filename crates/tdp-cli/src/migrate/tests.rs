//! Tests of the pre-copy loop against an in-memory guest of two memslots and a real receiver thread: the
//! digest proves the destination got everything, every slot, and a link that breaks mid-round leaves
//! every page it carried pending.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::converge::Throttle;
use crate::guest::{GuestError, Harvest, VcpuFigures};
use crate::proto::SlotInfo;
use crate::receiver::{ReceiverConfig, accept_and_serve};

/// The fake guest's code slot: 2 pages at 0.
const CODE: u32 = 0;
/// The fake guest's data slot, at 4 GiB.
const DATA: u32 = 1;
/// Pages of the code slot.
const CODE_PAGES: u64 = 2;

/// A guest of two memslots whose memory is a vector each; each harvest "dirties" the pages `(slot,
/// page)` listed in `script` for that call.
struct FakeGuest {
    layout: [SlotInfo; 2],
    memory: Mutex<[Vec<u8>; 2]>,
    script: Vec<Vec<(u32, u64)>>,
    /// Test hook: a harvest leaves out this slot's pages, as a tracker that logs only the data slot would.
    drop_slot: Option<u32>,
    harvests: usize,
    throttle: Throttle,
    paused: bool,
    given_back: u64,
}

impl FakeGuest {
    /// A guest of `pages` data pages; `script` lists data pages.
    fn new(pages: u64, script: Vec<Vec<u64>>) -> FakeGuest {
        let script = script.into_iter().map(|h| h.into_iter().map(|p| (DATA, p)).collect()).collect();
        FakeGuest::with_script(pages, script)
    }

    fn with_script(pages: u64, script: Vec<Vec<(u32, u64)>>) -> FakeGuest {
        let fill = |n: u64, salt: u64| (0..n * PAGE_SIZE as u64).map(|i| (i / 7 + salt) as u8).collect();
        FakeGuest {
            layout: [SlotInfo::new(CODE, 0, CODE_PAGES), SlotInfo::new(DATA, 1 << 32, pages)],
            memory: Mutex::new([fill(CODE_PAGES, 3), fill(pages, 0)]),
            script,
            drop_slot: None,
            harvests: 0,
            throttle: Throttle::new(1),
            paused: false,
            given_back: 0,
        }
    }
}

impl Guest for FakeGuest {
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn slots(&self) -> &[SlotInfo] {
        &self.layout
    }
    fn vcpus(&self) -> usize {
        1
    }
    fn throttle(&self) -> &Throttle {
        &self.throttle
    }
    fn throttle_point(&self) -> &'static str {
        "nowhere"
    }
    fn harvest(&mut self, into: &mut PendingSet) -> Result<Harvest, GuestError> {
        let dirty = self.script.get(self.harvests).cloned().unwrap_or_default();
        self.harvests += 1;
        let mut mem = self.memory.lock().unwrap();
        let before = into.len();
        for &(slot, p) in &dirty {
            // The write happened before the harvest: new contents, then the mark.
            let m = &mut mem[slot as usize];
            m[p as usize * PAGE_SIZE] = m[p as usize * PAGE_SIZE].wrapping_add(1);
            if self.drop_slot != Some(slot) {
                into.insert(slot, p);
            }
        }
        Ok(Harvest { new_pages: into.len() - before, per_vcpu: vec![dirty.len() as u64] })
    }
    fn give_back(&mut self, pages: &PendingSet) -> Result<u64, GuestError> {
        self.given_back = pages.len();
        Ok(pages.len())
    }
    fn read_page(&self, slot: u32, page: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let at = page as usize * PAGE_SIZE;
        buf.copy_from_slice(&self.memory.lock().unwrap()[slot as usize][at..at + PAGE_SIZE]);
        Ok(())
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.paused = false;
        Ok(())
    }
    fn is_running(&self) -> bool {
        !self.paused
    }
    fn figures(&self) -> Vec<VcpuFigures> {
        vec![VcpuFigures::default()]
    }
    fn shutdown(&mut self) -> Result<(), GuestError> {
        Ok(())
    }
}

/// A stream that fails every write once `budget` bytes were written.
struct Breaks {
    inner: TcpStream,
    budget: usize,
}

impl Read for Breaks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}
impl crate::deadline::Timeouts for Breaks {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(t)
    }
}
impl Write for Breaks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.budget {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "link cut by the test"));
        }
        self.budget -= buf.len();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn receiver() -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<crate::receiver::Received, crate::receiver::ReceiveError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ReceiverConfig { idle_timeout: Duration::from_secs(10), ..ReceiverConfig::new(1 << 30) };
    let t = std::thread::spawn(move || accept_and_serve(&listener, cfg));
    (addr, t)
}

fn opts(max_rounds: u32, retries: u32) -> Options {
    let policy =
        Policy { max_rounds, downtime_target: Duration::from_nanos(1), dirty_limit: true, vcpu_quota: None };
    Options { policy, retries }
}

/// Connects to `addr`; the first connection breaks after `first_budget` bytes, later ones never do.
fn connector(
    addr: std::net::SocketAddr,
    first_budget: usize,
) -> impl FnMut() -> Result<Link<Breaks>, LinkError> {
    let mut calls = 0;
    move || {
        calls += 1;
        let budget = if calls == 1 { first_budget } else { usize::MAX };
        let inner = TcpStream::connect(addr).map_err(|e| LinkError {
            peer: addr.to_string(),
            op: "connecting".into(),
            cause: e.to_string(),
            timed_out: false,
        })?;
        Ok(Link::new(Breaks { inner, budget }, addr.to_string(), None))
    }
}

#[test]
fn i4_every_dirtied_page_reaches_the_destination() {
    let script = vec![vec![], vec![1, 2, 3, 200], vec![2, 5], vec![7], vec![100, 101, 102]];
    let mut guest = FakeGuest::new(256, script);
    let (addr, t) = receiver();
    let r = migrate(&mut guest, &mut connector(addr, usize::MAX), opts(2, 0), &mut Silent)
        .map_err(|f| f.error.to_string())
        .unwrap();
    let got = t.join().unwrap().unwrap();
    assert!(r.verified, "{r:?}");
    assert_eq!(got.digest, r.source_digest);
    // Bulk copy (both slots) + rounds 1, 2 + the final round, which carries the last harvest's pages.
    assert_eq!(r.rounds.iter().map(|x| x.pages_sent).collect::<Vec<_>>(), [256 + CODE_PAGES, 4, 2]);
    assert_eq!(r.final_pages, 1 + 3);
    assert!(!r.converged && r.stop_reason.contains("did not converge in 2 rounds"), "{}", r.stop_reason);
}

/// The per-slot digests of `guest`, hex, as the destination reports them.
fn slot_digests(guest: &FakeGuest) -> Vec<(SlotInfo, String)> {
    guest.slot_digests().unwrap().into_iter().map(|(s, d)| (s, hex(&d))).collect()
}

#[test]
fn i4_pages_dirtied_in_every_slot_reach_the_destination_under_their_slot() {
    // The code slot's pages are dirtied in rounds and in the final harvest, as the KVM guest's control
    // page is; data page 1 and code page 1 share an offset, so a page applied to the wrong slot shows.
    let script = vec![vec![], vec![(CODE, 1), (DATA, 1)], vec![(CODE, 0)], vec![(CODE, 1), (DATA, 2)]];
    let mut guest = FakeGuest::with_script(64, script);
    let (addr, t) = receiver();
    let r = migrate(&mut guest, &mut connector(addr, usize::MAX), opts(2, 0), &mut Silent)
        .map_err(|f| f.error.to_string())
        .unwrap();
    let got = t.join().unwrap().unwrap();
    assert!(r.verified && got.digest == r.source_digest, "{r:?}");
    let held: Vec<(SlotInfo, String)> = got.slots.iter().map(|s| (s.info, s.digest.clone())).collect();
    assert_eq!(held, slot_digests(&guest), "each slot at the destination equals the source's slot");
    assert_eq!(held.len(), 2);
    assert_eq!(r.rounds.iter().map(|x| x.pages_sent).collect::<Vec<_>>(), [64 + CODE_PAGES, 2, 1]);
    assert_eq!(r.final_pages, 2);
    let sent: Vec<(u32, u64, u64)> =
        r.slots.iter().map(|s| (s.slot.slot, s.pages_sent, s.dirty_pages_sent)).collect();
    assert_eq!(
        sent,
        [(CODE, CODE_PAGES + 3, 3), (DATA, 64 + 2, 2)],
        "each dirty page went out under its slot"
    );
}

#[test]
fn i4_a_slot_whose_dirty_pages_are_not_sent_fails_the_verification() {
    // A tracker that reports only the data slot (what `tdp migrate` did before every slot moved): the
    // code slot's writes after the bulk copy never reach the destination, and the digest says so.
    let script = vec![vec![], vec![(CODE, 1), (DATA, 1)], vec![(DATA, 2)]];
    let mut guest = FakeGuest::with_script(64, script);
    guest.drop_slot = Some(CODE);
    let (addr, t) = receiver();
    let r = migrate(&mut guest, &mut connector(addr, usize::MAX), opts(2, 0), &mut Silent)
        .map_err(|f| f.error.to_string())
        .unwrap();
    let got = t.join().unwrap().unwrap();
    assert!(!r.verified && !got.matched, "the stale code slot is detected: {r:?}");
    let source = slot_digests(&guest);
    assert_ne!(got.slots[0].digest, source[0].1, "the code slot differs");
    assert_eq!(got.slots[1].digest, source[1].1, "the data slot is intact");
    assert_eq!(r.slots[0].dirty_pages_sent, 0, "no code page went out after the bulk copy");
}

#[test]
fn i4_pages_of_a_failed_round_stay_pending() {
    let (addr, _t) = receiver();
    let guest = FakeGuest::new(64, vec![]);
    let mut pending = PendingSet::new(guest.slots());
    pending.insert_run(DATA, 3, 40);
    pending.insert(CODE, 1);
    let stream = TcpStream::connect(addr).unwrap();
    let mut link = Link::new(Breaks { inner: stream, budget: 20 * PAGE_SIZE + 200 }, "test".into(), None);
    link.hello(guest.slots(), 1, false).unwrap();
    let before = pending.clone();
    let err = send_round(&guest, &mut link, &mut pending, 1, &mut Silent).unwrap_err();
    assert!(err.to_string().contains("sending pages of round 1"), "{err}");
    assert_eq!(pending, before, "every page of the failed round, sent or not, is still owed");
}

#[test]
fn a_failed_migration_resumes_the_guest_and_counts_what_is_owed() {
    let (addr, _t) = receiver();
    let mut guest = FakeGuest::new(128, vec![vec![], vec![9, 10]]);
    let f = migrate(&mut guest, &mut connector(addr, 100 * PAGE_SIZE), opts(5, 0), &mut Silent)
        .expect_err("the link breaks in round 0");
    assert!(f.guest_running, "the guest runs after the failure");
    let all = 128 + CODE_PAGES;
    assert_eq!(f.pending_pages, all, "nothing was acknowledged: every page of every slot is still owed");
    assert!(f.given_back && guest.given_back == all, "and handed back to the tracker");
    assert_eq!(f.rounds_done, 0);
}

#[test]
fn i4_a_broken_connection_is_resumed_and_the_owed_pages_sent_again() {
    let (addr, t) = receiver();
    let mut guest = FakeGuest::new(128, vec![vec![], vec![9, 10], vec![11]]);
    // The first connection breaks in the middle of the bulk copy (after ~100 of 128 pages).
    let r = migrate(&mut guest, &mut connector(addr, 100 * PAGE_SIZE), opts(3, 2), &mut Silent)
        .map_err(|f| f.error.to_string())
        .unwrap();
    let got = t.join().unwrap().unwrap();
    assert!(r.verified, "{r:?}");
    assert_eq!(got.digest, r.source_digest, "the resumed session holds the source's memory");
    assert_eq!((r.reconnects, got.reconnects), (1, 1));
    assert_eq!(r.resent_pages, 128 + CODE_PAGES, "the whole unacknowledged bulk copy was owed again");
    assert_eq!(r.rounds[0].pages_sent, 128 + CODE_PAGES);
}
