//! Dirty epochs for incremental snapshots: everything dirtied since checkpoint N, kept until the caller
//! commits a later checkpoint, so a failed or interrupted snapshot loses nothing (the next attempt asks for
//! the same checkpoint again and gets those pages plus everything dirtied since).
//!
//! A [`DirtyEpochs`] is plain data the VMM owns (no KVM state; `serde` with the feature of that name, so
//! unsent dirty state can be saved): it records each collect's result into the open epoch;
//! [`checkpoint`](DirtyEpochs::checkpoint) closes it and opens the next.
//!
//! Keeps: I4 (an epoch is dropped only by `commit`; until then every recorded page is in every later
//! `since`).

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::tracker::DirtySets;

/// Dirty pages by epoch: epoch `n` holds what was recorded between checkpoints `n` and `n + 1`.
///
/// ```
/// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
/// use tdp_kvm::{DirtyEpochs, DirtySets};
/// let slot = RingSlot::new(AsId(0), SlotId(0));
/// let round = |pages: &[u64]| {
///     let mut s = DirtySets::default();
///     s.add_slot(slot, Gpa(0), 100);
///     pages.iter().for_each(|&p| { s.insert(slot, p); });
///     s
/// };
/// let mut epochs = DirtyEpochs::new();
/// epochs.record(&round(&[1, 2]));          // after the full snapshot at checkpoint 0
/// let c1 = epochs.checkpoint();             // snapshot 1 = since(0)
/// assert_eq!(epochs.since(0)?.total(), 2);
/// epochs.record(&round(&[2, 7]));
/// // Snapshot 1 failed: not committed, so since(0) still has its pages, and the new ones.
/// assert_eq!(epochs.since(0)?.total(), 3);
/// epochs.commit(c1)?;                       // snapshot 1 written: pages before checkpoint 1 dropped
/// assert_eq!(epochs.since(c1)?.total(), 2);
/// assert!(epochs.since(0).is_err(), "committed away");
/// # Ok::<(), tdp_kvm::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DirtyEpochs {
    /// The id of `epochs[0]`, the oldest kept.
    first: u64,
    /// Never empty: the last is the open epoch.
    epochs: VecDeque<DirtySets>,
}

impl Default for DirtyEpochs {
    fn default() -> Self {
        DirtyEpochs::new()
    }
}

impl DirtyEpochs {
    /// One open epoch, 0.
    #[must_use]
    pub fn new() -> Self {
        DirtyEpochs { first: 0, epochs: VecDeque::from([DirtySets::default()]) }
    }

    /// Adds a collect's result (or any pages) to the open epoch.
    pub fn record(&mut self, pages: &DirtySets) {
        if let Some(open) = self.epochs.back_mut() {
            open.merge(pages);
        }
    }

    /// Closes the open epoch and opens the next; returns the new checkpoint's id. The pages recorded from
    /// here on are "since" it.
    pub fn checkpoint(&mut self) -> u64 {
        self.epochs.push_back(DirtySets::default());
        self.current()
    }

    /// The open epoch's id (the latest checkpoint).
    #[must_use]
    pub fn current(&self) -> u64 {
        self.first + (self.epochs.len() as u64).saturating_sub(1)
    }

    /// The oldest checkpoint still kept.
    #[must_use]
    pub const fn oldest(&self) -> u64 {
        self.first
    }

    /// Everything recorded since checkpoint `n`: the union of epochs `n..=current`.
    ///
    /// # Errors
    /// [`Error::EpochUnavailable`] if `n` was committed away or is not a checkpoint yet.
    pub fn since(&self, n: u64) -> Result<DirtySets> {
        let skip = self.index(n)?;
        let mut out = DirtySets::default();
        self.epochs.iter().skip(skip).for_each(|e| out.merge(e));
        Ok(out)
    }

    /// The snapshot at checkpoint `n` is durable: drops the epochs before `n`; `since(n)` and later stay.
    ///
    /// # Errors
    /// [`Error::EpochUnavailable`] as for [`since`](DirtyEpochs::since); nothing changes on error.
    pub fn commit(&mut self, n: u64) -> Result<()> {
        let drop = self.index(n)?;
        self.epochs.drain(..drop);
        self.first = n;
        Ok(())
    }

    fn index(&self, n: u64) -> Result<usize> {
        let unavailable =
            Error::EpochUnavailable { requested: n, oldest: self.first, current: self.current() };
        if n < self.first || n > self.current() {
            return Err(unavailable);
        }
        usize::try_from(n - self.first).map_err(|_| unavailable)
    }
}

#[cfg(test)]
mod tests {
    use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};

    use super::DirtyEpochs;
    use crate::DirtySets;

    fn round(pages: &[u64]) -> DirtySets {
        let slot = RingSlot::new(AsId(0), SlotId(2));
        let mut s = DirtySets::default();
        s.add_slot(slot, Gpa(0x1000), 64);
        for &p in pages {
            s.insert(slot, p);
        }
        s
    }

    #[test]
    fn i4_an_uncommitted_epoch_keeps_every_page_and_bad_checkpoints_change_nothing() {
        let mut e = DirtyEpochs::new();
        e.record(&round(&[1]));
        let c1 = e.checkpoint();
        e.record(&round(&[2]));
        let c2 = e.checkpoint();
        e.record(&round(&[3]));
        assert_eq!((c1, c2, e.current(), e.oldest()), (1, 2, 2, 0));
        let offsets =
            |s: DirtySets| s.iter().flat_map(|x| x.offsets().collect::<Vec<_>>()).collect::<Vec<_>>();
        assert_eq!(offsets(e.since(0).unwrap()), [1, 2, 3]);
        assert_eq!(offsets(e.since(c2).unwrap()), [3]);
        let before = e.clone();
        assert!(e.commit(9).is_err() && e == before, "a future checkpoint: refused, nothing dropped");
        e.commit(c2).unwrap();
        assert!(e.since(c1).is_err() && e.commit(c1).is_err(), "committed away");
        assert_eq!(offsets(e.since(c2).unwrap()), [3]);
    }
}
