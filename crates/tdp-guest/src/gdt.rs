//! The GDT, the TSS descriptor and the segment state the vCPU starts with.
//!
//! The guest never loads a segment register itself: the host hands KVM the cached descriptor state with
//! `KVM_SET_SREGS`, and the GDT in guest memory holds the same descriptors so the state is consistent
//! (VMX entry checks, and any instruction that would reload a selector, see matching entries). Code and
//! data segments have DPL 3 because the guest runs only at CPL3; the TSS is there because VM entry
//! requires a usable TR. There is no IDT (limit 0): any exception becomes a triple fault, which KVM reports
//! as a shutdown exit and [`crate::GuestVcpu`] turns into [`crate::GuestError::TripleFault`].

use kvm_bindings::{kvm_dtable, kvm_segment};

/// Selector of the 64-bit user code segment: GDT index 1, RPL 3.
pub const USER_CODE_SELECTOR: u16 = (1 << 3) | 3;
/// Selector of the user data segment: GDT index 2, RPL 3.
pub const USER_DATA_SELECTOR: u16 = (2 << 3) | 3;
/// Selector of the 64-bit TSS: GDT index 3 (it takes indices 3 and 4), RPL 0.
pub const TSS_SELECTOR: u16 = 3 << 3;
/// Number of 8-byte GDT slots (null, code, data, and the 16-byte TSS descriptor).
pub const GDT_ENTRIES: usize = 5;
/// The TSS limit: the 104-byte 64-bit TSS, minus one.
pub const TSS_LIMIT: u32 = 0x67;

/// Segment type of a code segment: execute/read, accessed (SDM Vol. 3A §3.4.5.1, table "Code- and
/// Data-Segment Types", type 11).
pub const TYPE_CODE_XRA: u8 = 0xb;
/// Segment type of a data segment: read/write, accessed (same table, type 3).
pub const TYPE_DATA_RWA: u8 = 0x3;
/// System-descriptor type of a busy 64-bit TSS (SDM Vol. 3A §3.5, table "System-Segment and
/// Gate-Descriptor Types", IA-32e mode type 11).
pub const TYPE_TSS64_BUSY: u8 = 0xb;

/// Encodes a code or data segment descriptor (SDM Vol. 3A §3.4.5, figure "Segment Descriptor"): limit
/// 0xFFFFF with 4 KiB granularity, base 0, `S` = 1, present, the given type and DPL, and `L` (64-bit code)
/// or `D/B` (32-bit default size) as asked.
#[must_use]
pub const fn segment_descriptor(seg_type: u8, dpl: u8, long: bool, default_big: bool) -> u64 {
    let limit_lo = 0xffff_u64; // bits 0..15
    let access = (seg_type as u64 & 0xf) | (1 << 4) | ((dpl as u64 & 3) << 5) | (1 << 7); // bits 40..47
    let limit_hi = 0xf_u64; // bits 48..51
    let flags = ((long as u64) << 1) | ((default_big as u64) << 2) | (1 << 3); // L, D/B, G: bits 53..55
    limit_lo | (access << 40) | (limit_hi << 48) | (flags << 52)
}

