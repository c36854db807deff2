//! Reading (and, for the must-fail variant, corrupting) EPT and NPT tables the way the CPU sees them,
//! from the raw bits of the vendors' manuals, independent of `tdp_core::spte`, so every runner reports
//! translations in one decoded form:
//! - EPT: Intel SDM Vol. 3C, section "EPT Translation Mechanism" (Tables 29-2 to 29-6): an entry is
//!   present when any of R, W, X (bits 0-2) is set, misconfigured (write without read) when W is set
//!   without R, a leaf at level 1 or with bit 7 set.
//! - NPT: AMD APM Vol. 2, section 15.25 "Nested Paging" (nested tables use the long-mode page-table
//!   format of section 5.3): present is bit 0, writable bit 1, A bit 5, D bit 6, a leaf at level 1 or
//!   with PS (bit 7), no-execute bit 63. A present entry with a reserved address bit set raises #NPF
//!   with the RSVD error-code bit: `tdp-core`'s NPT MMIO entries set bit 51, reserved on every AMD
//!   model Bochs emulates (40 physical address bits) and on any CPU with fewer than 52.

use tdp_core::host::Table;
use tdp_core::sync::Ordering;

/// The translation of one gfn after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The gfn.
    pub gfn: u64,
    /// What the tables hold for it.
    pub kind: Mapping,
}

/// What the tables hold for a gfn, decoded from the raw entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// No present entry on the path.
    NotPresent,
    /// An MMIO entry: EPT misconfigured (write without read), or NPT present with reserved bit 51.
    Mmio,
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    Leaf {
        /// The slot whose host memory the frame lies in (`u16::MAX`: none).
        slot: u16,
        /// The frame's page index within that slot.
        page: u64,
        /// The leaf's level.
        level: u8,
        /// Readable, writable, executable as bits 0-2 (EPT: its bits 0-2; NPT: readable when present,
        /// writable by bit 1, executable unless bit 63).
        rwx: u8,
    },
}

/// Which table format the tables are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paging {
    /// Intel EPT.
    Ept,
    /// AMD NPT (nested paging).
    Npt,
}

/// EPT entry bits (Intel SDM Vol. 3C, Tables 29-2 to 29-6).
pub(super) const EPT_RWX: u64 = 0b111;
pub(super) const EPT_R: u64 = 1;
pub(super) const EPT_W: u64 = 2;
pub(super) const EPT_PS: u64 = 1 << 7;
/// The dirty flag (bit 9), meaningful when the EPTP enables A/D flags.
pub(super) const EPT_D: u64 = 1 << 9;
/// NPT entry bits (AMD APM Vol. 2, section 5.3, Figures 5-18 to 5-22).
pub(super) const NPT_P: u64 = 1;
pub(super) const NPT_W: u64 = 1 << 1;
pub(super) const NPT_D: u64 = 1 << 6;
pub(super) const NPT_PS: u64 = 1 << 7;
pub(super) const NPT_RSVD_51: u64 = 1 << 51;
pub(super) const NPT_NX: u64 = 1 << 63;
/// The address field of both formats (bits 51:12).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

impl Paging {
    fn present(self, entry: u64) -> bool {
        match self {
            Paging::Ept => entry & EPT_RWX != 0,
            Paging::Npt => entry & NPT_P != 0,
        }
    }

    fn mmio(self, entry: u64) -> bool {
        match self {
            Paging::Ept => entry & (EPT_R | EPT_W) == EPT_W,
            Paging::Npt => entry & NPT_RSVD_51 != 0,
        }
    }

    fn page_size(self, entry: u64) -> bool {
        match self {
            Paging::Ept => entry & EPT_PS != 0,
            Paging::Npt => entry & NPT_PS != 0,
        }
    }

    fn rwx(self, entry: u64) -> u8 {
        match self {
            Paging::Ept => (entry & EPT_RWX) as u8,
            Paging::Npt => 1 | ((entry & NPT_W) as u8) | if entry & NPT_NX == 0 { 4 } else { 0 },
        }
    }

    /// The bits the broken-ept / broken-npt variant sets on a leaf: writable, and dirty when the tables
    /// have A/D bits (NPT always has them).
    fn unprotect_bits(self, accessed_dirty: bool) -> u64 {
        match self {
            Paging::Ept => EPT_W | if accessed_dirty { EPT_D } else { 0 },
            Paging::Npt => NPT_W | NPT_D,
        }
    }
}

