//! `tdp receive` as a server under hostile peers, in another process over loopback: connections that
//! are not sessions are logged and survived, trickles are cut at their deadline, the number of
//! connections is bounded, a session survives garbage on other connections, memory is reserved
//! fallibly, wire integers are checked, peer text is escaped both ways, and after 1,000 hostile
//! connections of 20 kinds a real migration still completes within the memory it announced.
//!
//! Checks: I5 for the network peer, I4 for the migration that follows (the digests match).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, both, json, kvm_or_skip, run};
use tdp_cli::proto::{MAX_RUN, Message, PAGE_SIZE, SlotInfo, VERSION};

/// A generous bound for anything the receiver does in response to a connection.
const PATIENCE: Duration = Duration::from_secs(60);
/// Every connection the receiver accepts ends with one line holding this.
const CONN: &str = "tdp receive: connection from ";

fn frame(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    buf
}

/// A `Hello` for one memslot (slot 0 at address 0) of `pages` pages.
fn hello(pages: u64, session: u64) -> Message {
    let slots = vec![SlotInfo::new(0, 0, pages)];
    Message::Hello { version: VERSION, page_size: PAGE_SIZE as u32, session, resume: false, slots }
}

/// Sends `bytes` on a new connection and closes it.
fn poke(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.write_all(bytes);
}

/// Sends `bytes` and returns the frames the receiver answered until it closed the connection.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<Message> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let _ = s.write_all(bytes);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let mut r = answer.as_slice();
    std::iter::from_fn(|| Message::read_from(&mut r).ok()).collect()
}

/// The machine for a migration: KVM when `/dev/kvm` opens, else the mock (with the SKIPPED line).
fn backend(test: &str) -> &'static str {
    if kvm_or_skip(&format!("{test} (on KVM; the mock runs instead)")) { "kvm" } else { "mock" }
}

/// Runs `tdp migrate --to addr --json args...` and asserts it verified; returns its JSON report.
fn migrate_ok(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    let to = addr.to_string();
    let out = run(&[&["migrate", "--to", to.as_str(), "--json"], args].concat());
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_eq!(v["verified"], true, "{v}");
    v
}

/// Waits for the receiver's JSON line of the `n`th session and returns it.
fn session_report(server: &Server, n: usize) -> serde_json::Value {
    assert!(server.out.wait_count("\"digest\"", n, PATIENCE), "session {n} reported: {:?}", server.err.all());
    let lines = server.out.all();
    let line = lines.iter().filter(|l| l.contains("\"digest\"")).nth(n - 1).cloned().unwrap_or_default();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line}: {e}"))
}

#[test]
fn i5_connections_that_are_not_sessions_are_logged_and_survived() {
    let mut server = Server::start(&[]);
    poke(server.addr, b""); // a port check
    poke(server.addr, &[0x9c, 0x13, 0x77, 0xfe, 0x01, 0x80, 0x55, 0xaa, 0x00, 0x42]); // random bytes
    poke(server.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    poke(server.addr, &[0x20, 0x00]); // half a frame header
    assert!(server.err.wait_count(CONN, 4, PATIENCE), "{:?}", server.err.all());
    let log = server.err.all();
    let closed: Vec<_> = log.iter().filter(|l| l.contains("not a migration session")).collect();
    assert_eq!(closed.len(), 4, "one line each: {log:?}");
    assert!(server.alive(), "the receiver kept serving: {log:?}");
    let v = migrate_ok(server.addr, &["--backend", "mock", "--memory", "1M"]);
    assert_eq!(session_report(&server, 1)["digest"], v["source_digest"]);
    assert!(server.alive(), "and serves on after the session");
}

#[test]
fn i5_a_trickle_is_cut_at_the_handshake_deadline() {
    let server = Server::start(&["--handshake-timeout-s", "2"]);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(1))).expect("timeout");
    let start = Instant::now();
    // A slowloris: one byte of a Hello every 200 ms, which would take 12 s; each byte arrives well
    // within any per-read timeout, only the deadline of the whole frame can stop it.
    let bytes = frame(&hello(4, 1));
    let mut closed_after = None;
    'trickle: for chunk in bytes.iter().cycle().take(60) {
        if s.write_all(&[*chunk]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => {
                    closed_after = Some(start.elapsed());
                    break 'trickle;
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                _ => {
                    closed_after = Some(start.elapsed());
                    break 'trickle;
                }
            }
        }
    }
    let took = closed_after.expect("the receiver closed the trickling connection");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(9), "closed after {took:?}");
    assert!(
        server.err.wait_count("not done within the 2.0 s deadline", 1, PATIENCE),
        "{:?}",
        server.err.all()
    );
}

