//! The virtual machine control block: one 4 KiB page, the control area (offsets 0x000-0x3FF) and the
//! state save area (0x400-0xFFF), as typed fields at their architectural offsets.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), appendix B
//! "Layout of VMCB": table B-1 "VMCB Layout, Control Area" and table B-2 "VMCB Layout, State Save
//! Area"; section 15.5.1 for the segment attribute format. Every offset is checked at compile time
//! below, and cross-checked against Linux's `arch/x86/include/asm/svm.h` (`struct vmcb_control_area`,
//! `struct vmcb_save_area`). Fields the backend does not use (AVIC, SEV, the GHCB, shadow-stack state)
//! stay inside reserved byte arrays, zero.
//!
//! The CPU reads the whole VMCB at VMRUN and writes the guest state and exit information at #VMEXIT;
//! between the two the VMCB is ordinary memory the hypervisor edits. Bochs, like hardware without
//! VMCB clean bits, re-reads every field at each VMRUN.

use core::fmt;
use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use static_assertions::const_assert_eq;

bitflags! {
    /// Intercept vector 3 (control-area offset 0x00C): interrupts and instructions.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct InterceptMisc1: u32 {
        /// Bit 0: physical INTR.
        const INTR = 1 << 0;
        /// Bit 1: physical NMI.
        const NMI = 1 << 1;
        /// Bit 2: SMI.
        const SMI = 1 << 2;
        /// Bit 3: INIT.
        const INIT = 1 << 3;
        /// Bit 4: virtual interrupt.
        const VINTR = 1 << 4;
        /// Bit 5: CR0 writes that change bits other than TS or MP.
        const CR0_SELECTIVE_WRITE = 1 << 5;
        /// Bit 14: RDTSC.
        const RDTSC = 1 << 14;
        /// Bit 18: CPUID.
        const CPUID = 1 << 18;
        /// Bit 22: INVD.
        const INVD = 1 << 22;
        /// Bit 23: PAUSE.
        const PAUSE = 1 << 23;
        /// Bit 24: HLT.
        const HLT = 1 << 24;
        /// Bit 25: INVLPG.
        const INVLPG = 1 << 25;
        /// Bit 26: INVLPGA.
        const INVLPGA = 1 << 26;
        /// Bit 27: IN/OUT, per the I/O permission map at IOPM_BASE_PA.
        const IOIO_PROT = 1 << 27;
        /// Bit 28: RDMSR/WRMSR, per the MSR permission map at MSRPM_BASE_PA.
        const MSR_PROT = 1 << 28;
        /// Bit 29: task switches.
        const TASK_SWITCH = 1 << 29;
        /// Bit 31: shutdown (a guest triple fault).
        const SHUTDOWN = 1 << 31;
        const _ = !0;
    }
}

bitflags! {
    /// Intercept vector 4 (control-area offset 0x010): SVM and other instructions.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct InterceptMisc2: u32 {
        /// Bit 0: VMRUN. Must be set: VMRUN with it clear exits with `VMEXIT_INVALID`.
        const VMRUN = 1 << 0;
        /// Bit 1: VMMCALL (the guest's hypercall).
        const VMMCALL = 1 << 1;
        /// Bit 2: VMLOAD.
        const VMLOAD = 1 << 2;
        /// Bit 3: VMSAVE.
        const VMSAVE = 1 << 3;
        /// Bit 4: STGI.
        const STGI = 1 << 4;
        /// Bit 5: CLGI.
        const CLGI = 1 << 5;
        /// Bit 6: SKINIT.
        const SKINIT = 1 << 6;
        /// Bit 7: RDTSCP.
        const RDTSCP = 1 << 7;
        /// Bit 8: ICEBP.
        const ICEBP = 1 << 8;
        /// Bit 9: WBINVD.
        const WBINVD = 1 << 9;
        /// Bit 10: MONITOR.
        const MONITOR = 1 << 10;
        /// Bit 11: MWAIT.
        const MWAIT = 1 << 11;
        /// Bit 13: XSETBV.
        const XSETBV = 1 << 13;
        const _ = !0;
    }
}

/// Control-area offset 0x090 bit 0: enable nested paging.
pub const NP_ENABLE: u64 = 1 << 0;

/// A segment register in the save area: selector, attributes, limit, base (16 bytes).
///
/// `attrib` is the descriptor's attribute bits compressed to 12 bits: bits 7:0 are descriptor bits
/// 47:40 (type, S, DPL, P) and bits 11:8 are descriptor bits 55:52 (AVL, L, D/B, G).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VmcbSegment {
    /// The selector.
    pub selector: u16,
    /// The compressed attributes.
    pub attrib: u16,
    /// The limit (in bytes, expanded by G).
    pub limit: u32,
    /// The base.
    pub base: u64,
}

