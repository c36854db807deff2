//! The VMs of the KVM harvest group: for one layout (slot size and spread of the guest's writes), a ring
//! VM with two vCPUs, one's ring collected by the tracker and the other's raw, and a bitmap VM whose
//! three collectors take turns. Each collect is timed; its page count is checked.
//!
//! The two ring collectors share their VM (its memslot, its page tables, KVM's metadata of the same
//! pages) so that their ratio measures the tracker and not the VM: with one VM each, two VMs built
//! alike differed by more than the tracker costs (their ratio moved between 1.03x and 1.17x from run to
//! run with the same code). Their vCPUs write the same pages in the same order (see [`new_vm`]), and the
//! one that goes first alternates from round to round.

use std::time::Instant;

use kvm_ioctls::VmFd;
use tdp_core::dirty_bitmap::dirty_offsets;
use tdp_guest::{GuestExit, GuestSpec, GuestVcpu, GuestVm, Pattern, Workload};
use tdp_kvm::{DirtyLogBuffer, DirtyRing, DirtyTracker, SlotSpec, TrackingMode};

use super::DIRTY;
use crate::kvm::guest_or_skip;

/// Ring entries per vCPU: room for a round's 1000 entries below the soft limit.
const RING_ENTRIES: u32 = 4096;

/// Where a benchmark VM's guest writes: its slot size and the pages its writes range over.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Pages in the data slot.
    pub slot: u64,
    /// The guest writes pseudo-random pages among the first `spread` of the slot.
    pub spread: u64,
}

/// The bitmap collectors, in the order they take turns on their shared VM.
pub const BITMAP_COLLECTORS: [BitmapCollector; 3] =
    [BitmapCollector::Ours, BitmapCollector::KvmIoctls, BitmapCollector::Tracker];

/// One of the bitmap VM's collectors; its value is its index in [`BITMAP_COLLECTORS`] and in
/// [`BitmapBench::samples`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapCollector {
    /// [`tdp_kvm::get_dirty_log`] into a reused buffer, then a scan of its bits.
    Ours = 0,
    /// `VmFd::get_dirty_log` (a new bitmap each call), then the same scan.
    KvmIoctls = 1,
    /// [`DirtyTracker::collect`] of a get-and-clear tracker (per-slot sets).
    Tracker = 2,
}

const _: () = {
    let mut i = 0;
    while i < BITMAP_COLLECTORS.len() {
        assert!(BITMAP_COLLECTORS[i] as usize == i, "BITMAP_COLLECTORS in index order");
        i += 1;
    }
};

/// The two VMs of one layout.
pub struct VmSet {
    /// The index of the layout in the group's list.
    pub layout: usize,
    /// The rings, one collected by the tracker and one raw, taking turns.
    pub rings: RingBench,
    /// The bitmap, three collectors taking turns.
    pub bitmap: BitmapBench,
}

impl VmSet {
    /// Builds the two VMs; `None` without `/dev/kvm`.
    ///
    /// # Panics
    /// If a VM cannot be built or set up.
    #[must_use]
    pub fn new(index: usize, layout: Layout) -> Option<VmSet> {
        Some(VmSet { layout: index, rings: RingBench::new(layout)?, bitmap: BitmapBench::new(layout)? })
    }

    /// One round of each VM: a batch of guest writes, then a timed collect. `reversed` runs the VMs in the
    /// opposite order, so that no VM always follows the same one.
    pub fn round(&mut self, reversed: bool) {
        if reversed {
            self.bitmap.round();
            self.rings.round(reversed);
        } else {
            self.rings.round(reversed);
            self.bitmap.round();
        }
    }
}

/// One ring VM with two vCPUs: vCPU 0's ring collected by the tracker, vCPU 1's raw; their timings (µs
/// per collect).
pub struct RingBench {
    vm: GuestVm,
    vcpus: Vec<GuestVcpu>,
    tracker: Box<DirtyTracker>,
    raw: DirtyRing,
    iteration: u64,
    /// Microseconds per [`DirtyTracker::collect`] (vCPU 0's ring), in the order measured (the caller
    /// skips its warm-up rounds).
    pub tracker_samples: Vec<f64>,
    /// Microseconds per raw collect ([`DirtyRing::harvest`] of vCPU 1's ring into a list, then
    /// [`tdp_kvm::reset_dirty_rings`]).
    pub raw_samples: Vec<f64>,
    /// Of each of `tracker_samples`, the microseconds spent in `KVM_RESET_DIRTY_RINGS`
    /// ([`TrackerStats::reset_time`](tdp_kvm::TrackerStats::reset_time)).
    pub tracker_reset_samples: Vec<f64>,
    /// Of each of `raw_samples`, the microseconds spent in `KVM_RESET_DIRTY_RINGS`.
    pub raw_reset_samples: Vec<f64>,
}