#[test]
fn i5_an_idle_connection_does_not_block_a_migration() {
    // A connection that sends nothing holds its thread for up to a minute; the migration is served
    // beside it, not after it.
    let server = Server::start(&["--once", "--handshake-timeout-s", "600"]);
    let idle = TcpStream::connect(server.addr).expect("connect");
    let start = Instant::now();
    let v = migrate_ok(server.addr, &["--backend", "mock", "--memory", "1M", "--retries", "0"]);
    assert!(start.elapsed() < Duration::from_secs(300), "{:?}", start.elapsed());
    assert_eq!(session_report(&server, 1)["digest"], v["source_digest"]);
    drop(idle);
}

#[test]
fn i5_two_hundred_connections_at_once_are_bounded_and_survived() {
    let mut server = Server::start(&["--max-connections", "16", "--handshake-timeout-s", "600"]);
    let held: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(server.addr).expect("connect")).collect();
    // The first 16 are served (and wait for a Hello); the other 184 are closed at once.
    assert!(server.err.wait_count("refused: ", 184, PATIENCE), "{:?}", server.err.all());
    assert!(server.alive());
    let refused = server.err.all().iter().filter(|l| l.contains("refused: 16 connections are open")).count();
    assert_eq!(refused, 184, "{:?}", server.err.all());
    drop(held);
    assert!(server.err.wait_count(CONN, 200, PATIENCE), "{:?}", server.err.all());
    migrate_ok(server.addr, &["--backend", "mock", "--memory", "1M", "--retries", "0"]);
    assert!(server.alive());
}

#[test]
fn i5_a_session_survives_garbage_and_a_rival_source_on_other_connections() {
    let server = Server::start(&["--once"]);
    let addr = server.addr.to_string();
    // A slow link keeps the session going for about four seconds.
    let src = common::tdp()
        .args(["migrate", "--to", &addr, "--json", "--backend", "mock", "--memory", "8M"])
        .args(["--bandwidth", "2MiB/s", "--retries", "0", "--max-rounds", "1", "--dirty-rate", "1M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tdp migrate starts");
    // Once the session is open, garbage and a second source arrive on other connections.
    let opened = format!("opened: {} pages", 2048 + tdp_cli::mock::CONTROL_PAGES);
    assert!(server.err.wait_count(&opened, 1, PATIENCE), "{:?}", server.err.all());
    let (mut rivals, mut rivals_refused) = (0, 0);
    // The session lasts about four seconds; the rivals take milliseconds (the loop stops early if not).
    while rivals < 12 && !server.out.all().iter().any(|l| l.contains("\"digest\"")) {
        poke(server.addr, &[0xff, 0xff, 0xff, rivals]);
        poke(server.addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        let answer = exchange(server.addr, &frame(&hello(4, 77)));
        rivals += 1;
        rivals_refused += u8::from(
            answer
                .iter()
                .any(|m| matches!(m, Message::Error { text, .. } if text.contains("another source"))),
        );
    }
    let out = src.wait_with_output().expect("the source exits");
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(json(&out)["verified"], true);
    let report = session_report(&server, 1);
    assert_eq!(report["matched"], true, "{report}");
    assert_eq!(report["reconnects"], 0, "the session never lost its connection: {report}");
    assert!(rivals > 0 && rivals_refused == rivals, "every rival source was refused while the session ran");
}

#[test]
fn i5_memory_the_host_cannot_hold_is_an_error_frame_not_an_abort() {
    let mut server = Server::start(&["--max-memory", "1T"]);
    let answer = exchange(server.addr, &frame(&hello((1 << 40) / PAGE_SIZE as u64, 9)));
    let text = match answer.as_slice() {
        [Message::Error { code: 3, text }] => text.clone(),
        other => panic!("expected one TooLarge Error frame, got {other:?}; {:?}", server.err.all()),
    };
    assert!(text.contains("MemAvailable"), "names the host's available memory: {text}");
    assert!(server.alive(), "{:?}", server.err.all());
    migrate_ok(server.addr, &["--backend", "mock", "--memory", "1M"]);
}

#[test]
fn i5_a_failed_allocation_is_an_error_frame_not_an_abort() {
    // An address-space limit below the announced size: the reservation itself fails.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1048576 && exec {} receive --listen 127.0.0.1:0 --max-memory 4G",
            env!("CARGO_BIN_EXE_tdp")
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sh starts");
    let err = common::Lines::spawn(child.stderr.take().expect("stderr"));
    assert!(err.wait_count("listening on", 1, PATIENCE), "{:?}", err.all());
    let addr: SocketAddr =
        err.all().iter().find_map(|l| l.split("listening on ").nth(1)?.trim().parse().ok()).expect("address");
    let answer = exchange(addr, &frame(&hello((2 << 30) / PAGE_SIZE as u64, 9)));
    let alive = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "{:?}", err.all());
    match answer.as_slice() {
        [Message::Error { code: 3, text }] => assert!(text.contains("cannot allocate 2 GiB"), "{text}"),
        other => panic!("expected one TooLarge Error frame, got {other:?}; {:?}", err.all()),
    }
}

#[test]
fn i5_a_round_number_of_u32_max_is_refused_without_a_panic() {
    let (child, addr, err) = common::receiver(&[]);
    let mut bytes = frame(&hello(4, 3));
    bytes.extend(frame(&Message::RoundEnd { round: u32::MAX, pages: 0 }));
    let answer = exchange(addr, &bytes);
    assert!(
        answer
            .iter()
            .any(|m| matches!(m, Message::Error { text, .. } if text.contains("round number 4294967295"))),
        "{answer:?}"
    );
    let out = child.wait_with_output().expect("the receiver exits");
    let stderr = common::rest(err);
    assert_eq!(out.status.code(), Some(1), "the --once session failed: {stderr}");
    assert!(stderr.contains("round number 4294967295") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn i5_peer_text_is_escaped_in_both_directions() {
    let evil = "\x1b]0;owned\x07\x1b[2J\r\nerror: forged line";
    // The source's Error frame, printed by the receiver.
    let (child, addr, err) = common::receiver(&[]);
    let mut bytes = frame(&hello(4, 3));
    bytes.extend(frame(&Message::Error { code: 4, text: evil.into() }));
    exchange(addr, &bytes);
    let _ = child.wait_with_output();
    let stderr = common::rest(err);
    assert!(stderr.contains("\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\\nerror: forged line"), "{stderr}");
    assert!(!stderr.contains('\x1b') && !stderr.contains('\r'), "{stderr:?}");

    // The destination's Error frame, printed by migrate.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let fake = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = Message::read_from(&mut s);
            let _ = s.write_all(&frame(&Message::Error { code: 2, text: evil.into() }));
        }
    });
    let out =
        run(&["migrate", "--backend", "mock", "--memory", "1M", "--to", &addr.to_string(), "--retries", "0"]);
    let _ = fake.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(stderr.contains("\\u{1b}]0;owned"), "{stderr}");
    assert!(!stderr.contains('\x1b') && !stderr.contains('\r'), "{stderr:?}");
}

