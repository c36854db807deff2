//! Where everything lives in physical memory (identity-mapped, so physical = virtual for the kernel).
//!
//! ```text
//!   0x0010_0000  kernel image, stack, heap (must end below TABLE_POOL_START; checked at boot)
//!   0x0100_0000  EPT table pages handed to tdp-core (TABLE_POOL_START..TABLE_POOL_END)
//!   0x0200_0000  guest RAM: guest-physical address g is backed by host address GUEST_HOST_BASE + g
//!   RAM_END      end of the RAM Bochs gives the machine (`megs:` in the bochsrc)
//! ```
//! Guest RAM's base is 2 MiB-aligned, so a gfn and its host frame agree modulo 512 and the core may
//! map 2 MiB-aligned parts of a memslot with 2 MiB leaves.

/// First byte of the EPT table-page pool.
pub const TABLE_POOL_START: u64 = 0x0100_0000;
/// One past the pool's last byte (2048 pages).
pub const TABLE_POOL_END: u64 = 0x0180_0000;
/// Host address of guest-physical address 0.
pub const GUEST_HOST_BASE: u64 = 0x0200_0000;
/// One past the last byte of RAM (the bochsrc gives `megs: 128`); the boot code maps the first GiB.
pub const RAM_END: u64 = 0x0800_0000;

/// The host address backing guest-physical address `gpa`.
pub const fn host_addr(gpa: u64) -> u64 {
    GUEST_HOST_BASE + gpa
}