/// Collects of each ring per round. The two collectors' kernel parts vary by tens of µs from collect to
/// collect, more than the tracker costs, so the rings get more samples than the bitmap's collectors. (The
/// ring VM's memory grows as when its two vCPUs wrote pages of their own, one pair a round: the second
/// batch of a pair writes the first one's pages.)
pub const RING_PAIRS: usize = 2;

/// The vCPU whose ring the tracker collects; the other one's is collected raw.
const TRACKER_VCPU: usize = 0;
/// See [`TRACKER_VCPU`].
const RAW_VCPU: usize = 1;

impl RingBench {
    fn new(layout: Layout) -> Option<RingBench> {
        let mut vm = new_vm(layout, 2)?;
        let (_, cfg) = tdp_kvm::enable_dirty_ring(vm.vm_fd(), RING_ENTRIES).expect("enable the dirty ring");
        vm.set_dirty_logging(true).expect("log the data slot");
        let vcpus = vm.create_vcpus().expect("create the vCPUs");
        let tracker = DirtyTracker::new(vm.vm_fd(), TrackingMode::Ring(cfg)).expect("ring tracker");
        tracker.register_slot(data_slot(&vm)).expect("register the data slot");
        tracker.attach_vcpu(vcpus[TRACKER_VCPU].fd()).expect("map the tracker vCPU's ring");
        let raw = DirtyRing::map(vcpus[RAW_VCPU].fd(), cfg).expect("map the raw vCPU's ring");
        let mut bench = RingBench {
            vm,
            vcpus,
            tracker: Box::new(tracker),
            raw,
            iteration: 1,
            tracker_samples: Vec::new(),
            raw_samples: Vec::new(),
            tracker_reset_samples: Vec::new(),
            raw_reset_samples: Vec::new(),
        };
        // The first batches fault in the guest's page tables and code; collect them away untimed.
        for vcpu in [TRACKER_VCPU, RAW_VCPU] {
            bench.iteration = one_batch(&bench.vm, &mut bench.vcpus[vcpu], bench.iteration);
            bench.collect(vcpu);
        }
        Some(bench)
    }

    /// Collects vCPU `vcpu`'s ring; returns the time the collector took and, of that, the time in
    /// `KVM_RESET_DIRTY_RINGS` (µs), and the offsets it found (in ring order, repeats kept, for the raw
    /// ring). Each collector is timed until it holds its result: the tracker's sets, the raw ring's list.
    /// Reading the sets into a list for the check, and dropping either result, are not timed.
    fn collect(&mut self, vcpu: usize) -> (f64, f64, Vec<u64>) {
        if vcpu == TRACKER_VCPU {
            let before = self.tracker.stats().expect("tracker stats").reset_time;
            let start = Instant::now();
            let sets = self.tracker.collect().expect("ring collect");
            let micros = start.elapsed().as_secs_f64() * 1e6;
            let reset = self.tracker.stats().expect("tracker stats").reset_time.saturating_sub(before);
            let offsets = std::hint::black_box(sets).iter().flat_map(|s| s.offsets()).collect();
            (micros, reset.as_secs_f64() * 1e6, offsets)
        } else {
            let start = Instant::now();
            let mut offsets = Vec::with_capacity(DIRTY as usize);
            self.raw.harvest(usize::MAX, |e| offsets.push(e.offset));
            let reset_start = Instant::now();
            let reset = tdp_kvm::reset_dirty_rings(self.vm.vm_fd()).expect("KVM_RESET_DIRTY_RINGS");
            let end = Instant::now();
            assert_eq!(u64::from(reset), offsets.len() as u64, "KVM reset every harvested entry");
            let micros = |d: std::time::Duration| d.as_secs_f64() * 1e6;
            (micros(end - start), micros(end - reset_start), std::hint::black_box(offsets))
        }
    }

    /// [`RING_PAIRS`] times, for each collector (the raw one first if `reversed`, then the other way
    /// round): one untimed batch of its vCPU's guest writes, then one timed collect.
    fn round(&mut self, reversed: bool) {
        let forward = [TRACKER_VCPU, RAW_VCPU];
        let backward = [RAW_VCPU, TRACKER_VCPU];
        let orders = if reversed { [backward, forward] } else { [forward, backward] };
        for vcpu in orders.into_iter().take(RING_PAIRS).flatten() {
            self.iteration = one_batch(&self.vm, &mut self.vcpus[vcpu], self.iteration);
            let (micros, reset, mut offsets) = self.collect(vcpu);
            let (all, kernel) = if vcpu == TRACKER_VCPU {
                (&mut self.tracker_samples, &mut self.tracker_reset_samples)
            } else {
                (&mut self.raw_samples, &mut self.raw_reset_samples)
            };
            all.push(micros);
            kernel.push(reset);
            offsets.sort_unstable();
            offsets.dedup();
            check_count(
                offsets.len() as u64,
                if vcpu == TRACKER_VCPU { "ring (tracker)" } else { "ring (raw)" },
            );
        }
    }
}

