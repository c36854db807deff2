//! `tdp dirty-rate`: a guest's dirty rate per vCPU over a window, as QEMU's `calc-dirty-rate` does in
//! dirty-ring mode: reset the rings, let the guest run for the window while harvesting, and divide each
//! vCPU's harvested entries by the window. With the bitmap, which cannot tell vCPUs apart, the total
//! comes from the bitmap and the split per vCPU from the guest's own write counts (the report says so).

use std::time::{Duration, Instant};

use crate::guest::{Guest, GuestError, Mode};
use crate::pending::PendingSet;
use crate::units::{MIB, PAGE_SIZE};

/// One vCPU's rate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VcpuRate {
    /// vCPU index.
    pub vcpu: usize,
    /// Dirty pages per second.
    pub pages_per_sec: f64,
    /// The same in MiB/s.
    pub mib_per_sec: f64,
    /// Dirty entries (ring) or guest writes (bitmap) counted in the window.
    pub count: u64,
}

/// The measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DirtyRateReport {
    /// The measuring window actually used, ms.
    pub window_ms: f64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuRate>,
    /// Distinct pages dirtied in the window, per second.
    pub total_pages_per_sec: f64,
    /// The same in MiB/s.
    pub total_mib_per_sec: f64,
    /// Where the per-vCPU split comes from.
    pub per_vcpu_source: &'static str,
}

/// Measures `guest` over `window`.
///
/// ```
/// use std::time::Duration;
/// use tdp_cli::dirty_rate::measure;
/// use tdp_cli::guest::{GuestConfig, Mode, Pattern};
/// use tdp_cli::mock::MockGuest;
///
/// let cfg = GuestConfig { memory: 1 << 20, vcpus: 2, pattern: Pattern::Sequential, rate_pages: 0,
///     mode: Mode::Ring, ring_entries: 256, fill: false };
/// let mut guest = MockGuest::start(cfg)?;
/// let report = measure(&mut guest, Mode::Ring, Duration::from_millis(100))?;
/// assert!(report.vcpus.iter().all(|v| v.pages_per_sec > 0.0));
/// # Ok::<(), tdp_cli::guest::GuestError>(())
/// ```
///
/// # Errors
/// A failed harvest.
pub fn measure(guest: &mut dyn Guest, mode: Mode, window: Duration) -> Result<DirtyRateReport, GuestError> {
    let mut pending = PendingSet::new(guest.pages());
    // Start from clean rings/bitmap: what was dirtied before the window does not count.
    guest.harvest(&mut pending)?;
    pending.take();
    let writes_before: Vec<u64> = guest.figures().iter().map(|f| f.writes).collect();
    let start = Instant::now();
    let h = guest.run_for(window, &mut pending)?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let writes_after: Vec<u64> = guest.figures().iter().map(|f| f.writes).collect();
    let by_ring = mode == Mode::Ring && h.per_vcpu.len() == guest.vcpus();
    let counts: Vec<u64> = if by_ring {
        h.per_vcpu.clone()
    } else {
        writes_after.iter().zip(&writes_before).map(|(a, b)| a.saturating_sub(*b)).collect()
    };
    let to_mib = |pages: f64| pages * PAGE_SIZE as f64 / MIB as f64;
    let vcpus = counts
        .iter()
        .enumerate()
        .map(|(vcpu, &count)| {
            let pages_per_sec = count as f64 / secs;
            VcpuRate { vcpu, pages_per_sec, mib_per_sec: to_mib(pages_per_sec), count }
        })
        .collect();
    let total = pending.len() as f64 / secs;
    Ok(DirtyRateReport {
        window_ms: secs * 1e3,
        vcpus,
        total_pages_per_sec: total,
        total_mib_per_sec: to_mib(total),
        per_vcpu_source: if by_ring {
            "dirty ring entries per vCPU"
        } else {
            "guest writes per vCPU (the bitmap is per memslot)"
        },
    })
}
