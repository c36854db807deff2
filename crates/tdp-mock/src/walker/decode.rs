//! Decoding one raw paging-structure entry the way the processor does, for EPT and for long-mode NPT,
//! with constants transcribed here from the manuals and nothing taken from `tdp_core::spte`: the
//! walker is an independent check of the core's encoding.
//!
//! Checks: I1 at the bit level. An entry the core writes is judged by what the architecture says it
//! means (present or not, misconfigured / reserved bits, rights, frame), not by what the core intends.

use tdp_core::addr::{Level, PAGE_SHIFT};
use tdp_core::spte::{Access, TdpKind};

use super::Hardware;

/// Bits of an EPT paging-structure entry.
///
/// Source: Intel SDM Vol. 3C, section "EPT Translation Mechanism", tables "Format of an EPT PML4 Entry
/// (PML4E) that References an EPT Page-Directory-Pointer Table", "Format of an EPT Page-Directory-Pointer-
/// Table Entry (PDPTE) that Maps a 1-GByte Page", "Format of an EPT Page-Directory Entry (PDE) that Maps a
/// 2-MByte Page" and "Format of an EPT Page-Table Entry that Maps a 4-KByte Page"; section "EPT
/// Misconfigurations"; section "Accessed and Dirty Flags for EPT" (edition 325462-080, June 2023).
pub mod ept {
    /// Bit 0: read access.
    pub const R: u64 = 1 << 0;
    /// Bit 1: write access.
    pub const W: u64 = 1 << 1;
    /// Bit 2: execute access (supervisor-mode execute with mode-based execute control).
    pub const X: u64 = 1 << 2;
    /// Bits 2:0: an entry is not present when all three are clear ("EPT Translation Mechanism").
    pub const PRESENT_MASK: u64 = R | W | X;
    /// Bits 5:3 of a leaf: EPT memory type. Values 2, 3 and 7 are reserved: a misconfiguration.
    pub const MEMTYPE_SHIFT: u32 = 3;
    /// Bits 6:3 of an entry that references a table are reserved (bit 7 too at the PML4E/PML5E level).
    pub const NONLEAF_RESERVED: u64 = 0b1111 << 3;
    /// Bit 7 of a PDPTE or PDE: the entry maps a 1 GiB or 2 MiB page. Reserved in a PML4E / PML5E.
    pub const PS: u64 = 1 << 7;
    /// Bit 8: accessed, set by the processor when A/D flags are enabled in the EPTP.
    pub const A: u64 = 1 << 8;
    /// Bit 9 of a leaf: dirty, set by the processor on a write when A/D flags are enabled.
    pub const D: u64 = 1 << 9;
}

/// Bits of a long-mode page-table entry as walked by AMD nested paging.
///
/// Source: AMD APM Vol. 2, section "Long-Mode Page Translation", figures "4-Kbyte PML4E—Long Mode",
/// "4-Kbyte PDPE—Long Mode", "2-Mbyte PDE—Long Mode", "1-Gbyte PDPE—Long Mode" and "4-Kbyte PTE—Long
/// Mode"; section "Nested Paging" (nested walks are user accesses); section "Page-Fault Error Code"
/// (publication 24593, revision 3.41).
pub mod npt {
    /// Bit 0: present.
    pub const P: u64 = 1 << 0;
    /// Bit 1: read/write.
    pub const RW: u64 = 1 << 1;
    /// Bit 2: user/supervisor. Nested walks are user accesses, so every entry needs it.
    pub const US: u64 = 1 << 2;
    /// Bit 5: accessed.
    pub const A: u64 = 1 << 5;
    /// Bit 6 of a leaf: dirty.
    pub const D: u64 = 1 << 6;
    /// Bit 7 of a PDPE or PDE: page size. Bit 7 of a PTE is PAT.
    pub const PS: u64 = 1 << 7;
    /// Bits 8:7 of a PML4E (and PML5E) must be zero.
    pub const PML4E_MBZ: u64 = 0b11 << 7;
    /// Bit 12 of a 2 MiB or 1 GiB leaf: PAT. The address of a huge page starts above it.
    pub const HUGE_PAT: u64 = 1 << 12;
    /// Bit 63: no-execute (EFER.NXE is taken as set).
    pub const NX: u64 = 1 << 63;
}

