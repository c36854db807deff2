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

/// Starts `tdp receive --listen 127.0.0.1:0 extra...` and returns it with the address it printed.
pub fn receiver(extra: &[&str]) -> (Child, SocketAddr, BufReader<std::process::ChildStderr>) {
    let mut child = tdp()
        .args(["receive", "--listen", "127.0.0.1:0", "--json"])
        .args(extra)
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