impl VmcbSegment {
    /// An all-zero (null, unusable) segment.
    pub const NULL: VmcbSegment = VmcbSegment { selector: 0, attrib: 0, limit: 0, base: 0 };

    /// The segment a GDT entry `descriptor` loads for `selector` (base and limit of a flat segment are
    /// taken from the descriptor; a G=1 limit is expanded to bytes).
    ///
    /// ```
    /// use tdp_svm::vmcb::VmcbSegment;
    /// // A 64-bit code segment (L=1, P=1, DPL 0, execute/read, accessed): attrib 0xa9b.
    /// let cs = VmcbSegment::from_descriptor(0x08, 0x00af_9b00_0000_ffff);
    /// assert_eq!((cs.attrib, cs.limit, cs.base), (0xa9b, 0xffff_ffff, 0));
    /// ```
    #[must_use]
    pub const fn from_descriptor(selector: u16, descriptor: u64) -> VmcbSegment {
        let attrib = (((descriptor >> 40) & 0xff) | (((descriptor >> 52) & 0xf) << 8)) as u16;
        let raw_limit = ((descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16)) as u32;
        let limit = if attrib & (1 << 11) != 0 { (raw_limit << 12) | 0xfff } else { raw_limit };
        let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
        VmcbSegment { selector, attrib, limit, base }
    }
}

/// The control area (VMCB offsets 0x000-0x3FF).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ControlArea {
    /// 0x000: intercept CR reads (bits 15:0) and writes (bits 31:16).
    pub intercept_cr: u32,
    /// 0x004: intercept DR reads (bits 15:0) and writes (bits 31:16).
    pub intercept_dr: u32,
    /// 0x008: intercept exception vectors (bit n for vector n).
    pub intercept_exceptions: u32,
    /// 0x00C: intercept vector 3.
    pub intercept_misc1: InterceptMisc1,
    /// 0x010: intercept vector 4.
    pub intercept_misc2: InterceptMisc2,
    /// 0x014: intercept vector 5 (INVLPGB, INVPCID, ...).
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x3c - 0x18],
    /// 0x03C: PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// 0x03E: PAUSE filter count.
    pub pause_filter_count: u16,
    /// 0x040: physical address of the 12 KiB I/O permission map (used with `IOIO_PROT`).
    pub iopm_base_pa: u64,
    /// 0x048: physical address of the 8 KiB MSR permission map (used with `MSR_PROT`).
    pub msrpm_base_pa: u64,
    /// 0x050: TSC offset.
    pub tsc_offset: u64,
    /// 0x058: the guest's ASID (bits 31:0). VMRUN with ASID 0 exits with `VMEXIT_INVALID`.
    pub guest_asid: u32,
    /// 0x05C: TLB_CONTROL (bits 7:0), see [`crate::asid::TlbControl`].
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: virtual interrupt control (V_TPR, V_IRQ, V_INTR_MASKING, ...).
    pub int_ctl: u32,
    /// 0x064: virtual interrupt vector.
    pub int_vector: u32,
    /// 0x068: interrupt shadow (bit 0) and guest interrupt mask (bit 1).
    pub int_state: u32,
    _reserved_06c: [u8; 4],
    /// 0x070: EXITCODE.
    pub exit_code: u64,
    /// 0x078: EXITINFO1 (for #NPF: the page-fault error code).
    pub exit_info1: u64,
    /// 0x080: EXITINFO2 (for #NPF: the faulting guest-physical address).
    pub exit_info2: u64,
    /// 0x088: EXITINTINFO (an event being delivered when the exit happened).
    pub exit_int_info: u64,
    /// 0x090: bit 0 NP_ENABLE ([`NP_ENABLE`]); bits 1 and 2 enable SEV and SEV-ES.
    pub np_control: u64,
    /// 0x098: AVIC APIC BAR.
    pub avic_apic_bar: u64,
    /// 0x0A0: guest-physical address of the GHCB (SEV-ES).
    pub ghcb_gpa: u64,
    /// 0x0A8: EVENTINJ (an event to inject at VMRUN).
    pub event_inj: u64,
    /// 0x0B0: N_CR3, the nested page table root ([`crate::ncr3::NestedCr3`]).
    pub n_cr3: u64,
    /// 0x0B8: bit 0 LBR virtualization enable, bit 1 virtualized VMSAVE/VMLOAD.
    pub lbr_virt: u64,
    /// 0x0C0: VMCB clean bits (ignored by CPUs without the VmcbClean feature).
    pub vmcb_clean: u32,
    _reserved_0c4: [u8; 4],
    /// 0x0C8: nRIP, the guest's next RIP after an intercepted instruction (with NRIP save).
    pub next_rip: u64,
    /// 0x0D0: bytes fetched (with decode assists).
    pub insn_len: u8,
    /// 0x0D1: the fetched instruction bytes.
    pub insn_bytes: [u8; 15],
    _reserved_0e0: [u8; 0x400 - 0xe0],
}