/// Bits 51:12: the widest address field of either format.
const ADDR_MAX: u64 = ((1u64 << 52) - 1) & !((1u64 << PAGE_SHIFT) - 1);

/// What one entry means to the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Entry {
    /// The walk stops with a not-present fault.
    NotPresent,
    /// EPT misconfiguration / NPT reserved-bit fault.
    Reserved,
    /// A reference to the next table.
    Table { next: u64, rights: Rights },
    /// A leaf mapping `frame` (the first 4 KiB frame of the page).
    Leaf { frame: u64, rights: Rights },
}

/// The rights one entry grants; the walk ANDs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rights {
    pub(super) access: Access,
    /// NPT: U/S set (EPT: always true).
    pub(super) user: bool,
}

impl Rights {
    pub(super) const ALL: Rights = Rights { access: Access::all(), user: true };

    pub(super) fn and(self, other: Rights) -> Rights {
        Rights { access: self.access & other.access, user: self.user && other.user }
    }
}

/// The address bits this hardware implements: (max_phys_bits-1):12.
fn addr_mask(hw: &Hardware) -> u64 {
    ADDR_MAX & ((1u64 << hw.max_phys_bits.min(52)) - 1)
}

/// Bits 51:max_phys_bits, reserved in every entry of both formats.
fn reserved_addr_bits(hw: &Hardware) -> u64 {
    ADDR_MAX & !addr_mask(hw)
}

pub(super) fn decode(hw: &Hardware, value: u64, level: Level) -> Entry {
    match hw.kind {
        TdpKind::Ept => decode_ept(hw, value, level),
        TdpKind::Npt => decode_npt(hw, value, level),
    }
}

fn decode_ept(hw: &Hardware, v: u64, level: Level) -> Entry {
    if v & ept::PRESENT_MASK == 0 {
        return Entry::NotPresent;
    }
    // "EPT Misconfigurations": write without read; a reserved address bit.
    if v & ept::W != 0 && v & ept::R == 0 {
        return Entry::Reserved;
    }
    if v & reserved_addr_bits(hw) != 0 {
        return Entry::Reserved;
    }
    let mut access = Access::empty();
    access.set(Access::READ, v & ept::R != 0);
    access.set(Access::WRITE, v & ept::W != 0);
    access.set(Access::EXEC, v & ept::X != 0);
    let rights = Rights { access, user: true };
    let large = level > Level::L1 && v & ept::PS != 0;
    if large && (level >= Level::L4 || level > hw.max_leaf_level) {
        // Bit 7 is reserved in a PML4E / PML5E, and in a PDPTE without 1 GiB page support.
        return Entry::Reserved;
    }
    if level == Level::L1 || large {
        if matches!((v >> ept::MEMTYPE_SHIFT) & 0b111, 2 | 3 | 7) {
            return Entry::Reserved;
        }
        // Bits 29:12 of a 1 GiB leaf and 20:12 of a 2 MiB leaf are reserved.
        if v & ADDR_MAX & (level.page_size() - 1) != 0 {
            return Entry::Reserved;
        }
        return Entry::Leaf { frame: (v & addr_mask(hw)) >> PAGE_SHIFT, rights };
    }
    if v & ept::NONLEAF_RESERVED != 0 {
        return Entry::Reserved;
    }
    Entry::Table { next: (v & addr_mask(hw)) >> PAGE_SHIFT, rights }
}

fn decode_npt(hw: &Hardware, v: u64, level: Level) -> Entry {
    if v & npt::P == 0 {
        return Entry::NotPresent;
    }
    if v & reserved_addr_bits(hw) != 0 {
        return Entry::Reserved;
    }
    if level >= Level::L4 && v & npt::PML4E_MBZ != 0 {
        return Entry::Reserved;
    }
    let mut access = Access::READ;
    access.set(Access::WRITE, v & npt::RW != 0);
    access.set(Access::EXEC, v & npt::NX == 0);
    let rights = Rights { access, user: v & npt::US != 0 };
    let large = level > Level::L1 && v & npt::PS != 0;
    if large && level > hw.max_leaf_level {
        // PS in a PDPE without 1 GiB page support is reserved (PML4E handled above).
        return Entry::Reserved;
    }
    if level == Level::L1 {
        return Entry::Leaf { frame: (v & addr_mask(hw)) >> PAGE_SHIFT, rights };
    }
    if large {
        // Bits 20:13 of a 2 MiB leaf and 29:13 of a 1 GiB leaf are reserved; bit 12 is PAT.
        let low = ADDR_MAX & (level.page_size() - 1);
        if v & low & !npt::HUGE_PAT != 0 {
            return Entry::Reserved;
        }
        return Entry::Leaf { frame: (v & addr_mask(hw) & !low) >> PAGE_SHIFT, rights };
    }
    Entry::Table { next: (v & addr_mask(hw)) >> PAGE_SHIFT, rights }
}

