//! The instruction layer: the few privileged operations the backend needs, behind one small trait so
//! that everything above it runs on the host against [`crate::fake::FakeSvm`].
//!
//! [`SvmInstructions`] is implemented for real by [`crate::raw::X86Svm`] (inline assembly, bare metal
//! only) and in software by [`crate::fake::FakeSvm`] (CPUID and MSR values recorded under Bochs, and
//! VM exits a test scripts). Unlike VMX, SVM instructions do not report failure in RFLAGS: a VMRUN whose
//! VMCB is inconsistent "exits" at once with exit code `VMEXIT_INVALID` (-1), and a VMRUN the CPU
//! refuses outright (EFER.SVME clear, CPL > 0, a bad VMCB or host-save address) raises #GP or #UD
//! (AMD APM Vol. 2, section 15.5 "VMRUN Instruction"). So the methods here return nothing: the exit
//! code in the VMCB says how a VMRUN went.

use crate::raw::HsavePage;
use crate::vmcb::Vmcb;

/// What CPUID returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The guest's general-purpose registers while it is not running, except RAX, RSP and RIP, which VMRUN
/// loads from and #VMEXIT stores to the VMCB's save area.
///
/// The layout is fixed (`repr(C)`, the offsets below): [`crate::raw::X86Svm`]'s VMRUN trampoline
/// loads and stores the registers by offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestRegs {
    /// RBX (offset 0).
    pub rbx: u64,
    /// RCX (8).
    pub rcx: u64,
    /// RDX (16).
    pub rdx: u64,
    /// RSI (24).
    pub rsi: u64,
    /// RDI (32).
    pub rdi: u64,
    /// RBP (40).
    pub rbp: u64,
    /// R8 to R15 (48 to 104).
    pub r: [u64; 8],
}

static_assertions::const_assert_eq!(core::mem::offset_of!(GuestRegs, rdi), 32);
static_assertions::const_assert_eq!(core::mem::offset_of!(GuestRegs, r), 48);
static_assertions::const_assert_eq!(core::mem::size_of::<GuestRegs>(), 112);

/// The privileged operations the backend uses. Every method takes only `&self`, because a TLB flush
/// ([`tdp_core::host::TlbFlush`]) gets only `&self`; an implementation that keeps state uses interior
/// mutability.
///
/// ```
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::instr::SvmInstructions;
/// use tdp_svm::msr::{EFER, EFER_SVME};
/// let svm = FakeSvm::new(bochs::RYZEN);
/// assert_eq!(svm.cpuid(0x8000_000a, 0).ebx, 0x8000); // 32768 ASIDs
/// svm.enable_svme();
/// assert_ne!(svm.rdmsr(EFER) & EFER_SVME, 0);
/// ```
pub trait SvmInstructions {
    /// CPUID of `leaf` and `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;

    /// RDMSR. Only called for MSRs that exist on this CPU (EFER always; VM_CR and VM_HSAVE_PA once
    /// CPUID says SVM): on hardware, reading an absent MSR raises #GP.
    fn rdmsr(&self, msr: u32) -> u64;

    /// Sets EFER.SVME (read-modify-write of EFER; every other bit is kept). Only called once the
    /// capabilities say SVM is present and not disabled by VM_CR.SVMDIS (else #GP on hardware).
    fn enable_svme(&self);

    /// Writes the host save area's physical address to VM_HSAVE_PA.
    fn set_hsave(&self, page: &'static HsavePage);

    /// VMRUN of `vmcb` with the guest's other registers in `regs`; returns at the #VMEXIT, with the exit
    /// in the VMCB's control area and the guest's registers back in `regs` and the VMCB.
    ///
    /// The CPU owns the VMCB for the duration (hence `&mut`); afterwards the control area holds
    /// EXITCODE, EXITINFO1/2 and (with NRIP save) the next RIP, and TLB_CONTROL is as it was: the
    /// caller resets it ([`crate::vcpu::SvmVcpu::after_exit`]).
    fn vmrun(&self, vmcb: &mut Vmcb, regs: &mut GuestRegs);
}

impl<T: SvmInstructions + ?Sized> SvmInstructions for &T {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        (**self).cpuid(leaf, subleaf)
    }
    fn rdmsr(&self, msr: u32) -> u64 {
        (**self).rdmsr(msr)
    }
    fn enable_svme(&self) {
        (**self).enable_svme();
    }
    fn set_hsave(&self, page: &'static HsavePage) {
        (**self).set_hsave(page);
    }
    fn vmrun(&self, vmcb: &mut Vmcb, regs: &mut GuestRegs) {
        (**self).vmrun(vmcb, regs);
    }
}
