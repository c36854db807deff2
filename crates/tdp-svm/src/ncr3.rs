//! N_CR3 (VMCB offset 0x0B0): the nested page table's root, built from a `tdp-core` root and checked
//! against the CPU.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), section
//! 15.25.3 "Nested Paging Enable" and 15.25.5 "Nested Table Walk": nCR3 has the format of the host's
//! CR3 (bits 51:12 the root table, bit 3 PWT and bit 4 PCD), and the nested walk uses the host's paging
//! mode at VMRUN (4-level long mode here: EFER.LMA and CR4.PAE set, CR4.LA57 clear), so the root is a
//! PML4. Unlike an EPTP, nCR3 carries no walk length or A/D enable: AMD nested entries always have A
//! and D bits, which the CPU sets (Linux: `svm_load_mmu_pgd` writes `__sme_set(root_hpa)`).

use tdp_core::addr::{Level, PAGE_SHIFT, Pfn};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::TdpKind;

use crate::caps::NptFeatures;

/// A nested CR3 the CPU accepts.
///
/// ```
/// use tdp_core::addr::Pfn;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_svm::caps::SvmCapabilities;
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::ncr3::{NestedCr3, NestedCr3Error};
/// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN)).npt_features()?;
/// let ncr3 = NestedCr3::new(&npt, &npt.mmu_config(), Pfn(0x1234))?;
/// assert_eq!((ncr3.raw(), ncr3.root()), (0x123_4000, Pfn(0x1234)));
/// assert_eq!(NestedCr3::new(&npt, &MmuConfig::EPT, Pfn(1)), Err(NestedCr3Error::NotNpt));
/// // Bochs's AMD models have 40 physical address bits.
/// assert_eq!(NestedCr3::new(&npt, &npt.mmu_config(), Pfn(1 << 28)),
///            Err(NestedCr3Error::RootTooHigh { root: Pfn(1 << 28), phys_bits: 40 }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct NestedCr3(u64);

/// Why an nCR3 could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum NestedCr3Error {
    /// The MMU's format is not NPT.
    #[error("the MMU configuration is not for NPT")]
    NotNpt,
    /// The MMU's root level is not the host's 4-level paging.
    #[error("root level {level:?}: nested walks use the host's 4-level paging, so the root must be L4")]
    RootLevel {
        /// The configured root level.
        level: Level,
    },
    /// The MMU maps leaves larger than the CPU can (1 GiB without 1 GiB page support).
    #[error("the MMU maps leaves up to {level:?}, above what the CPU supports")]
    LeafTooLarge {
        /// The configured largest leaf.
        level: Level,
    },
    /// The root lies above the physical address width.
    #[error("root table {root:?} lies above the CPU's {phys_bits}-bit physical address space")]
    RootTooHigh {
        /// The root frame.
        root: Pfn,
        /// The CPU's physical address width.
        phys_bits: u8,
    },
}

impl NestedCr3 {
    /// The nCR3 for an MMU with `config` whose root table is `root`, checked against `features`.
    /// The root is cached write-back (PWT and PCD clear), as Linux's.
    ///
    /// # Errors
    /// [`NestedCr3Error`].
    pub fn new(features: &NptFeatures, config: &MmuConfig, root: Pfn) -> Result<NestedCr3, NestedCr3Error> {
        if config.format.kind() != TdpKind::Npt {
            return Err(NestedCr3Error::NotNpt);
        }
        if config.root_level != Level::L4 {
            return Err(NestedCr3Error::RootLevel { level: config.root_level });
        }
        if config.format.max_leaf_level() > features.max_leaf_level {
            return Err(NestedCr3Error::LeafTooLarge { level: config.format.max_leaf_level() });
        }
        let phys_bits = features.phys_bits.min(52);
        if root.0 >> u32::from(phys_bits).saturating_sub(PAGE_SHIFT) != 0 {
            return Err(NestedCr3Error::RootTooHigh { root, phys_bits });
        }
        Ok(NestedCr3(root.0 << PAGE_SHIFT))
    }

    /// The raw value for the VMCB.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The root table's frame.
    #[must_use]
    pub const fn root(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}
