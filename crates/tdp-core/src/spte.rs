//! Shadow page-table entries (SPTEs) and the two hardware formats they are written in.
//!
//! An [`Spte`] is a plain `u64`; what its bits mean is set by a [`SpteFormat`] *value*, one for Intel EPT
//! and one for AMD NPT, instead of KVM's `shadow_*_mask` globals. Both formats can live in one process,
//! which is how the tests run EPT and NPT side by side.
//!
//! Keeps: the writable invariant (W => MMU-writable => host-writable), which [`LeafWrite`] makes
//! impossible to break when building a leaf and [`SpteFormat::check`] verifies on every change in debug
//! builds; and the rule that non-present, frozen and MMIO values are distinguishable from each other
//! and from present SPTEs (asserted at compile time below).

use bitflags::bitflags;
use static_assertions::const_assert;

use crate::addr::{Gfn, Level, PAGE_SHIFT, Pfn};

bitflags! {
    /// Architectural bits of an EPT paging-structure entry.
    ///
    /// Source: Intel SDM Vol. 3C, section "EPT Translation Mechanism", tables "Format of an EPT PML4
    /// Entry", "Format of an EPT Page-Directory Entry (PDE) that Maps a 2-MByte Page" and "Format of an EPT
    /// Page-Table Entry that Maps a 4-KByte Page" (edition 325462-080, June 2023).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptBits: u64 {
        /// Bit 0: read access allowed.
        const READ = 1 << 0;
        /// Bit 1: write access allowed.
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetch allowed (supervisor fetch with mode-based execute control).
        const EXEC = 1 << 2;
        /// Bits 5:3 of a leaf: EPT memory type (0 UC, 1 WC, 4 WT, 5 WP, 6 WB); reserved in non-leaves.
        const MEMTYPE = 0b111 << 3;
        /// Bit 6 of a leaf: ignore the guest PAT memory type.
        const IGNORE_PAT = 1 << 6;
        /// Bit 7 of a PDPTE or PDE: the entry maps a 1 GiB or 2 MiB page. Ignored in a PTE.
        const PAGE_SIZE = 1 << 7;
        /// Bit 8: accessed, set by the processor when EPT A/D flags are enabled in the EPTP (bit 6).
        const ACCESSED = 1 << 8;
        /// Bit 9 of a leaf: dirty, set by the processor on a write when EPT A/D flags are enabled.
        const DIRTY = 1 << 9;
        /// Bit 10: user-mode execute, with mode-based execute control only.
        const USER_EXEC = 1 << 10;
        /// Bit 63 of a leaf: suppress #VE. KVM keeps it set in non-present entries so that an EPT
        /// violation never becomes a #VE in the guest.
        const SUPPRESS_VE = 1 << 63;
    }
}

bitflags! {
    /// Architectural bits of a long-mode page-table entry as used by AMD nested paging (NPT).
    ///
    /// Source: AMD APM Vol. 2, section "Long-Mode Page Translation", figures "4-Kbyte PTE—Long Mode" and
    /// "2-Mbyte PDE—Long Mode", and section "Nested Paging" (publication 24593, revision 3.41).
    /// Nested page-table walks are always treated as user accesses, so U must be set in every entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct NptBits: u64 {
        /// Bit 0: present (P). An entry with P clear is not present; every other bit is ignored.
        const PRESENT = 1 << 0;
        /// Bit 1: read/write (R/W).
        const WRITE = 1 << 1;
        /// Bit 2: user/supervisor (U/S).
        const USER = 1 << 2;
        /// Bit 3: page-level write-through (PWT).
        const PWT = 1 << 3;
        /// Bit 4: page-level cache disable (PCD).
        const PCD = 1 << 4;
        /// Bit 5: accessed (A), set by the processor in every entry it uses.
        const ACCESSED = 1 << 5;
        /// Bit 6 of a leaf: dirty (D), set by the processor on a write.
        const DIRTY = 1 << 6;
        /// Bit 7 of a PDPE or PDE: page size (PS). Bit 7 of a PTE is PAT.
        const PAGE_SIZE = 1 << 7;
        /// Bit 8 of a leaf: global (G); ignored by nested paging.
        const GLOBAL = 1 << 8;
        /// Bit 63: no-execute (NX), honoured when EFER.NXE is set.
        const NO_EXEC = 1 << 63;
    }
}