#[test]
fn i5_a_stopped_and_continued_receiver_loses_no_connection() {
    let server = Server::start(&["--once"]);
    let to = server.addr.to_string();
    let src = common::tdp()
        .args(["migrate", "--to", &to, "--json", "--backend", "mock", "--memory", "4M"])
        .args(["--bandwidth", "4MiB/s", "--retries", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tdp migrate starts");
    // Ctrl-Z and fg, three times, while the receiver waits in reads (EINTR on resumption).
    let pid = server.child.id().to_string();
    let opened = format!("opened: {} pages", 1024 + tdp_cli::mock::CONTROL_PAGES);
    assert!(server.err.wait_count(&opened, 1, PATIENCE), "{:?}", server.err.all());
    for _ in 0..3 {
        let stop = std::process::Command::new("kill").args(["-STOP", &pid]).status();
        std::thread::sleep(Duration::from_millis(150));
        let cont = std::process::Command::new("kill").args(["-CONT", &pid]).status();
        assert!(stop.is_ok_and(|s| s.success()) && cont.is_ok_and(|s| s.success()));
        std::thread::sleep(Duration::from_millis(150));
    }
    let out = src.wait_with_output().expect("the source exits");
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_eq!(v["reconnects"], 0, "no connection was lost to EINTR: {v}");
    assert_eq!(session_report(&server, 1)["reconnects"], 0);
}

/// The 20 kinds of hostile connection: what each sends before it closes.
fn hostile(kind: usize, round: u64) -> Vec<u8> {
    let noise: Vec<u8> =
        (0..64u64).map(|i| (i.wrapping_mul(0x9e37_79b9).wrapping_add(round * 131) >> 3) as u8).collect();
    let mut h = frame(&hello(4, round));
    match kind {
        0 => Vec::new(),                                       // connect and close
        1 => noise,                                            // random bytes
        2 => b"GET / HTTP/1.1\r\nHost: tdp\r\n\r\n".to_vec(),  // an HTTP request
        3 => vec![0x40, 0x00],                                 // half a header
        4 => h,                                                // a valid Hello, then gone (parked)
        5 => vec![0xff; 4],                                    // a frame length of 4 GiB
        6 => [&100u32.to_le_bytes()[..], &[1u8; 10]].concat(), // a body cut short
        7 => vec![1, 0, 0, 0, 77],                             // an unknown message type
        8 => {
            h[5..9].copy_from_slice(b"HTTP"); // a Hello with a bad magic
            h
        }
        9 => {
            let mut h = frame(&hello(4, round));
            h[9..11].copy_from_slice(&99u16.to_le_bytes()); // another protocol version
            h
        }
        10 => {
            let slots = vec![SlotInfo::new(0, 0, 4)];
            frame(&Message::Hello { version: VERSION, page_size: 512, session: 1, resume: false, slots })
        }
        11 => frame(&hello(0, round)),
        12 => frame(&hello(u64::MAX, round)),
        13 => frame(&hello((1 << 40) / PAGE_SIZE as u64, round)), // over --max-memory
        14 => frame(&Message::Welcome { version: VERSION, resumed: true, received: u64::MAX }),
        15 => frame(&Message::Pages { slot: 0, first: u64::MAX, data: vec![0; PAGE_SIZE] }),
        16 => frame(&Message::RoundEnd { round: u32::MAX, pages: u64::MAX }),
        17 => frame(&Message::Error { code: 4, text: "\x1b[31m\r\nforged".into() }),
        18 => [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], &noise[..20]].concat(), // TLS
        _ => {
            // A session that sends a run past its memory, a run of a slot it did not announce, then a
            // run as long as allowed.
            h.extend(frame(&Message::Pages { slot: 0, first: 3, data: vec![0; 2 * PAGE_SIZE] }));
            h.extend(frame(&Message::Pages { slot: 1, first: 0, data: vec![0; PAGE_SIZE] }));
            h.extend(frame(&Message::Pages {
                slot: 0,
                first: 0,
                data: vec![0; MAX_RUN as usize * PAGE_SIZE],
            }));
            h
        }
    }
}

/// VmHWM (peak resident memory) of process `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kb.expect("VmHWM") * 1024
}

