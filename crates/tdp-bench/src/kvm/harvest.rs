//! Harvest cost on real KVM at 1000 dirty pages for 1, 4, 16 and 64 GiB memslots: `tdp-kvm`'s ring
//! against its bitmap, and its bitmap path against raw `kvm-ioctls`.
//!
//! Each round the guest (one vCPU, CPL3) writes 1000 pseudo-random pages of the data slot in one batch
//! (untimed), then one collector gathers them (timed) into a list of dirty page offsets:
//! - **ring**: [`tdp_kvm::DirtyTracker::collect`] of a ring tracker (harvest of the vCPU's mmap'd ring,
//!   then `KVM_RESET_DIRTY_RINGS`, which re-protects the pages), timed until it returns its per-slot sets
//!   (sorted, without repeats); reading them into a list for the check is not timed;
//! - **raw ring**: [`tdp_kvm::DirtyRing`] harvest into a list plus [`tdp_kvm::reset_dirty_rings`], no
//!   tracker: what KVM's reset costs, to show what the tracker adds. The two rings are two vCPUs of one
//!   VM, taking turns and writing the same pages in the same order, so that their ratio is the tracker's
//!   and not a difference between VMs or between pages;
//! - **ours, bitmap**: [`tdp_kvm::get_dirty_log`] into a reused buffer (`KVM_GET_DIRTY_LOG`, which
//!   re-protects) and a scan of its bits;
//! - **kvm-ioctls, bitmap**: `VmFd::get_dirty_log` (which allocates its bitmap each call) and the same scan;
//! - **tracker, bitmap**: the tracker's collect of a get-and-clear tracker, for the record.
//!
//! One more layout tells the slot's size apart from the dirty pages' spread: a 16 GiB slot whose guest
//! writes stay in its first GiB, the 1 GiB slot's spread.
//!
//! Every layout has two sets of VMs (the two-vCPU ring VM, the bitmap VM), one set built before all the
//! others and one after, and a throwaway set is built and dropped before any: on this host a VM's timings depend a
//! little on when it was built. Every round, every set runs one round of each of its VMs (in alternating
//! order), the sets taking turns from a start that moves on each round.
//! A figure is the median over both sets' rounds. The count each collect finds is checked, so a figure
//! cannot come from a collect that missed the pages.
//!
//! The tracker's overhead over the raw ring is given four ways:
//! - the ratio of the two arms' medians;
//! - paired: the raw ring's median plus the median difference between each tracker collect and the raw
//!   collect next to it. KVM's reset of the same 1000 pages varies by 90-370 µs from collect to collect
//!   here, far more than the tracker's 10-20 µs, and the two medians of 124 collects each move by several
//!   µs from run to run in either arm. Neighbouring collects share part of that variation (their
//!   differences spread about two thirds as widely as those of unpaired collects), but the median of 124
//!   paired differences still moves by about 5 µs from run to run;
//! - the tracker's own work: the same, with each collect's time inside `KVM_RESET_DIRTY_RINGS` taken out
//!   (the tracker's [`reset_time`](tdp_kvm::TrackerStats::reset_time), the raw collect's timed call).
//!   Both arms make the same call, right after their harvest, so what is left is what the tracker does
//!   that the raw ring does not, without the reset's variation: its paired differences spread over a few
//!   µs, not a hundred. The target is judged on this one;
//! - and, so that the last one cannot hide a cost, KVM's reset in the tracker's collects against the raw
//!   ring's, paired: about 1x unless the tracker makes KVM's reset slower.

mod contenders;

use contenders::{BitmapCollector, Layout, RING_PAIRS, VmSet};

use crate::config::{Config, PAGES_1G};
use crate::outcome::Outcome;
use crate::plot::Chart;
use crate::report::Row;
use crate::timing::median;

/// Pages the guest dirties per round.
pub const DIRTY: u64 = 1000;
/// Slot sizes measured, in GiB: the 1, 4 and 16, and 64 beyond them.
pub const SIZES_GIB: [u64; 4] = [1, 4, 16, 64];
/// The sizes the flatness target compares: [`SIZES_GIB`]`[FLAT_FROM]` (1 GiB) and `[FLAT_TO]` (16 GiB).
const FLAT_FROM: usize = 0;
/// See [`FLAT_FROM`].
const FLAT_TO: usize = 2;
const _: () = assert!(SIZES_GIB[FLAT_FROM] == 1 && SIZES_GIB[FLAT_TO] == 16);
/// The layout after the whole-slot ones: 16 GiB written within its first GiB.
const SPREAD_1G: usize = SIZES_GIB.len();
/// The bitmap target: our path at most this factor of raw kvm-ioctls.
const BITMAP_TARGET: f64 = 1.05;
/// The tracker target: a ring tracker's collect at most this factor of the raw ring's.
const TRACKER_TARGET: f64 = 1.05;
/// The unit of the rows.
pub const UNIT: &str = "us/harvest";

