//! The crate's error type: every failure names the operation (the ioctl, the mmap, the guest exit) and
//! carries the values that explain it, so a log line is enough to tell what went wrong.

use kvm_ioctls::Error as KvmError;

/// Everything that can go wrong while building, configuring or running a guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// `/dev/kvm` could not be opened (missing module, no permission).
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] KvmError),
    /// A KVM ioctl failed; `op` names it (and the object it was applied to).
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl and its target, e.g. `KVM_SET_USER_MEMORY_REGION (data slot 1)`.
        op: &'static str,
        /// The errno the kernel returned.
        #[source]
        source: KvmError,
    },
    /// An anonymous mapping for guest memory could not be created.
    #[error("mmap of {bytes} bytes of guest memory failed: {source}")]
    Mmap {
        /// The size asked for.
        bytes: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest specification cannot be built (sizes, counts, ranges); `what` says which rule failed.
    #[error("invalid guest spec: {what} (value {value})")]
    InvalidSpec {
        /// The rule that was broken.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
    /// A workload names pages outside the data slot, or has an impossible parameter.
    #[error("invalid workload for vCPU {vcpu}: {what} (value {value})")]
    InvalidWorkload {
        /// The vCPU the workload was meant for.
        vcpu: usize,
        /// The rule that was broken.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
    /// A vCPU index beyond the number of vCPUs in the spec.
    #[error("vCPU index {index} out of range (the VM has {count} vCPUs)")]
    NoSuchVcpu {
        /// The index asked for.
        index: usize,
        /// The number of vCPUs.
        count: usize,
    },
    /// A page index at or beyond the end of its slot (the data slot, or the code slot for
    /// [`GuestVm::copy_code_page`](crate::GuestVm::copy_code_page)).
    #[error("page {page} out of range (its slot has {pages} pages)")]
    PageOutOfRange {
        /// The page asked for.
        page: u64,
        /// The size in pages of the slot asked about (the data slot, or the code slot for code pages).
        pages: u64,
    },
    /// A buffer of the wrong size for a page copy.
    #[error("page buffer holds {len} bytes, a page is 4096")]
    BadPageBuffer {
        /// The buffer's length.
        len: usize,
    },
    /// `create_vcpus` was called a second time.
    #[error("the vCPUs of this VM were already created")]
    VcpusAlreadyCreated,
    /// The guest program could not be assembled (an iced-x86 error: a bug in this crate).
    #[error("assembling the guest program failed: {0}")]
    Assemble(#[source] iced_x86::IcedError),
    /// The assembled program does not fit in the code page.
    #[error("the guest program is {len} bytes, the code page holds {max}")]
    CodeTooLarge {
        /// The program's length.
        len: usize,
        /// The space available.
        max: usize,
    },
    /// The guest faulted beyond repair: with no IDT every exception escalates to a triple fault, which
    /// KVM reports as `KVM_EXIT_SHUTDOWN`.
    #[error("vCPU {vcpu} shut down (triple fault) at rip {rip:#x}")]
    TripleFault {
        /// The vCPU that faulted.
        vcpu: usize,
        /// Its instruction pointer as KVM reports it after the shutdown.
        rip: u64,
    },
    /// The guest exited for a reason this crate's guest program never causes.
    #[error("vCPU {vcpu}: unexpected exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The vCPU that exited.
        vcpu: usize,
        /// The exit, described.
        exit: String,
        /// Its instruction pointer after the exit.
        rip: u64,
    },
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, GuestError>;

/// Wraps a kvm-ioctls error with the name of the ioctl that produced it.
pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(KvmError) -> GuestError {
    move |source| GuestError::Ioctl { op, source }
}
