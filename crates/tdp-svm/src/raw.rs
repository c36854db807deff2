//! Every `unsafe` operation of the crate: CPUID, RDMSR, WRMSR, CLGI/VMRUN/STGI in inline assembly
//! ([`X86Svm`]), and the host save area page the CPU owns ([`HsavePage`]).
//!
//! Nothing outside this module uses `unsafe` (the crate root denies `unsafe_code` and only this module
//! allows it). The instructions compile for any x86_64 target, so the crate builds and its host-side
//! tests run on Linux, but they execute only on bare metal: at CPL 3 each of them raises #GP or #UD.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 3 (publication 24594, revision 3.35),
//! instruction reference for VMRUN ("RAX holds the VMCB's physical address, 4 KiB-aligned"; on #VMEXIT
//! the host's RAX, RSP and RIP come back from the host save area and every other general register holds
//! the guest's), CLGI and STGI; Vol. 2 section 15.5 "VMRUN Instruction" and 15.17 "Global Interrupt
//! Flag" (KVM brackets VMRUN with CLGI/STGI so no host interrupt is taken between loading guest state
//! and entering the guest).
#![allow(unsafe_code)]

use core::cell::UnsafeCell;

/// The host save area: one 4 KiB page the CPU writes host state into at VMRUN and reads back at
/// #VMEXIT (VM_HSAVE_PA). Software must not touch it, so it has no accessor.
#[repr(C, align(4096))]
pub struct HsavePage(UnsafeCell<[u8; 4096]>);

// SAFETY: Rust never reads or writes the page's contents (there is no accessor); only the CPU does,
// through its physical address, so sharing references between threads cannot race in Rust's sense.
unsafe impl Sync for HsavePage {}

impl HsavePage {
    /// A zeroed page.
    #[must_use]
    pub const fn new() -> HsavePage {
        HsavePage(UnsafeCell::new([0; 4096]))
    }

    /// Its address, which is its physical address on an identity-mapped hypervisor.
    #[must_use]
    pub fn addr(&self) -> u64 {
        self.0.get() as usize as u64
    }
}

impl Default for HsavePage {
    fn default() -> Self {
        HsavePage::new()
    }
}

