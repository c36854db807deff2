//! The bits of the VM-execution, VM-exit and VM-entry control fields that a hypervisor under `tdp-vmx`
//! sets or checks. Bits not named here (the "default1" reserved bits) are kept by
//! [`crate::caps::AllowedControls::adjust`], not by these types.
//!
//! Source: Intel SDM Vol. 3C, sections "Pin-Based VM-Execution Controls", "Processor-Based VM-Execution
//! Controls" (tables "Definitions of Primary Processor-Based VM-Execution Controls" and "Definitions of
//! Secondary Processor-Based VM-Execution Controls"), "VM-Exit Controls" and "VM-Entry Controls"
//! (edition 325462-080, June 2023).

use bitflags::bitflags;

bitflags! {
    /// Pin-based VM-execution controls (VMCS field 0x4000).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PinControls: u32 {
        /// Bit 0: external interrupts cause VM exits.
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        /// Bit 3: NMIs cause VM exits.
        const NMI_EXITING = 1 << 3;
        /// Bit 5: virtual NMIs.
        const VIRTUAL_NMIS = 1 << 5;
        /// Bit 6: activate the VMX-preemption timer.
        const PREEMPTION_TIMER = 1 << 6;
        /// Bit 7: process posted interrupts.
        const POSTED_INTERRUPTS = 1 << 7;
    }
}

bitflags! {
    /// Primary processor-based VM-execution controls (VMCS field 0x4002).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PrimaryControls: u32 {
        /// Bit 2: interrupt-window exiting.
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        /// Bit 3: use TSC offsetting.
        const USE_TSC_OFFSETTING = 1 << 3;
        /// Bit 7: HLT causes a VM exit.
        const HLT_EXITING = 1 << 7;
        /// Bit 9: INVLPG causes a VM exit.
        const INVLPG_EXITING = 1 << 9;
        /// Bit 10: MWAIT causes a VM exit.
        const MWAIT_EXITING = 1 << 10;
        /// Bit 11: RDPMC causes a VM exit.
        const RDPMC_EXITING = 1 << 11;
        /// Bit 12: RDTSC causes a VM exit.
        const RDTSC_EXITING = 1 << 12;
        /// Bit 15: MOV to CR3 causes a VM exit (default1 without true controls).
        const CR3_LOAD_EXITING = 1 << 15;
        /// Bit 16: MOV from CR3 causes a VM exit (default1 without true controls).
        const CR3_STORE_EXITING = 1 << 16;
        /// Bit 17: activate tertiary controls.
        const ACTIVATE_TERTIARY_CONTROLS = 1 << 17;
        /// Bit 19: MOV to CR8 causes a VM exit.
        const CR8_LOAD_EXITING = 1 << 19;
        /// Bit 20: MOV from CR8 causes a VM exit.
        const CR8_STORE_EXITING = 1 << 20;
        /// Bit 21: use TPR shadow.
        const USE_TPR_SHADOW = 1 << 21;
        /// Bit 22: NMI-window exiting.
        const NMI_WINDOW_EXITING = 1 << 22;
        /// Bit 23: MOV DR causes a VM exit.
        const MOV_DR_EXITING = 1 << 23;
        /// Bit 24: every I/O instruction causes a VM exit.
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        /// Bit 25: use I/O bitmaps.
        const USE_IO_BITMAPS = 1 << 25;
        /// Bit 27: monitor trap flag.
        const MONITOR_TRAP_FLAG = 1 << 27;
        /// Bit 28: use MSR bitmaps.
        const USE_MSR_BITMAPS = 1 << 28;
        /// Bit 29: MONITOR causes a VM exit.
        const MONITOR_EXITING = 1 << 29;
        /// Bit 30: PAUSE causes a VM exit.
        const PAUSE_EXITING = 1 << 30;
        /// Bit 31: activate the secondary controls (needed for EPT, VPID, PML).
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
    }
}

