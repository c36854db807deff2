//! Page-modification logging: enabling it in the current VMCS, and draining the 512-entry log into a
//! `tdp-core` dirty sink (a vCPU's dirty ring through [`crate::ring_sink::RingSink`], or a bitmap).
//!
//! Source: Intel SDM Vol. 3C, chapter "VMX Support for Address Translation", section
//! "Page-Modification Logging", and the "PML index" guest-state field (edition 325462-080, June 2023):
//! - with "enable PML" (secondary control bit 17) and EPT A/D flags enabled in the EPTP, each write
//!   that sets an EPT leaf's dirty flag from 0 to 1 logs the guest-physical address, bits 11:0 clear,
//!   at the PML index, then decrements the index;
//! - the index starts at 511 (empty), counts down, and after entry 0 is written wraps to 0xFFFF; when the
//!   CPU must log and finds the index outside 0..=511, it takes a page-modification log-full exit (basic
//!   reason 62) instead, before the write.
//!
//! So after an exit the valid entries are `index + 1 ..= 511` (entry 511 oldest), or all 512 when the
//! index is outside 0..=511. [`Pml::drain`] walks exactly those, oldest first, and resets the index to
//! 511: no entry is lost or reported twice. Bochs confirmed the behaviour (recipes/bochs-vmx.md): a 2 MiB
//! leaf logs only its first-written 4 KiB page, and with EPT A/D the guest's own page-table walks log
//! their pages too.
//!
//! Keeps: I4 for the hardware log (every logged GPA of a dirty-logged slot reaches the sink exactly once)
//! and I5 (log contents are guest-influenced: any value maps to a slot or is counted, never a panic).

use tdp_core::addr::{AsId, Gfn, PAGE_SIZE};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::MemslotSet;
use tdp_core::sync::{AtomicU64, Ordering};

use crate::caps::EptFeatures;
use crate::eptp::Eptp;
use crate::instr::{VmxError, VmxInstructions};
use crate::vmcs::{PrimaryControls, SecondaryControls, VmcsField};

/// Entries in the log: a 4 KiB page of 64-bit GPAs (KVM's `PML_LOG_NR_ENTRIES`).
pub const PML_ENTRIES: usize = 512;
/// The PML index of an empty log: the CPU writes entry 511 first (KVM's `PML_HEAD_INDEX`).
pub const PML_HEAD_INDEX: u16 = 511;

/// The page-modification log page: 512 GPAs the CPU writes while the guest runs, 4 KiB-aligned.
///
/// The entries are atomics because the CPU writes them behind the hypervisor's back; the hypervisor
/// reads them only while the vCPU is out of the guest, after the VM exit that serialises the CPU's
/// writes, so Relaxed loads see every logged value.
#[derive(Debug)]
#[repr(C, align(4096))]
pub struct PmlPage {
    entries: [AtomicU64; PML_ENTRIES],
}

static_assertions::const_assert_eq!(core::mem::size_of::<PmlPage>(), 4096);

impl Default for PmlPage {
    fn default() -> Self {
        PmlPage::new()
    }
}

impl PmlPage {
    /// A zeroed log page.
    #[must_use]
    pub const fn new() -> PmlPage {
        PmlPage { entries: [const { AtomicU64::new(0) }; PML_ENTRIES] }
    }

    /// The page's physical address on an identity-mapped hypervisor: its address.
    #[must_use]
    pub fn identity_hpa(&self) -> u64 {
        self as *const PmlPage as usize as u64
    }

    /// Entry `index` (0..512) as the CPU left it.
    ///
    /// # Panics
    /// If `index >= 512`.
    #[must_use]
    pub fn entry(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Relaxed)
    }

    /// Writes entry `index` the way the CPU does (for tests and software models of the CPU).
    ///
    /// # Panics
    /// If `index >= 512`.
    pub fn set_entry(&self, index: usize, gpa: u64) {
        self.entries[index].store(gpa, Ordering::Relaxed);
    }
}

/// PML could not be enabled or drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PmlError {
    /// The CPU has no PML (or no EPT A/D flags).
    #[error("the CPU does not support page-modification logging")]
    Unsupported,
    /// The EPTP does not enable A/D flags, without which no write is logged.
    #[error("PML needs EPT accessed/dirty flags, but {eptp:?} does not enable them")]
    AccessedDirtyOff {
        /// The EPTP given.
        eptp: Eptp,
    },
    /// The log page is not 4 KiB-aligned.
    #[error("PML log address {hpa:#x} is not 4 KiB-aligned")]
    Misaligned {
        /// The address given.
        hpa: u64,
    },
    /// The current VMCS does not activate the secondary controls, or does not enable EPT.
    #[error("PML needs EPT enabled in the current VMCS (primary {primary:#x}, secondary {secondary:#x})")]
    EptNotEnabled {
        /// The primary processor-based controls read from the VMCS.
        primary: u32,
        /// The secondary controls read from the VMCS.
        secondary: u32,
    },
    /// A VMREAD or VMWRITE failed.
    #[error("PML: {0}")]
    Vmx(#[from] VmxError),
}

