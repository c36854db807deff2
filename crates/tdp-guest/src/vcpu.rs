//! `GuestVcpu`: one vCPU of a [`crate::GuestVm`], its CPL3 start state, and the interpretation of its
//! exits (a finished batch, a full dirty ring, a signal, or an error carrying the exit and RIP).

use std::sync::Arc;

use kvm_bindings::{KVM_EXIT_DIRTY_RING_FULL, kvm_regs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{GuestError, Result, ioctl};
use crate::gdt;
use crate::layout::{
    CODE_PAGE, GDT_PAGE, Layout, PAGE_SIZE, PML4_PAGE, STACK_PAGE, TSS_OFFSET, block_gva, control_gva,
};
use crate::memory::MmapRegion;
use crate::program::BATCH_DONE_PORT;

/// CR0: protection enable, monitor coprocessor, extension type, numeric error, write protect, paging
/// (SDM Vol. 3A §2.5 "Control Registers").
pub const CR0_LONG_MODE: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: physical address extension, required for long mode (same section).
pub const CR4_LONG_MODE: u64 = 1 << 5;
/// EFER: long mode enable and active (SDM Vol. 3A §2.2.1 "Extended Feature Enable Register").
pub const EFER_LONG_MODE: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: the reserved bit 1 and IOPL = 3, so `OUT` is allowed at CPL3 (SDM Vol. 1 §3.4.3 "EFLAGS
/// Register"; Vol. 1 §19.5.1 "I/O Privilege Level"). Interrupts stay off.
pub const RFLAGS_CPL3_IO: u64 = (1 << 1) | (3 << 12);

/// What a vCPU exit meant, when it was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest finished a batch and reported its tag on [`BATCH_DONE_PORT`].
    BatchDone {
        /// The vCPU's tag (its index).
        tag: u32,
    },
    /// `KVM_EXIT_DIRTY_RING_FULL`: harvest and reset the vCPU's dirty ring, then run again.
    DirtyRingFull,
    /// `KVM_RUN` returned on a signal or `immediate_exit` (EINTR / `KVM_EXIT_INTR`); run again or stop.
    Interrupted,
}

/// An exit the guest program never causes, described for the error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unexpected {
    /// `KVM_EXIT_SHUTDOWN`: the guest triple-faulted.
    Shutdown,
    /// Anything else, as text.
    Other(String),
}

/// Interprets an exit of a vCPU running this crate's program. Callers that run vCPUs through another
/// helper (e.g. `tdp-kvm`'s ring-full handling) use this, then [`GuestVcpu::exit_error`] to turn an
/// unexpected exit into an error with the vCPU's RIP.
///
/// ```
/// use kvm_ioctls::VcpuExit;
/// use tdp_guest::{BATCH_DONE_PORT, GuestExit, Unexpected, classify_exit};
/// assert_eq!(classify_exit(&VcpuExit::IoOut(BATCH_DONE_PORT, &[1, 0, 0, 0])), Ok(GuestExit::BatchDone { tag: 1 }));
/// assert_eq!(classify_exit(&VcpuExit::Unsupported(31)), Ok(GuestExit::DirtyRingFull));
/// assert_eq!(classify_exit(&VcpuExit::Shutdown), Err(Unexpected::Shutdown));
/// ```
///
/// # Errors
/// The [`Unexpected`] exit.
pub fn classify_exit(exit: &VcpuExit<'_>) -> std::result::Result<GuestExit, Unexpected> {
    match exit {
        VcpuExit::IoOut(port, data) if *port == BATCH_DONE_PORT => {
            let mut tag = [0u8; 4];
            let n = data.len().min(4);
            tag[..n].copy_from_slice(&data[..n]);
            Ok(GuestExit::BatchDone { tag: u32::from_le_bytes(tag) })
        }
        VcpuExit::Unsupported(reason) if *reason == KVM_EXIT_DIRTY_RING_FULL => Ok(GuestExit::DirtyRingFull),
        VcpuExit::Intr => Ok(GuestExit::Interrupted),
        VcpuExit::Shutdown => Err(Unexpected::Shutdown),
        other => Err(Unexpected::Other(format!("{other:?}"))),
    }
}

