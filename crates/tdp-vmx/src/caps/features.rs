//! The EPT feature set: which EPT options this CPU gives a `tdp-core` MMU, and the error that says what is
//! missing when it cannot run one.

use tdp_core::addr::Level;
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::{EptOptions, SpteFormat};

use super::{EptVpidCap, VmxCapabilities, VmxMemoryType};
use crate::vmcs::{PrimaryControls, SecondaryControls};

/// The EPT page-walk length (EPTP bits 5:3 hold it minus one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WalkLength {
    /// 4-level walks: 48-bit guest-physical addresses.
    Four = 4,
    /// 5-level walks: 57-bit guest-physical addresses.
    Five = 5,
}

impl WalkLength {
    /// The level of the root table (tdp-core's [`MmuConfig::root_level`]).
    #[must_use]
    pub const fn root_level(self) -> Level {
        match self {
            WalkLength::Four => Level::L4,
            WalkLength::Five => Level::L5,
        }
    }
}

/// Which INVEPT types the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InveptSupport {
    /// Single-context (type 1): one EPTP's translations.
    pub single_context: bool,
    /// All-context (type 2): every EPTP's translations.
    pub all_context: bool,
}

/// Which INVVPID types the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InvvpidSupport {
    /// Individual-address (type 0).
    pub individual_address: bool,
    /// Single-context (type 1).
    pub single_context: bool,
    /// All-context (type 2).
    pub all_context: bool,
    /// Single-context-retaining-globals (type 3).
    pub single_context_retaining_globals: bool,
}

/// The EPT options this CPU supports, chosen for a `tdp-core` MMU.
///
/// ```
/// use tdp_core::addr::Level;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_vmx::caps::{CapsError, VmxCapabilities, WalkLength};
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// // Sandy Bridge under Bochs: EPT with 2 MiB pages, no A/D flags, so no PML.
/// let ept = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SANDY_BRIDGE_2600K)).ept_features()?;
/// assert_eq!((ept.walk_length, ept.max_leaf_level, ept.accessed_dirty), (WalkLength::Four, Level::L2, false));
/// assert!(matches!(ept.mmu_config(true), Err(CapsError::PmlUnsupported { .. })));
/// let cfg = ept.mmu_config(false)?;
/// assert!(!cfg.format.has_accessed_dirty() && !cfg.pml);
/// // Skylake-X: everything the MMU can use, which is MmuConfig::EPT_PML.
/// let ept = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X)).ept_features()?;
/// assert_eq!(ept.mmu_config(true)?, MmuConfig::EPT_PML);
/// # Ok::<(), CapsError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EptFeatures {
    /// The walk length to use: 4 when the CPU has it, else 5.
    pub walk_length: WalkLength,
    /// 5-level walks are available too.
    pub five_level_available: bool,
    /// EPT accessed/dirty flags are available (enable them with EPTP bit 6).
    pub accessed_dirty: bool,
    /// The largest leaf: L3 with 1 GiB pages, L2 with 2 MiB pages, else L1.
    pub max_leaf_level: Level,
    /// Page-modification logging is available: the "enable PML" secondary control and EPT A/D flags.
    pub pml: bool,
    /// INVEPT types.
    pub invept: InveptSupport,
    /// INVVPID types, when the CPU has VPIDs and INVVPID.
    pub vpid: Option<InvvpidSupport>,
    /// The memory type for the EPT paging structures: write-back when allowed, else uncacheable.
    pub memory_type: VmxMemoryType,
    /// The "unrestricted guest" secondary control is available.
    pub unrestricted_guest: bool,
    /// Execute-only translations are allowed.
    pub execute_only: bool,
}

impl EptFeatures {
    /// The SPTE format for these options.
    #[must_use]
    pub const fn spte_format(&self) -> SpteFormat {
        SpteFormat::ept(EptOptions {
            accessed_dirty: self.accessed_dirty,
            max_leaf_level: self.max_leaf_level,
        })
    }

    /// The MMU configuration for these options, with PML when `pml` is asked for.
    ///
    /// # Errors
    /// [`CapsError::PmlUnsupported`] when PML is asked for and the CPU lacks it (or lacks EPT A/D flags,
    /// which PML needs).
    pub const fn mmu_config(&self, pml: bool) -> Result<MmuConfig, CapsError> {
        if pml && !self.pml {
            return Err(CapsError::PmlUnsupported { accessed_dirty: self.accessed_dirty });
        }
        Ok(MmuConfig {
            format: self.spte_format(),
            root_level: self.walk_length.root_level(),
            pml,
            ..MmuConfig::EPT
        })
    }
}

