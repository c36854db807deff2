//! Where the I4 workload's dirty marks go and how a harvest collects and re-protects them: a recording
//! list, per-slot `DirtyBitmap`s (get-and-clear or manual protect), or a `DirtyRingProducer` per vCPU
//! whose soft-full makes the vCPU "exit" and harvest its own ring mid-round, as a VMM does on
//! `KVM_EXIT_DIRTY_RING_FULL`.
//!
//! Checks: nothing by itself; it counts ring pushes refused as hard-full ([`Marks::refused`]), which
//! would be lost marks (I4), and soft-full exits, so the tests can show the ring path ran.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tdp_core::addr::{Gfn, RingSlot, SlotId};
use tdp_core::dirty_bitmap::DirtyBitmap;
use tdp_core::dirty_ring::{
    DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, ReprotectBatch, ResetTarget, RingConfig,
};
use tdp_core::flush::Flush;
use tdp_core::host::DirtySink;
use tdp_core::memslot::Memslot;
use tdp_core::mmu::{ExclusiveMmu, Mmu};
use tdp_mock::MockHost;
use tdp_mock::checker::DirtyPage;

/// How a run tracks dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracker {
    /// A shared list, harvested by taking it and re-protecting with `reprotect_dirty`.
    Recorder,
    /// One `DirtyBitmap` per slot, harvested with `get_and_clear` (classic `KVM_GET_DIRTY_LOG`).
    Bitmap,
    /// One `DirtyBitmap` per slot, harvested with `get` then `clear` (manual protect).
    ManualProtect,
    /// A `DirtyRingProducer` per vCPU (KVM's smallest rings), harvested through a consumer and reset.
    Ring,
}

/// The marks of one run, shared by the vCPUs' sinks and the harvester.
#[derive(Clone)]
pub struct Marks(Arc<Inner>);

enum Inner {
    Recorder(Mutex<Vec<DirtyPage>>),
    Bitmaps { maps: BTreeMap<SlotId, DirtyBitmap>, manual: bool },
    Rings(Rings),
}

struct Rings {
    per_vcpu: Vec<Mutex<VcpuRing>>,
    /// Pages harvested by soft-full exits since the last full harvest.
    early: Mutex<BTreeSet<DirtyPage>>,
    soft_full_exits: AtomicU64,
    refused: AtomicU64,
}

/// One vCPU's ring memory and both halves' indices (the halves borrow the memory, so they are rebuilt
/// around it with `resume` for each operation).
struct VcpuRing {
    ring: Box<[DirtyGfn]>,
    cfg: RingConfig,
    dirty_index: u32,
    reset_index: u32,
    fetch_index: u32,
    soft_full: bool,
}

impl Marks {
    /// Marks for `slots` and `vcpus` vCPUs. Rings are KVM-sized: 256 entries, or 1024 when a PML log of
    /// 512 entries is drained into them (the reserve must absorb a whole drain).
    pub fn new(tracker: Tracker, slots: &[Memslot], vcpus: usize, pml: bool) -> Marks {
        Marks(Arc::new(match tracker {
            Tracker::Recorder => Inner::Recorder(Mutex::default()),
            Tracker::Bitmap | Tracker::ManualProtect => Inner::Bitmaps {
                maps: slots
                    .iter()
                    .map(|s| (s.id, DirtyBitmap::new(s.pages, false).expect("memory")))
                    .collect(),
                manual: tracker == Tracker::ManualProtect,
            },
            Tracker::Ring => {
                let cfg = if pml { RingConfig::new(1024, PML_ENTRIES) } else { RingConfig::new(256, 0) };
                let cfg = cfg.expect("a valid ring");
                let per_vcpu = (0..vcpus)
                    .map(|_| {
                        let ring: Box<[DirtyGfn]> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
                        DirtyRingProducer::new(&ring, cfg).expect("ring length");
                        let state = VcpuRing {
                            ring,
                            cfg,
                            dirty_index: 0,
                            reset_index: 0,
                            fetch_index: 0,
                            soft_full: false,
                        };
                        Mutex::new(state)
                    })
                    .collect();
                let (early, soft_full_exits, refused) =
                    (Mutex::default(), AtomicU64::new(0), AtomicU64::new(0));
                Inner::Rings(Rings { per_vcpu, early, soft_full_exits, refused })
            }
        }))
    }

    /// The dirty sink of vCPU `vcpu`.
    pub fn sink(&self, vcpu: usize) -> Box<dyn DirtySink + Send> {
        Box::new(Sink { marks: self.clone(), vcpu })
    }

