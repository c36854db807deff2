//! `tdp migrate` and `tdp receive` as a user runs them, on real KVM (skipped without `/dev/kvm`) and on
//! the mock: the destination's digest equals the source's in every tracking mode, across two processes,
//! and a destination that dies mid-migration gives a clear error while the source guest keeps running.
//!
//! Checks: I4 end to end (the BLAKE3 digest comparison after stop-and-copy) and I5 for the peer (a
//! receiver fed garbage fails cleanly).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Output;

use common::{both, json, kvm_or_skip, receiver, rest, run};

/// The machine for a test that runs on KVM where `/dev/kvm` opens and on the mock elsewhere: `"kvm"`, or
/// `"mock"` after printing the SKIPPED line for the KVM run of `test`.
fn kvm_else_mock(test: &str) -> &'static str {
    if kvm_or_skip(&format!("{test} (on KVM; the mock runs instead)")) { "kvm" } else { "mock" }
}

/// A finished migration to a `tdp receive` in another process.
struct ToReceiver {
    /// The address the receiver listened on (the source's `--to`).
    addr: SocketAddr,
    /// `tdp migrate`'s status and output.
    source: Output,
    /// `tdp receive`'s status and stdout (its stderr is in `receiver_stderr`).
    receiver: Output,
    /// What the receiver wrote on stderr after the line with its address.
    receiver_stderr: String,
}

impl ToReceiver {
    /// Asserts that the source failed cleanly (as [`failed_cleanly`]) with an error that names the
    /// destination's address, and returns its stderr.
    fn source_failed_naming_the_destination(&self) -> String {
        let stderr = failed_cleanly(&self.source);
        assert!(stderr.contains(&format!("destination {}", self.addr)), "names the peer: {stderr}");
        stderr
    }
}

/// Starts `tdp receive receiver_args...`, runs `tdp migrate --to <its address> migrate_args...` to the
/// end, then waits for the receiver to exit.
fn migrate_to_receiver(receiver_args: &[&str], migrate_args: &[&str]) -> ToReceiver {
    let (child, addr, err) = receiver(receiver_args);
    let to = addr.to_string();
    let source = run(&[&["migrate", "--to", &to], migrate_args].concat());
    let receiver = child.wait_with_output().expect("the receiver exits");
    ToReceiver { addr, source, receiver, receiver_stderr: rest(err) }
}