/// The (accessed, dirty) bits of this hardware's entries.
pub(super) fn accessed_dirty_bits(kind: TdpKind) -> (u64, u64) {
    match kind {
        TdpKind::Ept => (ept::A, ept::D),
        TdpKind::Npt => (npt::A, npt::D),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPT: Hardware =
        Hardware { kind: TdpKind::Ept, accessed_dirty: true, max_leaf_level: Level::L3, max_phys_bits: 48 };
    const NPT: Hardware =
        Hardware { kind: TdpKind::Npt, accessed_dirty: true, max_leaf_level: Level::L3, max_phys_bits: 48 };

    #[test]
    fn i1_ept_misconfigurations_per_the_sdm() {
        let rwx = ept::R | ept::W | ept::X;
        assert_eq!(decode(&EPT, ept::W | ept::X, Level::L1), Entry::Reserved, "W without R");
        assert_eq!(decode(&EPT, ept::R | (2 << 3), Level::L1), Entry::Reserved, "memory type 2");
        assert_eq!(decode(&EPT, ept::R | (7 << 3), Level::L1), Entry::Reserved, "memory type 7");
        assert_eq!(decode(&EPT, rwx | ept::PS, Level::L4), Entry::Reserved, "PS in a PML4E");
        assert_eq!(decode(&EPT, rwx | (1 << 48), Level::L2), Entry::Reserved, "address above MAXPHYADDR");
        assert_eq!(
            decode(&EPT, rwx | ept::PS | (6 << 3) | 0x1000, Level::L2),
            Entry::Reserved,
            "misaligned 2M"
        );
        assert_eq!(decode(&EPT, rwx | (6 << 3), Level::L2), Entry::Reserved, "bits 6:3 of a non-leaf");
        let small = Hardware { max_leaf_level: Level::L2, ..EPT };
        assert_eq!(decode(&small, rwx | ept::PS | (6 << 3), Level::L3), Entry::Reserved, "no 1G pages");
        assert_eq!(decode(&EPT, 1 << 63 | 0x5a0, Level::L1), Entry::NotPresent, "bits 2:0 clear");
        assert_eq!(
            decode(&EPT, ept::X, Level::L1),
            Entry::Leaf { frame: 0, rights: Rights { access: Access::EXEC, user: true } },
            "execute-only is allowed"
        );
    }

    #[test]
    fn i1_npt_reserved_bits_per_the_apm() {
        let base = npt::P | npt::RW | npt::US;
        assert_eq!(decode(&NPT, base | (1 << 51), Level::L1), Entry::Reserved, "bit 51 above MAXPHYADDR");
        assert_eq!(decode(&NPT, base | npt::PS, Level::L4), Entry::Reserved, "PS in a PML4E");
        assert_eq!(decode(&NPT, base | npt::PS | 0x2000, Level::L2), Entry::Reserved, "bit 13 of a 2M PDE");
        assert_eq!(decode(&NPT, 0xfff & !npt::P, Level::L1), Entry::NotPresent);
        let pat = decode(&NPT, base | npt::PS | npt::HUGE_PAT | 0x20_0000, Level::L2);
        assert_eq!(pat, Entry::Leaf { frame: 0x200, rights: Rights { access: Access::all(), user: true } });
        let nx_kernel = decode(&NPT, npt::P | npt::NX, Level::L1);
        assert_eq!(nx_kernel, Entry::Leaf { frame: 0, rights: Rights { access: Access::READ, user: false } });
    }
}
