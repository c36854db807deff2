//! The exit path end to end over the fake CPU and a fake physical region: MMIO (violation, then the
//! misconfiguration the MMU's MMIO SPTE causes), writes to read-only slots, PML-full exits, entry
//! failures, root reloads with EPTP retirement, and the errors.

use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::host::DirtySink;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, Mmu, MmuConfig, RootRef, VcpuMmu};

use super::*;
use crate::caps::{EptFeatures, VmxCapabilities};
use crate::fake::{FakeVmx, Op, bochs};
use crate::host::{BareMetalHost, IdentityTranslate, InveptFlush, PhysRange, TableFrames};
use crate::inv::InveptKind;
use crate::pml::PmlPage;
use crate::raw::{IdentityRegion, TablePage};

type TestMmu<'a> = Mmu<BareMetalHost<'a, 'a, &'a FakeVmx>>;

const RAM: [PhysRange; 1] = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];

fn mmu<'a>(vmx: &'a FakeVmx, pages: &'a mut [TablePage], config: MmuConfig) -> TestMmu<'a> {
    let ept = VmxCapabilities::read(vmx).ept_features().unwrap();
    let host = BareMetalHost {
        frames: TableFrames::new(IdentityRegion::from_pages(pages)).unwrap(),
        translate: IdentityTranslate::new(&RAM, Level::L2),
        tlb: InveptFlush::new(vmx, ept.invept),
    };
    let mmu = Mmu::new(host, config).unwrap();
    let mut w = mmu.write();
    // RAM at gfn 0 (2 MiB), a read-only ROM at gfn 0x1000; nothing at gfn 0x800 (MMIO).
    w.insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, 0x100_0000, SlotFlags::LOG_DIRTY))
        .unwrap();
    w.insert_memslot(Memslot::new(AsId(0), SlotId(1), Gfn(0x1000), 16, 0x180_0000, SlotFlags::READONLY))
        .unwrap();
    drop(w);
    mmu
}

#[derive(Default)]
struct Marks(Vec<u64>);

impl DirtySink for Marks {
    fn mark_dirty(&mut self, _: &Memslot, gfn: Gfn, _: tdp_core::host::DirtySource) {
        self.0.push(gfn.0);
    }
}

fn vmx() -> FakeVmx {
    let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
    vmx.set_field(VmcsField::CPU_BASED_VM_EXEC_CONTROL, 0x8400_61f2);
    vmx.set_field(VmcsField::SECONDARY_VM_EXEC_CONTROL, 0x82);
    vmx
}

/// What every test here runs on: the Skylake fake CPU of [`vmx`], the MMU of [`mmu`] over 32 table
/// pages, its EPT features and configuration, a page cache, and the dirty marks the exits make.
struct Rig<'a> {
    vmx: &'a FakeVmx,
    mmu: TestMmu<'a>,
    ept: EptFeatures,
    config: MmuConfig,
    vcpu: VcpuMmu,
    marks: Marks,
}

impl Rig<'_> {
    /// [`handle_exit`] for the exit the fake CPU holds now, with the rig's cache and marks.
    fn exit(&mut self, pml: Option<&mut Pml<'_>>) -> Result<ExitReport, HandleError> {
        handle_exit(self.vmx, &self.mmu, &mut self.vcpu, pml, &mut self.marks)
    }

    /// [`install_root`] with the rig's EPT features and configuration.
    fn install(&self) -> Result<Eptp, RootError> {
        install_root(self.vmx, &self.mmu.host().tlb, &self.ept, &self.config, self.root())
    }

    /// The vCPU's root.
    fn root(&self) -> &RootRef {
        self.vcpu.root().expect("with_loaded_root loaded a root")
    }
}