/// One bitmap VM with one vCPU; its three collectors take turns, each collecting its own batch.
pub struct BitmapBench {
    vm: GuestVm,
    vcpus: Vec<GuestVcpu>,
    tracker: DirtyTracker,
    buf: DirtyLogBuffer,
    iteration: u64,
    /// Microseconds per collect of each of [`BITMAP_COLLECTORS`], in the order measured.
    pub samples: [Vec<f64>; 3],
}

impl BitmapBench {
    fn new(layout: Layout) -> Option<BitmapBench> {
        let mut vm = new_vm(layout, 1)?;
        vm.set_dirty_logging(true).expect("log the data slot");
        let tracker = DirtyTracker::with_bitmap(vm.vm_fd()).expect("bitmap tracker");
        tracker.register_slot(data_slot(&vm)).expect("register the data slot");
        let mut vcpus = vm.create_vcpus().expect("create the vCPU");
        let buf = DirtyLogBuffer::new(layout.slot).expect("dirty-log buffer");
        let iteration = one_batch(&vm, &mut vcpus[0], 1);
        let _ = tracker.collect().expect("first collect");
        Some(BitmapBench { vm, vcpus, tracker, buf, iteration, samples: Default::default() })
    }

    /// One untimed batch and one timed collect per collector, in turn.
    fn round(&mut self) {
        let slot = self.vm.data_slot();
        let bytes = usize::try_from(self.vm.data_pages() * 4096).expect("slot size fits usize");
        for (collector, samples) in BITMAP_COLLECTORS.into_iter().zip(&mut self.samples) {
            self.iteration = one_batch(&self.vm, &mut self.vcpus[0], self.iteration);
            let start = Instant::now();
            let found = match collector {
                BitmapCollector::Ours => ours_bitmap(self.vm.vm_fd(), slot, &mut self.buf),
                BitmapCollector::KvmIoctls => raw_bitmap(self.vm.vm_fd(), slot, bytes),
                BitmapCollector::Tracker => {
                    let sets = self.tracker.collect().expect("tracker collect");
                    sets.iter().flat_map(|s| s.offsets()).collect()
                }
            };
            samples.push(start.elapsed().as_secs_f64() * 1e6);
            check_count(std::hint::black_box(found).len() as u64, &format!("{collector:?}"));
        }
    }
}

/// A VM with `vcpus` vCPUs, each writing [`DIRTY`] random pages of the layout's spread per batch, all
/// from the same seed: a vCPU's `k`-th batch writes the same pages, in the same order, as every other
/// vCPU's `k`-th batch. The ring VM's two vCPUs run one batch each per round, so KVM re-protects the same
/// pages, in the same order, for the tracker's collect as for the raw one (with a seed each, the two
/// collectors' kernel parts differed by up to 8% over a run, more than the tracker costs).
fn new_vm(layout: Layout, vcpus: usize) -> Option<GuestVm> {
    let vm = guest_or_skip(GuestSpec::new(layout.slot, vcpus))
        .expect("a guest VM for the KVM harvest benchmark")?;
    let workload = Workload::new(0, layout.spread, DIRTY, Pattern::Random)
        .with_tag(false)
        .with_seed(0x9e37_79b9_7f4a_7c15);
    for vcpu in 0..vcpus {
        vm.set_workload(vcpu, &workload).expect("workload fits the slot");
    }
    Some(vm)
}

/// Runs the vCPU until it finishes one batch (1000 writes) of iteration `it`; returns the next iteration.
fn one_batch(vm: &GuestVm, vcpu: &mut GuestVcpu, it: u64) -> u64 {
    vm.set_iteration(it);
    loop {
        match vcpu.run().expect("KVM_RUN of the benchmark guest") {
            GuestExit::BatchDone { .. } => return it + 1,
            GuestExit::Interrupted => {}
            GuestExit::DirtyRingFull => panic!("a 4096-entry ring filled with 1000 writes per round"),
        }
    }
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

/// A collect must find the round's pages: at least 99% of the 1000 random writes land on distinct pages.
fn check_count(found: u64, who: &str) {
    assert!(
        (DIRTY * 99 / 100..=DIRTY).contains(&found),
        "{who} collected {found} pages after {DIRTY} random writes (expected 990..=1000)"
    );
}
