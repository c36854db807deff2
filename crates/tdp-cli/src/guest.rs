//! [`Guest`]: what `tdp migrate` and `tdp dirty-rate` need from a running guest that dirties memory,
//! whichever machine runs it: a real KVM VM ([`crate::kvm`]) or the tdp-mock model ([`crate::mock`]).
//!
//! The contract that keeps dirty state: [`Guest::harvest`] moves every page dirtied since the previous
//! harvest into the caller's [`PendingSet`] and re-protects those pages *before* it returns, so a write
//! that lands after the harvest is reported by the next one (I4); a page read after `harvest` returned
//! is at least as new as the harvest.
//!
//! A guest's memory is every memslot it has ([`Guest::slots`]): a migration sends all of them and its
//! digest covers all of them. Pages are named by `(slot, page in the slot)` from the tracker to the wire.

use std::time::Duration;

use crate::converge::Throttle;
use crate::pending::PendingSet;
use crate::proto::{MemoryDigest, SlotInfo};

/// How the guest dirties its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Page after page, wrapping around.
    Sequential,
    /// Uniformly random pages.
    Random,
    /// Most writes (90%) to a hot eighth of memory.
    HotSet,
}

/// How dirty pages are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The per-vCPU dirty ring, reset after each harvest.
    Ring,
    /// The per-memslot bitmap, get-and-clear (`KVM_GET_DIRTY_LOG`).
    Bitmap,
    /// The bitmap with manual protect: get, then `KVM_CLEAR_DIRTY_LOG` of what was got.
    ClearLog,
    /// No dirty logging at all: `tdp dirty-rate` hashes a random sample of pages at the start and the
    /// end of its window (QEMU's page-sampling mode). A migration cannot run on it.
    Sampling,
}

impl Mode {
    /// Where a vCPU can be throttled in this mode, for the report: the ring exits per vCPU when it fills;
    /// the bitmap has no per-vCPU exit, so the guest's batch exits serve.
    #[must_use]
    pub const fn throttle_point(self) -> &'static str {
        match self {
            Mode::Ring => "ring-full exits",
            Mode::Bitmap | Mode::ClearLog => "batch exits (the bitmap has no per-vCPU exit)",
            Mode::Sampling => "batch exits (nothing is logged)",
        }
    }
}

/// What a guest is asked to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestConfig {
    /// Bytes of memory the guest dirties (a multiple of 4 KiB).
    pub memory: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Dirty pattern.
    pub pattern: Pattern,
    /// Target dirty rate over all vCPUs, pages/s (0: as fast as it can).
    pub rate_pages: u64,
    /// Tracking mode.
    pub mode: Mode,
    /// Dirty ring entries per vCPU (ring mode).
    pub ring_entries: u32,
    /// Write every word of each page picked (else the iteration number and the vCPU's tag only).
    pub fill: bool,
}

/// The result of one harvest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Harvest {
    /// Pages newly added to the pending set.
    pub new_pages: u64,
    /// Dirty entries per vCPU since the last harvest, where the tracker tells (ring); else empty.
    pub per_vcpu: Vec<u64>,
}

/// Figures about one vCPU.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct VcpuFigures {
    /// Pages the vCPU wrote (guest writes, counted at its exits).
    pub writes: u64,
    /// Exits taken because its dirty ring was full.
    pub ring_full_exits: u64,
    /// Exits at which the throttle made it sleep.
    pub throttled_exits: u64,
    /// Time slept in the throttle, ms.
    pub throttle_ms: u64,
}

/// An error from the machine running the guest.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {cause}")]
pub struct GuestError {
    /// What was being done.
    pub op: String,
    /// Why it failed.
    pub cause: String,
}

impl GuestError {
    /// An error for operation `op` with cause `cause`.
    pub fn new(op: impl Into<String>, cause: impl std::fmt::Display) -> GuestError {
        GuestError { op: op.into(), cause: cause.to_string() }
    }
}

/// A running guest that dirties memory, with dirty tracking on.
pub trait Guest {
    /// `"kvm"` or `"mock"`.
    fn backend(&self) -> &'static str;
    /// A line saying what runs the guest and how it is tracked, for the report.
    fn describe(&self) -> String;
    /// The guest's memslots, in ascending slot order: all of its memory, all of it migrated.
    fn slots(&self) -> &[SlotInfo];
    /// Pages of memory the guest has, every slot's.
    fn pages(&self) -> u64 {
        self.slots().iter().map(|s| s.pages).sum()
    }
    /// vCPUs.
    fn vcpus(&self) -> usize;
    /// The throttle the vCPUs honour at their exits.
    fn throttle(&self) -> &Throttle;
    /// Where the throttle acts, for the report (`"ring-full exits"` or `"batch exits"`).
    fn throttle_point(&self) -> &'static str;