#[test]
fn i5_after_1000_hostile_connections_a_migration_completes_within_its_memory() {
    const MEMORY: u64 = 16 << 20;
    const MARGIN: u64 = 64 << 20;
    let mut server = Server::start(&["--max-memory", "16M", "--handshake-timeout-s", "5"]);
    for round in 0..50u64 {
        let conns: Vec<TcpStream> = (0..20)
            .map(|kind| {
                let mut s = TcpStream::connect(server.addr).expect("connect");
                let _ = s.write_all(&hostile(kind, round));
                s
            })
            .collect();
        drop(conns);
        let want = (round as usize + 1) * 20;
        assert!(server.err.wait_count(CONN, want, PATIENCE), "round {round}: {:?}", server.err.all().last());
        assert!(server.alive(), "round {round}");
    }
    let log = server.err.all();
    assert_eq!(log.iter().filter(|l| l.contains(CONN)).count(), 1000);
    assert!(log.iter().all(|l| !l.contains('\x1b') && !l.contains("panicked")), "sanitized, no panic");
    let machine = backend("i5_after_1000_hostile_connections_a_migration_completes_within_its_memory");
    // 15 MiB of RAM: with the code (KVM) or control (mock) memslot, the guest's memory is within 16 MiB.
    let v = migrate_ok(server.addr, &["--backend", machine, "--memory", "15M"]);
    let report = session_report(&server, 1);
    assert_eq!(report["digest"], v["source_digest"], "{report}");
    let pages: u64 =
        v["guest"]["slots"].as_array().into_iter().flatten().filter_map(|s| s["pages"].as_u64()).sum();
    assert_eq!(report["pages"], pages, "every memslot: {v}");
    assert!(pages > (15 << 20) / PAGE_SIZE as u64 && pages <= MEMORY / PAGE_SIZE as u64, "{v}");
    let peak = peak_rss(server.child.id());
    assert!(
        peak <= MEMORY + MARGIN,
        "peak RSS {} MiB > {} MiB announced + {} MiB",
        peak >> 20,
        MEMORY >> 20,
        MARGIN >> 20
    );
    assert!(server.alive());
}
