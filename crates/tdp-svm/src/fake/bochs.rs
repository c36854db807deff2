//! CPUID and MSR values of Bochs 2.7's AMD CPU models (Debian's build), as its log prints them at
//! reset and as `examples/bochs-svm` read them inside Bochs (docs/recipes/bochs-svm.md), for
//! [`super::FakeSvm::new`].
//!
//! Only the leaves the backend reads are kept: 8000_0000h, 8000_0001h, 8000_0008h, 8000_000Ah.

/// One Bochs CPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BochsModel {
    /// The `cpu: model=` name.
    pub name: &'static str,
    /// `(leaf, [eax, ebx, ecx, edx])` for subleaf 0.
    pub cpuid: &'static [(u32, [u32; 4])],
    /// VM_CR as read inside Bochs. Bochs 2.7 does not implement VM_CR: RDMSR returns 0 (and logs
    /// "Unknown register"), so every recorded model has 0 here.
    pub vm_cr: u64,
}

/// EFER as the bare-metal kernel leaves it before enabling SVM (LME and LMA, long mode).
pub const KERNEL_EFER: u64 = 0x500;

/// `ryzen` (AMD Ryzen 7 1700): nested paging, NRIP save, flush-by-ASID, 32768 ASIDs, 1 GiB pages,
/// 40 physical address bits; no decode assists, no VMCB clean bits.
pub const RYZEN: BochsModel = BochsModel {
    name: "ryzen",
    cpuid: &[
        (0x8000_0000, [0x8000_001f, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0080_0f11, 0x2000_0000, 0x35c2_23ff, 0x2fd3_fbff]),
        (0x8000_0008, [0x0000_3028, 0x0000_0001, 0, 0]),
        (0x8000_000a, [0x0000_0001, 0x0000_8000, 0, 0x0000_044f]),
    ],
    vm_cr: 0,
};

/// `zambezi` (Bulldozer): as `ryzen` for SVM but 64 ASIDs.
pub const ZAMBEZI: BochsModel = BochsModel {
    name: "zambezi",
    cpuid: &[
        (0x8000_0000, [0x8000_001e, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0060_0f12, 0x1000_0000, 0x01c9_2fff, 0x2fd3_fbff]),
        (0x8000_0008, [0x0000_3028, 0, 0, 0]),
        (0x8000_000a, [0x0000_0001, 0x0000_0040, 0, 0x0000_044f]),
    ],
    vm_cr: 0,
};

/// `trinity_apu` (Piledriver): as `zambezi` for SVM.
pub const TRINITY_APU: BochsModel = BochsModel {
    name: "trinity_apu",
    cpuid: &[
        (0x8000_0000, [0x8000_001e, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0060_0f12, 0x2000_0000, 0x01eb_2fff, 0x2fd3_fbff]),
        (0x8000_0008, [0x0000_3028, 0, 0, 0]),
        (0x8000_000a, [0x0000_0001, 0x0000_0040, 0, 0x0000_044f]),
    ],
    vm_cr: 0,
};

/// `phenom_8650_toliman` (Phenom X3): nested paging without NRIP save or flush-by-ASID (EDX 7), 64
/// ASIDs: the model where a guest's flush must flush every ASID.
pub const PHENOM_8650_TOLIMAN: BochsModel = BochsModel {
    name: "phenom_8650_toliman",
    cpuid: &[
        (0x8000_0000, [0x8000_001a, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0010_0f23, 0x1000_0563, 0x0000_07ff, 0xefd3_fbff]),
        (0x8000_0008, [0x0000_3028, 0, 0, 0]),
        (0x8000_000a, [0x0000_0001, 0x0000_0040, 0, 0x0000_0007]),
    ],
    vm_cr: 0,
};

/// `turion64_tyler`: SVM without nested paging (8000_000Ah EDX 2: LBR virtualization only).
pub const TURION64_TYLER: BochsModel = BochsModel {
    name: "turion64_tyler",
    cpuid: &[
        (0x8000_0000, [0x8000_0018, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0006_0f82, 0x0000_059f, 0x0000_011f, 0xebd3_fbff]),
        (0x8000_0008, [0x0000_3028, 0, 0, 0]),
        (0x8000_000a, [0x0000_0001, 0x0000_0040, 0, 0x0000_0002]),
    ],
    vm_cr: 0,
};

/// `athlon64_venice`: no SVM at all.
pub const ATHLON64_VENICE: BochsModel = BochsModel {
    name: "athlon64_venice",
    cpuid: &[
        (0x8000_0000, [0x8000_0018, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
        (0x8000_0001, [0x0002_0ff2, 0x0000_0108, 0x0000_0001, 0xe3d3_fbff]),
        (0x8000_0008, [0x0000_3028, 0, 0, 0]),
    ],
    vm_cr: 0,
};

/// Every model above.
pub const ALL: &[BochsModel] =
    &[RYZEN, ZAMBEZI, TRINITY_APU, PHENOM_8650_TOLIMAN, TURION64_TYLER, ATHLON64_VENICE];