impl core::fmt::Debug for HsavePage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HsavePage({:#x})", self.addr())
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::X86Svm;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::{asm, global_asm};

    use super::HsavePage;
    use crate::instr::{CpuidResult, GuestRegs, SvmInstructions};
    use crate::msr;
    use crate::vmcb::Vmcb;

    // The VMRUN trampoline, `extern "sysv64" fn(regs: *mut GuestRegs, vmcb_pa: u64)`: saves the host's
    // callee-saved registers and the `regs` pointer on the stack, loads the guest's general registers
    // (all but RAX and RSP, which VMRUN loads from the VMCB), runs CLGI; VMRUN; and at the #VMEXIT (RSP
    // and RAX are the host's again, every other register the guest's) stores the guest's registers
    // back, STGI, and restores the host's. Offsets are those of `GuestRegs` (checked in `instr`).
    global_asm!(
        ".pushsection .text.tdp_svm_vmrun, \"ax\"",
        ".globl tdp_svm_vmrun",
        "tdp_svm_vmrun:",
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "mov rax, rsi",
        "mov rbx, [rdi]",
        "mov rcx, [rdi + 8]",
        "mov rdx, [rdi + 16]",
        "mov rsi, [rdi + 24]",
        "mov rbp, [rdi + 40]",
        "mov r8, [rdi + 48]",
        "mov r9, [rdi + 56]",
        "mov r10, [rdi + 64]",
        "mov r11, [rdi + 72]",
        "mov r12, [rdi + 80]",
        "mov r13, [rdi + 88]",
        "mov r14, [rdi + 96]",
        "mov r15, [rdi + 104]",
        "mov rdi, [rdi + 32]",
        "clgi",
        "vmrun rax",
        "push rdi",
        "mov rdi, [rsp + 8]",
        "mov [rdi], rbx",
        "mov [rdi + 8], rcx",
        "mov [rdi + 16], rdx",
        "mov [rdi + 24], rsi",
        "mov [rdi + 40], rbp",
        "mov [rdi + 48], r8",
        "mov [rdi + 56], r9",
        "mov [rdi + 64], r10",
        "mov [rdi + 72], r11",
        "mov [rdi + 80], r12",
        "mov [rdi + 88], r13",
        "mov [rdi + 96], r14",
        "mov [rdi + 104], r15",
        "pop rax",
        "mov [rdi + 32], rax",
        "stgi",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        ".popsection",
    );

    unsafe extern "sysv64" {
        fn tdp_svm_vmrun(regs: *mut GuestRegs, vmcb_pa: u64);
    }

    /// The real instructions, for a hypervisor running at CPL 0 with identity-mapped memory.
    ///
    /// Each call acts on the calling CPU. Enabling SVM on it (ring-0 code, so the example only
    /// compiles):
    ///
    /// ```no_run
    /// use tdp_svm::caps::SvmCapabilities;
    /// use tdp_svm::instr::SvmInstructions;
    /// use tdp_svm::raw::{HsavePage, X86Svm};
    /// static HSAVE: HsavePage = HsavePage::new();
    /// # fn bring_up() -> Result<(), Box<dyn std::error::Error>> {
    /// // SAFETY: CPL 0, memory identity-mapped, and every VMCB this hypervisor runs confines its guest
    /// // to nested tables built by tdp-core over the guest's memslots.
    /// let svm = unsafe { X86Svm::new() };
    /// let npt = SvmCapabilities::read(&svm).npt_features()?; // e.g. CapsError::NoSvm on Intel
    /// svm.set_hsave(&HSAVE);
    /// svm.enable_svme();
    /// # let _ = npt;
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct X86Svm {
        _private: (),
    }

    impl X86Svm {
        /// The instruction layer.
        ///
        /// # Safety
        /// Every method is called at CPL 0, on an identity-mapped hypervisor (a reference's address is
        /// its physical address), in this order: `cpuid` and `rdmsr` of EFER at any time; `rdmsr` of
        /// VM_CR, `set_hsave` and `enable_svme` only once CPUID reports SVM and VM_CR.SVMDIS is clear
        /// ([`crate::caps::SvmCapabilities::npt_features`] checks both); `vmrun` only after both. Every
        /// VMCB passed to `vmrun` confines its guest: the VMRUN intercept set, nested paging enabled
        /// with an nCR3 whose tables map only memory the guest may own (tables built by `tdp-core`
        /// from memslots over guest RAM), and intercepts for whatever else the guest must not reach.
        #[must_use]
        pub const unsafe fn new() -> X86Svm {
            X86Svm { _private: () }
        }

        fn wrmsr(&self, msr: u32, value: u64) {
            // SAFETY: only called by `enable_svme` and `set_hsave` for EFER (SVME set, other bits
            // kept) and VM_HSAVE_PA (a 4 KiB-aligned page reserved for the CPU), under `new`'s
            // contract that SVM is present and enabled; WRMSR touches only the MSR.
            unsafe {
                asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                     options(nostack, preserves_flags));
            }
        }
    }

    impl SvmInstructions for X86Svm {
        fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
            let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
            // SAFETY: CPUID is available on every x86_64 CPU and has no side effects beyond the four
            // registers; RBX is reserved by LLVM, so it is saved in another register around it.
            unsafe {
                asm!("mov {b:r}, rbx", "cpuid", "xchg {b:r}, rbx",
                     b = out(reg) ebx, inout("eax") leaf => eax, inout("ecx") subleaf => ecx, out("edx") edx,
                     options(nomem, nostack, preserves_flags));
            }
            CpuidResult { eax, ebx, ecx, edx }
        }

        fn rdmsr(&self, msr: u32) -> u64 {
            let (lo, hi): (u32, u32);
            // SAFETY: `new`'s contract: CPL 0 and only MSRs the CPU has, so RDMSR does not fault; it
            // touches only EAX/EDX.
            unsafe {
                asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
            }
            (u64::from(hi) << 32) | u64::from(lo)
        }

        fn enable_svme(&self) {
            let efer = self.rdmsr(msr::EFER);
            self.wrmsr(msr::EFER, efer | msr::EFER_SVME);
        }

        fn set_hsave(&self, page: &'static HsavePage) {
            self.wrmsr(msr::VM_HSAVE_PA, page.addr());
        }

        fn vmrun(&self, vmcb: &mut Vmcb, regs: &mut GuestRegs) {
            let pa = core::ptr::from_mut(vmcb) as usize as u64;
            // SAFETY: `new`'s contract: CPL 0, SVM enabled with a host save area, identity mapping (so
            // `pa` is the VMCB's physical address; it is 4 KiB-aligned by its type), and a VMCB that
            // confines the guest. The CPU reads and writes the VMCB, which `&mut` gives it exclusively
            // for the call; the trampoline reads and writes `regs` through the pointer and restores
            // every callee-saved register, RSP and (from the host save area) RIP.
            unsafe { tdp_svm_vmrun(core::ptr::from_mut(regs), pa) }
        }
    }
}
