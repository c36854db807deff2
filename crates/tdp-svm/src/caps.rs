//! SVM capabilities: CPUID 8000_0001h ECX.SVM, the SVM feature leaf 8000_000Ah (revision, number of
//! ASIDs, nested paging, NRIP save, flush-by-ASID, decode assists, ...), the physical address width
//! (8000_0008h) and 1 GiB pages (8000_0001h EDX), VM_CR.SVMDIS; decoded into what a `tdp-core` MMU
//! needs ([`NptFeatures`]).
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), section
//! 15.4 "Enabling SVM" (the test sequence: CPUID Fn8000_0001_ECX bit SVM, then VM_CR.SVMDIS), and Vol. 3
//! appendix E.4.9 "Function 8000_000Ah - SVM Revision and Feature Identification" (EAX bits 7:0 SVM
//! revision, EBX the number of ASIDs, EDX the feature bits in [`SvmFeatureBits`]). Cross-checked
//! against Linux's `arch/x86/include/asm/cpufeatures.h` (word 15).

use bitflags::bitflags;
use tdp_core::addr::Level;
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::{NptOptions, SpteFormat};

use crate::instr::SvmInstructions;
use crate::msr;

/// CPUID leaf: largest extended leaf (EAX).
pub const LEAF_EXT_MAX: u32 = 0x8000_0000;
/// CPUID leaf: extended features (ECX bit 2 SVM, EDX bit 26 1 GiB pages).
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// CPUID leaf: address sizes (EAX bits 7:0 physical address bits).
pub const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
/// CPUID leaf: SVM revision and features.
pub const LEAF_SVM: u32 = 0x8000_000a;
/// CPUID 8000_0001h ECX bit 2: SVM.
pub const EXT_ECX_SVM: u32 = 1 << 2;
/// CPUID 8000_0001h EDX bit 26: 1 GiB pages.
pub const EXT_EDX_PAGE1GB: u32 = 1 << 26;

bitflags! {
    /// CPUID 8000_000Ah EDX: the SVM features.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SvmFeatureBits: u32 {
        /// Bit 0: nested paging.
        const NESTED_PAGING = 1 << 0;
        /// Bit 1: LBR virtualization.
        const LBR_VIRT = 1 << 1;
        /// Bit 2: SVM lock (VM_CR.LOCK / SVM_KEY).
        const SVM_LOCK = 1 << 2;
        /// Bit 3: NRIP save: #VMEXIT stores the next RIP of intercepted instructions (VMCB 0x0C8).
        const NRIP_SAVE = 1 << 3;
        /// Bit 4: TSC rate MSR.
        const TSC_RATE = 1 << 4;
        /// Bit 5: VMCB clean bits.
        const VMCB_CLEAN = 1 << 5;
        /// Bit 6: flush by ASID: TLB_CONTROL values 3 and 7.
        const FLUSH_BY_ASID = 1 << 6;
        /// Bit 7: decode assists (instruction bytes and fault details in the VMCB).
        const DECODE_ASSISTS = 1 << 7;
        /// Bit 10: PAUSE intercept filter.
        const PAUSE_FILTER = 1 << 10;
        /// Bit 12: PAUSE filter threshold.
        const PAUSE_FILTER_THRESHOLD = 1 << 12;
        /// Bit 13: AVIC.
        const AVIC = 1 << 13;
        /// Bit 15: virtualized VMLOAD/VMSAVE.
        const VMSAVE_VIRT = 1 << 15;
        /// Bit 16: virtualized GIF.
        const VGIF = 1 << 16;
        const _ = !0;
    }
}

