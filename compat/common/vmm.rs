//! A tiny VMM on whatever `kvm-ioctls` version its crate pins, tracking dirty pages through `tdp-kvm`'s fd
//! API (`tdp-kvm` built without its `kvm-ioctls` feature, so the only `kvm-ioctls` in the build is the
//! pinned one). Shared, through `#[path]`, by `compat/kvm-ioctls-*/src/main.rs`.
//!
//! The guest is fifteen hand-assembled bytes run at CPL3 in 64-bit mode (on shadow-paging hosts such as
//! `kvm_pvm`, CPL0 code is emulated and floods the dirty ring): `count` times, store RAX at RDI and add
//! R8 to RDI; then `OUT 0x80` exits to the VMM. The VMM picks the pages of each round through the
//! registers, so it knows exactly which pages the guest wrote. The VMM's own run loop handles
//! `KVM_EXIT_DIRTY_RING_FULL` (`VcpuExit::Unsupported(31)` in these versions) with
//! `tdp_kvm::RingFullHandler`, and each round's collect must report exactly the pages written since the
//! previous one, each holding that round's value, while every other page holds what it held.
//!
//! Two VMs: a 256-entry dirty ring (rounds large enough to fill it, so ring-full exits happen), and
//! clear-log with `INITIALLY_SET` (the first collect reports every page). Prints `SKIPPED` and succeeds
//! when `/dev/kvm` cannot be opened.
//!
//! Keeps: I4, checked exactly on real KVM from a VMM outside the workspace.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::ExitCode;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_dtable, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use tdp_kvm::{DirtySets, DirtyTracker, RingFullHandler, SlotSpec, TrackingMode, fd};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const PAGE: u64 = 4096;
/// Slot 0 (not logged): GDT + TSS, page tables, code.
const LOW_PAGES: u64 = 16;
const GDT_GPA: u64 = 0x1000;
const TSS_GPA: u64 = 0x1800;
const PML4_GPA: u64 = 0x2000;
const PDPT_GPA: u64 = 0x3000;
const PD_GPA: u64 = 0x4000;
const CODE_GPA: u64 = 0x5000;
/// Slot 1 (logged): the data the guest writes, 2 MiB pages 1 and 2 of the identity map.
const DATA_SLOT: u32 = 1;
const DATA_GPA: u64 = 0x20_0000;
const DATA_PAGES: u64 = 1024;
const RING_ENTRIES: u32 = 256;
const EXIT_PORT: u16 = 0x80;

/// `loop: mov [rdi], rax; add rdi, r8; dec rcx; jnz loop; out 0x80, al; jmp $`.
const GUEST: [u8; 15] = [
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x4c, 0x01, 0xc7, // add rdi, r8
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf5, // jnz -11 (loop)
    0xe6, 0x80, // out 0x80, al
    0xeb, 0xfe, // jmp $
];

/// Page-table entry bits: present, writable, user, accessed, dirty, 2 MiB page.
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;

/// One round: write `count` pages from page `first`, every `stride` pages.
#[derive(Clone, Copy, Debug)]
struct Round {
    first: u64,
    count: u64,
    stride: u64,
}

/// The rounds: some fill the 256-entry ring (soft limit 192) several times over, some touch a few pages,
/// some revisit pages of earlier rounds.
const ROUNDS: [Round; 6] = [
    Round { first: 0, count: 700, stride: 1 },
    Round { first: 3, count: 5, stride: 97 },
    Round { first: 1, count: 500, stride: 2 },
    Round { first: 1023, count: 1, stride: 1 },
    Round { first: 0, count: 256, stride: 4 },
    Round { first: 10, count: 1000, stride: 1 },
];

