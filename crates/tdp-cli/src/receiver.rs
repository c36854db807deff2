//! The destination: `tdp receive` (and the loopback receiver `tdp migrate` starts on a thread). A
//! session holds the guest memory the source announces (every memslot of its `Hello` table, in one
//! allocation), applies page runs to the slot each names, acknowledges rounds and answers the digest
//! request with the protocol's digest of everything it holds, every slot. A connection lost
//! mid-session does not lose the memory: the session waits (up to its idle timeout) for the source to
//! reconnect and resume it (see [`crate::proto`]).
//!
//! This module is one connection's protocol: [`handshake`] (a valid `Hello` within the handshake
//! deadline), [`Session::open`] (the memory, reserved fallibly), [`run_session`] (the rounds).
//! [`server`] is the accept loop around it: connections on threads, bounded in number, garbage
//! logged and survived.
//!
//! Keeps: I5 for the network peer (memory reserved only after the slot table passed
//! [`validate_slots`] and its size `max_memory` and the host's available memory, and fallibly; page runs
//! checked against the slot they name (a slot not announced is refused), round numbers with checked
//! arithmetic;
//! every frame due by a deadline a trickle cannot stretch; protocol violations answered with an `Error`
//! frame and a clear error; the peer's text escaped before it is printed).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::deadline::{Deadlined, Timeouts};
use crate::proto::{
    ErrorCode, MemoryDigest, Message, PAGE_SIZE, ProtoError, SlotInfo, VERSION, validate_slots,
};
use crate::sanitize::escape_control;

pub mod server;

pub use server::{Server, accept_and_serve, spawn_loopback};

/// How long a new connection has, by default, to deliver a complete valid `Hello`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections served at once by default; more are closed as soon as they are accepted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// What the receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The most guest memory it will hold, bytes.
    pub max_memory: u64,
    /// Test hook: exit the process (status 3) after acknowledging this many rounds, as if killed.
    pub exit_after_rounds: Option<u32>,
    /// Test hook: close the connection once (keeping the session) after acknowledging this many rounds,
    /// as a network failure would.
    pub drop_after_rounds: Option<u32>,
    /// Test hook: flip a byte of this page (memslot, page in the slot) before computing the digest, so
    /// the source must see a mismatch (proof that the verification covers that slot).
    pub corrupt_page: Option<(u32, u64)>,
    /// The deadline of each frame of a session (waiting for it included), and how long a session whose
    /// connection was lost waits for its source to reconnect.
    pub idle_timeout: Duration,
    /// The deadline of a new connection's `Hello`, from the moment it is accepted.
    pub handshake_timeout: Duration,
    /// The most connections served at once (at least 1); the server closes further ones at once.
    pub max_connections: usize,
    /// Log each connection's end (and each session's start) on stderr, one line each; off for the
    /// loopback destination inside `tdp migrate`.
    pub log_connections: bool,
}

impl ReceiverConfig {
    /// A receiver of up to `max_memory` bytes with the default timeouts and connection limit and no
    /// test hooks.
    #[must_use]
    pub const fn new(max_memory: u64) -> ReceiverConfig {
        ReceiverConfig {
            max_memory,
            exit_after_rounds: None,
            drop_after_rounds: None,
            corrupt_page: None,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            log_connections: true,
        }
    }
}

/// The most times one session may be resumed after a lost connection.
pub const MAX_RECONNECTS: u32 = 8;

/// One memslot a finished session held.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReceivedSlot {
    /// The slot as announced.
    #[serde(flatten)]
    pub info: SlotInfo,
    /// Hex digest of this slot alone (a [`MemoryDigest`] of the one slot), to tell which slot differs.
    pub digest: String,
}

/// What a finished session looked like.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    /// The source's address.
    pub peer: String,
    /// Pages of memory held, every slot's.
    pub pages: u64,
    /// The memslots held, in the `Hello` table's order.
    pub slots: Vec<ReceivedSlot>,
    /// Rounds received (final round included).
    pub rounds: u32,
    /// Pages applied (repeats included).
    pub pages_received: u64,
    /// Hex digest of the memory held, every slot (the digest the source compared).
    pub digest: String,
    /// The source's verdict on the digests.
    pub matched: bool,
    /// Connections the session lost and resumed.
    pub reconnects: u32,
    /// Wall time of the session, ms.
    pub elapsed_ms: u64,
}