/// Software bit 11: the entry is a present SPTE. Bit 11 is ignored by every EPT and long-mode entry
/// format, so a single mask test says "present" for both formats; MMIO and frozen values never have it.
pub const MMU_PRESENT: u64 = 1 << 11;
/// EPT software bit 57: the host maps the backing page writable (ignored by EPT without the
/// guest-paging-verification controls, which KVM never enables).
pub const EPT_HOST_WRITABLE: u64 = 1 << 57;
/// EPT software bit 58: the MMU would allow writes; cleared when the gfn is write-tracked.
pub const EPT_MMU_WRITABLE: u64 = 1 << 58;
/// NPT software bit 9 (AVL): host-writable, as [`EPT_HOST_WRITABLE`].
pub const NPT_HOST_WRITABLE: u64 = 1 << 9;
/// NPT software bit 10 (AVL): MMU-writable, as [`EPT_MMU_WRITABLE`].
pub const NPT_MMU_WRITABLE: u64 = 1 << 10;
/// Where an access-tracked EPT leaf keeps its R, W and X bits (bits 2:0 moved to 56:54), as KVM's
/// `SHADOW_ACC_TRACK_SAVED_BITS_SHIFT`; bits 62:52 of an EPT leaf are ignored by the processor.
pub const ACC_TRACK_SAVED_SHIFT: u32 = 54;
/// The bits an access-tracked EPT leaf saves: R, W and X. (KVM saves R and X and drops W, relying on
/// a TLB flush after every dirty-logging pass; here the passes flush only what they change, so W is
/// saved too and write protection clears the saved W as it clears W: see [`SpteFormat::write_protected`].)
const ACC_TRACK_SAVED_MASK: u64 = EptBits::READ.bits() | EptBits::WRITE.bits() | EptBits::EXEC.bits();
/// The saved W of an access-tracked leaf (bit 55).
const ACC_TRACK_SAVED_WRITE: u64 = EptBits::WRITE.bits() << ACC_TRACK_SAVED_SHIFT;
/// The bits access tracking clears in an EPT leaf without A/D bits, so that any access faults.
const ACC_TRACK_CLEARED_MASK: u64 = EptBits::READ.bits() | EptBits::WRITE.bits() | EptBits::EXEC.bits();
/// Bits 51:12: the physical address of the mapped page or of the next table.
pub const PFN_MASK: u64 = ((1u64 << 52) - 1) & !((1u64 << PAGE_SHIFT) - 1);
/// How many bits of the memslot generation an MMIO SPTE keeps (KVM's `MMIO_SPTE_GEN_MASK` width).
pub const MMIO_GEN_BITS: u32 = 19;
/// Generation bits 7:0 are stored in SPTE bits 10:3, bits 18:8 in SPTE bits 62:52.
const MMIO_GEN_LOW_MASK: u64 = 0xff << 3;
const MMIO_GEN_HIGH_MASK: u64 = 0x7ff << 52;
/// The bits a frozen SPTE adds to the non-present value: none of them is a present, writable or MMIO
/// bit in either format, so hardware treats a frozen entry as not present.
const FROZEN_BITS: u64 = 0x5a0;

// The software bits sit in bits every format ignores, and do not overlap each other or the hardware bits.
const_assert!(EPT_HOST_WRITABLE & EptBits::all().bits() == 0);
const_assert!(EPT_MMU_WRITABLE & EptBits::all().bits() == 0);
const_assert!(MMU_PRESENT & (EptBits::all().bits() | NptBits::all().bits()) == 0);
const_assert!((NPT_HOST_WRITABLE | NPT_MMU_WRITABLE) & NptBits::all().bits() == 0);
const_assert!((EPT_HOST_WRITABLE | EPT_MMU_WRITABLE) & PFN_MASK == 0);
const_assert!((NPT_HOST_WRITABLE | NPT_MMU_WRITABLE | MMU_PRESENT) & PFN_MASK == 0);
// The MMIO generation fits its two fields exactly and avoids the address bits.
const_assert!(MMIO_GEN_LOW_MASK.count_ones() + MMIO_GEN_HIGH_MASK.count_ones() == MMIO_GEN_BITS);
const_assert!((MMIO_GEN_LOW_MASK | MMIO_GEN_HIGH_MASK) & (PFN_MASK | MMU_PRESENT) == 0);
const_assert!(FROZEN_BITS & (MMU_PRESENT | EptBits::READ.bits() | NptBits::PRESENT.bits()) == 0);
// The saved R and X bits avoid the address, the software writable bits and suppress-#VE.
const_assert!(
    (ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT)
        & (PFN_MASK | EPT_HOST_WRITABLE | EPT_MMU_WRITABLE | EptBits::all().bits())
        == 0
);

bitflags! {
    /// What a guest access may do through a mapping, in format-neutral terms.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Access: u8 {
        /// Data reads.
        const READ = 1 << 0;
        /// Data writes.
        const WRITE = 1 << 1;
        /// Instruction fetches.
        const EXEC = 1 << 2;
    }
}

/// Which hardware walks the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TdpKind {
    /// Intel Extended Page Tables.
    Ept,
    /// AMD Nested Page Tables.
    Npt,
}

