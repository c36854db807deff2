//! The producer half (hypervisor side): push with release ordering, the soft limit, the hard-full
//! refusal, and the reset walk over consumer-writable memory.
//!
//! Keeps: I4 (a push never overwrites an entry that was not reset; a harvested entry is reset exactly
//! once) and I5 (a reset reads each field of an entry once, validates it against the memslots, walks at
//! most the entries this producer pushed, and always advances, whatever the consumer wrote).

use core::marker::PhantomData;

use crate::addr::{AsId, RingSlot};
use crate::memslot::{Memslot, MemslotSet};
use crate::sync::Ordering;

use super::coalesce::{Coalescer, ReprotectBatch, Window};
use super::{DIRTY_GFN_F_DIRTY, DirtyGfn, RingConfig, RingError, RingFull, RingMemory, is_harvested};

/// What a push left behind.
#[must_use = "at the soft limit the vCPU must exit to the VMM (KVM_EXIT_DIRTY_RING_FULL) before it runs again"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Below the soft limit: the vCPU may keep running.
    Room,
    /// The ring holds [`RingConfig::soft_limit`] entries or more: the vCPU must exit before it enters
    /// the guest again (KVM's `KVM_REQ_DIRTY_RING_SOFT_FULL`, reported as `KVM_EXIT_DIRTY_RING_FULL`),
    /// and stay out while [`DirtyRingProducer::is_soft_full`] holds.
    SoftFull,
}

impl PushOutcome {
    /// Whether the vCPU must exit.
    #[must_use]
    #[inline]
    pub const fn is_soft_full(self) -> bool {
        matches!(self, PushOutcome::SoftFull)
    }
}

/// What one reset did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResetStats {
    /// Entries freed: KVM's return value. Includes invalid ones.
    pub reset: u32,
    /// Entries freed but not re-protected, because their slot or offset named no page of a memslot.
    pub invalid: u32,
    /// Batches handed to [`ResetTarget::reprotect`].
    pub batches: u32,
}

/// What a reset needs from the MMU (KVM's `kvm_reset_dirty_gfn`: `id_to_memslot`, then
/// `kvm_arch_mmu_enable_log_dirty_pt_masked`). One object gives both, so that an MMU guard can look slots
/// up and re-protect without two borrows; [`DirtyRingProducer::reset_with`] wraps a [`MemslotSet`] and a
/// closure instead.
pub trait ResetTarget {
    /// The memslot `slot` names, if it exists. Called only with an address space below
    /// [`AsId::MAX_COUNT`]. The memslots must not change while a reset runs.
    fn memslot(&self, slot: RingSlot) -> Option<Memslot>;
    /// Re-protects `batch`'s pages, so that the guest's next write to each is caught and logged again.
    /// The batch names only pages inside its memslot. A TLB flush this needs is the target's to collect.
    fn reprotect(&mut self, batch: ReprotectBatch);
}

/// The producer half of a dirty ring: KVM's `struct kvm_dirty_ring` and its push and reset.
///
/// Its indices are free-running `u32`s kept here, never in the shared memory: `dirty_index` counts
/// pushes, `reset_index` resets, and `dirty_index - reset_index` (wrapping) is the number of entries in
/// use, never above [`RingConfig::entries`]. `push` and `reset` take `&mut self`: one owner runs both, so
/// a host that resets from another thread than the vCPU's puts the producer behind a lock.
///
/// The entries live in `M` ([`RingMemory`]): by default a slice borrowed for the producer's lifetime
/// `'a` ([`new`](DirtyRingProducer::new), [`resume`](DirtyRingProducer::resume)); or a `Box` or `Arc` the
/// producer holds ([`with_memory`](DirtyRingProducer::with_memory)), so that it can be stored for as
/// long as the ring exists, beside the consumer, without being made again for every push.
///
/// The struct is aligned to 128 bytes (two cache lines, the unit x86's adjacent-line prefetcher pulls;
/// crossbeam's `CachePadded` pads to it on x86-64) so that its indices, written at every push, never
/// share a line with a [`DirtyRingConsumer`](super::DirtyRingConsumer) or another vCPU's producer that
/// happen to sit next to it in memory: each such write would otherwise pull the line away from the
/// other core. Two halves declared side by side on one stack shared a line or not depending on where
/// the stack started (randomised per process), which made two-thread figures differ from run to run.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
/// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PushOutcome, RingConfig};
/// use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
///
/// let mut slots = MemslotSet::new(Gfn(1 << 36));
/// slots.insert(Memslot::new(AsId(0), SlotId(3), Gfn(0x1000), 512, 0, SlotFlags::LOG_DIRTY))?;
/// let cfg = RingConfig::new(256, 0)?; // 256 entries, the soft limit at 256 - 64
/// let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
/// let mut producer = DirtyRingProducer::new(&ring, cfg)?;
/// let mut consumer = DirtyRingConsumer::new(&ring, cfg)?;
///
/// // The vCPU dirties pages 5, 6 and 70 of slot 3.
/// let slot = RingSlot::new(AsId(0), SlotId(3));
/// for offset in [5, 6, 70] {
///     assert_eq!(producer.push(slot, offset), Ok(PushOutcome::Room));
/// }
/// // The VMM harvests them and marks them for reset ...
/// assert_eq!(consumer.harvest(usize::MAX, |_| {}), 3);
/// // ... and the producer re-protects them, coalesced per slot into (offset, mask) batches.
/// let mut batches = Vec::new();
/// let stats = producer.reset_with(&slots, |b| batches.push((b.offset(), b.mask())));
/// assert_eq!(batches, [(5, 0b11), (70, 1)]);
/// assert_eq!((stats.reset, stats.invalid, stats.batches), (3, 0, 2));
/// assert!(producer.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[repr(align(128))]
pub struct DirtyRingProducer<'a, M: RingMemory = &'a [DirtyGfn]> {
    ring: M,
    cfg: RingConfig,
    dirty_index: u32,
    reset_index: u32,
    borrow: PhantomData<&'a [DirtyGfn]>,
}