/// Runs both modes; prints what it checked. The exit code is the verdict.
pub fn main(version: &str) -> ExitCode {
    match run_all(version) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compat kvm-ioctls {version}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_all(version: &str) -> Res<()> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("compat kvm-ioctls {version}: SKIPPED: cannot open /dev/kvm: {e}");
            return Ok(());
        }
    };
    for ring in [true, false] {
        let (mode, exits, pages) = run_mode(&kvm, ring)?;
        let handled =
            if ring { format!(", {exits} ring-full exits handled in the VMM's loop") } else { String::new() };
        println!(
            "compat kvm-ioctls {version}: {mode}: {} collects, {pages} dirty pages reported and checked exactly{handled}",
            ROUNDS.len() + 1
        );
    }
    Ok(())
}

/// Guest memory: an anonymous mapping, unmapped on drop (after the VM that maps it).
struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn new(pages: u64) -> Res<Self> {
        let len = usize::try_from(pages * PAGE)?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()).into());
        }
        Ok(Mem { ptr: ptr.cast(), len })
    }

    fn write_u64(&self, offset: u64, value: u64) -> Res<()> {
        let off = usize::try_from(offset)?;
        if off % 8 != 0 || off.checked_add(8).is_none_or(|end| end > self.len) {
            return Err(format!("guest memory offset {offset:#x} out of range").into());
        }
        // SAFETY: in bounds and aligned (checked); no vCPU runs while the VMM writes or reads (single
        // thread: the vCPU runs only inside `run_round`).
        unsafe { self.ptr.add(off).cast::<u64>().write_volatile(value) };
        Ok(())
    }

    fn read_u64(&self, offset: u64) -> Res<u64> {
        let off = usize::try_from(offset)?;
        if off % 8 != 0 || off.checked_add(8).is_none_or(|end| end > self.len) {
            return Err(format!("guest memory offset {offset:#x} out of range").into());
        }
        // SAFETY: as in `write_u64`.
        Ok(unsafe { self.ptr.add(off).cast::<u64>().read_volatile() })
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: exactly the range mapped in `new`; the VM that used it was dropped first (see `Guest`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The VM and its memory, declared so that the VM (and vCPU) drop before the memory.
struct Guest {
    vcpu: VcpuFd,
    _vm: VmFd,
    _low: Mem,
    data: Mem,
}

/// Borrows a `kvm-ioctls` object's fd for one call of the fd API.
fn borrow<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `VmFd` and `VcpuFd` own their fd and close it only on drop; the borrow is tied to `owner`.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..kvm_segment::default()
    }
}

/// Builds slot 0's contents: a GDT with DPL3 code/data and a busy 64-bit TSS, an identity map of the
/// first GiB in 2 MiB user pages (A and D preset), and the guest code.
fn build_low(low: &Mem) -> Res<()> {
    let desc = |ty: u64, long: bool| -> u64 {
        0xffff
            | ((ty | 1 << 4 | 3 << 5 | 1 << 7) << 40)
            | (0xf << 48)
            | ((u64::from(long) << 1 | u64::from(!long) << 2 | 1 << 3) << 52)
    };
    let tss_low =
        0x67 | ((TSS_GPA & 0xff_ffff) << 16) | ((0xb | 1 << 7) << 40) | ((TSS_GPA >> 24 & 0xff) << 56);
    for (i, d) in [0, desc(0xb, true), desc(0x3, false), tss_low, TSS_GPA >> 32].into_iter().enumerate() {
        low.write_u64(GDT_GPA + 8 * i as u64, d)?;
    }
    low.write_u64(PML4_GPA, PDPT_GPA | P | RW | US | A)?;
    low.write_u64(PDPT_GPA, PD_GPA | P | RW | US | A)?;
    for i in 0..512u64 {
        low.write_u64(PD_GPA + 8 * i, (i << 21) | P | RW | US | A | D | PS)?;
    }
    let mut code = [0u8; 16];
    code[..GUEST.len()].copy_from_slice(&GUEST);
    for (i, chunk) in code.chunks(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into()?);
        low.write_u64(CODE_GPA + 8 * i as u64, word)?;
    }
    Ok(())
}