/// A failed session (or connection). `cause` holds no control characters (peer text is escaped).
#[derive(Debug, thiserror::Error)]
#[error("source {peer}: {op}: {cause}")]
pub struct ReceiveError {
    /// The source's address (or the listen address before one connected).
    pub peer: String,
    /// What the receiver was doing.
    pub op: String,
    /// Why it failed.
    pub cause: String,
    /// The connection was lost (not refused): the session may be resumed on a new one.
    pub resumable: bool,
}

/// One migration's state at the destination, kept across connections.
#[derive(Debug)]
pub struct Session {
    id: u64,
    pages: u64,
    /// The slot table, and each slot's first byte in `memory`.
    slots: Vec<(SlotInfo, usize)>,
    memory: Vec<u8>,
    rounds: u32,
    received: u64,
    /// The digest last sent (all memory, and each slot's), until a page changes.
    digest: Option<(String, Vec<ReceivedSlot>)>,
    dropped: bool,
    reconnects: u32,
    started: Instant,
}

/// What a valid `Hello` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    /// The session number.
    pub session: u64,
    /// The guest's memslots (a table [`validate_slots`] accepts, within the receiver's limit).
    pub slots: Vec<SlotInfo>,
    /// Whether the source asks to continue a session it lost.
    pub resume: bool,
}

impl Opening {
    /// Pages of guest memory announced, every slot's (saturating: a validated table cannot overflow).
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.slots.iter().fold(0u64, |t, s| t.saturating_add(s.pages))
    }
}

/// Why a session could not be given memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannotHold(pub String);

impl Session {
    /// A new session of zeroed memory for every slot of `o`. The memory is reserved with a fallible
    /// allocation, after checking it against the host's available memory (`/proc/meminfo`), so a size
    /// the host cannot give is refused, never an abort.
    ///
    /// # Errors
    /// [`CannotHold`] naming the size and what the host has, or the rule an invalid slot table breaks.
    pub fn open(o: &Opening, reconnects: u32) -> Result<Session, CannotHold> {
        let pages = validate_slots(&o.slots).map_err(|e| CannotHold(e.0))?;
        let bytes = pages.checked_mul(PAGE_SIZE as u64);
        let shown = |b: u64| crate::units::human_bytes(b);
        let Some(len) = bytes.and_then(|b| usize::try_from(b).ok()) else {
            return Err(CannotHold(format!("{pages} pages do not fit this host's address space")));
        };
        // Each slot's base: below `len`, which fits in usize, so no sum overflows.
        let mut slots = Vec::with_capacity(o.slots.len());
        let mut base = 0usize;
        for s in &o.slots {
            slots.push((*s, base));
            base += s.pages as usize * PAGE_SIZE;
        }
        if let Some(avail) = crate::hostmem::available().filter(|&a| (len as u64) > a) {
            return Err(CannotHold(format!(
                "{} of guest memory is more than this host has available ({} MemAvailable)",
                shown(len as u64),
                shown(avail)
            )));
        }
        let mut memory = Vec::new();
        if let Err(e) = memory.try_reserve_exact(len) {
            return Err(CannotHold(format!("cannot allocate {} of guest memory: {e}", shown(len as u64))));
        }
        // Zeroed a block at a time by memcpy (fast in debug builds too); the capacity is already there.
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        while memory.len() < len {
            let n = (len - memory.len()).min(ZEROS.len());
            memory.extend_from_slice(&ZEROS[..n]);
        }
        Ok(Session {
            id: o.session,
            pages,
            slots,
            memory,
            rounds: 0,
            received: 0,
            digest: None,
            dropped: false,
            reconnects,
            started: Instant::now(),
        })
    }

    /// Whether this session is the one `o` asks to resume.
    #[must_use]
    pub fn resumes(&self, o: &Opening) -> bool {
        o.resume && self.id == o.session && self.slots.iter().map(|(s, _)| s).eq(o.slots.iter())
    }

    /// Counts one more lost connection; `false` when the session may not be resumed again.
    pub fn lost_connection(&mut self) -> bool {
        if self.reconnects >= MAX_RECONNECTS {
            return false;
        }
        self.reconnects += 1;
        true
    }

