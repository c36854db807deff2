//! `tdp-svm`: the bare-metal AMD SVM backend for `tdp-core`.
//!
//! A Rust hypervisor that runs guests under SVM with nested paging (NPT) embeds `tdp-core`'s MMU for its
//! nested tables and this crate for everything that touches the CPU: the SVM capabilities (CPUID,
//! VM_CR), enabling SVM (EFER.SVME, VM_HSAVE_PA), the VMCB, nCR3 from the MMU's root, ASIDs and
//! TLB_CONTROL as the MMU's TLB flush, decoding nested page faults into the MMU's fault input, and the
//! exit loop. AMD has no page-modification log: dirty logging is by write protection, into a `tdp-core`
//! dirty ring. It is `no_std` (with `alloc`, like `tdp-core`).
//!
//! # Wiring it in
//! Every step goes through the instruction trait [`instr::SvmInstructions`]. On bare metal that is
//! [`raw::X86Svm`]; here, so that the example runs, it is [`fake::FakeSvm`] with the CPUID values of
//! Bochs's `ryzen` model and exits the example queues.
//!
//! ```
//! use tdp_core::addr::{AsId, Gfn, Level, SlotId};
//! use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
//! use tdp_core::memslot::{Memslot, SlotFlags};
//! use tdp_core::mmu::{Mmu, VcpuMmu};
//! use tdp_svm::asid::{AsidAllocator, TlbControl};
//! use tdp_svm::caps::SvmCapabilities;
//! use tdp_svm::exit::{code, SvmExit};
//! use tdp_svm::fake::{bochs, FakeSvm};
//! use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, RingSink, SvmHost, TableFrames, TablePage};
//! use tdp_svm::instr::{GuestRegs, SvmInstructions};
//! use tdp_svm::raw::HsavePage;
//! use tdp_svm::vcpu::{install_root, run, ExitAction, RunContext, SvmVcpu};
//! use tdp_svm::vmcb::{InterceptMisc1, InterceptMisc2, Vmcb};
//!
//! static HSAVE: HsavePage = HsavePage::new();
//!
//! // 1. Probe (errors say what is missing, e.g. no nested paging), then enable SVM.
//! let svm = FakeSvm::new(bochs::RYZEN); // bare metal: unsafe { X86Svm::new() }
//! let npt = SvmCapabilities::read(&svm).npt_features()?;
//! # // This example's "physical" memory is the test process's heap, above Bochs's 40-bit limit.
//! # let npt = tdp_svm::caps::NptFeatures { phys_bits: 48, ..npt };
//! svm.set_hsave(&HSAVE);
//! svm.enable_svme();
//!
//! // 2. The MMU over this crate's host: table pages from a region, guest RAM, ASID flush requests.
//! let mut table_pages: Vec<TablePage> = (0..64).map(|_| TablePage::new()).collect();
//! let guest_ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }]; // 16 MiB at 16 MiB
//! let host = SvmHost::new(TableFrames::new(IdentityRegion::from_pages(&mut table_pages))?,
//!                         IdentityTranslate::new(&guest_ram, npt.max_leaf_level), &npt);
//! let mmu: Mmu<_> = Mmu::new(host, npt.mmu_config())?; // NPT, no PML
//! mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 4096, 0x100_0000, SlotFlags::LOG_DIRTY))?;
//!
//! // 3. A vCPU: an ASID, a VMCB with its intercepts and guest state, the root's nCR3, a dirty ring.
//! let mut mmu_vcpu = VcpuMmu::new();
//! mmu.load_root(&mut mmu_vcpu, AsId(0))?;
//! let mut svm_vcpu = SvmVcpu::new(AsidAllocator::new(npt.asids).alloc()?, &mmu.host().tlb);
//! let mut vmcb = Vmcb::new();
//! vmcb.control.intercept_misc1 = InterceptMisc1::HLT | InterceptMisc1::SHUTDOWN;
//! vmcb.control.intercept_misc2 = InterceptMisc2::VMRUN | InterceptMisc2::VMMCALL;
//! vmcb.save.efer = tdp_svm::msr::EFER_SVME; // ... and the rest of the guest's state
//! install_root(&mut vmcb, &mut svm_vcpu, &npt, mmu.config(), mmu_vcpu.root().ok_or("no root")?)?;
//! let cfg = RingConfig::new(1024, 64)?;
//! let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
//! let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg)?)?;
//!
//! // 4. Run: the guest writes gpa 0x3008 (a #NPF, as Bochs reports it), then halts.
//! svm.push_npf(0x1_0000_0006, 0x3008);
//! let mut regs = GuestRegs::default();
//! let mut npfs = 0;
//! let mut count = |_: &Vmcb, r: &tdp_svm::vcpu::ExitReport| npfs += u32::from(matches!(r.exit, SvmExit::Npf(_)));
//! let mut cx = RunContext { mmu_vcpu: &mut mmu_vcpu, svm_vcpu: &mut svm_vcpu, regs: &mut regs, features: &npt,
//!                           observe: &mut count };
//! let report = run(&svm, &mmu, &mmu.host().tlb, &mut vmcb, &mut cx, &mut sink, RingSink::must_exit, 100)?;
//! assert_eq!(report.action, ExitAction::Unhandled(code::HLT)); // the #NPF was mapped on the way
//! // The first VMRUN flushed the new root's ASID; the second needed no flush.
//! let tlb: Vec<u8> = svm.take_entries().iter().map(|e| e.tlb_control).collect();
//! assert_eq!(tlb, [TlbControl::FlushAsid.raw(), TlbControl::DoNothing.raw()]);
//!
//! // 5. Harvest the ring, reset it (write-protects the page again), honour the flush at the next VMRUN.
//! let mut consumer = DirtyRingConsumer::new(&ring, cfg)?;
//! let mut dirty = Vec::new();
//! consumer.harvest(usize::MAX, |e| dirty.push(e.offset));
//! assert_eq!(dirty, [3]);
//! let (reset, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring));
//! flush.run(mmu.host());
//! assert_eq!(reset.reset, 1);
//! svm.push_npf(0x1_0000_0007, 0x3010); // the next write hits the write-protected page
//! let report = run(&svm, &mmu, &mmu.host().tlb, &mut vmcb, &mut cx, &mut sink, RingSink::must_exit, 100)?;
//! assert_eq!(report.action, ExitAction::Unhandled(code::HLT));
//! assert_eq!(svm.take_entries()[0].tlb_control, TlbControl::FlushAsid.raw()); // the reset's flush
//! consumer.harvest(usize::MAX, |e| dirty.push(e.offset));
//! assert_eq!(dirty, [3, 3]); // logged again
//! assert_eq!(npfs, 2);
//! mmu.release_vcpu(&mut mmu_vcpu);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Map of the modules:
//! - [`instr`]: the instruction trait everything goes through; [`raw`] has the real x86_64
//!   implementation (inline assembly and the VMRUN trampoline) and the host save area, and is the only
//!   module with `unsafe`; [`fake`] has a software one with CPUID values recorded under Bochs.
//! - [`msr`], [`caps`]: EFER, VM_CR, VM_HSAVE_PA; CPUID decoded into the nested-paging features.
//! - [`vmcb`]: the VMCB's control and save areas as typed fields.
//! - [`ncr3`]: the nested root. [`asid`]: ASIDs and TLB_CONTROL. [`flush`]: the MMU's TLB flush.
//! - [`exit`]: exit codes; nested page faults as [`tdp_core::fault::Fault`]s.
//! - [`host`]: `tdp-core`'s host traits for an identity-mapped hypervisor.
//! - [`vcpu`]: the exit path, the exit loop and root installation.
#![no_std]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod asid;
pub mod caps;
pub mod exit;
pub mod fake;
pub mod flush;
pub mod host;
pub mod instr;
pub mod msr;
pub mod ncr3;
pub mod raw;
pub mod vcpu;
pub mod vmcb;