/// What one drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PmlDrain {
    /// Entries in the log (0..=512).
    pub entries: u32,
    /// The index was outside 0..=511: the log was full (a log-full exit, or a drain just before one).
    pub was_full: bool,
    /// GPAs of dirty-logged slots, handed to the sink.
    pub marked: u32,
    /// GPAs of slots that are not dirty-logged now (dropped: only logged slots are tracked).
    pub not_logged: u32,
    /// GPAs in no memslot of the address space (dropped and counted: the guest's page tables outside
    /// RAM slots, or a slot deleted since the write).
    pub outside_slots: u32,
}

/// Totals over every drain of one log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PmlStats {
    /// Drains that found at least one entry.
    pub drains: u64,
    /// Drains that found the log full.
    pub full_logs: u64,
    /// Entries drained.
    pub entries: u64,
    /// Entries handed to the sink.
    pub marked: u64,
    /// Entries dropped because their slot was not logged.
    pub not_logged: u64,
    /// Entries dropped because no slot held them.
    pub outside_slots: u64,
}

/// One vCPU's page-modification log: the page and its counters. The PML index lives in the VMCS.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Pfn, SlotId};
/// use tdp_core::host::{DirtySink, DirtySource};
/// use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
/// use tdp_core::mmu::MmuConfig;
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::eptp::Eptp;
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::pml::{Pml, PmlPage};
/// use tdp_vmx::vmcs::{PrimaryControls, SecondaryControls, VmcsField};
///
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let eptp = Eptp::new(&ept, &MmuConfig::EPT_PML, Pfn(0x100))?;
/// vmx.set_field(VmcsField::CPU_BASED_VM_EXEC_CONTROL, PrimaryControls::ACTIVATE_SECONDARY_CONTROLS.bits().into());
/// vmx.set_field(VmcsField::SECONDARY_VM_EXEC_CONTROL, SecondaryControls::ENABLE_EPT.bits().into());
/// let page = PmlPage::new();
/// let mut pml = Pml::enable(&vmx, &ept, eptp, &page)?;
/// assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(511));
///
/// // The guest wrote two pages of slot 0: the CPU logged them at 511 and 510.
/// page.set_entry(511, 0x3000);
/// page.set_entry(510, 0x7000);
/// vmx.set_field(VmcsField::GUEST_PML_INDEX, 509);
/// let mut slots = MemslotSet::new(Gfn(1 << 36));
/// slots.insert(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, 0x100_0000, SlotFlags::LOG_DIRTY))?;
/// struct Marks(Vec<u64>);
/// impl DirtySink for Marks {
///     fn mark_dirty(&mut self, _: &Memslot, gfn: Gfn, _: DirtySource) { self.0.push(gfn.0) }
/// }
/// let mut marks = Marks(Vec::new());
/// let drained = pml.drain(&vmx, &slots, AsId(0), &mut marks)?;
/// assert_eq!((drained.entries, drained.marked), (2, 2));
/// assert_eq!(marks.0, [3, 7]); // oldest first
/// assert_eq!(vmx.field(VmcsField::GUEST_PML_INDEX), Some(511));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Pml<'p> {
    page: &'p PmlPage,
    stats: PmlStats,
}

