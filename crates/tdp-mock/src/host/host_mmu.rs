//! The mock host's own MMU: how the host maps the pages behind memslots (a memslot's host addresses) to
//! host frames, and how it changes that mapping the way Linux does under a VM: swap a page out and back
//! in, migrate it to another frame, merge identical pages into one read-only frame (KSM) and break that
//! sharing again on a write (copy-on-write).
//!
//! Every change that takes a frame away is bracketed by the invalidation hook (the VM's MMU notifier:
//! [`tdp_core::mmu::ExclusiveMmu::invalidate_range_start`] / `invalidate_range_end` for the gfns that map
//! the page), and the contents move only between the two, after the start has zapped and flushed: so a
//! test can tell a stale translation (a write that lands in a frame the page no longer lives in) from a
//! correct one by reading the page back through this map. By default (no change yet) a host page maps the
//! guest-RAM frame with the same number, as before this module existed.
//!
//! Lock order: the hook takes the MMU lock, so no host-MMU lock is held while it runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tdp_core::addr::{PAGE_SHIFT, PAGE_SIZE, Pfn};

use crate::lock;

/// What the host does to a page, as the VM's MMU notifier sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostInvalidation {
    /// The host is about to change the mapping of `pages` pages from host address `hva`.
    Start {
        /// The first host address.
        hva: u64,
        /// How many 4 KiB pages.
        pages: u64,
    },
    /// The change that the `Start` returning `token` announced is done.
    End {
        /// What the matching `Start` returned.
        token: u64,
    },
}

/// The VM's MMU notifier, as the host calls it: `Start` returns a token that the matching `End` gets back.
pub type InvalidationHook = Arc<dyn Fn(HostInvalidation) -> u64 + Send + Sync>;

/// Why a host-MMU change could not be made (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostMmuError {
    /// No invalidation hook is registered: a change would leave stale translations.
    #[error("no invalidation hook: the VM would keep stale translations")]
    NoHook,
    /// No spare frame to move a page to.
    #[error("no spare host frame")]
    NoSpareFrame,
    /// The page is swapped out.
    #[error("host page {hva:#x} is swapped out")]
    Swapped {
        /// The host address.
        hva: u64,
    },
    /// One of the pages is already merged with another: the mock merges pairs only.
    #[error("host page {hva:#x} is already shared")]
    AlreadyShared {
        /// The host address.
        hva: u64,
    },
    /// The pages to merge do not hold the same bytes.
    #[error("host pages {a:#x} and {b:#x} differ: KSM merges only identical pages")]
    NotIdentical {
        /// One host address.
        a: u64,
        /// The other.
        b: u64,
    },
}

/// Counts of what the host MMU did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMmuStats {
    /// Pages swapped out.
    pub swap_outs: u64,
    /// Pages swapped back in by a translation.
    pub swap_ins: u64,
    /// Pages moved to another frame.
    pub migrations: u64,
    /// Pages merged into a shared read-only frame.
    pub merges: u64,
    /// Shared pages copied on a write.
    pub cow_breaks: u64,
}

/// Where one host page lives when it is not at its default frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// In `pfn`; `shared` when KSM merged it (read-only until a write breaks the sharing).
    Frame { pfn: Pfn, shared: bool },
    /// Swapped out: its bytes are in `State::swapped`.
    Swapped,
}

#[derive(Default)]
struct State {
    /// Host page number (host address >> 12) -> where it lives, for every page ever changed.
    map: HashMap<u64, Mapping>,
    /// Host pages ever changed: the host maps them (and their huge-page neighbours) at 4 KiB.
    changed: BTreeSet<u64>,
    /// Frames free to move pages to.
    spare: Vec<Pfn>,
    /// Bytes of swapped-out pages.
    swapped: HashMap<u64, Option<Box<[u8; PAGE_SIZE as usize]>>>,
    stats: HostMmuStats,
}

/// The host MMU of a [`super::MockHost`].
#[derive(Default)]
pub(super) struct HostMmu {
    state: Mutex<State>,
    hook: Mutex<Option<InvalidationHook>>,
}

/// How a translation found a host page.
pub(super) enum Resolved {
    /// At `pfn`, `changed` when it is not the page's default frame (mapped at 4 KiB), `shared` when KSM
    /// merged it (read-only).
    Frame { pfn: Pfn, changed: bool, shared: bool },
    /// It was shared and the access is a write: break the sharing, then resolve again.
    NeedsCow,
    /// It was swapped out and nothing could bring it back.
    Unavailable,
}

impl HostMmu {
    pub(super) fn set_hook(&self, hook: Option<InvalidationHook>) {
        *lock(&self.hook) = hook;
    }

