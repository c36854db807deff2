//! [`MockGuest`]: the [`Guest`] used when `/dev/kvm` cannot be used — a tdp-mock machine (software
//! EPT walker, TLBs, host memory) whose simulated vCPUs run on threads and write through tdp-core's MMU
//! with dirty logging on, tracked by tdp-core's dirty ring (one `DirtyRingProducer` per vCPU, harvested
//! by the vCPU itself at soft-full "exits" and by the migration thread) or its dirty bitmaps (one per
//! memslot).
//!
//! Guest memory is two memslots, like the KVM guest's: the data slot (slot 0, the RAM the workload
//! dirties) and a control slot (slot 1, [`CONTROL_PAGES`] pages after it, where each vCPU stores its
//! batch count after every batch, as the KVM guest's program updates its vCPU block). Both are logged and
//! both migrate. With [`Mode::Sampling`] neither is logged.
//!
//! Lock order: the MMU lock, then a vCPU's ring lock (the fault path marks a page under the MMU read
//! lock; a harvest takes the MMU write lock, then the ring). A harvest re-protects under the write lock
//! and then waits out every access in flight (the `in_flight` lock, the mock's stand-in for the IPI that
//! a TLB shootdown sends), so no write that resolved its translation before the re-protection lands
//! after the harvest returned unseen.
//!
//! Keeps: I4 (every write after logging starts reaches a harvest; ring pushes are never refused because
//! each vCPU exits at soft-full and resets its ring before it writes again).

mod vcpu_loop;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use tdp_core::addr::{AsId, Gfn, Level, SlotId};
use tdp_core::dirty_bitmap::DirtyBitmap;
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, MmuConfig};
use tdp_mock::{HostConfig, Machine, MockHost};

use crate::converge::Throttle;
use crate::guest::{Guest, GuestConfig, GuestError, Harvest, Mode, VcpuFigures};
use crate::pending::PendingSet;
use crate::proto::SlotInfo;

/// The memory slot the mock guest's workload dirties.
const SLOT: SlotId = SlotId(0);
/// The control memslot: one page per vCPU (modulo its size) holding its batch count.
pub(crate) const CONTROL_SLOT: SlotId = SlotId(1);
/// Pages in the control memslot.
pub const CONTROL_PAGES: u64 = 32;
/// The largest mock guest: the model keeps page contents in a map and reads them a word at a time.
pub const MAX_MOCK_MEMORY: u64 = 1 << 30;

/// A mock guest, running.
pub struct MockGuest {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    cfg: GuestConfig,
    /// The data slot, then the control slot.
    layout: [SlotInfo; 2],
}

/// State shared by the vCPU threads and the migration thread.
pub(crate) struct Shared {
    pub(crate) machine: Machine,
    pub(crate) slot: Memslot,
    pub(crate) control_slot: Memslot,
    pub(crate) tracker: Tracker,
    pub(crate) throttle: Throttle,
    /// Pages harvested by vCPUs at their own ring-full exits, waiting for the next harvest.
    pub(crate) early: Mutex<PendingSet>,
    /// Read-held by a vCPU around each access; write-taken by a harvest to wait out accesses in flight.
    pub(crate) in_flight: RwLock<()>,
    pub(crate) control: Mutex<Control>,
    pub(crate) wake: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) figures: Vec<VcpuCounters>,
}

/// Pause/stop handshake between the migration thread and the vCPU threads.
#[derive(Default)]
pub(crate) struct Control {
    pub(crate) paused: bool,
    pub(crate) parked: usize,
    pub(crate) exited: usize,
    pub(crate) error: Option<String>,
}

/// One vCPU's counters.
#[derive(Default)]
pub(crate) struct VcpuCounters {
    pub(crate) writes: AtomicU64,
    pub(crate) ring_full_exits: AtomicU64,
    /// Ring entries the vCPU harvested itself at ring-full exits since the last [`Guest::harvest`].
    pub(crate) early_entries: AtomicU64,
}

/// Where the marks go.
pub(crate) enum Tracker {
    Rings(Vec<Mutex<VcpuRing>>),
    /// One bitmap per memslot (data, control), by slot id; unmarked with [`Mode::Sampling`].
    Bitmap {
        bitmaps: Vec<(SlotId, DirtyBitmap)>,
        manual: bool,
    },
}

