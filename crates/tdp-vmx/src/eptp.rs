//! The EPT pointer (VMCS field 0x201A): memory type, walk length, A/D enable and the root table's
//! address, built from an MMU configuration and checked against what the CPU supports.
//!
//! Source: Intel SDM Vol. 3C, section "Extended-Page-Table Pointer (EPTP)", table "Format of
//! Extended-Page-Table Pointer" (edition 325462-080, June 2023): bits 2:0 memory type (0 UC, 6 WB),
//! bits 5:3 walk length minus one, bit 6 enable accessed/dirty flags, bit 7 enforce supervisor
//! shadow-stack access rights, bits 11:8 reserved (0), bits N-1:12 the physical address of the EPT
//! PML4 (or PML5) table, bits 63:N reserved.

use tdp_core::addr::{Level, PAGE_SHIFT, Pfn};
use tdp_core::mmu::MmuConfig;

use crate::caps::{EptFeatures, VmxMemoryType, WalkLength};

const MEMTYPE_MASK: u64 = 0b111;
const WALK_SHIFT: u32 = 3;
const WALK_MASK: u64 = 0b111 << WALK_SHIFT;
/// Bit 6: enable EPT accessed and dirty flags.
pub const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;
/// Bit 7: enforce access rights for supervisor shadow-stack pages.
pub const EPTP_SUPERVISOR_SHADOW_STACK: u64 = 1 << 7;
const RESERVED_LOW: u64 = 0xf00;
/// Bits 51:12: the root table's physical address (the architectural maximum; a CPU's MAXPHYADDR may
/// be lower).
pub const EPTP_ADDR_MASK: u64 = ((1 << 52) - 1) & !((1 << PAGE_SHIFT) - 1);

/// An EPT pointer whose fields the CPU accepts.
///
/// ```
/// use tdp_core::addr::Pfn;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_vmx::caps::{VmxCapabilities, WalkLength};
/// use tdp_vmx::eptp::{Eptp, EptpError};
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// let ept = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X)).ept_features()?;
/// let eptp = Eptp::new(&ept, &MmuConfig::EPT_PML, Pfn(0x1234))?;
/// // WB (6) | (4 - 1) << 3 | A/D (bit 6) | root address
/// assert_eq!(eptp.raw(), 0x0123_4000 | 6 | 3 << 3 | 1 << 6);
/// assert_eq!((eptp.root(), eptp.walk_length(), eptp.accessed_dirty()), (Pfn(0x1234), WalkLength::Four, true));
/// assert_eq!(Eptp::from_raw(eptp.raw()), Ok(eptp));
/// // Sandy Bridge has no A/D flags: an MMU configured with them cannot run there.
/// let sandy = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SANDY_BRIDGE_2600K)).ept_features()?;
/// assert_eq!(Eptp::new(&sandy, &MmuConfig::EPT, Pfn(0x1234)), Err(EptpError::AccessedDirtyUnsupported));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Eptp(u64);

/// Why an EPTP could not be built or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum EptpError {
    /// The configuration uses EPT A/D flags and the CPU has none.
    #[error("the MMU uses EPT accessed/dirty flags, which this CPU does not support")]
    AccessedDirtyUnsupported,
    /// The configuration's root level is a walk length the CPU does not support (or not 4 or 5).
    #[error("root level {level:?} is not a page-walk length this CPU supports")]
    WalkLengthUnsupported {
        /// The configured root level.
        level: Level,
    },
    /// The configuration is not an EPT format.
    #[error("the MMU configuration is not for EPT")]
    NotEpt,
    /// The root table lies above the 52 bits an EPTP can hold.
    #[error("root table {root:?} lies above the 52-bit physical address limit of an EPTP")]
    RootTooHigh {
        /// The root frame.
        root: Pfn,
    },
    /// A raw value with a memory type other than UC (0) or WB (6).
    #[error("EPTP {raw:#x}: memory type {} is not UC (0) or WB (6)", raw & MEMTYPE_MASK)]
    BadMemoryType {
        /// The raw value.
        raw: u64,
    },
    /// A raw value with a walk length other than 4 or 5.
    #[error("EPTP {raw:#x}: page-walk length {} is not 4 or 5", ((raw & WALK_MASK) >> WALK_SHIFT) + 1)]
    BadWalkLength {
        /// The raw value.
        raw: u64,
    },
    /// A raw value with reserved bits 11:8 or 63:52 set.
    #[error("EPTP {raw:#x} has reserved bits set")]
    ReservedBits {
        /// The raw value.
        raw: u64,
    },
}

impl Eptp {
    /// The EPTP for an MMU with `config` whose root table is `root`, checked against `features`: the
    /// walk length is the config's root level, A/D flags are enabled exactly when the config's format
    /// has them, the memory type is [`EptFeatures::memory_type`].
    ///
    /// # Errors
    /// [`EptpError::NotEpt`], [`EptpError::WalkLengthUnsupported`],
    /// [`EptpError::AccessedDirtyUnsupported`], [`EptpError::RootTooHigh`].
    pub fn new(features: &EptFeatures, config: &MmuConfig, root: Pfn) -> Result<Eptp, EptpError> {
        if config.format.kind() != tdp_core::spte::TdpKind::Ept {
            return Err(EptpError::NotEpt);
        }
        let walk = match config.root_level {
            Level::L4 if features.walk_length == WalkLength::Four => WalkLength::Four,
            Level::L5 if features.walk_length == WalkLength::Five || features.five_level_available => {
                WalkLength::Five
            }
            level => return Err(EptpError::WalkLengthUnsupported { level }),
        };
        let ad = config.format.has_accessed_dirty();
        if ad && !features.accessed_dirty {
            return Err(EptpError::AccessedDirtyUnsupported);
        }
        Eptp::build(features.memory_type, walk, ad, root)
    }

