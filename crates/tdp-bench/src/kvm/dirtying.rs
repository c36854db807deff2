//! Guest dirtying throughput on real KVM: how fast two CPL3 vCPUs write pseudo-random pages of a 1 GiB
//! slot with no dirty logging, with the bitmap (collected every 20 ms) and with the dirty ring (collected
//! every 20 ms and harvested at ring-full exits), as nanoseconds per guest write.
//!
//! With logging on, a guest's first write to a clean page after each collect takes a write-protection
//! exit into KVM; the ring adds its ring-full exits. The rows say what that costs the guest against running
//! unlogged, the overhead a VMM pays during live migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tdp_guest::{GuestExit, GuestSpec, GuestVcpu, Pattern, Workload, classify_exit};
use tdp_kvm::{DirtyTracker, SlotSpec, VcpuRunner};

use super::guest_or_skip;
use crate::config::{Config, PAGES_1G};
use crate::outcome::Outcome;
use crate::report::Row;

/// vCPUs writing.
const VCPUS: usize = 2;
/// Writes per guest batch.
const BATCH: u64 = 1024;
/// Collect period in the logged modes.
const COLLECT_EVERY: Duration = Duration::from_millis(20);
/// Ring entries per vCPU (QEMU's default dirty-ring size).
const RING_ENTRIES: u32 = 4096;
/// The unit of the rows.
pub const UNIT: &str = "ns/write";

/// How the data slot is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Logging {
    None,
    Bitmap,
    Ring,
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
struct Run {
    ns_per_write: f64,
    writes: u64,
    collected: u64,
}

/// Runs the group; adds rows and notes to `out`. Without `/dev/kvm` it adds nothing.
///
/// # Panics
/// If a VM cannot be built or a vCPU fails: then the figures would be meaningless.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let secs = if cfg.reps < 10 { 1 } else { 3 };
    let window = Duration::from_secs(secs);
    let mut runs = Vec::new();
    for mode in [Logging::None, Logging::Bitmap, Logging::Ring] {
        let Some(run) = run(mode, window) else { return };
        runs.push(run);
    }
    let [none, bitmap, ring] = [runs[0], runs[1], runs[2]];
    out.rows.push(Row::new(
        "kvm_dirtying/bitmap_vs_no_logging",
        bitmap.ns_per_write,
        none.ns_per_write,
        UNIT,
    ));
    out.rows.push(Row::new("kvm_dirtying/ring_vs_no_logging", ring.ns_per_write, none.ns_per_write, UNIT));
    out.rows.push(Row::new("kvm_dirtying/ring_vs_bitmap", ring.ns_per_write, bitmap.ns_per_write, UNIT));
    out.notes.push(format!(
        "kvm dirtying: {VCPUS} vCPUs, random pages of 1 GiB, {secs} s per mode; guest writes: none {} / \
         bitmap {} / ring {}; pages collected: bitmap {} / ring {} (ring {RING_ENTRIES} entries, collect \
         every {COLLECT_EVERY:?})",
        none.writes, bitmap.writes, ring.writes, bitmap.collected, ring.collected
    ));
}

fn run(mode: Logging, window: Duration) -> Option<Run> {
    let pages = PAGES_1G;
    let mut vm =
        guest_or_skip(GuestSpec::new(pages, VCPUS)).expect("a guest VM for the dirtying benchmark")?;
    let tracker = match mode {
        Logging::Ring => Some(DirtyTracker::with_ring(vm.vm_fd(), RING_ENTRIES).expect("enable the ring")),
        Logging::Bitmap => Some(DirtyTracker::with_bitmap(vm.vm_fd()).expect("bitmap tracker")),
        Logging::None => None,
    };
    for i in 0..VCPUS {
        let w =
            Workload::share(pages, VCPUS as u64, i as u64, BATCH, Pattern::Random).with_seed(i as u64 + 1);
        vm.set_workload(i, &w).expect("workload fits the slot");
    }
    if let Some(t) = &tracker {
        vm.set_dirty_logging(true).expect("log the data slot");
        let id = u16::try_from(vm.data_slot()).expect("slot id fits 16 bits");
        t.register_slot(SlotSpec::new(id, vm.data_gpa(), pages)).expect("register the data slot");
    }
    vm.set_iteration(1);
    let mut vcpus = vm.create_vcpus().expect("create the vCPUs");
    let handles: Vec<_> = match &tracker {
        Some(t) => vcpus.iter().map(|v| Some(t.attach_vcpu(v.fd()).expect("attach the vCPU"))).collect(),
        None => vec![None; VCPUS],
    };
    let stop = AtomicBool::new(false);
    let mut collected = 0;
    let start = Instant::now();
    std::thread::scope(|s| {
        for (vcpu, handle) in vcpus.iter_mut().zip(handles) {
            let (stop, tracker) = (&stop, tracker.as_ref());
            s.spawn(move || {
                let mut runner = tracker.zip(handle).map(|(t, h)| VcpuRunner::new(t, h));
                while !stop.load(Ordering::Relaxed) {
                    run_one(vcpu, runner.as_mut()).expect("benchmark vCPU");
                }
            });
        }
        while start.elapsed() < window {
            std::thread::sleep(COLLECT_EVERY);
            if let Some(t) = &tracker {
                collected += t.collect().expect("collect").total();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed();
    let writes: u64 = (0..VCPUS).map(|i| vm.vcpu_stats(i).map_or(0, |s| s.writes)).sum();
    assert!(writes > 0, "the guest wrote nothing in {elapsed:?}");
    Some(Run { ns_per_write: elapsed.as_nanos() as f64 / writes as f64 * VCPUS as f64, writes, collected })
}

/// Runs the vCPU to its next batch exit.
fn run_one(vcpu: &mut GuestVcpu, runner: Option<&mut VcpuRunner<'_>>) -> Result<(), String> {
    let exit = match runner {
        None => vcpu.run().map_err(|e| e.to_string())?,
        Some(r) => {
            let classified = r.run(vcpu.fd_mut(), |exit| classify_exit(&exit)).map_err(|e| e.to_string())?;
            classified.map_err(|u| vcpu.exit_error(u).to_string())?
        }
    };
    match exit {
        GuestExit::BatchDone { .. } | GuestExit::Interrupted => Ok(()),
        GuestExit::DirtyRingFull => Err("a ring-full exit reached the benchmark".into()),
    }
}
