//! The VMCS field encodings as named constants on [`VmcsField`], with the SDM's name of each, in the
//! order of Vol. 3D appendix "Field Encoding in VMCS" (edition 325462-080).

use super::VmcsField;

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident = $value:literal, $text:literal;)*) => {
        impl VmcsField {
            $($(#[$doc])* pub const $name: VmcsField = VmcsField($value);)*
        }
        /// Every named field with its SDM name.
        pub(super) const ALL: &[(VmcsField, &str)] = &[$((VmcsField::$name, $text)),*];
    };
}

fields! {
    // 16-bit control fields.
    /// Virtual-processor identifier (with "enable VPID").
    VPID = 0x0000, "VPID";
    /// Posted-interrupt notification vector.
    POSTED_INTR_NOTIFICATION_VECTOR = 0x0002, "posted-interrupt notification vector";
    /// EPTP index (with EPT-violation #VE).
    EPTP_INDEX = 0x0004, "EPTP index";
    // 16-bit guest-state fields.
    /// Guest ES selector.
    GUEST_ES_SELECTOR = 0x0800, "guest ES selector";
    /// Guest CS selector.
    GUEST_CS_SELECTOR = 0x0802, "guest CS selector";
    /// Guest SS selector.
    GUEST_SS_SELECTOR = 0x0804, "guest SS selector";
    /// Guest DS selector.
    GUEST_DS_SELECTOR = 0x0806, "guest DS selector";
    /// Guest FS selector.
    GUEST_FS_SELECTOR = 0x0808, "guest FS selector";
    /// Guest GS selector.
    GUEST_GS_SELECTOR = 0x080a, "guest GS selector";
    /// Guest LDTR selector.
    GUEST_LDTR_SELECTOR = 0x080c, "guest LDTR selector";
    /// Guest TR selector.
    GUEST_TR_SELECTOR = 0x080e, "guest TR selector";
    /// Guest interrupt status (virtual-interrupt delivery).
    GUEST_INTR_STATUS = 0x0810, "guest interrupt status";
    /// PML index: the next entry of the page-modification log the CPU writes (511 when empty).
    GUEST_PML_INDEX = 0x0812, "PML index";
    // 16-bit host-state fields.
    /// Host ES selector.
    HOST_ES_SELECTOR = 0x0c00, "host ES selector";
    /// Host CS selector.
    HOST_CS_SELECTOR = 0x0c02, "host CS selector";
    /// Host SS selector.
    HOST_SS_SELECTOR = 0x0c04, "host SS selector";
    /// Host DS selector.
    HOST_DS_SELECTOR = 0x0c06, "host DS selector";
    /// Host FS selector.
    HOST_FS_SELECTOR = 0x0c08, "host FS selector";
    /// Host GS selector.
    HOST_GS_SELECTOR = 0x0c0a, "host GS selector";
    /// Host TR selector (must not be 0: VM entry fails with error 8).
    HOST_TR_SELECTOR = 0x0c0c, "host TR selector";
    // 64-bit control fields.
    /// Address of I/O bitmap A.
    IO_BITMAP_A = 0x2000, "I/O bitmap A address";
    /// Address of I/O bitmap B.
    IO_BITMAP_B = 0x2002, "I/O bitmap B address";
    /// Address of the MSR bitmaps.
    MSR_BITMAP = 0x2004, "MSR-bitmap address";
    /// VM-exit MSR-store address.
    VM_EXIT_MSR_STORE_ADDR = 0x2006, "VM-exit MSR-store address";
    /// VM-exit MSR-load address.
    VM_EXIT_MSR_LOAD_ADDR = 0x2008, "VM-exit MSR-load address";
    /// VM-entry MSR-load address.
    VM_ENTRY_MSR_LOAD_ADDR = 0x200a, "VM-entry MSR-load address";
    /// Executive-VMCS pointer.
    EXECUTIVE_VMCS_POINTER = 0x200c, "executive-VMCS pointer";
    /// PML address: physical address of the 4 KiB page-modification log.
    PML_ADDRESS = 0x200e, "PML address";
    /// TSC offset.
    TSC_OFFSET = 0x2010, "TSC offset";
    /// Virtual-APIC address.
    VIRTUAL_APIC_PAGE_ADDR = 0x2012, "virtual-APIC address";
    /// APIC-access address.
    APIC_ACCESS_ADDR = 0x2014, "APIC-access address";
    /// Posted-interrupt descriptor address.
    POSTED_INTR_DESC_ADDR = 0x2016, "posted-interrupt descriptor address";
    /// VM-function controls.
    VM_FUNCTION_CONTROLS = 0x2018, "VM-function controls";
    /// EPT pointer (EPTP).
    EPT_POINTER = 0x201a, "EPT pointer";
    /// EOI-exit bitmap 0.
    EOI_EXIT_BITMAP0 = 0x201c, "EOI-exit bitmap 0";
    /// EOI-exit bitmap 1.
    EOI_EXIT_BITMAP1 = 0x201e, "EOI-exit bitmap 1";
    /// EOI-exit bitmap 2.
    EOI_EXIT_BITMAP2 = 0x2020, "EOI-exit bitmap 2";
    /// EOI-exit bitmap 3.
    EOI_EXIT_BITMAP3 = 0x2022, "EOI-exit bitmap 3";
    /// EPTP-list address.
    EPTP_LIST_ADDRESS = 0x2024, "EPTP-list address";
    /// VMREAD-bitmap address.
    VMREAD_BITMAP = 0x2026, "VMREAD-bitmap address";
    /// VMWRITE-bitmap address.
    VMWRITE_BITMAP = 0x2028, "VMWRITE-bitmap address";
    /// Virtualization-exception information address.
    VE_INFO_ADDRESS = 0x202a, "virtualization-exception information address";
    /// XSS-exiting bitmap.
    XSS_EXIT_BITMAP = 0x202c, "XSS-exiting bitmap";
    /// ENCLS-exiting bitmap.
    ENCLS_EXITING_BITMAP = 0x202e, "ENCLS-exiting bitmap";
    /// TSC multiplier.
    TSC_MULTIPLIER = 0x2032, "TSC multiplier";
    // 64-bit read-only data field.
    /// Guest-physical address of an EPT violation or misconfiguration.
    GUEST_PHYSICAL_ADDRESS = 0x2400, "guest-physical address";
    // 64-bit guest-state fields.
    /// VMCS link pointer (all ones when unused).
    VMCS_LINK_POINTER = 0x2800, "VMCS link pointer";
    /// Guest IA32_DEBUGCTL.
    GUEST_IA32_DEBUGCTL = 0x2802, "guest IA32_DEBUGCTL";
    /// Guest IA32_PAT.
    GUEST_IA32_PAT = 0x2804, "guest IA32_PAT";
    /// Guest IA32_EFER.
    GUEST_IA32_EFER = 0x2806, "guest IA32_EFER";
    /// Guest IA32_PERF_GLOBAL_CTRL.
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808, "guest IA32_PERF_GLOBAL_CTRL";
    /// Guest PDPTE0 (PAE paging under EPT).
    GUEST_PDPTE0 = 0x280a, "guest PDPTE0";
    /// Guest PDPTE1.
    GUEST_PDPTE1 = 0x280c, "guest PDPTE1";
    /// Guest PDPTE2.
    GUEST_PDPTE2 = 0x280e, "guest PDPTE2";
    /// Guest PDPTE3.
    GUEST_PDPTE3 = 0x2810, "guest PDPTE3";
    /// Guest IA32_BNDCFGS.
    GUEST_IA32_BNDCFGS = 0x2812, "guest IA32_BNDCFGS";
    // 64-bit host-state fields.
    /// Host IA32_PAT.
    HOST_IA32_PAT = 0x2c00, "host IA32_PAT";
    /// Host IA32_EFER.
    HOST_IA32_EFER = 0x2c02, "host IA32_EFER";
    /// Host IA32_PERF_GLOBAL_CTRL.
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2c04, "host IA32_PERF_GLOBAL_CTRL";
    // 32-bit control fields.
    /// Pin-based VM-execution controls.
    PIN_BASED_VM_EXEC_CONTROL = 0x4000, "pin-based VM-execution controls";
    /// Primary processor-based VM-execution controls.
    CPU_BASED_VM_EXEC_CONTROL = 0x4002, "primary processor-based VM-execution controls";
    /// Exception bitmap.
    EXCEPTION_BITMAP = 0x4004, "exception bitmap";
    /// Page-fault error-code mask.
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006, "page-fault error-code mask";
    /// Page-fault error-code match.
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008, "page-fault error-code match";
    /// CR3-target count.
    CR3_TARGET_COUNT = 0x400a, "CR3-target count";
    /// Primary VM-exit controls.
    VM_EXIT_CONTROLS = 0x400c, "VM-exit controls";
    /// VM-exit MSR-store count.
    VM_EXIT_MSR_STORE_COUNT = 0x400e, "VM-exit MSR-store count";
    /// VM-exit MSR-load count.
    VM_EXIT_MSR_LOAD_COUNT = 0x4010, "VM-exit MSR-load count";
    /// VM-entry controls.
    VM_ENTRY_CONTROLS = 0x4012, "VM-entry controls";
    /// VM-entry MSR-load count.
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014, "VM-entry MSR-load count";
    /// VM-entry interruption-information field.
    VM_ENTRY_INTR_INFO = 0x4016, "VM-entry interruption-information field";
    /// VM-entry exception error code.
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018, "VM-entry exception error code";
    /// VM-entry instruction length.
    VM_ENTRY_INSTRUCTION_LEN = 0x401a, "VM-entry instruction length";
    /// TPR threshold.
    TPR_THRESHOLD = 0x401c, "TPR threshold";
    /// Secondary processor-based VM-execution controls.
    SECONDARY_VM_EXEC_CONTROL = 0x401e, "secondary processor-based VM-execution controls";
    /// PLE gap.
    PLE_GAP = 0x4020, "PLE gap";
    /// PLE window.
    PLE_WINDOW = 0x4022, "PLE window";
    // 32-bit read-only data fields.
    /// VM-instruction error: why the last VMfailValid happened.
    VM_INSTRUCTION_ERROR = 0x4400, "VM-instruction error";
    /// Exit reason.
    EXIT_REASON = 0x4402, "exit reason";
    /// VM-exit interruption information.
    VM_EXIT_INTR_INFO = 0x4404, "VM-exit interruption information";
    /// VM-exit interruption error code.
    VM_EXIT_INTR_ERROR_CODE = 0x4406, "VM-exit interruption error code";
    /// IDT-vectoring information field.
    IDT_VECTORING_INFO = 0x4408, "IDT-vectoring information field";
    /// IDT-vectoring error code.
    IDT_VECTORING_ERROR_CODE = 0x440a, "IDT-vectoring error code";
    /// VM-exit instruction length.
    VM_EXIT_INSTRUCTION_LEN = 0x440c, "VM-exit instruction length";
    /// VM-exit instruction information.
    VMX_INSTRUCTION_INFO = 0x440e, "VM-exit instruction information";
    // 32-bit guest-state fields.
    /// Guest ES limit.
    GUEST_ES_LIMIT = 0x4800, "guest ES limit";
    /// Guest CS limit.
    GUEST_CS_LIMIT = 0x4802, "guest CS limit";
    /// Guest SS limit.
    GUEST_SS_LIMIT = 0x4804, "guest SS limit";
    /// Guest DS limit.
    GUEST_DS_LIMIT = 0x4806, "guest DS limit";
    /// Guest FS limit.
    GUEST_FS_LIMIT = 0x4808, "guest FS limit";
    /// Guest GS limit.
    GUEST_GS_LIMIT = 0x480a, "guest GS limit";
    /// Guest LDTR limit.
    GUEST_LDTR_LIMIT = 0x480c, "guest LDTR limit";
    /// Guest TR limit.
    GUEST_TR_LIMIT = 0x480e, "guest TR limit";
    /// Guest GDTR limit.
    GUEST_GDTR_LIMIT = 0x4810, "guest GDTR limit";
    /// Guest IDTR limit.
    GUEST_IDTR_LIMIT = 0x4812, "guest IDTR limit";
    /// Guest ES access rights.
    GUEST_ES_AR_BYTES = 0x4814, "guest ES access rights";
    /// Guest CS access rights.
    GUEST_CS_AR_BYTES = 0x4816, "guest CS access rights";
    /// Guest SS access rights.
    GUEST_SS_AR_BYTES = 0x4818, "guest SS access rights";
    /// Guest DS access rights.
    GUEST_DS_AR_BYTES = 0x481a, "guest DS access rights";
    /// Guest FS access rights.
    GUEST_FS_AR_BYTES = 0x481c, "guest FS access rights";
    /// Guest GS access rights.
    GUEST_GS_AR_BYTES = 0x481e, "guest GS access rights";
    /// Guest LDTR access rights.
    GUEST_LDTR_AR_BYTES = 0x4820, "guest LDTR access rights";
    /// Guest TR access rights.
    GUEST_TR_AR_BYTES = 0x4822, "guest TR access rights";
    /// Guest interruptibility state.
    GUEST_INTERRUPTIBILITY_INFO = 0x4824, "guest interruptibility state";
    /// Guest activity state.
    GUEST_ACTIVITY_STATE = 0x4826, "guest activity state";
    /// Guest SMBASE.
    GUEST_SMBASE = 0x4828, "guest SMBASE";
    /// Guest IA32_SYSENTER_CS.
    GUEST_SYSENTER_CS = 0x482a, "guest IA32_SYSENTER_CS";
    /// VMX-preemption timer value.
    VMX_PREEMPTION_TIMER_VALUE = 0x482e, "VMX-preemption timer value";
    // 32-bit host-state field.
    /// Host IA32_SYSENTER_CS.
    HOST_IA32_SYSENTER_CS = 0x4c00, "host IA32_SYSENTER_CS";
    // Natural-width control fields.
    /// CR0 guest/host mask.
    CR0_GUEST_HOST_MASK = 0x6000, "CR0 guest/host mask";
    /// CR4 guest/host mask.
    CR4_GUEST_HOST_MASK = 0x6002, "CR4 guest/host mask";
    /// CR0 read shadow.
    CR0_READ_SHADOW = 0x6004, "CR0 read shadow";
    /// CR4 read shadow.
    CR4_READ_SHADOW = 0x6006, "CR4 read shadow";
    /// CR3-target value 0.
    CR3_TARGET_VALUE0 = 0x6008, "CR3-target value 0";
    /// CR3-target value 1.
    CR3_TARGET_VALUE1 = 0x600a, "CR3-target value 1";
    /// CR3-target value 2.
    CR3_TARGET_VALUE2 = 0x600c, "CR3-target value 2";
    /// CR3-target value 3.
    CR3_TARGET_VALUE3 = 0x600e, "CR3-target value 3";
    // Natural-width read-only data fields.
    /// Exit qualification.
    EXIT_QUALIFICATION = 0x6400, "exit qualification";
    /// I/O RCX.
    IO_RCX = 0x6402, "I/O RCX";
    /// I/O RSI.
    IO_RSI = 0x6404, "I/O RSI";
    /// I/O RDI.
    IO_RDI = 0x6406, "I/O RDI";
    /// I/O RIP.
    IO_RIP = 0x6408, "I/O RIP";
    /// Guest-linear address (valid for an EPT violation when qualification bit 7 is set).
    GUEST_LINEAR_ADDRESS = 0x640a, "guest-linear address";
    // Natural-width guest-state fields.
    /// Guest CR0.
    GUEST_CR0 = 0x6800, "guest CR0";
    /// Guest CR3.
    GUEST_CR3 = 0x6802, "guest CR3";
    /// Guest CR4.
    GUEST_CR4 = 0x6804, "guest CR4";
    /// Guest ES base.
    GUEST_ES_BASE = 0x6806, "guest ES base";
    /// Guest CS base.
    GUEST_CS_BASE = 0x6808, "guest CS base";
    /// Guest SS base.
    GUEST_SS_BASE = 0x680a, "guest SS base";
    /// Guest DS base.
    GUEST_DS_BASE = 0x680c, "guest DS base";
    /// Guest FS base.
    GUEST_FS_BASE = 0x680e, "guest FS base";
    /// Guest GS base.
    GUEST_GS_BASE = 0x6810, "guest GS base";
    /// Guest LDTR base.
    GUEST_LDTR_BASE = 0x6812, "guest LDTR base";
    /// Guest TR base.
    GUEST_TR_BASE = 0x6814, "guest TR base";
    /// Guest GDTR base.
    GUEST_GDTR_BASE = 0x6816, "guest GDTR base";
    /// Guest IDTR base.
    GUEST_IDTR_BASE = 0x6818, "guest IDTR base";
    /// Guest DR7.
    GUEST_DR7 = 0x681a, "guest DR7";
    /// Guest RSP.
    GUEST_RSP = 0x681c, "guest RSP";
    /// Guest RIP.
    GUEST_RIP = 0x681e, "guest RIP";
    /// Guest RFLAGS.
    GUEST_RFLAGS = 0x6820, "guest RFLAGS";
    /// Guest pending debug exceptions.
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822, "guest pending debug exceptions";
    /// Guest IA32_SYSENTER_ESP.
    GUEST_SYSENTER_ESP = 0x6824, "guest IA32_SYSENTER_ESP";
    /// Guest IA32_SYSENTER_EIP.
    GUEST_SYSENTER_EIP = 0x6826, "guest IA32_SYSENTER_EIP";
    // Natural-width host-state fields.
    /// Host CR0.
    HOST_CR0 = 0x6c00, "host CR0";
    /// Host CR3.
    HOST_CR3 = 0x6c02, "host CR3";
    /// Host CR4.
    HOST_CR4 = 0x6c04, "host CR4";
    /// Host FS base.
    HOST_FS_BASE = 0x6c06, "host FS base";
    /// Host GS base.
    HOST_GS_BASE = 0x6c08, "host GS base";
    /// Host TR base.
    HOST_TR_BASE = 0x6c0a, "host TR base";
    /// Host GDTR base.
    HOST_GDTR_BASE = 0x6c0c, "host GDTR base";
    /// Host IDTR base.
    HOST_IDTR_BASE = 0x6c0e, "host IDTR base";
    /// Host IA32_SYSENTER_ESP.
    HOST_IA32_SYSENTER_ESP = 0x6c10, "host IA32_SYSENTER_ESP";
    /// Host IA32_SYSENTER_EIP.
    HOST_IA32_SYSENTER_EIP = 0x6c12, "host IA32_SYSENTER_EIP";
    /// Host RSP.
    HOST_RSP = 0x6c14, "host RSP";
    /// Host RIP.
    HOST_RIP = 0x6c16, "host RIP";
}
