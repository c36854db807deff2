//! Harvest cost on real KVM at 1000 dirty pages for 1, 4, 16 and 64 GiB memslots: `tdp-kvm`'s ring
//! against its bitmap, and its bitmap path against raw `kvm-ioctls`.
//!
//! Each round the guest (one vCPU, CPL3) writes 1000 pseudo-random pages of the data slot in one batch
//! (untimed), then one collector gathers them (timed) into a list of dirty page offsets:
//! - **ring**: [`DirtyTracker::collect`] of a ring tracker (harvest of the vCPU's mmap'd ring, then
//!   `KVM_RESET_DIRTY_RINGS`, which re-protects the pages);
//! - **ours, bitmap**: [`tdp_kvm::get_dirty_log`] into a reused buffer (`KVM_GET_DIRTY_LOG`, which
//!   re-protects) and a scan of its bits;
//! - **kvm-ioctls, bitmap**: `VmFd::get_dirty_log` (which allocates its bitmap each call) and the same scan;
//! - **tracker, bitmap**: [`DirtyTracker::collect`] of a get-and-clear tracker, for the record;
//! - **raw ring**: [`tdp_kvm::DirtyRing`] harvest into a list plus [`tdp_kvm::reset_dirty_rings`], no
//!   tracker: the floor of the ring path (what KVM's reset costs), to show what the tracker adds.
//!
//! Whether the ring's cost follows the slot's size or the dirty pages' spread is told apart by one more
//! layout: a 16 GiB slot whose guest writes stay in its first GiB (the same spread as the 1 GiB slot).
//! A [`TouchFloor`] per layout touches two words of per-page metadata at the same kind of pages in user
//! space: what the memory hierarchy charges for the spread, kernel or not.
//!
//! The bitmap contenders share one VM and take turns round by round (A B C A B C), so each collects a
//! fresh set of 1000 pages; the ring contenders have a VM each and take turns with the floors. The count
//! each collects is checked (at least 99% of the 1000 writes land on distinct pages), so a figure cannot
//! come from a collect that missed the pages.

use std::time::Instant;

use kvm_ioctls::VmFd;
use tdp_core::dirty_bitmap::dirty_offsets;
use tdp_guest::{GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload};
use tdp_kvm::{DirtyLogBuffer, DirtyRing, DirtyTracker, SlotSpec, TrackingMode};

use super::guest_or_skip;
use super::touch_floor::TouchFloor;
use crate::plot::Chart;
use crate::report::Row;
use crate::suite::{Config, Outcome, PAGES_1G};
use crate::timing::median;

/// Pages the guest dirties per round.
pub const DIRTY: u64 = 1000;
/// Slot sizes measured, in GiB: the 1, 4 and 16, and 64 to show where the ring's cost levels off.
pub const SIZES_GIB: [u64; 4] = [1, 4, 16, 64];
/// The sizes the flatness target compares, in GiB.
const FLAT_FROM_GIB: u64 = 1;
const FLAT_TO_GIB: u64 = 16;
/// Every contender runs this many times the configured rounds.
const ROUNDS_FACTOR: usize = 4;
/// Ring entries per vCPU: room for a round's 1000 entries below the soft limit.
const RING_ENTRIES: u32 = 4096;
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

/// Row name: the ring at the largest size against the ring at 1 GiB (flat: about 1x).
pub const RING_FLAT_ROW: &str = "kvm_harvest_ring/16g_vs_1g";

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

