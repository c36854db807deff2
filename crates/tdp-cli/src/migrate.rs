//! The pre-copy loop of `tdp migrate`: a bulk copy of every page of every memslot (round 0), rounds that
//! send what the tracker harvested while the previous round was sent (each page under the slot the
//! tracker reported it in), a convergence decision after each round ([`crate::converge`]), then
//! stop-and-copy: pause the vCPUs, harvest once more, send the rest, and compare the destination's
//! digest of all its memory, every slot, with the source's own.
//!
//! Dirty state is never lost: a page leaves the pending set only when the round that carried it was
//! acknowledged by the destination. If a round fails, the pages it sent go back into the pending set
//! with those it had not reached, the guest is resumed, and the failure reports how many pages are
//! still owed.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::converge::{Convergence, Decision, Policy, RoundObservation};
use crate::deadline::Timeouts;
use crate::guest::Guest;
use crate::link::{Link, LinkError};
use crate::pending::PendingSet;
use crate::proto::{MAX_RUN, PAGE_SIZE};
use crate::receiver::hex;

mod report;

pub use report::{FailureCause, MigrationFailure, MigrationReport, Progress, RoundReport, Silent, SlotSent};

/// How to migrate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Convergence and throttling.
    pub policy: Policy,
    /// How many times a broken connection is re-established (the destination resumes the session and
    /// the source re-sends what it still owes, the failed round's pages included).
    pub retries: u32,
}

/// Migrates `guest` to the destination `connect` reaches, under `opts`. The guest is running and its
/// dirty tracking is on. `connect` is called once, and again for each reconnection.
///
/// On success the guest is paused (its memory now lives at the destination); on failure it is resumed
/// and left running, and the failure says so.
///
/// ```
/// use std::time::Duration;
/// use tdp_cli::converge::Policy;
/// use tdp_cli::guest::{GuestConfig, Mode, Pattern};
/// use tdp_cli::link::Link;
/// use tdp_cli::migrate::{migrate, Options, Silent};
/// use tdp_cli::mock::MockGuest;
/// use tdp_cli::receiver::{spawn_loopback, ReceiverConfig};
///
/// let cfg = GuestConfig { memory: 1 << 20, vcpus: 2, pattern: Pattern::Random, rate_pages: 4096,
///     mode: Mode::Ring, ring_entries: 512, fill: false };
/// let mut guest = MockGuest::start(cfg)?;
/// let rcfg = ReceiverConfig { idle_timeout: Duration::from_secs(10), ..ReceiverConfig::new(1 << 30) };
/// let (addr, destination) = spawn_loopback(rcfg)?;
/// let policy = Policy { max_rounds: 5, downtime_target: Duration::from_millis(50), dirty_limit: true,
///     vcpu_quota: None };
/// let report = migrate(&mut guest, &mut || Link::connect(addr, None), Options { policy, retries: 0 }, &mut Silent)
///     .map_err(|f| f.error)?;
/// assert!(report.verified, "the destination holds the source's memory byte for byte");
/// let received = destination.join().map_err(|_| "receiver thread")??;
/// assert_eq!(received.digest, report.source_digest);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`MigrationFailure`] with the cause, the pages still owed and whether the guest runs.
pub fn migrate<S: Read + Write + Timeouts>(
    guest: &mut dyn Guest,
    connect: &mut dyn FnMut() -> Result<Link<S>, LinkError>,
    opts: Options,
    progress: &mut dyn Progress,
) -> Result<MigrationReport, MigrationFailure> {
    let mut pending = PendingSet::full(guest.slots());
    let session = session_id();
    let slots =
        guest.slots().iter().map(|&slot| SlotSent { slot, pages_sent: 0, dirty_pages_sent: 0 }).collect();
    let mut m = Migration {
        slots,
        started: Instant::now(),
        rounds: Vec::new(),
        sent_total: 0,
        paused: false,
        link: None,
        session,
        retries_left: opts.retries,
        reconnects: 0,
        resent: 0,
        bytes_before: 0,
    };
    match m.run(guest, connect, opts.policy, progress, &mut pending) {
        Ok(r) => Ok(r),
        Err(error) => {
            // A signal is the cause of whatever failed after it arrived (a read it interrupted, say).
            let error = crate::signals::received().map_or(error, FailureCause::Interrupted);
            if let Some(link) = &mut m.link {
                link.abort(&error.to_string());
            }
            let resumed = if m.paused { guest.resume().is_ok() } else { true };
            // The pages dirtied since the last harvest are owed as well: collect them (they stay pending).
            let _ = guest.harvest(&mut pending);
            let writes = |g: &dyn Guest| g.figures().iter().map(|f| f.writes).sum::<u64>();
            let before = writes(guest);
            // Proof that the guest runs on, except when the user asked to stop.
            if !matches!(error, FailureCause::Interrupted(_)) {
                let _ = guest.run_for(Duration::from_millis(200), &mut pending);
            }
            let dirtied_after = writes(guest).saturating_sub(before);
            // Hand what is owed back to the tracker too: the next harvest (another attempt) reports it.
            let given_back = guest.give_back(&pending).is_ok();
            Err(MigrationFailure {
                error,
                rounds_done: m.rounds.len() as u32,
                pending_pages: pending.len(),
                guest_running: resumed && guest.is_running(),
                was_paused: m.paused,
                given_back,
                dirtied_after,
            })
        }
    }
}

