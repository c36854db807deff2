//! KVM's dirty ring: a per-vCPU ring of dirtied guest frames, both halves over one shared layout.
//!
//! # The problem
//! A VMM that migrates or snapshots a guest must learn which pages the guest wrote since it last looked.
//! A bitmap per memslot costs a scan of every bit on every pass, however few pages changed. KVM's dirty
//! ring (Linux 5.11, `virt/kvm/dirty_ring.c`) instead records each newly dirtied page as one 16-byte
//! [`DirtyGfn`] in a ring the VMM maps, one ring per vCPU, so the cost of a pass follows the number of
//! pages written.
//!
//! # The protocol
//! Each entry is a small state machine in its `flags` word (`include/uapi/linux/kvm.h`):
//!
//! ```text
//!          push (producer)      harvest (consumer)      reset (producer)
//!   00 ------------------> 01 ------------------> 1X ------------------> 00
//!  free                  dirty                 harvested                free
//! ```
//!
//! - The **producer** ([`DirtyRingProducer`], the hypervisor side: KVM itself, or a bare-metal hypervisor
//!   embedding this crate) pushes `(slot, offset)` at its free-running `dirty_index`, publishing the entry
//!   with a release store of [`DIRTY_GFN_F_DIRTY`]. When the ring holds [`RingConfig::soft_limit`]
//!   entries it tells the vCPU to exit (KVM's `KVM_EXIT_DIRTY_RING_FULL`); the reserve left above the
//!   soft limit absorbs what the vCPU still dirties on its way out (a PML buffer flush). It never
//!   overwrites an entry that has not been reset: a push into a full ring is refused ([`RingFull`]).
//! - The **consumer** ([`DirtyRingConsumer`], the VMM side) harvests entries strictly in order from its
//!   own `fetch_index`, acquire-loading `flags` before it reads `slot` and `offset`, and marks each one
//!   harvested with a release store of [`DIRTY_GFN_F_RESET`]. It stops at the first entry that is not
//!   dirty and never skips one.
//! - **Reset** ([`DirtyRingProducer::reset`], KVM's `KVM_RESET_DIRTY_RINGS`) walks the harvested entries
//!   from `reset_index`, frees them, and hands the pages to a re-protect callback coalesced into
//!   `(offset, 64-bit mask)` batches per memslot, so the next guest write to each page is caught again.
//!   The VMM must reset *before* it reads the contents of the pages it harvested: a write that lands
//!   between the harvest and the re-protection would otherwise be missed (I4).
//!
//! # Trust
//! The two halves do not trust each other equally. The ring memory is writable by the consumer, so the
//! producer treats every byte it reads back as hostile (I5): it reads each field once, checks slot and
//! offset against the memslots before a page is re-protected, counts and skips bad entries, and walks no
//! further than the entries it pushed itself, so a reset does at most one ring's worth of work and a
//! consumer cannot make it loop, reach outside a memslot, or stall it. Its own indices never live in
//! shared memory. The consumer trusts the producer (in a VMM it is the kernel).
//!
//! Keeps: I4 (no harvested entry is lost or reported twice; the soft limit and the hard-full refusal
//! keep a push from overwriting an unharvested entry) and I5 (the producer survives any ring contents).
//! `tests/loom_ring.rs` model-checks the acquire/release protocol on the code in this module.

mod coalesce;
mod config;
mod consumer;
mod memory;
mod producer;

pub use coalesce::ReprotectBatch;
pub use config::{MAX_ENTRIES, MIN_BYTES, PML_ENTRIES, RESERVED_ENTRIES, RingConfig};
pub use consumer::{DirtyEntry, DirtyRingConsumer};
pub use memory::RingMemory;
pub use producer::{DirtyRingProducer, PushOutcome, ResetStats, ResetTarget};

use crate::sync::{AtomicU32, AtomicU64};