/// Row name: the ring tracker with a 16 GiB slot whose dirty pages all lie in its first GiB, against the
/// ring with a 1 GiB slot: slot size alone, the dirty pages' spread held equal.
pub const RING_SPREAD_ROW: &str = "kvm_harvest_ring/16g_spread_1g_vs_1g";
/// Row name: as [`RING_FLAT_ROW`], for the raw ring (harvest + `KVM_RESET_DIRTY_RINGS`, no tracker).
pub const RAW_RING_FLAT_ROW: &str = "kvm_harvest_ring_raw/16g_vs_1g";
/// Row name: as [`RING_SPREAD_ROW`], for the raw ring.
pub const RAW_RING_SPREAD_ROW: &str = "kvm_harvest_ring_raw/16g_spread_1g_vs_1g";
/// Row name: as [`RING_SPREAD_ROW`], for our bitmap path: its cost follows the slot, not the spread.
pub const BITMAP_SPREAD_ROW: &str = "kvm_harvest_bitmap/16g_spread_1g_vs_1g";
/// Row name: the [`TouchFloor`] (per-page metadata touched at the dirty pages, in user space) at 16 GiB
/// against 1 GiB.
pub const FLOOR_FLAT_ROW: &str = "kvm_harvest_touch_floor/16g_vs_1g";
/// Row name: how much the raw ring grows from 1 to 16 GiB (µs) against how much the floor grows.
pub const GROWTH_ROW: &str = "kvm_harvest_ring_raw/growth_1g_to_16g_vs_touch_floor_growth";

/// Row name: the raw ring (harvest + `KVM_RESET_DIRTY_RINGS`) against the [`TouchFloor`] at `gib`.
#[must_use]
pub fn floor_row(gib: u64) -> String {
    format!("kvm_harvest_{DIRTY}_dirty/{gib}g/ring_raw_vs_touch_floor")
}

/// Medians per size (microseconds).
#[derive(Clone, Debug, Default)]
pub struct KvmHarvest {
    /// `(GiB, [ring, ours_bitmap, kvm_ioctls_bitmap, tracker_bitmap, raw_ring])`.
    pub sizes: Vec<(u64, [f64; 5])>,
}

/// Where a benchmark VM's guest writes: its slot size and the pages its writes range over.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Pages in the data slot.
    slot: u64,
    /// The guest writes pseudo-random pages among the first `spread` of the slot.
    spread: u64,
}

impl Layout {
    fn whole(gib: u64) -> Layout {
        Layout { slot: gib * PAGES_1G, spread: gib * PAGES_1G }
    }
}