/// What CPUID and VM_CR say about SVM.
///
/// ```
/// use tdp_svm::caps::{SvmCapabilities, SvmFeatureBits};
/// use tdp_svm::fake::{bochs, FakeSvm};
/// let caps = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN));
/// assert!(caps.svm && !caps.disabled);
/// assert_eq!((caps.revision, caps.asids, caps.phys_bits), (1, 32768, 40));
/// assert!(caps.features.contains(SvmFeatureBits::NESTED_PAGING | SvmFeatureBits::FLUSH_BY_ASID));
/// assert!(!caps.features.contains(SvmFeatureBits::DECODE_ASSISTS)); // Bochs 2.7 has none
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvmCapabilities {
    /// CPUID 8000_0001h ECX bit 2.
    pub svm: bool,
    /// VM_CR.SVMDIS: firmware turned SVM off (read only when `svm`).
    pub disabled: bool,
    /// VM_CR.LOCK: SVMDIS cannot be changed.
    pub locked: bool,
    /// The SVM revision (8000_000Ah EAX bits 7:0).
    pub revision: u8,
    /// Number of ASIDs (8000_000Ah EBX), ASID 0 (the host's) included.
    pub asids: u32,
    /// The feature bits (8000_000Ah EDX).
    pub features: SvmFeatureBits,
    /// The physical address width (8000_0008h EAX bits 7:0; 36 when the leaf is absent).
    pub phys_bits: u8,
    /// 1 GiB pages (8000_0001h EDX bit 26), which nested paging then also maps.
    pub page_1g: bool,
}

/// Why the CPU cannot run a `tdp-core` MMU under SVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum CapsError {
    /// No SVM in CPUID (e.g. Intel, or Bochs's athlon64 models).
    #[error("the CPU has no SVM (CPUID 8000_0001h ECX bit 2 is clear)")]
    NoSvm,
    /// Firmware disabled SVM (VM_CR.SVMDIS); with VM_CR.LOCK it stays off until reset.
    #[error("SVM is disabled by VM_CR.SVMDIS (VM_CR {vm_cr:#x})")]
    Disabled {
        /// The raw VM_CR.
        vm_cr: u64,
    },
    /// SVM without nested paging (e.g. Bochs's turion64_tyler).
    #[error("the CPU has SVM but no nested paging (CPUID 8000_000Ah EDX bit 0 is clear)")]
    NoNestedPaging,
    /// Fewer than two ASIDs: none left for a guest.
    #[error("the CPU reports {asids} ASIDs, none for a guest")]
    NoGuestAsid {
        /// The number reported.
        asids: u32,
    },
}

/// The nested-paging options this CPU gives a `tdp-core` MMU.
///
/// ```
/// use tdp_core::addr::Level;
/// use tdp_svm::asid::TlbControl;
/// use tdp_svm::caps::{CapsError, SvmCapabilities};
/// use tdp_svm::fake::{bochs, FakeSvm};
/// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN)).npt_features()?;
/// assert_eq!((npt.max_leaf_level, npt.phys_bits, npt.flush_one), (Level::L3, 40, TlbControl::FlushAsid));
/// // Phenom has nested paging but no flush-by-ASID: a guest's flush flushes every ASID.
/// let phenom = SvmCapabilities::read(&FakeSvm::new(bochs::PHENOM_8650_TOLIMAN)).npt_features()?;
/// assert_eq!(phenom.flush_one, TlbControl::FlushAll);
/// let turion = SvmCapabilities::read(&FakeSvm::new(bochs::TURION64_TYLER));
/// assert_eq!(turion.npt_features(), Err(CapsError::NoNestedPaging));
/// # Ok::<(), CapsError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NptFeatures {
    /// The largest nested leaf: L3 with 1 GiB pages, else L2.
    pub max_leaf_level: Level,
    /// The physical address width, which bounds nCR3 and every nested entry's address.
    pub phys_bits: u8,
    /// ASIDs usable by guests: 1 to `asids - 1`.
    pub asids: u32,
    /// The TLB_CONTROL value that flushes one guest's translations.
    pub flush_one: crate::asid::TlbControl,
    /// NRIP save: the exit path can advance RIP past intercepted instructions without decoding.
    pub nrip_save: bool,
    /// Decode assists.
    pub decode_assists: bool,
}

