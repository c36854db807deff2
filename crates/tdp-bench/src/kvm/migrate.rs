//! Live migration on real KVM with the `tdp` command: total time and downtime, dirty ring against dirty
//! bitmap, at a few guest dirty rates over a link limited to 128 MiB/s — this machine's version of the
//! dirty-ring cover letter's QEMU comparison (24 GiB guest, 8 vCPUs, 10 GbE, 800 MB/s of dirtying: the ring
//! took 73 s on average, the bitmap 55 s).
//!
//! Each run is `tdp migrate --backend kvm --json` with a loopback destination, random writes, dirty-limit
//! throttling off (the cover letter's runs had none), and the mode under test; the JSON report gives total
//! time, downtime, rounds and whether the destination's digest matched (a run that does not verify fails the
//! benchmark). The `tdp` binary is looked up beside this one (`cargo xtask bench` builds both).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::plot::Chart;
use crate::report::Row;
use crate::suite::{Config, Outcome};

/// Link limit for every run (`--bandwidth`).
const LINK_MIB_S: u64 = 128;

/// What one migration reported.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Migration {
    /// Start to verified end, ms.
    pub total_ms: f64,
    /// The guest's stop-and-copy pause, ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds, the bulk copy (round 0) included.
    pub rounds: u64,
    /// Whether it converged before the round limit.
    pub converged: bool,
    /// Pages sent in all.
    pub pages_sent: u64,
}

/// The `tdp` binary beside the running benchmark binary.
fn tdp_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("tdp");
    path.exists().then_some(path)
}

/// Runs the group; adds rows, notes and a chart to `out`. Skips (printing why) without `/dev/kvm` or
/// without the `tdp` binary.
///
/// # Panics
/// If a migration fails or does not verify: then its figures would be meaningless.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let Some(tdp) = tdp_binary() else {
        eprintln!(
            "SKIPPED: kvm_migrate needs the `tdp` binary beside tdp-bench (cargo build --release -p tdp-cli)"
        );
        return;
    };
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: kvm_migrate needs /dev/kvm");
        return;
    }
    let quick = cfg.reps < 10;
    let (memory, rates): (&str, &[u64]) =
        if quick { ("256M", &[16, 80]) } else { ("512M", &[16, 48, 80, 112]) };
    let mut chart_rates = Vec::new();
    let (mut ring_total, mut bitmap_total) = (Vec::new(), Vec::new());
    for &rate in rates {
        let ring = migrate(&tdp, "ring", memory, rate);
        let bitmap = migrate(&tdp, "bitmap", memory, rate);
        let name = |what: &str| format!("kvm_migrate_{memory}_{rate}mib_s/{what}_ring_vs_bitmap");
        out.rows.push(Row::new(&name("total"), ring.total_ms, bitmap.total_ms, "ms"));
        out.rows.push(Row::new(&name("downtime"), ring.downtime_ms, bitmap.downtime_ms, "ms"));
        out.notes.push(format!(
            "kvm migrate {memory} at {rate} MiB/s dirtying over a {LINK_MIB_S} MiB/s link: ring {} rounds \
             ({}), {} pages sent; bitmap {} rounds ({}), {} pages sent",
            ring.rounds,
            if ring.converged { "converged" } else { "round limit" },
            ring.pages_sent,
            bitmap.rounds,
            if bitmap.converged { "converged" } else { "round limit" },
            bitmap.pages_sent,
        ));
        chart_rates.push(rate as f64);
        ring_total.push(ring.total_ms / 1e3);
        bitmap_total.push(bitmap.total_ms / 1e3);
    }
    out.charts.push((
        "kvm_migrate_time.svg",
        Chart {
            caption: format!("Real KVM: `tdp migrate` of {memory} over {LINK_MIB_S} MiB/s, ring vs bitmap"),
            x_desc: "guest dirty rate (MiB/s)",
            y_desc: "total migration time (s)",
            xs: chart_rates,
            series: vec![("dirty ring", ring_total), ("dirty bitmap", bitmap_total)],
        },
    ));
}

fn migrate(tdp: &PathBuf, mode: &str, memory: &str, rate: u64) -> Migration {
    let output = Command::new(tdp)
        .args(["migrate", "--backend", "kvm", "--json", "--dirty-limit", "off", "--pattern", "random"])
        .args(["--mode", mode, "--memory", memory])
        .args(["--dirty-rate", &format!("{rate}MiB/s"), "--bandwidth", &format!("{LINK_MIB_S}MiB/s")])
        .output()
        .expect("run the tdp command");
    let text = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "tdp migrate --mode {mode} printed no JSON report ({e}); exit {:?}, stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        output.status.success() && report["verified"] == Value::Bool(true),
        "tdp migrate --mode {mode} at {rate} MiB/s did not verify: {report}"
    );
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    Migration {
        total_ms: f("total_ms"),
        downtime_ms: f("downtime_ms"),
        rounds: report["rounds"].as_array().map_or(0, |r| r.len() as u64),
        converged: report["converged"] == Value::Bool(true),
        pages_sent: report["pages_sent"].as_u64().unwrap_or(0),
    }
}