impl<'p> Pml<'p> {
    /// Enables PML in the current VMCS with `page` as the log, at its identity-mapped address: sets the
    /// PML address, the index to 511 and the "enable PML" secondary control (keeping the others).
    ///
    /// # Errors
    /// See [`Pml::enable_at`].
    pub fn enable(
        vmx: &impl VmxInstructions,
        features: &EptFeatures,
        eptp: Eptp,
        page: &'p PmlPage,
    ) -> Result<Pml<'p>, PmlError> {
        Pml::enable_at(vmx, features, eptp, page, page.identity_hpa())
    }

    /// As [`Pml::enable`], for a hypervisor whose log page `page` is at physical address `hpa`.
    ///
    /// # Errors
    /// [`PmlError::Unsupported`], [`PmlError::AccessedDirtyOff`] (the EPTP must enable A/D flags),
    /// [`PmlError::Misaligned`], [`PmlError::EptNotEnabled`] (enable EPT in the VMCS first),
    /// [`PmlError::Vmx`]. The VMCS is unchanged unless a VMWRITE failed part way.
    pub fn enable_at(
        vmx: &impl VmxInstructions,
        features: &EptFeatures,
        eptp: Eptp,
        page: &'p PmlPage,
        hpa: u64,
    ) -> Result<Pml<'p>, PmlError> {
        if !features.pml {
            return Err(PmlError::Unsupported);
        }
        if !eptp.accessed_dirty() {
            return Err(PmlError::AccessedDirtyOff { eptp });
        }
        if !hpa.is_multiple_of(PAGE_SIZE) {
            return Err(PmlError::Misaligned { hpa });
        }
        let primary = vmx.vmread(VmcsField::CPU_BASED_VM_EXEC_CONTROL)? as u32;
        let secondary = vmx.vmread(VmcsField::SECONDARY_VM_EXEC_CONTROL)? as u32;
        let active = PrimaryControls::from_bits_retain(primary)
            .contains(PrimaryControls::ACTIVATE_SECONDARY_CONTROLS)
            && SecondaryControls::from_bits_retain(secondary).contains(SecondaryControls::ENABLE_EPT);
        if !active {
            return Err(PmlError::EptNotEnabled { primary, secondary });
        }
        vmx.vmwrite(VmcsField::PML_ADDRESS, hpa)?;
        vmx.vmwrite(VmcsField::GUEST_PML_INDEX, u64::from(PML_HEAD_INDEX))?;
        vmx.vmwrite(
            VmcsField::SECONDARY_VM_EXEC_CONTROL,
            u64::from(secondary | SecondaryControls::ENABLE_PML.bits()),
        )?;
        Ok(Pml { page, stats: PmlStats::default() })
    }

    /// Clears the "enable PML" control in the current VMCS. Drain first: entries still in the log are
    /// not read after this.
    ///
    /// # Errors
    /// [`PmlError::Vmx`] when the VMREAD or VMWRITE fails.
    pub fn disable(&self, vmx: &impl VmxInstructions) -> Result<(), PmlError> {
        let secondary = vmx.vmread(VmcsField::SECONDARY_VM_EXEC_CONTROL)?;
        vmx.vmwrite(
            VmcsField::SECONDARY_VM_EXEC_CONTROL,
            secondary & !u64::from(SecondaryControls::ENABLE_PML.bits()),
        )?;
        Ok(())
    }

    /// The log page.
    #[must_use]
    pub fn page(&self) -> &'p PmlPage {
        self.page
    }

    /// Totals over every drain.
    #[must_use]
    pub fn stats(&self) -> PmlStats {
        self.stats
    }

    /// Drains the log of the current VMCS into `sink` (KVM's `vmx_flush_pml_buffer`): on a log-full exit
    /// (reason 62), on every other exit before the exit is handled, and before each harvest of the
    /// dirty ring or bitmap (the VMM's "kick").
    ///
    /// Reads the PML index; sets it back to 511 *before* touching the entries, so that a failing VMWRITE
    /// leaves the log as it was (drain again later; nothing lost, nothing marked twice); then walks the
    /// entries from 511 down to `index + 1` (all 512 when the index is outside 0..=511), oldest first,
    /// maps each GPA (bits 11:0 ignored) to a memslot of `as_id` in `slots`, and marks it in `sink` with
    /// [`DirtySource::HardwareLog`] when the slot is dirty-logged. Other GPAs are counted in the result.
    ///
    /// The vCPU must be out of the guest (after a VM exit, on this CPU): the CPU writes the log only
    /// while the guest runs.
    ///
    /// # Errors
    /// [`PmlError::Vmx`] when reading or resetting the index fails; nothing was marked and the log is
    /// unchanged.
    pub fn drain(
        &mut self,
        vmx: &impl VmxInstructions,
        slots: &MemslotSet,
        as_id: AsId,
        sink: &mut dyn DirtySink,
    ) -> Result<PmlDrain, PmlError> {
        // The field is 16 bits wide; the CPU wraps it from 0 to 0xFFFF.
        let index = vmx.vmread(VmcsField::GUEST_PML_INDEX)? as u16;
        let was_full = usize::from(index) >= PML_ENTRIES;
        let oldest_unused = if was_full { 0 } else { usize::from(index) + 1 };
        let entries = (PML_ENTRIES - oldest_unused) as u32;
        let mut out = PmlDrain { entries, was_full, ..PmlDrain::default() };
        if entries == 0 {
            return Ok(out);
        }
        vmx.vmwrite(VmcsField::GUEST_PML_INDEX, u64::from(PML_HEAD_INDEX))?;
        for i in (oldest_unused..PML_ENTRIES).rev() {
            let gfn = Gfn(self.page.entry(i) / PAGE_SIZE);
            match slots.find(as_id, gfn) {
                Some(slot) if slot.is_dirty_logged() => {
                    sink.mark_dirty(slot, gfn, DirtySource::HardwareLog);
                    out.marked += 1;
                }
                Some(_) => out.not_logged += 1,
                None => out.outside_slots += 1,
            }
        }
        self.stats.drains += 1;
        self.stats.full_logs += u64::from(was_full);
        self.stats.entries += u64::from(entries);
        self.stats.marked += u64::from(out.marked);
        self.stats.not_logged += u64::from(out.not_logged);
        self.stats.outside_slots += u64::from(out.outside_slots);
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
