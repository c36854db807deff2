//! `tdp-core`: KVM's TDP MMU as a `no_std` library.
//!
//! The crate manages two-dimensional page tables (Intel EPT, AMD NPT) the way Linux KVM's TDP MMU does:
//! SPTEs are `AtomicU64`s changed with compare-exchange under the read side of a reader/writer lock, table
//! pages removed from a live tree are frozen entry by entry and freed only after every walker that could
//! see them has finished, and TLB flushes come back to the caller as [`flush::Flush`] values that cannot be
//! dropped silently.
//!
//! It touches no hardware and no OS. What it needs from its environment is a handful of small traits in
//! [`host`]: table-page memory, host translation, TLB invalidation, a yield hint and trace events. The
//! `tdp-mock` crate implements them in software (and checks the invariants of the design); a bare-metal
//! hypervisor implements them over its frame allocator and INVEPT.
//!
//! Map of the modules:
//! - [`addr`]: newtypes for gfns, host frames, levels and table indices.
//! - [`spte`]: the SPTE newtype and the EPT / NPT formats, as data.
//! - [`iter`]: the pre-order table iterator with KVM's yield-and-restart rule.
//! - [`memslot`]: memslots, their validation and lookup.
//! - [`dirty_ring`]: KVM's dirty ring, producer and consumer, over any memory.
//! - [`dirty_bitmap`]: KVM's per-memslot dirty bitmap, get-and-clear and manual-protect.
//! - [`host`]: the traits the environment implements.
//! - [`flush`]: must-use TLB flush requests.
//! - [`fault`]: fault input decoded from EPT-violation qualifications and NPF error codes.
//! - [`mmu`]: roots, the page-fault handler, zapping and SPTE bookkeeping.
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

pub mod addr;
pub mod dirty_bitmap;
pub mod dirty_ring;
pub mod fault;
pub mod flush;
pub mod host;
pub mod iter;
pub mod memslot;
pub mod mmu;
pub mod spte;
pub mod sync;