/// Entry flag: the producer published this entry and the consumer has not harvested it
/// (`KVM_DIRTY_GFN_F_DIRTY`, bit 0).
pub const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Entry flag: the consumer harvested this entry and it waits for a reset (`KVM_DIRTY_GFN_F_RESET`,
/// bit 1). The producer looks only at this bit when it resets, as KVM does, so a consumer may store
/// either `RESET` or `DIRTY | RESET`.
pub const DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// Every flag bit the ABI defines (`KVM_DIRTY_GFN_F_MASK`).
pub const DIRTY_GFN_F_MASK: u32 = DIRTY_GFN_F_DIRTY | DIRTY_GFN_F_RESET;

/// One ring entry, byte-identical to KVM's `struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; }`
/// (`include/uapi/linux/kvm.h`): 16 bytes, aligned to 8, fields at offsets 0, 4 and 8 (asserted below and
/// compared with `kvm_bindings::kvm_dirty_gfn` in `tests/dirty_ring.rs`).
///
/// The fields are atomics because both halves access the entry concurrently; the fields are public
/// because the memory belongs to neither half and the type guards no invariant: whatever is in it, the
/// producer validates it where it is used. A backend that maps KVM's ring casts its mapping to a
/// `&[DirtyGfn]`; tests and fuzzers may write any value, as a hostile consumer would.
///
/// ```
/// use tdp_core::dirty_ring::DirtyGfn;
/// let ring: Vec<DirtyGfn> = (0..256).map(|_| DirtyGfn::default()).collect();
/// assert_eq!(size_of_val(ring.as_slice()), 4096);
/// ```
#[repr(C)]
#[derive(Debug, Default)]
pub struct DirtyGfn {
    /// State: [`DIRTY_GFN_F_DIRTY`], [`DIRTY_GFN_F_RESET`], or 0 (free).
    pub flags: AtomicU32,
    /// The memslot, `as_id << 16 | id` (see [`crate::addr::RingSlot`]).
    pub slot: AtomicU32,
    /// The page's index within the memslot.
    pub offset: AtomicU64,
}

impl DirtyGfn {
    /// A free entry (all zero), usable in constants and statics.
    #[cfg(not(loom))]
    #[must_use]
    pub const fn zeroed() -> DirtyGfn {
        DirtyGfn { flags: AtomicU32::new(0), slot: AtomicU32::new(0), offset: AtomicU64::new(0) }
    }
    /// A free entry (all zero). Not `const` under loom, whose atomics are not.
    #[cfg(loom)]
    #[must_use]
    pub fn zeroed() -> DirtyGfn {
        DirtyGfn { flags: AtomicU32::new(0), slot: AtomicU32::new(0), offset: AtomicU64::new(0) }
    }
}

// The KVM ABI layout. Loom's atomics are larger than the values they model, so the layout is asserted only
// in builds that can be shared with KVM.
#[cfg(not(loom))]
mod layout {
    use super::DirtyGfn;
    use core::mem::{align_of, offset_of, size_of};
    use static_assertions::const_assert_eq;

    const_assert_eq!(size_of::<DirtyGfn>(), 16);
    const_assert_eq!(align_of::<DirtyGfn>(), 8);
    const_assert_eq!(offset_of!(DirtyGfn, flags), 0);
    const_assert_eq!(offset_of!(DirtyGfn, slot), 4);
    const_assert_eq!(offset_of!(DirtyGfn, offset), 8);
}

/// Whether `flags` says the consumer harvested the entry: KVM's `kvm_dirty_gfn_harvested` tests only the
/// RESET bit, and so do we (any other bits a consumer left are ignored).
#[inline]
const fn is_harvested(flags: u32) -> bool {
    flags & DIRTY_GFN_F_RESET != 0
}

/// Whether `flags` says the entry is published and not yet harvested: DIRTY without RESET. A consumer that
/// stored `DIRTY | RESET` a lap earlier must not see that entry as new.
#[inline]
const fn is_dirty(flags: u32) -> bool {
    flags & DIRTY_GFN_F_MASK == DIRTY_GFN_F_DIRTY
}

/// Why a ring could not be configured or attached. Nothing was changed when any of these is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The entry count is not a power of two (or is zero).
    #[error("dirty ring of {entries} entries: the size must be a power of two")]
    NotPowerOfTwo {
        /// The requested entry count.
        entries: u32,
    },
    /// The byte size given to [`RingConfig::from_bytes`] is not a power of two (or is zero).
    #[error("dirty ring of {bytes} bytes: the size must be a power of two")]
    BytesNotPowerOfTwo {
        /// The requested size in bytes.
        bytes: u32,
    },
    /// The ring cannot hold its reserve, or is below KVM's minimum of one page.
    #[error("dirty ring of {entries} entries is too small: at least {min} entries are needed")]
    TooSmall {
        /// The requested entry count.
        entries: u32,
        /// The smallest valid entry count for this reserve.
        min: u32,
    },
    /// The ring is above KVM's maximum (`KVM_DIRTY_RING_MAX_ENTRIES`; KVM answers `E2BIG`).
    #[error("dirty ring of {entries} entries is too large: at most {max} entries are allowed")]
    TooLarge {
        /// The requested entry count.
        entries: u32,
        /// The largest valid entry count.
        max: u32,
    },
    /// The ring memory does not have the configured number of entries.
    #[error("dirty ring memory holds {len} entries but the ring is configured for {entries}")]
    LengthMismatch {
        /// Entries in the memory given.
        len: usize,
        /// Entries in the configuration.
        entries: u32,
    },
    /// Indices given to [`DirtyRingProducer::resume`] claim more entries in use than the ring holds.
    #[error(
        "dirty ring indices dirty={dirty_index} reset={reset_index} claim more than the {entries} entries \
         the ring holds"
    )]
    BadIndices {
        /// The producer's next push position.
        dirty_index: u32,
        /// The producer's next reset position.
        reset_index: u32,
        /// Entries in the ring.
        entries: u32,
    },
}

/// A push found every entry of the ring pushed and not yet reset. Nothing was written; the entry that
/// would have been overwritten is intact.
///
/// The page is not recorded: to keep I4 the caller must not let the guest's write go untracked (keep the
/// page write-protected and exit to the VMM, or record it elsewhere). With a correct reserve this is
/// unreachable: the vCPU exits at the soft limit, and the reserve covers what it dirties before it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dirty ring full: all {entries} entries hold gfns that are not reset yet")]
pub struct RingFull {
    /// Entries in the ring.
    pub entries: u32,
}

#[cfg(test)]
mod tests;
