//! From GRUB to Rust: the multiboot2 header, the 32-bit entry that identity-maps the first GiB with 2 MiB
//! pages and enters long mode, and the GDT with a 64-bit TSS (VM entry needs a non-null host TR).
//!
//! GRUB enters `_start` in 32-bit protected mode with paging off, `eax` = the multiboot2 magic and `ebx`
//! = the boot information (multiboot2 specification, section "I386 machine state"). The boot code sets
//! CR4.PAE|OSFXSR|OSXMMEXCPT, EFER.LME|NXE and CR0.PG|NE|MP|PE with EM clear (the prebuilt `core` uses SSE),
//! loads the GDT, far-returns into 64-bit code, sets up the stack and calls [`crate::kmain`].

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

/// One 4 KiB page of 64-bit entries, aligned for use as a paging structure or a VMX region.
#[repr(C, align(4096))]
pub struct Page(pub UnsafeCell<[u64; 512]>);

// SAFETY: the kernel runs on one CPU with interrupts off; each page is written by one owner at a time
// (boot code, then the hypervisor) and read by hardware.
unsafe impl Sync for Page {}

impl Page {
    /// A zeroed page.
    pub const fn zeroed() -> Page {
        Page(UnsafeCell::new([0; 512]))
    }
    /// Its address (identity-mapped, so also its physical address).
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }
}

/// The boot page tables: PML4 -> PDPT -> one PD of 512 2 MiB pages (the first GiB, identity).
#[unsafe(no_mangle)]
static BOOT_PML4: Page = Page::zeroed();
#[unsafe(no_mangle)]
static BOOT_PDPT: Page = Page::zeroed();
#[unsafe(no_mangle)]
static BOOT_PD: Page = Page::zeroed();

/// Stack size of the kernel (and of the VM-exit handler, which runs on it).
const STACK_SIZE: usize = 256 * 1024;

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; STACK_SIZE]>);
// SAFETY: only the CPU uses it, as its stack.
unsafe impl Sync for Stack {}
#[unsafe(no_mangle)]
static BOOT_STACK: Stack = Stack(UnsafeCell::new([0; STACK_SIZE]));

/// GDT selectors.
pub const KERNEL_CS: u16 = 0x08;
/// Data segment selector (SS, DS, ES, FS, GS).
pub const KERNEL_DS: u16 = 0x10;
/// The TSS selector.
pub const KERNEL_TR: u16 = 0x18;

/// The GDT: null, 64-bit code, data, and a 16-byte TSS descriptor filled in by [`load_tss`].
#[repr(C, align(16))]
pub struct Gdt(UnsafeCell<[u64; 5]>);
// SAFETY: written by the boot code and once by `load_tss` before anything else reads it.
unsafe impl Sync for Gdt {}
#[unsafe(no_mangle)]
static BOOT_GDT: Gdt = Gdt(UnsafeCell::new([0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0, 0]));

/// The pseudo-descriptor for LGDT: 16-bit limit, then the base (8 bytes in 64-bit mode; the 32-bit
/// LGDT reads 4).
#[repr(C, packed)]
struct GdtPtr {
    limit: u16,
    base: u64,
}
#[unsafe(no_mangle)]
static BOOT_GDT_PTR: UnsafeCellSync<GdtPtr> =
    UnsafeCellSync(UnsafeCell::new(GdtPtr { limit: 5 * 8 - 1, base: 0 }));

/// A 64-bit TSS (Intel SDM Vol. 3A, figure "64-Bit TSS Format"); only its presence matters here.
#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
static TSS: UnsafeCellSync<Tss> = UnsafeCellSync(UnsafeCell::new(Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: 104,
}));

struct UnsafeCellSync<T>(UnsafeCell<T>);
// SAFETY: single CPU, interrupts off; the TSS is written before `ltr` and then only read by hardware.
unsafe impl<T> Sync for UnsafeCellSync<T> {}

