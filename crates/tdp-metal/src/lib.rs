//! `tdp-metal`: the vendor-neutral pieces of `tdp-core`'s bare-metal backends, used by both `tdp-vmx`
//! (Intel VMX, EPT) and `tdp-svm` (AMD SVM, NPT) so that nothing is copied between them.
//!
//! A bare-metal hypervisor that embeds `tdp-core`'s MMU needs, whatever the vendor: table pages for the
//! MMU from a physical region it reserved ([`region`], [`frames`]), the translation of memslots that
//! name identity-mapped physical RAM ([`translate`], with pages the host moved), and a vCPU's dirty ring
//! as the MMU's dirty sink ([`ring_sink`]). The vendor crates add the TLB flush (INVEPT, ASID flush) and
//! combine the three into a `tdp_core::host::Host`. [`scenario`] is the test scenario that the Bochs
//! hypervisors of both vendors and the `tdp-mock` re-run execute and judge the same way, decoding EPT
//! and NPT tables ([`scenario::Paging`]). It is `no_std` (with `alloc`, like `tdp-core`).
//!
//! ```
//! use tdp_core::addr::{AsId, Gfn, Level, SlotId};
//! use tdp_core::dirty_ring::{DirtyGfn, DirtyRingProducer, RingConfig};
//! use tdp_core::host::{DirtySink, DirtySource, HostTranslate, TableMemory};
//! use tdp_core::memslot::{Memslot, SlotFlags};
//! use tdp_core::spte::Spte;
//! use tdp_metal::frames::TableFrames;
//! use tdp_metal::region::{IdentityRegion, TablePage};
//! use tdp_metal::ring_sink::RingSink;
//! use tdp_metal::translate::{IdentityTranslate, PhysRange};
//!
//! // Table pages: on bare metal `unsafe { IdentityRegion::from_raw(hpa, pages) }` over reserved RAM.
//! let mut pages: Vec<TablePage> = (0..8).map(|_| TablePage::new()).collect();
//! let frames = TableFrames::new(IdentityRegion::from_pages(&mut pages))?;
//! let table = frames.alloc_table(Spte(0))?;
//! assert_eq!(frames.stats().in_use, 1);
//! frames.free_table_now(table);
//!
//! // Guest RAM: 16 MiB at 16 MiB; a slot backed from its start maps 2 MiB blocks.
//! let ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
//! let translate = IdentityTranslate::new(&ram, Level::L2);
//! let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 4096, 0x100_0000, SlotFlags::LOG_DIRTY);
//! assert_eq!(translate.translate(&slot, Gfn(0x205), true)?.level, Level::L2);
//!
//! // A vCPU's dirty ring as the MMU's dirty sink.
//! let cfg = RingConfig::new(1024, 64)?;
//! let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
//! let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg)?)?;
//! sink.mark_dirty(&slot, Gfn(0x205), DirtySource::Fault);
//! assert_eq!(sink.stats().pushed, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Map of the modules:
//! - [`region`]: the identity-mapped region of table pages, the crate's only `unsafe` module.
//! - [`frames`]: `tdp-core`'s `TableMemory` over a region (free list, deferred free by epochs).
//! - [`translate`]: `tdp-core`'s `HostTranslate` over identity-mapped guest RAM, with moved pages.
//! - [`ring_sink`]: a dirty ring as the dirty sink of the fault path (and of Intel's PML drain).
//! - [`scenario`]: the test scenario shared by the Bochs hypervisors and the mock re-run.
#![no_std]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod frames;
pub mod region;
pub mod ring_sink;
pub mod scenario;
#[cfg(test)]
mod tests;
pub mod translate;
