//! Harvest cost on real KVM at 1000 dirty pages for 1, 4 and 16 GiB memslots: `tdp-kvm`'s ring against
//! its bitmap, and its bitmap path against raw `kvm-ioctls`.
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
//! The bitmap contenders share one VM and take turns round by round (A B A B), so each collects a fresh
//! set of 1000 pages. The count each collects is checked (at least 99% of the 1000 writes land on distinct
//! pages), so a figure cannot come from a collect that missed the pages.

use std::time::Instant;

use kvm_ioctls::VmFd;
use tdp_core::dirty_bitmap::dirty_offsets;
use tdp_guest::{GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload};
use tdp_kvm::{DirtyLogBuffer, DirtyRing, DirtyTracker, SlotSpec};

use super::guest_or_skip;
use crate::plot::Chart;
use crate::report::Row;
use crate::suite::{Config, Outcome, PAGES_1G};
use crate::timing::median;

/// Pages the guest dirties per round.
pub const DIRTY: u64 = 1000;
/// Slot sizes measured, in GiB.
pub const SIZES_GIB: [u64; 3] = [1, 4, 16];
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

/// Medians per size (microseconds).
#[derive(Clone, Debug, Default)]
pub struct KvmHarvest {
    /// `(GiB, [ring, ours_bitmap, kvm_ioctls_bitmap, tracker_bitmap, raw_ring])`.
    pub sizes: Vec<(u64, [f64; 5])>,
}

/// Runs the group; adds rows and notes to `out`. Without `/dev/kvm` it adds nothing.
///
/// # Panics
/// If a VM cannot be built or a collect fails or misses pages: then the figures would be meaningless.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let rounds = cfg.reps.max(5);
    let mut result = KvmHarvest::default();
    for gib in SIZES_GIB {
        let pages = gib * PAGES_1G;
        let Some(ring) = ring_rounds(pages, rounds + cfg.warmup) else { return };
        let Some(raw_ring) = raw_ring_rounds(pages, rounds + cfg.warmup) else { return };
        let Some([ours, raw, tracker]) = bitmap_rounds(pages, rounds + cfg.warmup) else { return };
        let skip = cfg.warmup;
        let m = |v: &[f64]| median(&v[skip..]);
        let figures = [m(&ring), m(&ours), m(&raw), m(&tracker), m(&raw_ring)];
        out.rows.push(Row::new(&ring_row(gib), figures[0], figures[1], UNIT));
        out.rows.push(Row::new(&bitmap_row(gib), figures[1], figures[2], UNIT));
        out.rows.push(Row::new(&tracker_row(gib), figures[3], figures[2], UNIT));
        out.rows.push(Row::new(&ring_raw_row(gib), figures[0], figures[4], UNIT));
        result.sizes.push((gib, figures));
    }
    if let (Some(first), Some(last)) = (result.sizes.first(), result.sizes.last()) {
        out.rows.push(Row::new(RING_FLAT_ROW, last.1[0], first.1[0], UNIT));
    }
    let col = |i: usize| result.sizes.iter().map(|(_, f)| f[i]).collect::<Vec<f64>>();
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
            ],
        },
    ));
    out.notes.push(format!(
        "kvm harvest: {DIRTY} random guest writes per round, {rounds} rounds per contender and size (median), \
         one vCPU at CPL3; ring {RING_ENTRIES} entries"
    ));
}

fn new_vm(pages: u64) -> Option<GuestVm> {
    let spec = GuestSpec::new(pages, 1);
    guest_or_skip(spec).expect("a guest VM for the KVM harvest benchmark")
}

fn workload(pages: u64) -> Workload {
    Workload::new(0, pages, DIRTY, Pattern::Random).with_tag(false)
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

fn ring_rounds(pages: u64, rounds: usize) -> Option<Vec<f64>> {
    let mut vm = new_vm(pages)?;
    let tracker = DirtyTracker::with_ring(vm.vm_fd(), RING_ENTRIES).expect("enable the dirty ring");
    vm.set_workload(0, &workload(pages)).expect("workload fits the slot");
    vm.set_dirty_logging(true).expect("log the data slot");
    tracker.register_slot(data_slot(&vm)).expect("register the data slot");
    let mut vcpus = vm.create_vcpus().expect("create the vCPU");
    let vcpu = &mut vcpus[0];
    tracker.attach_vcpu(vcpu.fd()).expect("map the vCPU's ring");
    // The first batch faults in the guest's page tables and code; collect it away untimed.
    one_batch(&vm, vcpu, 1);
    let _ = tracker.collect().expect("first collect");
    let mut samples = Vec::with_capacity(rounds);
    for it in 2..rounds as u64 + 2 {
        one_batch(&vm, vcpu, it);
        let start = Instant::now();
        let sets = std::hint::black_box(tracker.collect().expect("ring collect"));
        let offsets: Vec<u64> = sets.iter().flat_map(|s| s.offsets()).collect();
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        check_count(offsets.len() as u64, "ring");
    }
    Some(samples)
}

fn raw_ring_rounds(pages: u64, rounds: usize) -> Option<Vec<f64>> {
    let mut vm = new_vm(pages)?;
    let (_, cfg) = tdp_kvm::enable_dirty_ring(vm.vm_fd(), RING_ENTRIES).expect("enable the dirty ring");
    vm.set_workload(0, &workload(pages)).expect("workload fits the slot");
    vm.set_dirty_logging(true).expect("log the data slot");
    let mut vcpus = vm.create_vcpus().expect("create the vCPU");
    let vcpu = &mut vcpus[0];
    let mut ring = DirtyRing::map(vcpu.fd(), cfg).expect("map the vCPU's ring");
    let mut offsets = Vec::with_capacity(DIRTY as usize);
    let harvest = |ring: &mut DirtyRing, offsets: &mut Vec<u64>| {
        offsets.clear();
        ring.harvest(usize::MAX, |e| offsets.push(e.offset));
        tdp_kvm::reset_dirty_rings(vm.vm_fd()).expect("KVM_RESET_DIRTY_RINGS")
    };
    one_batch(&vm, vcpu, 1);
    harvest(&mut ring, &mut offsets);
    let mut samples = Vec::with_capacity(rounds);
    for it in 2..rounds as u64 + 2 {
        one_batch(&vm, vcpu, it);
        let start = Instant::now();
        let reset = harvest(&mut ring, &mut offsets);
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(u64::from(reset), offsets.len() as u64, "KVM reset every harvested entry");
        offsets.sort_unstable();
        offsets.dedup();
        check_count(offsets.len() as u64, "raw ring");
    }
    Some(samples)
}

fn bitmap_rounds(pages: u64, rounds: usize) -> Option<[Vec<f64>; 3]> {
    let mut vm = new_vm(pages)?;
    vm.set_workload(0, &workload(pages)).expect("workload fits the slot");
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
