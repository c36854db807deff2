//! The destination: `tdp receive` (and the loopback receiver `tdp migrate` starts on a thread). It
//! serves one migration session: holds the guest memory the source announces, applies page runs,
//! acknowledges rounds and answers the digest request with a BLAKE3 digest of everything it holds. A
//! connection lost mid-session does not lose the memory: the receiver waits (up to its idle timeout)
//! for the source to reconnect and resume the session (see [`crate::proto`]).
//!
//! Keeps: I5 for the network peer (memory allocated only after the size passed `max_memory`; page runs
//! checked against it; protocol violations are answered with an `Error` frame and a clear error).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use std::time::Instant;

use crate::proto::{ErrorCode, Message, PAGE_SIZE, ProtoError, VERSION};

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
    /// Test hook: flip a byte of this page before computing the digest, so the source must see a
    /// mismatch (proof that the verification can fail).
    pub corrupt_page: Option<u64>,
    /// How long to wait for the next message, and for a source to reconnect.
    pub idle_timeout: Duration,
}

/// The most times one session may be resumed after a lost connection.
pub const MAX_RECONNECTS: u32 = 8;

/// What a finished session looked like.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    /// The source's address.
    pub peer: String,
    /// Pages of memory held.
    pub pages: u64,
    /// Rounds received (final round included).
    pub rounds: u32,
    /// Pages applied (repeats included).
    pub pages_received: u64,
    /// Hex digest of the memory held.
    pub digest: String,
    /// The source's verdict on the digests.
    pub matched: bool,
    /// Connections the session lost and resumed.
    pub reconnects: u32,
    /// Wall time of the session, ms.
    pub elapsed_ms: u64,
}

/// A failed session (or connection).
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
pub struct Session {
    id: u64,
    pages: u64,
    memory: Vec<u8>,
    rounds: u32,
    received: u64,
    digest: Option<String>,
    dropped: bool,
    reconnects: u32,
    started: Instant,
}