    /// Bytes of guest memory held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.memory.len()
    }

    /// The memslots held, in the `Hello` table's order.
    pub fn slots(&self) -> impl Iterator<Item = SlotInfo> + '_ {
        self.slots.iter().map(|(s, _)| *s)
    }

    /// The bytes of `len` bytes of pages of memslot `slot` from page `first`. `Err` names why not: a
    /// slot not announced, or a run that does not lie inside it.
    fn pages_mut(&mut self, slot: u32, first: u64, len: usize) -> Result<&mut [u8], String> {
        let Ok(i) = self.slots.binary_search_by_key(&slot, |(s, _)| s.slot) else {
            let announced: Vec<u32> = self.slots.iter().map(|(s, _)| s.slot).collect();
            return Err(format!("memslot {slot} was not announced in Hello (announced: {announced:?})"));
        };
        let (info, base) = self.slots[i];
        let count = (len / PAGE_SIZE) as u64;
        let inside = first.checked_add(count).is_some_and(|end| end <= info.pages);
        if !inside {
            return Err(format!("pages {first}..+{count} lie outside memslot {slot}'s {} pages", info.pages));
        }
        // Inside the slot, so `first * PAGE_SIZE + len` is below the slot's size, which fits in usize.
        let at = base + first as usize * PAGE_SIZE;
        self.memory
            .get_mut(at..at + len)
            .ok_or_else(|| format!("memslot {slot}: pages beyond the memory held"))
    }

    /// The protocol's digest of all memory ([`MemoryDigest`]), and each slot's alone.
    fn digests(&self) -> ([u8; 32], Vec<ReceivedSlot>) {
        let mut all = MemoryDigest::new();
        let mut each = Vec::with_capacity(self.slots.len());
        for (info, base) in &self.slots {
            let bytes = self.memory.get(*base..*base + info.pages as usize * PAGE_SIZE).unwrap_or_default();
            all.slot(info);
            all.pages(bytes);
            let mut one = MemoryDigest::new();
            one.slot(info);
            one.pages(bytes);
            each.push(ReceivedSlot { info: *info, digest: hex(&one.finish()) });
        }
        (all.finish(), each)
    }
}

/// Sends an `Error` frame (best effort, within `limit`) and builds the matching error.
fn refuse<S: Write + Timeouts>(
    stream: &mut S,
    limit: Duration,
    peer: &str,
    code: ErrorCode,
    op: &str,
    cause: String,
) -> ReceiveError {
    let mut scratch = Vec::new();
    let _ = Message::Error { code: code as u16, text: cause.clone() }
        .write_to(&mut Deadlined::new(stream, limit), &mut scratch);
    ReceiveError { peer: peer.to_owned(), op: op.into(), cause, resumable: false }
}