/// Encodes the two 8-byte halves of a 64-bit TSS descriptor (SDM Vol. 3A §8.2.3, figure "Format of TSS and
/// LDT Descriptors in 64-bit Mode"): busy type, `S` = 0, DPL 0, present, byte granularity.
#[must_use]
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = limit as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((TYPE_TSS64_BUSY as u64 | (1 << 7)) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The GDT's contents for a TSS at guest address `tss_base`.
///
/// ```
/// use tdp_guest::gdt::{USER_CODE_SELECTOR, gdt};
/// let table = gdt(0x1800);
/// let code = table[usize::from(USER_CODE_SELECTOR >> 3)];
/// assert_eq!((code >> 45) & 3, 3, "DPL 3");
/// assert_eq!((code >> 53) & 1, 1, "64-bit code (L)");
/// ```
#[must_use]
pub const fn gdt(tss_base: u64) -> [u64; GDT_ENTRIES] {
    let tss = tss_descriptor(tss_base, TSS_LIMIT);
    [
        0,
        segment_descriptor(TYPE_CODE_XRA, 3, true, false),
        segment_descriptor(TYPE_DATA_RWA, 3, false, true),
        tss[0],
        tss[1],
    ]
}

/// KVM's view of the user code segment (must match GDT entry 1).
#[must_use]
pub fn user_code_segment() -> kvm_segment {
    flat_segment(USER_CODE_SELECTOR, TYPE_CODE_XRA, true)
}

/// KVM's view of the user data segment (must match GDT entry 2); used for SS, DS, ES, FS and GS.
#[must_use]
pub fn user_data_segment() -> kvm_segment {
    flat_segment(USER_DATA_SELECTOR, TYPE_DATA_RWA, false)
}

/// KVM's view of TR (must match GDT entries 3-4).
#[must_use]
pub fn task_segment(tss_base: u64) -> kvm_segment {
    kvm_segment {
        base: tss_base,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: TYPE_TSS64_BUSY,
        present: 1,
        ..kvm_segment::default()
    }
}

/// An unusable LDTR (the guest has no LDT).
#[must_use]
pub fn no_ldt() -> kvm_segment {
    kvm_segment { type_: 2, unusable: 1, ..kvm_segment::default() }
}

/// The GDTR for a GDT at `base`.
#[must_use]
pub fn gdtr(base: u64) -> kvm_dtable {
    kvm_dtable { base, limit: (GDT_ENTRIES * 8 - 1) as u16, ..kvm_dtable::default() }
}

fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..kvm_segment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the fields of a code/data descriptor the way the SDM's figure lays them out.
    fn fields(d: u64) -> (u64, u64, u64, u64, u64, u64, u64, u64) {
        let ty = (d >> 40) & 0xf;
        let s = (d >> 44) & 1;
        let dpl = (d >> 45) & 3;
        let p = (d >> 47) & 1;
        let l = (d >> 53) & 1;
        let db = (d >> 54) & 1;
        let g = (d >> 55) & 1;
        let limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16);
        (ty, s, dpl, p, l, db, g, limit)
    }

    #[test]
    fn user_code_is_dpl3_long_mode() {
        let d = segment_descriptor(TYPE_CODE_XRA, 3, true, false);
        assert_eq!(d, 0x00af_fb00_0000_ffff);
        assert_eq!(fields(d), (0xb, 1, 3, 1, 1, 0, 1, 0xfffff));
    }

    #[test]
    fn user_data_is_dpl3_writable() {
        let d = segment_descriptor(TYPE_DATA_RWA, 3, false, true);
        assert_eq!(d, 0x00cf_f300_0000_ffff);
        assert_eq!(fields(d), (0x3, 1, 3, 1, 0, 1, 1, 0xfffff));
    }

    #[test]
    fn tss_descriptor_splits_the_base() {
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc_def0, TSS_LIMIT);
        assert_eq!(lo & 0xffff, 0x67, "limit 15:0");
        assert_eq!((lo >> 16) & 0xff_ffff, 0xbc_def0, "base 23:0");
        assert_eq!((lo >> 40) & 0xf, 0xb, "busy 64-bit TSS");
        assert_eq!((lo >> 44) & 1, 0, "system descriptor");
        assert_eq!((lo >> 47) & 1, 1, "present");
        assert_eq!((lo >> 56) & 0xff, 0x9a, "base 31:24");
        assert_eq!(hi, 0x1234_5678, "base 63:32");
    }

    #[test]
    fn kvm_segments_match_the_gdt() {
        let table = gdt(0x1800);
        let cs = user_code_segment();
        let (ty, s, dpl, p, l, db, g, _) = fields(table[usize::from(cs.selector >> 3)]);
        assert_eq!((u64::from(cs.type_), u64::from(cs.s), u64::from(cs.dpl)), (ty, s, dpl));
        assert_eq!(
            (u64::from(cs.present), u64::from(cs.l), u64::from(cs.db), u64::from(cs.g)),
            (p, l, db, g)
        );
        assert_eq!(cs.selector & 3, 3, "RPL 3");
        let ds = user_data_segment();
        let (ty, s, dpl, p, l, db, g, _) = fields(table[usize::from(ds.selector >> 3)]);
        assert_eq!((u64::from(ds.type_), u64::from(ds.s), u64::from(ds.dpl)), (ty, s, dpl));
        assert_eq!(
            (u64::from(ds.present), u64::from(ds.l), u64::from(ds.db), u64::from(ds.g)),
            (p, l, db, g)
        );
        assert_eq!(table[usize::from(TSS_SELECTOR >> 3)], tss_descriptor(0x1800, TSS_LIMIT)[0]);
        assert_eq!(gdtr(0x1000).limit, 39);
    }
}
