//! Write tracking in the MMU (KVM's page-track for nested virtualization: `kvm_write_track_add_gfn`,
//! `kvm_write_track_remove_gfn`, `kvm_tdp_mmu_write_protect_gfn`). Tracking a gfn (the counts are
//! [`crate::memslot::WriteTrack`], beside the memslots) write-protects every leaf that maps it, in every
//! root, clearing MMU-writable too so the fast path cannot undo it; from then on a fault on the gfn
//! installs a read-only 4 KiB leaf, a write to it is handed back for emulation
//! ([`super::EmulateReason::WriteTracked`]), and no huge leaf is built over it. Untracking only drops
//! the count: the gfn becomes writable at its next write fault, and huge leaves come back once the
//! small ones are zapped (a refault then maps huge again).

use lock_api::RawRwLock;

use crate::addr::{AsId, Gfn, Level};
use crate::flush::Flush;
use crate::host::Host;
use crate::iter::TdpIter;
use crate::memslot::TrackError;

use super::ExclusiveMmu;

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Adds one to `gfn`'s write-tracking count (KVM's `kvm_write_track_add_gfn`); the first one
    /// write-protects the gfn in every root ([`ExclusiveMmu::write_protect_gfn`]). The caller owes the
    /// returned flush before it relies on writes exiting.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Level, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{EmulateReason, FaultOutcome, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, Machine};
    ///
    /// let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })?;
    /// let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, SlotFlags::empty());
    /// m.mmu().write().insert_memslot(slot)?;
    /// let mut vcpu = VcpuMmu::new();
    /// m.mmu().load_root(&mut vcpu, AsId(0))?;
    /// let fault = |gfn: u64, access| Fault {
    ///     as_id: AsId(0),
    ///     gpa: Gfn(gfn).gpa(),
    ///     access,
    ///     kind: FaultKind::Violation { present: false },
    /// };
    /// // A write maps 2 MiB writable; tracking gfn 7 write-protects that leaf.
    /// assert_eq!(m.mmu().handle_fault(&mut vcpu, fault(3, AccessKind::Write), &mut ()), Ok(FaultOutcome::Fixed));
    /// let flush = m.mmu().write().track_write(AsId(0), Gfn(7))?;
    /// flush.run(m.host());
    /// // A write to gfn 7 now exits; a write next to it maps a 4 KiB leaf (no huge leaf over gfn 7).
    /// assert_eq!(
    ///     m.mmu().handle_fault(&mut vcpu, fault(7, AccessKind::Write), &mut ()),
    ///     Ok(FaultOutcome::Emulate(EmulateReason::WriteTracked))
    /// );
    /// assert_eq!(m.mmu().handle_fault(&mut vcpu, fault(8, AccessKind::Write), &mut ()), Ok(FaultOutcome::Fixed));
    /// let root = vcpu.root().expect("loaded");
    /// assert_eq!(m.mmu().lookup(root, Gfn(8)).map(|(_, level)| level), Some(Level::L1));
    /// m.mmu().write().untrack_write(AsId(0), Gfn(7))?;
    /// m.mmu().release_vcpu(&mut vcpu);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`TrackError::NoSlot`] when no memslot covers `gfn`, [`TrackError::Private`] in a private memslot,
    /// [`TrackError::TooMany`] past 65535; nothing changed.
    pub fn track_write(&mut self, as_id: AsId, gfn: Gfn) -> Result<Flush, TrackError> {
        match self.slots.find(as_id, gfn) {
            None => return Err(TrackError::NoSlot { as_id, gfn }),
            Some(slot) if slot.is_private() => return Err(TrackError::Private { as_id, gfn }),
            Some(_) => {}
        }
        if self.slots.write_track_mut().add(as_id, gfn)? > 1 {
            return Ok(Flush::none());
        }
        Ok(self.write_protect_gfn(as_id, gfn))
    }

    /// Takes one from `gfn`'s write-tracking count (KVM's `kvm_write_track_remove_gfn`). Nothing is
    /// made writable here: the next write fault on the gfn does that.
    ///
    /// # Errors
    /// [`TrackError::NotTracked`]; nothing changed.
    pub fn untrack_write(&mut self, as_id: AsId, gfn: Gfn) -> Result<(), TrackError> {
        self.slots.write_track_mut().remove(as_id, gfn).map(|_| ())
    }

    /// Clears W and MMU-writable on every leaf that maps `gfn` in every root of `as_id`, valid or not,
    /// at any level (a huge leaf over it is protected whole), as KVM's `kvm_tdp_mmu_write_protect_gfn`.
    /// Returns the flush the caller owes (none when nothing was writable).
    pub fn write_protect_gfn(&mut self, as_id: AsId, gfn: Gfn) -> Flush {
        let mmu = self.mmu;
        let fmt = *mmu.format();
        let mut flush = Flush::none();
        let end = Gfn(gfn.0.saturating_add(1));
        for (root, _) in mmu.roots.acquire_all(Some(as_id)) {
            let mut it = TdpIter::new(&mmu.host, &fmt, root, mmu.config.root_level, Level::L1, gfn, end);
            while it.valid() {
                let old = it.old_spte;
                let level = it.level();
                if old.is_present() && old.is_leaf(level) {
                    let new = fmt.write_protected_for_tracking(old);
                    if new != old {
                        mmu.set_spte_exclusive(as_id, &mut it, new);
                        flush = flush.merge(Flush::range(as_id, it.gfn(), level.pages()));
                    }
                }
                it.next();
            }
            mmu.release_root(root);
        }
        flush
    }
}