/// Reads the connection's first frame within `cfg.handshake_timeout` and checks that it is a `Hello`
/// this receiver can serve (version, page size, a valid slot table, size within `max_memory`).
///
/// # Errors
/// [`ReceiveError`] (not resumable) for anything else; when the peer spoke the protocol, it got an
/// `Error` frame first.
pub fn handshake<S: Read + Write + Timeouts>(
    stream: &mut S,
    peer: &str,
    cfg: &ReceiverConfig,
) -> Result<Opening, ReceiveError> {
    let limit = cfg.handshake_timeout;
    let first = Message::read_from(&mut Deadlined::new(&mut *stream, limit));
    let mut no = |code, op: &str, cause| Err(refuse(stream, limit, peer, code, op, cause));
    match first {
        Ok(Message::Hello { version, page_size, session, resume, slots }) => {
            let pages = validate_slots(&slots);
            let bytes = pages.as_ref().ok().and_then(|p| p.checked_mul(PAGE_SIZE as u64));
            if version != VERSION {
                let cause =
                    format!("the source speaks protocol version {version}, this destination {VERSION}");
                no(ErrorCode::Version, "checking Hello", cause)
            } else if page_size as usize != PAGE_SIZE {
                let cause = format!("page size {page_size} is not supported (only {PAGE_SIZE})");
                no(ErrorCode::Protocol, "checking Hello", cause)
            } else if let Err(e) = pages {
                no(ErrorCode::Protocol, "checking Hello's memslots", e.0)
            } else if bytes.is_none_or(|b| b > cfg.max_memory) {
                let cause = format!(
                    "{} pages in {} memslot(s) is more than the receiver's limit of {} (see --max-memory)",
                    pages.unwrap_or(0),
                    slots.len(),
                    crate::units::human_bytes(cfg.max_memory)
                );
                no(ErrorCode::TooLarge, "checking Hello", cause)
            } else {
                Ok(Opening { session, slots, resume })
            }
        }
        Err(ProtoError::Version { version }) => {
            let cause = format!("the source speaks protocol version {version}, this destination {VERSION}");
            no(ErrorCode::Version, "checking Hello", cause)
        }
        Ok(Message::Error { code, text }) => Err(ReceiveError {
            peer: peer.to_owned(),
            op: "waiting for Hello".into(),
            cause: format!("the peer sent error {code}: {}", escape_control(&text)),
            resumable: false,
        }),
        Ok(other) => {
            let cause = format!("expected Hello, got {}", other.name());
            no(ErrorCode::Protocol, "starting the session", cause)
        }
        Err(e @ ProtoError::Io { .. }) | Err(e @ ProtoError::Closed) => Err(ReceiveError {
            peer: peer.to_owned(),
            op: "waiting for Hello".into(),
            cause: e.to_string(),
            resumable: false,
        }),
        Err(e) => no(ErrorCode::Protocol, "waiting for Hello", e.to_string()),
    }
}