/// A session number unlikely to repeat: the clock's nanoseconds mixed with the process id.
fn session_id() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

struct Migration<S> {
    /// What was sent of each slot.
    slots: Vec<SlotSent>,
    started: Instant,
    rounds: Vec<RoundReport>,
    sent_total: u64,
    paused: bool,
    link: Option<Link<S>>,
    session: u64,
    retries_left: u32,
    reconnects: u32,
    resent: u64,
    bytes_before: u64,
}

impl<S: Read + Write + Timeouts> Migration<S> {
    fn link(&mut self) -> Result<&mut Link<S>, FailureCause> {
        self.link.as_mut().ok_or_else(|| {
            FailureCause::Link(LinkError {
                peer: "?".into(),
                op: "sending".into(),
                cause: "not connected".into(),
                timed_out: false,
            })
        })
    }

    /// Replaces a broken link: reconnects (up to the retries left) and asks to resume the session. If the
    /// destination cannot resume it, every page is owed again.
    fn reconnect(
        &mut self,
        error: LinkError,
        guest: &dyn Guest,
        connect: &mut dyn FnMut() -> Result<Link<S>, LinkError>,
        pending: &mut PendingSet,
        progress: &mut dyn Progress,
    ) -> Result<(), FailureCause> {
        if let Some(sig) = crate::signals::received() {
            return Err(FailureCause::Interrupted(sig));
        }
        if error.timed_out {
            // A destination silent for the whole reply timeout is gone: the documented timeout holds.
            let cause = format!("{}; not reconnecting to a destination that stopped answering", error.cause);
            return Err(LinkError { cause, ..error }.into());
        }
        let first = error;
        let (mut error, mut attempts) = (None::<LinkError>, 0);
        // Close the broken connection first: the destination learns of the break only when it ends.
        self.bytes_before += self.link.take().map_or(0, |l| l.bytes_sent);
        loop {
            if self.retries_left == 0 {
                // The original failure is the cause; the reconnections are how it was handled.
                let cause = match &error {
                    None => first.cause,
                    Some(last) => format!(
                        "{}; {attempts} reconnection attempt(s) failed, the last: {}: {}",
                        first.cause, last.op, last.cause
                    ),
                };
                return Err(LinkError { cause, ..first }.into());
            }
            let error_text = error.as_ref().map_or_else(|| first.to_string(), ToString::to_string);
            self.retries_left -= 1;
            progress.note(&format!(
                "{error_text}; reconnecting, {} pages kept pending for re-sending",
                pending.len()
            ));
            attempts += 1;
            std::thread::sleep(Duration::from_millis(100));
            let attempt = connect()
                .and_then(|mut link| link.hello(guest.slots(), self.session, true).map(|r| (link, r)));
            match attempt {
                Ok((link, resumed)) => {
                    self.link = Some(link);
                    self.reconnects += 1;
                    self.resent += pending.len();
                    if !resumed {
                        progress.note("the destination did not resume the session: every page is sent again");
                        pending.fill();
                    }
                    return Ok(());
                }
                Err(e) => error = Some(e),
            }
        }
    }

    /// [`send_round`], reconnecting and sending again what is owed when the link breaks.
    fn round(
        &mut self,
        guest: &dyn Guest,
        connect: &mut dyn FnMut() -> Result<Link<S>, LinkError>,
        pending: &mut PendingSet,
        round: u32,
        progress: &mut dyn Progress,
    ) -> Result<u64, FailureCause> {
        loop {
            // A round that succeeds sends the whole pending set: what each slot holds now is what it sent.
            let per_slot: Vec<u64> = self.slots.iter().map(|s| pending.len_of(s.slot.slot)).collect();
            match send_round(guest, self.link()?, pending, round, progress) {
                Ok(n) => {
                    for (s, sent) in self.slots.iter_mut().zip(per_slot) {
                        s.pages_sent += sent;
                        if round > 0 {
                            s.dirty_pages_sent += sent;
                        }
                    }
                    return Ok(n);
                }
                Err(FailureCause::Link(e)) => self.reconnect(e, guest, connect, pending, progress)?,
                Err(e) => return Err(e),
            }
        }
    }

