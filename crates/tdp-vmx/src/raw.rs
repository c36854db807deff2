//! Every `unsafe` operation of the crate: the VMX and MSR instructions in inline assembly
//! ([`X86Vmx`]). The identity-mapped region of table pages ([`IdentityRegion`], [`TablePage`]) is
//! `tdp-metal`'s, re-exported here.
//!
//! Nothing outside this module uses `unsafe` (the crate root denies `unsafe_code` and only this module
//! allows it). The instructions compile for any x86_64 target, so the crate builds and its host-side
//! tests run on Linux, but they execute only on bare metal: at CPL 3 each of them raises #GP or #UD.
//!
//! Source for the instruction forms and flag conventions: Intel SDM Vol. 3C, chapter "VMX Instruction
//! Reference" (VMREAD, VMWRITE, INVEPT, INVVPID, VMXON, VMCLEAR, VMPTRLD, VMXOFF and the "Conventions"
//! section on VMsucceed / VMfailInvalid / VMfailValid), edition 325462-080, June 2023.
#![allow(unsafe_code)]

pub use tdp_metal::region::{IdentityRegion, TablePage};

#[cfg(target_arch = "x86_64")]
pub use x86::X86Vmx;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::asm;

    use crate::instr::{VmFail, VmxError, VmxInstructions, VmxOp};
    use crate::inv::{InveptDescriptor, InveptKind, InvvpidDescriptor, InvvpidKind};
    use crate::vmcs::{VmInstructionError, VmcsField};

    /// The real instructions, for a hypervisor running at CPL 0.
    ///
    /// Each call acts on the calling CPU: its current VMCS for VMREAD/VMWRITE, its TLBs for the
    /// invalidations. Failures are read from RFLAGS right after the instruction; a VMfailValid also
    /// reads the VM-instruction error field.
    ///
    /// Bringing a CPU into VMX root operation with it (ring-0 code, so the example only compiles):
    ///
    /// ```no_run
    /// use tdp_vmx::caps::VmxCapabilities;
    /// use tdp_vmx::instr::VmxInstructions;
    /// use tdp_vmx::msr;
    /// use tdp_vmx::raw::X86Vmx;
    /// # fn bring_up(vmxon_region: u64, vmcs: u64) -> Result<(), Box<dyn std::error::Error>> {
    /// // SAFETY: this code runs at CPL 0 on a CPU whose CPUID reports VMX.
    /// let vmx = unsafe { X86Vmx::new() };
    /// VmxCapabilities::check_feature_control(vmx.rdmsr(msr::IA32_FEATURE_CONTROL))?;
    /// let caps = VmxCapabilities::read(&vmx);
    /// let ept = caps.ept_features()?; // e.g. CapsError::NoEpt on Bochs' bx_generic
    /// // ... set CR0/CR4 with caps.cr0.adjust / caps.cr4.adjust (CR4.VMXE), write
    /// // caps.basic.revision_id() into both 4 KiB regions ...
    /// // SAFETY: CPL 0, CR4.VMXE set, CR0/CR4 within the fixed bits, IA32_FEATURE_CONTROL checked above,
    /// // and both regions are pages of RAM reserved for the CPU.
    /// unsafe {
    ///     vmx.vmxon(vmxon_region)?;
    ///     vmx.vmclear(vmcs)?;
    ///     vmx.vmptrld(vmcs)?;
    /// }
    /// # let _ = ept;
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct X86Vmx {
        _private: (),
    }

    impl X86Vmx {
        /// The instruction layer.
        ///
        /// # Safety
        /// Every method must be called at CPL 0 on a CPU with VMX (CPUID.1:ECX.VMX); VMREAD, VMWRITE,
        /// INVEPT and INVVPID additionally in VMX root operation (after [`X86Vmx::vmxon`]). `rdmsr` is
        /// called only for MSRs the CPU has ([`crate::caps::VmxCapabilities::read`] checks that).
        #[must_use]
        pub const unsafe fn new() -> X86Vmx {
            X86Vmx { _private: () }
        }

        /// VMXON with the VMXON region at physical address `region` (4 KiB-aligned, revision id in its
        /// first dword).
        ///
        /// # Errors
        /// [`VmxError`] with VMfailInvalid (bad region or revision) or VMfailValid (already in VMX root).
        ///
        /// # Safety
        /// CPL 0, CR4.VMXE set, CR0/CR4 within the fixed bits, IA32_FEATURE_CONTROL locked with VMXON
        /// enabled, and `region` a page of RAM reserved for the CPU until VMXOFF.
        pub unsafe fn vmxon(&self, region: u64) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: the caller guarantees the VMXON preconditions; the operand is a pointer to a
            // local u64 holding the physical address, live for the instruction.
            unsafe {
                asm!("vmxon qword ptr [{r}]", "setc {cf}", "setz {zf}",
                     r = in(reg) &region, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Vmxon { region }, cf, zf)
        }

        /// VMXOFF.
        ///
        /// # Errors
        /// [`VmxError`] when the CPU refuses (dual-monitor treatment active).
        ///
        /// # Safety
        /// CPL 0 in VMX root operation; no guest runs on this CPU afterwards until a new VMXON.
        pub unsafe fn vmxoff(&self) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: the caller guarantees VMX root operation at CPL 0.
            unsafe {
                asm!("vmxoff", "setc {cf}", "setz {zf}", cf = out(reg_byte) cf, zf = out(reg_byte) zf,
                     options(nostack));
            }
            self.check(VmxOp::Vmxoff, cf, zf)
        }

        /// VMCLEAR of the VMCS at physical address `vmcs`.
        ///
        /// # Errors
        /// [`VmxError`]: bad address, or the VMXON region's address.
        ///
        /// # Safety
        /// CPL 0 in VMX root operation; `vmcs` is a 4 KiB page of RAM reserved for this VMCS.
        pub unsafe fn vmclear(&self, vmcs: u64) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: the caller guarantees VMX root operation and that `vmcs` is a VMCS page; the operand
            // points to a live local.
            unsafe {
                asm!("vmclear qword ptr [{r}]", "setc {cf}", "setz {zf}",
                     r = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Vmclear { vmcs }, cf, zf)
        }

        /// VMPTRLD: makes the VMCS at physical address `vmcs` current on this CPU.
        ///
        /// # Errors
        /// [`VmxError`]: bad address, VMXON pointer, or wrong revision id.
        ///
        /// # Safety
        /// CPL 0 in VMX root operation; `vmcs` is a VMCLEARed 4 KiB page of RAM with the revision id.
        pub unsafe fn vmptrld(&self, vmcs: u64) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: the caller guarantees VMX root operation and a valid VMCS page; the operand points
            // to a live local.
            unsafe {
                asm!("vmptrld qword ptr [{r}]", "setc {cf}", "setz {zf}",
                     r = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Vmptrld { vmcs }, cf, zf)
        }

        /// Turns the flags after a VMX instruction into a result: CF is VMfailInvalid, ZF VMfailValid
        /// (with the error number from the current VMCS).
        fn check(&self, op: VmxOp, cf: u8, zf: u8) -> Result<(), VmxError> {
            if cf != 0 {
                return Err(VmxError { op, fail: VmFail::Invalid });
            }
            if zf != 0 {
                let (number, cf, zf) = self.raw_vmread(VmcsField::VM_INSTRUCTION_ERROR);
                // If even that read fails there is no VMCS to ask: report VMfailInvalid.
                let fail = if cf == 0 && zf == 0 {
                    VmFail::Valid(VmInstructionError::from_raw(number as u32))
                } else {
                    VmFail::Invalid
                };
                return Err(VmxError { op, fail });
            }
            Ok(())
        }

        fn raw_vmread(&self, field: VmcsField) -> (u64, u8, u8) {
            let (value, cf, zf): (u64, u8, u8);
            // SAFETY: `new`'s contract puts every call in VMX root operation at CPL 0; VMREAD writes only
            // the output register and flags, and a bad field is reported in the flags.
            unsafe {
                asm!("vmread {v}, {f}", "setc {cf}", "setz {zf}",
                     v = out(reg) value, f = in(reg) u64::from(field.raw()),
                     cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            (value, cf, zf)
        }
    }

    impl VmxInstructions for X86Vmx {
        fn rdmsr(&self, msr: u32) -> u64 {
            let (lo, hi): (u32, u32);
            // SAFETY: `new`'s contract: CPL 0 and only MSRs the CPU has, so RDMSR does not fault; it
            // touches only EAX/EDX.
            unsafe {
                asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
            }
            (u64::from(hi) << 32) | u64::from(lo)
        }

        fn vmread(&self, field: VmcsField) -> Result<u64, VmxError> {
            let (value, cf, zf) = self.raw_vmread(field);
            self.check(VmxOp::Vmread { field }, cf, zf)?;
            Ok(value)
        }

        fn vmwrite(&self, field: VmcsField, value: u64) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: `new`'s contract puts the call in VMX root operation at CPL 0; VMWRITE changes only
            // the current VMCS (CPU-owned memory Rust never references) and the flags.
            unsafe {
                asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}",
                     f = in(reg) u64::from(field.raw()), v = in(reg) value,
                     cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Vmwrite { field, value }, cf, zf)
        }

        fn invept(&self, kind: InveptKind, desc: &InveptDescriptor) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: `new`'s contract puts the call in VMX root operation at CPL 0; INVEPT reads the
            // 16-byte descriptor behind a live reference and invalidates CPU caches only. No `readonly` or
            // `nomem`: the block is a full compiler barrier, so every SPTE store the flush is for is
            // emitted before it, as KVM's `__invept` (an asm with a memory clobber) does.
            unsafe {
                asm!("invept {t}, xmmword ptr [{d}]", "setc {cf}", "setz {zf}",
                     t = in(reg) kind as u64, d = in(reg) desc as *const InveptDescriptor,
                     cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Invept { kind, eptp: desc.eptp }, cf, zf)
        }

        fn invvpid(&self, kind: InvvpidKind, desc: &InvvpidDescriptor) -> Result<(), VmxError> {
            let (cf, zf): (u8, u8);
            // SAFETY: `new`'s contract puts the call in VMX root operation at CPL 0; INVVPID reads the
            // 16-byte descriptor behind a live reference and invalidates CPU caches only.
            unsafe {
                asm!("invvpid {t}, xmmword ptr [{d}]", "setc {cf}", "setz {zf}",
                     t = in(reg) kind as u64, d = in(reg) desc as *const InvvpidDescriptor,
                     cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            self.check(VmxOp::Invvpid { kind, vpid: desc.vpid as u16 }, cf, zf)
        }
    }
}