bitflags! {
    /// Secondary processor-based VM-execution controls (VMCS field 0x401E).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SecondaryControls: u32 {
        /// Bit 0: virtualize APIC accesses.
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        /// Bit 1: enable EPT.
        const ENABLE_EPT = 1 << 1;
        /// Bit 2: descriptor-table exiting.
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        /// Bit 3: enable RDTSCP.
        const ENABLE_RDTSCP = 1 << 3;
        /// Bit 4: virtualize x2APIC mode.
        const VIRTUALIZE_X2APIC = 1 << 4;
        /// Bit 5: enable VPID.
        const ENABLE_VPID = 1 << 5;
        /// Bit 6: WBINVD exiting.
        const WBINVD_EXITING = 1 << 6;
        /// Bit 7: unrestricted guest (real mode and unpaged protected mode under EPT).
        const UNRESTRICTED_GUEST = 1 << 7;
        /// Bit 8: APIC-register virtualization.
        const APIC_REGISTER_VIRTUALIZATION = 1 << 8;
        /// Bit 9: virtual-interrupt delivery.
        const VIRTUAL_INTERRUPT_DELIVERY = 1 << 9;
        /// Bit 10: PAUSE-loop exiting.
        const PAUSE_LOOP_EXITING = 1 << 10;
        /// Bit 11: RDRAND exiting.
        const RDRAND_EXITING = 1 << 11;
        /// Bit 12: enable INVPCID.
        const ENABLE_INVPCID = 1 << 12;
        /// Bit 13: enable VM functions.
        const ENABLE_VM_FUNCTIONS = 1 << 13;
        /// Bit 14: VMCS shadowing.
        const VMCS_SHADOWING = 1 << 14;
        /// Bit 15: ENCLS exiting.
        const ENCLS_EXITING = 1 << 15;
        /// Bit 16: RDSEED exiting.
        const RDSEED_EXITING = 1 << 16;
        /// Bit 17: enable PML (page-modification logging; needs EPT A/D flags in the EPTP).
        const ENABLE_PML = 1 << 17;
        /// Bit 18: EPT-violation #VE.
        const EPT_VIOLATION_VE = 1 << 18;
        /// Bit 19: conceal VMX from Intel PT.
        const CONCEAL_VMX_FROM_PT = 1 << 19;
        /// Bit 20: enable XSAVES/XRSTORS.
        const ENABLE_XSAVES = 1 << 20;
        /// Bit 22: mode-based execute control for EPT.
        const MODE_BASED_EPT_EXEC = 1 << 22;
        /// Bit 23: sub-page write permissions for EPT.
        const SUBPAGE_WRITE_PERMISSIONS = 1 << 23;
        /// Bit 24: Intel PT uses guest-physical addresses.
        const PT_USES_GUEST_PHYSICAL = 1 << 24;
        /// Bit 25: use TSC scaling.
        const USE_TSC_SCALING = 1 << 25;
        /// Bit 26: enable user wait and pause.
        const ENABLE_USER_WAIT_PAUSE = 1 << 26;
    }
}

bitflags! {
    /// Primary VM-exit controls (VMCS field 0x400C).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ExitControls: u32 {
        /// Bit 2: save debug controls.
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        /// Bit 9: host address-space size (64-bit host).
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        /// Bit 12: load IA32_PERF_GLOBAL_CTRL.
        const LOAD_PERF_GLOBAL_CTRL = 1 << 12;
        /// Bit 15: acknowledge interrupt on exit.
        const ACK_INTERRUPT_ON_EXIT = 1 << 15;
        /// Bit 18: save IA32_PAT.
        const SAVE_IA32_PAT = 1 << 18;
        /// Bit 19: load IA32_PAT.
        const LOAD_IA32_PAT = 1 << 19;
        /// Bit 20: save IA32_EFER.
        const SAVE_IA32_EFER = 1 << 20;
        /// Bit 21: load IA32_EFER.
        const LOAD_IA32_EFER = 1 << 21;
        /// Bit 22: save the VMX-preemption timer value.
        const SAVE_PREEMPTION_TIMER = 1 << 22;
    }
}

bitflags! {
    /// VM-entry controls (VMCS field 0x4012).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EntryControls: u32 {
        /// Bit 2: load debug controls.
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        /// Bit 9: IA-32e mode guest.
        const IA32E_MODE_GUEST = 1 << 9;
        /// Bit 10: entry to SMM.
        const ENTRY_TO_SMM = 1 << 10;
        /// Bit 11: deactivate dual-monitor treatment.
        const DEACTIVATE_DUAL_MONITOR = 1 << 11;
        /// Bit 13: load IA32_PERF_GLOBAL_CTRL.
        const LOAD_PERF_GLOBAL_CTRL = 1 << 13;
        /// Bit 14: load IA32_PAT.
        const LOAD_IA32_PAT = 1 << 14;
        /// Bit 15: load IA32_EFER.
        const LOAD_IA32_EFER = 1 << 15;
    }
}