impl<'a> DirtyRingProducer<'a> {
    /// A producer for a fresh ring: zeroes every entry and starts both indices at 0 (KVM's
    /// `kvm_dirty_ring_alloc` over `vzalloc`ed memory).
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless `ring` has `cfg.entries()` entries; the memory is untouched.
    pub fn new(ring: &'a [DirtyGfn], cfg: RingConfig) -> Result<Self, RingError> {
        DirtyRingProducer::with_memory(ring, cfg)
    }

    /// A producer that takes over a ring in use, with the indices a previous producer left (after a
    /// restore or a migration of the hypervisor's state). The memory is not touched.
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless `ring` has `cfg.entries()` entries;
    /// [`RingError::BadIndices`] if `dirty_index - reset_index` (wrapping) exceeds the ring.
    pub const fn resume(
        ring: &'a [DirtyGfn],
        cfg: RingConfig,
        dirty_index: u32,
        reset_index: u32,
    ) -> Result<Self, RingError> {
        if let Err(e) = cfg.check_len(ring) {
            return Err(e);
        }
        if dirty_index.wrapping_sub(reset_index) > cfg.entries() {
            return Err(RingError::BadIndices { dirty_index, reset_index, entries: cfg.entries() });
        }
        Ok(DirtyRingProducer { ring, cfg, dirty_index, reset_index, borrow: PhantomData })
    }
}