    /// An EPTP from its parts, without a feature check.
    ///
    /// # Errors
    /// [`EptpError::RootTooHigh`] when `root` does not fit bits 51:12.
    pub const fn build(
        memory_type: VmxMemoryType,
        walk: WalkLength,
        accessed_dirty: bool,
        root: Pfn,
    ) -> Result<Eptp, EptpError> {
        let addr = root.0 << PAGE_SHIFT;
        if root.0 >= 1 << (52 - PAGE_SHIFT) {
            return Err(EptpError::RootTooHigh { root });
        }
        let ad = if accessed_dirty { EPTP_ACCESSED_DIRTY } else { 0 };
        Ok(Eptp(addr | memory_type as u64 | ((walk as u64 - 1) << WALK_SHIFT) | ad))
    }

    /// Decodes a raw EPTP (as read back from the VMCS).
    ///
    /// # Errors
    /// [`EptpError::BadMemoryType`], [`EptpError::BadWalkLength`], [`EptpError::ReservedBits`].
    pub const fn from_raw(raw: u64) -> Result<Eptp, EptpError> {
        if !matches!(raw & MEMTYPE_MASK, 0 | 6) {
            return Err(EptpError::BadMemoryType { raw });
        }
        if !matches!((raw & WALK_MASK) >> WALK_SHIFT, 3 | 4) {
            return Err(EptpError::BadWalkLength { raw });
        }
        if raw & RESERVED_LOW != 0 || raw >> 52 != 0 {
            return Err(EptpError::ReservedBits { raw });
        }
        Ok(Eptp(raw))
    }

    /// The raw value to write to [`crate::vmcs::VmcsField::EPT_POINTER`] and INVEPT descriptors.
    #[must_use]
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// The root table's frame.
    #[must_use]
    pub const fn root(self) -> Pfn {
        Pfn((self.0 & EPTP_ADDR_MASK) >> PAGE_SHIFT)
    }
    /// The walk length.
    #[must_use]
    pub const fn walk_length(self) -> WalkLength {
        if (self.0 & WALK_MASK) >> WALK_SHIFT == 4 { WalkLength::Five } else { WalkLength::Four }
    }
    /// Whether A/D flags are enabled (bit 6).
    #[must_use]
    pub const fn accessed_dirty(self) -> bool {
        self.0 & EPTP_ACCESSED_DIRTY != 0
    }
    /// The paging-structure memory type.
    #[must_use]
    pub const fn memory_type(self) -> VmxMemoryType {
        if self.0 & MEMTYPE_MASK == 6 { VmxMemoryType::WriteBack } else { VmxMemoryType::Uncacheable }
    }
}

impl core::fmt::Debug for Eptp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Eptp({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_encodes_each_field_where_the_sdm_puts_it() {
        let uc4 = Eptp::build(VmxMemoryType::Uncacheable, WalkLength::Four, false, Pfn(1)).unwrap();
        assert_eq!(uc4.raw(), 0x1000 | 0b011 << 3);
        let wb5 = Eptp::build(VmxMemoryType::WriteBack, WalkLength::Five, true, Pfn(0xff_ffff_ffff)).unwrap();
        assert_eq!(wb5.raw(), 0xf_ffff_ffff_f000 | 6 | 0b100 << 3 | 1 << 6);
        assert_eq!((wb5.walk_length(), wb5.memory_type()), (WalkLength::Five, VmxMemoryType::WriteBack));
        assert_eq!(
            Eptp::build(VmxMemoryType::WriteBack, WalkLength::Four, true, Pfn(1 << 40)),
            Err(EptpError::RootTooHigh { root: Pfn(1 << 40) })
        );
    }

    #[test]
    fn i5_from_raw_rejects_every_malformed_field() {
        let good = 0x5000 | 6 | 3 << 3;
        assert!(Eptp::from_raw(good).is_ok());
        assert_eq!(Eptp::from_raw(good ^ 6 | 1), Err(EptpError::BadMemoryType { raw: good ^ 6 | 1 }));
        assert_eq!(
            Eptp::from_raw(0x5000 | 6 | 1 << 3),
            Err(EptpError::BadWalkLength { raw: 0x5000 | 6 | 1 << 3 })
        );
        assert_eq!(Eptp::from_raw(good | 1 << 8), Err(EptpError::ReservedBits { raw: good | 1 << 8 }));
        assert_eq!(Eptp::from_raw(good | 1 << 60), Err(EptpError::ReservedBits { raw: good | 1 << 60 }));
        for bits in 0..0x1000u64 {
            let _ = Eptp::from_raw(bits | 0x7000);
        }
    }
}