/// The state save area (VMCB offsets 0x400-0xFFF; offsets below are relative to 0x400).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SaveArea {
    /// 0x000: ES.
    pub es: VmcbSegment,
    /// 0x010: CS.
    pub cs: VmcbSegment,
    /// 0x020: SS.
    pub ss: VmcbSegment,
    /// 0x030: DS.
    pub ds: VmcbSegment,
    /// 0x040: FS (loaded by VMLOAD, not VMRUN).
    pub fs: VmcbSegment,
    /// 0x050: GS (VMLOAD).
    pub gs: VmcbSegment,
    /// 0x060: GDTR (base and limit only).
    pub gdtr: VmcbSegment,
    /// 0x070: LDTR (VMLOAD).
    pub ldtr: VmcbSegment,
    /// 0x080: IDTR (base and limit only).
    pub idtr: VmcbSegment,
    /// 0x090: TR (VMLOAD).
    pub tr: VmcbSegment,
    _reserved_0a0: [u8; 0xcb - 0xa0],
    /// 0x0CB: CPL (must agree with SS.DPL).
    pub cpl: u8,
    _reserved_0cc: [u8; 4],
    /// 0x0D0: EFER. SVME must be set in the guest's EFER too.
    pub efer: u64,
    _reserved_0d8: [u8; 0x148 - 0xd8],
    /// 0x148: CR4.
    pub cr4: u64,
    /// 0x150: CR3 (a guest-physical address under nested paging).
    pub cr3: u64,
    /// 0x158: CR0.
    pub cr0: u64,
    /// 0x160: DR7.
    pub dr7: u64,
    /// 0x168: DR6.
    pub dr6: u64,
    /// 0x170: RFLAGS.
    pub rflags: u64,
    /// 0x178: RIP.
    pub rip: u64,
    _reserved_180: [u8; 0x1d8 - 0x180],
    /// 0x1D8: RSP.
    pub rsp: u64,
    _reserved_1e0: [u8; 0x1f8 - 0x1e0],
    /// 0x1F8: RAX.
    pub rax: u64,
    /// 0x200: STAR (VMLOAD).
    pub star: u64,
    /// 0x208: LSTAR (VMLOAD).
    pub lstar: u64,
    /// 0x210: CSTAR (VMLOAD).
    pub cstar: u64,
    /// 0x218: SFMASK (VMLOAD).
    pub sfmask: u64,
    /// 0x220: KernelGsBase (VMLOAD).
    pub kernel_gs_base: u64,
    /// 0x228: SYSENTER_CS (VMLOAD).
    pub sysenter_cs: u64,
    /// 0x230: SYSENTER_ESP (VMLOAD).
    pub sysenter_esp: u64,
    /// 0x238: SYSENTER_EIP (VMLOAD).
    pub sysenter_eip: u64,
    /// 0x240: CR2.
    pub cr2: u64,
    _reserved_248: [u8; 0x268 - 0x248],
    /// 0x268: the guest's PAT, used for guest memory types under nested paging.
    pub g_pat: u64,
    /// 0x270: DBGCTL (with LBR virtualization).
    pub dbgctl: u64,
    /// 0x278: BR_FROM.
    pub br_from: u64,
    /// 0x280: BR_TO.
    pub br_to: u64,
    /// 0x288: LASTEXCPFROM.
    pub last_excp_from: u64,
    /// 0x290: LASTEXCPTO.
    pub last_excp_to: u64,
    _reserved_298: [u8; 0xc00 - 0x298],
}

/// A VMCB: 4 KiB, 4 KiB-aligned.
///
/// ```
/// use tdp_svm::vmcb::{InterceptMisc2, Vmcb};
/// let mut vmcb = Vmcb::new();
/// vmcb.control.intercept_misc2 = InterceptMisc2::VMRUN | InterceptMisc2::VMMCALL;
/// vmcb.control.guest_asid = 1;
/// vmcb.save.rip = 0x1_0000;
/// assert_eq!(core::mem::size_of_val(&vmcb), 4096);
/// ```
#[repr(C, align(4096))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Vmcb {
    /// The control area.
    pub control: ControlArea,
    /// The state save area.
    pub save: SaveArea,
}

