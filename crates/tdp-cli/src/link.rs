//! [`Link`]: the source's end of a migration connection. It speaks [`crate::proto`], limits the
//! sending rate when `--bandwidth` asks, and turns every failure into a [`LinkError`] that names the peer
//! and the operation, so "destination 127.0.0.1:7788: waiting for the acknowledgement of round 2: the
//! peer closed the connection" reaches the user instead of a bare errno.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::deadline::{Deadlined, Timeouts};
use crate::proto::{ErrorCode, MAX_RUN, Message, PAGE_SIZE, ProtoError, SlotInfo, VERSION};
use crate::sanitize::escape_control;

/// How long the source waits for any answer, or for the destination to take one frame, before it calls
/// the destination dead: a deadline per frame, which a destination that reads or answers a byte at a
/// time cannot stretch.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the source tries to deliver its `Error` frame when it gives up: a destination that stopped
/// reading does not hold the exit past the reply timeout plus this.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// A failure on the link, with the peer and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("destination {peer}: {op}: {cause}")]
pub struct LinkError {
    /// The destination's address.
    pub peer: String,
    /// What the source was doing.
    pub op: String,
    /// Why it failed.
    pub cause: String,
    /// The destination did not answer, or take what was sent, within [`REPLY_TIMEOUT`]: it is taken as
    /// gone, and not reconnected to.
    pub timed_out: bool,
}

/// Whether a socket error is the deadline passing.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// A socket error in words that say what happened to the peer, with the system's text after it.
fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::BrokenPipe => format!("the destination closed the connection ({e})"),
        ErrorKind::ConnectionReset => format!("the destination reset the connection ({e})"),
        ErrorKind::ConnectionRefused => format!("nothing accepts connections there ({e})"),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("timed out ({e})"),
        _ => e.to_string(),
    }
}

/// The source's end of the connection, over any byte stream (a `TcpStream` in the command).
pub struct Link<S> {
    stream: S,
    peer: String,
    scratch: Vec<u8>,
    limiter: Option<Limiter>,
    /// Bytes written so far (frame headers included).
    pub bytes_sent: u64,
}

/// A token bucket in bytes.
struct Limiter {
    bytes_per_sec: u64,
    start: Instant,
    sent: u64,
}

impl Link<TcpStream> {
    /// Connects to `addr` (with a timeout) and sets the reply timeout.
    ///
    /// # Errors
    /// [`LinkError`] naming the address and the socket error.
    pub fn connect(addr: SocketAddr, bandwidth: Option<u64>) -> Result<Link<TcpStream>, LinkError> {
        let peer = addr.to_string();
        let err = |op: &str, e: std::io::Error| LinkError {
            peer: peer.clone(),
            op: op.into(),
            cause: describe(&e),
            timed_out: false,
        };
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| err("connecting", e))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| err("setting the read timeout", e))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(|e| err("setting the write timeout", e))?;
        stream.set_nodelay(true).map_err(|e| err("setting TCP_NODELAY", e))?;
        Ok(Link::new(stream, peer, bandwidth))
    }
}

impl<S: Read + Write + Timeouts> Link<S> {
    /// Wraps a connected stream to `peer`; `bandwidth` limits the sending rate in bytes/s.
    pub fn new(stream: S, peer: String, bandwidth: Option<u64>) -> Link<S> {
        let limiter = bandwidth.filter(|&b| b > 0).map(|b| Limiter {
            bytes_per_sec: b,
            start: Instant::now(),
            sent: 0,
        });
        Link {
            stream,
            peer,
            scratch: Vec::with_capacity(crate::proto::MAX_FRAME as usize + 4),
            limiter,
            bytes_sent: 0,
        }
    }

    /// The destination's address.
    #[must_use]
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn fail(&self, op: impl Into<String>, cause: impl std::fmt::Display) -> LinkError {
        LinkError { peer: self.peer.clone(), op: op.into(), cause: cause.to_string(), timed_out: false }
    }

    fn send(&mut self, msg: &Message, op: &str) -> Result<(), LinkError> {
        msg.encode(&mut self.scratch);
        self.write_scratch(op)
    }

