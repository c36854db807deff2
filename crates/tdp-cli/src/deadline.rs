//! Reads and writes with an overall deadline: [`Deadlined`] re-arms the socket timeout before every
//! system call with the time *left* (in slices, so a stop signal is noticed within a quarter second), so a peer that trickles one byte a second cannot stretch a frame
//! past its deadline (a plain `SO_RCVTIMEO` restarts with every byte). Interrupted calls (`EINTR`, e.g.
//! after the process was stopped and continued) are retried.
//!
//! Keeps: I5 for the network peer (no peer holds a connection, a slot or a thread past a deadline).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A stream whose blocking calls can be given a timeout: a `TcpStream`, or a test's scripted stream.
pub trait Timeouts {
    /// Sets the timeout of the next reads (`None`: block).
    ///
    /// # Errors
    /// The socket's error.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Sets the timeout of the next writes (`None`: block).
    ///
    /// # Errors
    /// The socket's error.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

/// In-memory streams never block: the timeouts are ignored.
impl<T> Timeouts for std::io::Cursor<T> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl<T: Timeouts + ?Sized> Timeouts for &mut T {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(t)
    }
}

/// `inner` with every read and write due by `deadline`; past it, calls fail with
/// [`io::ErrorKind::TimedOut`] naming `limit`. Once SIGINT or SIGTERM arrived (see
/// [`crate::signals`]) calls fail with a stop error, except a write that already sent part of its
/// frame: it gets [`STOP_GRACE`] to finish, so the `Error` frame that follows is read as one.
pub struct Deadlined<'a, S> {
    inner: &'a mut S,
    deadline: Instant,
    limit: Duration,
    stoppable: bool,
    wrote: bool,
}

/// How long a frame already partly written may take to finish after a stop signal.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

impl<'a, S: Timeouts> Deadlined<'a, S> {
    /// Everything through this wrapper must be done within `limit` from now.
    pub fn new(inner: &'a mut S, limit: Duration) -> Deadlined<'a, S> {
        Deadlined { inner, deadline: Instant::now() + limit, limit, stoppable: true, wrote: false }
    }

    /// As [`Deadlined::new`], but a stop signal does not end it: for the `Error` frame that tells the
    /// peer why the connection ends.
    pub fn unstoppable(inner: &'a mut S, limit: Duration) -> Deadlined<'a, S> {
        Deadlined { stoppable: false, ..Deadlined::new(inner, limit) }
    }

    /// The time left, capped at [`crate::signals::CHECK_EVERY`] so a stop signal is seen; the timeout
    /// error when none is left, or a stop error when SIGINT or SIGTERM arrived.
    fn left(&mut self) -> io::Result<Duration> {
        if let Some(sig) = crate::signals::received().filter(|_| self.stoppable) {
            if !self.wrote {
                return Err(io::Error::other(format!("interrupted by {}", sig.name())));
            }
            self.deadline = self.deadline.min(Instant::now() + STOP_GRACE);
            self.stoppable = false;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("not done within the {:.1} s deadline", self.limit.as_secs_f64()),
            ))
        } else {
            Ok(left.min(crate::signals::CHECK_EVERY))
        }
    }
}

/// Whether a failed call is worth repeating: interrupted, or the socket timeout (the deadline check then
/// decides).
fn again(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl<S: Read + Timeouts> Read for Deadlined<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = self.left()?;
            self.inner.set_read_timeout(Some(left))?;
            match self.inner.read(buf) {
                Err(e) if again(&e) => {}
                r => return r,
            }
        }
    }
}

impl<S: Write + Timeouts> Write for Deadlined<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let left = self.left()?;
            self.inner.set_write_timeout(Some(left))?;
            match self.inner.write(buf) {
                Err(e) if again(&e) => {}
                Ok(n) => {
                    self.wrote |= n > 0;
                    return Ok(n);
                }
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        loop {
            self.left()?;
            match self.inner.flush() {
                Err(e) if again(&e) => {}
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn i5_a_trickle_cannot_extend_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let limit = Duration::from_millis(300);
        let start = Instant::now();
        // One byte every 50 ms: each read succeeds, but the frame of 1000 bytes never completes.
        let writer = std::thread::spawn(move || {
            for _ in 0..100 {
                if client.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut buf = [0u8; 1000];
        let err = Deadlined::new(&mut server, limit).read_exact(&mut buf).expect_err("the deadline passes");
        let took = start.elapsed();
        drop(server);
        let _ = writer.join();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(took >= limit, "{took:?}");
        assert!(took < Duration::from_secs(4), "the trickle (5 s) did not extend it: {took:?}");
    }
}
