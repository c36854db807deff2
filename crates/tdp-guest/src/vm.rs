//! `GuestVm`: a KVM VM with the two memslots, the page tables, GDT and program in place, created in steps
//! so the caller can enable VM capabilities (dirty ring, manual dirty-log protect) between the VM's
//! creation and its vCPUs'.

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::error::{GuestError, Result, ioctl};
use crate::layout::{
    CODE_PAGE, CODE_SLOT, DATA_GPA, DATA_SLOT, GDT_PAGE, GuestSpec, Layout, PAGE_SIZE, TSS_OFFSET, block_gva,
    control_offset,
};
use crate::memory::MmapRegion;
use crate::program::{self, CTL_DATA_END, CTL_DATA_PAGES, CTL_DATA_START, CTL_ITERATION, block};
use crate::vcpu::{self, GuestVcpu};
use crate::workload::{Pattern, Workload};
use crate::{gdt, paging};

/// A VM whose vCPUs run the crate's CPL3 program over a data memslot.
///
/// Build it in steps: [`GuestVm::new`] creates the VM and both memslots; the caller may then use
/// [`GuestVm::vm_fd`] to enable capabilities that must precede vCPU creation (`KVM_CAP_DIRTY_LOG_RING`)
/// or memslot logging (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET` applies when logging is
/// switched on, so create the spec without logging and call [`GuestVm::set_dirty_logging`] after the
/// capability); then [`GuestVm::create_vcpus`] returns the vCPUs, each movable to its own thread.
///
/// ```
/// use tdp_guest::{GuestExit, GuestSpec, GuestVm, Pattern, Workload};
/// let mut vm = match GuestVm::new(GuestSpec::new(64 + 3, 1)) {
///     Ok(vm) => vm,
///     Err(tdp_guest::GuestError::OpenKvm(e)) => {
///         eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
///         return Ok(());
///     }
///     Err(e) => return Err(e),
/// };
/// vm.set_workload(0, &Workload::new(0, 67, 16, Pattern::Sequential))?;
/// vm.set_iteration(5);
/// let mut vcpus = vm.create_vcpus()?;
/// assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { tag: 0 }));
/// // The first batch wrote iteration 5 into pages 0..16 (and the vCPU's tag after it).
/// assert_eq!(vm.page_iteration(15)?, 5);
/// assert_eq!(vm.page_iteration(16)?, 0);
/// assert_eq!(vm.vcpu_stats(0)?.writes, 16);
/// # Ok::<(), tdp_guest::GuestError>(())
/// ```
#[derive(Debug)]
pub struct GuestVm {
    // Field order is drop order: the VM fd closes before the memory it maps is unmapped.
    vm: VmFd,
    kvm: Kvm,
    spec: GuestSpec,
    pub(crate) layout: Layout,
    data_logging: bool,
    code_logging: bool,
    vcpus_created: bool,
    /// Serialises [`GuestVm::set_workload`] (the seqlock has one writer).
    workload_writer: std::sync::Mutex<()>,
    pub(crate) code: Arc<MmapRegion>,
    pub(crate) data: Arc<MmapRegion>,
}

impl GuestVm {
    /// Opens `/dev/kvm` and builds the VM for `spec` (see [`GuestVm::with_kvm`]).
    ///
    /// # Errors
    /// [`GuestError::OpenKvm`] when `/dev/kvm` cannot be opened, and the errors of [`GuestVm::with_kvm`].
    pub fn new(spec: GuestSpec) -> Result<Self> {
        Self::with_kvm(Kvm::new().map_err(GuestError::OpenKvm)?, spec)
    }