    fn write_scratch(&mut self, op: &str) -> Result<(), LinkError> {
        let n = self.scratch.len() as u64;
        if let Some(l) = &mut self.limiter {
            l.sent += n;
            let due = Duration::from_secs_f64(l.sent as f64 / l.bytes_per_sec as f64);
            let elapsed = l.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        let result = Deadlined::new(&mut self.stream, REPLY_TIMEOUT).write_all(&self.scratch);
        result.map_err(|e| LinkError { timed_out: is_timeout(&e), ..self.fail(op, describe(&e)) })?;
        self.bytes_sent += n;
        Ok(())
    }

    fn recv(&mut self, op: &str) -> Result<Message, LinkError> {
        match Message::read_from(&mut Deadlined::new(&mut self.stream, REPLY_TIMEOUT)) {
            Ok(Message::Error { code, text }) => {
                let text = escape_control(&text);
                Err(self.fail(op, format!("the destination reported error {code}: {text}")))
            }
            Ok(m) => Ok(m),
            Err(ProtoError::Io { source, .. }) if is_timeout(&source) => Err(LinkError {
                timed_out: true,
                ..self.fail(op, format!("no answer within {} s", REPLY_TIMEOUT.as_secs()))
            }),
            Err(ProtoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.fail(op, "the peer closed the connection in the middle of a message"))
            }
            Err(e) => Err(self.fail(op, e)),
        }
    }

    /// Opens session `session` for the guest memory in `slots` (asking to resume it when `resume`) and
    /// waits for the destination's welcome. Returns whether the destination resumed the session.
    ///
    /// # Errors
    /// [`LinkError`] if the destination refuses (version, slot table, size) or the connection fails.
    pub fn hello(&mut self, slots: &[SlotInfo], session: u64, resume: bool) -> Result<bool, LinkError> {
        let slots = slots.to_vec();
        let hello = Message::Hello { version: VERSION, page_size: PAGE_SIZE as u32, session, resume, slots };
        self.send(&hello, "sending Hello")?;
        let reply = self.recv("waiting for Welcome");
        if reply.is_err()
            && let Some(sig) = crate::signals::received()
        {
            // A signal cut the handshake short: the destination has opened the session, so tell it why
            // the source is going away (the caller never gets a link to abort).
            self.abort(&format!("interrupted by {}", sig.name()));
        }
        match reply? {
            Message::Welcome { version: VERSION, resumed, .. } => Ok(resumed),
            Message::Welcome { version, .. } => Err(self.fail(
                "waiting for Welcome",
                format!("the destination speaks protocol version {version}, this source {VERSION}"),
            )),
            other => Err(self.fail("waiting for Welcome", format!("unexpected {} message", other.name()))),
        }
    }

    /// Sends the pages of memslot `slot` from `first` whose contents are `data` (1 to [`MAX_RUN`] whole
    /// pages).
    ///
    /// # Errors
    /// [`LinkError`] if the write fails.
    pub fn send_pages(&mut self, slot: u32, first: u64, data: &[u8], round: u32) -> Result<(), LinkError> {
        debug_assert!(data.len().is_multiple_of(PAGE_SIZE) && data.len() <= MAX_RUN as usize * PAGE_SIZE);
        crate::proto::encode_pages(slot, first, data, &mut self.scratch);
        self.write_scratch(&format!("sending pages of round {round}"))
    }

    /// Ends round `round` (`pages` sent in it) and waits until the destination applied all of it.
    ///
    /// # Errors
    /// [`LinkError`] if the destination does not acknowledge the round.
    pub fn end_round(&mut self, round: u32, pages: u64) -> Result<u64, LinkError> {
        self.send(&Message::RoundEnd { round, pages }, &format!("ending round {round}"))?;
        let op = format!("waiting for the acknowledgement of round {round}");
        match self.recv(&op)? {
            Message::RoundAck { round: r, received } if r == round => Ok(received),
            other => Err(self.fail(op, format!("unexpected {} message", other.name()))),
        }
    }

    /// Asks for the destination's digest.
    ///
    /// # Errors
    /// [`LinkError`] if no digest comes back.
    pub fn digest(&mut self) -> Result<([u8; 32], u64), LinkError> {
        self.send(&Message::DigestRequest, "requesting the digest")?;
        match self.recv("waiting for the digest")? {
            Message::Digest { hash, received } => Ok((hash, received)),
            other => Err(self.fail("waiting for the digest", format!("unexpected {} message", other.name()))),
        }
    }

    /// Tells the destination the verdict and ends the session.
    ///
    /// # Errors
    /// [`LinkError`] if the write fails.
    pub fn done(&mut self, matched: bool) -> Result<(), LinkError> {
        self.send(&Message::Done { matched }, "sending Done")?;
        Deadlined::new(&mut self.stream, REPLY_TIMEOUT)
            .flush()
            .map_err(|e| self.fail("flushing", describe(&e)))
    }

    /// Sends an `Error` frame, best effort (the link may already be gone): within [`ABORT_TIMEOUT`],
    /// even after a stop signal.
    pub fn abort(&mut self, text: &str) {
        Message::Error { code: ErrorCode::Other as u16, text: text.to_owned() }.encode(&mut self.scratch);
        let _ = Deadlined::unstoppable(&mut self.stream, ABORT_TIMEOUT).write_all(&self.scratch);
    }
}
