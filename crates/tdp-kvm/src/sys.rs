//! The few raw system calls this crate makes that `kvm-ioctls` does not wrap: the dirty-ring and
//! dirty-log ioctls, and shared memory mappings that unmap themselves on drop; and one CPU hint, a cache
//! prefetch.
//!
//! Every `unsafe` block of the crate that talks to the kernel lives here or in `mapping`, so the rest of
//! the crate is safe code over [`Mapping`] and the typed wrappers below.
//!
//! Keeps: I5 on our side of the ABI (every pointer handed to the kernel points at memory of the size the
//! kernel will touch, checked before the call).

use std::ffi::c_void;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::abi::{KvmClearDirtyLog, KvmDirtyLog, KvmEnableCap};

use crate::error::{Errno, Error};

/// `KVMIO`, the ioctl type byte of every KVM ioctl (`include/uapi/linux/kvm.h`).
const KVMIO: u64 = 0xAE;

/// Linux's `_IOC` encoding (`include/uapi/asm-generic/ioctl.h`): dir in bits 30-31, size in 16-29,
/// type in 8-15, number in 0-7.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
pub(crate) const KVM_GET_DIRTY_LOG: u64 = ioc(IOC_WRITE, 0x42, size_of::<KvmDirtyLog>());
/// `KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
pub(crate) const KVM_ENABLE_CAP: u64 = ioc(IOC_WRITE, 0xa3, size_of::<KvmEnableCap>());
/// `KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub(crate) const KVM_CLEAR_DIRTY_LOG: u64 = ioc(IOC_READ | IOC_WRITE, 0xc0, size_of::<KvmClearDirtyLog>());
/// `KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xc7)`, 0xAEC7.
pub(crate) const KVM_RESET_DIRTY_RINGS: u64 = ioc(IOC_NONE, 0xc7, 0);
/// `KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)`.
pub(crate) const KVM_CHECK_EXTENSION: u64 = ioc(IOC_NONE, 0x03, 0);
/// `KVM_CREATE_VM = _IO(KVMIO, 0x01)`.
pub(crate) const KVM_CREATE_VM: u64 = ioc(IOC_NONE, 0x01, 0);
/// `KVM_CREATE_VCPU = _IO(KVMIO, 0x41)`.
pub(crate) const KVM_CREATE_VCPU: u64 = ioc(IOC_NONE, 0x41, 0);

// The numbers as the kernel headers spell them, so an encoding slip cannot go unnoticed.
const _: () = assert!(KVM_GET_DIRTY_LOG == 0x4010_AE42);
const _: () = assert!(KVM_ENABLE_CAP == 0x4068_AEA3);
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xC018_AEC0);
const _: () = assert!(KVM_RESET_DIRTY_RINGS == 0xAEC7);
const _: () = assert!(KVM_CHECK_EXTENSION == 0xAE03);
const _: () = assert!(KVM_CREATE_VM == 0xAE01 && KVM_CREATE_VCPU == 0xAE41);