/// The PAT value after reset (WB, WT, UC-, UC, repeated), a sane guest PAT (`g_pat`).
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;

impl ControlArea {
    /// A zeroed control area.
    #[must_use]
    pub const fn zeroed() -> ControlArea {
        ControlArea {
            intercept_cr: 0,
            intercept_dr: 0,
            intercept_exceptions: 0,
            intercept_misc1: InterceptMisc1::empty(),
            intercept_misc2: InterceptMisc2::empty(),
            intercept_misc3: 0,
            _reserved_018: [0; 0x3c - 0x18],
            pause_filter_threshold: 0,
            pause_filter_count: 0,
            iopm_base_pa: 0,
            msrpm_base_pa: 0,
            tsc_offset: 0,
            guest_asid: 0,
            tlb_control: 0,
            _reserved_05d: [0; 3],
            int_ctl: 0,
            int_vector: 0,
            int_state: 0,
            _reserved_06c: [0; 4],
            exit_code: 0,
            exit_info1: 0,
            exit_info2: 0,
            exit_int_info: 0,
            np_control: 0,
            avic_apic_bar: 0,
            ghcb_gpa: 0,
            event_inj: 0,
            n_cr3: 0,
            lbr_virt: 0,
            vmcb_clean: 0,
            _reserved_0c4: [0; 4],
            next_rip: 0,
            insn_len: 0,
            insn_bytes: [0; 15],
            _reserved_0e0: [0; 0x400 - 0xe0],
        }
    }
}

impl SaveArea {
    /// A zeroed save area.
    #[must_use]
    pub const fn zeroed() -> SaveArea {
        let s = VmcbSegment::NULL;
        SaveArea {
            es: s,
            cs: s,
            ss: s,
            ds: s,
            fs: s,
            gs: s,
            gdtr: s,
            ldtr: s,
            idtr: s,
            tr: s,
            _reserved_0a0: [0; 0xcb - 0xa0],
            cpl: 0,
            _reserved_0cc: [0; 4],
            efer: 0,
            _reserved_0d8: [0; 0x148 - 0xd8],
            cr4: 0,
            cr3: 0,
            cr0: 0,
            dr7: 0,
            dr6: 0,
            rflags: 0,
            rip: 0,
            _reserved_180: [0; 0x1d8 - 0x180],
            rsp: 0,
            _reserved_1e0: [0; 0x1f8 - 0x1e0],
            rax: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            cr2: 0,
            _reserved_248: [0; 0x268 - 0x248],
            g_pat: 0,
            dbgctl: 0,
            br_from: 0,
            br_to: 0,
            last_excp_from: 0,
            last_excp_to: 0,
            _reserved_298: [0; 0xc00 - 0x298],
        }
    }
}

impl Vmcb {
    /// A zeroed VMCB.
    #[must_use]
    pub const fn new() -> Vmcb {
        Vmcb { control: ControlArea::zeroed(), save: SaveArea::zeroed() }
    }

    /// Whether nested paging is on (NP_ENABLE).
    #[must_use]
    pub const fn nested_paging(&self) -> bool {
        self.control.np_control & NP_ENABLE != 0
    }
}

impl Default for Vmcb {
    fn default() -> Self {
        Vmcb::new()
    }
}

impl fmt::Debug for ControlArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlArea")
            .field("intercept_exceptions", &format_args!("{:#x}", self.intercept_exceptions))
            .field("intercept_misc1", &self.intercept_misc1)
            .field("intercept_misc2", &self.intercept_misc2)
            .field("guest_asid", &self.guest_asid)
            .field("tlb_control", &self.tlb_control)
            .field("exit_code", &format_args!("{:#x}", self.exit_code))
            .field("exit_info1", &format_args!("{:#x}", self.exit_info1))
            .field("exit_info2", &format_args!("{:#x}", self.exit_info2))
            .field("np_control", &self.np_control)
            .field("n_cr3", &format_args!("{:#x}", self.n_cr3))
            .field("next_rip", &format_args!("{:#x}", self.next_rip))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SaveArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaveArea")
            .field("cs", &self.cs)
            .field("efer", &format_args!("{:#x}", self.efer))
            .field("cr0", &format_args!("{:#x}", self.cr0))
            .field("cr3", &format_args!("{:#x}", self.cr3))
            .field("cr4", &format_args!("{:#x}", self.cr4))
            .field("rip", &format_args!("{:#x}", self.rip))
            .field("rsp", &format_args!("{:#x}", self.rsp))
            .field("rax", &format_args!("{:#x}", self.rax))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Vmcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmcb").field("control", &self.control).field("save", &self.save).finish()
    }
}

