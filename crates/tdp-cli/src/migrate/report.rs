//! What a migration reports: per-round figures, the final report, the failure with the state it left,
//! and the [`Progress`] hooks the loop calls.

use crate::guest::{GuestError, VcpuFigures};
use crate::link::LinkError;
use crate::proto::SlotInfo;

/// What a migration sent of one memslot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotSent {
    /// The memslot.
    #[serde(flatten)]
    pub slot: SlotInfo,
    /// Pages of it sent, repeats included (its whole size in the bulk copy, then what was dirtied).
    pub pages_sent: u64,
    /// Of those, pages sent after the bulk copy: the slot's pages the tracker reported dirty.
    pub dirty_pages_sent: u64,
}

/// One round as reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// Round number (0: bulk copy).
    pub round: u32,
    /// Pages sent.
    pub pages_sent: u64,
    /// Pages dirtied while it was sent (harvested after it).
    pub dirtied: u64,
    /// Guest dirty rate during the round, MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Measured link throughput (smoothed), MiB/s.
    pub throughput_mib_s: f64,
    /// Estimated downtime if stopped after this round, ms.
    pub estimated_downtime_ms: f64,
    /// Each vCPU's dirty rate in the round, pages/s, where the tracker tells them apart (ring); else empty.
    pub vcpu_dirty_pages_per_sec: Vec<f64>,
    /// Per-vCPU quota in force after the round, pages/s (None: unthrottled).
    pub vcpu_quota: Option<u64>,
    /// Round wall time, ms.
    pub ms: f64,
}

/// The outcome of a finished migration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (bulk copy included), then the final round.
    pub rounds: Vec<RoundReport>,
    /// Whether the downtime estimate met the target before stop-and-copy.
    pub converged: bool,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// Pages sent in the final (stop-and-copy) round.
    pub final_pages: u64,
    /// All pages sent, repeats included.
    pub pages_sent: u64,
    /// Bytes written to the link, over all connections.
    pub bytes_sent: u64,
    /// Connections lost and re-established.
    pub reconnects: u32,
    /// Pages owed when a connection broke, sent again over the next one.
    pub resent_pages: u64,
    /// From the pause of the vCPUs until the destination acknowledged the final round, ms.
    pub downtime_ms: f64,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Time to compute and compare the digests, ms.
    pub verify_ms: f64,
    /// The source's digest (hex).
    pub source_digest: String,
    /// The destination's digest (hex).
    pub destination_digest: String,
    /// Whether they are equal: the destination holds the source's memory byte for byte, every slot.
    pub verified: bool,
    /// Per memslot: what was sent of it.
    pub slots: Vec<SlotSent>,
    /// Per-vCPU figures.
    pub vcpus: Vec<VcpuFigures>,
}

/// Why a migration failed, with the state it left.
#[derive(Debug)]
pub struct MigrationFailure {
    /// The cause.
    pub error: FailureCause,
    /// Rounds completed before it.
    pub rounds_done: u32,
    /// Pages still owed to a destination (harvested or unacknowledged): kept, not forgotten.
    pub pending_pages: u64,
    /// Whether the source guest runs again after the failure.
    pub guest_running: bool,
    /// Whether the failure came during stop-and-copy, so the vCPUs had to be resumed.
    pub was_paused: bool,
    /// Whether the pages owed were given back to the tracker (its next harvest reports them).
    pub given_back: bool,
    /// Pages the guest dirtied in a short window after the failure (proof that it runs).
    pub dirtied_after: u64,
}

/// The cause of a failed migration.
#[derive(Debug, thiserror::Error)]
pub enum FailureCause {
    /// The link to the destination failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The source guest failed.
    #[error("source guest: {0}")]
    Guest(#[from] GuestError),
    /// SIGINT or SIGTERM asked the command to stop.
    #[error("interrupted by {}", .0.name())]
    Interrupted(crate::signals::Signal),
}

/// Hooks the loop reports to (the progress bar).
pub trait Progress {
    /// A round finished.
    fn round(&mut self, r: &RoundReport, pending: u64);
    /// Something worth a line (throttle changes, stop-and-copy).
    fn note(&mut self, text: &str);
    /// `done` of the `total` pages of round `round` are sent (called after each run, for a live
    /// display; the default ignores it).
    fn sent(&mut self, round: u32, done: u64, total: u64) {
        let _ = (round, done, total);
    }
}

/// A [`Progress`] that ignores everything.
pub struct Silent;

impl Progress for Silent {
    fn round(&mut self, _: &RoundReport, _: u64) {}
    fn note(&mut self, _: &str) {}
}
