//! The destination: `tdp receive` (and the loopback receiver `tdp migrate` starts on a thread). It
//! accepts one connection, holds the guest memory the source announces, applies page runs, acknowledges
//! rounds and answers the digest request with a BLAKE3 digest of everything it holds.
//!
//! Keeps: I5 for the network peer (memory allocated only after the size passed `max_memory`; page runs
//! checked against it; protocol violations are answered with an `Error` frame and a clear error).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::proto::{ErrorCode, Message, PAGE_SIZE, ProtoError, VERSION};

/// What the receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The most guest memory it will hold, bytes.
    pub max_memory: u64,
    /// Test hook: exit the process (status 3) after acknowledging this many rounds, as if killed.
    pub exit_after_rounds: Option<u32>,
    /// How long to wait for the next message.
    pub idle_timeout: Duration,
}

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
    /// Wall time of the session, ms.
    pub elapsed_ms: u64,
}

/// A failed session.
#[derive(Debug, thiserror::Error)]
#[error("source {peer}: {op}: {cause}")]
pub struct ReceiveError {
    /// The source's address (or the listen address before one connected).
    pub peer: String,
    /// What the receiver was doing.
    pub op: String,
    /// Why it failed.
    pub cause: String,
}

/// Accepts one connection on `listener` and serves it.
///
/// # Errors
/// [`ReceiveError`] for a failed accept or session.
pub fn accept_and_serve(listener: &TcpListener, cfg: ReceiverConfig) -> Result<Received, ReceiveError> {
    let local = listener.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let (stream, peer) = listener.accept().map_err(|e| ReceiveError {
        peer: local,
        op: "accepting a connection".into(),
        cause: e.to_string(),
    })?;
    let peer = peer.to_string();
    let setup = |e: std::io::Error| ReceiveError {
        peer: peer.clone(),
        op: "configuring the socket".into(),
        cause: e.to_string(),
    };
    stream.set_read_timeout(Some(cfg.idle_timeout)).map_err(setup)?;
    stream.set_nodelay(true).map_err(setup)?;
    serve(stream, peer.clone(), cfg)
}

