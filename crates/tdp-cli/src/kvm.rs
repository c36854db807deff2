//! [`KvmGuest`]: a real KVM guest as a [`Guest`]: a `tdp-guest` VM whose vCPUs run its CPL3 program over
//! the data memslot, tracked by a `tdp-kvm` [`DirtyTracker`] (dirty ring, get-and-clear bitmap, or
//! clear-log bitmap), each vCPU on its own thread through a [`VcpuRunner`] that harvests its ring at
//! `KVM_EXIT_DIRTY_RING_FULL` and calls the throttle there. Between batches (the guest's `OUT`) a vCPU
//! thread parks when the migration pauses the guest, paces itself to the workload's rate and, with the
//! bitmap, applies the throttle.
//!
//! What migrates is all guest memory: both memslots, each dirty-logged and registered with the tracker.
//! The code slot (slot 0: GDT, control page, program, page tables) is guest memory the guest writes too
//! (its vCPU blocks in the control page at every batch, the accessed and dirty bits of its page tables),
//! and the data slot (slot 1) is the RAM it dirties. Each page the tracker reports keeps its slot.
//!
//! With [`Mode::Sampling`] nothing is logged (no slot has `KVM_MEM_LOG_DIRTY_PAGES`, harvests report
//! nothing): `tdp dirty-rate` hashes sampled pages instead. So that every guest write changes the page
//! it writes (the guest writes the iteration number, which the host otherwise leaves alone), each vCPU
//! thread advances the iteration number after each batch in that mode only: a host write to the
//! control page, which no dirty log would see, so it is never done while a migration tracks the guest.
//!
//! Keeps: I4 through `tdp-kvm` (a collect re-protects before it returns; ring-full harvests land in the
//! tracker's pending set) and the [`Guest::harvest`] contract on top of it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
use tdp_guest::{
    BatchGate, CODE_SLOT, DATA_GPA, DATA_SLOT, GuestExit, GuestSpec, GuestVm, Workload, classify_exit,
};
use tdp_kvm::{DirtySets, DirtyTracker, SlotSpec, Throttle as RingThrottle, VcpuRunner};

use crate::converge::{Pacer, Throttle};
use crate::guest::{Guest, GuestConfig, GuestError, Harvest, Mode, Pattern, VcpuFigures};
use crate::pending::PendingSet;
use crate::proto::SlotInfo;

/// Pages each vCPU writes per batch (one `OUT` exit per batch).
pub const BATCH: u64 = 64;
/// How long a pause waits for every vCPU to reach a batch boundary.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a KVM guest could not be built: `/dev/kvm` missing or unusable (the mock can stand in), or
/// anything else (a real error).
#[derive(Debug, thiserror::Error)]
pub enum KvmStartError {
    /// `/dev/kvm` cannot be opened or lacks what the mode needs.
    #[error("{0}")]
    Unavailable(String),
    /// The VM failed in another way.
    #[error(transparent)]
    Failed(#[from] GuestError),
}

/// A running KVM guest with dirty tracking on.
pub struct KvmGuest {
    vm: Arc<GuestVm>,
    tracker: Arc<DirtyTracker>,
    gate: Arc<BatchGate>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    cfg: GuestConfig,
    /// The code slot, then the data slot.
    slots: [SlotInfo; 2],
    harvested_at_last: Vec<u64>,
    paused: bool,
}

struct Shared {
    throttle: Throttle,
    ring_full_exits: Vec<AtomicU64>,
    error: Mutex<Option<String>>,
}

impl KvmGuest {
    /// Opens `/dev/kvm`, builds the VM with `cfg.memory` bytes of data memory, enables the tracking mode,
    /// turns dirty logging on for both memslots (not with [`Mode::Sampling`]) and starts one thread per
    /// vCPU.
    ///
    /// ```
    /// use tdp_cli::guest::{Guest, GuestConfig, Mode, Pattern};
    /// use tdp_cli::kvm::{KvmGuest, KvmStartError};
    /// use tdp_cli::pending::PendingSet;
    ///
    /// let cfg = GuestConfig { memory: 4 << 20, vcpus: 2, pattern: Pattern::Random, rate_pages: 0,
    ///     mode: Mode::Ring, ring_entries: 4096, fill: false };
    /// let mut guest = match KvmGuest::start(cfg) {
    ///     Ok(g) => g,
    ///     Err(KvmStartError::Unavailable(why)) => { eprintln!("SKIPPED: {why}"); return Ok(()); }
    ///     Err(e) => return Err(e.into()),
    /// };
    /// let mut pending = PendingSet::new(guest.slots());
    /// guest.run_for(std::time::Duration::from_millis(50), &mut pending)?;
    /// assert!(!pending.is_empty(), "the guest dirtied pages");
    /// guest.shutdown()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`KvmStartError::Unavailable`] when `/dev/kvm` cannot be opened or does not offer the mode;
    /// [`KvmStartError::Failed`] for any other failure (nothing is left running).
    pub fn start(cfg: GuestConfig) -> Result<KvmGuest, KvmStartError> {
        KvmGuest::start_on(Path::new(tdp_kvm::KVM_PATH), cfg)
    }