fn new_guest(kvm: &Kvm, ring: bool) -> Res<(Guest, DirtyTracker)> {
    let vm = kvm.create_vm()?;
    let tracker = if ring {
        let (_, cfg) = fd::enable_dirty_ring(borrow(&vm), RING_ENTRIES)?;
        DirtyTracker::from_fd(borrow(&vm), TrackingMode::Ring(cfg))?
    } else {
        fd::enable_manual_protect(borrow(&vm), true)?;
        DirtyTracker::from_fd(borrow(&vm), TrackingMode::ClearLog)?
    };
    let low = Mem::new(LOW_PAGES)?;
    let data = Mem::new(DATA_PAGES)?;
    build_low(&low)?;
    for (slot, gpa, mem, flags) in
        [(0, 0, &low, 0), (DATA_SLOT, DATA_GPA, &data, tdp_kvm::abi::KVM_MEM_LOG_DIRTY_PAGES)]
    {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: mem.len as u64,
            userspace_addr: mem.ptr as u64,
        };
        // SAFETY: the region is our own mapping of `memory_size` bytes, which `Guest` keeps alive until
        // after the VM is dropped (field order); nothing else uses it while the vCPU runs.
        unsafe { vm.set_user_memory_region(region)? };
    }
    tracker.register_slot(SlotSpec::from_region(DATA_SLOT, DATA_GPA, DATA_PAGES * PAGE))?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = segment(1 << 3 | 3, 0xb, true);
    let data_seg = segment(2 << 3 | 3, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data_seg, data_seg, data_seg, data_seg, data_seg);
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: 0x67,
        selector: 3 << 3,
        type_: 0xb,
        present: 1,
        ..kvm_segment::default()
    };
    sregs.ldt = kvm_segment { type_: 2, unusable: 1, ..kvm_segment::default() };
    sregs.gdt = kvm_dtable { base: GDT_GPA, limit: 5 * 8 - 1, ..kvm_dtable::default() };
    sregs.idt = kvm_dtable::default();
    sregs.cr0 = 1 | 2 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31; // PE MP ET NE WP PG
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = 1 << 8 | 1 << 10; // LME LMA
    vcpu.set_sregs(&sregs)?;
    Ok((Guest { vcpu, _vm: vm, _low: low, data }, tracker))
}

/// Runs one round to its `OUT`, handling ring-full exits in this loop. Returns the ring-full exits seen.
fn run_round(g: &mut Guest, handler: &mut Option<RingFullHandler<'_>>, round: Round, value: u64) -> Res<u64> {
    let regs = kvm_regs {
        rip: CODE_GPA,
        rflags: 2 | 3 << 12, // IOPL 3: OUT at CPL3
        rax: value,
        rdi: DATA_GPA + round.first * PAGE,
        rcx: round.count,
        r8: round.stride * PAGE,
        ..kvm_regs::default()
    };
    g.vcpu.set_regs(&regs)?;
    let mut exits = 0;
    loop {
        if let Some(h) = handler.as_mut() {
            h.before_run()?;
        }
        let ring_full = match g.vcpu.run()? {
            VcpuExit::IoOut(EXIT_PORT, _) => return Ok(exits),
            VcpuExit::Unsupported(r) if tdp_kvm::is_ring_full_exit(r) => true,
            other => return Err(format!("unexpected exit {other:?}").into()),
        };
        if ring_full {
            let h = handler.as_mut().ok_or("a ring-full exit without a dirty ring")?;
            h.on_ring_full()?;
            exits += 1;
        }
    }
}

