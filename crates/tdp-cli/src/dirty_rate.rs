//! `tdp dirty-rate`: a guest's dirty rate over a window, in QEMU's three `calc-dirty-rate` modes.
//!
//! - **Ring** (QEMU's `dirty-ring` mode): reset the rings, let the guest run for the window while
//!   harvesting, and divide each vCPU's harvested entries by the window.
//! - **Bitmap / clear-log** (QEMU's `dirty-bitmap` mode): the same with the per-memslot bitmap, which
//!   cannot tell vCPUs apart: the total comes from the bitmap and the split per vCPU from the guest's own
//!   write counts (the report says so).
//! - **Sampling** (QEMU's `page-sampling` mode, [`measure_sampling`]): no dirty logging at all. Pick a
//!   uniformly random sample of pages in each memslot ([`Sampling::pages_per_gib`], QEMU's
//!   `sample-pages`, 512 per GiB by default, at least one per slot), hash each at the start of the window
//!   and again at its end, and estimate the distinct pages dirtied as `changed / sampled × pages`, slot by
//!   slot (a stratified estimate: each slot's fraction weighs by its own size, so a small slot sampled
//!   more densely does not skew the total; QEMU pools the fractions of its RAM blocks instead and skips
//!   blocks under 128 MiB, which would skip all of a small guest). A page written back with the contents
//!   it had is invisible to a hash: the guests here write a new value every time (the mock an iteration
//!   counter, the KVM guest an iteration number the host advances after each batch in this mode).
//!
//! All three estimate the same figure: distinct pages dirtied in the window, per second, over all guest
//! memory (every memslot).
//!
//! # How exact is sampling?
//! With `n` of a slot's `N` pages sampled without replacement and a true dirty fraction `p`, the
//! estimate `p̂` is unbiased with standard deviation `sqrt(p(1-p)/n × (N-n)/(N-1))`, and by Hoeffding's
//! inequality with Serfling's finite-population correction `P(|p̂ - p| ≥ t) ≤ 2 exp(-2 n t² / (1 -
//! (n-1)/N))`. The report gives the estimate's standard error ([`SampleFigures::stderr_pages_per_sec`]).
//! The two passes hash the sampled pages in the same random order (a shuffle, so that the order has
//! nothing to do with where a guest writes): a page's place in a pass is uniform, so on average it is
//! hashed at the middle of the pass, and the window is the time from the middle of the first pass to
//! the middle of the second (the vCPUs' write counts are read at those two points as well). A pass
//! faster or slower than the other would otherwise bias the rate by half their difference.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::guest::{Guest, GuestError, Mode};
use crate::pending::PendingSet;
use crate::proto::SlotInfo;
use crate::units::{MIB, PAGE_SIZE};

/// QEMU's default sample size: 512 pages per GiB.
pub const DEFAULT_SAMPLE_PAGES_PER_GIB: u32 = 512;
/// Pages in a GiB.
const PAGES_PER_GIB: u64 = (1 << 30) / PAGE_SIZE;

/// One vCPU's rate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VcpuRate {
    /// vCPU index.
    pub vcpu: usize,
    /// Dirty pages per second.
    pub pages_per_sec: f64,
    /// The same in MiB/s.
    pub mib_per_sec: f64,
    /// Dirty entries (ring) or guest writes (bitmap, sampling) counted in the window.
    pub count: u64,
    /// Pages the guest says this vCPU wrote in the window (repeats included), whatever the mode: the
    /// workload's own count, to compare the estimates with.
    pub writes: u64,
}

/// The measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DirtyRateReport {
    /// The measuring window actually used, ms.
    pub window_ms: f64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuRate>,
    /// Distinct pages dirtied in the window, per second (with sampling: the estimate).
    pub total_pages_per_sec: f64,
    /// The same in MiB/s.
    pub total_mib_per_sec: f64,
    /// Where the per-vCPU split comes from.
    pub per_vcpu_source: &'static str,
    /// With sampling: the sample and what it saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SampleFigures>,
}

/// How sampling picks its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// Pages sampled per GiB of a memslot (rounded up, at least one per slot, at most every page).
    pub pages_per_gib: u64,
    /// The seed of the sample: the same seed on the same layout samples the same pages.
    pub seed: u64,
}

impl Sampling {
    /// QEMU's default sample size (512 per GiB) with `seed`.
    #[must_use]
    pub const fn new(seed: u64) -> Sampling {
        Sampling { pages_per_gib: DEFAULT_SAMPLE_PAGES_PER_GIB as u64, seed }
    }

