//! The atomics the core uses, from `core` normally and from `loom` under `cfg(loom)`, so that model
//! checks run the code that ships (the crossbeam-epoch habit).

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

/// The busy-wait hint: a yield point under loom, so that a model's spin loop lets the thread it waits
/// for run.
#[cfg(loom)]
pub use loom::hint::spin_loop;

#[cfg(not(loom))]
pub use core::hint::spin_loop;