    fn run(
        &mut self,
        guest: &mut dyn Guest,
        connect: &mut dyn FnMut() -> Result<Link<S>, LinkError>,
        policy: Policy,
        progress: &mut dyn Progress,
        pending: &mut PendingSet,
    ) -> Result<MigrationReport, FailureCause> {
        let mut link = connect()?;
        link.hello(guest.slots(), self.session, false)?;
        self.link = Some(link);
        let mut conv = Convergence::new(policy, guest.vcpus());
        // Marks made since logging started are covered by the bulk copy; harvesting re-arms them.
        guest.harvest(pending)?;
        let mut round = 0u32;
        let (converged, stop_reason) = loop {
            let start = Instant::now();
            let sent = self.round(guest, connect, pending, round, progress)?;
            let send_time = start.elapsed();
            self.sent_total += sent;
            let h = guest.harvest(pending)?;
            let round_time = start.elapsed();
            let secs = round_time.as_secs_f64().max(1e-9);
            let obs = RoundObservation {
                round,
                pages_sent: sent,
                send_time,
                round_time,
                dirtied: h.new_pages,
                remaining: pending.len(),
                vcpu_rates: h.per_vcpu.iter().map(|&n| n as f64 / secs).collect(),
            };
            let step = conv.observe(&obs);
            if let Some(quotas) = &step.quotas {
                for (i, q) in quotas.iter().enumerate() {
                    guest.throttle().set_quota(i, *q);
                }
                progress.note(&format!(
                    "round {round}: dirty rate outruns the link: vCPUs {:?} throttled to {} pages/s at {}",
                    quotas
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| q.is_some())
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>(),
                    conv.quota().unwrap_or(0),
                    guest.throttle_point()
                ));
            }
            let report = RoundReport {
                round,
                pages_sent: sent,
                dirtied: h.new_pages,
                dirty_rate_mib_s: step.dirty_rate / (1 << 20) as f64,
                throughput_mib_s: if step.throughput.is_finite() {
                    step.throughput / (1 << 20) as f64
                } else {
                    0.0
                },
                estimated_downtime_ms: step.estimated_downtime.as_secs_f64() * 1e3,
                vcpu_dirty_pages_per_sec: obs.vcpu_rates.clone(),
                vcpu_quota: conv.quota(),
                ms: round_time.as_secs_f64() * 1e3,
            };
            progress.round(&report, pending.len());
            self.rounds.push(report);
            match step.decision {
                Decision::Continue => round += 1,
                Decision::StopAndCopy { converged, reason } => break (converged, reason),
            }
        };

        // Stop-and-copy.
        let paused_at = Instant::now();
        self.paused = true;
        guest.pause()?;
        guest.harvest(pending)?;
        let final_round = round + 1;
        let mut final_pages = 0;
        let (source, dest, downtime, verify_start) = loop {
            final_pages += self.round(guest, connect, pending, final_round, progress)?;
            let downtime = paused_at.elapsed();
            let verify_start = Instant::now();
            let source = guest.digest()?;
            match self.link()?.digest() {
                Ok((dest, _)) => break (source, dest, downtime, verify_start),
                Err(e) => self.reconnect(e, guest, connect, pending, progress)?,
            }
        };
        self.sent_total += final_pages;
        let verified = source == dest;
        self.link()?.done(verified)?;
        let verify_ms = verify_start.elapsed().as_secs_f64() * 1e3;
        Ok(MigrationReport {
            rounds: std::mem::take(&mut self.rounds),
            converged,
            stop_reason,
            final_pages,
            pages_sent: self.sent_total,
            bytes_sent: self.bytes_before + self.link.as_ref().map_or(0, |l| l.bytes_sent),
            reconnects: self.reconnects,
            resent_pages: self.resent,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            verify_ms,
            source_digest: hex(&source),
            destination_digest: hex(&dest),
            verified,
            slots: std::mem::take(&mut self.slots),
            vcpus: guest.figures(),
        })
    }
}

/// Sends every pending page as runs, then ends the round and waits for its acknowledgement. Pages move
/// from `pending` to an in-flight set as they are written and are dropped only on the acknowledgement;
/// on any failure the in-flight pages go back into `pending`. Returns the pages sent.
fn send_round<S: Read + Write + Timeouts>(
    guest: &dyn Guest,
    link: &mut Link<S>,
    pending: &mut PendingSet,
    round: u32,
    progress: &mut dyn Progress,
) -> Result<u64, FailureCause> {
    let mut in_flight = pending.take();
    let result = send_pages(guest, link, &in_flight, round, progress);
    match result.and_then(|sent| link.end_round(round, sent).map(|_| sent).map_err(FailureCause::from)) {
        Ok(sent) => Ok(sent),
        Err(e) => {
            pending.merge(&in_flight);
            in_flight.take();
            Err(e)
        }
    }
}

fn send_pages<S: Read + Write + Timeouts>(
    guest: &dyn Guest,
    link: &mut Link<S>,
    pages: &PendingSet,
    round: u32,
    progress: &mut dyn Progress,
) -> Result<u64, FailureCause> {
    let mut buf = vec![0u8; MAX_RUN as usize * PAGE_SIZE];
    let mut sent = 0;
    let total = pages.len();
    progress.sent(round, 0, total);
    for (slot, first, count) in pages.runs(u64::from(MAX_RUN)) {
        if let Some(sig) = crate::signals::received() {
            return Err(FailureCause::Interrupted(sig));
        }
        let bytes = count as usize * PAGE_SIZE;
        for (i, chunk) in buf[..bytes].chunks_exact_mut(PAGE_SIZE).enumerate() {
            guest.read_page(slot, first + i as u64, chunk)?;
        }
        link.send_pages(slot, first, &buf[..bytes], round)?;
        sent += count;
        progress.sent(round, sent, total);
    }
    Ok(sent)
}

#[cfg(test)]
mod tests;
