//! Ring size validation: KVM's rules for `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)` and the soft limit.
//!
//! Keeps: I5 for ring sizes (a bad size is refused with the values that broke the rule) and the reserve
//! that lets a vCPU exit at the soft limit without ever filling the ring (I4).

use super::{DirtyGfn, RingError};

/// Entries kept free above the soft limit for what a vCPU dirties on its way out after the ring asks it
/// to exit (`KVM_DIRTY_RING_RSVD_ENTRIES`, `include/linux/kvm_host.h`).
pub const RESERVED_ENTRIES: u32 = 64;

/// Entries in Intel's page-modification log, which a vCPU flushes into its ring at every VM exit: the
/// reserve must also cover one full log (KVM's `PML_LOG_NR_ENTRIES`, ex `PML_ENTITY_NUM`). Intel SDM
/// Vol. 3C, "Page-Modification Logging": the log is a 4 KiB page of 512 64-bit guest-physical addresses.
pub const PML_ENTRIES: u32 = 512;

/// The most entries a ring may have (`KVM_DIRTY_RING_MAX_ENTRIES`; larger sizes get `E2BIG`).
pub const MAX_ENTRIES: u32 = 65536;

/// The smallest ring KVM accepts, in bytes: one 4 KiB page, so 256 entries.
pub const MIN_BYTES: u32 = 4096;

/// KVM's `sizeof(struct kvm_dirty_gfn)`; `mod.rs` asserts that a [`DirtyGfn`] has it (outside loom, whose
/// atomics are larger).
const ENTRY_BYTES: u32 = 16;
const MIN_ENTRIES: u32 = MIN_BYTES / ENTRY_BYTES;

/// A validated ring geometry: a power-of-two entry count and the reserve above the soft limit.
///
/// ```
/// use tdp_core::dirty_ring::{PML_ENTRIES, RingConfig, RingError};
/// // 4096 entries (64 KiB, KVM's recommended minimum) on a host that drains PML into the ring.
/// let cfg = RingConfig::new(4096, PML_ENTRIES)?;
/// assert_eq!((cfg.reserved(), cfg.soft_limit()), (576, 3520));
/// assert_eq!(cfg, RingConfig::from_bytes(65536, PML_ENTRIES)?);
/// assert_eq!(RingConfig::new(1000, 0), Err(RingError::NotPowerOfTwo { entries: 1000 }));
/// assert_eq!(RingConfig::new(512, PML_ENTRIES), Err(RingError::TooSmall { entries: 512, min: 1024 }));
/// # Ok::<(), RingError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingConfig {
    entries: u32,
    reserved: u32,
}

impl RingConfig {
    /// A ring of `entries` entries whose producer drains a CPU dirty log of `pml_entries` entries into it
    /// ([`PML_ENTRIES`] with Intel PML, 0 without). The reserve is `RESERVED_ENTRIES + pml_entries`, as in
    /// KVM's `kvm_dirty_ring_get_rsvd_entries`.
    ///
    /// # Errors
    /// KVM's rules, checked in KVM's order: [`RingError::NotPowerOfTwo`] unless `entries` is a power of
    /// two; [`RingError::TooSmall`] below one page (256 entries) or unless the ring is larger than its
    /// reserve (`min` is the smallest valid size); [`RingError::TooLarge`] above [`MAX_ENTRIES`].
    pub const fn new(entries: u32, pml_entries: u32) -> Result<RingConfig, RingError> {
        RingConfig::checked(entries, RESERVED_ENTRIES.saturating_add(pml_entries), MIN_ENTRIES)
    }

    /// The ring KVM configures from `KVM_ENABLE_CAP`'s `args[0]`, a size in bytes. KVM takes it as a
    /// `u32`, silently dropping higher bits of the 64-bit argument; a backend should refuse a larger
    /// value before it makes the call.
    ///
    /// # Errors
    /// [`RingError::BytesNotPowerOfTwo`] unless `bytes` is a power of two, then as [`RingConfig::new`]
    /// for `bytes / 16` entries.
    pub const fn from_bytes(bytes: u32, pml_entries: u32) -> Result<RingConfig, RingError> {
        if !bytes.is_power_of_two() {
            return Err(RingError::BytesNotPowerOfTwo { bytes });
        }
        let entries = bytes / ENTRY_BYTES;
        if entries == 0 {
            // A power of two below one entry: too small, not "0 is not a power of two".
            let min = smallest_ring(RESERVED_ENTRIES.saturating_add(pml_entries), MIN_ENTRIES);
            return Err(RingError::TooSmall { entries, min });
        }
        RingConfig::new(entries, pml_entries)
    }

    /// A ring for model checks and unit tests: any power of two up to [`MAX_ENTRIES`] larger than
    /// `reserved`, without KVM's one-page minimum, so that loom can explore a ring of four entries.
    ///
    /// # Errors
    /// As [`RingConfig::new`], without the one-page minimum.
    #[doc(hidden)]
    pub const fn for_model(entries: u32, reserved: u32) -> Result<RingConfig, RingError> {
        RingConfig::checked(entries, reserved, 1)
    }

    const fn checked(entries: u32, reserved: u32, min_entries: u32) -> Result<RingConfig, RingError> {
        if !entries.is_power_of_two() {
            return Err(RingError::NotPowerOfTwo { entries });
        }
        // The soft limit must leave room for at least one entry: KVM accepts a ring exactly as large as
        // its reserve, whose vCPU would have to exit before its first push.
        if entries <= reserved || entries < min_entries {
            return Err(RingError::TooSmall { entries, min: smallest_ring(reserved, min_entries) });
        }
        if entries > MAX_ENTRIES {
            return Err(RingError::TooLarge { entries, max: MAX_ENTRIES });
        }
        Ok(RingConfig { entries, reserved })
    }

    /// Entries in the ring, a power of two.
    #[must_use]
    #[inline]
    pub const fn entries(&self) -> u32 {
        self.entries
    }

    /// Entries kept free above the soft limit.
    #[must_use]
    #[inline]
    pub const fn reserved(&self) -> u32 {
        self.reserved
    }

    /// How many entries in use make the vCPU exit (`entries - reserved`, at least 1).
    #[must_use]
    #[inline]
    pub const fn soft_limit(&self) -> u32 {
        self.entries - self.reserved
    }

    /// The ring's size in bytes, the value KVM's `KVM_ENABLE_CAP` takes.
    #[must_use]
    #[inline]
    pub const fn bytes(&self) -> u32 {
        // At most 65536 * 16 = 1 MiB: no overflow.
        self.entries * ENTRY_BYTES
    }

    /// Checks that `ring` has exactly [`RingConfig::entries`] entries.
    pub(super) const fn check_len(&self, ring: &[DirtyGfn]) -> Result<(), RingError> {
        if ring.len() == self.entries as usize {
            Ok(())
        } else {
            Err(RingError::LengthMismatch { len: ring.len(), entries: self.entries })
        }
    }

    /// `index` reduced to a position in the ring; always below `entries`.
    #[inline]
    pub(super) const fn position(&self, index: u32) -> usize {
        (index & (self.entries - 1)) as usize
    }
}

/// The smallest power of two above `reserved` and at least `min_entries`; `u32::MAX` if there is none.
const fn smallest_ring(reserved: u32, min_entries: u32) -> u32 {
    let needed = if reserved >= min_entries { reserved.saturating_add(1) } else { min_entries };
    match needed.checked_next_power_of_two() {
        Some(min) => min,
        None => u32::MAX,
    }
}