    /// As [`KvmGuest::start`], with the KVM device at `device` instead of `/dev/kvm`.
    ///
    /// # Errors
    /// As [`KvmGuest::start`].
    pub fn start_on(device: &Path, cfg: GuestConfig) -> Result<KvmGuest, KvmStartError> {
        let pages = cfg.memory / crate::units::PAGE_SIZE;
        let unavailable = |e: &dyn std::fmt::Display| KvmStartError::Unavailable(e.to_string());
        let path = CString::new(device.as_os_str().as_bytes()).map_err(|e| {
            KvmStartError::Unavailable(format!("bad KVM device path {}: {e}", device.display()))
        })?;
        let kvm = tdp_kvm::open_kvm_at(&path).map_err(|e| unavailable(&e))?;
        let mut vm = match GuestVm::with_kvm(kvm, GuestSpec::new(pages, cfg.vcpus)) {
            Ok(vm) => vm,
            Err(tdp_guest::GuestError::OpenKvm(e)) => {
                return Err(unavailable(&format!("cannot open {}: {e}", device.display())));
            }
            Err(e) => return Err(GuestError::new("creating the KVM guest", e).into()),
        };
        let tracker = match cfg.mode {
            Mode::Ring => DirtyTracker::with_ring(vm.vm_fd(), cfg.ring_entries),
            // Sampling: a tracker with no slot, only for the vCPU runner; nothing is logged.
            Mode::Bitmap | Mode::Sampling => DirtyTracker::with_bitmap(vm.vm_fd()),
            Mode::ClearLog => DirtyTracker::with_clear_log(vm.vm_fd(), false),
        };
        let tracker = match tracker {
            Ok(t) => Arc::new(t),
            Err(e @ (tdp_kvm::Error::NoDirtyRing | tdp_kvm::Error::CapabilityMissing { .. })) => {
                return Err(KvmStartError::Unavailable(format!(
                    "/dev/kvm cannot track in {:?} mode: {e}",
                    cfg.mode
                )));
            }
            Err(e) => return Err(GuestError::new("setting up dirty tracking", e).into()),
        };
        let slots = [
            SlotInfo::new(CODE_SLOT, 0, vm.code_pages()),
            SlotInfo::new(DATA_SLOT, DATA_GPA, vm.data_pages()),
        ];
        if cfg.mode != Mode::Sampling {
            for s in &slots {
                tracker.register_slot(SlotSpec::new(s.slot as u16, s.gpa, s.pages)).map_err(|e| {
                    GuestError::new(format!("registering memslot {} with the tracker", s.slot), e)
                })?;
            }
            vm.set_code_dirty_logging(true)
                .map_err(|e| GuestError::new("turning dirty logging on for the code memslot", e))?;
            vm.set_dirty_logging(true)
                .map_err(|e| GuestError::new("turning dirty logging on for the data memslot", e))?;
        }
        let shares = pages.div_ceil(cfg.vcpus as u64);
        let batch = BATCH.min(shares.max(1));
        let mut batches = Vec::with_capacity(cfg.vcpus);
        for i in 0..cfg.vcpus {
            let share = Workload::share(pages, cfg.vcpus as u64, i as u64, batch, tdp_guest::Pattern::Random);
            let pattern = match cfg.pattern {
                Pattern::Sequential => tdp_guest::Pattern::Sequential,
                Pattern::Random => tdp_guest::Pattern::Random,
                Pattern::HotSet => {
                    tdp_guest::Pattern::Hot { hot_pages: (share.pages / 8).max(1), percent: 90 }
                }
            };
            let w = Workload { pattern, batch: batch.min(share.pages), ..share }.with_fill(cfg.fill);
            vm.set_workload(i, &w).map_err(|e| GuestError::new(format!("setting vCPU {i}'s workload"), e))?;
            batches.push(w.batch);
        }
        let vcpus = vm.create_vcpus().map_err(|e| GuestError::new("creating the vCPUs", e))?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for v in &vcpus {
            handles.push(
                tracker
                    .attach_vcpu(v.fd())
                    .map_err(|e| GuestError::new(format!("attaching vCPU {}", v.index()), e))?,
            );
        }
        let vm = Arc::new(vm);
        let gate = Arc::new(BatchGate::new(cfg.vcpus));
        let shared = Arc::new(Shared {
            throttle: Throttle::new(cfg.vcpus),
            ring_full_exits: (0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect(),
            error: Mutex::new(None),
        });
        let mut guest = KvmGuest {
            vm,
            tracker,
            gate,
            shared,
            threads: Vec::new(),
            cfg,
            slots,
            harvested_at_last: vec![0; cfg.vcpus],
            paused: false,
        };
        for (vcpu, handle) in vcpus.into_iter().zip(handles) {
            let (tracker, gate, shared) =
                (Arc::clone(&guest.tracker), Arc::clone(&guest.gate), Arc::clone(&guest.shared));
            let index = vcpu.index();
            let batch = batches.get(index).copied().unwrap_or(batch);
            let ring = cfg.mode == Mode::Ring;
            let rate = cfg.rate_pages as f64 / cfg.vcpus as f64;
            let sampling = (cfg.mode == Mode::Sampling).then(|| Arc::clone(&guest.vm));
            let spawned = std::thread::Builder::new().name(format!("kvm-vcpu{index}")).spawn(move || {
                let work = Work { ring, batch, rate, sampling };
                let result = vcpu_thread(vcpu, &tracker, handle, &gate, &shared, work);
                gate.leave();
                if let Err(e) = result {
                    let mut slot = shared.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    slot.get_or_insert(e);
                }
            });
            match spawned {
                Ok(t) => guest.threads.push(t),
                Err(e) => {
                    let _ = guest.shutdown();
                    return Err(GuestError::new(format!("spawning the thread of vCPU {index}"), e).into());
                }
            }
        }
        Ok(guest)
    }

    fn error(&self) -> Option<String> {
        self.shared.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// How one vCPU thread runs its batches.
struct Work {
    /// The dirty ring tracks (the throttle acts at ring-full exits, not batch exits).
    ring: bool,
    /// Pages per batch.
    batch: u64,
    /// The vCPU's share of the workload's rate, pages/s (0: unpaced).
    rate: f64,
    /// Sampling mode: the VM whose iteration number advances after each batch.
    sampling: Option<Arc<GuestVm>>,
}

/// One vCPU's thread: run batches until the gate says stop.
fn vcpu_thread(
    mut vcpu: tdp_guest::GuestVcpu,
    tracker: &DirtyTracker,
    handle: tdp_kvm::VcpuHandle,
    gate: &BatchGate,
    shared: &Shared,
    work: Work,
) -> Result<(), String> {
    let Work { ring, batch, rate, sampling } = work;
    let index = vcpu.index();
    let mut ring_pacer = Pacer::new();
    let mut last_total = 0u64;
    let mut runner = VcpuRunner::new(tracker, handle).with_throttle(move |ev| {
        shared.ring_full_exits[index].fetch_add(1, Ordering::Relaxed);
        // QEMU's dirty-limit: a vCPU over its quota sleeps at its ring-full exits, for every page its
        // ring reported since the last exit (collects by the migration thread included).
        let dirtied = ev.vcpu_total.saturating_sub(last_total);
        last_total = ev.vcpu_total;
        shared.throttle.pace(index, &mut ring_pacer, dirtied);
        RingThrottle::Resume
    });
    let mut batch_pacer = Pacer::new();
    let mut workload_pacer = tdp_guest::Pacer::new(rate);
    let mut slept_before = Duration::ZERO;
    loop {
        if gate.at_batch_boundary() == tdp_guest::Decision::Stop {
            return Ok(());
        }
        let exit = match runner.run(vcpu.fd_mut(), |exit| classify_exit(&exit)) {
            Ok(exit) => exit,
            Err(e) if e.is_interrupted() => continue,
            Err(e) => return Err(format!("vCPU {index}: {e}")),
        };
        match exit {
            Ok(GuestExit::BatchDone { .. }) => {
                if let Some(vm) = &sampling {
                    // The next batch writes a new value (see the module docs: sampling mode only).
                    vm.set_iteration(vm.iteration().wrapping_add(1));
                }
                if !ring {
                    shared.throttle.pace(index, &mut batch_pacer, batch);
                }
                // Time asleep in the throttle is not owed to the workload afterwards: no catch-up burst.
                let slept = shared.throttle.slept(index);
                if slept != slept_before {
                    slept_before = slept;
                    workload_pacer = tdp_guest::Pacer::new(rate);
                }
                workload_pacer.after_batch(batch);
            }
            Ok(GuestExit::Interrupted | GuestExit::DirtyRingFull) => {}
            Err(unexpected) => return Err(vcpu.exit_error(unexpected).to_string()),
        }
    }
}

impl Guest for KvmGuest {
    fn backend(&self) -> &'static str {
        "kvm"
    }
    fn describe(&self) -> String {
        let tracker = match self.cfg.mode {
            Mode::Ring => format!("KVM dirty ring ({} entries per vCPU)", self.cfg.ring_entries),
            Mode::Bitmap => "KVM dirty bitmap (KVM_GET_DIRTY_LOG, get-and-clear)".to_owned(),
            Mode::ClearLog => {
                "KVM dirty bitmap with manual protect (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG)".to_owned()
            }
            Mode::Sampling => "no dirty logging (page sampling)".to_owned(),
        };
        format!(
            "KVM guest on /dev/kvm (CPL3 program on {} vCPU threads; code memslot {} pages, data memslot {} pages), {tracker}",
            self.cfg.vcpus, self.slots[0].pages, self.slots[1].pages
        )
    }
    fn slots(&self) -> &[SlotInfo] {
        &self.slots
    }
    fn vcpus(&self) -> usize {
        self.cfg.vcpus
    }
    fn throttle(&self) -> &Throttle {
        &self.shared.throttle
    }
    fn throttle_point(&self) -> &'static str {
        self.cfg.mode.throttle_point()
    }

    fn harvest(&mut self, into: &mut PendingSet) -> Result<Harvest, GuestError> {
        if self.cfg.mode == Mode::Sampling {
            if let Some(e) = self.error() {
                return Err(GuestError::new("running the KVM vCPUs", e));
            }
            return Ok(Harvest::default());
        }
        let sets = self.tracker.collect().map_err(|e| GuestError::new("collecting dirty pages", e))?;
        let before = into.len();
        let mut outside = None;
        for slot in sets.iter() {
            let id = slot.slot().raw();
            for offset in slot.offsets() {
                if into.covers(id, offset) {
                    into.insert(id, offset);
                } else {
                    outside.get_or_insert((id, offset));
                }
            }
        }
        if let Some((slot, offset)) = outside {
            // The tracker knows only the two slots registered above: a page elsewhere is a bug to report,
            // and the pages harvested with it are kept (in `into`, or in `sets` for the caller to see).
            self.tracker
                .restore(&sets)
                .map_err(|e| GuestError::new("giving pages back to the tracker", e))?;
            return Err(GuestError::new(
                "collecting dirty pages",
                format!(
                    "the tracker reported page {offset} of memslot {slot}, which the guest does not have"
                ),
            ));
        }
        let stats = self.tracker.stats().map_err(|e| GuestError::new("reading tracker statistics", e))?;
        let per_vcpu = if stats.per_vcpu_exact {
            stats
                .per_vcpu
                .iter()
                .zip(self.harvested_at_last.iter_mut())
                .map(|(now, last)| {
                    let d = now.harvested.saturating_sub(*last);
                    *last = now.harvested;
                    d
                })
                .collect()
        } else {
            Vec::new()
        };
        if let Some(e) = self.error() {
            return Err(GuestError::new("running the KVM vCPUs", e));
        }
        Ok(Harvest { new_pages: into.len() - before, per_vcpu })
    }

    fn give_back(&mut self, pages: &PendingSet) -> Result<u64, GuestError> {
        if self.cfg.mode == Mode::Sampling {
            return Ok(0);
        }
        let mut sets = DirtySets::default();
        for s in &self.slots {
            sets.add_slot(RingSlot::new(AsId(0), SlotId(s.slot as u16)), Gpa(s.gpa), s.pages);
        }
        for (slot, page) in pages.iter() {
            let inserted = sets.get_mut(RingSlot::from_raw(slot)).is_some_and(|s| s.insert(page));
            if !inserted {
                return Err(GuestError::new(
                    "giving pages back to the tracker",
                    format!("page {page} of memslot {slot} is not in the guest's memory"),
                ));
            }
        }
        self.tracker.restore(&sets).map_err(|e| GuestError::new("giving pages back to the tracker", e))
    }

    fn read_page(&self, slot: u32, page: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let read = match slot {
            CODE_SLOT => self.vm.copy_code_page(page, buf),
            DATA_SLOT => self.vm.copy_data_page(page, buf),
            _ => {
                return Err(GuestError::new(
                    format!("reading page {page} of memslot {slot}"),
                    "no such memslot",
                ));
            }
        };
        read.map_err(|e| GuestError::new(format!("reading page {page} of memslot {slot}"), e))
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        self.paused = true;
        self.shared.throttle.interrupt();
        if !self.gate.pause_all(PAUSE_TIMEOUT) {
            return Err(GuestError::new(
                "pausing the vCPUs",
                format!("not all reached a batch boundary within {} s", PAUSE_TIMEOUT.as_secs()),
            ));
        }
        match self.error() {
            Some(e) => Err(GuestError::new("pausing the vCPUs", e)),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.shared.throttle.release();
        self.gate.resume();
        self.paused = false;
        match self.error() {
            Some(e) => Err(GuestError::new("resuming the vCPUs", e)),
            None => Ok(()),
        }
    }

    fn is_running(&self) -> bool {
        !self.paused
            && !self.gate.is_stopped()
            && self.gate.active() == self.cfg.vcpus
            && self.error().is_none()
    }

    fn figures(&self) -> Vec<VcpuFigures> {
        (0..self.cfg.vcpus)
            .map(|i| VcpuFigures {
                writes: self.vm.vcpu_stats(i).map_or(0, |s| s.writes),
                ring_full_exits: self.shared.ring_full_exits[i].load(Ordering::Relaxed),
                throttled_exits: self.shared.throttle.throttled_exits(i),
                throttle_ms: self.shared.throttle.slept(i).as_millis() as u64,
            })
            .collect()
    }

    fn shutdown(&mut self) -> Result<(), GuestError> {
        self.gate.stop();
        let mut panicked = false;
        for t in self.threads.drain(..) {
            panicked |= t.join().is_err();
        }
        if panicked {
            return Err(GuestError::new("stopping the vCPUs", "a vCPU thread panicked"));
        }
        match self.error() {
            Some(e) => Err(GuestError::new("stopping the vCPUs", e)),
            None => Ok(()),
        }
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
