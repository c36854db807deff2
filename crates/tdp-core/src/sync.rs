//! The atomics the core uses, from `core` normally and from `loom` under `cfg(loom)`, so that model
//! checks run the code that ships (the crossbeam-epoch habit).

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
