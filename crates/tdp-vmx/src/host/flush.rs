//! [`InveptFlush`]: `tdp-core`'s [`TlbFlush`] by INVEPT through the instruction layer.
//!
//! The MMU asks for a VM-wide flush; EPT caches translations per EPTP, so the flush must reach every
//! EPTP a vCPU may have cached translations for. The hypervisor registers each EPTP it loads
//! ([`InveptFlush::load_eptp`]) and retires the ones it stops using ([`InveptFlush::retire_eptp`]); a
//! retired EPTP is still flushed once, because translations tagged with it stay cached until then.
//! With single-context INVEPT the flush issues it for each registered EPTP; when the CPU lacks it, or
//! more EPTPs are registered than the table holds, one all-context INVEPT does. INVEPT has no range
//! form, so a range flush is a full one (of the same contexts).
//!
//! A failing INVEPT cannot be returned through `TlbFlush` (the core's flushes are infallible): the flush
//! falls back to all-context when the CPU has it, and counts the failure and keeps the error for the
//! hypervisor to check ([`InveptFlush::take_error`]), since a missed flush breaks I3.

use tdp_core::addr::{AsId, Gfn};
use tdp_core::host::TlbFlush;

use crate::caps::InveptSupport;
use crate::eptp::Eptp;
use crate::instr::{VmxError, VmxInstructions};
use crate::inv::{InveptDescriptor, InveptKind};

/// EPTPs one flusher tracks: two address spaces, each with a current and a retiring root, twice.
pub const MAX_EPTPS: usize = 8;

/// Counters of an [`InveptFlush`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlushStats {
    /// Flushes the MMU asked for (whole and range).
    pub requests: u64,
    /// Single-context INVEPTs issued.
    pub single_context: u64,
    /// All-context INVEPTs issued.
    pub all_context: u64,
    /// Requests with no EPTP ever loaded: nothing can be cached, nothing issued.
    pub skipped: u64,
    /// INVEPTs that failed.
    pub errors: u64,
    /// Requests delivered: every registered EPTP got its single-context INVEPT, or an all-context one
    /// succeeded. With a root being replaced, one request takes two INVEPTs (the retiring EPTP's last
    /// one and the current one's), so this, not the INVEPT count, is what to compare with `requests`.
    pub delivered: u64,
    /// Flushes that could not reach every context (an INVEPT failed, or more than [`MAX_EPTPS`] EPTPs
    /// were loaded, on a CPU without all-context INVEPT): an I3 risk the hypervisor must act on.
    pub uncovered: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    eptp: Eptp,
    retired: bool,
}

#[derive(Debug, Default)]
struct State {
    eptps: [Option<Slot>; MAX_EPTPS],
    /// More EPTPs were loaded than the table holds: only all-context covers them.
    overflowed: bool,
    stats: FlushStats,
    error: Option<VmxError>,
}

/// VM-wide TLB flushes by INVEPT.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Pfn};
/// use tdp_core::host::TlbFlush;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::eptp::Eptp;
/// use tdp_vmx::fake::{bochs, FakeVmx, Op};
/// use tdp_vmx::host::InveptFlush;
/// use tdp_vmx::inv::InveptKind;
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let flush = InveptFlush::new(&vmx, ept.invept);
/// let eptp = Eptp::new(&ept, &MmuConfig::EPT, Pfn(0x10))?;
/// flush.load_eptp(eptp);
/// flush.flush_range(AsId(0), Gfn(0x42), 1);
/// assert_eq!(vmx.take_ops(), [Op::Invept { kind: InveptKind::SingleContext, eptp: eptp.raw() }]);
/// assert_eq!(flush.stats().single_context, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct InveptFlush<V> {
    vmx: V,
    support: InveptSupport,
    state: spin::Mutex<State>,
}

impl<V: VmxInstructions> InveptFlush<V> {
    /// A flusher issuing INVEPT through `vmx` with the types in `support` (from
    /// [`crate::caps::EptFeatures::invept`]).
    pub fn new(vmx: V, support: InveptSupport) -> InveptFlush<V> {
        InveptFlush { vmx, support, state: spin::Mutex::new(State::default()) }
    }

    /// The instruction layer.
    pub fn vmx(&self) -> &V {
        &self.vmx
    }

    /// Registers an EPTP a vCPU is about to load (before VM entry). Loading one already registered
    /// (even retired) makes it current again.
    pub fn load_eptp(&self, eptp: Eptp) {
        let mut s = self.state.lock();
        if let Some(slot) = s.eptps.iter_mut().flatten().find(|slot| slot.eptp == eptp) {
            slot.retired = false;
            return;
        }
        match s.eptps.iter_mut().find(|slot| slot.is_none()) {
            Some(free) => *free = Some(Slot { eptp, retired: false }),
            None => s.overflowed = true,
        }
    }

    /// Marks an EPTP no vCPU will load again (its root was put): it is flushed by the next flush, then
    /// forgotten.
    pub fn retire_eptp(&self, eptp: Eptp) {
        let mut s = self.state.lock();
        if let Some(slot) = s.eptps.iter_mut().flatten().find(|slot| slot.eptp == eptp) {
            slot.retired = true;
        }
    }

    /// The counters.
    pub fn stats(&self) -> FlushStats {
        self.state.lock().stats
    }

    /// The first INVEPT failure since the last call, if any.
    pub fn take_error(&self) -> Option<VmxError> {
        self.state.lock().error.take()
    }

    fn flush(&self) {
        let mut s = self.state.lock();
        s.stats.requests += 1;
        let registered = s.eptps.iter().flatten().count();
        if registered == 0 && !s.overflowed {
            s.stats.skipped += 1;
            return;
        }
        // All-context alone when it is needed anyway (an overflow, or no single-context type).
        let mut need_all = s.overflowed || !self.support.single_context;
        let mut delivered = false;
        if self.support.single_context && !(need_all && self.support.all_context) {
            for i in 0..MAX_EPTPS {
                let Some(slot) = s.eptps[i] else { continue };
                match self.vmx.invept(InveptKind::SingleContext, &InveptDescriptor::new(slot.eptp)) {
                    Ok(()) => s.stats.single_context += 1,
                    Err(e) => {
                        record(&mut s, e);
                        need_all = true;
                    }
                }
            }
            delivered = !need_all;
        }
        if need_all {
            if self.support.all_context {
                match self.vmx.invept(InveptKind::AllContext, &InveptDescriptor::default()) {
                    Ok(()) => {
                        s.stats.all_context += 1;
                        delivered = true;
                        // Every context is clean: overflowed EPTPs are covered.
                        s.overflowed = false;
                    }
                    Err(e) => record(&mut s, e),
                }
            } else {
                // Single-context only, and an overflow or a failure: some context stays cached.
                s.stats.uncovered += 1;
            }
        }
        s.stats.delivered += u64::from(delivered);
        for slot in &mut s.eptps {
            if slot.is_some_and(|slot| slot.retired) {
                *slot = None;
            }
        }
    }
}

fn record(s: &mut State, e: VmxError) {
    s.stats.errors += 1;
    if s.error.is_none() {
        s.error = Some(e);
    }
}

impl<V: VmxInstructions> TlbFlush for InveptFlush<V> {
    fn flush_all(&self) {
        self.flush();
    }

    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        // INVEPT has no address form: flush the contexts whole.
        let _ = (as_id, start, pages);
        self.flush();
    }
}