/// Runs the group; adds rows and notes to `out`. Without `/dev/kvm` it adds nothing.
///
/// The ring contenders (tracker and raw ring at every size, and at 16 GiB with the writes confined to the
/// first GiB) each have their own VMs and take turns round by round, so a drift of the machine during the
/// run shows in all of them alike rather than in one size.
///
/// # Panics
/// If a VM cannot be built or a collect fails or misses pages: then the figures would be meaningless.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    // A round costs a few milliseconds, and this host's KVM timings wander: more rounds than the other groups.
    let rounds = cfg.reps.max(5) * ROUNDS_FACTOR;
    let total = rounds + cfg.warmup;
    let spread_1g = Layout { slot: 16 * PAGES_1G, spread: PAGES_1G };
    let layouts: Vec<Layout> = SIZES_GIB.iter().map(|&g| Layout::whole(g)).chain([spread_1g]).collect();
    // Each layout gets a VM pair (tracker, raw ring) built early and one built late: on this host a VM's
    // timings depend a little on when it was made (up to about 15%), and this cancels that out of the
    // comparisons between layouts.
    let mut pairs: Vec<(usize, [RingBench; 2])> = Vec::new();
    for i in (0..layouts.len()).chain((0..layouts.len()).rev()) {
        let (Some(tracker), Some(raw)) =
            (RingBench::new(layouts[i], false), RingBench::new(layouts[i], true))
        else {
            return;
        };
        pairs.push((i, [tracker, raw]));
    }
    let mut floors: Vec<TouchFloor> =
        layouts.iter().map(|l| TouchFloor::new(l.slot, l.spread, DIRTY)).collect();
    // Each round starts one pair further on, so no pair always runs first or after the same one.
    for _ in 0..total {
        for (i, pair) in &mut pairs {
            pair.iter_mut().for_each(RingBench::round);
            floors[*i].round();
        }
        pairs.rotate_left(1);
    }
    let skip = cfg.warmup;
    let m = |v: &[f64]| median(&v[skip..]);
    let ring_median = |layout: usize, raw: usize| {
        let pooled: Vec<f64> = pairs
            .iter()
            .filter(|(i, _)| *i == layout)
            .flat_map(|(_, pair)| pair[raw].samples[skip..].iter().copied())
            .collect();
        median(&pooled)
    };
    let floor_median = |layout: usize| m(&floors[layout].samples);
    let mut result = KvmHarvest::default();
    for (i, gib) in SIZES_GIB.into_iter().enumerate() {
        let Some([ours, raw, tracker]) = bitmap_rounds(Layout::whole(gib), total) else { return };
        let figures = [ring_median(i, 0), m(&ours), m(&raw), m(&tracker), ring_median(i, 1)];
        out.rows.push(Row::new(&ring_row(gib), figures[0], figures[1], UNIT));
        out.rows.push(Row::new(&bitmap_row(gib), figures[1], figures[2], UNIT));
        out.rows.push(Row::new(&tracker_row(gib), figures[3], figures[2], UNIT));
        out.rows.push(Row::new(&ring_raw_row(gib), figures[0], figures[4], UNIT));
        out.rows.push(Row::new(&floor_row(gib), figures[4], floor_median(i), UNIT));
        result.sizes.push((gib, figures));
    }
    let Some([spread_bitmap, _, _]) = bitmap_rounds(spread_1g, total) else { return };
    let index = |gib: u64| SIZES_GIB.iter().position(|&g| g == gib).unwrap_or(0);
    let (first, last, spread) = (index(FLAT_FROM_GIB), index(FLAT_TO_GIB), SIZES_GIB.len());
    out.rows.push(Row::new(RING_FLAT_ROW, ring_median(last, 0), ring_median(first, 0), UNIT));
    out.rows.push(Row::new(RING_SPREAD_ROW, ring_median(spread, 0), ring_median(first, 0), UNIT));
    out.rows.push(Row::new(RAW_RING_FLAT_ROW, ring_median(last, 1), ring_median(first, 1), UNIT));
    out.rows.push(Row::new(RAW_RING_SPREAD_ROW, ring_median(spread, 1), ring_median(first, 1), UNIT));
    out.rows.push(Row::new(BITMAP_SPREAD_ROW, m(&spread_bitmap), result.sizes[first].1[1], UNIT));
    out.rows.push(Row::new(FLOOR_FLAT_ROW, floor_median(last), floor_median(first), UNIT));
    out.rows.push(Row::new(
        GROWTH_ROW,
        ring_median(last, 1) - ring_median(first, 1),
        floor_median(last) - floor_median(first),
        UNIT,
    ));
    let col = |i: usize| result.sizes.iter().map(|(_, f)| f[i]).collect::<Vec<f64>>();
    let floor_col = (0..SIZES_GIB.len()).map(floor_median).collect();
    out.charts.push((
        "kvm_harvest_vs_memory.svg",
        Chart {
            caption: format!("Real KVM: collect {DIRTY} guest-dirtied pages vs memslot size"),
            x_desc: "memslot size (GiB)",
            y_desc: "µs per collect (incl. KVM's re-protect)",
            xs: result.sizes.iter().map(|(g, _)| *g as f64).collect(),
            series: vec![
                ("tdp-kvm ring (tracker collect)", col(0)),
                ("tdp-kvm bitmap (get_dirty_log + scan)", col(1)),
                ("kvm-ioctls get_dirty_log + scan", col(2)),
                ("tdp-kvm bitmap tracker collect", col(3)),
                ("raw ring: harvest + KVM_RESET_DIRTY_RINGS", col(4)),
                ("floor: 2 words of metadata per dirty page, user space", floor_col),
            ],
        },
    ));
    out.notes.push(format!(
        "kvm harvest: {DIRTY} random guest writes per round, one vCPU at CPL3, medians of {rounds} rounds per \
         contender and size (ring {RING_ENTRIES} entries; the ring VMs and the touch floors take turns round by \
         round)"
    ));
    out.notes.extend(target_lines(&out.rows));
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
    if let (Some(flat), Some(spread), Some(raw), Some(bitmap), Some(growth)) = (
        find(RING_FLAT_ROW),
        find(RING_SPREAD_ROW),
        find(RAW_RING_FLAT_ROW),
        find(BITMAP_SPREAD_ROW),
        find(GROWTH_ROW),
    ) {
        lines.push(format!(
            "ring harvest 1 -> 16 GiB: {:.2}x with the writes spread over the slot (raw ring: {:.2}x, growing \
             {:.0} us against the touch floor's {:.0} us); {:.2}x with the same {DIRTY} writes kept in the first \
             GiB (our bitmap: {:.2}x)",
            flat.ratio, raw.ratio, growth.ours, growth.peer, spread.ratio, bitmap.ratio
        ));
    }
    lines
}