impl SvmCapabilities {
    /// Reads CPUID through `svm`, and VM_CR when CPUID reports SVM.
    pub fn read(svm: &impl SvmInstructions) -> SvmCapabilities {
        let max = svm.cpuid(LEAF_EXT_MAX, 0).eax;
        let ext = if max >= LEAF_EXT_FEATURES { svm.cpuid(LEAF_EXT_FEATURES, 0) } else { Default::default() };
        let has_svm = ext.ecx & EXT_ECX_SVM != 0;
        let phys_bits =
            if max >= LEAF_ADDR_SIZES { (svm.cpuid(LEAF_ADDR_SIZES, 0).eax & 0xff) as u8 } else { 36 };
        let (revision, asids, features) = if has_svm && max >= LEAF_SVM {
            let leaf = svm.cpuid(LEAF_SVM, 0);
            ((leaf.eax & 0xff) as u8, leaf.ebx, SvmFeatureBits::from_bits_retain(leaf.edx))
        } else {
            (0, 0, SvmFeatureBits::empty())
        };
        let vm_cr = if has_svm { svm.rdmsr(msr::VM_CR) } else { 0 };
        SvmCapabilities {
            svm: has_svm,
            disabled: vm_cr & msr::VM_CR_SVMDIS != 0,
            locked: vm_cr & msr::VM_CR_LOCK != 0,
            revision,
            asids,
            features,
            phys_bits,
            page_1g: ext.edx & EXT_EDX_PAGE1GB != 0,
        }
    }

    /// Checks that SVM can be enabled and has nested paging, and picks the MMU's options.
    ///
    /// # Errors
    /// [`CapsError`] naming the first thing missing.
    pub fn npt_features(&self) -> Result<NptFeatures, CapsError> {
        if !self.svm {
            return Err(CapsError::NoSvm);
        }
        if self.disabled {
            let vm_cr = msr::VM_CR_SVMDIS | if self.locked { msr::VM_CR_LOCK } else { 0 };
            return Err(CapsError::Disabled { vm_cr });
        }
        if !self.features.contains(SvmFeatureBits::NESTED_PAGING) {
            return Err(CapsError::NoNestedPaging);
        }
        if self.asids < 2 {
            return Err(CapsError::NoGuestAsid { asids: self.asids });
        }
        Ok(NptFeatures {
            max_leaf_level: if self.page_1g { Level::L3 } else { Level::L2 },
            phys_bits: self.phys_bits,
            asids: self.asids,
            flush_one: crate::asid::TlbControl::for_one_guest(self.features),
            nrip_save: self.features.contains(SvmFeatureBits::NRIP_SAVE),
            decode_assists: self.features.contains(SvmFeatureBits::DECODE_ASSISTS),
        })
    }
}

impl NptFeatures {
    /// The `tdp-core` MMU configuration for this CPU: 4-level NPT (the host runs in long mode with
    /// 4-level paging, and nested walks use the host's paging mode), leaves up to
    /// [`NptFeatures::max_leaf_level`], MMIO SPTEs through a reserved address bit when the physical
    /// address width leaves one, and no PML (AMD has none: dirty logging write-protects).
    ///
    /// ```
    /// use tdp_core::spte::TdpKind;
    /// use tdp_svm::caps::SvmCapabilities;
    /// use tdp_svm::fake::{bochs, FakeSvm};
    /// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN)).npt_features()?;
    /// let config = npt.mmu_config();
    /// assert_eq!(config.format.kind(), TdpKind::Npt);
    /// assert!(!config.pml && config.format.has_accessed_dirty() && config.format.has_mmio_caching());
    /// # Ok::<(), tdp_svm::caps::CapsError>(())
    /// ```
    #[must_use]
    pub const fn mmu_config(&self) -> MmuConfig {
        let format = SpteFormat::npt(NptOptions {
            max_phys_bits: self.phys_bits,
            max_leaf_level: self.max_leaf_level,
        });
        MmuConfig { format, ..MmuConfig::NPT }
    }
}

#[cfg(test)]
mod tests;
