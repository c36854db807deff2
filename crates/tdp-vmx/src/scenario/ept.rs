//! Reading (and, for the must-fail variant, corrupting) EPT tables the way the CPU sees them: the raw
//! bits of Intel SDM Vol. 3C, section "EPT Translation Mechanism" (Tables 29-2 to 29-6), independent of
//! `tdp_core::spte`, so both runners report translations in one decoded form.

use tdp_core::host::Table;
use tdp_core::sync::Ordering;

/// The EPT translation of one gfn after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The gfn.
    pub gfn: u64,
    /// What the tables hold for it.
    pub kind: Mapping,
}

/// What the EPT tables hold for a gfn, decoded from the raw entries (Intel SDM Vol. 3C, 29.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// No present entry on the path.
    NotPresent,
    /// A misconfigured entry (write without read): an MMIO SPTE.
    Mmio,
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    Leaf {
        /// The slot whose host memory the frame lies in (`u16::MAX`: none).
        slot: u16,
        /// The frame's page index within that slot.
        page: u64,
        /// The leaf's level.
        level: u8,
        /// Readable, writable, executable (bits 0-2).
        rwx: u8,
    },
}

/// EPT entry bits (Intel SDM Vol. 3C, Tables 29-2 to 29-6).
pub(super) const EPT_RWX: u64 = 0b111;
pub(super) const EPT_R: u64 = 1;
pub(super) const EPT_W: u64 = 2;
pub(super) const EPT_PS: u64 = 1 << 7;
/// The dirty flag (bit 9), meaningful when the EPTP enables A/D flags.
pub(super) const EPT_D: u64 = 1 << 9;
pub(super) const EPT_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Walks a 4-level EPT from `root_pfn` for `gfn`, reading entries with `read(table_pfn, index)`, and
/// decodes what it finds. `host_bases` gives each slot's id and host base address, to express the
/// frame as a slot-relative page.
pub fn translate(
    mut read: impl FnMut(u64, usize) -> u64,
    root_pfn: u64,
    gfn: u64,
    host_bases: &[(u16, u64, u64)],
) -> Mapping {
    let mut table = root_pfn;
    for level in (1..=4u8).rev() {
        let shift = 9 * u32::from(level - 1);
        let entry = read(table, ((gfn >> shift) & 511) as usize);
        if entry & EPT_RWX == 0 {
            return Mapping::NotPresent;
        }
        if entry & (EPT_R | EPT_W) == EPT_W {
            return Mapping::Mmio;
        }
        let frame = (entry & EPT_ADDR) >> 12;
        if level == 1 || entry & EPT_PS != 0 {
            let pfn = frame + (gfn & ((1 << shift) - 1));
            let (slot, page) = host_bases
                .iter()
                .find(|&&(_, base, pages)| pfn >= base >> 12 && pfn < (base >> 12) + pages)
                .map_or((u16::MAX, pfn), |&(id, base, _)| (id, pfn - (base >> 12)));
            return Mapping::Leaf { slot, page, level, rwx: (entry & EPT_RWX) as u8 };
        }
        table = frame;
    }
    Mapping::NotPresent
}

/// The corruption of the must-fail variant (`bochs-hv --features broken-ept`): sets W, and D when
/// `accessed_dirty`, on every present leaf that maps a gfn of `first_gfn .. first_gfn + pages` in the
/// 4-level tree at `root_pfn`, behind the MMU's back, so that writes escape write protection (or, with
/// PML, the D-bit transition that logs them). `table(pfn)` gives a table page, `None` for a frame that
/// is not one (the walk stops there). Returns the leaves changed. The caller flushes the TLB after.
///
/// ```
/// use tdp_core::host::Table;
/// use tdp_vmx::scenario::unprotect_leaves;
/// let tables: Vec<Table> = (0..4).map(|_| std::array::from_fn(|_| Default::default())).collect();
/// let set = |t: usize, i: usize, v: u64| tables[t][i].store(v, std::sync::atomic::Ordering::Relaxed);
/// set(0, 0, (1 << 12) | 7); // root -> table 1 -> table 2 -> table 3
/// set(1, 0, (2 << 12) | 7);
/// set(2, 1, (3 << 12) | 7); // gfns 0x200..0x400
/// set(3, 5, 0x40_5000 | 5); // gfn 0x205: a read+exec 4 KiB leaf
/// let changed = unprotect_leaves(|pfn| tables.get(pfn as usize), 0, 0x200, 0x200, false);
/// assert_eq!(changed, 1);
/// assert_eq!(tables[3][5].load(std::sync::atomic::Ordering::Relaxed), 0x40_5000 | 7);
/// ```
pub fn unprotect_leaves<'t>(
    table: impl Fn(u64) -> Option<&'t Table>,
    root_pfn: u64,
    first_gfn: u64,
    pages: u64,
    accessed_dirty: bool,
) -> u64 {
    let bits = EPT_W | if accessed_dirty { EPT_D } else { 0 };
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
            if value & EPT_RWX == 0 || value & (EPT_R | EPT_W) == EPT_W {
                break;
            }
            if level == 1 || value & EPT_PS != 0 {
                entry.fetch_or(bits, Ordering::Relaxed);
                changed += 1;
                break;
            }
            step = 1;
            pfn = (value & EPT_ADDR) >> 12;
        }
        gfn = (gfn & !(step - 1)) + step;
    }
    changed
}