/// Row name: ring against our bitmap at `gib`.
#[must_use]
pub fn ring_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_vs_bitmap")
}

/// Row name: our bitmap path against raw kvm-ioctls at `gib` (target: at most 1.05x).
#[must_use]
pub fn bitmap_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/bitmap_vs_kvm_ioctls")
}

/// Row name: our bitmap *tracker* (per-slot sets) against raw kvm-ioctls at `gib`.
#[must_use]
pub fn tracker_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/bitmap_tracker_vs_kvm_ioctls")
}

/// Row name: the ring through the tracker against the raw ring (harvest + reset ioctl) at `gib`.
#[must_use]
pub fn ring_raw_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_tracker_vs_ring_raw")
}

/// Row name: the tracker's overhead over the raw ring at `gib`, from paired collects: the raw ring's
/// median plus the median of the differences between a tracker collect and the raw collect next to it
/// (target: at most 1.05x the raw ring's median).
#[must_use]
pub fn ring_paired_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_tracker_paired_vs_ring_raw")
}

/// Row name: the tracker's own work over the raw ring at `gib`: the raw ring's median plus the median, over
/// paired collects, of the difference of their times outside `KVM_RESET_DIRTY_RINGS` (the tracker's
/// [`reset_time`](tdp_kvm::TrackerStats::reset_time), the raw collect's timed call).
#[must_use]
pub fn ring_own_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_tracker_own_work_vs_ring_raw")
}

/// Row name: KVM's reset in the tracker's collect against the raw ring's, paired as
/// [`ring_paired_row`]: about 1x unless the tracker changes what the reset costs, which
/// [`ring_own_row`] would not see.
#[must_use]
pub fn ring_reset_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_tracker_reset_paired_vs_ring_raw_reset")
}

/// Row name: the target, the ring at 16 GiB against the ring at 1 GiB (flat: about 1x).
pub const RING_FLAT_ROW: &str = "kvm_harvest_ring/16g_vs_1g";
/// Row name: the ring with a 16 GiB slot whose dirty pages all lie in its first GiB, against the ring with
/// a 1 GiB slot: the slot's size alone, the dirty pages' spread held equal.
pub const RING_SPREAD_ROW: &str = "kvm_harvest_ring/16g_spread_1g_vs_1g";
/// Row name: as [`RING_FLAT_ROW`], for the raw ring (harvest + `KVM_RESET_DIRTY_RINGS`, no tracker).
pub const RAW_RING_FLAT_ROW: &str = "kvm_harvest_ring_raw/16g_vs_1g";
/// Row name: as [`RING_SPREAD_ROW`], for the raw ring.
pub const RAW_RING_SPREAD_ROW: &str = "kvm_harvest_ring_raw/16g_spread_1g_vs_1g";
/// Row name: as [`RING_SPREAD_ROW`], for our bitmap path: its cost follows the slot, not the spread.
pub const BITMAP_SPREAD_ROW: &str = "kvm_harvest_bitmap/16g_spread_1g_vs_1g";

/// The medians of one layout, in microseconds per collect.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    ring: f64,
    raw_ring: f64,
    /// The raw ring's time in `KVM_RESET_DIRTY_RINGS`.
    raw_reset: f64,
    /// The median over paired collects of (tracker - raw): KVM's reset varies by more than the tracker
    /// costs from one collect to the next, and two collects next to each other share more of that
    /// variation than two medians of 124 collects do.
    ring_gap: f64,
    /// The median over paired collects of the difference of their times outside
    /// `KVM_RESET_DIRTY_RINGS`: the tracker's own work, without the reset's variation.
    own_gap: f64,
    /// The median over paired collects of the difference of their times inside `KVM_RESET_DIRTY_RINGS`:
    /// about 0 unless the tracker changes what KVM's reset costs.
    reset_gap: f64,
    ours_bitmap: f64,
    kvm_ioctls: f64,
    tracker_bitmap: f64,
}

