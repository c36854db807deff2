//! The receiver as a small server: an accept loop that hands each connection to a thread, at most
//! `max_connections` at once (further ones are closed as soon as they are accepted), and one session
//! slot shared by the threads. A connection that is not a session (a port check, random bytes, an
//! HTTP request, a half header, a trickle) ends with one sanitized log line and the server keeps
//! serving; a session in progress never notices it.
//!
//! The slot holds at most one session: *busy* while a connection serves it, *parked* while it waits
//! (up to the idle timeout) for its source to reconnect. A second source is refused while one is
//! busy; a new session replaces a parked one (whose source, if it comes back, is told to start over).
//!
//! Keeps: I5 for the network peer (bounded threads, bounded memory per connection, deadlines on
//! everything a peer controls; `EINTR` on `accept` retried).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    CannotHold, Opening, ReceiveError, Received, ReceiverConfig, Session, handshake, refuse, run_session,
};
use crate::mock::lock;
use crate::proto::ErrorCode;
use crate::sanitize::escape_control;

/// How often the accept loop looks for new connections and parked sessions that timed out.
const POLL: Duration = Duration::from_millis(20);
/// The stack of a connection thread (frames live on the heap).
const THREAD_STACK: usize = 256 << 10;

/// A receiver serving on a listener; [`Server::next_session`] returns each session's outcome.
pub struct Server {
    listener: TcpListener,
    cfg: ReceiverConfig,
    shared: Arc<Shared>,
    ended_tx: Sender<Ended>,
    ended_rx: Receiver<Ended>,
    last_accept_error: Option<Instant>,
}

type Ended = Result<Received, ReceiveError>;

/// What the connection threads share.
struct Shared {
    slot: Mutex<Slot>,
    /// Connection threads alive (incremented by the accept loop, decremented by the thread's guard).
    open: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    busy: bool,
    parked: Option<Parked>,
}

struct Parked {
    session: Session,
    since: Instant,
    error: ReceiveError,
}

/// Decrements the open-connection count when a connection thread ends, however it ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load in `admit`; the count only bounds threads.
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

impl Server {
    /// Serves on `listener` (switched to non-blocking accepts).
    ///
    /// # Errors
    /// The socket error of making the listener non-blocking.
    pub fn new(listener: TcpListener, cfg: ReceiverConfig) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let (ended_tx, ended_rx) = mpsc::channel();
        let shared = Arc::new(Shared { slot: Mutex::new(Slot::default()), open: AtomicUsize::new(0) });
        Ok(Server { listener, cfg, shared, ended_tx, ended_rx, last_accept_error: None })
    }

    /// Accepts and serves connections until a session ends (completed, failed, or its source did not
    /// reconnect within the idle timeout), and returns that session's outcome. Connections that are
    /// not sessions are logged on stderr and never end this call.
    ///
    /// # Errors
    /// The [`ReceiveError`] of a session that failed.
    pub fn next_session(&mut self) -> Result<Received, ReceiveError> {
        loop {
            if let Some(e) = self.expire_parked() {
                return Err(e);
            }
            self.accept_pending();
            match self.ended_rx.recv_timeout(POLL) {
                Ok(ended) => return ended,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
        }
    }

    /// Connection threads alive now.
    #[must_use]
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// The parked session's failure when it waited longer than the idle timeout for its source.
    fn expire_parked(&self) -> Option<ReceiveError> {
        let mut slot = lock(&self.shared.slot);
        if slot.parked.as_ref().is_none_or(|p| p.since.elapsed() < self.cfg.idle_timeout) {
            return None;
        }
        let p = slot.parked.take()?;
        drop(slot);
        if self.cfg.log_connections {
            eprintln!(
                "tdp receive: the session from {} ends: its source did not reconnect within {} s",
                p.error.peer,
                self.cfg.idle_timeout.as_secs()
            );
        }
        Some(ReceiveError {
            op: "waiting for the source to reconnect".into(),
            cause: format!(
                "no reconnection within {} s (the connection was lost {}: {})",
                self.cfg.idle_timeout.as_secs(),
                p.error.op,
                p.error.cause
            ),
            ..p.error
        })
    }

    /// Accepts every connection waiting in the backlog.
    fn accept_pending(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of file descriptors or memory: the server survives; say so at most once a second.
                    if self.last_accept_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        eprintln!("tdp receive: accepting a connection failed: {e}; still listening");
                        self.last_accept_error = Some(Instant::now());
                    }
                    return;
                }
            }
        }
    }

    /// Serves `stream` on a thread, or closes it at once when `max_connections` are open.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let open = self.shared.open.load(Ordering::Acquire);
        if open >= self.cfg.max_connections.max(1) {
            drop(stream);
            eprintln!("tdp receive: connection from {peer} refused: {open} connections are open, the limit");
            return;
        }
        // Relaxed would do (only this thread increments); AcqRel keeps the pairing with the guard plain.
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(Arc::clone(&self.shared));
        let (cfg, tx) = (self.cfg, self.ended_tx.clone());
        let spawned = std::thread::Builder::new()
            .name("tdp-receive-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let line = connection(stream, peer, &cfg, &guard.0, &tx);
                if cfg.log_connections {
                    eprintln!("tdp receive: connection from {peer} {}", escape_control(&line));
                }
                drop(guard);
            });
        if let Err(e) = spawned {
            // The closure (stream and guard) was dropped with the error: the count is already back.
            eprintln!("tdp receive: connection from {peer} refused: cannot start a thread: {e}");
        }
    }
}

