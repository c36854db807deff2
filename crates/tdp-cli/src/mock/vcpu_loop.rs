//! The mock vCPU's "guest program" and its dirty sink: batches of 8-byte writes of an iteration number
//! into pages picked by the pattern, then its batch count into its page of the control memslot, a batch
//! exit after each batch (pause, stop, pacing to the target
//! rate, and in bitmap mode the throttle), and in ring mode a ring-full exit whenever the vCPU's ring
//! reached its soft limit (harvest and reset its own ring, then the throttle), as a VMM's vCPU thread
//! handles `KVM_EXIT_DIRTY_RING_FULL`.
//!
//! Keeps: I4 (a vCPU never writes with its ring soft-full, so no push is refused).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tdp_core::addr::{Gfn, Gpa, RingSlot};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::Memslot;
use tdp_mock::Vcpu;

use super::{Shared, Tracker, lock};
use crate::converge::Pacer;
use crate::guest::{GuestConfig, Pattern};

/// Writes per batch (one "exit" per batch).
pub(crate) const BATCH: u64 = 64;

/// A vCPU's dirty sink: its ring, or the shared bitmap.
pub(crate) struct Sink {
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpu: usize,
}

impl DirtySink for Sink {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        let offset = slot.offset_of(gfn);
        match &self.shared.tracker {
            Tracker::Bitmap { bitmaps, .. } => {
                // The MMU marks only offsets inside the logged slots; a refusal would be a model bug and
                // is visible as a digest mismatch, so it is not hidden but cannot be reported from here.
                if let Some((_, bitmap)) = bitmaps.iter().find(|(id, _)| *id == slot.id) {
                    let _ = bitmap.mark(offset);
                }
            }
            Tracker::Rings(rings) => {
                let Some(ring) = rings.get(self.vcpu) else { return };
                let mut r = lock(ring);
                let r = &mut *r;
                match r.producer.push(RingSlot::new(slot.as_id, slot.id), offset) {
                    Ok(outcome) => r.soft_full |= outcome.is_soft_full(),
                    Err(_) => r.refused += 1,
                }
            }
        }
    }
}

/// The page picker of one vCPU.
struct Picker {
    pattern: Pattern,
    pages: u64,
    next: u64,
    rng: u64,
}

impl Picker {
    fn new(pattern: Pattern, pages: u64, vcpu: usize, vcpus: usize) -> Picker {
        let start = pages / vcpus.max(1) as u64 * vcpu as u64;
        Picker { pattern, pages, next: start, rng: 0x9e37_79b9_7f4a_7c15 ^ (vcpu as u64 + 1) << 32 }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pick(&mut self) -> u64 {
        match self.pattern {
            Pattern::Sequential => {
                let p = self.next % self.pages;
                self.next = self.next.wrapping_add(1);
                p
            }
            Pattern::Random => self.rand() % self.pages,
            Pattern::HotSet => {
                let hot = (self.pages / 8).max(1);
                if self.rand() % 10 < 9 { self.rand() % hot } else { self.rand() % self.pages }
            }
        }
    }
}

/// The vCPU thread: runs batches until told to stop, recording a failure in the shared control block.
pub(crate) fn run(s: &Shared, mut vcpu: Vcpu, index: usize, cfg: GuestConfig) {
    let mut picker = Picker::new(cfg.pattern, s.slot.pages, index, cfg.vcpus);
    let per_vcpu_rate = cfg.rate_pages.div_ceil(cfg.vcpus.max(1) as u64);
    let mut pacer = Pacer::new();
    let (mut started, mut paced) = (Instant::now(), 0u64);
    let mut slept_before = Duration::ZERO;
    let mut written = 0u64;
    let mut written_at_exit = 0u64;
    let mut iteration = 0u64;
    let mut batches = 0u64;
    // This vCPU's page of the control memslot.
    let control = Gfn(s.control_slot.base_gfn.0 + index as u64 % s.control_slot.pages).gpa();
    let result = loop {
        if s.stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if !park_if_paused(s) {
            break Ok(());
        }
        let batch = (0..BATCH).try_for_each(|_| {
            iteration += 1;
            let page = picker.pick();
            let words = if cfg.fill { 0..512 } else { index as u64 % 512..index as u64 % 512 + 1 };
            let _in_flight = s.in_flight.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            words.into_iter().try_for_each(|w| {
                let gpa = Gpa(Gfn(page).gpa().0 + 8 * w);
                vcpu.write_u64(s.machine.mmu(), gpa, iteration ^ w).map(|_| ())
            })
        });
        let batch = batch.and_then(|()| {
            batches += 1;
            let _in_flight = s.in_flight.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            vcpu.write_u64(s.machine.mmu(), control, batches).map(|_| ())
        });
        if let Err(e) = batch {
            break Err(format!("mock vCPU {index}: a guest write failed: {e}"));
        }
        written += BATCH;
        s.figures[index].writes.fetch_add(BATCH, Ordering::Relaxed);
        // Ring-full exit: harvest and reset this vCPU's own ring before it writes again.
        if ring_soft_full(s, index) {
            let mut early = lock(&s.early);
            let entries = s.harvest_ring(index, &mut early);
            drop(early);
            s.figures[index].ring_full_exits.fetch_add(1, Ordering::Relaxed);
            s.figures[index].early_entries.fetch_add(entries, Ordering::Relaxed);
            // Every page written since the last exit counts against the quota (collects by the
            // migration thread took some of them from the ring).
            s.throttle.pace(index, &mut pacer, written - written_at_exit);
            written_at_exit = written;
        } else if matches!(s.tracker, Tracker::Bitmap { .. }) {
            s.throttle.pace(index, &mut pacer, BATCH);
        }
        // Time asleep in the throttle is not owed to the workload afterwards: no catch-up burst.
        let slept = s.throttle.slept(index);
        if slept != slept_before {
            slept_before = slept;
            (started, paced) = (Instant::now(), 0);
        }
        // The workload's own rate: sleep until the pages written are due.
        paced += BATCH;
        if per_vcpu_rate > 0 {
            let due = Duration::from_secs_f64(paced as f64 / per_vcpu_rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
            }
        }
    };
    vcpu.release(s.machine.mmu());
    let mut c = lock(&s.control);
    c.exited += 1;
    if let Err(e) = result {
        c.error.get_or_insert(e);
    }
    s.wake.notify_all();
}

fn ring_soft_full(s: &Shared, index: usize) -> bool {
    match &s.tracker {
        Tracker::Rings(rings) => rings.get(index).is_some_and(|r| lock(r).soft_full),
        Tracker::Bitmap { .. } => false,
    }
}

/// Parks while paused; returns false if the guest is stopping.
fn park_if_paused(s: &Shared) -> bool {
    let mut c = lock(&s.control);
    if c.paused {
        c.parked += 1;
        s.wake.notify_all();
        while c.paused && !s.stop.load(Ordering::Relaxed) {
            c = s.wake.wait(c).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        c.parked -= 1;
    }
    !s.stop.load(Ordering::Relaxed)
}