/// The EPT memory type written into a leaf (ignored for NPT, where the host PAT decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemType {
    /// Uncacheable, for device memory.
    Uncacheable = 0,
    /// Write-combining.
    WriteCombining = 1,
    /// Write-through.
    WriteThrough = 4,
    /// Write-protected.
    WriteProtected = 5,
    /// Write-back, for ordinary RAM.
    WriteBack = 6,
}

/// How writable a new leaf is. The variants are exactly the states KVM's writable invariant allows
/// (W => MMU-writable => host-writable), so a leaf that breaks it cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeafWrite {
    /// Not writable and not MMU-writable: a read-only memslot, or a write-tracked gfn. `host_writable`
    /// records whether the host mapping itself allows writes.
    ReadOnly {
        /// The host maps the backing page writable.
        host_writable: bool,
    },
    /// Write-protected for dirty logging: W clear, MMU-writable and host-writable set, so the fast path
    /// may make it writable again without the MMU lock.
    WriteProtected,
    /// Writable: W, MMU-writable and host-writable all set, and D set (with A/D bits) since the fault
    /// installing it is a write or soon will be.
    Writable,
    /// Writable with D clear: for a read fault in a dirty-logged slot when hardware has A/D bits, so
    /// that the first write sets D (and logs to PML) instead of going unrecorded. Without A/D bits it is
    /// the same as [`LeafWrite::Writable`].
    WritableClean,
}

/// Everything besides the frame and level that goes into a new leaf SPTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeafAttrs {
    /// Writability, see [`LeafWrite`].
    pub write: LeafWrite,
    /// Instruction fetches allowed.
    pub exec: bool,
    /// EPT memory type (ignored by NPT).
    pub memtype: MemType,
    /// Pre-set the accessed bit (a fault that is about to use the mapping), as KVM does for
    /// non-prefetch faults.
    pub accessed: bool,
}

/// An SPTE: one 64-bit entry of a TDP table, in the bits hardware reads.
///
/// Predicates that do not depend on the format are methods here; the rest live on [`SpteFormat`].
///
/// ```
/// use tdp_core::addr::{Level, Pfn};
/// use tdp_core::spte::{LeafAttrs, LeafWrite, MemType, SpteFormat};
/// let ept = SpteFormat::EPT_AD;
/// let leaf = ept.leaf(Pfn(0x1234), Level::L1, LeafAttrs {
///     write: LeafWrite::Writable, exec: true, memtype: MemType::WriteBack, accessed: true,
/// });
/// assert!(leaf.is_present() && leaf.is_writable() && leaf.is_leaf(Level::L1));
/// assert_eq!(leaf.pfn(), Pfn(0x1234));
/// assert!(ept.check(leaf, Level::L1).is_ok());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(pub u64);

impl Spte {
    /// The raw bits.
    #[must_use]
    #[inline]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// A present SPTE (leaf or non-leaf); MMIO, frozen and non-present values are not present.
    #[must_use]
    #[inline]
    pub const fn is_present(self) -> bool {
        self.0 & MMU_PRESENT != 0
    }
    /// The page-size bit (bit 7 in both formats).
    #[must_use]
    #[inline]
    pub const fn is_large(self) -> bool {
        self.0 & EptBits::PAGE_SIZE.bits() != 0
    }
    /// Whether a present SPTE at `level` maps a page (rather than pointing to a table).
    #[must_use]
    #[inline]
    pub const fn is_leaf(self, level: Level) -> bool {
        matches!(level, Level::L1) || self.is_large()
    }
    /// Whether a present SPTE at `level` points to a lower-level table.
    #[must_use]
    #[inline]
    pub const fn is_table(self, level: Level) -> bool {
        self.is_present() && !self.is_leaf(level)
    }
    /// The hardware writable bit (bit 1 in both formats).
    #[must_use]
    #[inline]
    pub const fn is_writable(self) -> bool {
        self.0 & EptBits::WRITE.bits() != 0
    }
    /// The frame in bits 51:12: the mapped page of a leaf, the next table of a non-leaf.
    #[must_use]
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn((self.0 & PFN_MASK) >> PAGE_SHIFT)
    }
}

impl core::fmt::Debug for Spte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Spte({:#018x})", self.0)
    }
}

/// Options of an EPT format, read from IA32_VMX_EPT_VPID_CAP by a bare-metal backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EptOptions {
    /// EPT accessed and dirty flags are enabled in the EPTP.
    pub accessed_dirty: bool,
    /// The largest leaf level the CPU supports (L2 for 2 MiB, L3 for 1 GiB pages).
    pub max_leaf_level: Level,
}

