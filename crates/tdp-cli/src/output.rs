//! Reports: the text `tdp` prints for people (durations over 10 s in seconds) and the JSON object it
//! prints with `--json`; the live progress is [`crate::progress`].

use serde::Serialize;

use crate::dirty_rate::DirtyRateReport;
use crate::guest::{GuestConfig, Mode, Pattern};
use crate::migrate::{MigrationReport, RoundReport};

pub use crate::progress::Bar;
use crate::units::{Rate, human_bytes};

/// The guest as the reports describe it.
#[derive(Debug, Clone, Serialize)]
pub struct GuestSummary {
    /// `kvm` or `mock`.
    pub backend: &'static str,
    /// Why the mock runs although KVM was asked for (auto fallback).
    pub fallback: Option<String>,
    /// What runs the guest and how it is tracked.
    pub machine: String,
    /// Guest RAM the workload dirties (`--memory`: the data memslot), bytes.
    pub memory: u64,
    /// Every memslot of the guest: all of them migrate, and the digest covers all of them.
    pub slots: Vec<crate::proto::SlotInfo>,
    /// vCPUs.
    pub vcpus: usize,
    /// Dirty pattern.
    pub pattern: Pattern,
    /// Target dirty rate, pages/s (0: unpaced).
    pub target_dirty_pages_per_sec: u64,
    /// Tracking mode.
    pub mode: Mode,
    /// Where the throttle acts.
    pub throttle_point: &'static str,
}

impl GuestSummary {
    /// One line for the text report.
    #[must_use]
    pub fn line(&self, cfg: &GuestConfig) -> String {
        let rate = if cfg.rate_pages == 0 {
            "as fast as it can".to_owned()
        } else {
            format!("at {}", Rate { pages_per_sec: cfg.rate_pages })
        };
        let all: u64 = self.slots.iter().map(|s| s.pages).sum();
        format!(
            "guest: {} ({} in {} memslots), {} vCPUs, {} pattern {rate}\nmachine: {}",
            human_bytes(self.memory),
            human_bytes(all * crate::units::PAGE_SIZE),
            self.slots.len(),
            self.vcpus,
            clap::ValueEnum::to_possible_value(&self.pattern)
                .map_or_else(String::new, |v| v.get_name().to_owned()),
            self.machine
        )
    }
}

/// The JSON object of `tdp migrate --json`.
#[derive(Debug, Serialize)]
pub struct MigrateJson<'a> {
    /// The guest.
    pub guest: &'a GuestSummary,
    /// The destination address.
    pub destination: String,
    /// Whether the destination is the loopback receiver this command started.
    pub loopback_receiver: bool,
    /// The result on success.
    #[serde(flatten)]
    pub report: Option<&'a MigrationReport>,
    /// The error on failure.
    pub error: Option<String>,
    /// On failure: whether the source guest runs.
    pub guest_running: Option<bool>,
    /// On failure: pages still owed.
    pub pending_pages: Option<u64>,
    /// What the migration noted on the way (throttle changes, reconnections).
    pub notes: &'a [String],
}

/// Prints `value` as one JSON line on stdout.
pub fn print_json(value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(s) => crate::say!("{s}"),
        Err(e) => eprintln!("error: cannot encode the JSON report: {e}"),
    }
}

/// The text report of a finished migration.
#[must_use]
pub fn migration_text(r: &MigrationReport) -> String {
    let mut s = String::new();
    s.push_str(
        "round  pages sent   dirtied  dirty MiB/s   link MiB/s  est. downtime  vCPU quota (pages/s)\n",
    );
    for x in &r.rounds {
        s.push_str(&round_line(x));
        s.push('\n');
    }
    s.push_str(&format!("stop-and-copy: {}\n", r.stop_reason));
    s.push_str(&format!(
        "final round: {} pages sent with the vCPUs paused; downtime {}\n",
        r.final_pages,
        duration(r.downtime_ms)
    ));
    s.push_str(&format!(
        "total: {} rounds + final, {} pages sent ({}), {}\n",
        r.rounds.len(),
        r.pages_sent,
        human_bytes(r.bytes_sent),
        duration(r.total_ms)
    ));
    for x in &r.slots {
        s.push_str(&format!(
            "{}: {} pages sent, {} of them dirtied after the bulk copy\n",
            x.slot, x.pages_sent, x.dirty_pages_sent
        ));
    }
    for (i, v) in r.vcpus.iter().enumerate() {
        s.push_str(&format!(
            "vCPU {i}: {} page writes, {} ring-full exits, throttled at {} exits ({} asleep)\n",
            v.writes,
            v.ring_full_exits,
            v.throttled_exits,
            duration(v.throttle_ms as f64)
        ));
    }
    if r.verified {
        s.push_str(&format!(
            "verified: destination memory equals the source byte for byte, every memslot (BLAKE3 {}, {})\n",
            r.destination_digest,
            duration(r.verify_ms)
        ));
    } else {
        s.push_str(&format!(
            "MISMATCH: destination digest {} != source digest {}\n",
            r.destination_digest, r.source_digest
        ));
    }
    s
}

fn round_line(x: &RoundReport) -> String {
    format!(
        "{:>5} {:>11} {:>9} {:>12.1} {:>12.1} {:>14}  {}",
        x.round,
        x.pages_sent,
        x.dirtied,
        x.dirty_rate_mib_s,
        x.throughput_mib_s,
        duration(x.estimated_downtime_ms),
        x.vcpu_quota.map_or_else(|| "-".to_owned(), |q| q.to_string())
    )
}

/// The text report of a dirty-rate measurement.
#[must_use]
pub fn dirty_rate_text(r: &DirtyRateReport) -> String {
    let mut s = format!("window: {}; per vCPU from {}\n", duration(r.window_ms), r.per_vcpu_source);
    for v in &r.vcpus {
        s.push_str(&format!(
            "vCPU {}: {:.0} pages/s ({:.1} MiB/s), {} pages in the window\n",
            v.vcpu, v.pages_per_sec, v.mib_per_sec, v.count
        ));
    }
    s.push_str(&format!(
        "total (distinct pages): {:.0} pages/s ({:.1} MiB/s)\n",
        r.total_pages_per_sec, r.total_mib_per_sec
    ));
    if let Some(x) = &r.sampling {
        let (sampled, changed) = x.slots.iter().fold((0, 0), |(n, c), s| (n + s.sampled, c + s.changed));
        s.push_str(&format!(
            "sampling: {changed} of {sampled} sampled pages changed ({} per GiB, {} memslots, seed {}); standard error {:.0} pages/s\n",
            x.pages_per_gib,
            x.slots.len(),
            x.seed,
            x.stderr_pages_per_sec
        ));
    }
    s
}

/// A duration for people: milliseconds up to 10 s (`232.5 ms`), seconds beyond (`139.2 s`).
///
/// ```
/// use tdp_cli::output::duration;
/// assert_eq!((duration(232.46), duration(9_999.0), duration(139_185.0)), ("232.5 ms".into(), "9999.0 ms".into(), "139.2 s".into()));
/// ```
#[must_use]
pub fn duration(ms: f64) -> String {
    if ms.abs() > 10_000.0 { format!("{:.1} s", ms / 1e3) } else { format!("{ms:.1} ms") }
}
