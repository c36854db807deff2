//! `tdp dirty-rate` on KVM and the mock, and bad command lines: every one exits non-zero with a message
//! that names the argument, and none panics.
//!
//! Checks: I5 for the command line.

mod common;

use common::{both, json, kvm_or_skip, run};

fn per_vcpu_rates(v: &serde_json::Value) -> Vec<f64> {
    v["vcpus"].as_array().into_iter().flatten().filter_map(|c| c["pages_per_sec"].as_f64()).collect()
}

#[test]
fn dirty_rate_json_has_per_vcpu_rates_on_kvm() {
    if !kvm_or_skip("dirty_rate_json_has_per_vcpu_rates_on_kvm") {
        return;
    }
    let out = run(&[
        "dirty-rate",
        "--memory",
        "8M",
        "--vcpus",
        "2",
        "--window-ms",
        "300",
        "--json",
        "--backend",
        "kvm",
    ]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    let rates = per_vcpu_rates(&v);
    assert_eq!(rates.len(), 2, "{v}");
    assert!(rates.iter().all(|&r| r > 0.0), "every vCPU dirties pages: {v}");
    assert_eq!(v["per_vcpu_source"], "dirty ring entries per vCPU");
    assert!(v["total_mib_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");

    let out =
        run(&["dirty-rate", "--memory", "8M", "--mode", "bitmap", "--window-ms", "200", "--backend", "kvm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", both(&out));
    assert!(stdout.contains("vCPU 0:") && stdout.contains("vCPU 1:") && stdout.contains("MiB/s"), "{stdout}");
}

#[test]
fn dirty_rate_on_the_mock() {
    let out = run(&["dirty-rate", "--backend", "mock", "--memory", "1M", "--window-ms", "200", "--json"]);
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_eq!(v["guest"]["backend"], "mock");
    let rates = per_vcpu_rates(&v);
    assert!(rates.len() == 2 && rates.iter().all(|&r| r > 0.0), "{v}");
}

#[test]
fn dirty_rate_sampling_logs_nothing_and_reports_its_sample() {
    // QEMU's page-sampling mode on the mock (KVM's run is in dirty_rate_modes.rs): 1 MiB is 256 data
    // pages and 32 control pages; 65536 per GiB samples a quarter of each.
    let args =
        ["dirty-rate", "--backend", "mock", "--memory", "1M", "--window-ms", "300", "--mode", "sampling"];
    let out = run(&[&args[..], &["--sample-pages", "65536", "--sample-seed", "9", "--json"]].concat());
    assert!(out.status.success(), "{}", both(&out));
    let v = json(&out);
    assert_eq!(v["guest"]["mode"], "sampling");
    assert!(v["guest"]["machine"].as_str().is_some_and(|m| m.contains("no dirty logging")), "{v}");
    let sample = &v["sampling"];
    assert_eq!(sample["seed"], 9, "{v}");
    let sampled: Vec<u64> =
        sample["slots"].as_array().into_iter().flatten().filter_map(|s| s["sampled"].as_u64()).collect();
    assert_eq!(sampled, [64, 8], "a quarter of each memslot: {v}");
    assert!(v["total_pages_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let text = run(&args);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success() && stdout.contains("sampled pages changed (512 per GiB"), "{stdout}");
}

#[test]
fn i5_bad_arguments_exit_non_zero_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["migrate", "--memory", "12X"], "memory"),
        (&["migrate", "--memory", "1.5G"], "memory"),
        (&["migrate", "--memory", "99999999999999999999"], "too large"),
        (&["migrate", "--memory", "4K"], "--memory"),
        (&["migrate", "--memory", "64G"], "--memory 64 GiB: the guest and the loopback destination's copy"),
        (&["migrate", "--memory", "4097"], "--memory"),
        (&["migrate", "--backend", "mock", "--memory", "4G"], "on the mock"),
        (&["migrate", "--vcpus", "0"], "vcpus"),
        (&["migrate", "--mode", "sampling"], "sampling only measures a dirty rate"),
        (&["dirty-rate", "--mode", "sampling", "--sample-pages", "0"], "sample-pages"),
        (&["migrate", "--memory", "64K", "--vcpus", "31"], "each of the 31 vCPUs"),
        (&["migrate", "--vcpus", "64"], "vcpus"),
        (&["migrate", "--dirty-rate", "fast"], "dirty-rate"),
        (&["migrate", "--bandwidth", "0"], "at least one page"),
        (&["migrate", "--to", "localhost"], "HOST:PORT"),
        (&["migrate", "--to", "127.0.0.1:0"], "port 0"),
        (&["migrate", "--to", "127.0.0.1:65536"], "port"),
        (&["migrate", "--mode", "pml"], "mode"),
        (&["migrate", "--ring-entries", "1000"], "--ring-entries"),
        (&["receive"], "--listen"),
        (&["receive", "--listen", "nonsense"], "HOST:PORT"),
        (&["receive", "--listen", "127.0.0.1:0", "--max-memory", "lots"], "max-memory"),
        (&["dirty-rate", "--window-ms", "0"], "window-ms"),
        (&["frobnicate"], "frobnicate"),
        (&["migrate", "--memory", "-1"], "a negative size"),
        (&["migrate", "--memory", "-1G"], "a negative size"),
        (&["receive", "--listen", "127.0.0.1:0", "--max-memory", "-5"], "a negative size"),
        (&["migrate", "--bandwidth", "18446744073709551615p/s"], "too large"),
        (&["migrate", "--bandwidth", "-1M"], "a negative rate"),
        (&["migrate", "--bandwidth", "1p/s"], "at least 64 pages/s"),
        (
            &["migrate", "--dirty-limit", "off", "--vcpu-dirty-limit", "1p/s"],
            "conflicts with --dirty-limit off",
        ),
        (&["migrate", "--dirty-rate", "1p/s"], "at least 128 pages/s with 2 vCPUs"),
        (&["dirty-rate", "--dirty-rate", "1p/s", "--vcpus", "3"], "at least 192 pages/s with 3 vCPUs"),
        (&["migrate", "--backend", "kvm", "--memory", "600G"], "508 GiB"),
        (&["migrate", "--backend", "kvm", "--memory", "400G"], "MemAvailable"),
        (&["dirty-rate", "--backend", "kvm", "--memory", "400G"], "MemAvailable"),
    ];
    for (args, want) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", both(&out));
        assert!(stderr.contains(want), "{args:?}: message names {want:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn i5_unreachable_destination_is_a_clear_error() {
    // A port nothing listens on: bind one, then drop it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    let port = port.expect("a free port");
    let to = format!("127.0.0.1:{port}");
    let out = run(&["migrate", "--backend", "mock", "--memory", "1M", "--to", &to]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(stderr.contains(&format!("destination {to}: connecting")), "{stderr}");
    assert!(stderr.contains("kept running after the failure"), "{stderr}");
}