/// Runs the group; adds rows and notes to `out`. Without `/dev/kvm` it adds nothing.
///
/// # Panics
/// If a VM cannot be built or a collect fails or misses pages: then the figures would be meaningless.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    // Each VM's guest memory grows by 4 MB per batch of new pages (random pages of a large slot rarely
    // repeat; the second batch of each of the ring VM's pairs writes the first one's pages), and there
    // are 20 VMs: the configured rounds, pooled over two VMs, keep the group under about 6 GB.
    let rounds = cfg.reps.max(5);
    let layouts: Vec<Layout> = SIZES_GIB
        .iter()
        .map(|&g| Layout { slot: g * PAGES_1G, spread: g * PAGES_1G })
        .chain([Layout { slot: 16 * PAGES_1G, spread: PAGES_1G }])
        .collect();
    let Some(figures) = run_rounds(&layouts, rounds, cfg.warmup) else { return };
    for (gib, f) in SIZES_GIB.into_iter().zip(&figures) {
        out.rows.push(Row::new(&ring_row(gib), f.ring, f.ours_bitmap, UNIT));
        out.rows.push(Row::new(&bitmap_row(gib), f.ours_bitmap, f.kvm_ioctls, UNIT));
        out.rows.push(Row::new(&tracker_row(gib), f.tracker_bitmap, f.kvm_ioctls, UNIT));
        out.rows.push(Row::new(&ring_raw_row(gib), f.ring, f.raw_ring, UNIT));
        out.rows.push(Row::new(&ring_paired_row(gib), f.raw_ring + f.ring_gap, f.raw_ring, UNIT));
        out.rows.push(Row::new(&ring_own_row(gib), f.raw_ring + f.own_gap, f.raw_ring, UNIT));
        out.rows.push(Row::new(&ring_reset_row(gib), f.raw_reset + f.reset_gap, f.raw_reset, UNIT));
    }
    let (small, large, spread) = (figures[FLAT_FROM], figures[FLAT_TO], figures[SPREAD_1G]);
    for (name, pick) in [
        (RING_FLAT_ROW, (large.ring, small.ring)),
        (RING_SPREAD_ROW, (spread.ring, small.ring)),
        (RAW_RING_FLAT_ROW, (large.raw_ring, small.raw_ring)),
        (RAW_RING_SPREAD_ROW, (spread.raw_ring, small.raw_ring)),
        (BITMAP_SPREAD_ROW, (spread.ours_bitmap, small.ours_bitmap)),
    ] {
        out.rows.push(Row::new(name, pick.0, pick.1, UNIT));
    }
    let sizes = &figures[..SIZES_GIB.len()];
    let col = |f: fn(&Figures) -> f64| sizes.iter().map(f).collect::<Vec<f64>>();
    out.charts.push((
        "kvm_harvest_vs_memory.svg",
        Chart {
            caption: format!("Real KVM: collect {DIRTY} guest-dirtied pages vs memslot size"),
            x_desc: "memslot size (GiB)",
            y_desc: "µs per collect (incl. KVM's re-protect)",
            xs: SIZES_GIB.iter().map(|&g| g as f64).collect(),
            series: vec![
                ("tdp-kvm ring (tracker collect)", col(|f| f.ring)),
                ("tdp-kvm bitmap (get_dirty_log + scan)", col(|f| f.ours_bitmap)),
                ("kvm-ioctls get_dirty_log + scan", col(|f| f.kvm_ioctls)),
                ("tdp-kvm bitmap tracker collect", col(|f| f.tracker_bitmap)),
                ("raw ring: harvest + KVM_RESET_DIRTY_RINGS", col(|f| f.raw_ring)),
            ],
        },
    ));
    out.notes.push(format!(
        "kvm harvest: {DIRTY} random guest writes per collect, one vCPU at CPL3; every figure is a median over \
         2 x {rounds} rounds (two VMs per layout and contender; the rings collect {RING_PAIRS} times a round)"
    ));
    out.notes.extend(target_lines(&out.rows));
}