impl<'a, M: RingMemory> DirtyRingProducer<'a, M> {
    /// [`DirtyRingProducer::new`] over memory the producer holds (`Box<[DirtyGfn]>`, or an
    /// `Arc<[DirtyGfn]>` shared with the consumer; see [`RingMemory`]): zeroes every entry and starts
    /// both indices at 0.
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless the memory has `cfg.entries()` entries; it is untouched.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, RingSlot, SlotId};
    /// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingProducer, RingConfig};
    /// let cfg = RingConfig::new(256, 0)?;
    /// let memory: Box<[DirtyGfn]> = (0..256).map(|_| DirtyGfn::zeroed()).collect();
    /// let mut producer = DirtyRingProducer::with_memory(memory, cfg)?; // owns the ring, no lifetime to carry
    /// let _ = producer.push(RingSlot::new(AsId(0), SlotId(0)), 1)?;
    /// assert_eq!(producer.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_memory(ring: M, cfg: RingConfig) -> Result<Self, RingError> {
        cfg.check_len(ring.entries())?;
        for entry in ring.entries() {
            // Relaxed: nothing is published yet. A consumer is handed the ring after this (by a thread
            // spawn or a mapping made later), which orders these stores before its first Acquire load.
            entry.flags.store(0, Ordering::Relaxed);
            entry.slot.store(0, Ordering::Relaxed);
            entry.offset.store(0, Ordering::Relaxed);
        }
        Ok(DirtyRingProducer { ring, cfg, dirty_index: 0, reset_index: 0, borrow: PhantomData })
    }

    /// [`DirtyRingProducer::resume`] over memory the producer holds.
    ///
    /// # Errors
    /// As [`DirtyRingProducer::resume`].
    pub fn resume_with_memory(
        ring: M,
        cfg: RingConfig,
        dirty_index: u32,
        reset_index: u32,
    ) -> Result<Self, RingError> {
        cfg.check_len(ring.entries())?;
        if dirty_index.wrapping_sub(reset_index) > cfg.entries() {
            return Err(RingError::BadIndices { dirty_index, reset_index, entries: cfg.entries() });
        }
        Ok(DirtyRingProducer { ring, cfg, dirty_index, reset_index, borrow: PhantomData })
    }

    /// Records that page `offset` of memslot `slot` was dirtied (KVM's `kvm_dirty_ring_push`).
    ///
    /// Writes `slot` and `offset` into the entry at `dirty_index`, then publishes it by storing
    /// [`DIRTY_GFN_F_DIRTY`](super::DIRTY_GFN_F_DIRTY) with release ordering.
    ///
    /// # Errors
    /// [`RingFull`] when every entry is in use (pushed and not reset): nothing is written and no entry
    /// changes. KVM only warns here and overwrites; see [`RingFull`] for what the caller owes instead.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, RingSlot, SlotId};
    /// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingProducer, PushOutcome, RingConfig, RingFull};
    ///
    /// let cfg = RingConfig::new(256, 0)?; // soft limit 192
    /// let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
    /// let mut producer = DirtyRingProducer::new(&ring, cfg)?;
    /// let slot = RingSlot::new(AsId(0), SlotId(0));
    /// let outcomes: Vec<PushOutcome> = (0..256).map(|o| producer.push(slot, o)).collect::<Result<_, _>>()?;
    /// assert!(outcomes[..191].iter().all(|o| *o == PushOutcome::Room));
    /// assert!(outcomes[191..].iter().all(|o| o.is_soft_full())); // the 192nd push asks the vCPU to exit
    /// assert_eq!(producer.push(slot, 256), Err(RingFull { entries: 256 })); // nothing is overwritten
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn push(&mut self, slot: RingSlot, offset: u64) -> Result<PushOutcome, RingFull> {
        let used = self.len();
        if used >= self.cfg.entries() {
            return Err(RingFull { entries: self.cfg.entries() });
        }
        let entry = self.entry(self.dirty_index);
        // Relaxed: the consumer reads these only after its Acquire load of `flags` sees the Release
        // store below.
        entry.slot.store(slot.raw(), Ordering::Relaxed);
        entry.offset.store(offset, Ordering::Relaxed);
        // Release: publishes the two stores above; pairs with the consumer's Acquire load of `flags` in
        // `DirtyRingConsumer::pop` (KVM: the `smp_wmb` before `kvm_dirty_gfn_set_dirtied`).
        entry.flags.store(DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index = self.dirty_index.wrapping_add(1);
        // `used + 1` is now `self.len()`, at most `entries`: no overflow.
        Ok(if used + 1 >= self.cfg.soft_limit() { PushOutcome::SoftFull } else { PushOutcome::Room })
    }

    /// Frees the entries the consumer harvested and re-protects their pages (KVM's
    /// `kvm_dirty_ring_reset`), for an MMU that implements [`ResetTarget`].
    ///
    /// Walks from `reset_index` while the entry's flags (acquire-loaded) have
    /// [`DIRTY_GFN_F_RESET`](super::DIRTY_GFN_F_RESET) set, and never past `dirty_index`: a reset does at
    /// most [`RingConfig::entries`] steps, and RESET bits a consumer sets on entries this producer did
    /// not push are ignored. Each entry's slot and offset are read once; the entry is freed and the index
    /// advanced whether or not they are valid. Valid pages are coalesced into batches per memslot (see
    /// [`ReprotectBatch`]); invalid ones (address space out of range, no such slot, offset not below the
    /// slot's pages) are counted in [`ResetStats::invalid`] and dropped.
    ///
    /// The caller owes whatever flush the target collected before the VMM reads the pages' contents.
    pub fn reset(&mut self, target: &mut impl ResetTarget) -> ResetStats {
        let mut stats = ResetStats::default();
        let mut batch = Coalescer::new();
        // The pending batch's fast-path state, in locals (registers) for the loop; see `Window`.
        let mut window = Window::EMPTY;
        // A borrow of the `ring` field only, so that `reset_index` can be stored while it is held.
        let (ring, cfg) = (self.ring.entries(), self.cfg);
        let start = self.reset_index;
        // The bound: only entries this producer pushed and has not reset, at most `entries` of them.
        let end = self.dirty_index;
        let mut index = start;
        while index != end {
            // In bounds: see `DirtyRingProducer::entry`.
            let entry = &ring[cfg.position(index)];
            // Acquire: pairs with the consumer's Release store of RESET in `DirtyRingConsumer::pop`: its
            // reads of this entry's slot and offset happen before this producer reuses the entry, so they
            // never return a later push's values.
            if !is_harvested(entry.flags.load(Ordering::Acquire)) {
                break;
            }
            // Untrusted (consumer-writable): each field is read once, into a local, and validated below.
            let slot = entry.slot.load(Ordering::Relaxed);
            let offset = entry.offset.load(Ordering::Relaxed);
            // Release: pairs with the consumer's Acquire load of `flags` in `DirtyRingConsumer::pop`: a
            // consumer that sees the entry free knows the two reads above are done, so nothing it writes
            // to the entry afterwards changes what this reset re-protects (KVM's
            // `kvm_dirty_gfn_set_invalid` uses `smp_store_release` for the same reason).
            entry.flags.store(0, Ordering::Release);
            index = index.wrapping_add(1);
            // The common case: the page is in the pending batch's memslot and 64-page window, which is
            // the whole validation such an entry needs (same slot, offset below the slot's pages).
            if window.try_add(slot, offset) {
                continue;
            }
            // Everything else: validate against the memslots, coalesce, maybe hand a batch over. The
            // index is stored first, so that even a re-protect that unwinds leaves `reset_index` past
            // every entry this reset freed (the loop keeps it in a local otherwise).
            self.reset_index = index;
            window = reset_checked(&mut batch, window, RingSlot::from_raw(slot), offset, target, &mut stats);
        }
        self.reset_index = index;
        stats.reset = index.wrapping_sub(start);
        batch.absorb(window);
        if let Some(done) = batch.finish() {
            stats.batches += 1;
            target.reprotect(done);
        }
        stats
    }

    /// [`DirtyRingProducer::reset`] against `slots`, handing each batch to `reprotect`.
    pub fn reset_with(&mut self, slots: &MemslotSet, reprotect: impl FnMut(ReprotectBatch)) -> ResetStats {
        self.reset(&mut SlotsAndFn { slots, reprotect })
    }

    /// Entries pushed and not yet reset.
    #[must_use]
    #[inline]
    pub const fn len(&self) -> u32 {
        self.dirty_index.wrapping_sub(self.reset_index)
    }

    /// Whether every pushed entry was reset.
    #[must_use]
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the vCPU must stay out of the guest: at least [`RingConfig::soft_limit`] entries in use
    /// (KVM's `kvm_dirty_ring_soft_full`).
    #[must_use]
    #[inline]
    pub const fn is_soft_full(&self) -> bool {
        self.len() >= self.cfg.soft_limit()
    }

    /// Whether a push would be refused: every entry in use.
    #[must_use]
    #[inline]
    pub const fn is_full(&self) -> bool {
        self.len() >= self.cfg.entries()
    }

    /// The free-running index of the next push (save it with [`DirtyRingProducer::reset_index`] to
    /// [`resume`](DirtyRingProducer::resume) later).
    #[must_use]
    #[inline]
    pub const fn dirty_index(&self) -> u32 {
        self.dirty_index
    }

    /// The free-running index of the next entry to reset.
    #[must_use]
    #[inline]
    pub const fn reset_index(&self) -> u32 {
        self.reset_index
    }

    /// The ring's geometry.
    #[must_use]
    #[inline]
    pub const fn config(&self) -> RingConfig {
        self.cfg
    }

    #[inline]
    fn entry(&self, index: u32) -> &DirtyGfn {
        // In bounds: `position` masks the index below `entries`, and the constructors checked that the
        // memory has exactly `entries` entries (its length cannot change: `RingMemory` is sealed).
        &self.ring.entries()[self.cfg.position(index)]
    }
}