    /// Builds the VM on an open `Kvm`: creates it, maps and fills the code slot (page tables, GDT, TSS,
    /// program, control page with iteration 1 and every vCPU's default workload: an equal share of the
    /// data slot, random pattern, 64-page batches, or no writes at all if the slot has fewer pages than
    /// vCPUs and the share is empty), maps the data slot, and registers both memslots.
    ///
    /// # Errors
    /// [`GuestError::InvalidSpec`] for a bad spec; [`GuestError::Mmap`] when memory cannot be mapped;
    /// [`GuestError::Ioctl`] naming `KVM_CREATE_VM` or `KVM_SET_USER_MEMORY_REGION` and the slot.
    /// Nothing is left behind on error (the VM and mappings are dropped).
    pub fn with_kvm(kvm: Kvm, spec: GuestSpec) -> Result<Self> {
        let layout = Layout::new(&spec)?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let code = Arc::new(MmapRegion::new(bytes(layout.code_slot_bytes())?)?);
        let data = Arc::new(MmapRegion::new(bytes(layout.data_slot_bytes())?)?);
        let this = Self {
            vm,
            kvm,
            spec,
            layout,
            data_logging: spec.dirty_logging(),
            code_logging: false,
            vcpus_created: false,
            workload_writer: std::sync::Mutex::new(()),
            code,
            data,
        };
        this.fill_code_slot()?;
        this.register(CODE_SLOT, this.code_logging)?;
        this.register(DATA_SLOT, this.data_logging)?;
        for (field, value) in [
            (CTL_DATA_START, DATA_GPA),
            (CTL_DATA_END, DATA_GPA + layout.data_slot_bytes()),
            (CTL_DATA_PAGES, layout.data_pages),
        ] {
            let stored = this.code.store(control_offset(field), value);
            debug_assert!(stored, "the control page is inside the code slot");
        }
        this.set_iteration(1);
        for i in 0..spec.vcpus() {
            let w = Workload::share(spec.data_pages(), spec.vcpus() as u64, i as u64, 64, Pattern::Random)
                .with_seed(0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) << 32));
            // A slot with fewer pages than vCPUs leaves some shares empty: those vCPUs idle (batch 0).
            let w = if w.pages == 0 {
                Workload { first_page: 0, pages: spec.data_pages(), batch: 0, ..w }
            } else {
                Workload { batch: w.batch.min(w.pages), ..w }
            };
            this.set_workload(i, &w)?;
        }
        Ok(this)
    }

    /// The `/dev/kvm` handle (for capability checks).
    #[must_use]
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd, e.g. to enable `KVM_CAP_DIRTY_LOG_RING` before [`GuestVm::create_vcpus`], or to call
    /// `KVM_GET_DIRTY_LOG` on [`DATA_SLOT`].
    #[must_use]
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The spec the VM was built from.
    #[must_use]
    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// The computed guest-physical layout.
    #[must_use]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Memslot id of the data slot ([`DATA_SLOT`]).
    #[must_use]
    pub fn data_slot(&self) -> u32 {
        DATA_SLOT
    }

    /// Guest-physical address of data page 0 ([`DATA_GPA`]).
    #[must_use]
    pub fn data_gpa(&self) -> u64 {
        DATA_GPA
    }

    /// Pages in the data slot.
    #[must_use]
    pub fn data_pages(&self) -> u64 {
        self.layout.data_pages
    }

    /// Host address of data page 0 (the slot is one contiguous mapping of `data_pages() * 4096` bytes).
    #[must_use]
    pub fn data_host_addr(&self) -> u64 {
        self.data.host_addr()
    }

    /// The data slot as registered with KVM (slot id, flags, guest address, size, host address), e.g.
    /// for a dirty tracker that takes `kvm_userspace_memory_region` fields.
    ///
    /// ```
    /// use tdp_guest::{DATA_GPA, DATA_SLOT, GuestSpec, GuestVm};
    /// let vm = match GuestVm::new(GuestSpec::new(100, 1).with_dirty_logging(true)) {
    ///     Ok(vm) => vm,
    ///     Err(tdp_guest::GuestError::OpenKvm(e)) => {
    ///         eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
    ///         return Ok(());
    ///     }
    ///     Err(e) => return Err(e),
    /// };
    /// let r = vm.data_region();
    /// assert_eq!((r.slot, r.guest_phys_addr, r.memory_size), (DATA_SLOT, DATA_GPA, 100 * 4096));
    /// assert_eq!(r.flags, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
    /// # Ok::<(), tdp_guest::GuestError>(())
    /// ```
    #[must_use]
    pub fn data_region(&self) -> kvm_userspace_memory_region {
        self.region(DATA_SLOT, self.data_logging)
    }

    /// Whether the data slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    #[must_use]
    pub fn dirty_logging(&self) -> bool {
        self.data_logging
    }

    /// Pages in the code slot ([`CODE_SLOT`] at guest-physical 0): the fixed pages and the page tables.
    #[must_use]
    pub fn code_pages(&self) -> u64 {
        self.layout.code_slot_pages
    }

    /// The code slot as registered with KVM (slot id, flags, guest address, size, host address).
    #[must_use]
    pub fn code_region(&self) -> kvm_userspace_memory_region {
        self.region(CODE_SLOT, self.code_logging)
    }

    /// Re-registers the code slot with or without `KVM_MEM_LOG_DIRTY_PAGES`, as
    /// [`GuestVm::set_dirty_logging`] does for the data slot. The guest writes the code slot too (its
    /// vCPU blocks in the control page, the accessed and dirty bits of its page tables), so a tool that
    /// copies *all* guest memory, a live migration, logs both slots.
    ///
    /// ```
    /// use tdp_guest::{CODE_SLOT, GuestSpec, GuestVm};
    /// let mut vm = match GuestVm::new(GuestSpec::new(64, 1)) {
    ///     Ok(vm) => vm,
    ///     Err(tdp_guest::GuestError::OpenKvm(e)) => {
    ///         eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
    ///         return Ok(());
    ///     }
    ///     Err(e) => return Err(e),
    /// };
    /// vm.set_code_dirty_logging(true)?;
    /// let mut vcpus = vm.create_vcpus()?;
    /// vcpus[0].run()?;
    /// let bitmap = vm.vm_fd().get_dirty_log(CODE_SLOT, (vm.code_pages() * 4096) as usize);
    /// let dirty: u32 = bitmap.map(|b| b.iter().map(|w| w.count_ones()).sum()).unwrap_or(0);
    /// assert!(dirty > 0, "the first batch wrote the control page");
    /// # Ok::<(), tdp_guest::GuestError>(())
    /// ```
    ///
    /// # Errors
    /// [`GuestError::Ioctl`] naming `KVM_SET_USER_MEMORY_REGION`; the previous registration stays.
    pub fn set_code_dirty_logging(&mut self, on: bool) -> Result<()> {
        self.register(CODE_SLOT, on)?;
        self.code_logging = on;
        Ok(())
    }

    /// Re-registers the data slot with or without `KVM_MEM_LOG_DIRTY_PAGES` (same address and size: KVM
    /// allows changing only the flags of a live slot). Turning logging on write-protects the slot in KVM
    /// (and, with manual protect and `INITIALLY_SET`, starts with every page reported dirty); turning it
    /// off frees the slot's bitmap.
    ///
    /// # Errors
    /// [`GuestError::Ioctl`] naming `KVM_SET_USER_MEMORY_REGION`; the previous registration stays.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        self.register(DATA_SLOT, on)?;
        self.data_logging = on;
        Ok(())
    }

    /// Creates the spec's vCPUs (once): each gets the host's supported CPUID, long-mode segment and
    /// control registers with CPL3 code and data segments, and RIP at the program, RDI at the control
    /// page and RSI at its block.
    ///
    /// # Errors
    /// [`GuestError::VcpusAlreadyCreated`] on a second call; [`GuestError::Ioctl`] naming
    /// `KVM_CREATE_VCPU`, `KVM_GET_SUPPORTED_CPUID`, `KVM_SET_CPUID2`, `KVM_SET_SREGS` or `KVM_SET_REGS`.
    pub fn create_vcpus(&mut self) -> Result<Vec<GuestVcpu>> {
        if self.vcpus_created {
            return Err(GuestError::VcpusAlreadyCreated);
        }
        self.vcpus_created = true;
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        (0..self.spec.vcpus())
            .map(|i| {
                let fd = self.vm.create_vcpu(i as u64).map_err(ioctl("KVM_CREATE_VCPU"))?;
                fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
                vcpu::set_initial_state(&fd, i)?;
                Ok(GuestVcpu::new(fd, i, Arc::clone(&self.code), Arc::clone(&self.data)))
            })
            .collect()
    }

    /// Sets the iteration number the guest writes from its next batch on.
    pub fn set_iteration(&self, iteration: u64) {
        let stored = self.code.store(control_offset(CTL_ITERATION), iteration);
        debug_assert!(stored, "the control page is inside the code slot");
    }

    /// The iteration number in the control page.
    #[must_use]
    pub fn iteration(&self) -> u64 {
        self.code.load(control_offset(CTL_ITERATION)).unwrap_or(0)
    }

    /// Validates `w` and writes it into vCPU `vcpu`'s block; the guest picks it up at its next batch.
    /// The generator is reseeded and the sequential cursor restarts at the range's first page.
    ///
    /// Safe while the vCPU runs: the block is a seqlock, so a batch that starts while it is being
    /// rewritten sees either the old or the new workload, or notices the change and writes nothing
    /// ([`VcpuStats::skipped`](crate::VcpuStats::skipped)). A batch already running finishes with the old workload; the new seed and
    /// cursor then take effect at the next batch.
    ///
    /// # Errors
    /// [`GuestError::NoSuchVcpu`] or [`GuestError::InvalidWorkload`]; the block is unchanged then.
    pub fn set_workload(&self, vcpu: usize, w: &Workload) -> Result<()> {
        let base = self.block(vcpu)?;
        w.validate(vcpu, self.layout.data_pages)?;
        let (pattern, hot_pages, threshold) = match w.pattern {
            Pattern::Sequential => (block::PATTERN_SEQUENTIAL, 1, 0),
            Pattern::Random => (block::PATTERN_RANDOM, 1, 0),
            Pattern::Hot { hot_pages, percent } => {
                (block::PATTERN_HOT, hot_pages, Workload::hot_threshold(percent))
            }
        };
        let flags = if w.write_tag { block::FLAG_WRITE_TAG } else { 0 }
            | if w.fill_page { block::FLAG_FILL_PAGE } else { 0 };
        // Seqlock write side (see `program`): one writer at a time, GEN odd while the fields change.
        let _writer = self.workload_writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.code.load(base + block::GEN).unwrap_or(0);
        let mut stored = self.code.store(base + block::GEN, generation | 1);
        for (field, value) in [
            (block::PATTERN, pattern),
            (block::BASE, DATA_GPA + w.first_page * PAGE_SIZE),
            (block::PAGES, w.pages),
            (block::BATCH, w.batch),
            (block::HOT_PAGES, hot_pages),
            (block::HOT_THRESHOLD, threshold),
            (block::RNG, w.effective_seed()),
            (block::CURSOR, 0),
            (block::TAG, vcpu as u64),
            (block::FLAGS, flags),
        ] {
            stored &= self.code.store(base + field, value);
        }
        stored &= self.code.store(base + block::GEN, (generation | 1) + 1);
        debug_assert!(stored, "vCPU blocks are inside the control page");
        Ok(())
    }

    pub(crate) fn block(&self, vcpu: usize) -> Result<u64> {
        if vcpu >= self.spec.vcpus() {
            return Err(GuestError::NoSuchVcpu { index: vcpu, count: self.spec.vcpus() });
        }
        Ok(block_gva(vcpu))
    }

    /// Writes tables, GDT, TSS and program into the code slot.
    fn fill_code_slot(&self) -> Result<()> {
        let mut image = vec![0u64; (self.layout.code_slot_bytes() / 8) as usize];
        paging::build_page_tables(&self.layout, &mut image);
        let gdt_base = Layout::code_gpa(GDT_PAGE);
        for (i, d) in gdt::gdt(gdt_base + TSS_OFFSET).iter().enumerate() {
            image[(gdt_base / 8) as usize + i] = *d;
        }
        // The TSS itself stays zero: the guest never changes privilege level, so no stack is loaded from it.
        let code_gpa = Layout::code_gpa(CODE_PAGE);
        let mut code = program::assemble(code_gpa)?;
        if code.len() > PAGE_SIZE as usize {
            return Err(GuestError::CodeTooLarge { len: code.len(), max: PAGE_SIZE as usize });
        }
        code.resize(code.len().next_multiple_of(8), 0x90);
        for (i, chunk) in code.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            image[(code_gpa / 8) as usize + i] = u64::from_le_bytes(word);
        }
        for (i, word) in image.iter().enumerate() {
            if *word != 0 {
                let stored = self.code.store(i as u64 * 8, *word);
                debug_assert!(stored, "the image is the size of the code slot");
            }
        }
        Ok(())
    }

    fn region(&self, slot: u32, log_dirty: bool) -> kvm_userspace_memory_region {
        let (region, gpa) = match slot {
            CODE_SLOT => (&self.code, 0),
            _ => (&self.data, DATA_GPA),
        };
        kvm_userspace_memory_region {
            slot,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: gpa,
            memory_size: region.len() as u64,
            userspace_addr: region.host_addr(),
        }
    }

    fn register(&self, slot: u32, log_dirty: bool) -> Result<()> {
        let op = match slot {
            CODE_SLOT => "KVM_SET_USER_MEMORY_REGION (code slot 0)",
            _ => "KVM_SET_USER_MEMORY_REGION (data slot 1)",
        };
        let region_desc = self.region(slot, log_dirty);
        // SAFETY: the host range is a live mapping owned by an `Arc<MmapRegion>` that this VM and every
        // vCPU created from it hold until they are dropped (and `vm` is dropped first), so KVM never maps
        // memory the process has freed; the slots do not overlap (code below 4 GiB, data from 4 GiB).
        unsafe { self.vm.set_user_memory_region(region_desc) }.map_err(ioctl(op))
    }
}

fn bytes(n: u64) -> Result<usize> {
    usize::try_from(n)
        .map_err(|_| GuestError::InvalidSpec { what: "slot larger than the address space", value: n })
}