/// The bitmap target: our path at most this factor of raw kvm-ioctls.
const BITMAP_TARGET: f64 = 1.05;

fn new_vm(pages: u64) -> Option<GuestVm> {
    let spec = GuestSpec::new(pages, 1);
    guest_or_skip(spec).expect("a guest VM for the KVM harvest benchmark")
}

fn workload(layout: Layout) -> Workload {
    Workload::new(0, layout.spread, DIRTY, Pattern::Random).with_tag(false)
}

/// Runs the vCPU until it finishes one batch (1000 writes) of iteration `it`.
fn one_batch(vm: &GuestVm, vcpu: &mut GuestVcpu, it: u64) {
    vm.set_iteration(it);
    loop {
        match vcpu.run().expect("KVM_RUN of the benchmark guest") {
            GuestExit::BatchDone { .. } => return,
            GuestExit::Interrupted => {}
            GuestExit::DirtyRingFull => panic!("a 4096-entry ring filled with 1000 writes per round"),
        }
    }
}

/// How a ring VM's dirty pages are collected.
enum RingCollector {
    /// [`DirtyTracker::collect`] of a ring tracker.
    Tracker(Box<DirtyTracker>),
    /// [`DirtyRing::harvest`] into a list, then [`tdp_kvm::reset_dirty_rings`]: no tracker.
    Raw(DirtyRing),
}

/// One ring VM with one vCPU, its collector, and its timings.
struct RingBench {
    vm: GuestVm,
    vcpus: Vec<GuestVcpu>,
    collector: RingCollector,
    iteration: u64,
    samples: Vec<f64>,
}

impl RingBench {
    fn new(layout: Layout, raw: bool) -> Option<RingBench> {
        let mut vm = new_vm(layout.slot)?;
        let (_, cfg) = tdp_kvm::enable_dirty_ring(vm.vm_fd(), RING_ENTRIES).expect("enable the dirty ring");
        vm.set_workload(0, &workload(layout)).expect("workload fits the slot");
        vm.set_dirty_logging(true).expect("log the data slot");
        let vcpus = vm.create_vcpus().expect("create the vCPU");
        let collector = if raw {
            RingCollector::Raw(DirtyRing::map(vcpus[0].fd(), cfg).expect("map the vCPU's ring"))
        } else {
            let tracker = DirtyTracker::new(vm.vm_fd(), TrackingMode::Ring(cfg)).expect("ring tracker");
            tracker.register_slot(data_slot(&vm)).expect("register the data slot");
            tracker.attach_vcpu(vcpus[0].fd()).expect("map the vCPU's ring");
            RingCollector::Tracker(Box::new(tracker))
        };
        let mut bench = RingBench { vm, vcpus, collector, iteration: 1, samples: Vec::new() };
        // The first batch faults in the guest's page tables and code; collect it away untimed.
        bench.batch();
        bench.collect();
        Some(bench)
    }

    fn batch(&mut self) {
        one_batch(&self.vm, &mut self.vcpus[0], self.iteration);
        self.iteration += 1;
    }