    /// Called by vCPU `vcpu`'s thread after each access: if its ring is soft-full it "exits", and the
    /// VMM harvests and resets that ring before it runs again.
    pub fn after_access(&self, vcpu: usize, mmu: &Mmu<MockHost>) {
        let Inner::Rings(rings) = &*self.0 else { return };
        let mut ring = rings.per_vcpu[vcpu].lock().expect("ring");
        if !ring.soft_full {
            return;
        }
        let mut pages = BTreeSet::new();
        harvest_ring(&mut ring, mmu, &mut pages).run(mmu.host());
        ring.soft_full = false;
        drop(ring);
        rings.early.lock().expect("early").extend(pages);
        rings.soft_full_exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Collects every mark made since the last harvest (including early ring harvests) and re-protects
    /// the pages, running the flush owed. Call with the vCPUs stopped and their PML logs drained.
    pub fn harvest(&self, mmu: &Mmu<MockHost>) -> BTreeSet<DirtyPage> {
        let mut pages = BTreeSet::new();
        let flush = match &*self.0 {
            Inner::Recorder(list) => {
                pages.extend(std::mem::take(&mut *list.lock().expect("recorder")));
                let mut masks: BTreeMap<(SlotId, u64), u64> = BTreeMap::new();
                for &(id, off) in &pages {
                    *masks.entry((id, off & !63)).or_default() |= 1 << (off & 63);
                }
                let mut w = mmu.write();
                masks.iter().fold(Flush::none(), |f, (&(id, base), &mask)| {
                    f.merge(w.reprotect_dirty(tdp_core::addr::AsId(0), id, base, mask))
                })
            }
            Inner::Bitmaps { maps, manual } => {
                let mut flush = Flush::none();
                for (&id, bitmap) in maps {
                    let mut out = vec![0u64; bitmap.words()];
                    let mut w = mmu.write();
                    let reprotect = |base, mask| w.reprotect_dirty(tdp_core::addr::AsId(0), id, base, mask);
                    flush = flush.merge(if *manual {
                        bitmap.get(&mut out).expect("buffer fits");
                        let n = u32::try_from(bitmap.pages()).expect("small slot");
                        bitmap.clear(0, n, &out, reprotect).expect("a whole-slot clear is valid")
                    } else {
                        bitmap.get_and_clear(&mut out, reprotect).expect("buffer fits")
                    });
                    pages.extend(set_bits(&out).map(|off| (id, off)));
                }
                flush
            }
            Inner::Rings(rings) => {
                pages.extend(std::mem::take(&mut *rings.early.lock().expect("early")));
                let mut flush = Flush::none();
                for ring in &rings.per_vcpu {
                    flush = flush.merge(harvest_ring(&mut ring.lock().expect("ring"), mmu, &mut pages));
                }
                flush
            }
        };
        flush.run(mmu.host());
        pages
    }

    /// Soft-full exits taken so far (0 unless the tracker is [`Tracker::Ring`]).
    pub fn soft_full_exits(&self) -> u64 {
        match &*self.0 {
            Inner::Rings(r) => r.soft_full_exits.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Pushes refused because a ring was completely full: each one is a lost mark.
    pub fn refused(&self) -> u64 {
        match &*self.0 {
            Inner::Rings(r) => r.refused.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

/// One vCPU's sink.
struct Sink {
    marks: Marks,
    vcpu: usize,
}

impl DirtySink for Sink {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: tdp_core::host::DirtySource) {
        let offset = slot.offset_of(gfn);
        match &*self.marks.0 {
            Inner::Recorder(list) => list.lock().expect("recorder").push((slot.id, offset)),
            Inner::Bitmaps { maps, .. } => {
                let bitmap = maps.get(&slot.id).expect("a bitmap per logged slot");
                bitmap.mark(offset).expect("the MMU marks only offsets inside the slot");
            }
            Inner::Rings(rings) => {
                let mut r = rings.per_vcpu[self.vcpu].lock().expect("ring");
                let (pushed, dirty_index) = {
                    let mut p = DirtyRingProducer::resume(&r.ring, r.cfg, r.dirty_index, r.reset_index)
                        .expect("the indices this test keeps");
                    (p.push(RingSlot::new(slot.as_id, slot.id), offset), p.dirty_index())
                };
                r.dirty_index = dirty_index;
                match pushed {
                    Ok(outcome) => r.soft_full |= outcome.is_soft_full(),
                    Err(_) => {
                        rings.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Harvests one ring through a consumer into `pages`, then resets it with `reprotect_dirty` as the
/// re-protect target. Returns the flush the reset owes.
fn harvest_ring(r: &mut VcpuRing, mmu: &Mmu<MockHost>, pages: &mut BTreeSet<DirtyPage>) -> Flush {
    let mut consumer = DirtyRingConsumer::resume(&r.ring, r.cfg, r.fetch_index).expect("ring length");
    consumer.harvest(usize::MAX, |e| {
        pages.insert((e.slot.id(), e.offset));
    });
    r.fetch_index = consumer.fetch_index();
    let mut producer =
        DirtyRingProducer::resume(&r.ring, r.cfg, r.dirty_index, r.reset_index).expect("ring indices");
    let mut target = MmuTarget { w: mmu.write(), flush: Flush::none() };
    producer.reset(&mut target);
    r.reset_index = producer.reset_index();
    target.flush
}

/// The MMU as a ring reset's target: slot lookup and `reprotect_dirty` under one write guard.
struct MmuTarget<'a> {
    w: ExclusiveMmu<'a, MockHost, spin::RwLock<()>>,
    flush: Flush,
}

impl ResetTarget for MmuTarget<'_> {
    fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
        self.w.memslots().get(slot.as_id(), slot.id()).copied()
    }
    fn reprotect(&mut self, batch: ReprotectBatch) {
        let (as_id, id) = (batch.memslot().as_id, batch.memslot().id);
        let flush = self.w.reprotect_dirty(as_id, id, batch.offset(), batch.mask());
        self.flush = std::mem::replace(&mut self.flush, Flush::none()).merge(flush);
    }
}

fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words
        .iter()
        .enumerate()
        .flat_map(|(w, &bits)| (0..64).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u64 * 64 + b))
}
