//! Live migration on real KVM with the `tdp` command: total time and downtime, dirty ring against dirty
//! bitmap, at a few guest dirty rates over a link limited to 128 MiB/s — this machine's version of the
//! dirty-ring cover letter's QEMU comparison (24 GiB guest, 8 vCPUs, 10 GbE, 800 MB/s of dirtying: the ring
//! took 73 s on average, the bitmap 55 s).
//!
//! A last pair of runs (full mode only) takes the cover letter's regime further: the guest dirties 1 GiB
//! as fast as it can and the link is unlimited.
//!
//! Each run is `tdp migrate --backend kvm --json` with a loopback destination, random writes, dirty-limit
//! throttling off (the cover letter's runs had none), and the mode under test; the JSON report gives total
//! time, downtime, rounds and whether the destination's digest matched (a run that does not verify fails the
//! benchmark). The `tdp` binary is looked up beside this one (`cargo xtask bench` builds both).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::config::Config;
use crate::outcome::Outcome;
use crate::plot::Chart;
use crate::report::Row;

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
    /// The guest's dirty rate in each of the first rounds, MiB/s (rounded).
    pub dirty_mib_s: [u32; 6],
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
        let (rate_arg, link_arg) = (format!("{rate}MiB/s"), format!("{LINK_MIB_S}MiB/s"));
        let ring = migrate(&tdp, "ring", memory, &rate_arg, &link_arg);
        let bitmap = migrate(&tdp, "bitmap", memory, &rate_arg, &link_arg);
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
    if !quick {
        // The cover letter's regime, where dirtying rivals the link: here the guest dirties as fast as it
        // can and the loopback link is unlimited, so migration competes with the vCPUs for the two cores.
        let ring = migrate(&tdp, "ring", "1G", "max", "max");
        let bitmap = migrate(&tdp, "bitmap", "1G", "max", "max");
        let name = |what: &str| format!("kvm_migrate_1G_max_rate_unlimited_link/{what}_ring_vs_bitmap");
        out.rows.push(Row::new(&name("total"), ring.total_ms, bitmap.total_ms, "ms"));
        out.rows.push(Row::new(&name("downtime"), ring.downtime_ms, bitmap.downtime_ms, "ms"));
        out.notes.push(format!(
            "kvm migrate 1G, guest dirtying at its maximum, unlimited loopback link: ring {} rounds ({}), {} \
             pages sent, dirty rate by round {:?} MiB/s; bitmap {} rounds ({}), {} pages sent, dirty rate by \
             round {:?} MiB/s",
            ring.rounds,
            if ring.converged { "converged" } else { "round limit" },
            ring.pages_sent,
            ring.dirty_mib_s,
            bitmap.rounds,
            if bitmap.converged { "converged" } else { "round limit" },
            bitmap.pages_sent,
            bitmap.dirty_mib_s,
        ));
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

fn migrate(tdp: &PathBuf, mode: &str, memory: &str, rate: &str, link: &str) -> Migration {
    let output = Command::new(tdp)
        .args(["migrate", "--backend", "kvm", "--json", "--dirty-limit", "off", "--pattern", "random"])
        .args(["--mode", mode, "--memory", memory, "--dirty-rate", rate, "--bandwidth", link])
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
        "tdp migrate --mode {mode} at {rate} did not verify: {report}"
    );
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    Migration {
        total_ms: f("total_ms"),
        downtime_ms: f("downtime_ms"),
        rounds: report["rounds"].as_array().map_or(0, |r| r.len() as u64),
        converged: report["converged"] == Value::Bool(true),
        pages_sent: report["pages_sent"].as_u64().unwrap_or(0),
        dirty_mib_s: core::array::from_fn(|i| {
            report["rounds"][i]["dirty_rate_mib_s"].as_f64().map_or(0, |r| r.round() as u32)
        }),
    }
}