    pub(super) fn add_spare(&self, frames: impl IntoIterator<Item = Pfn>) {
        lock(&self.state).spare.extend(frames);
    }

    pub(super) fn stats(&self) -> HostMmuStats {
        lock(&self.state).stats
    }

    /// Whether host page `page` (or, for `pages > 1`, any of the range from it) was ever changed.
    pub(super) fn any_changed(&self, page: u64, pages: u64) -> bool {
        lock(&self.state).changed.range(page..page.saturating_add(pages)).next().is_some()
    }

    /// Whether host page `page` is KSM-shared.
    pub(super) fn is_shared(&self, page: u64) -> bool {
        matches!(lock(&self.state).map.get(&page), Some(Mapping::Frame { shared: true, .. }))
    }

    /// The frame host page `page` lives in now (`None` when swapped out).
    pub(super) fn frame_of(&self, page: u64) -> Option<Pfn> {
        match lock(&self.state).map.get(&page) {
            None => Some(Pfn(page)),
            Some(Mapping::Frame { pfn, .. }) => Some(*pfn),
            Some(Mapping::Swapped) => None,
        }
    }

    /// The `u64` at byte `at` of swapped-out host page `page` (0 if it was never written).
    pub(super) fn read_swapped_u64(&self, page: u64, at: usize) -> u64 {
        let state = lock(&self.state);
        let bytes = state.swapped.get(&page).and_then(|b| b.as_ref());
        bytes.map_or(0, |b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(word)
        })
    }

    /// Where host page `page` lives for an access (`write` breaks KSM sharing; a swapped-out page is
    /// swapped in with `data`, the host's page contents, unless `fault_in` is false).
    pub(super) fn resolve(&self, page: u64, write: bool, fault_in: bool, data: &Mutex<DataMap>) -> Resolved {
        let mut state = lock(&self.state);
        match state.map.get(&page).copied() {
            None => Resolved::Frame { pfn: Pfn(page), changed: false, shared: false },
            Some(Mapping::Frame { shared: true, .. }) if write => Resolved::NeedsCow,
            Some(Mapping::Frame { pfn, shared }) => Resolved::Frame { pfn, changed: true, shared },
            Some(Mapping::Swapped) if !fault_in => Resolved::Unavailable,
            Some(Mapping::Swapped) => {
                // Swap-in: nothing maps the page, so nothing needs invalidating (Linux's do_swap_page).
                let Some(pfn) = state.spare.pop() else {
                    return Resolved::Unavailable;
                };
                let bytes = state.swapped.remove(&page).flatten();
                let mut data = lock(data);
                match bytes {
                    Some(bytes) => data.insert(pfn, bytes),
                    None => data.remove(&pfn),
                };
                state.map.insert(page, Mapping::Frame { pfn, shared: false });
                state.stats.swap_ins += 1;
                Resolved::Frame { pfn, changed: true, shared: false }
            }
        }
    }

    /// Runs `change` on the state between the hook's start and end for `pages` pages from `page`, widened
    /// to whole host huge pages of `huge` pages: changing one page of a huge host mapping splits it, and
    /// Linux invalidates the whole huge range when it splits (a transparent huge page's split runs the
    /// notifier over all of it), or a fault could still install a huge leaf over the changed page.
    fn bracketed<T>(
        &self,
        (page, pages, huge): (u64, u64, u64),
        change: impl FnOnce(&mut State) -> Result<T, HostMmuError>,
    ) -> Result<T, HostMmuError> {
        let hook = lock(&self.hook).clone().ok_or(HostMmuError::NoHook)?;
        let huge = huge.max(1);
        let first = page - page % huge;
        let end = page.saturating_add(pages).div_ceil(huge).saturating_mul(huge);
        let token = hook(HostInvalidation::Start { hva: first << PAGE_SHIFT, pages: end - first });
        let result = change(&mut lock(&self.state));
        hook(HostInvalidation::End { token });
        result
    }

    /// Swaps host page `page` out: its frame goes back to the spare frames, its bytes to swap.
    pub(super) fn swap_out(&self, page: u64, huge: u64, data: &Mutex<DataMap>) -> Result<(), HostMmuError> {
        self.bracketed((page, 1, huge), |state| {
            let pfn = current(state, page)?;
            let bytes = lock(data).remove(&pfn);
            state.swapped.insert(page, bytes);
            state.map.insert(page, Mapping::Swapped);
            state.changed.insert(page);
            state.spare.push(pfn);
            state.stats.swap_outs += 1;
            Ok(())
        })
    }

    /// Moves host page `page` to a spare frame, bytes and all; returns the new frame.
    pub(super) fn migrate(&self, page: u64, huge: u64, data: &Mutex<DataMap>) -> Result<Pfn, HostMmuError> {
        self.bracketed((page, 1, huge), |state| {
            let old = current(state, page)?;
            if matches!(state.map.get(&page), Some(Mapping::Frame { shared: true, .. })) {
                // A shared frame stays where it is: migrating it would move the other sharers too.
                return Ok(old);
            }
            let new = state.spare.pop().ok_or(HostMmuError::NoSpareFrame)?;
            move_bytes(&mut lock(data), old, new);
            state.map.insert(page, Mapping::Frame { pfn: new, shared: false });
            state.changed.insert(page);
            state.spare.push(old);
            state.stats.migrations += 1;
            Ok(new)
        })
    }

    /// KSM: makes host pages `a` and `b` (identical bytes) share `a`'s frame, read-only; `b`'s frame
    /// goes to the spare frames.
    pub(super) fn merge(
        &self,
        (a, b): (u64, u64),
        huge: u64,
        data: &Mutex<DataMap>,
    ) -> Result<(), HostMmuError> {
        let (first, pages) = (a.min(b), a.abs_diff(b) + 1);
        self.bracketed((first, pages, huge), |state| {
            let (fa, fb) = (current(state, a)?, current(state, b)?);
            if fa == fb {
                return Ok(());
            }
            // Only unshared pages: `b`'s frame is freed below, which must leave no other page on it.
            for page in [a, b] {
                if matches!(state.map.get(&page), Some(Mapping::Frame { shared: true, .. })) {
                    return Err(HostMmuError::AlreadyShared { hva: page << PAGE_SHIFT });
                }
            }
            let mut data = lock(data);
            // A frame never written reads as zeros, like one written with zeros.
            let zero = [0u8; PAGE_SIZE as usize];
            let bytes = |pfn: Pfn| data.get(&pfn).map_or(&zero[..], |p| &p[..]);
            if bytes(fa) != bytes(fb) {
                return Err(HostMmuError::NotIdentical { a: a << PAGE_SHIFT, b: b << PAGE_SHIFT });
            }
            data.remove(&fb);
            state.map.insert(a, Mapping::Frame { pfn: fa, shared: true });
            state.map.insert(b, Mapping::Frame { pfn: fa, shared: true });
            state.changed.extend([a, b]);
            state.spare.push(fb);
            state.stats.merges += 1;
            Ok(())
        })
    }

    /// Copy-on-write: gives host page `page`, shared by KSM, a private copy in a spare frame.
    pub(super) fn break_cow(&self, page: u64, huge: u64, data: &Mutex<DataMap>) -> Result<(), HostMmuError> {
        self.bracketed((page, 1, huge), |state| {
            let Some(Mapping::Frame { pfn: shared, shared: true }) = state.map.get(&page).copied() else {
                return Ok(()); // Another thread broke it first.
            };
            let new = state.spare.pop().ok_or(HostMmuError::NoSpareFrame)?;
            let mut data = lock(data);
            match data.get(&shared).cloned() {
                Some(bytes) => data.insert(new, bytes),
                None => data.remove(&new),
            };
            state.map.insert(page, Mapping::Frame { pfn: new, shared: false });
            // The last sharer keeps the frame, now private.
            let others: Vec<u64> = state
                .map
                .iter()
                .filter(|(_, m)| **m == Mapping::Frame { pfn: shared, shared: true })
                .map(|(p, _)| *p)
                .collect();
            if let [last] = others[..] {
                state.map.insert(last, Mapping::Frame { pfn: shared, shared: false });
            }
            state.stats.cow_breaks += 1;
            Ok(())
        })
    }
}

/// The bytes of host frames that were ever written.
pub(super) type DataMap = HashMap<Pfn, Box<[u8; PAGE_SIZE as usize]>>;

/// The frame `page` lives in, or why it has none.
fn current(state: &State, page: u64) -> Result<Pfn, HostMmuError> {
    match state.map.get(&page) {
        None => Ok(Pfn(page)),
        Some(Mapping::Frame { pfn, .. }) => Ok(*pfn),
        Some(Mapping::Swapped) => Err(HostMmuError::Swapped { hva: page << PAGE_SHIFT }),
    }
}

/// Moves the bytes of frame `from` to frame `to`.
fn move_bytes(data: &mut DataMap, from: Pfn, to: Pfn) {
    match data.remove(&from) {
        Some(bytes) => data.insert(to, bytes),
        None => data.remove(&to),
    };
}