/// The last OS error as an [`Errno`].
pub(crate) fn last_errno() -> Errno {
    Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// `KVM_CHECK_EXTENSION(cap)` on a VM fd: KVM's answer (0 = absent, else a cap-specific value).
pub(crate) fn check_extension(vm: BorrowedFd<'_>, cap: u32) -> Result<i32, Error> {
    // SAFETY: KVM_CHECK_EXTENSION takes its argument by value and touches no user memory; `vm` is a live fd
    // (the borrow guarantees it), and a wrong fd kind only makes the kernel return an error.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CHECK_EXTENSION as _, libc::c_ulong::from(cap)) };
    if ret < 0 { Err(Error::Ioctl { ioctl: "KVM_CHECK_EXTENSION", errno: last_errno() }) } else { Ok(ret) }
}

/// `KVM_ENABLE_CAP` on a VM fd. Returns the errno unwrapped, so callers can say what it means for their cap.
pub(crate) fn enable_cap(vm: BorrowedFd<'_>, cap: u32, arg0: u64) -> Result<(), Errno> {
    let req = KvmEnableCap::new(cap, arg0);
    // SAFETY: KVM_ENABLE_CAP reads one `struct kvm_enable_cap` (the ioctl number encodes its size, asserted
    // above) from the pointer, which points at a live, initialised value of that type on our stack.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_ENABLE_CAP as _, &raw const req) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

/// `KVM_RESET_DIRTY_RINGS`: the number of ring entries the kernel reset (re-protected) across all vCPUs.
pub(crate) fn reset_dirty_rings(vm: BorrowedFd<'_>) -> Result<u32, Error> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no user memory (the rings are the
    // kernel's own pages, which it only reads back); `vm` is a live fd.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
    if ret < 0 {
        Err(Error::Ioctl { ioctl: "KVM_RESET_DIRTY_RINGS", errno: last_errno() })
    } else {
        // Non-negative c_int: fits.
        Ok(ret.unsigned_abs())
    }
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `out`.
///
/// The kernel writes `ALIGN(npages, 64) / 8` bytes, with `npages` the slot's size *as KVM knows it*, which
/// this process cannot query: the caller must pass memory after which a write faults instead of
/// corrupting anything. [`crate::DirtyLogBuffer`] ends its words exactly at a guard page for this reason.
///
/// # Safety
/// `out` must be valid for writes of `out_words` words, and every byte from `out + out_words * 8` up to
/// whatever the kernel may write (see above) must be unmapped or otherwise owned by the caller.
pub(crate) unsafe fn get_dirty_log(vm: BorrowedFd<'_>, slot: u32, out: *mut u64) -> Result<(), Errno> {
    let log = KvmDirtyLog { slot, padding: 0, dirty_bitmap: out.cast::<c_void>() };
    // SAFETY: the kernel reads one `kvm_dirty_log` from our stack and writes the slot's bitmap to `out`;
    // the caller guarantees that memory (and a faulting guard after it).
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG as _, &raw const log) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

/// `KVM_CLEAR_DIRTY_LOG` of pages `first_page .. first_page + num_pages` of `slot`, for the set bits of
/// `mask` (bit `i` = page `first_page + i`).
///
/// # Panics
/// Never; `mask` is checked to hold `ceil(num_pages / 64)` words, and an error is returned otherwise.
pub(crate) fn clear_dirty_log(
    vm: BorrowedFd<'_>,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    mask: &[u64],
) -> Result<(), Errno> {
    // The kernel reads ALIGN(num_pages, 64) / 8 bytes from the mask; refuse a shorter one (as EFAULT would).
    if (mask.len() as u64) < u64::from(num_pages).div_ceil(64) {
        return Err(Errno(libc::EFAULT));
    }
    let log = KvmClearDirtyLog {
        slot,
        num_pages,
        first_page,
        dirty_bitmap: mask.as_ptr().cast_mut().cast::<c_void>(),
    };
    // SAFETY: the kernel reads one `kvm_clear_dirty_log` from our stack and `ceil(num_pages / 64)` words
    // from `mask` (checked above); it only reads the mask (copy_from_user), so the shared borrow suffices.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &raw const log) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

/// An ioctl whose answer is a new fd (`KVM_CREATE_VM`, `KVM_CREATE_VCPU`), owned from here on.
pub(crate) fn ioctl_new_fd(
    fd: BorrowedFd<'_>,
    req: u64,
    arg: libc::c_ulong,
    ioctl: &'static str,
) -> Result<OwnedFd, Error> {
    // SAFETY: both ioctls take their argument by value and touch no user memory; `fd` is live (borrowed).
    let new = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if new < 0 {
        return Err(Error::Ioctl { ioctl, errno: last_errno() });
    }
    // SAFETY: the kernel returned a fresh fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The host page size (4096 on x86-64).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
}

#[cfg(feature = "kvm-ioctls")]
/// Borrows the fd of a `kvm-ioctls` object (which implements `AsRawFd` only) for as long as the object.
pub(crate) fn borrow<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `VmFd` and `VcpuFd` own their fd (a `File`) and close it only on drop; the returned borrow
    // is tied to `&owner`, so the fd stays open for its whole life.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// Whether the byte at `ptr` can be read, asked of the kernel so that a page whose fault handler answers
/// `SIGBUS` (a vCPU fd mapped past its dirty ring) yields `EFAULT` here instead of killing the process.
/// The kernel reads the byte into a pipe (`write`), whose copy-in fails cleanly on such a page.
pub(crate) fn probe_readable(ptr: *const u8) -> Result<bool, Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the 2-element array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(Error::Os { op: "pipe2 (probing the ring mapping)", errno: last_errno() });
    }
    // SAFETY: both fds were just created by the kernel for us and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: `write` reads one byte from `ptr` inside the kernel; an unreadable page makes it fail with
    // EFAULT rather than fault in this process. No Rust reference to the byte is created.
    let n = unsafe { libc::write(w.as_raw_fd(), ptr.cast(), 1) };
    drop((r, w));
    match n {
        1 => Ok(true),
        _ if last_errno() == Errno(libc::EFAULT) => Ok(false),
        _ => Err(Error::Os { op: "write to a pipe (probing the ring mapping)", errno: last_errno() }),
    }
}

/// Asks the CPU to start bringing the `bytes` bytes from `start` into its caches, without waiting for
/// them: a hint that never faults, so `start` may be any address, even dangling.
pub(crate) fn prefetch(start: *const u8, bytes: usize) {
    // From the start of `start`'s cache line, so that the last line is not missed.
    let skew = start as usize % 64;
    let first = start.wrapping_sub(skew);
    #[cfg(target_arch = "x86_64")]
    for offset in (0..bytes.saturating_add(skew)).step_by(64) {
        let line = first.wrapping_add(offset).cast::<i8>();
        // SAFETY: PREFETCHT0 (SSE, which every x86-64 CPU has) does not dereference its operand in the
        // architectural sense: it never faults and changes no state a program can observe.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, bytes);
}
