//! TLB flush requests that cannot be forgotten.
//!
//! An operation that can leave a stale translation in some vCPU's TLB returns a [`Flush`]. It is
//! `#[must_use]`: the caller runs it ([`Flush::run`]), merges it into a batch ([`Flush::merge`]), or
//! drops it explicitly with [`Flush::ignore`], saying why in a comment. This replaces KVM's `bool flush`
//! threaded down call chains, where one missed `|=` is a stale translation (invariant I3).

use crate::addr::{AsId, Gfn};
use crate::host::TlbFlush;

/// A pending TLB invalidation.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn};
/// use tdp_core::flush::Flush;
/// let batch = Flush::range(AsId(0), Gfn(0x10), 1).merge(Flush::range(AsId(0), Gfn(0x20), 16));
/// assert_eq!(batch, Flush::range(AsId(0), Gfn(0x10), 0x20));
/// assert!(Flush::none().merge(Flush::all()).is_all());
/// batch.ignore(); // nothing was cached in this example
/// ```
#[must_use = "a stale translation stays in some TLB unless this flush is run, merged, or explicitly ignored"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flush(FlushKind);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlushKind {
    None,
    Range { as_id: AsId, start: Gfn, end: Gfn },
    All,
}

impl Flush {
    /// Nothing to flush.
    #[inline]
    pub const fn none() -> Flush {
        Flush(FlushKind::None)
    }
    /// Flush translations of `pages` 4 KiB frames from `start` in address space `as_id`.
    #[inline]
    pub const fn range(as_id: AsId, start: Gfn, pages: u64) -> Flush {
        if pages == 0 {
            return Flush::none();
        }
        Flush(FlushKind::Range { as_id, start, end: Gfn(start.0.saturating_add(pages)) })
    }
    /// Flush every translation of every vCPU.
    #[inline]
    pub const fn all() -> Flush {
        Flush(FlushKind::All)
    }
    /// Whether nothing needs flushing.
    #[must_use]
    #[inline]
    pub const fn is_none(&self) -> bool {
        matches!(self.0, FlushKind::None)
    }
    /// Whether everything must be flushed.
    #[must_use]
    #[inline]
    pub const fn is_all(&self) -> bool {
        matches!(self.0, FlushKind::All)
    }
    /// One request covering both. Two ranges in one address space become their hull; ranges in
    /// different address spaces become a full flush.
    #[inline]
    pub fn merge(self, other: Flush) -> Flush {
        match (self.0, other.0) {
            (FlushKind::None, _) => other,
            (_, FlushKind::None) => self,
            (
                FlushKind::Range { as_id: a, start: s1, end: e1 },
                FlushKind::Range { as_id: b, start: s2, end: e2 },
            ) if a == b => Flush(FlushKind::Range { as_id: a, start: s1.min(s2), end: e1.max(e2) }),
            _ => Flush::all(),
        }
    }
    /// Runs the flush on `tlb` (a no-op for [`Flush::none`]).
    #[inline]
    pub fn run<T: TlbFlush + ?Sized>(self, tlb: &T) {
        match self.0 {
            FlushKind::None => {}
            FlushKind::Range { as_id, start, end } => tlb.flush_range(as_id, start, end.0 - start.0),
            FlushKind::All => tlb.flush_all(),
        }
    }
    /// Drops the request on purpose. Call sites say in a comment why no stale translation can remain.
    #[inline]
    pub fn ignore(self) {}
}