/// The CPU cannot run what was asked for. Each variant carries the MSR value that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum CapsError {
    /// IA32_FEATURE_CONTROL is not locked: VMXON raises #GP.
    #[error("IA32_FEATURE_CONTROL {feature_control:#x} is not locked, so VMXON would fault")]
    FeatureControlUnlocked {
        /// The MSR value.
        feature_control: u64,
    },
    /// IA32_FEATURE_CONTROL forbids VMXON outside SMX.
    #[error("IA32_FEATURE_CONTROL {feature_control:#x} forbids VMXON outside SMX (bit 2 clear)")]
    VmxonDisabled {
        /// The MSR value.
        feature_control: u64,
    },
    /// The primary controls cannot activate the secondary controls, which hold "enable EPT".
    #[error(
        "the primary processor-based controls (allowed-1 {allowed1:#x}) cannot activate secondary controls"
    )]
    NoSecondaryControls {
        /// Allowed-1 settings of the primary controls.
        allowed1: u32,
    },
    /// The secondary controls cannot enable EPT.
    #[error("the CPU has no EPT: secondary controls allowed-1 {allowed1:#x} lack bit 1")]
    NoEpt {
        /// Allowed-1 settings of the secondary controls.
        allowed1: u32,
    },
    /// Neither 4- nor 5-level EPT walks are supported.
    #[error("IA32_VMX_EPT_VPID_CAP {cap:#x} supports neither 4- nor 5-level EPT walks")]
    NoWalkLength {
        /// The MSR value.
        cap: u64,
    },
    /// Neither write-back nor uncacheable EPT paging structures are allowed.
    #[error("IA32_VMX_EPT_VPID_CAP {cap:#x} allows neither WB nor UC EPT paging structures")]
    NoMemoryType {
        /// The MSR value.
        cap: u64,
    },
    /// INVEPT is missing, or has neither single- nor all-context type: stale translations could not be
    /// flushed.
    #[error("IA32_VMX_EPT_VPID_CAP {cap:#x} has no usable INVEPT (single- or all-context)")]
    NoInvept {
        /// The MSR value.
        cap: u64,
    },
    /// PML was asked for and the CPU lacks it, or lacks the EPT A/D flags PML needs.
    #[error("PML is not available (EPT accessed/dirty flags: {accessed_dirty})")]
    PmlUnsupported {
        /// Whether the CPU has EPT A/D flags.
        accessed_dirty: bool,
    },
}

impl VmxCapabilities {
    /// The EPT options of this CPU.
    ///
    /// # Errors
    /// [`CapsError`] naming the first thing missing: secondary controls, EPT, a walk length, a memory
    /// type, INVEPT.
    pub fn ept_features(&self) -> Result<EptFeatures, CapsError> {
        if !self.primary.allows(PrimaryControls::ACTIVATE_SECONDARY_CONTROLS.bits()) {
            return Err(CapsError::NoSecondaryControls { allowed1: self.primary.allowed1() });
        }
        let secondary = SecondaryControls::from_bits_retain(self.secondary.allowed1());
        if !secondary.contains(SecondaryControls::ENABLE_EPT) {
            return Err(CapsError::NoEpt { allowed1: self.secondary.allowed1() });
        }
        let cap = self.ept_vpid;
        let walk_length = if cap.contains(EptVpidCap::WALK_LENGTH_4) {
            WalkLength::Four
        } else if cap.contains(EptVpidCap::WALK_LENGTH_5) {
            WalkLength::Five
        } else {
            return Err(CapsError::NoWalkLength { cap: cap.bits() });
        };
        let memory_type = if cap.contains(EptVpidCap::MEMTYPE_WB) {
            VmxMemoryType::WriteBack
        } else if cap.contains(EptVpidCap::MEMTYPE_UC) {
            VmxMemoryType::Uncacheable
        } else {
            return Err(CapsError::NoMemoryType { cap: cap.bits() });
        };
        let invept = InveptSupport {
            single_context: cap.contains(EptVpidCap::INVEPT | EptVpidCap::INVEPT_SINGLE_CONTEXT),
            all_context: cap.contains(EptVpidCap::INVEPT | EptVpidCap::INVEPT_ALL_CONTEXT),
        };
        if !invept.single_context && !invept.all_context {
            return Err(CapsError::NoInvept { cap: cap.bits() });
        }
        let vpid = (secondary.contains(SecondaryControls::ENABLE_VPID) && cap.contains(EptVpidCap::INVVPID))
            .then(|| InvvpidSupport {
                individual_address: cap.contains(EptVpidCap::INVVPID_INDIVIDUAL_ADDRESS),
                single_context: cap.contains(EptVpidCap::INVVPID_SINGLE_CONTEXT),
                all_context: cap.contains(EptVpidCap::INVVPID_ALL_CONTEXT),
                single_context_retaining_globals: cap
                    .contains(EptVpidCap::INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS),
            });
        let max_leaf_level = if cap.contains(EptVpidCap::PDPTE_1G | EptVpidCap::PDE_2M) {
            Level::L3
        } else if cap.contains(EptVpidCap::PDE_2M) {
            Level::L2
        } else {
            Level::L1
        };
        let accessed_dirty = cap.contains(EptVpidCap::ACCESSED_DIRTY);
        Ok(EptFeatures {
            walk_length,
            five_level_available: cap.contains(EptVpidCap::WALK_LENGTH_5),
            accessed_dirty,
            max_leaf_level,
            pml: accessed_dirty && secondary.contains(SecondaryControls::ENABLE_PML),
            invept,
            vpid,
            memory_type,
            unrestricted_guest: secondary.contains(SecondaryControls::UNRESTRICTED_GUEST),
            execute_only: cap.contains(EptVpidCap::EXECUTE_ONLY),
        })
    }
}