/// Options of an NPT format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NptOptions {
    /// The host's MAXPHYADDR. MMIO SPTEs need a reserved address bit, so they are only used below 52.
    pub max_phys_bits: u8,
    /// The largest leaf level (L3 when 1 GiB pages are supported).
    pub max_leaf_level: Level,
}

/// Why [`SpteFormat::check`] rejected an SPTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpteCheckError {
    /// W set without MMU-writable, or MMU-writable without host-writable.
    #[error("{spte:?} breaks the writable invariant (W => MMU-writable => host-writable)")]
    WritableInvariant {
        /// The offending SPTE.
        spte: Spte,
    },
    /// A leaf at a level the format cannot map (above the max leaf level).
    #[error("{spte:?} is a leaf at {level:?}, above the format's largest page")]
    LeafTooHigh {
        /// The offending SPTE.
        spte: Spte,
        /// Its level.
        level: Level,
    },
    /// A present SPTE that is not readable (both formats require R / P in every present entry here).
    #[error("{spte:?} is present but not readable")]
    NotReadable {
        /// The offending SPTE.
        spte: Spte,
    },
}

/// The meaning of SPTE bits for one kind of hardware: KVM's `shadow_*_mask` set, as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpteFormat {
    kind: TdpKind,
    /// Bits every present SPTE carries besides [`MMU_PRESENT`] (EPT: R; NPT: P).
    present_mask: u64,
    /// NPT: U (nested walks are user accesses). EPT: none.
    user_mask: u64,
    /// EPT: X. NPT: none.
    x_mask: u64,
    /// NPT: NX. EPT: none.
    nx_mask: u64,
    accessed_mask: u64,
    dirty_mask: u64,
    host_writable_mask: u64,
    mmu_writable_mask: u64,
    /// The value of a non-present SPTE (EPT: suppress-#VE; NPT: 0).
    nonpresent: u64,
    /// An SPTE `s` is MMIO when `s & mmio_mask == mmio_value`; both 0 when MMIO caching is off.
    mmio_value: u64,
    mmio_mask: u64,
    max_leaf_level: Level,
}

impl SpteFormat {
    /// EPT with accessed/dirty flags and 1 GiB pages.
    pub const EPT_AD: SpteFormat =
        SpteFormat::ept(EptOptions { accessed_dirty: true, max_leaf_level: Level::L3 });
    /// EPT without accessed/dirty flags (write-protection dirty logging), with 1 GiB pages.
    pub const EPT_NO_AD: SpteFormat =
        SpteFormat::ept(EptOptions { accessed_dirty: false, max_leaf_level: Level::L3 });
    /// NPT with a 48-bit host physical address space and 1 GiB pages.
    pub const NPT: SpteFormat = SpteFormat::npt(NptOptions { max_phys_bits: 48, max_leaf_level: Level::L3 });

    /// The EPT format for `opts`.
    ///
    /// # Panics
    /// If `opts.max_leaf_level` is not L1, L2 or L3 (a const-evaluation error for constants).
    #[must_use]
    #[inline]
    pub const fn ept(opts: EptOptions) -> SpteFormat {
        assert!(
            matches!(opts.max_leaf_level, Level::L1 | Level::L2 | Level::L3),
            "EPT leaves are 4K, 2M or 1G"
        );
        let (accessed_mask, dirty_mask) =
            if opts.accessed_dirty { (EptBits::ACCESSED.bits(), EptBits::DIRTY.bits()) } else { (0, 0) };
        SpteFormat {
            kind: TdpKind::Ept,
            present_mask: EptBits::READ.bits(),
            user_mask: 0,
            x_mask: EptBits::EXEC.bits(),
            nx_mask: 0,
            accessed_mask,
            dirty_mask,
            host_writable_mask: EPT_HOST_WRITABLE,
            mmu_writable_mask: EPT_MMU_WRITABLE,
            nonpresent: EptBits::SUPPRESS_VE.bits(),
            // Write+execute without read is an EPT misconfiguration, so the access exits with reason 49
            // (EPT misconfiguration) instead of 48, telling MMIO apart from a missing mapping.
            mmio_value: EptBits::WRITE.bits() | EptBits::EXEC.bits(),
            mmio_mask: EptBits::READ.bits()
                | EptBits::WRITE.bits()
                | EptBits::EXEC.bits()
                | EptBits::SUPPRESS_VE.bits(),
            max_leaf_level: opts.max_leaf_level,
        }
    }

