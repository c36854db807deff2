//! IA32_VMX_EPT_VPID_CAP (MSR 0x48C): what EPT and VPID can do on this CPU.
//!
//! Source: Intel SDM Vol. 3D, appendix "VMX Capability Reporting Facility", section "VPID and EPT
//! Capabilities" (edition 325462-080, June 2023).

use bitflags::bitflags;

bitflags! {
    /// IA32_VMX_EPT_VPID_CAP bits. Unnamed bits are kept (`from_bits_retain`).
    ///
    /// ```
    /// use tdp_vmx::caps::EptVpidCap;
    /// let sandy = EptVpidCap::from_bits_retain(0x0000_0f01_0611_4141); // Bochs sandy_bridge_2600k
    /// assert!(sandy.contains(EptVpidCap::WALK_LENGTH_4 | EptVpidCap::PDE_2M | EptVpidCap::INVEPT));
    /// assert!(!sandy.contains(EptVpidCap::ACCESSED_DIRTY) && !sandy.contains(EptVpidCap::PDPTE_1G));
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptVpidCap: u64 {
        /// Bit 0: execute-only EPT translations.
        const EXECUTE_ONLY = 1 << 0;
        /// Bit 6: page-walk length of 4.
        const WALK_LENGTH_4 = 1 << 6;
        /// Bit 7: page-walk length of 5.
        const WALK_LENGTH_5 = 1 << 7;
        /// Bit 8: the EPT paging structures may be uncacheable (EPTP memory type 0).
        const MEMTYPE_UC = 1 << 8;
        /// Bit 14: the EPT paging structures may be write-back (EPTP memory type 6).
        const MEMTYPE_WB = 1 << 14;
        /// Bit 16: EPT PDEs may map 2 MiB pages.
        const PDE_2M = 1 << 16;
        /// Bit 17: EPT PDPTEs may map 1 GiB pages.
        const PDPTE_1G = 1 << 17;
        /// Bit 20: INVEPT is supported.
        const INVEPT = 1 << 20;
        /// Bit 21: accessed and dirty flags for EPT.
        const ACCESSED_DIRTY = 1 << 21;
        /// Bit 22: advanced VM-exit information for EPT violations.
        const ADVANCED_EXIT_INFO = 1 << 22;
        /// Bit 23: supervisor shadow-stack control.
        const SUPERVISOR_SHADOW_STACK = 1 << 23;
        /// Bit 25: single-context INVEPT.
        const INVEPT_SINGLE_CONTEXT = 1 << 25;
        /// Bit 26: all-context INVEPT.
        const INVEPT_ALL_CONTEXT = 1 << 26;
        /// Bit 32: INVVPID is supported.
        const INVVPID = 1 << 32;
        /// Bit 40: individual-address INVVPID.
        const INVVPID_INDIVIDUAL_ADDRESS = 1 << 40;
        /// Bit 41: single-context INVVPID.
        const INVVPID_SINGLE_CONTEXT = 1 << 41;
        /// Bit 42: all-context INVVPID.
        const INVVPID_ALL_CONTEXT = 1 << 42;
        /// Bit 43: single-context-retaining-globals INVVPID.
        const INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43;
    }
}