/// Serves one session on `stream` from `peer`.
///
/// # Errors
/// [`ReceiveError`] naming the peer, the step and the cause; the source gets an `Error` frame first
/// when the cause is the source's own message.
pub fn serve<S: Read + Write>(
    mut stream: S,
    peer: String,
    cfg: ReceiverConfig,
) -> Result<Received, ReceiveError> {
    let started = Instant::now();
    let fail = |op: &str, cause: String| ReceiveError { peer: peer.clone(), op: op.into(), cause };
    let mut scratch = Vec::new();
    let mut refuse = |stream: &mut S, code: ErrorCode, op: &str, cause: String| {
        let _ = Message::Error { code: code as u16, text: cause.clone() }.write_to(stream, &mut scratch);
        fail(op, cause)
    };
    let pages = match Message::read_from(&mut stream) {
        Ok(Message::Hello { version, page_size, pages }) => {
            if version != VERSION {
                let cause =
                    format!("the source speaks protocol version {version}, this destination {VERSION}");
                return Err(refuse(&mut stream, ErrorCode::Version, "checking Hello", cause));
            }
            if page_size as usize != PAGE_SIZE {
                let cause = format!("page size {page_size} is not supported (only {PAGE_SIZE})");
                return Err(refuse(&mut stream, ErrorCode::Protocol, "checking Hello", cause));
            }
            if pages == 0 || pages.saturating_mul(PAGE_SIZE as u64) > cfg.max_memory {
                let cause = format!(
                    "{pages} pages ({} bytes) is outside 1 page to the receiver's limit of {} (see --max-memory)",
                    pages.saturating_mul(PAGE_SIZE as u64),
                    crate::units::human_bytes(cfg.max_memory)
                );
                return Err(refuse(&mut stream, ErrorCode::TooLarge, "checking Hello", cause));
            }
            pages
        }
        Ok(other) => {
            let cause = format!("expected Hello, got {}", other.name());
            return Err(refuse(&mut stream, ErrorCode::Protocol, "starting the session", cause));
        }
        Err(e) => return Err(fail("waiting for Hello", e.to_string())),
    };
    let len = usize::try_from(pages * PAGE_SIZE as u64)
        .map_err(|_| fail("allocating memory", "too large".into()))?;
    let mut memory = vec![0u8; len];
    let mut out = Vec::new();
    Message::Welcome { version: VERSION }
        .write_to(&mut stream, &mut out)
        .map_err(|e| fail("sending Welcome", e.to_string()))?;

    let (mut rounds, mut received) = (0u32, 0u64);
    let mut digest_sent: Option<String> = None;
    loop {
        let msg = match Message::read_from(&mut stream) {
            Ok(m) => m,
            Err(ProtoError::Closed) => {
                return Err(fail(
                    &format!("in round {rounds}"),
                    "the source closed the connection before the migration finished".into(),
                ));
            }
            Err(e) => {
                let cause = e.to_string();
                return Err(refuse(
                    &mut stream,
                    ErrorCode::Protocol,
                    &format!("reading round {rounds}"),
                    cause,
                ));
            }
        };
        match msg {
            Message::Pages { first, data } => {
                let count = (data.len() / PAGE_SIZE) as u64;
                if first.checked_add(count).is_none_or(|end| end > pages) {
                    let cause = format!("pages {first}..+{count} lie outside the {pages} pages announced");
                    return Err(refuse(&mut stream, ErrorCode::Protocol, "applying pages", cause));
                }
                let at = first as usize * PAGE_SIZE;
                memory[at..at + data.len()].copy_from_slice(&data);
                received += count;
            }
            Message::RoundEnd { round, .. } => {
                rounds = round + 1;
                Message::RoundAck { round, received }
                    .write_to(&mut stream, &mut out)
                    .map_err(|e| fail("acknowledging a round", e.to_string()))?;
                if cfg.exit_after_rounds.is_some_and(|n| rounds >= n) {
                    // The test hook: vanish as a killed process would, without a goodbye.
                    eprintln!("tdp receive: --exit-after-rounds {rounds} reached: exiting abruptly");
                    std::process::exit(3);
                }
            }
            Message::DigestRequest => {
                let hash = *blake3::hash(&memory).as_bytes();
                digest_sent = Some(hex(&hash));
                Message::Digest { hash, received }
                    .write_to(&mut stream, &mut out)
                    .map_err(|e| fail("sending the digest", e.to_string()))?;
            }
            Message::Done { matched } => {
                let Some(digest) = digest_sent else {
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
                    pages,
                    rounds,
                    pages_received: received,
                    digest,
                    matched,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                });
            }
            Message::Error { code, text } => {
                return Err(fail(
                    &format!("in round {rounds}"),
                    format!("the source aborted (error {code}): {text}"),
                ));
            }
            other => {
                let cause = format!("unexpected {} message", other.name());
                return Err(refuse(&mut stream, ErrorCode::Protocol, &format!("in round {rounds}"), cause));
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
mod tests {
    use super::*;

    const CFG: ReceiverConfig =
        ReceiverConfig { max_memory: 1 << 20, exit_after_rounds: None, idle_timeout: Duration::from_secs(5) };

    /// A duplex stand-in: reads a scripted input, collects what the receiver writes.
    struct Script {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for m in msgs {
            m.encode(&mut buf);
            all.extend_from_slice(&buf);
        }
        all
    }

    fn run(msgs: &[Message]) -> (Result<Received, ReceiveError>, Vec<Message>) {
        let mut s = Script { input: std::io::Cursor::new(frames(msgs)), output: Vec::new() };
        let r = serve(&mut s, "test".into(), CFG);
        let mut replies = Vec::new();
        let mut out = s.output.as_slice();
        while let Ok(m) = Message::read_from(&mut out) {
            replies.push(m);
        }
        (r, replies)
    }

    fn hello(pages: u64) -> Message {
        Message::Hello { version: VERSION, page_size: PAGE_SIZE as u32, pages }
    }

    #[test]
    fn a_session_applies_pages_and_digests_them() {
        let data = vec![7u8; 2 * PAGE_SIZE];
        let (r, replies) = run(&[
            hello(4),
            Message::Pages { first: 1, data: data.clone() },
            Message::RoundEnd { round: 0, pages: 2 },
            Message::DigestRequest,
            Message::Done { matched: true },
        ]);
        let r = r.expect("the session succeeds");
        let mut want = vec![0u8; 4 * PAGE_SIZE];
        want[PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&data);
        assert_eq!(r.digest, hex(blake3::hash(&want).as_bytes()));
        assert_eq!((r.pages, r.rounds, r.pages_received), (4, 1, 2));
        assert!(matches!(replies[1], Message::RoundAck { round: 0, received: 2 }));
    }

    #[test]
    fn bad_sessions_are_refused_with_an_error_frame() {
        let too_big = hello((1 << 20) / PAGE_SIZE as u64 + 1);
        let old = Message::Hello { version: 0, page_size: PAGE_SIZE as u32, pages: 1 };
        let outside = Message::Pages { first: 3, data: vec![0; 2 * PAGE_SIZE] };
        for (msgs, want) in [
            (vec![too_big], "limit"),
            (vec![old], "version"),
            (vec![Message::DigestRequest], "expected Hello"),
            (vec![hello(4), outside], "outside"),
            (vec![hello(4), Message::Done { matched: true }], "Done before"),
            (vec![hello(4), Message::Welcome { version: 1 }], "unexpected Welcome"),
        ] {
            let (r, replies) = run(&msgs);
            let err = r.expect_err("refused").to_string();
            assert!(err.contains(want), "{err}");
            assert!(
                replies.iter().any(|m| matches!(m, Message::Error { .. })),
                "{want}: an Error frame was sent"
            );
        }
    }

    #[test]
    fn a_source_that_vanishes_is_a_clear_error() {
        let (r, _) = run(&[hello(4), Message::Pages { first: 0, data: vec![1; PAGE_SIZE] }]);
        let err = r.expect_err("cut off").to_string();
        assert!(err.contains("closed the connection before the migration finished"), "{err}");
    }
}