    /// The NPT format for `opts`.
    ///
    /// # Panics
    /// If `opts.max_leaf_level` is not L1, L2 or L3.
    #[must_use]
    #[inline]
    pub const fn npt(opts: NptOptions) -> SpteFormat {
        assert!(
            matches!(opts.max_leaf_level, Level::L1 | Level::L2 | Level::L3),
            "NPT leaves are 4K, 2M or 1G"
        );
        // A present entry with reserved bit 51 set raises #NPF with the RSVD error-code bit, which plays
        // the role of EPT's misconfiguration. Bit 51 is reserved only while MAXPHYADDR < 52.
        let (mmio_value, mmio_mask) = if opts.max_phys_bits < 52 {
            let rsvd = (1u64 << 51) | NptBits::PRESENT.bits();
            (rsvd, rsvd)
        } else {
            (0, 0)
        };
        SpteFormat {
            kind: TdpKind::Npt,
            present_mask: NptBits::PRESENT.bits(),
            user_mask: NptBits::USER.bits(),
            x_mask: 0,
            nx_mask: NptBits::NO_EXEC.bits(),
            accessed_mask: NptBits::ACCESSED.bits(),
            dirty_mask: NptBits::DIRTY.bits(),
            host_writable_mask: NPT_HOST_WRITABLE,
            mmu_writable_mask: NPT_MMU_WRITABLE,
            nonpresent: 0,
            mmio_value,
            mmio_mask,
            max_leaf_level: opts.max_leaf_level,
        }
    }

    /// Which hardware this format is for.
    #[must_use]
    #[inline]
    pub const fn kind(&self) -> TdpKind {
        self.kind
    }
    /// The largest level at which a leaf may be installed.
    #[must_use]
    #[inline]
    pub const fn max_leaf_level(&self) -> Level {
        self.max_leaf_level
    }
    /// The accessed bit's mask (0 without A/D bits).
    #[must_use]
    #[inline]
    pub const fn accessed_mask(&self) -> u64 {
        self.accessed_mask
    }
    /// The dirty bit's mask (0 without A/D bits).
    #[must_use]
    #[inline]
    pub const fn dirty_mask(&self) -> u64 {
        self.dirty_mask
    }
    /// Whether hardware sets accessed/dirty bits (EPT with A/D enabled, or NPT).
    #[must_use]
    #[inline]
    pub const fn has_accessed_dirty(&self) -> bool {
        self.accessed_mask != 0
    }
    /// Whether MMIO SPTEs can be cached (KVM's `enable_mmio_caching`).
    #[must_use]
    #[inline]
    pub const fn has_mmio_caching(&self) -> bool {
        self.mmio_mask != 0
    }
    /// The non-present value: what a zapped entry and a fresh table hold.
    #[must_use]
    #[inline]
    pub const fn nonpresent(&self) -> Spte {
        Spte(self.nonpresent)
    }
    /// The frozen value: a writer owns this entry for the moment; others must not write it, and retry.
    #[must_use]
    #[inline]
    pub const fn frozen(&self) -> Spte {
        Spte(self.nonpresent | FROZEN_BITS)
    }
    /// Whether `spte` is the frozen value.
    #[must_use]
    #[inline]
    pub const fn is_frozen(&self, spte: Spte) -> bool {
        spte.0 == self.frozen().0
    }
    /// Whether `spte` is an MMIO SPTE.
    #[must_use]
    #[inline]
    pub const fn is_mmio(&self, spte: Spte) -> bool {
        self.mmio_mask != 0 && spte.0 & self.mmio_mask == self.mmio_value
    }
    /// The host-writable software bit.
    #[must_use]
    #[inline]
    pub const fn is_host_writable(&self, spte: Spte) -> bool {
        spte.0 & self.host_writable_mask != 0
    }
    /// The MMU-writable software bit.
    #[must_use]
    #[inline]
    pub const fn is_mmu_writable(&self, spte: Spte) -> bool {
        spte.0 & self.mmu_writable_mask != 0
    }
    /// Whether instruction fetches are allowed (EPT: X set; NPT: NX clear).
    #[must_use]
    #[inline]
    pub const fn is_executable(&self, spte: Spte) -> bool {
        spte.0 & (self.x_mask | self.nx_mask) == self.x_mask
    }
    /// `spte` with instruction fetches forbidden (EPT: X clear; NPT: NX set): a huge leaf under the NX
    /// huge-page mitigation (KVM's `make_spte` stripping `ACC_EXEC_MASK`).
    #[must_use]
    #[inline]
    pub const fn non_executable(&self, spte: Spte) -> Spte {
        Spte((spte.0 & !self.x_mask) | self.nx_mask)
    }
    /// The accessed bit (always false without A/D).
    #[must_use]
    #[inline]
    pub const fn is_accessed(&self, spte: Spte) -> bool {
        spte.0 & self.accessed_mask != 0
    }
    /// The dirty bit (always false without A/D).
    #[must_use]
    #[inline]
    pub const fn is_dirty(&self, spte: Spte) -> bool {
        spte.0 & self.dirty_mask != 0
    }
    /// Whether `spte` is an access-tracked leaf (KVM's `is_access_track_spte`): present to the MMU (bit
    /// 11) but with R, W and X clear, so that hardware faults on any access; only in formats without
    /// A/D bits (EPT without A/D), where aging cannot clear an accessed bit.
    #[must_use]
    #[inline]
    pub const fn is_access_tracked(&self, spte: Spte) -> bool {
        !self.has_accessed_dirty()
            && self.kind as u8 == TdpKind::Ept as u8
            && spte.is_present()
            && spte.0 & ACC_TRACK_CLEARED_MASK == 0
    }

