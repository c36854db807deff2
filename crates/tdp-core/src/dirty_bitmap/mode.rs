//! How a VM tracks dirty pages: the bitmap (with or without manual protect) or the dirty ring, which
//! exclude each other as in KVM.
//!
//! Keeps: I5 for the mode itself: a capability argument KVM refuses is refused here with its value, and a
//! bitmap request on a ring VM gets KVM's `-ENXIO` ([`BitmapError::NotInBitmapMode`]).

use super::BitmapError;

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` `args[0]` bit: `KVM_GET_DIRTY_LOG` stops clearing;
/// `KVM_CLEAR_DIRTY_LOG` clears and re-protects (uapi `linux/kvm.h`).
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `args[0]` bit: a slot's bitmap starts with every page set when logging starts; only valid together
/// with [`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`] (uapi `linux/kvm.h`, `Documentation/virt/kvm/api.rst`).
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;

/// The dirty-tracking mode of a VM. Invalid combinations (initially-set without manual protect) cannot
/// be expressed.
///
/// ```
/// use tdp_core::dirty_bitmap::{BitmapError, DirtyTrackingMode};
///
/// let mode = DirtyTrackingMode::from_manual_protect_cap(0b11)?; // MANUAL_PROTECT_ENABLE | INITIALLY_SET
/// assert_eq!(mode, DirtyTrackingMode::ManualProtect { initially_set: true });
/// assert!(mode.check_bitmap_allowed().is_ok());
/// assert_eq!(
///     DirtyTrackingMode::from_manual_protect_cap(0b10),
///     Err(BitmapError::BadCapArgs { args: 0b10 }),
///     "initially-set needs manual protect"
/// );
/// let ring = DirtyTrackingMode::Ring { with_bitmap: false };
/// assert_eq!(ring.check_bitmap_allowed(), Err(BitmapError::NotInBitmapMode));
/// # Ok::<(), BitmapError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DirtyTrackingMode {
    /// The classic bitmap: `KVM_GET_DIRTY_LOG` gets and clears
    /// ([`DirtyBitmap::get_and_clear`](super::DirtyBitmap::get_and_clear)).
    #[default]
    Bitmap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG` only copies, `KVM_CLEAR_DIRTY_LOG` clears.
    ManualProtect {
        /// `KVM_DIRTY_LOG_INITIALLY_SET`: bitmaps start with every page dirty, and the MMU skips the
        /// write-protect pass when logging starts, if the slot's flags say so
        /// ([`SlotFlags::logging`](crate::memslot::SlotFlags::logging)).
        initially_set: bool,
    },
    /// The dirty ring (`KVM_CAP_DIRTY_LOG_RING` / `_ACQ_REL`): per-vCPU rings replace the bitmap, and
    /// `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` fail with `-ENXIO`.
    Ring {
        /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`: a bitmap also collects the writes made without a running
        /// vCPU (KVM's `kvm_use_dirty_bitmap`), harvested with the classic get-and-clear semantics.
        with_bitmap: bool,
    },
}

impl DirtyTrackingMode {
    /// The mode after `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` with `args[0] = args` on a
    /// bitmap VM: 0 turns manual protect off; [`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`] turns it on, with
    /// [`KVM_DIRTY_LOG_INITIALLY_SET`] optionally.
    ///
    /// # Errors
    /// [`BitmapError::BadCapArgs`] for unknown bits, or initially-set without manual protect (KVM's
    /// `allowed_options` check).
    pub const fn from_manual_protect_cap(args: u64) -> Result<Self, BitmapError> {
        let known = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        let enable = args & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        let allowed = if enable { known } else { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE };
        if args & !allowed != 0 {
            return Err(BitmapError::BadCapArgs { args });
        }
        Ok(if enable {
            DirtyTrackingMode::ManualProtect { initially_set: args & KVM_DIRTY_LOG_INITIALLY_SET != 0 }
        } else {
            DirtyTrackingMode::Bitmap
        })
    }

    /// Whether `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` may use the bitmap.
    ///
    /// # Errors
    /// [`BitmapError::NotInBitmapMode`] for a ring VM without `with_bitmap` (KVM's `-ENXIO`).
    pub const fn check_bitmap_allowed(self) -> Result<(), BitmapError> {
        match self {
            DirtyTrackingMode::Ring { with_bitmap: false } => Err(BitmapError::NotInBitmapMode),
            _ => Ok(()),
        }
    }

    /// Whether `KVM_GET_DIRTY_LOG` copies without clearing.
    #[must_use]
    pub const fn manual_protect(self) -> bool {
        matches!(self, DirtyTrackingMode::ManualProtect { .. })
    }

    /// Whether new bitmaps start with every page dirty (pass it to
    /// [`DirtyBitmap::new`](super::DirtyBitmap::new)). The MMU learns it from the slot's flags: turn
    /// logging on with [`SlotFlags::logging`](crate::memslot::SlotFlags::logging)`(mode)`, and it skips
    /// the write-protect pass, as KVM's `kvm_mmu_slot_apply_flags` does, and splits and protects each
    /// range when [`DirtyBitmap::clear`](super::DirtyBitmap::clear) re-protects it.
    #[must_use]
    pub const fn initially_set(self) -> bool {
        matches!(self, DirtyTrackingMode::ManualProtect { initially_set: true })
    }

    /// Whether vCPUs push dirty pages to their rings.
    #[must_use]
    pub const fn uses_ring(self) -> bool {
        matches!(self, DirtyTrackingMode::Ring { .. })
    }
}