/// Serves session `s` on a connection whose `Hello` was accepted: sends `Welcome` (`resumed` when the
/// session continues), then applies rounds until `Done`. Every frame is due within `cfg.idle_timeout`.
///
/// # Errors
/// [`ReceiveError`] naming the peer, the step and the cause; `resumable` when the connection was lost
/// rather than the session refused. The source gets an `Error` frame first when the cause is its own
/// message.
pub fn run_session<S: Read + Write + Timeouts>(
    stream: &mut S,
    peer: &str,
    cfg: &ReceiverConfig,
    s: &mut Session,
    resumed: bool,
) -> Result<Received, ReceiveError> {
    let limit = cfg.idle_timeout;
    let fail = |op: &str, cause: String, resumable: bool| ReceiveError {
        peer: peer.to_owned(),
        op: op.into(),
        cause,
        resumable,
    };
    let mut out = Vec::new();
    let mut send = |stream: &mut S, m: Message, op: &str| {
        m.write_to(&mut Deadlined::new(stream, limit), &mut out).map_err(|e| fail(op, e.to_string(), true))
    };
    send(stream, Message::Welcome { version: VERSION, resumed, received: s.received }, "sending Welcome")?;
    loop {
        let at = format!("in round {}", s.rounds);
        let msg = match Message::read_from(&mut Deadlined::new(&mut *stream, limit)) {
            Ok(m) => m,
            Err(ProtoError::Closed) => {
                let cause = "the source closed the connection before the migration finished".into();
                return Err(fail(&at, cause, true));
            }
            Err(e @ ProtoError::Io { .. }) => return Err(fail(&at, e.to_string(), true)),
            Err(e) => return Err(refuse(stream, limit, peer, ErrorCode::Protocol, &at, e.to_string())),
        };
        match msg {
            Message::Pages { slot, first, data } => {
                let count = (data.len() / PAGE_SIZE) as u64;
                let dst = match s.pages_mut(slot, first, data.len()) {
                    Ok(dst) => dst,
                    Err(cause) => {
                        return Err(refuse(
                            stream,
                            limit,
                            peer,
                            ErrorCode::Protocol,
                            "applying pages",
                            cause,
                        ));
                    }
                };
                dst.copy_from_slice(&data);
                s.received = s.received.saturating_add(count);
                s.digest = None;
            }
            Message::RoundEnd { round, .. } => {
                let Some(next) = round.checked_add(1) else {
                    let cause = format!("round number {round} leaves no room for the round after it");
                    return Err(refuse(stream, limit, peer, ErrorCode::Protocol, &at, cause));
                };
                s.rounds = next;
                send(stream, Message::RoundAck { round, received: s.received }, "acknowledging a round")?;
                if cfg.exit_after_rounds.is_some_and(|n| s.rounds >= n) {
                    // The test hook: vanish as a killed process would, without a goodbye.
                    eprintln!("tdp receive: --exit-after-rounds {} reached: exiting abruptly", s.rounds);
                    std::process::exit(3);
                }
                if !s.dropped && cfg.drop_after_rounds.is_some_and(|n| s.rounds >= n) {
                    s.dropped = true;
                    // The test hook: the connection breaks (dropped with the stream), the session stays.
                    let cause = "connection dropped by --drop-after-rounds".into();
                    return Err(fail(&format!("after round {round}"), cause, true));
                }
            }
            Message::DigestRequest => {
                if let Some((slot, page)) = cfg.corrupt_page
                    && let Some(byte) = s.pages_mut(slot, page, PAGE_SIZE).ok().and_then(|p| p.first_mut())
                {
                    *byte ^= 0x5a;
                    eprintln!("tdp receive: --corrupt-page {slot}:{page}: flipped a byte before the digest");
                }
                let (hash, slots) = s.digests();
                s.digest = Some((hex(&hash), slots));
                send(stream, Message::Digest { hash, received: s.received }, "sending the digest")?;
            }
            Message::Done { matched } => {
                let Some((digest, slots)) = s.digest.clone() else {
                    let cause = "Done before any digest".into();
                    return Err(refuse(stream, limit, peer, ErrorCode::Protocol, "finishing", cause));
                };
                let _ = Deadlined::new(&mut *stream, limit).flush();
                return Ok(Received {
                    peer: peer.to_owned(),
                    pages: s.pages,
                    slots,
                    rounds: s.rounds,
                    pages_received: s.received,
                    digest,
                    matched,
                    reconnects: s.reconnects,
                    elapsed_ms: u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            Message::Error { code, text } => {
                let cause = format!("the source aborted (error {code}): {}", escape_control(&text));
                return Err(fail(&at, cause, false));
            }
            other => {
                let cause = format!("unexpected {} message", other.name());
                return Err(refuse(stream, limit, peer, ErrorCode::Protocol, &at, cause));
            }
        }
    }
}

/// Serves one connection from `peer` for `session` (created by the connection's `Hello`, or resumed)
/// without threads: [`handshake`], [`Session::open`] (or the held session) and [`run_session`]. A
/// connection that fails before its `Hello` was accepted leaves `session` alone and its error is
/// marked resumable (the session may still be resumed); a session that loses its connection stays in
/// `session`.
///
/// ```
/// use tdp_cli::proto::Message;
/// use tdp_cli::receiver::{serve, ReceiverConfig};
/// // Anything but a tdp stream is refused with a clear error; no session is created.
/// let mut session = None;
/// let mut http = std::io::Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec());
/// let e = serve(&mut http, "probe".into(), ReceiverConfig::new(1 << 20), &mut session).unwrap_err();
/// assert!(e.to_string().contains("bad frame length"), "{e}");
/// assert!(session.is_none());
/// ```
///
/// # Errors
/// As [`handshake`] and [`run_session`]; [`ErrorCode::TooLarge`] when the memory cannot be held.
pub fn serve<S: Read + Write + Timeouts>(
    mut stream: S,
    peer: String,
    cfg: ReceiverConfig,
    session: &mut Option<Session>,
) -> Result<Received, ReceiveError> {
    let o = handshake(&mut stream, &peer, &cfg).map_err(|e| ReceiveError { resumable: true, ..e })?;
    let resumed = session.as_ref().is_some_and(|s| s.resumes(&o));
    let mut s = match session.take() {
        Some(s) if resumed => s,
        held => {
            let reconnects = held.as_ref().map_or(0, |s| s.reconnects);
            drop(held);
            Session::open(&o, reconnects).map_err(|CannotHold(cause)| {
                let limit = cfg.handshake_timeout;
                refuse(&mut stream, limit, &peer, ErrorCode::TooLarge, "reserving memory", cause)
            })?
        }
    };
    let r = run_session(&mut stream, &peer, &cfg, &mut s, resumed);
    if r.as_ref().is_err_and(|e| e.resumable) {
        *session = Some(s);
    }
    r
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stream type a receiver serves, for callers that name it.
pub type Stream = std::net::TcpStream;

#[cfg(test)]
mod tests;