    /// `spte` aged (KVM's `mark_spte_for_access_track`): with A/D bits, A cleared; without, the
    /// access-tracked form, R, W and X saved in bits 56:54 and cleared, so that the next access faults
    /// and the fast path restores them all. An already tracked leaf is returned as it is.
    ///
    /// ```
    /// use tdp_core::addr::{Level, Pfn};
    /// use tdp_core::spte::{LeafAttrs, LeafWrite, MemType, SpteFormat};
    /// let fmt = SpteFormat::EPT_NO_AD;
    /// let leaf = fmt.leaf(Pfn(7), Level::L1, LeafAttrs {
    ///     write: LeafWrite::Writable, exec: true, memtype: MemType::WriteBack, accessed: true,
    /// });
    /// let aged = fmt.access_tracked(leaf);
    /// assert!(fmt.is_access_tracked(aged) && fmt.access(aged).is_empty() && aged.is_present());
    /// assert!(fmt.is_mmu_writable(aged) && fmt.check(aged, Level::L1).is_ok());
    /// assert_eq!(fmt.access_restored(aged), leaf, "every right comes back");
    /// let protected = fmt.write_protected(aged);
    /// assert_eq!(fmt.access_restored(protected), fmt.write_protected(leaf), "write protection reaches the saved W");
    /// ```
    #[must_use]
    #[inline]
    pub const fn access_tracked(&self, spte: Spte) -> Spte {
        if self.has_accessed_dirty() {
            return Spte(spte.0 & !self.accessed_mask);
        }
        if self.is_access_tracked(spte) || self.kind as u8 != TdpKind::Ept as u8 {
            return spte;
        }
        let saved = (spte.0 & ACC_TRACK_SAVED_MASK) << ACC_TRACK_SAVED_SHIFT;
        Spte((spte.0 | saved) & !ACC_TRACK_CLEARED_MASK)
    }

    /// The saved W bit of access-tracked leaves (bit 55), for passes that write-protect many entries
    /// at once; 0 in formats with A/D bits, which have no access-tracked form.
    #[must_use]
    #[inline]
    pub const fn access_tracked_write_bit(&self) -> u64 {
        if self.has_accessed_dirty() || self.kind as u8 != TdpKind::Ept as u8 {
            0
        } else {
            ACC_TRACK_SAVED_WRITE
        }
    }

    /// An access-tracked leaf with its saved rights back (KVM's `restore_acc_track_spte`); any other
    /// value unchanged.
    #[must_use]
    #[inline]
    pub const fn access_restored(&self, spte: Spte) -> Spte {
        if !self.is_access_tracked(spte) {
            return spte;
        }
        let saved_bits = ACC_TRACK_SAVED_MASK << ACC_TRACK_SAVED_SHIFT;
        let saved = (spte.0 >> ACC_TRACK_SAVED_SHIFT) & ACC_TRACK_SAVED_MASK;
        Spte((spte.0 & !saved_bits) | saved)
    }

    /// What a present leaf allows.
    #[must_use]
    #[inline]
    pub fn access(&self, spte: Spte) -> Access {
        let mut access = Access::empty();
        if spte.0 & self.present_mask != 0 {
            access |= Access::READ;
        }
        if spte.is_writable() {
            access |= Access::WRITE;
        }
        if self.is_executable(spte) {
            access |= Access::EXEC;
        }
        access
    }
    /// The table a present non-leaf SPTE at `level` points to, or `None` for leaves and non-present values.
    #[must_use]
    #[inline]
    pub const fn child_table(&self, spte: Spte, level: Level) -> Option<Pfn> {
        if spte.is_table(level) { Some(spte.pfn()) } else { None }
    }

