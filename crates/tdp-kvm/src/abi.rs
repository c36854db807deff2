//! The slice of KVM's user-space ABI this crate uses, defined here instead of taken from `kvm-bindings`,
//! so the fd API ([`crate::fd`]) ties a VMM to no `kvm-bindings` or `kvm-ioctls` version: three
//! `#[repr(C)]` argument structs and the numbers of `include/uapi/linux/kvm.h`.
//!
//! Each struct's size, alignment and field offsets are asserted at compile time; a test compares every
//! struct and number with `kvm-bindings`' (a dev-dependency only).
//!
//! Keeps: I5 on our side of the ABI (the kernel reads exactly the bytes it expects from our structs).

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

/// `KVM_CAP_DIRTY_LOG_RING` (Linux 5.11+, x86 only).
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (Linux 6.1+).
pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (Linux 6.4+; arm64): writes made without a running vCPU land in
/// the memslot's bitmap, which must be collected too.
pub const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: u32 = 225;
/// `KVM_CAP_NR_MEMSLOTS`: KVM answers how many user memslots an address space may have
/// (`KVM_USER_MEM_SLOTS`).
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, a flag of `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_DIRTY_LOG_INITIALLY_SET`, a flag of `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 2;
/// `KVM_DIRTY_LOG_PAGE_OFFSET`: the page offset of the dirty ring in a vCPU fd's mapping.
pub const KVM_DIRTY_LOG_PAGE_OFFSET: i64 = 64;
/// `KVM_MEM_LOG_DIRTY_PAGES`, the memslot flag that turns dirty logging on.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
/// `KVM_MEM_GUEST_MEMFD`: a memslot backed by guest_memfd, which KVM refuses to log.
pub const KVM_MEM_GUEST_MEMFD: u32 = 4;
/// `KVM_EXIT_DIRTY_RING_FULL`, the `exit_reason` of a vCPU whose ring reached its soft limit.
/// `kvm-ioctls` up to 0.25 reports it as `VcpuExit::Unsupported(31)`.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// `struct kvm_dirty_log`: `KVM_GET_DIRTY_LOG`'s argument.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct KvmDirtyLog {
    pub(crate) slot: u32,
    pub(crate) padding: u32,
    pub(crate) dirty_bitmap: *mut c_void,
}

/// `struct kvm_clear_dirty_log`: `KVM_CLEAR_DIRTY_LOG`'s argument.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct KvmClearDirtyLog {
    pub(crate) slot: u32,
    pub(crate) num_pages: u32,
    pub(crate) first_page: u64,
    pub(crate) dirty_bitmap: *mut c_void,
}

/// `struct kvm_enable_cap`: `KVM_ENABLE_CAP`'s argument.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct KvmEnableCap {
    pub(crate) cap: u32,
    pub(crate) flags: u32,
    pub(crate) args: [u64; 4],
    pub(crate) pad: [u8; 64],
}

impl KvmEnableCap {
    /// A request for `cap` with `args[0] = arg0`, everything else zero (as KVM requires).
    pub(crate) const fn new(cap: u32, arg0: u64) -> Self {
        KvmEnableCap { cap, flags: 0, args: [arg0, 0, 0, 0], pad: [0; 64] }
    }
}

// x86-64 layouts of the kernel headers.
const _: () = assert!(size_of::<KvmDirtyLog>() == 16 && align_of::<KvmDirtyLog>() == 8);
const _: () = assert!(offset_of!(KvmDirtyLog, slot) == 0 && offset_of!(KvmDirtyLog, dirty_bitmap) == 8);
const _: () = assert!(size_of::<KvmClearDirtyLog>() == 24 && align_of::<KvmClearDirtyLog>() == 8);
const _: () = assert!(offset_of!(KvmClearDirtyLog, num_pages) == 4);
const _: () = assert!(offset_of!(KvmClearDirtyLog, first_page) == 8);
const _: () = assert!(offset_of!(KvmClearDirtyLog, dirty_bitmap) == 16);
const _: () = assert!(size_of::<KvmEnableCap>() == 104 && align_of::<KvmEnableCap>() == 8);
const _: () = assert!(offset_of!(KvmEnableCap, flags) == 4 && offset_of!(KvmEnableCap, args) == 8);
const _: () = assert!(offset_of!(KvmEnableCap, pad) == 40);

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    /// Our transcription against rust-vmm's bindgen output, number by number and field by field.
    #[test]
    fn i5_abi_matches_kvm_bindings() {
        use kvm_bindings as kb;
        assert_eq!(super::KVM_CAP_DIRTY_LOG_RING, kb::KVM_CAP_DIRTY_LOG_RING);
        assert_eq!(super::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, kb::KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        assert_eq!(super::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, kb::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
        assert_eq!(super::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, kb::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
        assert_eq!(super::KVM_CAP_NR_MEMSLOTS, kb::KVM_CAP_NR_MEMSLOTS);
        assert_eq!(
            super::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
            u64::from(kb::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        );
        assert_eq!(super::KVM_DIRTY_LOG_INITIALLY_SET, u64::from(kb::KVM_DIRTY_LOG_INITIALLY_SET));
        assert_eq!(super::KVM_DIRTY_LOG_PAGE_OFFSET, i64::from(kb::KVM_DIRTY_LOG_PAGE_OFFSET));
        assert_eq!(super::KVM_MEM_LOG_DIRTY_PAGES, kb::KVM_MEM_LOG_DIRTY_PAGES);
        assert_eq!(super::KVM_MEM_GUEST_MEMFD, kb::KVM_MEM_GUEST_MEMFD);
        assert_eq!(super::KVM_EXIT_DIRTY_RING_FULL, kb::KVM_EXIT_DIRTY_RING_FULL);

        assert_eq!(size_of::<super::KvmDirtyLog>(), size_of::<kb::kvm_dirty_log>());
        assert_eq!(offset_of!(super::KvmDirtyLog, slot), offset_of!(kb::kvm_dirty_log, slot));
        assert_eq!(
            offset_of!(super::KvmDirtyLog, dirty_bitmap),
            offset_of!(kb::kvm_dirty_log, __bindgen_anon_1)
        );
        assert_eq!(size_of::<super::KvmClearDirtyLog>(), size_of::<kb::kvm_clear_dirty_log>());
        assert_eq!(
            offset_of!(super::KvmClearDirtyLog, num_pages),
            offset_of!(kb::kvm_clear_dirty_log, num_pages)
        );
        assert_eq!(
            offset_of!(super::KvmClearDirtyLog, first_page),
            offset_of!(kb::kvm_clear_dirty_log, first_page)
        );
        assert_eq!(
            offset_of!(super::KvmClearDirtyLog, dirty_bitmap),
            offset_of!(kb::kvm_clear_dirty_log, __bindgen_anon_1)
        );
        assert_eq!(size_of::<super::KvmEnableCap>(), size_of::<kb::kvm_enable_cap>());
        assert_eq!(offset_of!(super::KvmEnableCap, args), offset_of!(kb::kvm_enable_cap, args));
        assert_eq!(offset_of!(super::KvmEnableCap, pad), offset_of!(kb::kvm_enable_cap, pad));
    }
}