    /// Moves the pages dirtied since the last harvest into `into` and re-protects them.
    ///
    /// # Errors
    /// A failed ioctl; pages harvested before the failure stay in `into`.
    fn harvest(&mut self, into: &mut PendingSet) -> Result<Harvest, GuestError>;

    /// Gives pages back to the tracker: the next [`harvest`](Guest::harvest) reports them again. Used
    /// when a migration fails, so the pages it still owed stay dirty for whoever migrates next.
    ///
    /// # Errors
    /// The tracker could not take them (they stay in `pages`, which the caller keeps).
    fn give_back(&mut self, pages: &PendingSet) -> Result<u64, GuestError>;

    /// Copies page `page` of memslot `slot` into `buf`.
    ///
    /// # Errors
    /// A slot the guest lacks or a page index beyond it.
    fn read_page(&self, slot: u32, page: u64, buf: &mut [u8]) -> Result<(), GuestError>;

    /// Stops every vCPU at its next exit and waits until all are stopped.
    ///
    /// # Errors
    /// A vCPU thread that failed.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets the vCPUs run again after [`pause`](Guest::pause).
    ///
    /// # Errors
    /// A vCPU thread that failed.
    fn resume(&mut self) -> Result<(), GuestError>;
    /// Whether every vCPU thread is alive and not paused.
    fn is_running(&self) -> bool;
    /// Per-vCPU figures so far.
    fn figures(&self) -> Vec<VcpuFigures>;
    /// Stops the vCPUs for good and releases the VM.
    ///
    /// # Errors
    /// A vCPU thread that failed while running.
    fn shutdown(&mut self) -> Result<(), GuestError>;

    /// Lets the guest run for `d` (harvesting as it goes, so ring-full exits do not stall it).
    ///
    /// # Errors
    /// As [`harvest`](Guest::harvest).
    fn run_for(&mut self, d: Duration, into: &mut PendingSet) -> Result<Harvest, GuestError> {
        let start = std::time::Instant::now();
        let mut total = Harvest { new_pages: 0, per_vcpu: vec![0; self.vcpus()] };
        while start.elapsed() < d {
            std::thread::sleep((d - start.elapsed()).min(Duration::from_millis(20)));
            let h = self.harvest(into)?;
            total.new_pages += h.new_pages;
            for (t, n) in total.per_vcpu.iter_mut().zip(&h.per_vcpu) {
                *t += n;
            }
        }
        Ok(total)
    }

    /// The protocol's digest ([`MemoryDigest`]) of all memory, every slot, read page by page (call with
    /// the vCPUs paused).
    ///
    /// # Errors
    /// As [`read_page`](Guest::read_page).
    fn digest(&self) -> Result<[u8; 32], GuestError> {
        let mut digest = MemoryDigest::new();
        for s in self.slots() {
            hash_slot(self, s, &mut digest)?;
        }
        Ok(digest.finish())
    }

    /// The digest of each slot alone (a [`MemoryDigest`] of that one slot), to tell which slot differs.
    ///
    /// # Errors
    /// As [`read_page`](Guest::read_page).
    fn slot_digests(&self) -> Result<Vec<(SlotInfo, [u8; 32])>, GuestError> {
        self.slots()
            .iter()
            .map(|s| {
                let mut digest = MemoryDigest::new();
                hash_slot(self, s, &mut digest)?;
                Ok((*s, digest.finish()))
            })
            .collect()
    }
}

/// Adds slot `s` of `guest` to `digest`: its header, then its pages.
fn hash_slot<G: Guest + ?Sized>(
    guest: &G,
    s: &SlotInfo,
    digest: &mut MemoryDigest,
) -> Result<(), GuestError> {
    let mut buf = vec![0u8; crate::proto::PAGE_SIZE];
    digest.slot(s);
    for page in 0..s.pages {
        guest.read_page(s.slot, page, &mut buf)?;
        digest.pages(&buf);
    }
    Ok(())
}