/// Checks a collect against the pages written since the previous one, and every page's contents.
fn verify(
    g: &Guest,
    sets: &DirtySets,
    expected: &BTreeSet<u64>,
    contents: &mut [u64],
    tag: &str,
) -> Res<u64> {
    let mut got = BTreeSet::new();
    for set in sets.iter() {
        if set.slot().raw() != DATA_SLOT {
            return Err(format!("{tag}: pages reported for slot {:?}", set.slot()).into());
        }
        got.extend(set.offsets());
    }
    if &got != expected {
        let lost: Vec<_> = expected.difference(&got).take(8).collect();
        let extra: Vec<_> = got.difference(expected).take(8).collect();
        return Err(format!(
            "{tag}: reported {} pages, {} written; lost {lost:?}, invented {extra:?}",
            got.len(),
            expected.len()
        )
        .into());
    }
    for (page, old) in contents.iter_mut().enumerate() {
        let now = g.data.read_u64(page as u64 * PAGE)?;
        if now != *old && !got.contains(&(page as u64)) {
            return Err(format!("{tag}: page {page} changed ({old} -> {now}) but was not reported").into());
        }
        *old = now;
    }
    Ok(got.len() as u64)
}

/// `verify` must catch a dropped page and an invented one on real data, or its passes mean nothing.
fn check_the_checker(g: &Guest, sets: &DirtySets, written: &BTreeSet<u64>, contents: &[u64]) -> Res<()> {
    let set = sets.iter().find(|s| !s.is_empty()).ok_or("nothing reported")?;
    let victim = set.offsets().next().ok_or("nothing reported")?;
    let mut fewer = DirtySets::default();
    let dst = fewer.add_slot(set.slot(), set.guest_base(), set.pages());
    set.offsets().filter(|&p| p != victim).for_each(|p| {
        dst.insert(p);
    });
    let clean = (0..DATA_PAGES).find(|p| !written.contains(p)).ok_or("every page written")?;
    let mut more = sets.clone();
    more.insert(set.slot(), clean);
    for (broken, what) in [(&fewer, "a dropped page"), (&more, "an invented page")] {
        if verify(g, broken, written, &mut contents.to_vec(), "check").is_ok() {
            return Err(format!("verify did not catch {what}").into());
        }
    }
    Ok(())
}

fn run_mode(kvm: &Kvm, ring: bool) -> Res<(&'static str, u64, u64)> {
    let (mut g, tracker) = new_guest(kvm, ring)?;
    let handle = tracker.attach_vcpu_fd(borrow(&g.vcpu))?;
    let mut handler = ring.then(|| RingFullHandler::new(&tracker, handle));
    let mut contents = vec![0u64; DATA_PAGES as usize];
    let mut total = 0;
    let mut exits = 0;
    // INITIALLY_SET: the first collect reports every page of the slot; with the ring, none.
    let first = tracker.collect()?;
    let all: BTreeSet<u64> = if ring { BTreeSet::new() } else { (0..DATA_PAGES).collect() };
    total += verify(&g, &first, &all, &mut contents, "initial collect")?;
    for (i, round) in ROUNDS.iter().enumerate() {
        let value = i as u64 + 1;
        exits += run_round(&mut g, &mut handler, *round, value)?;
        let written: BTreeSet<u64> = (0..round.count).map(|j| round.first + j * round.stride).collect();
        if written.iter().any(|&p| p >= DATA_PAGES) {
            return Err(format!("round {i} writes past the slot").into());
        }
        let sets = tracker.collect()?;
        if i == 0 {
            check_the_checker(&g, &sets, &written, &contents)?;
        }
        total += verify(&g, &sets, &written, &mut contents, &format!("round {i}"))?;
        for &p in &written {
            if contents[p as usize] != value {
                return Err(
                    format!("round {i}: page {p} holds {} instead of {value}", contents[p as usize]).into()
                );
            }
        }
    }
    if ring && exits == 0 {
        return Err("no ring-full exit happened: the rounds did not fill the ring".into());
    }
    let stats = tracker.stats()?;
    if stats.invalid_slot + stats.invalid_offset != 0 {
        return Err(format!("invalid ring entries: {stats:?}").into());
    }
    Ok((if ring { "dirty ring (256 entries)" } else { "clear-log, INITIALLY_SET" }, exits, total))
}