/// Asserts that a run failed cleanly, exit status 1 without a panic, and returns its stderr.
fn failed_cleanly(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", both(out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Pages of every memslot of the guest a JSON report describes.
fn all_pages(v: &serde_json::Value) -> u64 {
    v["guest"]["slots"].as_array().into_iter().flatten().filter_map(|s| s["pages"].as_u64()).sum()
}

/// Pages of the mock guest of `mib` MiB: its data slot and its control slot.
fn mock_pages(mib: u64) -> u64 {
    mib * 256 + tdp_cli::mock::CONTROL_PAGES
}

fn assert_verified(v: &serde_json::Value, what: &str) {
    assert_eq!(v["verified"], true, "{what}: {v}");
    assert_eq!(v["source_digest"], v["destination_digest"], "{what}: {v}");
    assert!(v["rounds"].as_array().is_some_and(|r| !r.is_empty()), "{what}: rounds reported: {v}");
    assert!(v["downtime_ms"].as_f64().is_some() && v["total_ms"].as_f64().is_some(), "{what}: {v}");
}

#[test]
fn i4_migrate_with_defaults_verifies_on_kvm() {
    if !kvm_or_skip("i4_migrate_with_defaults_verifies_on_kvm") {
        return;
    }
    // The defaults except the memory size, kept small for a debug build.
    let out = run(&["migrate", "--memory", "16M", "--json"]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_verified(&v, "defaults");
    assert_eq!(v["guest"]["backend"], "kvm");
    assert_eq!(v["guest"]["mode"], "ring");
    assert_eq!(v["loopback_receiver"], true);
    let per_vcpu = v["rounds"][0]["vcpu_dirty_pages_per_sec"].as_array().map_or(0, Vec::len);
    assert_eq!(per_vcpu, 2, "the ring gives each vCPU's dirty rate: {v}");

    let text = run(&["migrate", "--memory", "8M"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "{}", both(&text));
    for want in
        ["round", "pages sent", "downtime", "verified: destination memory equals the source byte for byte"]
    {
        assert!(stdout.contains(want), "text report has {want:?}:\n{stdout}");
    }
}

#[test]
fn i4_migrate_verifies_in_every_tracking_mode_on_kvm() {
    if !kvm_or_skip("i4_migrate_verifies_in_every_tracking_mode_on_kvm") {
        return;
    }
    let cases = [("ring", "sequential", false), ("bitmap", "random", true), ("clear-log", "hot-set", false)];
    for (mode, pattern, fill) in cases {
        let mut args = vec!["migrate", "--memory", "8M", "--mode", mode, "--pattern", pattern, "--json"];
        args.extend(["--backend", "kvm"]);
        if fill {
            args.push("--fill"); // whole pages change, not two words of them
        }
        let out = run(&args);
        assert!(out.status.success(), "{mode}: {}", both(&out));
        let v = json(&out);
        assert_verified(&v, mode);
        assert_eq!(v["guest"]["mode"], mode);
        let writes: u64 =
            v["vcpus"].as_array().map_or(0, |a| a.iter().filter_map(|c| c["writes"].as_u64()).sum());
        assert!(writes > 0, "{mode}: the guest dirtied memory during the migration: {v}");
    }
}

#[test]
fn i4_dirty_limit_throttles_when_the_link_is_slower_than_the_guest() {
    if !kvm_or_skip("i4_dirty_limit_throttles_when_the_link_is_slower_than_the_guest") {
        return;
    }
    // A link four times slower than the guest dirties: pre-copy cannot converge without the dirty limit.
    // With the bitmap the throttle acts at batch exits; with the ring at ring-full exits, so the ring is
    // small and each vCPU's share of memory larger than it.
    let cases = [
        ("bitmap", "4M", "4MiB/s", "16MiB/s", "batch exits (the bitmap has no per-vCPU exit)"),
        ("ring", "8M", "8MiB/s", "32MiB/s", "ring-full exits"),
    ];
    for (mode, memory, link, dirty, point) in cases {
        let out = run(&[
            "migrate",
            "--memory",
            memory,
            "--bandwidth",
            link,
            "--dirty-rate",
            dirty,
            "--max-rounds",
            "4",
            "--mode",
            mode,
            "--ring-entries",
            "512",
            "--json",
            "--backend",
            "kvm",
        ]);
        assert!(out.status.success(), "{mode}: {}", both(&out));
        let v = json(&out);
        assert_verified(&v, mode);
        let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
        assert!(rounds.iter().any(|r| r["vcpu_quota"].as_u64().is_some()), "{mode}: a quota was set: {v}");
        let vcpus = v["vcpus"].as_array().cloned().unwrap_or_default();
        let throttled: u64 = vcpus.iter().filter_map(|c| c["throttled_exits"].as_u64()).sum();
        assert!(throttled > 0, "{mode}: vCPUs slept at their exits: {v}");
        assert_eq!(v["guest"]["throttle_point"], point);
        if mode == "ring" {
            let exits: u64 = vcpus.iter().filter_map(|c| c["ring_full_exits"].as_u64()).sum();
            assert!(exits >= throttled, "ring: the sleeps happened at ring-full exits: {v}");
        }
    }
}

#[test]
fn i4_migrate_to_a_receiver_in_another_process() {
    let backend = kvm_else_mock("i4_migrate_to_a_receiver_in_another_process");
    let m = migrate_to_receiver(&[], &["--memory", "4M", "--json", "--backend", backend]);
    assert!(m.source.status.success(), "{}", both(&m.source));
    assert!(m.receiver.status.success(), "receiver: {}\n{}", both(&m.receiver), m.receiver_stderr);
    let v = json(&m.source);
    let d = json(&m.receiver);
    assert_verified(&v, "two processes");
    assert_eq!(v["loopback_receiver"], false);
    assert_eq!(d["matched"], true, "{d}");
    assert_eq!(d["digest"], v["source_digest"], "the receiver's own digest is the source's");
    assert_eq!(d["pages"], all_pages(&v), "the receiver holds every memslot: {d}");
    assert!(all_pages(&v) > 1024, "the 4 MiB data slot and the code or control slot: {v}");
}

#[test]
fn i4_a_dropped_connection_is_resumed_and_verified() {
    let backend = kvm_else_mock("i4_a_dropped_connection_is_resumed_and_verified");
    // The receiver drops the connection once, after acknowledging the bulk copy, and keeps the session.
    let m = migrate_to_receiver(
        &["--drop-after-rounds", "1"],
        &["--memory", "4M", "--json", "--backend", backend, "--downtime-ms", "1", "--max-rounds", "3"],
    );
    let dest_err = &m.receiver_stderr;
    assert!(m.source.status.success(), "{}", both(&m.source));
    assert!(m.receiver.status.success(), "receiver: {}\n{dest_err}", both(&m.receiver));
    let v = json(&m.source);
    let d = json(&m.receiver);
    assert_verified(&v, "resumed");
    assert_eq!(v["reconnects"], 1, "{v}");
    assert!(
        v["resent_pages"].as_u64().is_some_and(|n| n > 0),
        "the failed round's pages were sent again: {v}"
    );
    assert_eq!(d["reconnects"], 1, "{d}");
    assert_eq!(d["digest"], v["source_digest"], "{d}");
    assert!(dest_err.contains("waiting for the source to reconnect"), "{dest_err}");
}

#[test]
fn killed_destination_is_a_clear_error_and_the_guest_keeps_running() {
    let backend = kvm_else_mock("killed_destination_is_a_clear_error_and_the_guest_keeps_running");
    // The receiver vanishes right after acknowledging the bulk copy (round 0), as if killed.
    let m = migrate_to_receiver(
        &["--exit-after-rounds", "1"],
        &["--memory", "4M", "--backend", backend, "--downtime-ms", "1", "--dirty-rate", "16MiB/s"],
    );
    assert_eq!(m.receiver.status.code(), Some(3), "the receiver took its exit hook: {}", both(&m.receiver));
    let stderr = m.source_failed_naming_the_destination();
    assert!(stderr.contains("migration failed"), "{stderr}");
    assert!(stderr.contains("the source guest kept running after the failure"), "{stderr}");
    assert!(stderr.contains("it is now shut down as tdp migrate exits"), "says what happens next: {stderr}");
}

#[test]
fn destination_lost_during_stop_and_copy_resumes_the_paused_guest() {
    let backend = kvm_else_mock("destination_lost_during_stop_and_copy_resumes_the_paused_guest");
    // No pre-copy round after the bulk copy: the receiver vanishes while the source is stopped.
    let m = migrate_to_receiver(
        &["--exit-after-rounds", "1"],
        &["--memory", "4M", "--backend", backend, "--max-rounds", "0"],
    );
    let stderr = m.source_failed_naming_the_destination();
    assert!(stderr.contains("vCPUs were resumed"), "the paused guest runs again: {stderr}");
    let wrote = stderr
        .split("and wrote ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(wrote.is_some_and(|n| n > 0), "it writes memory after the resume: {stderr}");
}

#[test]
fn sigkilled_destination_fails_the_source_cleanly() {
    let backend = kvm_else_mock("sigkilled_destination_fails_the_source_cleanly");
    let (mut child, addr, _err) = receiver(&[]);
    // A slow link keeps the bulk copy going for about two seconds; the receiver is killed during it.
    let src = common::tdp()
        .args(["migrate", "--memory", "4M", "--bandwidth", "2MiB/s", "--json", "--backend", backend])
        .args(["--to", &addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tdp migrate starts");
    std::thread::sleep(std::time::Duration::from_millis(700));
    child.kill().expect("kill the receiver");
    let _ = child.wait();
    let out = src.wait_with_output().expect("the source exits");
    failed_cleanly(&out);
    let v = json(&out);
    assert!(v["error"].as_str().is_some_and(|e| e.contains(&addr.to_string())), "{v}");
    assert_eq!(v["guest_running"], true, "{v}");
    assert_eq!(v["pending_pages"], all_pages(&v), "no round was acknowledged, so every page is owed: {v}");
}

#[test]
fn i5_receiver_logs_garbage_and_keeps_serving() {
    // Even with --once: garbage is not a session, so it neither ends the receiver nor counts.
    let server = common::Server::start(&["--once"]);
    let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).expect("send garbage");
    drop(s);
    let timeout = std::time::Duration::from_secs(60);
    assert!(server.err.wait_count("bad frame length", 1, timeout), "{:?}", server.err.all());
    let v = json(&run(&[
        "migrate",
        "--backend",
        "mock",
        "--memory",
        "1M",
        "--json",
        "--to",
        &server.addr.to_string(),
    ]));
    assert_eq!(v["verified"], true, "{v}");
    assert!(server.err.all().iter().all(|l| !l.contains("panicked")));
}

#[test]
fn i4_migrate_on_the_mock_says_so() {
    let out = run(&["migrate", "--backend", "mock", "--memory", "1M", "--json"]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_verified(&v, "mock");
    assert_eq!(v["guest"]["backend"], "mock");
    assert!(v["guest"]["machine"].as_str().is_some_and(|m| m.contains("tdp-mock machine, not KVM")), "{v}");

    let out = run(&["migrate", "--backend", "mock", "--memory", "1M", "--mode", "bitmap", "--fill"]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tdp-mock machine, not KVM"), "{}", both(&out));
}

#[test]
fn i4_without_usable_kvm_auto_falls_back_to_the_mock_and_says_why() {
    // A KVM device that does not exist stands for a machine without /dev/kvm.
    let out = run(&["migrate", "--kvm-device", "/nonexistent/kvm", "--memory", "1M", "--json"]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_verified(&v, "fallback");
    assert_eq!(v["guest"]["backend"], "mock");
    let why = v["guest"]["fallback"].as_str().unwrap_or_default();
    assert!(why.contains("no usable KVM") && why.contains("/nonexistent/kvm"), "{v}");

    let out =
        run(&["dirty-rate", "--kvm-device", "/nonexistent/kvm", "--memory", "1M", "--window-ms", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("running on the tdp-mock machine instead"),
        "{}",
        both(&out)
    );

    // Asked for KVM explicitly: an error, not a silent fallback.
    let out = run(&["migrate", "--backend", "kvm", "--kvm-device", "/nonexistent/kvm", "--memory", "1M"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent/kvm"), "{}", both(&out));
}

#[test]
fn i5_a_destination_answering_garbage_is_a_clear_error() {
    // Not a tdp receiver: it answers the source's Hello with bytes that are no frame.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    let out =
        run(&["migrate", "--backend", "mock", "--memory", "1M", "--to", &addr.to_string(), "--retries", "0"]);
    let _ = server.join();
    let stderr = failed_cleanly(&out);
    assert!(stderr.contains(&format!("destination {addr}: waiting for Welcome")), "{stderr}");
    assert!(stderr.contains("bad frame length"), "{stderr}");
}

#[test]
fn i4_the_verification_catches_a_destination_that_holds_other_bytes() {
    // The check can fail: a receiver that flips one byte before its digest is caught, in the data slot
    // (the mock's slot 0) and in the control slot (slot 1), which the digest covers as well.
    for (page, slot) in [("0:7", 0), ("1:0", 1)] {
        let m = migrate_to_receiver(
            &["--corrupt-page", page],
            &["--backend", "mock", "--memory", "1M", "--json"],
        );
        let stderr = failed_cleanly(&m.source);
        let v = json(&m.source);
        assert_eq!(v["verified"], false, "{page}: {v}");
        assert_ne!(v["source_digest"], v["destination_digest"], "{page}: {v}");
        assert!(stderr.contains("digest mismatch"), "{page}: {}", both(&m.source));
        assert_eq!(
            m.receiver.status.code(),
            Some(1),
            "the receiver learns the verdict: {}",
            both(&m.receiver)
        );
        let r = json(&m.receiver);
        assert_eq!(r["matched"], false);
        assert_eq!(r["slots"].as_array().map_or(0, Vec::len), 2, "both memslots held: {r}");
        assert_eq!(r["slots"][slot]["slot"], slot, "{r}");
    }
}

#[test]
fn i4_migrate_moves_every_memslot_on_kvm_and_the_mock() {
    let backend = kvm_else_mock("i4_migrate_moves_every_memslot_on_kvm_and_the_mock");
    for backend in ["mock", backend] {
        // On KVM a slower link (a quarter of a second for the bulk copy), so that the guest writes both
        // slots while it runs whatever the machine's load: on a fast one the copy can end before the
        // first write. The mock is slow enough by itself.
        let mut args = vec!["--backend", backend, "--memory", "2M", "--json"];
        if backend == "kvm" {
            args.extend(["--bandwidth", "8MiB/s"]);
        }
        let m = migrate_to_receiver(&[], &args);
        assert!(m.source.status.success(), "{backend}: {}", both(&m.source));
        let v = json(&m.source);
        assert_verified(&v, backend);
        let slots = v["guest"]["slots"].as_array().cloned().unwrap_or_default();
        assert_eq!(slots.len(), 2, "{backend}: two memslots: {v}");
        let sent = v["slots"].as_array().cloned().unwrap_or_default();
        for (announced, s) in slots.iter().zip(&sent) {
            assert_eq!(announced["slot"], s["slot"], "{v}");
            let pages = announced["pages"].as_u64().unwrap_or(0);
            assert!(s["pages_sent"].as_u64().is_some_and(|n| n >= pages), "{backend}: every page of {s}");
        }
        // The guest writes both slots while it runs (the data slot, and its control page or block),
        // so both had dirty pages to send after the bulk copy.
        assert!(
            sent.iter().all(|s| s["dirty_pages_sent"].as_u64().is_some_and(|n| n > 0)),
            "{backend}: dirty pages of every slot were sent: {v}"
        );
        let r = json(&m.receiver);
        assert_eq!(r["digest"], v["destination_digest"], "{backend}: {r}");
        let held: Vec<_> =
            r["slots"].as_array().into_iter().flatten().map(|s| (&s["slot"], &s["pages"])).collect();
        let want: Vec<_> = slots.iter().map(|s| (&s["slot"], &s["pages"])).collect();
        assert_eq!(held, want, "{backend}: the destination holds every memslot the source has");
    }
}

#[test]
fn a_fixed_vcpu_dirty_limit_is_applied_on_the_mock() {
    // The mock is slow, so a 1 MiB/s link against 4 MiB/s of dirtying; the quota is the one given.
    let out = run(&[
        "migrate",
        "--backend",
        "mock",
        "--memory",
        "1M",
        "--bandwidth",
        "1MiB/s",
        "--dirty-rate",
        "4MiB/s",
        "--vcpu-dirty-limit",
        "100pages/s",
        "--max-rounds",
        "3",
        "--mode",
        "bitmap",
        "--json",
    ]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_verified(&v, "fixed quota");
    let quotas: Vec<u64> =
        v["rounds"].as_array().into_iter().flatten().filter_map(|r| r["vcpu_quota"].as_u64()).collect();
    assert!(!quotas.is_empty() && quotas.iter().all(|&q| q == 100), "{v}");
    let throttled: u64 =
        v["vcpus"].as_array().into_iter().flatten().filter_map(|c| c["throttled_exits"].as_u64()).sum();
    assert!(throttled > 0, "{v}");
}

#[test]
fn i4_guests_of_2_and_4_gib_migrate_and_verify_on_kvm() {
    if !kvm_or_skip("i4_guests_of_2_and_4_gib_migrate_and_verify_on_kvm") {
        return;
    }
    // Over the mock's 1 GiB limit: KVM takes what the host can hold. One vCPU writing slowly and no
    // pre-copy round after the bulk copy keep the run short; the loopback destination holds a copy.
    for (memory, pages) in [("2G", 512 * 1024), ("4G", 1024 * 1024)] {
        let out = run(&[
            "migrate",
            "--backend",
            "kvm",
            "--memory",
            memory,
            "--bandwidth",
            "max",
            "--max-rounds",
            "0",
            "--vcpus",
            "1",
            "--dirty-rate",
            "64p/s",
            "--json",
        ]);
        assert!(out.status.success(), "{memory}: {}", both(&out));
        let v = json(&out);
        assert_verified(&v, memory);
        assert_eq!(v["guest"]["memory"], pages * 4096, "{v}");
        assert!(v["pages_sent"].as_u64().is_some_and(|n| n >= pages), "every page was sent: {v}");
    }
}

/// Starts `tdp migrate --to addr args...` with piped output.
fn spawn_migrate(addr: SocketAddr, args: &[&str]) -> std::process::Child {
    common::tdp()
        .args(["migrate", "--to", &addr.to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tdp migrate starts")
}

#[test]
fn sigint_and_sigterm_end_a_migration_cleanly() {
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let server = common::Server::start(&["--once"]);
        // A slow link: the bulk copy alone takes about four seconds.
        let src =
            spawn_migrate(server.addr, &["--backend", "mock", "--memory", "8M", "--bandwidth", "2MiB/s"]);
        let wait = std::time::Duration::from_secs(60);
        let opened = format!("opened: {} pages", mock_pages(8));
        assert!(server.err.wait_count(&opened, 1, wait), "{:?}", server.err.all());
        let sent =
            std::process::Command::new("kill").args([&format!("-{signal}"), &src.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal}");
        let out = src.wait_with_output().expect("the source exits");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {}", both(&out));
        assert!(stderr.contains(&format!("migration interrupted by SIG{signal}")), "{stderr}");
        assert!(stderr.contains("the source guest is shut down") && !stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "one line: {stderr}");
        // The destination was told.
        let told = format!("the source aborted (error 4): interrupted by SIG{signal}");
        assert!(server.err.wait_count(&told, 1, wait), "{:?}", server.err.all());
    }
}

#[test]
fn a_destination_that_stops_reading_times_out_at_the_documented_30_s() {
    // It welcomes the source, then neither reads nor answers (a hung process); it keeps accepting
    // new connections so reconnections would be possible.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in listener.incoming().flatten() {
            let _ = tdp_cli::proto::Message::read_from(&mut s);
            let version = tdp_cli::proto::VERSION;
            let welcome = tdp_cli::proto::Message::Welcome { version, resumed: false, received: 0 };
            let _ = welcome.write_to(&mut s, &mut Vec::new());
            held.push(s);
        }
    });
    let start = std::time::Instant::now();
    let out = run(&[
        "migrate",
        "--backend",
        "mock",
        "--memory",
        "16M",
        "--bandwidth",
        "max",
        "--to",
        &addr.to_string(),
    ]);
    let took = start.elapsed();
    let stderr = failed_cleanly(&out);
    assert!(took >= tdp_cli::link::REPLY_TIMEOUT, "{took:?}");
    assert!(took < tdp_cli::link::REPLY_TIMEOUT + std::time::Duration::from_secs(15), "{took:?}: {stderr}");
    assert!(stderr.contains("not reconnecting to a destination that stopped answering"), "{stderr}");
}

#[test]
fn progress_is_printed_as_plain_lines_when_stderr_is_not_a_terminal() {
    // About two seconds of bulk copy: at least one line a second with pages, percent, rate and ETA.
    let out = run(&[
        "migrate",
        "--backend",
        "mock",
        "--memory",
        "4M",
        "--bandwidth",
        "2MiB/s",
        "--max-rounds",
        "1",
    ]);
    assert!(out.status.success(), "{}", both(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("link: capped at 2.0 MiB/s (512 pages/s) by --bandwidth"), "{stdout}");
    let bulk: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("tdp migrate: round 0 (bulk copy): ")).collect();
    assert!(!bulk.is_empty(), "{stderr}");
    for l in &bulk {
        let total = format!("/{} pages (", mock_pages(4));
        assert!(l.contains(&total) && l.contains("%), ") && l.contains(" MiB/s, ETA "), "{l}");
    }
    let done = format!("tdp migrate: round 0 (bulk copy) done: {} pages in ", mock_pages(4));
    assert!(stderr.contains(&done), "{stderr}");
    // The default cap is named in the first lines.
    let out = run(&["migrate", "--backend", "mock", "--memory", "1M"]);
    let head: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().take(5).map(str::to_owned).collect();
    assert!(
        head.iter().any(|l| l.contains("capped at 128.0 MiB/s") && l.contains("the default")),
        "{head:?}"
    );
}