    /// How many pages of a slot of `pages` pages are sampled.
    ///
    /// ```
    /// use tdp_cli::dirty_rate::Sampling;
    /// let s = Sampling::new(1);
    /// assert_eq!(s.sample_size(1 << 18), 512, "512 per GiB");
    /// assert_eq!(s.sample_size(12), 1, "at least one page of a small slot");
    /// assert_eq!(Sampling { pages_per_gib: 1 << 18, seed: 1 }.sample_size(12), 12, "every page");
    /// ```
    #[must_use]
    pub fn sample_size(&self, pages: u64) -> u64 {
        let n = u128::from(pages) * u128::from(self.pages_per_gib.max(1));
        let n = u64::try_from(n.div_ceil(u128::from(PAGES_PER_GIB))).unwrap_or(u64::MAX);
        n.clamp(1, pages.max(1)).min(pages)
    }
}

/// What the sample of one memslot saw.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotSample {
    /// The memslot.
    #[serde(flatten)]
    pub slot: SlotInfo,
    /// Pages sampled.
    pub sampled: u64,
    /// Sampled pages whose hash changed.
    pub changed: u64,
}

/// The sample of a sampling measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SampleFigures {
    /// Pages sampled per GiB.
    pub pages_per_gib: u64,
    /// The sample's seed (`--sample-seed` repeats it).
    pub seed: u64,
    /// Per memslot.
    pub slots: Vec<SlotSample>,
    /// Distinct pages dirtied in the window, estimated (`Σ changed / sampled × pages`).
    pub estimated_pages: f64,
    /// The estimate's standard error, pages/s (finite-population corrected; 0 when every page is sampled).
    pub stderr_pages_per_sec: f64,
}

/// A seed from the clock's nanoseconds and the process id.
#[must_use]
pub fn clock_seed() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// Measures `guest` over `window` in `mode`; sampling with QEMU's default sample and a seed from the
/// clock ([`measure_with`] chooses them).
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
/// A failed harvest or page read.
pub fn measure(guest: &mut dyn Guest, mode: Mode, window: Duration) -> Result<DirtyRateReport, GuestError> {
    measure_with(guest, mode, window, Sampling::new(clock_seed()))
}

/// As [`measure`], with the sample `sampling` takes in [`Mode::Sampling`] (unused in the other modes).
/// In the ring and bitmap modes the vCPUs are paused for a moment at each end of the window, while the
/// harvest and their write counters are read together.
///
/// # Errors
/// A failed harvest or page read; a vCPU thread that failed (when pausing or resuming).
pub fn measure_with(
    guest: &mut dyn Guest,
    mode: Mode,
    window: Duration,
    sampling: Sampling,
) -> Result<DirtyRateReport, GuestError> {
    if mode == Mode::Sampling {
        return measure_sampling(guest, window, sampling);
    }
    let mut pending = PendingSet::new(guest.slots());
    // Start from clean rings/bitmap: what was dirtied before the window does not count. The vCPUs are
    // paused for the harvest and the reading of their write counters at each end of the window, so that
    // the two cover the same writes: a write between a running guest's last harvest and the reading of
    // its counters would be counted by one and not the other (on a loaded host, hundreds of pages).
    guest.pause()?;
    guest.harvest(&mut pending)?;
    pending.take();
    let writes_before = writes(guest);
    guest.resume()?;
    let start = Instant::now();
    let mut h = guest.run_for(window, &mut pending)?;
    guest.pause()?;
    let last = guest.harvest(&mut pending)?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let written = since(&writes_before, &writes(guest));
    guest.resume()?;
    h.new_pages += last.new_pages;
    for (total, n) in h.per_vcpu.iter_mut().zip(&last.per_vcpu) {
        *total += n;
    }
    let by_ring = mode == Mode::Ring && h.per_vcpu.len() == guest.vcpus();
    let counts: Vec<u64> = if by_ring { h.per_vcpu.clone() } else { written.clone() };
    let source = if by_ring {
        "dirty ring entries per vCPU"
    } else {
        "guest writes per vCPU (the bitmap is per memslot)"
    };
    Ok(report(secs, &counts, &written, pending.len() as f64, source, None))
}