    /// A leaf mapping `pfn` at `level`. For a huge leaf `pfn` must be aligned to the level.
    ///
    /// # Panics
    /// In debug builds, if `level` is above [`SpteFormat::max_leaf_level`] or `pfn` is misaligned.
    #[must_use]
    #[inline(always)] // callers pass constant attributes, which then fold away
    pub fn leaf(&self, pfn: Pfn, level: Level, attrs: LeafAttrs) -> Spte {
        debug_assert!(level <= self.max_leaf_level, "leaf at {level:?} above the format's largest page");
        debug_assert!(pfn.0 & (level.pages() - 1) == 0, "{pfn:?} misaligned for {level:?}");
        let mut spte = MMU_PRESENT | self.present_mask | self.user_mask | (pfn.hpa() & PFN_MASK);
        if level > Level::L1 {
            spte |= EptBits::PAGE_SIZE.bits();
        }
        spte |= if attrs.exec { self.x_mask } else { self.nx_mask };
        if self.kind == TdpKind::Ept {
            spte |= ((attrs.memtype as u64) << 3) | EptBits::IGNORE_PAT.bits();
        }
        if attrs.accessed {
            spte |= self.accessed_mask;
        }
        spte |= match attrs.write {
            LeafWrite::ReadOnly { host_writable: false } => 0,
            LeafWrite::ReadOnly { host_writable: true } => self.host_writable_mask,
            LeafWrite::WriteProtected => self.host_writable_mask | self.mmu_writable_mask,
            // A writable leaf is born dirty: the fault that installs it is (or may soon be) a write, and
            // pre-setting D spares the hardware a locked update.
            LeafWrite::Writable => {
                self.host_writable_mask | self.mmu_writable_mask | EptBits::WRITE.bits() | self.dirty_mask
            }
            LeafWrite::WritableClean => {
                self.host_writable_mask | self.mmu_writable_mask | EptBits::WRITE.bits()
            }
        };
        Spte(spte)
    }

    /// The memory-type bits of a leaf: for EPT, the memory type in bits 5:3 and, when `ignore_guest_pat`,
    /// IPAT (bit 6), so the type is used as is instead of being combined with the guest's PAT (SDM Vol.
    /// 3C, "Memory Type Used for Translated Guest-Physical Addresses"). NPT leaves have no such field:
    /// the guest PAT combines with the host's, as the APM's nested paging section describes; 0.
    ///
    /// ```
    /// use tdp_core::spte::{MemType, SpteFormat};
    /// assert_eq!(SpteFormat::EPT_AD.memtype_bits(MemType::WriteBack, true), (6 << 3) | (1 << 6));
    /// assert_eq!(SpteFormat::EPT_AD.memtype_bits(MemType::Uncacheable, false), 0);
    /// assert_eq!(SpteFormat::NPT.memtype_bits(MemType::Uncacheable, false), 0);
    /// ```
    #[must_use]
    #[inline]
    pub const fn memtype_bits(&self, memtype: MemType, ignore_guest_pat: bool) -> u64 {
        match self.kind {
            TdpKind::Ept => {
                ((memtype as u64) << 3) | if ignore_guest_pat { EptBits::IGNORE_PAT.bits() } else { 0 }
            }
            TdpKind::Npt => 0,
        }
    }

    /// The bits [`SpteFormat::memtype_bits`] may set (EPT bits 6:3; none for NPT).
    #[must_use]
    #[inline]
    pub const fn memtype_mask(&self) -> u64 {
        match self.kind {
            TdpKind::Ept => EptBits::MEMTYPE.bits() | EptBits::IGNORE_PAT.bits(),
            TdpKind::Npt => 0,
        }
    }

    /// A non-leaf SPTE pointing to the table in frame `child`, granting everything (the leaves decide).
    #[must_use]
    #[inline]
    pub const fn nonleaf(&self, child: Pfn) -> Spte {
        Spte(
            MMU_PRESENT
                | self.present_mask
                | EptBits::WRITE.bits()
                | self.user_mask
                | self.x_mask
                | self.accessed_mask
                | (child.hpa() & PFN_MASK),
        )
    }

    /// `spte` without the hardware W bit, and without the saved W of an access-tracked leaf;
    /// MMU-writable stays, so the fast path may restore W (dirty-log write protection, KVM's
    /// `wrprot_gfn_range`).
    #[must_use]
    #[inline]
    pub const fn write_protected(&self, spte: Spte) -> Spte {
        Spte(spte.0 & !(EptBits::WRITE.bits() | self.access_tracked_write_bit()))
    }
    /// `spte` without W, without MMU-writable and without the saved W of an access-tracked leaf (KVM's
    /// `kvm_tdp_mmu_write_protect_gfn`, for write tracking): unlike [`SpteFormat::write_protected`],
    /// the fast path can no longer make it writable; only a fault that finds the gfn untracked can.
    #[must_use]
    #[inline]
    pub const fn write_protected_for_tracking(&self, spte: Spte) -> Spte {
        Spte(self.write_protected(spte).0 & !self.mmu_writable_mask)
    }
    /// `spte` with D clear (KVM's `clear_dirty_gfn_range` with A/D bits): hardware sets it, and logs
    /// the gfn to PML, at the next write.
    #[must_use]
    #[inline]
    pub const fn cleaned(&self, spte: Spte) -> Spte {
        Spte(spte.0 & !self.dirty_mask)
    }
    /// A write-protected, MMU-writable `spte` made writable again (and dirty), as the fast path does.
    #[must_use]
    #[inline]
    pub const fn made_writable(&self, spte: Spte) -> Spte {
        Spte(spte.0 | EptBits::WRITE.bits() | self.dirty_mask)
    }

