//! `tdp-vmx`: the bare-metal Intel VMX backend for `tdp-core`.
//!
//! A Rust hypervisor that runs guests under VMX with EPT embeds `tdp-core`'s MMU for its EPT tables and
//! this crate for everything that touches the CPU: the capability MSRs, the EPT pointer, INVEPT and
//! INVVPID, decoding EPT exits into the MMU's fault input, Intel PML drained into a dirty ring, and the
//! host traits the MMU needs (table pages, host translation, TLB flushes) for an identity-mapped
//! hypervisor. It is `no_std` (with `alloc`, like `tdp-core`).
//!
//! # Wiring it in
//! Every step goes through the instruction trait [`instr::VmxInstructions`]. On bare metal that is
//! [`raw::X86Vmx`] (after VMXON and VMPTRLD, which the hypervisor does with its unsafe methods); here,
//! so that the example runs, it is [`fake::FakeVmx`] with MSR values recorded under Bochs.
//!
//! ```
//! use tdp_core::addr::{AsId, Gfn, Level, SlotId};
//! use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
//! use tdp_core::memslot::{Memslot, SlotFlags};
//! use tdp_core::mmu::{Mmu, VcpuMmu};
//! use tdp_vmx::caps::VmxCapabilities;
//! use tdp_vmx::fake::{bochs, FakeVmx};
//! use tdp_vmx::instr::VmxInstructions;
//! use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, PhysRange, TableFrames};
//! use tdp_vmx::pml::{Pml, PmlPage};
//! use tdp_vmx::raw::{IdentityRegion, TablePage};
//! use tdp_vmx::ring_sink::RingSink;
//! use tdp_vmx::vcpu::{handle_exit, install_root, ExitAction};
//! use tdp_vmx::vmcs::{PrimaryControls, SecondaryControls, VmcsField};
//!
//! // 1. Probe: capability MSRs -> EPT features (errors say what is missing, e.g. no EPT).
//! let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X); // bare metal: unsafe { X86Vmx::new() }
//! let caps = VmxCapabilities::read(&vmx);
//! let ept = caps.ept_features()?;
//! let secondary = SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST;
//! vmx.vmwrite(VmcsField::SECONDARY_VM_EXEC_CONTROL, caps.secondary.adjust(secondary.bits())?.into())?;
//! let primary = PrimaryControls::ACTIVATE_SECONDARY_CONTROLS | PrimaryControls::HLT_EXITING;
//! vmx.vmwrite(VmcsField::CPU_BASED_VM_EXEC_CONTROL, caps.primary.adjust(primary.bits())?.into())?;
//!
//! // 2. The MMU over this crate's host: table pages from a region, guest RAM, INVEPT flushes.
//! let mut table_pages: Vec<TablePage> = (0..64).map(|_| TablePage::new()).collect();
//! let guest_ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }]; // 16 MiB at 16 MiB
//! let host = BareMetalHost {
//!     frames: TableFrames::new(IdentityRegion::from_pages(&mut table_pages))?,
//!     translate: IdentityTranslate::new(&guest_ram, ept.max_leaf_level),
//!     tlb: InveptFlush::new(&vmx, ept.invept),
//! };
//! let config = ept.mmu_config(ept.pml)?; // MmuConfig::EPT_PML on this CPU
//! let mmu: Mmu<_> = Mmu::new(host, config)?;
//! mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 4096, 0x100_0000, SlotFlags::LOG_DIRTY))?;
//!
//! // 3. A vCPU: its root's EPTP in the VMCS, PML on, a dirty ring as its sink.
//! let mut vcpu = VcpuMmu::new();
//! let root = mmu.load_root(&mut vcpu, AsId(0))?;
//! let eptp = install_root(&vmx, &mmu.host().tlb, &ept, &config, vcpu.root().ok_or("no root")?)?;
//! let log = PmlPage::new();
//! let mut pml = Pml::enable(&vmx, &ept, eptp, &log)?;
//! let cfg = RingConfig::new(4096, PML_ENTRIES)?; // the reserve covers a full PML log
//! let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
//! let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg)?)?;
//!
//! // 4. VMLAUNCH ... the guest writes gpa 0x3008 and exits (what Bochs reports: qualification 0x182).
//! vmx.set_exit_ept_violation(0x182, 0x3008, 0x7000_3008);
//! let report = handle_exit(&vmx, &mmu, &mut vcpu, Some(&mut pml), &mut sink)?;
//! assert_eq!(report.action, ExitAction::Resume); // mapped (4 KiB: the slot is dirty-logged)
//!
//! // ... VMRESUME; the guest's next writes set D bits and the CPU logs them; it exits for a HLT.
//! log.set_entry(511, 0x5000);
//! vmx.set_field(VmcsField::GUEST_PML_INDEX, 510);
//! vmx.set_field(VmcsField::EXIT_REASON, 12);
//! let report = handle_exit(&vmx, &mmu, &mut vcpu, Some(&mut pml), &mut sink)?;
//! assert!(matches!(report.action, ExitAction::Unhandled(r) if r.basic() == 12));
//! assert_eq!(report.pml.map(|d| d.marked), Some(1));
//! assert!(!sink.must_exit());
//!
//! // 5. The VMM harvests the ring (after draining every vCPU's log), then resets it.
//! let mut consumer = DirtyRingConsumer::new(&ring, cfg)?;
//! let mut dirty = Vec::new();
//! consumer.harvest(usize::MAX, |e| dirty.push(e.offset));
//! assert_eq!(dirty, [3, 5]); // the fault's page, then the PML-logged page
//! let (reset, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring)); // clean the D bits
//! flush.run(mmu.host()); // INVEPT, before the VMM reads the pages
//! assert_eq!((reset.reset, reset.invalid), (2, 0));
//! mmu.release_vcpu(&mut vcpu);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Map of the modules:
//! - [`instr`]: the instruction trait everything goes through; [`raw`] has the real x86_64
//!   implementation (inline assembly, plus VMXON/VMCLEAR/VMPTRLD/VMXOFF) and the identity-mapped region,
//!   and is the only module with `unsafe`; [`fake`] has a software one with MSR values recorded under
//!   Bochs.
//! - [`msr`], [`caps`]: capability MSRs decoded into a feature set that picks the EPT options.
//! - [`vmcs`]: field encodings, control bits, VM-instruction errors.
//! - [`eptp`]: the EPT pointer. [`inv`]: INVEPT / INVVPID.
//! - [`exit`]: exit reasons; EPT violations and misconfigurations as [`tdp_core::fault::Fault`]s.
//! - [`pml`]: enabling PML and draining the log; [`ring_sink`]: a dirty ring as the dirty sink
//!   (`tdp-metal`'s).
//! - [`host`]: `tdp-core`'s host traits for an identity-mapped hypervisor (the frame allocator and
//!   identity translation are `tdp-metal`'s, shared with `tdp-svm`; INVEPT flushes are this crate's).
//! - [`vcpu`]: the exit path (drain, decode, fault) and root installation.
//! - [`scenario`]: the test scenario shared by the Bochs hypervisors and the mock replay
//!   (`tdp-metal`'s).
#![no_std]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod caps;
pub mod eptp;
pub mod exit;
pub mod fake;
pub mod host;
pub mod instr;
pub mod inv;
pub mod msr;
pub mod pml;
pub mod raw;
/// The dirty-ring sink, `tdp-metal`'s (shared with `tdp-svm`), re-exported under its old path.
pub use tdp_metal::ring_sink;
/// The Bochs / mock test scenario, `tdp-metal`'s (shared with `tdp-svm`), re-exported under its old
/// path.
pub use tdp_metal::scenario;
pub mod vcpu;
pub mod vmcs;