/// Accepts connections on `listener` and serves one session, resuming it after lost connections.
///
/// ```
/// use std::time::Duration;
/// use tdp_cli::link::Link;
/// use tdp_cli::receiver::{accept_and_serve, ReceiverConfig};
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let cfg = ReceiverConfig { max_memory: 1 << 20, exit_after_rounds: None, drop_after_rounds: None,
///     corrupt_page: None, idle_timeout: Duration::from_secs(5) };
/// let dest = std::thread::spawn(move || accept_and_serve(&listener, cfg));
/// let mut link = Link::connect(addr, None)?;
/// assert!(!link.hello(2, 42, false)?, "a new session");
/// link.send_pages(1, &[7u8; 4096], 0)?;
/// link.end_round(0, 1)?;
/// let (hash, received) = link.digest()?;
/// link.done(true)?;
/// let mut memory = vec![0u8; 2 * 4096];
/// memory[4096..].fill(7);
/// assert_eq!((hash, received), (*blake3::hash(&memory).as_bytes(), 1));
/// assert!(dest.join().map_err(|_| "receiver thread")??.matched);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ReceiveError`] for a failed accept, a refused session, or a connection lost with no reconnection
/// within the idle timeout.
pub fn accept_and_serve(listener: &TcpListener, cfg: ReceiverConfig) -> Result<Received, ReceiveError> {
    let local = listener.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let mut session: Option<Session> = None;
    loop {
        let waiting = session.is_some();
        let (stream, peer) =
            accept(listener, waiting.then_some(cfg.idle_timeout)).map_err(|e| ReceiveError {
                peer: local.clone(),
                op: if waiting {
                    "waiting for the source to reconnect".into()
                } else {
                    "accepting a connection".into()
                },
                cause: e.to_string(),
                resumable: false,
            })?;
        let peer = peer.to_string();
        let setup = |e: std::io::Error| ReceiveError {
            peer: peer.clone(),
            op: "configuring the socket".into(),
            cause: e.to_string(),
            resumable: false,
        };
        stream.set_nonblocking(false).map_err(setup)?;
        stream.set_read_timeout(Some(cfg.idle_timeout)).map_err(setup)?;
        stream.set_nodelay(true).map_err(setup)?;
        match serve(stream, peer, cfg, &mut session) {
            Ok(r) => return Ok(r),
            Err(e) if e.resumable && session.as_ref().is_some_and(|s| s.reconnects < MAX_RECONNECTS) => {
                if let Some(s) = &mut session {
                    s.reconnects += 1;
                }
                eprintln!(
                    "tdp receive: {e}; keeping the session's memory and waiting for the source to reconnect"
                );
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one connection, waiting at most `timeout` when given.
fn accept(
    listener: &TcpListener,
    timeout: Option<Duration>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    let Some(timeout) = timeout else {
        listener.set_nonblocking(false)?;
        return listener.accept();
    };
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} s", timeout.as_secs()),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Serves one connection from `peer` for `session` (created by the connection's `Hello`, or resumed).
///
/// # Errors
/// [`ReceiveError`] naming the peer, the step and the cause; `resumable` when the connection was lost
/// rather than the session refused. The source gets an `Error` frame first when the cause is its own
/// message.
pub fn serve<S: Read + Write>(
    mut stream: S,
    peer: String,
    cfg: ReceiverConfig,
    session: &mut Option<Session>,
) -> Result<Received, ReceiveError> {
    let fail = |op: &str, cause: String, resumable: bool| ReceiveError {
        peer: peer.clone(),
        op: op.into(),
        cause,
        resumable,
    };
    let mut scratch = Vec::new();
    let mut refuse = |stream: &mut S, code: ErrorCode, op: &str, cause: String| {
        let _ = Message::Error { code: code as u16, text: cause.clone() }.write_to(stream, &mut scratch);
        fail(op, cause, false)
    };
    // A connection that fails before its Hello was accepted touches no session: while one is held, the
    // receiver keeps waiting for its source (the error is marked resumable).
    let hello = match Message::read_from(&mut stream) {
        Ok(Message::Hello { version, page_size, pages, session, resume }) => {
            let too_big = pages == 0 || pages.saturating_mul(PAGE_SIZE as u64) > cfg.max_memory;
            if version != VERSION {
                let cause =
                    format!("the source speaks protocol version {version}, this destination {VERSION}");
                Err(refuse(&mut stream, ErrorCode::Version, "checking Hello", cause))
            } else if page_size as usize != PAGE_SIZE {
                let cause = format!("page size {page_size} is not supported (only {PAGE_SIZE})");
                Err(refuse(&mut stream, ErrorCode::Protocol, "checking Hello", cause))
            } else if too_big {
                let cause = format!(
                    "{pages} pages ({} bytes) is outside 1 page to the receiver's limit of {} (see --max-memory)",
                    pages.saturating_mul(PAGE_SIZE as u64),
                    crate::units::human_bytes(cfg.max_memory)
                );
                Err(refuse(&mut stream, ErrorCode::TooLarge, "checking Hello", cause))
            } else {
                Ok((session, pages, resume))
            }
        }
        Ok(other) => {
            let cause = format!("expected Hello, got {}", other.name());
            Err(refuse(&mut stream, ErrorCode::Protocol, "starting the session", cause))
        }
        Err(e) => Err(fail("waiting for Hello", e.to_string(), false)),
    };
    let (id, pages, resume) = hello.map_err(|e| ReceiveError { resumable: true, ..e })?;
    let resumed = resume && session.as_ref().is_some_and(|s| s.id == id && s.pages == pages);
    if !resumed {
        let len = usize::try_from(pages * PAGE_SIZE as u64)
            .map_err(|_| fail("allocating memory", "too large".into(), false))?;
        let reconnects = session.as_ref().map_or(0, |s| s.reconnects);
        *session = Some(Session {
            id,
            pages,
            memory: vec![0u8; len],
            rounds: 0,
            received: 0,
            digest: None,
            dropped: false,
            reconnects,
            started: Instant::now(),
        });
    }
    let Some(s) = session.as_mut() else {
        return Err(fail("starting the session", "no session".into(), false));
    };
    let mut out = Vec::new();
    Message::Welcome { version: VERSION, resumed, received: s.received }
        .write_to(&mut stream, &mut out)
        .map_err(|e| fail("sending Welcome", e.to_string(), true))?;

    loop {
        let msg = match Message::read_from(&mut stream) {
            Ok(m) => m,
            Err(ProtoError::Closed) => {
                let cause = "the source closed the connection before the migration finished".into();
                return Err(fail(&format!("in round {}", s.rounds), cause, true));
            }
            Err(e @ ProtoError::Io { .. }) => {
                return Err(fail(&format!("in round {}", s.rounds), e.to_string(), true));
            }
            Err(e) => {
                let cause = e.to_string();
                return Err(refuse(
                    &mut stream,
                    ErrorCode::Protocol,
                    &format!("reading round {}", s.rounds),
                    cause,
                ));
            }
        };
        match msg {
            Message::Pages { first, data } => {
                let count = (data.len() / PAGE_SIZE) as u64;
                if first.checked_add(count).is_none_or(|end| end > s.pages) {
                    let cause =
                        format!("pages {first}..+{count} lie outside the {} pages announced", s.pages);
                    return Err(refuse(&mut stream, ErrorCode::Protocol, "applying pages", cause));
                }
                let at = first as usize * PAGE_SIZE;
                s.memory[at..at + data.len()].copy_from_slice(&data);
                s.received += count;
                s.digest = None;
            }
            Message::RoundEnd { round, .. } => {
                s.rounds = round + 1;
                Message::RoundAck { round, received: s.received }
                    .write_to(&mut stream, &mut out)
                    .map_err(|e| fail("acknowledging a round", e.to_string(), true))?;
                if cfg.exit_after_rounds.is_some_and(|n| s.rounds >= n) {
                    // The test hook: vanish as a killed process would, without a goodbye.
                    eprintln!("tdp receive: --exit-after-rounds {} reached: exiting abruptly", s.rounds);
                    std::process::exit(3);
                }
                if !s.dropped && cfg.drop_after_rounds.is_some_and(|n| s.rounds >= n) {
                    s.dropped = true;
                    // The test hook: the connection breaks (dropped with the stream), the session stays.
                    return Err(fail(
                        &format!("after round {round}"),
                        "connection dropped by --drop-after-rounds".into(),
                        true,
                    ));
                }
            }
            Message::DigestRequest => {
                if let Some(page) = cfg.corrupt_page.filter(|&p| p < s.pages) {
                    let at = page as usize * PAGE_SIZE;
                    s.memory[at] ^= 0x5a;
                    eprintln!("tdp receive: --corrupt-page {page}: flipped a byte before the digest");
                }
                let hash = *blake3::hash(&s.memory).as_bytes();
                s.digest = Some(hex(&hash));
                Message::Digest { hash, received: s.received }
                    .write_to(&mut stream, &mut out)
                    .map_err(|e| fail("sending the digest", e.to_string(), true))?;
            }
            Message::Done { matched } => {
                let Some(digest) = s.digest.clone() else {
                    return Err(refuse(
                        &mut stream,
                        ErrorCode::Protocol,
                        "finishing",
                        "Done before any digest".into(),
                    ));
                };
                let _ = stream.flush();
                return Ok(Received {
                    peer: peer.clone(),
                    pages: s.pages,
                    rounds: s.rounds,
                    pages_received: s.received,
                    digest,
                    matched,
                    reconnects: s.reconnects,
                    elapsed_ms: s.started.elapsed().as_millis() as u64,
                });
            }
            Message::Error { code, text } => {
                return Err(fail(
                    &format!("in round {}", s.rounds),
                    format!("the source aborted (error {code}): {text}"),
                    false,
                ));
            }
            other => {
                let cause = format!("unexpected {} message", other.name());
                return Err(refuse(
                    &mut stream,
                    ErrorCode::Protocol,
                    &format!("in round {}", s.rounds),
                    cause,
                ));
            }
        }
    }
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds a loopback listener and serves one session on a thread: the destination plain `tdp migrate`
/// uses. Returns the bound address and the thread.
///
/// # Errors
/// The bind failure.
pub fn spawn_loopback(
    cfg: ReceiverConfig,
) -> std::io::Result<(std::net::SocketAddr, std::thread::JoinHandle<Result<Received, ReceiveError>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("tdp-receive".into())
        .spawn(move || accept_and_serve(&listener, cfg))?;
    Ok((addr, handle))
}

/// The stream type a receiver serves, for callers that name it.
pub type Stream = TcpStream;

#[cfg(test)]
mod tests;