// Sizes: table B-1 ends at 0x3FF, the save area starts at 0x400, the VMCB is one page.
const_assert_eq!(size_of::<VmcbSegment>(), 16);
const_assert_eq!(size_of::<ControlArea>(), 0x400);
const_assert_eq!(size_of::<SaveArea>(), 0xc00);
const_assert_eq!(size_of::<Vmcb>(), 4096);
const_assert_eq!(offset_of!(Vmcb, save), 0x400);
// Table B-1 (control area).
const_assert_eq!(offset_of!(ControlArea, intercept_exceptions), 0x008);
const_assert_eq!(offset_of!(ControlArea, intercept_misc1), 0x00c);
const_assert_eq!(offset_of!(ControlArea, intercept_misc2), 0x010);
const_assert_eq!(offset_of!(ControlArea, intercept_misc3), 0x014);
const_assert_eq!(offset_of!(ControlArea, pause_filter_threshold), 0x03c);
const_assert_eq!(offset_of!(ControlArea, pause_filter_count), 0x03e);
const_assert_eq!(offset_of!(ControlArea, iopm_base_pa), 0x040);
const_assert_eq!(offset_of!(ControlArea, msrpm_base_pa), 0x048);
const_assert_eq!(offset_of!(ControlArea, tsc_offset), 0x050);
const_assert_eq!(offset_of!(ControlArea, guest_asid), 0x058);
const_assert_eq!(offset_of!(ControlArea, tlb_control), 0x05c);
const_assert_eq!(offset_of!(ControlArea, int_ctl), 0x060);
const_assert_eq!(offset_of!(ControlArea, int_vector), 0x064);
const_assert_eq!(offset_of!(ControlArea, int_state), 0x068);
const_assert_eq!(offset_of!(ControlArea, exit_code), 0x070);
const_assert_eq!(offset_of!(ControlArea, exit_info1), 0x078);
const_assert_eq!(offset_of!(ControlArea, exit_info2), 0x080);
const_assert_eq!(offset_of!(ControlArea, exit_int_info), 0x088);
const_assert_eq!(offset_of!(ControlArea, np_control), 0x090);
const_assert_eq!(offset_of!(ControlArea, avic_apic_bar), 0x098);
const_assert_eq!(offset_of!(ControlArea, ghcb_gpa), 0x0a0);
const_assert_eq!(offset_of!(ControlArea, event_inj), 0x0a8);
const_assert_eq!(offset_of!(ControlArea, n_cr3), 0x0b0);
const_assert_eq!(offset_of!(ControlArea, lbr_virt), 0x0b8);
const_assert_eq!(offset_of!(ControlArea, vmcb_clean), 0x0c0);
const_assert_eq!(offset_of!(ControlArea, next_rip), 0x0c8);
const_assert_eq!(offset_of!(ControlArea, insn_len), 0x0d0);
const_assert_eq!(offset_of!(ControlArea, insn_bytes), 0x0d1);
// Table B-2 (save area, relative to 0x400).
const_assert_eq!(offset_of!(SaveArea, cs), 0x010);
const_assert_eq!(offset_of!(SaveArea, gdtr), 0x060);
const_assert_eq!(offset_of!(SaveArea, idtr), 0x080);
const_assert_eq!(offset_of!(SaveArea, tr), 0x090);
const_assert_eq!(offset_of!(SaveArea, cpl), 0x0cb);
const_assert_eq!(offset_of!(SaveArea, efer), 0x0d0);
const_assert_eq!(offset_of!(SaveArea, cr4), 0x148);
const_assert_eq!(offset_of!(SaveArea, cr3), 0x150);
const_assert_eq!(offset_of!(SaveArea, cr0), 0x158);
const_assert_eq!(offset_of!(SaveArea, dr7), 0x160);
const_assert_eq!(offset_of!(SaveArea, dr6), 0x168);
const_assert_eq!(offset_of!(SaveArea, rflags), 0x170);
const_assert_eq!(offset_of!(SaveArea, rip), 0x178);
const_assert_eq!(offset_of!(SaveArea, rsp), 0x1d8);
const_assert_eq!(offset_of!(SaveArea, rax), 0x1f8);
const_assert_eq!(offset_of!(SaveArea, star), 0x200);
const_assert_eq!(offset_of!(SaveArea, kernel_gs_base), 0x220);
const_assert_eq!(offset_of!(SaveArea, cr2), 0x240);
const_assert_eq!(offset_of!(SaveArea, g_pat), 0x268);
const_assert_eq!(offset_of!(SaveArea, last_excp_to), 0x290);

#[cfg(test)]
mod tests;