/// Serves one connection and returns how it ended, for the log line. Session outcomes go to `ended`.
fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    cfg: &ReceiverConfig,
    shared: &Shared,
    ended: &Sender<Ended>,
) -> String {
    let peer_s = peer.to_string();
    if let Err(e) = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true)) {
        return format!("closed: configuring the socket: {e}");
    }
    let o = match handshake(&mut stream, &peer_s, cfg) {
        Ok(o) => o,
        Err(e) => return format!("closed: not a migration session: {}: {}", e.op, e.cause),
    };
    let Some((mut s, resumed)) = claim(&mut stream, &peer_s, cfg, shared, &o) else {
        return "refused: another source is migrating to this receiver, or its memory cannot be held \
                (the source was sent an Error frame)"
            .into();
    };
    if cfg.log_connections {
        eprintln!(
            "tdp receive: session {:#x} from {peer} {}: {} pages ({}) in {} memslot(s)",
            o.session,
            if resumed { "resumed" } else { "opened" },
            o.pages(),
            crate::units::human_bytes(s.bytes() as u64),
            o.slots.len()
        );
    }
    let result = run_session(&mut stream, &peer_s, cfg, &mut s, resumed);
    drop(stream);
    let mut slot = lock(&shared.slot);
    slot.busy = false;
    match result {
        Ok(r) => {
            drop(slot);
            let line =
                format!("ended: session {:#x} complete, {} pages received", o.session, r.pages_received);
            let _ = ended.send(Ok(r));
            line
        }
        Err(e) if e.resumable && s.lost_connection() => {
            let line = format!(
                "lost: {}: {}; keeping the session's memory and waiting for the source to reconnect",
                e.op, e.cause
            );
            slot.parked = Some(Parked { session: s, since: Instant::now(), error: e });
            line
        }
        Err(e) => {
            drop(slot);
            let line = format!("ended: session {:#x} failed: {}: {}", o.session, e.op, e.cause);
            let _ = ended.send(Err(e));
            line
        }
    }
}

/// Takes the session slot for `o`: resumes the parked session it names, or replaces a parked one with
/// a new session (memory reserved outside the lock). `None` after refusing with an `Error` frame: a
/// session is busy on another connection, or the memory cannot be held.
fn claim(
    stream: &mut TcpStream,
    peer: &str,
    cfg: &ReceiverConfig,
    shared: &Shared,
    o: &Opening,
) -> Option<(Session, bool)> {
    let limit = cfg.handshake_timeout;
    let mut slot = lock(&shared.slot);
    if slot.busy {
        drop(slot);
        let cause = "another source is migrating to this receiver; try again when it is done".into();
        refuse(stream, limit, peer, ErrorCode::Other, "claiming the session", cause);
        return None;
    }
    let parked = slot.parked.take();
    if let Some(p) = parked.filter(|p| p.session.resumes(o)) {
        slot.busy = true;
        return Some((p.session, true));
    }
    slot.busy = true;
    drop(slot); // the replaced session (if any) is freed here, before the new one is reserved
    match Session::open(o, 0) {
        Ok(s) => Some((s, false)),
        Err(CannotHold(cause)) => {
            lock(&shared.slot).busy = false;
            refuse(stream, limit, peer, ErrorCode::TooLarge, "reserving memory", cause);
            None
        }
    }
}

/// Accepts connections on `listener` and serves until one session ends, resuming it after lost
/// connections (a [`Server`] for one session).
///
/// ```
/// use tdp_cli::link::Link;
/// use tdp_cli::proto::{MemoryDigest, SlotInfo};
/// use tdp_cli::receiver::{accept_and_serve, ReceiverConfig};
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let dest = std::thread::spawn(move || accept_and_serve(&listener, ReceiverConfig::new(1 << 20)));
/// // A port check first: logged, and the receiver keeps serving.
/// drop(std::net::TcpStream::connect(addr)?);
/// let mut link = Link::connect(addr, None)?;
/// // Two memslots: one page at 0, two pages at 1 MiB.
/// let slots = [SlotInfo::new(0, 0, 1), SlotInfo::new(1, 1 << 20, 2)];
/// assert!(!link.hello(&slots, 42, false)?, "a new session");
/// link.send_pages(1, 1, &[7u8; 4096], 0)?;
/// link.end_round(0, 1)?;
/// let (hash, received) = link.digest()?;
/// link.done(true)?;
/// let mut expected = MemoryDigest::new();
/// expected.slot(&slots[0]);
/// expected.pages(&[0u8; 4096]);
/// expected.slot(&slots[1]);
/// expected.pages(&[0u8; 4096]);
/// expected.pages(&[7u8; 4096]);
/// assert_eq!((hash, received), (expected.finish(), 1));
/// assert!(dest.join().map_err(|_| "receiver thread")??.matched);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ReceiveError`] for a listener that cannot be cloned or made non-blocking, or a session that
/// failed.
pub fn accept_and_serve(listener: &TcpListener, cfg: ReceiverConfig) -> Result<Received, ReceiveError> {
    let setup = |e: io::Error| ReceiveError {
        peer: listener.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string()),
        op: "setting up the listener".into(),
        cause: e.to_string(),
        resumable: false,
    };
    let listener = listener.try_clone().map_err(setup)?;
    Server::new(listener, cfg).map_err(setup)?.next_session()
}

/// Binds a loopback listener and serves one session on a thread: the destination plain `tdp migrate`
/// uses. Returns the bound address and the thread.
///
/// # Errors
/// The bind failure.
pub fn spawn_loopback(
    cfg: ReceiverConfig,
) -> io::Result<(SocketAddr, std::thread::JoinHandle<Result<Received, ReceiveError>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut server = Server::new(listener, cfg)?;
    let handle =
        std::thread::Builder::new().name("tdp-receive".into()).spawn(move || server.next_session())?;
    Ok((addr, handle))
}