/// One vCPU of a [`crate::GuestVm`]. `Send`: move it to its own thread.
///
/// ```
/// use tdp_guest::{BatchGate, Decision, GuestExit, GuestSpec, GuestVm};
/// let mut vm = match GuestVm::new(GuestSpec::new(256 + 3, 2)) {
///     Ok(vm) => vm,
///     Err(tdp_guest::GuestError::OpenKvm(e)) => {
///         eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
///         return Ok(());
///     }
///     Err(e) => return Err(e),
/// };
/// let gate = BatchGate::new(2);
/// let vcpus = vm.create_vcpus()?;
/// std::thread::scope(|s| {
///     for mut vcpu in vcpus {
///         let gate = &gate;
///         s.spawn(move || {
///             let result = loop {
///                 match vcpu.run() {
///                     Ok(GuestExit::BatchDone { .. }) if gate.at_batch_boundary() == Decision::Stop => break Ok(()),
///                     Ok(_) => {}
///                     Err(e) => break Err(e),
///                 }
///             };
///             gate.leave();
///             result
///         });
///     }
///     std::thread::sleep(std::time::Duration::from_millis(10));
///     gate.stop();
/// });
/// assert!(vm.vcpu_stats(0)?.batches > 0 && vm.vcpu_stats(1)?.batches > 0);
/// # Ok::<(), tdp_guest::GuestError>(())
/// ```
#[derive(Debug)]
pub struct GuestVcpu {
    // Field order is drop order: the fd closes before the memory KVM maps for it can be unmapped.
    fd: VcpuFd,
    index: usize,
    code: Arc<MmapRegion>,
    _data: Arc<MmapRegion>,
}

impl GuestVcpu {
    pub(crate) fn new(fd: VcpuFd, index: usize, code: Arc<MmapRegion>, data: Arc<MmapRegion>) -> Self {
        Self { fd, index, code, _data: data }
    }

    /// The vCPU's index (also its KVM vCPU id and its tag).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The vCPU fd (e.g. to map its dirty ring).
    #[must_use]
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU fd, mutably (to run it through another helper).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Runs the vCPU once (`KVM_RUN`) and interprets the exit.
    ///
    /// # Errors
    /// [`GuestError::TripleFault`] or [`GuestError::UnexpectedExit`] (with RIP) for an exit the program
    /// never causes; [`GuestError::Ioctl`] naming `KVM_RUN` for an errno other than EINTR.
    pub fn run(&mut self) -> Result<GuestExit> {
        let outcome = match self.fd.run() {
            Ok(exit) => classify_exit(&exit),
            Err(e) if e.errno() == libc::EINTR => Ok(GuestExit::Interrupted),
            Err(e) => return Err(GuestError::Ioctl { op: "KVM_RUN", source: e }),
        };
        outcome.map_err(|u| self.exit_error(u))
    }

    /// Turns an unexpected exit into an error carrying this vCPU's RIP (read with `KVM_GET_REGS`; 0 if
    /// that fails too).
    #[must_use]
    pub fn exit_error(&self, unexpected: Unexpected) -> GuestError {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let vcpu = self.index;
        match unexpected {
            Unexpected::Shutdown => GuestError::TripleFault { vcpu, rip },
            Unexpected::Other(exit) => {
                let exit = match instruction_at(&self.code, rip) {
                    Some(insn) => format!("{exit} (instruction at rip: {insn})"),
                    None => exit,
                };
                GuestError::UnexpectedExit { vcpu, exit, rip }
            }
        }
    }
}

