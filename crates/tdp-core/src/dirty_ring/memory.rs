//! [`RingMemory`]: what the ring's halves keep their entries in. A borrowed slice (KVM's mapping, a
//! test's `Vec`), or memory a half owns (`Box<[DirtyGfn]>`) or shares with the other half
//! (`Arc<[DirtyGfn]>`), so that a half can live as long as its memory inside one struct, with no
//! re-creation per push.
//!
//! The trait is sealed: the halves index the entries on the length checked when they were made, so the
//! memory must keep that length for as long as they hold it, which these three types guarantee.
//!
//! Keeps: I5 (every index into the memory stays below the length checked at construction).

use alloc::boxed::Box;
use alloc::sync::Arc;

use super::DirtyGfn;

mod sealed {
    pub trait Sealed {}
}

/// Memory holding a ring's entries, for [`DirtyRingProducer`](super::DirtyRingProducer) and
/// [`DirtyRingConsumer`](super::DirtyRingConsumer): `&[DirtyGfn]`, `Box<[DirtyGfn]>` or
/// `Arc<[DirtyGfn]>` (sealed: their length cannot change while a half holds them).
///
/// ```
/// use std::sync::Arc;
/// use tdp_core::addr::{AsId, RingSlot, SlotId};
/// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
///
/// // Both halves share one allocation and can be stored side by side, for as long as needed.
/// let cfg = RingConfig::new(256, 0)?;
/// let ring: Arc<[DirtyGfn]> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
/// let mut producer = DirtyRingProducer::with_memory(Arc::clone(&ring), cfg)?;
/// let mut consumer = DirtyRingConsumer::with_memory(ring, cfg)?;
/// let _ = producer.push(RingSlot::new(AsId(0), SlotId(1)), 7)?;
/// assert_eq!(consumer.pop().map(|e| e.offset), Some(7));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait RingMemory: sealed::Sealed {
    /// The entries.
    fn entries(&self) -> &[DirtyGfn];
}

impl sealed::Sealed for &[DirtyGfn] {}
impl RingMemory for &[DirtyGfn] {
    #[inline]
    fn entries(&self) -> &[DirtyGfn] {
        self
    }
}

impl sealed::Sealed for Box<[DirtyGfn]> {}
impl RingMemory for Box<[DirtyGfn]> {
    #[inline]
    fn entries(&self) -> &[DirtyGfn] {
        self
    }
}

impl sealed::Sealed for Arc<[DirtyGfn]> {}
impl RingMemory for Arc<[DirtyGfn]> {
    #[inline]
    fn entries(&self) -> &[DirtyGfn] {
        self
    }
}
