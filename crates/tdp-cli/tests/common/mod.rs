//! Helpers for the `tdp` binary tests: running it, parsing its JSON, starting `tdp receive` and reading
//! the address it bound, and the `/dev/kvm` skip rule.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};

/// The binary under test.
pub fn tdp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tdp"))
}

/// Runs `tdp args...` to completion.
pub fn run(args: &[&str]) -> Output {
    tdp().args(args).stdin(Stdio::null()).output().expect("the tdp binary runs")
}

/// Whether `/dev/kvm` can be opened; prints `SKIPPED: <why>` for `test` when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: {test}: cannot open /dev/kvm: {e}");
            false
        }
    }
}

/// The one JSON object a `--json` run printed on stdout.
pub fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("no JSON object on stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line}: {e}"))
}

/// Text of both streams, for assertion messages.
pub fn both(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts `tdp receive --listen 127.0.0.1:0 --json --once extra...` (it exits after one session) and
/// returns it with the address it printed.
pub fn receiver(extra: &[&str]) -> (Child, SocketAddr, BufReader<std::process::ChildStderr>) {
    receiver_with(&[&["--once"], extra].concat())
}

/// Starts `tdp receive --listen 127.0.0.1:0 --json args...` and returns it with the address it printed.
pub fn receiver_with(args: &[&str]) -> (Child, SocketAddr, BufReader<std::process::ChildStderr>) {
    let mut child = tdp()
        .args(["receive", "--listen", "127.0.0.1:0", "--json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tdp receive starts");
    match bound_address(&mut child) {
        Some((addr, err)) => (child, addr, err),
        None => {
            let _ = child.kill();
            let status = child.wait();
            panic!("tdp receive ({status:?}) did not print its address");
        }
    }
}

fn bound_address(child: &mut Child) -> Option<(SocketAddr, BufReader<std::process::ChildStderr>)> {
    let mut err = BufReader::new(child.stderr.take()?);
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(addr) = line.trim().strip_prefix("tdp receive: listening on ") {
            return Some((addr.parse().ok()?, err));
        }
    }
}

/// The rest of a child's stderr.
pub fn rest(mut err: BufReader<std::process::ChildStderr>) -> String {
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut s);
    s
}

/// Lines of a child's output, read on a thread as they come (so the child never blocks on a full pipe)
/// and waited for by count or content.
#[derive(Clone)]
pub struct Lines {
    inner: std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
}

impl Lines {
    /// Starts reading `from` line by line.
    pub fn spawn(from: impl std::io::Read + Send + 'static) -> Lines {
        let lines = Lines { inner: Default::default() };
        let feed = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*feed.inner;
                m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                cv.notify_all();
            }
        });
        lines
    }

    /// Waits (at most `timeout`) until `done` holds for the lines so far; returns whether it did.
    pub fn wait_until(&self, timeout: std::time::Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let (m, cv) = &*self.inner;
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !done(&lines) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            lines = cv.wait_timeout(lines, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        true
    }

    /// Waits until at least `n` lines contain `needle`; returns whether they did within `timeout`.
    pub fn wait_count(&self, needle: &str, n: usize, timeout: std::time::Duration) -> bool {
        self.wait_until(timeout, |l| l.iter().filter(|x| x.contains(needle)).count() >= n)
    }

    /// The lines so far.
    pub fn all(&self) -> Vec<String> {
        self.inner.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A `tdp receive` serving in another process, its output read as it comes; killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its stdout (one JSON object per session).
    pub out: Lines,
    /// Its stderr (one line per connection).
    pub err: Lines,
}

impl Server {
    /// Starts `tdp receive --listen 127.0.0.1:0 --json args...`.
    pub fn start(args: &[&str]) -> Server {
        let (mut child, addr, err) = receiver_with(args);
        let out = Lines::spawn(child.stdout.take().expect("piped stdout"));
        Server { child, addr, out, err: Lines::spawn(err.into_inner()) }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