/// QEMU's page-sampling mode: hashes a random sample of every memslot's pages at the start and at the
/// end of `window` (see the module docs), with no dirty logging. Works on a guest in any mode (one
/// started with [`Mode::Sampling`] logs nothing); a logging guest is harvested while the window runs,
/// so its rings do not fill, and what is harvested is dropped.
///
/// ```
/// use std::time::Duration;
/// use tdp_cli::dirty_rate::{measure_sampling, Sampling};
/// use tdp_cli::guest::{GuestConfig, Mode, Pattern};
/// use tdp_cli::mock::MockGuest;
///
/// let cfg = GuestConfig { memory: 1 << 20, vcpus: 1, pattern: Pattern::Sequential, rate_pages: 0,
///     mode: Mode::Sampling, ring_entries: 512, fill: false };
/// let mut guest = MockGuest::start(cfg)?;
/// // 1 MiB is 256 pages: a sample of every page, so the estimate is exact.
/// let r = measure_sampling(&mut guest, Duration::from_millis(100), Sampling { pages_per_gib: 1 << 18, seed: 7 })?;
/// let sample = r.sampling.as_ref().expect("sampling figures");
/// assert_eq!(sample.slots[0].sampled, 256);
/// assert!(r.total_pages_per_sec > 0.0 && sample.stderr_pages_per_sec == 0.0);
/// # Ok::<(), tdp_cli::guest::GuestError>(())
/// ```
///
/// # Errors
/// A failed page read or harvest.
pub fn measure_sampling(
    guest: &mut dyn Guest,
    window: Duration,
    sampling: Sampling,
) -> Result<DirtyRateReport, GuestError> {
    let slots = guest.slots().to_vec();
    let mut rng = SplitMix64(sampling.seed);
    // Every sampled page as (slot index, page), then in a random order, the same for both passes: a pass
    // in address order would sweep memory alongside a guest that writes sequentially, and the pages it
    // reaches late would be watched while the writer catches up with them (found by the comparison
    // test: the mock's estimate was 25% high with ascending passes).
    let mut order: Vec<(usize, u64)> = Vec::new();
    for (i, s) in slots.iter().enumerate() {
        order.extend(
            sample_pages(&mut rng, s.pages, sampling.sample_size(s.pages)).into_iter().map(|p| (i, p)),
        );
    }
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // A pass hashes every sampled page; halfway through it notes the time and the guest's write counts:
    // a page's place in the shuffled order is uniform, so the middle of a pass is where its pages are
    // hashed on average, and the time between the two middles is how long a sampled page was watched.
    let mut pass = |guest: &dyn Guest| -> Result<Pass, GuestError> {
        let mut middle = None;
        let mut hashes = Vec::with_capacity(order.len());
        for (k, &(i, p)) in order.iter().enumerate() {
            if k == order.len() / 2 {
                middle = Some((Instant::now(), writes(guest)));
            }
            guest.read_page(slots[i].slot, p, &mut buf)?;
            hashes.push(*blake3::hash(&buf).as_bytes());
        }
        let (middle, writes) = middle.unwrap_or_else(|| (Instant::now(), writes(guest)));
        Ok(Pass { hashes, middle, writes })
    };
    let mut scratch = PendingSet::new(&slots);
    guest.harvest(&mut scratch)?;
    let Pass { hashes: before, middle: start, writes: writes_before } = pass(guest)?;
    // The second pass's middle comes half a pass after it starts: start it that much early (a pass takes
    // about as long as the last one, which ended half a pass after its middle).
    let half_pass = start.elapsed();
    let rest = window.saturating_sub(half_pass + half_pass);
    guest.run_for(rest, &mut scratch)?;
    let Pass { hashes: after, middle: end, writes: writes_after } = pass(guest)?;
    let secs = end.duration_since(start).as_secs_f64().max(1e-9);

    let mut per_slot: Vec<SlotSample> =
        slots.iter().map(|s| SlotSample { slot: *s, sampled: 0, changed: 0 }).collect();
    for ((&(i, _), b), a) in order.iter().zip(&before).zip(&after) {
        if let Some(s) = per_slot.get_mut(i) {
            s.sampled += 1;
            s.changed += u64::from(b != a);
        }
    }
    let (mut estimated, mut variance) = (0.0f64, 0.0f64);
    for x in &per_slot {
        let (sampled, changed) = (x.sampled, x.changed);
        let (n, big_n) = (sampled as f64, x.slot.pages as f64);
        if sampled > 0 {
            let p = changed as f64 / n;
            estimated += p * big_n;
            if big_n > 1.0 {
                variance += big_n * big_n * p * (1.0 - p) / n * (big_n - n) / (big_n - 1.0);
            }
        }
    }
    let counts = since(&writes_before, &writes_after);
    let figures = SampleFigures {
        pages_per_gib: sampling.pages_per_gib,
        seed: sampling.seed,
        slots: per_slot,
        estimated_pages: estimated,
        stderr_pages_per_sec: variance.max(0.0).sqrt() / secs,
    };
    let source = "guest writes per vCPU (sampling cannot tell vCPUs apart)";
    Ok(report(secs, &counts, &counts, estimated, source, Some(figures)))
}