/// Walks a 4-level `paging` tree from `root_pfn` for `gfn`, reading entries with `read(table_pfn,
/// index)`, and decodes what it finds. `host_bases` gives each slot's id, host base address and pages,
/// to express the frame as a slot-relative page.
pub fn translate(
    paging: Paging,
    mut read: impl FnMut(u64, usize) -> u64,
    root_pfn: u64,
    gfn: u64,
    host_bases: &[(u16, u64, u64)],
) -> Mapping {
    let mut table = root_pfn;
    for level in (1..=4u8).rev() {
        let shift = 9 * u32::from(level - 1);
        let entry = read(table, ((gfn >> shift) & 511) as usize);
        if !paging.present(entry) {
            return Mapping::NotPresent;
        }
        if paging.mmio(entry) {
            return Mapping::Mmio;
        }
        let frame = (entry & ADDR) >> 12;
        if level == 1 || paging.page_size(entry) {
            // A huge leaf's low address bits are flags (NPT's PAT bit 12) or reserved: drop them.
            let pfn = (frame & !((1u64 << shift) - 1)) + (gfn & ((1 << shift) - 1));
            let (slot, page) = host_bases
                .iter()
                .find(|&&(_, base, pages)| pfn >= base >> 12 && pfn < (base >> 12) + pages)
                .map_or((u16::MAX, pfn), |&(id, base, _)| (id, pfn - (base >> 12)));
            return Mapping::Leaf { slot, page, level, rwx: paging.rwx(entry) };
        }
        table = frame;
    }
    Mapping::NotPresent
}

/// The corruption of the must-fail variants (`bochs-hv --features broken-ept`, `bochs-svm --features
/// broken-npt`): sets W, and D when the tables have A/D bits (EPT: `accessed_dirty`; NPT: always), on
/// every present leaf that maps a gfn of `first_gfn .. first_gfn + pages` in the 4-level `paging` tree
/// at `root_pfn`, behind the MMU's back, so that writes escape write protection (or, with PML, the
/// D-bit transition that logs them). `table(pfn)` gives a table page, `None` for a frame that is not
/// one (the walk stops there). Returns the leaves changed. The caller flushes the TLB after.
///
/// ```
/// use tdp_core::host::Table;
/// use tdp_metal::scenario::{Paging, unprotect_leaves};
/// let tables: Vec<Table> = (0..4).map(|_| std::array::from_fn(|_| Default::default())).collect();
/// let set = |t: usize, i: usize, v: u64| tables[t][i].store(v, std::sync::atomic::Ordering::Relaxed);
/// set(0, 0, (1 << 12) | 7); // root -> table 1 -> table 2 -> table 3
/// set(1, 0, (2 << 12) | 7);
/// set(2, 1, (3 << 12) | 7); // gfns 0x200..0x400
/// set(3, 5, 0x40_5000 | 5); // gfn 0x205: a read+exec 4 KiB leaf
/// let changed = unprotect_leaves(Paging::Ept, |pfn| tables.get(pfn as usize), 0, 0x200, 0x200, false);
/// assert_eq!(changed, 1);
/// assert_eq!(tables[3][5].load(std::sync::atomic::Ordering::Relaxed), 0x40_5000 | 7);
/// ```
pub fn unprotect_leaves<'t>(
    paging: Paging,
    table: impl Fn(u64) -> Option<&'t Table>,
    root_pfn: u64,
    first_gfn: u64,
    pages: u64,
    accessed_dirty: bool,
) -> u64 {
    let bits = paging.unprotect_bits(accessed_dirty);
    let mut changed = 0;
    let mut gfn = first_gfn;
    while gfn < first_gfn + pages {
        let mut pfn = root_pfn;
        let mut step = 1u64;
        for level in (1..=4u32).rev() {
            let shift = 9 * (level - 1);
            let Some(t) = table(pfn) else { break };
            let entry = &t[((gfn >> shift) & 511) as usize];
            let value = entry.load(Ordering::Relaxed);
            step = 1 << shift;
            if !paging.present(value) || paging.mmio(value) {
                break;
            }
            if level == 1 || paging.page_size(value) {
                entry.fetch_or(bits, Ordering::Relaxed);
                changed += 1;
                break;
            }
            step = 1;
            pfn = (value & ADDR) >> 12;
        }
        gfn = (gfn & !(step - 1)) + step;
    }
    changed
}