/// Decodes the program's instruction at `rip` for an error message, if `rip` is inside the code page
/// (`code` is the code slot).
fn instruction_at(code: &MmapRegion, rip: u64) -> Option<String> {
    let code_start = Layout::code_gpa(CODE_PAGE);
    if !(code_start..code_start + PAGE_SIZE).contains(&rip) {
        return None;
    }
    // Copy whole words (the region is read word by word), then decode from `rip`'s byte.
    let aligned = rip & !7;
    let mut raw = [0u8; 24];
    let len = (code_start + PAGE_SIZE - aligned).min(24) as usize;
    if !code.copy_out(aligned, &mut raw[..len]) {
        return None;
    }
    let bytes = &raw[(rip - aligned) as usize..len];
    let mut d = iced_x86::Decoder::with_ip(64, bytes, rip, iced_x86::DecoderOptions::NONE);
    Some(format!("{:?}", d.decode().code()))
}

/// Puts vCPU `index` in 64-bit mode at CPL3 at the program's first instruction.
pub(crate) fn set_initial_state(fd: &VcpuFd, index: usize) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let tss = Layout::code_gpa(GDT_PAGE) + TSS_OFFSET;
    sregs.cs = gdt::user_code_segment();
    let data = gdt::user_data_segment();
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = gdt::task_segment(tss);
    sregs.ldt = gdt::no_ldt();
    sregs.gdt = gdt::gdtr(Layout::code_gpa(GDT_PAGE));
    // No IDT: every exception escalates to a triple fault (KVM_EXIT_SHUTDOWN).
    sregs.idt = kvm_bindings::kvm_dtable::default();
    sregs.cr0 = CR0_LONG_MODE;
    sregs.cr3 = Layout::code_gpa(PML4_PAGE);
    sregs.cr4 = CR4_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
    fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: Layout::code_gpa(CODE_PAGE),
        rflags: RFLAGS_CPL3_IO,
        rsp: Layout::code_gpa(STACK_PAGE) + PAGE_SIZE - 64,
        rdi: control_gva(),
        rsi: block_gva(index),
        ..kvm_regs::default()
    };
    fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_register_bits_match_the_sdm() {
        assert_eq!(CR0_LONG_MODE, 0x8001_0033);
        assert_eq!(CR4_LONG_MODE, 0x20);
        assert_eq!(EFER_LONG_MODE, 0x500);
        assert_eq!(RFLAGS_CPL3_IO, 0x3002);
    }

    #[test]
    fn error_messages_name_the_program_instruction_at_rip() {
        let code = MmapRegion::new(5 * 4096).unwrap_or_else(|e| panic!("{e}"));
        let start = Layout::code_gpa(CODE_PAGE);
        let mut program = crate::program::assemble(start).unwrap_or_else(|e| panic!("{e}"));
        program.resize(program.len().next_multiple_of(8), 0x90);
        assert!(code.copy_in(start, &program));
        // The first instruction loads GEN: mov rax, [rsi+104].
        assert_eq!(instruction_at(&code, start).as_deref(), Some("Mov_r64_rm64"));
        // Mid-word rips decode from the right byte: the second instruction is `test eax, 1`.
        let second = start + 4; // `mov rax, [rsi+0x68]` is 4 bytes (48 8B 46 68)
        assert_eq!(instruction_at(&code, second).as_deref(), Some("Test_EAX_imm32"));
        assert_eq!(instruction_at(&code, start - 1), None, "outside the program page");
        assert_eq!(instruction_at(&code, start + 4096), None);
    }

    #[test]
    fn exits_are_classified() {
        assert_eq!(
            classify_exit(&VcpuExit::IoOut(BATCH_DONE_PORT, &[3, 0, 0, 0])),
            Ok(GuestExit::BatchDone { tag: 3 })
        );
        assert_eq!(classify_exit(&VcpuExit::Unsupported(31)), Ok(GuestExit::DirtyRingFull));
        assert_eq!(classify_exit(&VcpuExit::Shutdown), Err(Unexpected::Shutdown));
        assert!(matches!(classify_exit(&VcpuExit::IoOut(0x80, &[0])), Err(Unexpected::Other(_))));
        assert!(matches!(classify_exit(&VcpuExit::Hlt), Err(Unexpected::Other(_))));
    }
}
