//! Tests of the pre-copy loop against an in-memory guest and a real receiver thread: the digest proves
//! the destination got everything, and a link that breaks mid-round leaves every page it carried pending.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::converge::Throttle;
use crate::guest::{GuestError, Harvest, VcpuFigures};
use crate::receiver::{ReceiverConfig, accept_and_serve};

/// A guest whose memory is a vector; each harvest "dirties" the pages listed in `script` for that call.
struct FakeGuest {
    memory: Mutex<Vec<u8>>,
    script: Vec<Vec<u64>>,
    harvests: usize,
    throttle: Throttle,
    paused: bool,
    given_back: u64,
}

impl FakeGuest {
    fn new(pages: u64, script: Vec<Vec<u64>>) -> FakeGuest {
        let memory = (0..pages * PAGE_SIZE as u64).map(|i| (i / 7) as u8).collect();
        FakeGuest {
            memory: Mutex::new(memory),
            script,
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
    fn pages(&self) -> u64 {
        (self.memory.lock().unwrap().len() / PAGE_SIZE) as u64
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
        for &p in &dirty {
            // The write happened before the harvest: new contents, then the mark.
            mem[p as usize * PAGE_SIZE] = mem[p as usize * PAGE_SIZE].wrapping_add(1);
            into.insert(p);
        }
        Ok(Harvest { new_pages: into.len() - before, per_vcpu: vec![dirty.len() as u64] })
    }
    fn give_back(&mut self, pages: &PendingSet) -> Result<u64, GuestError> {
        self.given_back = pages.len();
        Ok(pages.len())
    }
    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let at = page as usize * PAGE_SIZE;
        buf.copy_from_slice(&self.memory.lock().unwrap()[at..at + PAGE_SIZE]);
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
    // Bulk copy + rounds 1, 2 + the final round, which carries the last harvest's pages.
    assert_eq!(r.rounds.iter().map(|x| x.pages_sent).collect::<Vec<_>>(), [256, 4, 2]);
    assert_eq!(r.final_pages, 1 + 3);
    assert!(!r.converged && r.stop_reason.contains("did not converge in 2 rounds"), "{}", r.stop_reason);
}

#[test]
fn i4_pages_of_a_failed_round_stay_pending() {
    let (addr, _t) = receiver();
    let guest = FakeGuest::new(64, vec![]);
    let mut pending = PendingSet::new(64);
    pending.insert_run(3, 40);
    let stream = TcpStream::connect(addr).unwrap();
    let mut link = Link::new(Breaks { inner: stream, budget: 20 * PAGE_SIZE + 200 }, "test".into(), None);
    link.hello(64, 1, false).unwrap();
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
    assert_eq!(f.pending_pages, 128, "nothing was acknowledged: every page is still owed");
    assert!(f.given_back && guest.given_back == 128, "and handed back to the tracker");
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
    assert_eq!(r.resent_pages, 128, "the whole unacknowledged bulk copy was owed again");
    assert_eq!(r.rounds[0].pages_sent, 128);
}