/// Builds the VM sets, runs the rounds, and returns the medians per layout (`None` without `/dev/kvm`).
fn run_rounds(layouts: &[Layout], rounds: usize, warmup: usize) -> Option<Vec<Figures>> {
    // A throwaway set first: the first VMs a process builds ran slower here than later ones.
    drop(VmSet::new(0, layouts[0])?);
    let mut sets = Vec::new();
    for i in (0..layouts.len()).chain((0..layouts.len()).rev()) {
        sets.push(VmSet::new(i, layouts[i])?);
    }
    for round in 0..rounds + warmup {
        for set in &mut sets {
            set.round(round % 2 == 1);
        }
        sets.rotate_left(1);
    }
    // `per_round` samples a round for each collector.
    let pooled = |layout: usize, per_round: usize, samples: &dyn Fn(&VmSet) -> &[f64]| {
        let all: Vec<f64> = sets
            .iter()
            .filter(|s| s.layout == layout)
            .flat_map(|s| samples(s)[warmup * per_round..].iter().copied())
            .collect();
        median(&all)
    };
    let figures = (0..layouts.len())
        .map(|i| Figures {
            ring: pooled(i, RING_PAIRS, &|s| &s.rings.tracker_samples),
            raw_ring: pooled(i, RING_PAIRS, &|s| &s.rings.raw_samples),
            raw_reset: pooled(i, RING_PAIRS, &|s| &s.rings.raw_reset_samples),
            ring_gap: paired_gap(&sets, i, warmup, |all, _| all),
            own_gap: paired_gap(&sets, i, warmup, |all, reset| all - reset),
            reset_gap: paired_gap(&sets, i, warmup, |_, reset| reset),
            ours_bitmap: pooled(i, 1, &|s| &s.bitmap.samples[BitmapCollector::Ours as usize]),
            kvm_ioctls: pooled(i, 1, &|s| &s.bitmap.samples[BitmapCollector::KvmIoctls as usize]),
            tracker_bitmap: pooled(i, 1, &|s| &s.bitmap.samples[BitmapCollector::Tracker as usize]),
        })
        .collect();
    Some(figures)
}

/// The median, over layout `layout`'s paired ring collects after the warm-up, of the tracker's
/// collect's `part` minus the raw collect's; `part` picks a figure from a collect's time and its time in
/// `KVM_RESET_DIRTY_RINGS`.
fn paired_gap(sets: &[VmSet], layout: usize, warmup: usize, part: fn(f64, f64) -> f64) -> f64 {
    let gaps: Vec<f64> = sets
        .iter()
        .filter(|s| s.layout == layout)
        .flat_map(|s| {
            let r = &s.rings;
            let tracker = r.tracker_samples.iter().zip(&r.tracker_reset_samples);
            let raw = r.raw_samples.iter().zip(&r.raw_reset_samples);
            tracker.zip(raw).skip(warmup * RING_PAIRS).map(|((t, tk), (w, wk))| part(*t, *tk) - part(*w, *wk))
        })
        .collect();
    median(&gaps)
}

/// The two real-KVM harvest targets, judged from the rows (printed, never asserted).
fn target_lines(rows: &[Row]) -> Vec<String> {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let mut lines = Vec::new();
    for gib in SIZES_GIB {
        if let Some(r) = find(&bitmap_row(gib)) {
            let verdict = if r.ratio <= BITMAP_TARGET { "MET" } else { "NOT MET" };
            lines.push(format!(
                "target kvm bitmap <= {BITMAP_TARGET}x raw kvm-ioctls at {gib} GiB: {verdict} ({:.2}x)",
                r.ratio
            ));
        }
    }
    for gib in SIZES_GIB {
        let rows = (
            find(&ring_own_row(gib)),
            find(&ring_reset_row(gib)),
            find(&ring_paired_row(gib)),
            find(&ring_raw_row(gib)),
        );
        if let (Some(own), Some(reset), Some(paired), Some(medians)) = rows {
            let verdict = if own.ratio <= TRACKER_TARGET { "MET" } else { "NOT MET" };
            lines.push(format!(
                "target ring tracker <= {TRACKER_TARGET}x the raw ring at {gib} GiB: {verdict} on its own work \
                 ({:.3}x: it adds {:.1} us per collect outside KVM's reset; KVM's reset in its collects, paired: \
                 {:+.1} us, {:.3}x; whole collects paired: {:.3}x, {:+.1} us; ratio of the two medians: {:.3}x)",
                own.ratio,
                own.ours - own.peer,
                reset.ours - reset.peer,
                reset.ratio,
                paired.ratio,
                paired.ours - paired.peer,
                medians.ratio
            ));
        }
    }
    if let (Some(flat), Some(spread), Some(raw), Some(bitmap)) =
        (find(RING_FLAT_ROW), find(RING_SPREAD_ROW), find(RAW_RING_FLAT_ROW), find(BITMAP_SPREAD_ROW))
    {
        lines.push(format!(
            "ring harvest 1 -> 16 GiB: {:.2}x with the writes spread over the slot (it grows {:.0} us; the raw \
             ring {:.2}x, {:.0} us); {:.2}x with the same {DIRTY} writes kept in the first GiB (our bitmap: \
             {:.2}x)",
            flat.ratio,
            flat.ours - flat.peer,
            raw.ratio,
            raw.ours - raw.peer,
            spread.ratio,
            bitmap.ratio
        ));
    }
    lines
}