    /// The SPTE at `index` of the table that replaces huge leaf `huge` at `huge_level` (KVM's
    /// `make_small_spte`): same permissions and software bits, a frame `index` child pages further on,
    /// and the page-size bit dropped at the 4 KiB level.
    ///
    /// # Panics
    /// If `huge_level` is L1.
    #[must_use]
    #[inline]
    pub fn split_child(&self, huge: Spte, huge_level: Level, index: crate::addr::PtIndex) -> Spte {
        let child_level = huge_level.lower().expect("a 4K leaf cannot be split");
        let pfn = huge.pfn().add(index.get() as u64 * child_level.pages());
        let mut bits = (huge.0 & !PFN_MASK) | (pfn.hpa() & PFN_MASK);
        if child_level == Level::L1 {
            bits &= !EptBits::PAGE_SIZE.bits();
        }
        Spte(bits)
    }

    /// An MMIO SPTE for `gfn`, tagged with the low bits of memslot `generation`. `None` when the format
    /// has no MMIO caching or `gfn` does not fit below the reserved bit.
    #[must_use]
    #[inline]
    pub const fn mmio(&self, gfn: Gfn, generation: u64) -> Option<Spte> {
        if !self.has_mmio_caching() || gfn.0 >= (1 << (51 - PAGE_SHIFT)) {
            return None;
        }
        let generation = generation & ((1 << MMIO_GEN_BITS) - 1);
        let gen_bits = ((generation & 0xff) << 3) | ((generation >> 8) << 52);
        Some(Spte(self.mmio_value | gen_bits | (gfn.0 << PAGE_SHIFT)))
    }
    /// The gfn an MMIO SPTE was made for.
    #[must_use]
    #[inline]
    pub const fn mmio_gfn(&self, spte: Spte) -> Gfn {
        Gfn((spte.0 & PFN_MASK & !self.mmio_mask) >> PAGE_SHIFT)
    }
    /// The generation bits of an MMIO SPTE.
    #[must_use]
    #[inline]
    pub const fn mmio_generation(&self, spte: Spte) -> u64 {
        ((spte.0 & MMIO_GEN_LOW_MASK) >> 3) | ((spte.0 & MMIO_GEN_HIGH_MASK) >> 52 << 8)
    }
    /// Whether an MMIO SPTE was made under memslot `generation`.
    #[must_use]
    #[inline]
    pub const fn mmio_generation_matches(&self, spte: Spte, generation: u64) -> bool {
        self.mmio_generation(spte) == generation & ((1 << MMIO_GEN_BITS) - 1)
    }

    /// KVM's `check_spte_writable_invariants` and friends: the checks every change of a present SPTE
    /// at `level` must pass. Non-present values always pass.
    ///
    /// # Errors
    /// The first rule `spte` breaks.
    #[inline]
    pub fn check(&self, spte: Spte, level: Level) -> Result<(), SpteCheckError> {
        if !spte.is_present() {
            return Ok(());
        }
        if spte.0 & self.present_mask == 0 && !self.is_access_tracked(spte) {
            return Err(SpteCheckError::NotReadable { spte });
        }
        if spte.is_leaf(level) {
            if level > self.max_leaf_level {
                return Err(SpteCheckError::LeafTooHigh { spte, level });
            }
            let w = spte.is_writable();
            let mmu_w = self.is_mmu_writable(spte);
            let host_w = self.is_host_writable(spte);
            if (w && !mmu_w) || (mmu_w && !host_w) {
                return Err(SpteCheckError::WritableInvariant { spte });
            }
        }
        Ok(())
    }
}

// The special values of both formats never look present, and never look like one another.
const_assert!(!SpteFormat::EPT_AD.nonpresent().is_present());
const_assert!(!SpteFormat::EPT_AD.frozen().is_present());
const_assert!(!SpteFormat::EPT_AD.is_mmio(SpteFormat::EPT_AD.frozen()));
const_assert!(!SpteFormat::EPT_AD.is_mmio(SpteFormat::EPT_AD.nonpresent()));
const_assert!(!SpteFormat::NPT.frozen().is_present());
const_assert!(!SpteFormat::NPT.is_mmio(SpteFormat::NPT.frozen()));
const_assert!(!SpteFormat::NPT.is_mmio(SpteFormat::NPT.nonpresent()));

#[cfg(test)]
mod tests;
