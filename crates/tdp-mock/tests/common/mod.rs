//! Shared helpers of the integration tests: the MMU configurations every scenario runs on, a VM with
//! the test's own reference model of the memslots, and a deterministic LCG.
//!
//! Checks: I1-I3 via [`Vm::check`], which runs every checker of `tdp_mock::checker`.
#![allow(dead_code)] // Each test binary uses a different subset.

use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, Pfn, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, MmuConfig};
use tdp_core::spte::{Spte, SpteFormat};
use tdp_mock::{AccessResult, HostConfig, Machine, MockHost, Vcpu, VcpuError};

/// Every configuration the scenarios run on.
pub const CONFIGS: [(&str, MmuConfig); 4] = [
    ("ept", MmuConfig::EPT),
    ("ept-no-ad", MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT }),
    ("npt", MmuConfig::NPT),
    ("ept-5-level", MmuConfig { root_level: Level::L5, ..MmuConfig::EPT }),
];

/// A VM, its vCPUs and the test's reference memslots.
pub struct Vm {
    pub name: &'static str,
    pub m: Machine,
    pub vcpus: Vec<Vcpu>,
    pub slots: Vec<Memslot>,
}

impl Vm {
    pub fn new(name: &'static str, cfg: MmuConfig, host: HostConfig, vcpus: usize) -> Vm {
        let m = Machine::new(cfg, host).expect("a valid MMU configuration");
        let vcpus = (0..vcpus).map(|_| m.new_vcpu(AsId(0))).collect();
        Vm { name, m, vcpus, slots: Vec::new() }
    }

    pub fn mmu(&self) -> &Mmu<MockHost> {
        self.m.mmu()
    }

    pub fn host(&self) -> &MockHost {
        self.m.host()
    }

    /// Inserts a RAM slot (see `Machine::ram_slot`) and records it in the reference model.
    pub fn add_slot(&mut self, id: u16, base: u64, pages: u64, flags: SlotFlags) -> Memslot {
        let slot = self.m.ram_slot(AsId(0), SlotId(id), Gfn(base), pages, flags);
        self.mmu().write().insert_memslot(slot).expect("the slot is valid");
        self.slots.push(slot);
        slot
    }

    /// Deletes a slot, runs the flush it returns, and drops it from the reference model.
    pub fn delete_slot(&mut self, id: u16) {
        let flush = self.mmu().write().delete_memslot(AsId(0), SlotId(id)).expect("the slot exists");
        flush.run(self.host());
        self.slots.retain(|s| s.id != SlotId(id));
    }

    pub fn access(&mut self, vcpu: usize, gfn: u64, kind: AccessKind) -> Result<AccessResult, VcpuError> {
        let mmu = std::sync::Arc::clone(self.m.mmu());
        self.vcpus[vcpu].access(&mmu, Gpa(gfn << PAGE_SHIFT), kind)
    }

    /// An access that must retire; returns its frame.
    pub fn must_map(&mut self, vcpu: usize, gfn: u64, kind: AccessKind) -> Pfn {
        match self.access(vcpu, gfn, kind) {
            Ok(AccessResult::Done { pfn, .. }) => pfn,
            other => panic!("{}: {kind:?} of gfn {gfn:#x}: {other:?}", self.name),
        }
    }

    /// The leaf mapping `gfn` in vCPU `vcpu`'s root.
    pub fn leaf(&self, vcpu: usize, gfn: u64) -> Option<(Spte, Level)> {
        let root = self.vcpus[vcpu].root()?;
        self.mmu().lookup(root, Gfn(gfn))
    }

    /// The frame the reference model says backs `gfn`.
    pub fn expected_frame(&self, gfn: u64) -> Option<Pfn> {
        let slot = self.slots.iter().find(|s| s.contains(Gfn(gfn)))?;
        Some(Pfn(slot.host_addr(Gfn(gfn)) >> PAGE_SHIFT))
    }

    /// Runs every checker; panics listing the violations.
    pub fn check(&self, step: &str) {
        let vcpus: Vec<&Vcpu> = self.vcpus.iter().collect();
        if let Err(violations) = self.m.check_all(&vcpus, &self.slots) {
            let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
            panic!("{} after {step}:\n  {}", self.name, list.join("\n  "));
        }
    }

    /// Releases every vCPU, drops the MMU and reclaims: every table page must be back.
    pub fn teardown(mut self) {
        let mmu = std::sync::Arc::clone(self.m.mmu());
        for vcpu in &mut self.vcpus {
            vcpu.release(&mmu);
        }
        drop(mmu);
        let host = self.host().clone();
        let name = self.name;
        drop(self);
        host.reclaim();
        let stats = host.alloc_stats();
        assert_eq!((stats.live, stats.deferred, host.pending_frees()), (0, 0, 0), "{name}: {stats:?}");
    }
}

/// A 64-bit LCG (Knuth's MMIX constants): deterministic, dependency-free randomness.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
