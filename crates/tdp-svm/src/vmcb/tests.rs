//! The VMCB's layout against the APM's tables (as Linux's `svm.h` spells them), the intercept bits, and
//! segment attributes.

use core::mem::offset_of;

use super::*;

/// (field, our offset, offset in the VMCB per APM Vol. 2 appendix B / Linux's `struct vmcb`).
const LAYOUT: &[(&str, usize, usize)] = &[
    ("intercept_cr", offset_of!(Vmcb, control.intercept_cr), 0x000),
    ("intercept_exceptions", offset_of!(Vmcb, control.intercept_exceptions), 0x008),
    ("intercept_misc1", offset_of!(Vmcb, control.intercept_misc1), 0x00c),
    ("intercept_misc2", offset_of!(Vmcb, control.intercept_misc2), 0x010),
    ("iopm_base_pa", offset_of!(Vmcb, control.iopm_base_pa), 0x040),
    ("msrpm_base_pa", offset_of!(Vmcb, control.msrpm_base_pa), 0x048),
    ("guest_asid", offset_of!(Vmcb, control.guest_asid), 0x058),
    ("tlb_control", offset_of!(Vmcb, control.tlb_control), 0x05c),
    ("exit_code", offset_of!(Vmcb, control.exit_code), 0x070),
    ("exit_info1", offset_of!(Vmcb, control.exit_info1), 0x078),
    ("exit_info2", offset_of!(Vmcb, control.exit_info2), 0x080),
    ("np_control", offset_of!(Vmcb, control.np_control), 0x090),
    ("event_inj", offset_of!(Vmcb, control.event_inj), 0x0a8),
    ("n_cr3", offset_of!(Vmcb, control.n_cr3), 0x0b0),
    ("vmcb_clean", offset_of!(Vmcb, control.vmcb_clean), 0x0c0),
    ("next_rip", offset_of!(Vmcb, control.next_rip), 0x0c8),
    ("insn_len", offset_of!(Vmcb, control.insn_len), 0x0d0),
    ("es", offset_of!(Vmcb, save.es), 0x400),
    ("cs", offset_of!(Vmcb, save.cs), 0x410),
    ("gdtr", offset_of!(Vmcb, save.gdtr), 0x460),
    ("tr", offset_of!(Vmcb, save.tr), 0x490),
    ("cpl", offset_of!(Vmcb, save.cpl), 0x4cb),
    ("efer", offset_of!(Vmcb, save.efer), 0x4d0),
    ("cr4", offset_of!(Vmcb, save.cr4), 0x548),
    ("cr3", offset_of!(Vmcb, save.cr3), 0x550),
    ("cr0", offset_of!(Vmcb, save.cr0), 0x558),
    ("rflags", offset_of!(Vmcb, save.rflags), 0x570),
    ("rip", offset_of!(Vmcb, save.rip), 0x578),
    ("rsp", offset_of!(Vmcb, save.rsp), 0x5d8),
    ("rax", offset_of!(Vmcb, save.rax), 0x5f8),
    ("cr2", offset_of!(Vmcb, save.cr2), 0x640),
    ("g_pat", offset_of!(Vmcb, save.g_pat), 0x668),
];

#[test]
fn every_field_sits_at_its_apm_offset() {
    for &(name, ours, apm) in LAYOUT {
        assert_eq!(ours, apm, "{name}");
    }
    assert_eq!((size_of::<Vmcb>(), align_of::<Vmcb>()), (4096, 4096));
}

#[test]
fn intercept_bits_match_the_apm() {
    // Linux numbers intercepts from bit 0 of word 0: word 3 starts at 96, word 4 at 128.
    let misc1 = [
        (InterceptMisc1::INTR, 96),
        (InterceptMisc1::CPUID, 114),
        (InterceptMisc1::HLT, 120),
        (InterceptMisc1::IOIO_PROT, 123),
        (InterceptMisc1::MSR_PROT, 124),
        (InterceptMisc1::SHUTDOWN, 127),
    ];
    for (flag, linux) in misc1 {
        assert_eq!(flag.bits(), 1 << (linux - 96), "{flag:?}");
    }
    let misc2 = [(InterceptMisc2::VMRUN, 128), (InterceptMisc2::VMMCALL, 129), (InterceptMisc2::XSETBV, 141)];
    for (flag, linux) in misc2 {
        assert_eq!(flag.bits(), 1 << (linux - 128), "{flag:?}");
    }
}

#[test]
fn segments_compress_descriptor_attributes() {
    // The flat 4 GiB data segment: type 3 (read/write, accessed), S, P, D/B and G: attrib 0xc93.
    let ds = VmcbSegment::from_descriptor(0x10, 0x00cf_9300_0000_ffff);
    assert_eq!((ds.selector, ds.attrib, ds.limit, ds.base), (0x10, 0xc93, 0xffff_ffff, 0));
    // A byte-granular segment with a base: limit as given, base reassembled from its three parts.
    let tss = VmcbSegment::from_descriptor(0x18, 0x1200_8934_5678_0067);
    assert_eq!((tss.attrib, tss.limit, tss.base), (0x089, 0x67, 0x1234_5678));
}

#[test]
fn a_new_vmcb_is_zero_and_without_nested_paging() {
    let vmcb = Vmcb::new();
    assert_eq!(vmcb, Vmcb::default());
    assert!(!vmcb.nested_paging());
    assert_eq!((vmcb.control.exit_code, vmcb.save.rip, vmcb.control.n_cr3), (0, 0, 0));
}