/// One hashing pass of [`measure_sampling`].
struct Pass {
    /// Each sampled page's hash, in the pass's order.
    hashes: Vec<[u8; 32]>,
    /// When the pass was halfway.
    middle: Instant,
    /// The vCPUs' write counts then.
    writes: Vec<u64>,
}

fn writes(guest: &dyn Guest) -> Vec<u64> {
    guest.figures().iter().map(|f| f.writes).collect()
}

fn since(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).collect()
}

fn report(
    secs: f64,
    counts: &[u64],
    written: &[u64],
    distinct: f64,
    per_vcpu_source: &'static str,
    sampling: Option<SampleFigures>,
) -> DirtyRateReport {
    let to_mib = |pages: f64| pages * PAGE_SIZE as f64 / MIB as f64;
    let vcpus = counts
        .iter()
        .enumerate()
        .map(|(vcpu, &count)| {
            let pages_per_sec = count as f64 / secs;
            let writes = written.get(vcpu).copied().unwrap_or(0);
            VcpuRate { vcpu, pages_per_sec, mib_per_sec: to_mib(pages_per_sec), count, writes }
        })
        .collect();
    let total = distinct / secs;
    DirtyRateReport {
        window_ms: secs * 1e3,
        vcpus,
        total_pages_per_sec: total,
        total_mib_per_sec: to_mib(total),
        per_vcpu_source,
        sampling,
    }
}

/// `n` distinct pages of `0..pages`, uniformly at random, ascending (Floyd's algorithm: `n` draws, no
/// allocation beyond the `n` pages).
fn sample_pages(rng: &mut SplitMix64, pages: u64, n: u64) -> Vec<u64> {
    let mut chosen = BTreeSet::new();
    for j in pages.saturating_sub(n)..pages {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

/// SplitMix64 (Steele, Lea and Flood 2014; the seeder of Java's `SplittableRandom`): a tiny seeded
/// generator whose outputs pass BigCrush. No random-number crate is in the dependency tree, and a
/// sample needs statistical quality, not unpredictability.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0), without modulo bias (Lemire's multiply-shift with rejection).
    fn below(&mut self, bound: u64) -> u64 {
        let bound = bound.max(1);
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_distinct_in_range_and_cover_the_slot_uniformly() {
        let mut rng = SplitMix64(42);
        let s = sample_pages(&mut rng, 1000, 1000);
        assert_eq!(s, (0..1000).collect::<Vec<_>>(), "a sample of every page is every page");
        // 20000 samples of 10 out of 100 pages: each page is picked 2000 times on average; with a
        // standard deviation of sqrt(20000 × 0.1 × 0.9) ≈ 42, every page lies within ±300 (7 sigma).
        let mut hits = [0u32; 100];
        for _ in 0..20_000 {
            let s = sample_pages(&mut rng, 100, 10);
            assert_eq!(s.len(), 10);
            assert!(s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&p| p < 100));
            for p in s {
                hits[p as usize] += 1;
            }
        }
        assert!(hits.iter().all(|&h| (1700..=2300).contains(&h)), "{hits:?}");
        assert!(sample_pages(&mut rng, 0, 5).is_empty());
    }

    #[test]
    fn below_is_in_range() {
        let mut rng = SplitMix64(0);
        assert!((0..10_000).all(|_| rng.below(3) < 3));
        assert_eq!(rng.below(1), 0);
        assert!((0..1000).all(|_| rng.below(u64::MAX) < u64::MAX));
    }

    #[test]
    fn sample_size_follows_qemus_per_gib_rule() {
        let s = Sampling::new(0);
        assert_eq!(s.sample_size(0), 0);
        assert_eq!(s.sample_size(1 << 20), 2048, "4 GiB: 512 per GiB");
        assert_eq!(s.sample_size((1 << 18) + 1), 513, "rounded up");
        let huge = Sampling { pages_per_gib: u64::MAX, seed: 0 };
        assert_eq!(huge.sample_size(u64::MAX), u64::MAX, "no overflow");
    }
}