    /// Collects into a list of offsets (in ring order, repeats kept, for the raw ring).
    fn collect(&mut self) -> Vec<u64> {
        match &mut self.collector {
            RingCollector::Tracker(tracker) => {
                let sets = std::hint::black_box(tracker.collect().expect("ring collect"));
                sets.iter().flat_map(|s| s.offsets()).collect()
            }
            RingCollector::Raw(ring) => {
                let mut offsets = Vec::with_capacity(DIRTY as usize);
                ring.harvest(usize::MAX, |e| offsets.push(e.offset));
                let reset = tdp_kvm::reset_dirty_rings(self.vm.vm_fd()).expect("KVM_RESET_DIRTY_RINGS");
                assert_eq!(u64::from(reset), offsets.len() as u64, "KVM reset every harvested entry");
                offsets
            }
        }
    }

    /// One untimed batch of guest writes, then one timed collect.
    fn round(&mut self) {
        self.batch();
        let start = Instant::now();
        let mut offsets = self.collect();
        self.samples.push(start.elapsed().as_secs_f64() * 1e6);
        offsets.sort_unstable();
        offsets.dedup();
        check_count(offsets.len() as u64, "ring");
    }
}

fn bitmap_rounds(layout: Layout, rounds: usize) -> Option<[Vec<f64>; 3]> {
    let pages = layout.slot;
    let mut vm = new_vm(pages)?;
    vm.set_workload(0, &workload(layout)).expect("workload fits the slot");
    vm.set_dirty_logging(true).expect("log the data slot");
    let tracker = DirtyTracker::with_bitmap(vm.vm_fd()).expect("bitmap tracker");
    tracker.register_slot(data_slot(&vm)).expect("register the data slot");
    let mut vcpus = vm.create_vcpus().expect("create the vCPU");
    let vcpu = &mut vcpus[0];
    let slot = vm.data_slot();
    let bytes = usize::try_from(pages * 4096).expect("slot size fits usize");
    let mut buf = DirtyLogBuffer::new(pages).expect("dirty-log buffer");
    one_batch(&vm, vcpu, 1);
    let _ = tracker.collect().expect("first collect");
    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut it = 2;
    for _ in 0..rounds {
        for (i, contender) in samples.iter_mut().enumerate() {
            one_batch(&vm, vcpu, it);
            it += 1;
            let start = Instant::now();
            let found = match i {
                0 => ours_bitmap(vm.vm_fd(), slot, &mut buf),
                1 => raw_bitmap(vm.vm_fd(), slot, bytes),
                _ => {
                    let sets = tracker.collect().expect("tracker collect");
                    sets.iter().flat_map(|s| s.offsets()).collect()
                }
            };
            contender.push(start.elapsed().as_secs_f64() * 1e6);
            check_count(std::hint::black_box(found).len() as u64, ["ours", "kvm-ioctls", "tracker"][i]);
        }
    }
    Some(samples)
}

fn ours_bitmap(vm: &VmFd, slot: u32, buf: &mut DirtyLogBuffer) -> Vec<u64> {
    tdp_kvm::get_dirty_log(vm, slot, buf).expect("KVM_GET_DIRTY_LOG (tdp-kvm)");
    buf.iter_dirty().collect()
}

fn raw_bitmap(vm: &VmFd, slot: u32, bytes: usize) -> Vec<u64> {
    let words = vm.get_dirty_log(slot, bytes).expect("KVM_GET_DIRTY_LOG (kvm-ioctls)");
    dirty_offsets(&words).collect()
}

fn data_slot(vm: &GuestVm) -> SlotSpec {
    let slot = u16::try_from(vm.data_slot()).expect("data slot id fits 16 bits");
    SlotSpec::new(slot, vm.data_gpa(), vm.data_pages())
}

fn check_count(found: u64, who: &str) {
    assert!(
        (DIRTY * 99 / 100..=DIRTY).contains(&found),
        "{who} collected {found} pages after {DIRTY} random writes (expected 990..=1000)"
    );
}