/// One vCPU's ring: both halves, sharing the ring memory, made once when the guest starts.
pub(crate) struct VcpuRing {
    pub(crate) producer: DirtyRingProducer<'static, Arc<[DirtyGfn]>>,
    pub(crate) consumer: DirtyRingConsumer<'static, Arc<[DirtyGfn]>>,
    pub(crate) soft_full: bool,
    pub(crate) refused: u64,
}

impl MockGuest {
    /// Builds the machine, turns dirty logging on and starts the vCPU threads.
    ///
    /// ```
    /// use tdp_cli::guest::{Guest, GuestConfig, Mode, Pattern};
    /// use tdp_cli::mock::MockGuest;
    /// use tdp_cli::pending::PendingSet;
    ///
    /// let cfg = GuestConfig { memory: 1 << 20, vcpus: 2, pattern: Pattern::Random, rate_pages: 0,
    ///     mode: Mode::Ring, ring_entries: 256, fill: false };
    /// let mut guest = MockGuest::start(cfg)?;
    /// let mut pending = PendingSet::new(guest.slots());
    /// let h = guest.run_for(std::time::Duration::from_millis(50), &mut pending)?;
    /// assert!(h.new_pages > 0 && !pending.is_empty());
    /// guest.shutdown()?;
    /// # Ok::<(), tdp_cli::guest::GuestError>(())
    /// ```
    ///
    /// # Errors
    /// A configuration the model rejects (memory size, ring size).
    pub fn start(cfg: GuestConfig) -> Result<MockGuest, GuestError> {
        let pages = cfg.memory / crate::units::PAGE_SIZE;
        if pages == 0 || cfg.memory > MAX_MOCK_MEMORY {
            return Err(GuestError::new(
                "creating the mock machine",
                format!("memory must be 4 KiB to {} on the mock", crate::units::human_bytes(MAX_MOCK_MEMORY)),
            ));
        }
        // The control slot starts at the first 2 MiB boundary after the data slot.
        let control_gfn = pages.next_multiple_of(512);
        let host_cfg = HostConfig {
            table_capacity: (pages / 512 + 64) as usize,
            guest_ram_pages: control_gfn + 512,
            host_level: Level::L1,
            yield_every: None,
        };
        let machine = Machine::new(MmuConfig::EPT, host_cfg)
            .map_err(|e| GuestError::new("creating the mock machine", format!("{e:?}")))?;
        let flags = if cfg.mode == Mode::Sampling { SlotFlags::empty() } else { SlotFlags::LOG_DIRTY };
        let slot = machine.ram_slot(AsId(0), SLOT, Gfn(0), pages, flags);
        let control = machine.ram_slot(AsId(0), CONTROL_SLOT, Gfn(control_gfn), CONTROL_PAGES, flags);
        for s in [slot, control] {
            machine
                .mmu()
                .write()
                .insert_memslot(s)
                .map_err(|e| GuestError::new("inserting the mock memslots", format!("{e:?}")))?;
        }
        let layout = [slot, control].map(|s| SlotInfo::new(u32::from(s.id.0), s.base_gfn.gpa().0, s.pages));
        let tracker = match cfg.mode {
            Mode::Ring => {
                let rcfg = RingConfig::new(cfg.ring_entries, 0)
                    .map_err(|e| GuestError::new("configuring the dirty ring", format!("{e:?}")))?;
                let ring_error = |e| GuestError::new("configuring the dirty ring", format!("{e:?}"));
                let rings = (0..cfg.vcpus)
                    .map(|_| {
                        let ring: Arc<[DirtyGfn]> = (0..rcfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
                        Ok(Mutex::new(VcpuRing {
                            producer: DirtyRingProducer::with_memory(Arc::clone(&ring), rcfg)
                                .map_err(ring_error)?,
                            consumer: DirtyRingConsumer::with_memory(ring, rcfg).map_err(ring_error)?,
                            soft_full: false,
                            refused: 0,
                        }))
                    })
                    .collect::<Result<_, GuestError>>()?;
                Tracker::Rings(rings)
            }
            Mode::Bitmap | Mode::ClearLog | Mode::Sampling => Tracker::Bitmap {
                bitmaps: [slot, control]
                    .iter()
                    .map(|s| {
                        DirtyBitmap::new(s.pages, false)
                            .map(|b| (s.id, b))
                            .map_err(|e| GuestError::new("allocating the dirty bitmaps", format!("{e:?}")))
                    })
                    .collect::<Result<_, _>>()?,
                manual: cfg.mode == Mode::ClearLog,
            },
        };
        let shared = Arc::new(Shared {
            machine,
            slot,
            control_slot: control,
            tracker,
            throttle: Throttle::new(cfg.vcpus),
            early: Mutex::new(PendingSet::new(&layout)),
            in_flight: RwLock::new(()),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            figures: (0..cfg.vcpus).map(|_| VcpuCounters::default()).collect(),
        });
        let mut threads = Vec::with_capacity(cfg.vcpus);
        for index in 0..cfg.vcpus {
            let mut vcpu = shared.machine.new_vcpu(AsId(0));
            vcpu.set_dirty_sink(Box::new(vcpu_loop::Sink { shared: Arc::clone(&shared), vcpu: index }));
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("mock-vcpu{index}"))
                .spawn(move || vcpu_loop::run(&s, vcpu, index, cfg));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let mut guest = MockGuest { shared, threads, cfg, layout };
                    let _ = guest.shutdown();
                    return Err(GuestError::new(format!("spawning mock vCPU {index}"), e));
                }
            }
        }
        Ok(MockGuest { shared, threads, cfg, layout })
    }

    /// Dirty ring pushes refused because a ring was completely full (each a lost mark): always 0 unless
    /// the exit protocol is broken.
    #[must_use]
    pub fn refused_pushes(&self) -> u64 {
        match &self.shared.tracker {
            Tracker::Rings(rings) => rings.iter().map(|r| lock(r).refused).sum(),
            Tracker::Bitmap { .. } => 0,
        }
    }
}

