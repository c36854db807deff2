//! The dirty-tracking targets of the issue, judged from the rows of a run: the ring's throughput against
//! `rtrb`, the enable-logging pass against the two sweeps, and where the ring's harvest overtakes the
//! bitmap's. Printed, never asserted, like the targets in [`crate::report`].

use crate::harvest::DIRTY;
use crate::report::Row;
use crate::ring::{RING_1T, RING_2T};

/// The ring moves entries at least as fast as `rtrb`: ratio (ns per entry) at most this.
pub const RING_TARGET_RATIO: f64 = 1.0;
/// The enable-logging pass is within this factor of the atomic sweep.
pub const LOGGING_ATOMIC_TARGET: f64 = 1.5;
/// ... and within this factor of the plain sweep where the protocol allows plain stores.
pub const LOGGING_PLAIN_TARGET: f64 = 2.0;

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

/// One line per dirty-tracking target found in `rows`.
#[must_use]
pub fn lines(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = rows.iter().find(|r| r.name == RING_2T) {
        out.push(format!(
            "target ring push+harvest+reset throughput >= rtrb (two threads): {} ({:.0} vs {:.0} M entries/s, \
             {:.2}x the time)",
            verdict(r.ratio <= RING_TARGET_RATIO),
            1e3 / r.ours,
            1e3 / r.peer,
            r.ratio
        ));
    }
    if let Some(r) = rows.iter().find(|r| r.name == RING_1T) {
        out.push(format!(
            "  (for the record, one thread in batches, not the target's row: {:.0} vs {:.0} M entries/s, {:.2}x)",
            1e3 / r.ours,
            1e3 / r.peer,
            r.ratio
        ));
    }
    for (suffix, limit) in
        [("/atomic_rmw_sweep", LOGGING_ATOMIC_TARGET), ("/plain_write_sweep", LOGGING_PLAIN_TARGET)]
    {
        for r in rows.iter().filter(|r| r.name.starts_with("enable_logging_") && r.name.ends_with(suffix)) {
            let what = r.name.trim_end_matches(suffix);
            // Every configuration measured stores plainly: its leaves are born with A and D set, so no
            // hardware writer races the pass (KVM's `spte_needs_atomic_update`), and the write lock is held.
            out.push(format!(
                "target {what} <= {limit}x {}: {} ({:.2} vs {:.2} ns/spte, {:.2}x)",
                suffix.trim_start_matches('/'),
                verdict(r.ratio <= limit),
                r.ours,
                r.peer,
                r.ratio
            ));
        }
    }
    let harvest: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.name.starts_with(&format!("harvest_{DIRTY}_dirty/")) && r.name.ends_with("/ring_vs_bitmap")
        })
        .collect();
    if let (Some(first), Some(last)) = (harvest.first(), harvest.last()) {
        let flat = last.ours / first.ours;
        let linear = last.peer / first.peer;
        let crossover = harvest
            .iter()
            .find(|r| r.ratio < 1.0)
            .map_or("none".to_owned(), |r| r.name.split('/').nth(1).unwrap_or("?").to_owned());
        out.push(format!(
            "harvest of {DIRTY} dirty pages, smallest to largest memory: ring x{flat:.1}, bitmap x{linear:.1}; \
             first size where the ring is cheaper: {crossover}"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_for_each_dirty_target() {
        let rows = [
            Row::new(RING_2T, 4.0, 5.0, "ns/entry"),
            Row::new("enable_logging_1g_4k/atomic_rmw_sweep", 4.0, 2.0, "ns/spte"),
            Row::new("enable_logging_1g_4k/plain_write_sweep", 4.0, 2.5, "ns/spte"),
            Row::new("harvest_1000_dirty/1g/ring_vs_bitmap", 5.0, 2.0, "us/harvest"),
            Row::new("harvest_1000_dirty/1g/ring_vs_bitmap_manual", 5.0, 3.0, "us/harvest"),
            Row::new("harvest_1000_dirty/4g/ring_vs_bitmap", 5.0, 8.0, "us/harvest"),
        ];
        let t = lines(&rows);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(t[0].contains(": MET (250 vs 200"), "{}", t[0]);
        assert!(t[1].contains("enable_logging_1g_4k <= 1.5x atomic_rmw_sweep: NOT MET"), "{}", t[1]);
        assert!(t[2].contains("<= 2x plain_write_sweep: MET"), "{}", t[2]);
        assert!(
            t[3].contains("ring x1.0, bitmap x4.0; first size where the ring is cheaper: 4g"),
            "{}",
            t[3]
        );
    }
}