/// The reset's checked path for one entry that did not join the pending batch in place: looks its
/// memslot up (or reuses the pending batch's), validates slot and offset against it, coalesces the page
/// or counts it invalid, and returns the new pending batch's [`Window`]. Takes `window`'s mask back
/// first, so the batch it may hand over is complete.
fn reset_checked(
    batch: &mut Coalescer,
    window: Window,
    slot: RingSlot,
    offset: u64,
    target: &mut impl ResetTarget,
    stats: &mut ResetStats,
) -> Window {
    batch.absorb(window);
    let memslot = match batch.pending_memslot(slot) {
        Some(pending) => Some(*pending),
        None if slot.as_id().0 < AsId::MAX_COUNT => target.memslot(slot),
        None => None,
    };
    match memslot {
        Some(memslot) if is_in_slot(&memslot, slot, offset) => {
            if let Some(done) = batch.add(&memslot, offset) {
                stats.batches += 1;
                target.reprotect(done);
            }
        }
        _ => stats.invalid += 1,
    }
    batch.window()
}

/// Whether `slot` really is `memslot` and page `offset` lies inside it (KVM: `offset < npages`).
fn is_in_slot(memslot: &Memslot, slot: RingSlot, offset: u64) -> bool {
    memslot.as_id == slot.as_id() && memslot.id == slot.id() && offset < memslot.pages
}

struct SlotsAndFn<'s, F> {
    slots: &'s MemslotSet,
    reprotect: F,
}

impl<F: FnMut(ReprotectBatch)> ResetTarget for SlotsAndFn<'_, F> {
    fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
        self.slots.get(slot.as_id(), slot.id()).copied()
    }
    fn reprotect(&mut self, batch: ReprotectBatch) {
        (self.reprotect)(batch);
    }
}