impl Shared {
    fn mmu(&self) -> &Mmu<MockHost> {
        self.machine.mmu()
    }

    /// Harvests and resets vCPU `i`'s ring into `into` under the MMU write lock; returns entries seen.
    pub(crate) fn harvest_ring(&self, i: usize, into: &mut PendingSet) -> u64 {
        let Tracker::Rings(rings) = &self.tracker else { return 0 };
        let Some(ring) = rings.get(i) else { return 0 };
        let mmu = self.mmu();
        let mut w = mmu.write();
        let mut r = lock(ring);
        let seen = r.consumer.harvest(usize::MAX, |e| {
            into.insert(e.slot.raw(), e.offset);
        }) as u64;
        let (_stats, flush) = w.reset_dirty_ring(&mut r.producer);
        r.soft_full = false;
        drop(r);
        drop(w);
        flush.run(mmu.host());
        seen
    }

    /// Waits until no vCPU is inside an access: after a re-protection, every later write faults.
    fn quiesce(&self) {
        drop(self.in_flight.write().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

impl Guest for MockGuest {
    fn backend(&self) -> &'static str {
        "mock"
    }
    fn describe(&self) -> String {
        let tracker = match self.cfg.mode {
            Mode::Ring => format!("tdp-core dirty ring ({} entries per vCPU)", self.cfg.ring_entries),
            Mode::Bitmap => "tdp-core dirty bitmap (get-and-clear)".to_owned(),
            Mode::ClearLog => "tdp-core dirty bitmap (manual protect: get, then clear)".to_owned(),
            Mode::Sampling => "no dirty logging (page sampling)".to_owned(),
        };
        format!(
            "tdp-mock machine, not KVM (simulated vCPUs on threads, software EPT walker; data memslot {} pages, control memslot {} pages), {tracker}",
            self.layout[0].pages, self.layout[1].pages
        )
    }
    fn slots(&self) -> &[SlotInfo] {
        &self.layout
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
        let s = &*self.shared;
        let before = into.len();
        let mut per_vcpu = Vec::new();
        match &s.tracker {
            Tracker::Rings(_) => {
                for i in 0..self.cfg.vcpus {
                    let early = s.figures[i].early_entries.swap(0, Ordering::Relaxed);
                    per_vcpu.push(s.harvest_ring(i, into) + early);
                }
                let early = lock(&s.early).take();
                into.merge(&early);
            }
            Tracker::Bitmap { bitmaps, manual } => {
                for (id, bitmap) in bitmaps {
                    let mmu = s.mmu();
                    let mut out = vec![0u64; bitmap.words()];
                    let flush = {
                        let mut w = mmu.write();
                        let reprotect = |base, mask| w.reprotect_dirty(AsId(0), *id, base, mask);
                        if *manual {
                            bitmap
                                .get(&mut out)
                                .map_err(|e| GuestError::new("getting the dirty log", format!("{e:?}")))?;
                            let n = u32::try_from(bitmap.pages())
                                .map_err(|_| GuestError::new("clearing the dirty log", "slot too large"))?;
                            bitmap.clear(0, n, &out, reprotect)
                        } else {
                            bitmap.get_and_clear(&mut out, reprotect)
                        }
                        .map_err(|e| GuestError::new("harvesting the dirty bitmap", format!("{e:?}")))?
                    };
                    flush.run(mmu.host());
                    for page in tdp_core::dirty_bitmap::dirty_offsets(&out) {
                        into.insert(u32::from(id.0), page);
                    }
                }
            }
        }
        s.quiesce();
        if let Some(e) = lock(&s.control).error.clone() {
            return Err(GuestError::new("running the mock vCPUs", e));
        }
        Ok(Harvest { new_pages: into.len() - before, per_vcpu })
    }

    fn give_back(&mut self, pages: &PendingSet) -> Result<u64, GuestError> {
        // The pages harvested at ring-full exits wait in `early` for the next harvest: so do these.
        Ok(lock(&self.shared.early).merge(pages))
    }

    fn read_page(&self, slot: u32, page: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let slot = match [&self.shared.slot, &self.shared.control_slot]
            .into_iter()
            .find(|s| u32::from(s.id.0) == slot)
        {
            Some(s) => s,
            None => {
                return Err(GuestError::new(
                    format!("reading page {page} of memslot {slot}"),
                    "no such memslot",
                ));
            }
        };
        if page >= slot.pages || buf.len() < crate::proto::PAGE_SIZE {
            return Err(GuestError::new(
                format!("reading page {page} of memslot {}", slot.id.0),
                "beyond the memslot",
            ));
        }
        let pfn = tdp_core::addr::Pfn(slot.host_addr(Gfn(slot.base_gfn.0 + page)) >> 12);
        let host = self.shared.machine.host();
        for (i, word) in buf[..crate::proto::PAGE_SIZE].chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&host.read_u64(pfn, i as u64 * 8).to_le_bytes());
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        let s = &*self.shared;
        let mut c = lock(&s.control);
        c.paused = true;
        s.throttle.interrupt();
        while c.parked + c.exited < self.cfg.vcpus {
            c = s.wake.wait(c).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        match c.error.clone() {
            Some(e) => Err(GuestError::new("pausing the mock vCPUs", e)),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        let s = &*self.shared;
        let mut c = lock(&s.control);
        c.paused = false;
        s.throttle.release();
        s.wake.notify_all();
        match c.error.take() {
            Some(e) => Err(GuestError::new("resuming the mock vCPUs", e)),
            None => Ok(()),
        }
    }

    fn is_running(&self) -> bool {
        let c = lock(&self.shared.control);
        !c.paused && c.exited == 0 && c.error.is_none() && !self.shared.stop.load(Ordering::Relaxed)
    }

    fn figures(&self) -> Vec<VcpuFigures> {
        let s = &*self.shared;
        s.figures
            .iter()
            .enumerate()
            .map(|(i, f)| VcpuFigures {
                writes: f.writes.load(Ordering::Relaxed),
                ring_full_exits: f.ring_full_exits.load(Ordering::Relaxed),
                throttled_exits: s.throttle.throttled_exits(i),
                throttle_ms: s.throttle.slept(i).as_millis() as u64,
            })
            .collect()
    }

    fn shutdown(&mut self) -> Result<(), GuestError> {
        let s = &*self.shared;
        s.stop.store(true, Ordering::Relaxed);
        {
            let mut c = lock(&s.control);
            c.paused = false;
            s.wake.notify_all();
        }
        let mut failed = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                failed = Some("a mock vCPU thread panicked".to_owned());
            }
        }
        match failed.or_else(|| lock(&s.control).error.take()) {
            Some(e) => Err(GuestError::new("stopping the mock vCPUs", e)),
            None => Ok(()),
        }
    }
}

impl Drop for MockGuest {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Locks `m`, recovering the data if a thread panicked while holding it (the counters stay usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