/// Runs `test` on a fresh [`Rig`] with the root of address space 0 loaded. The vCPU's root at the end
/// (a test may reload it) is put and the cache released, so every test also
/// ends with the teardown a hypervisor does.
fn with_loaded_root(config: MmuConfig, test: impl FnOnce(&mut Rig<'_>)) {
    let vmx = vmx();
    let mut pages: Vec<TablePage> = (0..32).map(|_| TablePage::new()).collect();
    let mut rig = Rig {
        vmx: &vmx,
        mmu: mmu(&vmx, &mut pages, config),
        ept: VmxCapabilities::read(&vmx).ept_features().unwrap(),
        config,
        vcpu: VcpuMmu::new(),
        marks: Marks::default(),
    };
    rig.mmu.load_root(&mut rig.vcpu, AsId(0)).unwrap();
    test(&mut rig);
    rig.mmu.release_vcpu(&mut rig.vcpu);
}

#[test]
fn i1_mmio_is_emulated_first_as_a_violation_then_as_a_misconfiguration() {
    with_loaded_root(MmuConfig::EPT, |rig| {
        rig.vmx.set_exit_ept_violation(0x181, 0x80_0010, 0);
        let r = rig.exit(None).unwrap();
        let mmio = ExitAction::Emulate {
            gpa: Gpa(0x80_0010),
            access: AccessKind::Read,
            reason: EmulateReason::Mmio,
        };
        assert_eq!((r.action, r.pml), (mmio, None));
        // The MMU installed an MMIO SPTE; the next access exits with a misconfiguration.
        rig.vmx.set_field(VmcsField::EXIT_REASON, 49);
        let r = rig.exit(None).unwrap();
        assert!(matches!(r.exit, VmExit::EptMisconfig(_)));
        assert_eq!(r.action, mmio);
        assert!(rig.mmu.stats().mmio_sptes_created >= 1);
        // A write to the ROM is emulated too, and marks nothing.
        rig.vmx.set_exit_ept_violation(0x182, 0x100_0008, 0);
        let r = rig.exit(None).unwrap();
        assert_eq!(
            r.action,
            ExitAction::Emulate {
                gpa: Gpa(0x100_0008),
                access: AccessKind::Write,
                reason: EmulateReason::ReadOnlySlot
            }
        );
        assert_eq!(rig.marks.0, Vec::<u64>::new());
    });
}

#[test]
fn i4_pml_full_exit_drains_512_and_resumes_and_other_exits_are_returned() {
    with_loaded_root(MmuConfig::EPT_PML, |rig| {
        let vmx = rig.vmx;
        let eptp = rig.install().unwrap();
        assert_eq!(vmx.field(VmcsField::EPT_POINTER), Some(eptp.raw()));
        let log = PmlPage::new();
        let mut pml = Pml::enable(vmx, &rig.ept, eptp, &log).unwrap();
        for i in 0..512 {
            log.set_entry(i, (511 - i as u64) << 12); // gfn 0 at entry 511 (oldest) ... gfn 511 at 0
        }
        vmx.set_field(VmcsField::GUEST_PML_INDEX, 0xffff);
        vmx.set_field(VmcsField::EXIT_REASON, 62);
        let r = rig.exit(Some(&mut pml)).unwrap();
        assert_eq!((r.exit, r.action), (VmExit::PmlFull, ExitAction::Resume));
        assert_eq!(r.pml.map(|d| (d.entries, d.was_full, d.marked)), Some((512, true, 512)));
        assert_eq!(rig.marks.0, (0..512).collect::<Vec<u64>>());
        vmx.set_field(VmcsField::EXIT_REASON, 0x8000_0021);
        vmx.set_field(VmcsField::EXIT_QUALIFICATION, 0);
        let r = rig.exit(Some(&mut pml)).unwrap();
        assert!(matches!(r.action, ExitAction::EntryFailed { reason, .. } if reason.basic() == 33));
        assert_eq!(r.pml.map(|d| d.entries), Some(0));
        vmx.set_field(VmcsField::EXIT_REASON, 10);
        let r = rig.exit(None).unwrap();
        assert_eq!(r.action, ExitAction::Unhandled(crate::exit::ExitReason(10)));
    });
}

#[test]
fn i3_an_invalidated_root_is_reloaded_and_its_eptp_flushed_once_more() {
    with_loaded_root(MmuConfig::EPT, |rig| {
        let old = rig.install().unwrap();
        rig.vmx.set_exit_ept_violation(0x182, 0x5000, 0x5000);
        assert_eq!(rig.exit(None).unwrap().action, ExitAction::Resume);
        let flush = rig.mmu.write().invalidate_roots(None);
        flush.run(rig.mmu.host());
        let single = |e: Eptp| Op::Invept { kind: InveptKind::SingleContext, eptp: e.raw() };
        assert_eq!(rig.vmx.take_ops(), [single(old)]);
        let r = rig.exit(None).unwrap();
        assert_eq!(r.action, ExitAction::ReloadRoot);
        // What the hypervisor does: put the old root, retire its EPTP, load and install a new one.
        rig.mmu.put_root(&mut rig.vcpu);
        rig.mmu.host().tlb.retire_eptp(old);
        rig.mmu.read().zap_invalidated_roots();
        rig.mmu.load_root(&mut rig.vcpu, AsId(0)).unwrap();
        let new = rig.install().unwrap();
        assert_ne!(new, old);
        assert_eq!(rig.exit(None).unwrap().action, ExitAction::Resume);
        use tdp_core::host::TlbFlush;
        rig.mmu.host().flush_all();
        rig.mmu.host().flush_all();
        assert_eq!(
            rig.vmx.take_ops(),
            [single(old), single(new), single(new)],
            "the retired EPTP once, then not"
        );
    });
}

#[test]
fn errors_name_the_step_and_change_nothing() {
    with_loaded_root(MmuConfig::EPT, |rig| {
        rig.vmx.set_exit_ept_violation(0x180, 0x5000, 0);
        let err = rig.exit(None).unwrap_err();
        assert!(matches!(err, HandleError::Exit(ExitError::Qualification { .. })));
        assert!(
            alloc::string::ToString::to_string(&err).starts_with("decoding the exit: EPT-violation exit")
        );
        // Sandy Bridge cannot run an A/D configuration: the EPTP is refused and the VMCS keeps its value.
        let sandy = VmxCapabilities::read(&FakeVmx::with_msrs(bochs::COREI7_SANDY_BRIDGE_2600K))
            .ept_features()
            .unwrap();
        let before = rig.vmx.field(VmcsField::EPT_POINTER);
        assert_eq!(
            install_root(rig.vmx, &rig.mmu.host().tlb, &sandy, &MmuConfig::EPT, rig.root()),
            Err(RootError::Eptp(EptpError::AccessedDirtyUnsupported))
        );
        assert_eq!(rig.vmx.field(VmcsField::EPT_POINTER), before);
    });
}
