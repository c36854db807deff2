//! [`DirtyShadow`]: the I4 checker. It keeps a copy of chosen words of every page of some memslots as
//! of the last harvest, and checks that every page whose words changed since then is in the next
//! harvest. A harvest may report more (a page written with the value it held, a mark whose write
//! raced the harvest); it may never report less.
//!
//! The comparison is by contents, not by a list of the accesses a test made, so it also covers writes
//! the test did not intend to count (another vCPU's, a retried one). Call it with every vCPU stopped
//! and every page-modification log drained ([`crate::Vcpu::flush_pml`]), as KVM kicks its vCPUs before
//! a dirty-log read.

use std::collections::{BTreeSet, HashMap};

use tdp_core::addr::{Gfn, SlotId};
use tdp_core::memslot::Memslot;

use super::Violation;
use crate::host::MockHost;

/// A harvested page: the slot and the page's offset in it (what a ring entry or a bitmap bit names).
pub type DirtyPage = (SlotId, u64);

/// A copy of guest memory as of the last harvest, for the I4 check.
///
/// ```
/// use std::collections::BTreeSet;
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::checker::DirtyShadow;
/// use tdp_mock::{HostConfig, Machine, Violation};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
/// let slot = m.ram_slot(AsId(0), SlotId(1), Gfn(0x100), 16, SlotFlags::LOG_DIRTY);
/// m.mmu().write().insert_memslot(slot)?;
/// let mut shadow = DirtyShadow::new(m.host(), &[slot], &[0]);
/// let mut vcpu = m.new_vcpu(AsId(0));
/// vcpu.write_u64(m.mmu(), Gpa(0x10_3000), 42)?; // page 3 of the slot
/// // A harvest that forgot the page is caught...
/// let missed = shadow.check_harvest(m.host(), &BTreeSet::new()).unwrap_err();
/// assert!(matches!(missed[..], [Violation::UnreportedWrite { offset: 3, .. }]));
/// // ...and after it the shadow holds the new contents: nothing changed since.
/// assert_eq!(shadow.check_harvest(m.host(), &BTreeSet::new()), Ok(0));
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct DirtyShadow {
    slots: Vec<Memslot>,
    /// Byte offsets, within each page, of the words compared.
    offsets: Vec<u64>,
    /// Per slot id: the words of every page, `offsets.len()` per page.
    words: HashMap<SlotId, Vec<u64>>,
}

impl DirtyShadow {
    /// A shadow of `slots` as they are now, comparing the `u64`s at byte `offsets` of each page (the
    /// words the test writes; pass every multiple of 8 below 4096 to compare whole pages).
    ///
    /// # Panics
    /// If two slots share an id (harvested pages name a slot by id), or an offset leaves no room for a
    /// `u64` in a page.
    pub fn new(host: &MockHost, slots: &[Memslot], offsets: &[u64]) -> DirtyShadow {
        let ids: BTreeSet<SlotId> = slots.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), slots.len(), "the shadowed slots must have distinct ids");
        let mut shadow =
            DirtyShadow { slots: slots.to_vec(), offsets: offsets.to_vec(), words: HashMap::new() };
        shadow.refresh(host);
        shadow
    }

    /// Takes a new copy of every page. Use it when logging starts again: writes made while it was off
    /// were never tracked, so the next harvest owes only what changes from now on.
    pub fn refresh(&mut self, host: &MockHost) {
        self.words = self.slots.iter().map(|s| (s.id, self.read_slot(host, s))).collect();
    }

    /// Every page whose words differ from the copy.
    pub fn changed(&self, host: &MockHost) -> BTreeSet<DirtyPage> {
        self.slots.iter().flat_map(|slot| self.changed_in(slot, &self.read_slot(host, slot))).collect()
    }

    /// Checks a harvest: every page changed since the last check (or refresh) must be in `harvested`.
    /// Afterwards the copy holds the current contents, whatever the result, so one lost write is
    /// reported once. Returns how many changed pages were found.
    ///
    /// # Errors
    /// One [`Violation::UnreportedWrite`] (I4) per changed page missing from `harvested`.
    pub fn check_harvest(
        &mut self,
        host: &MockHost,
        harvested: &BTreeSet<DirtyPage>,
    ) -> Result<usize, Vec<Violation>> {
        let mut changed = 0;
        let mut violations = Vec::new();
        for slot in &self.slots {
            let now = self.read_slot(host, slot);
            for page in self.changed_in(slot, &now) {
                changed += 1;
                if !harvested.contains(&page) {
                    let (id, offset) = page;
                    let gfn = Gfn(slot.base_gfn.0 + offset);
                    violations.push(Violation::UnreportedWrite { slot: id, offset, gfn });
                }
            }
            self.words.insert(slot.id, now);
        }
        if violations.is_empty() { Ok(changed) } else { Err(violations) }
    }

    /// The pages of `slot` whose words in `now` differ from the copy.
    fn changed_in(&self, slot: &Memslot, now: &[u64]) -> Vec<DirtyPage> {
        let per_page = self.offsets.len().max(1);
        let old = &self.words[&slot.id];
        now.chunks(per_page)
            .zip(old.chunks(per_page))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(page, _)| (slot.id, page as u64))
            .collect()
    }

    fn read_slot(&self, host: &MockHost, slot: &Memslot) -> Vec<u64> {
        let mut words = Vec::with_capacity(slot.pages as usize * self.offsets.len());
        for page in 0..slot.pages {
            let hva = slot.host_addr(Gfn(slot.base_gfn.0 + page));
            words.extend(self.offsets.iter().map(|&off| host.read_hva_u64(hva, off)));
        }
        words
    }
}