global_asm!(
    // Multiboot2 header (specification section 3.1): magic, architecture 0 (i386 protected mode),
    // length, checksum, then the end tag.
    ".section .multiboot2, \"a\"",
    ".balign 8",
    "2:",
    ".long 0xe85250d6",
    ".long 0",
    ".long 3f - 2b",
    ".long -(0xe85250d6 + (3f - 2b))",
    ".short 0",
    ".short 0",
    ".long 8",
    "3:",
    ".section .text.boot, \"ax\"",
    ".code32",
    ".globl _start",
    "_start:",
    "cli",
    "mov esi, ebx",
    // PD: 512 entries of 2 MiB, present | writable | page size.
    "mov edi, offset {pd}",
    "mov eax, 0x83",
    "xor ecx, ecx",
    "4:",
    "mov dword ptr [edi + ecx * 8], eax",
    "mov dword ptr [edi + ecx * 8 + 4], 0",
    "add eax, 0x200000",
    "inc ecx",
    "cmp ecx, 512",
    "jne 4b",
    "mov eax, offset {pd}",
    "or eax, 3",
    "mov dword ptr [{pdpt}], eax",
    "mov eax, offset {pdpt}",
    "or eax, 3",
    "mov dword ptr [{pml4}], eax",
    "mov eax, offset {pml4}",
    "mov cr3, eax",
    // CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10).
    "mov eax, cr4",
    "or eax, 0x620",
    "mov cr4, eax",
    // EFER.LME (8) and NXE (11): a nested walk uses the host's paging controls (AMD APM Vol. 2,
    // section 15.25), where bit 63 of a non-executable nested leaf is NX only with NXE (reserved
    // otherwise). Every model the xtask runs has NX (CPUID 8000_0001h EDX bit 20).
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, 0x900",
    "wrmsr",
    // CR0: PG (31), NE (5), MP (1), PE (0); EM (2) clear.
    "mov eax, cr0",
    "and eax, 0xfffffffb",
    "or eax, 0x80000023",
    "mov cr0, eax",
    "mov eax, offset {gdt}",
    "mov dword ptr [{gdt_ptr} + 2], eax",
    "lgdt [{gdt_ptr}]",
    "push 0x08",
    "mov eax, offset boot_long_mode",
    "push eax",
    "retf",
    ".code64",
    "boot_long_mode:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov fs, ax",
    "mov gs, ax",
    "lea rsp, [{stack} + {stack_size}]",
    "xor ebp, ebp",
    "mov edi, esi",
    "call {main}",
    "6:",
    "hlt",
    "jmp 6b",
    pd = sym BOOT_PD,
    pdpt = sym BOOT_PDPT,
    pml4 = sym BOOT_PML4,
    gdt = sym BOOT_GDT,
    gdt_ptr = sym BOOT_GDT_PTR,
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    main = sym crate::kmain,
);

/// Writes the TSS descriptor into the GDT and loads TR with it.
pub fn load_tss() {
    let base = TSS.0.get() as u64;
    let limit = (size_of::<Tss>() - 1) as u64;
    // Available 64-bit TSS (type 9), present, limit and base split as the SDM's figure "Format of TSS and
    // LDT Descriptors in 64-bit Mode" shows.
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    // SAFETY: nothing else reads or writes the GDT's TSS slots (indices 3 and 4) before `ltr` below.
    unsafe {
        let gdt = &mut *BOOT_GDT.0.get();
        gdt[3] = low;
        gdt[4] = high;
        asm!("ltr {0:x}", in(reg) KERNEL_TR, options(nostack, preserves_flags));
    }
}

/// The GDT's base address, for the VMCS host state.
pub fn gdt_base() -> u64 {
    BOOT_GDT.0.get() as u64
}

/// The TSS's base address, for the VMCS host state.
pub fn tss_base() -> u64 {
    TSS.0.get() as u64
}
