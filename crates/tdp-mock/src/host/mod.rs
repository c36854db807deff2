//! [`MockHost`]: the software host behind an `Mmu<MockHost>`. It implements every `tdp-core` host trait:
//! table memory (a fixed arena with poisoning and RCU-like deferred free), host translation (guest RAM
//! mapped by the host with huge pages, optional read-only pages), TLB flushes (applied to the
//! registered vCPU TLBs, or dropped on purpose), a yield hint and an event counter.
//!
//! Checks: I2 (see the `arena` module: no page is read after it is freed, none is freed twice) and
//! provides the knobs the I1 and I3 checkers need (read-only host pages, dropped flushes, yield hooks).

mod arena;
mod external;
mod host_mmu;
mod traits;

pub use arena::{AllocStats, POISON, PageState, TABLE_BASE_PFN};
pub use external::{ExternalEntry, ExternalMisuse};
pub use host_mmu::{HostInvalidation, HostMmuError, HostMmuStats, InvalidationHook};

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tdp_core::addr::{Level, PAGE_SHIFT, PAGE_SIZE, Pfn};
use tdp_core::host::Table;
#[cfg(doc)]
use tdp_core::host::{MmuEvents, MmuYield, TableMemory, TlbFlush};

use crate::lock;
use crate::tlb::Tlb;
use arena::Arena;

/// The host frame of the first page of guest RAM: host address 1 GiB, so that guest RAM is 1 GiB-aligned
/// and the host can map it with 1 GiB pages.
pub const GUEST_RAM_BASE_PFN: u64 = 0x40000;

/// The largest host frame number (exclusive) the mock hands out: 48 physical address bits.
const MAX_HOST_PFN: u64 = 1 << (48 - PAGE_SHIFT);

/// Spin iterations of one jitter pause (see [`MockHost::set_walk_jitter`]).
const JITTER_SPIN: u32 = 256;

/// How a [`MockHost`] is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Table pages in the arena (default 4096).
    pub table_capacity: usize,
    /// 4 KiB pages of guest RAM from [`GUEST_RAM_BASE_PFN`] (default `1 << 22`, 16 GiB).
    pub guest_ram_pages: u64,
    /// The largest level at which the host maps guest RAM (default L3: 1 GiB pages, so every huge mapping
    /// is allowed; L1 forces 4 KiB mappings). Capped at L3.
    pub host_level: Level,
    /// `Some(n)`: [`MmuYield::should_yield`] answers true on every n-th call. `None` never yields.
    pub yield_every: Option<u64>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            table_capacity: 4096,
            guest_ram_pages: 1 << 22,
            host_level: Level::L3,
            yield_every: None,
        }
    }
}

/// TLB flush counters (see [`MockHost::flush_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Calls of [`TlbFlush::flush_all`].
    pub all: u64,
    /// Calls of [`TlbFlush::flush_range`].
    pub range: u64,
}

/// The mock host: a cheap-to-clone handle, so an `Mmu<MockHost>` can own one clone while tests keep
/// others to inspect and corrupt its state.
///
/// ```
/// use tdp_core::host::TableMemory;
/// use tdp_core::spte::Spte;
/// use tdp_mock::{HostConfig, MockHost, PageState, POISON};
///
/// let host = MockHost::new(HostConfig { table_capacity: 2, ..HostConfig::default() });
/// let a = host.alloc_table(Spte(0))?;
/// let guard = host.begin_walk();
/// host.free_table_deferred(a); // a walker is active: the page waits
/// assert_eq!(host.page_state(a), Some(PageState::Deferred));
/// drop(guard); // the last walker leaves: the page is poisoned and free
/// assert_eq!(host.page_state(a), Some(PageState::Free));
/// assert_eq!(host.arena_table(a).map(|t| t[0].load(std::sync::atomic::Ordering::Relaxed)), Some(POISON));
/// assert_eq!(host.alloc_stats().live, 0);
/// # Ok::<(), tdp_core::host::AllocError>(())
/// ```
#[derive(Clone)]
pub struct MockHost(Arc<Inner>);

struct Inner {
    config: HostConfig,
    arena: Arena,
    readonly: std::sync::Mutex<BTreeSet<u64>>,
    /// Frames the host reports as device memory (uncacheable) rather than RAM.
    device: std::sync::Mutex<BTreeSet<u64>>,
    data: std::sync::Mutex<host_mmu::DataMap>,
    /// How host pages map to frames, and the changes Linux makes to that under a VM.
    host_mmu: host_mmu::HostMmu,
    tlbs: std::sync::Mutex<Vec<Weak<Tlb>>>,
    drop_flushes: AtomicBool,
    flushes_all: AtomicU64,
    flushes_range: AtomicU64,
    yield_calls: AtomicU64,
    yields: AtomicU64,
    events: AtomicU64,
    /// The other trace events, by kind.
    trace: TraceCounters,
    /// 0: off; n: every n-th table read yields the thread (see `set_walk_jitter`).
    jitter_every: AtomicU64,
    jitter_calls: AtomicU64,
    tables_unlinked: AtomicU64,
    yield_hook: std::sync::Mutex<Option<YieldHook>>,
    /// Run after every translation, before the fault takes the MMU lock (see `set_translate_hook`).
    translate_hook: std::sync::Mutex<Option<TranslateHook>>,
    /// The external tables behind mirror roots, once enabled (see `external`).
    external: std::sync::Mutex<Option<external::ExternalCopy>>,
}

/// A callback run after a translation of `gfn` returned, while the fault holds no MMU lock: the moment
/// a host change can make that translation stale.
pub type TranslateHook = Arc<dyn Fn(tdp_core::addr::Gfn) + Send + Sync>;

/// A callback run by [`MmuYield::yield_now`], i.e. while a long walk has dropped the MMU lock.
pub type YieldHook = Arc<dyn Fn() + Send + Sync>;

/// A walk guard of the mock host: while any exists, deferred-freed pages stay allocated.
#[must_use = "the guard protects a walk only while it is alive"]
pub struct MockWalkGuard<'a> {
    host: &'a MockHost,
}

impl Drop for MockWalkGuard<'_> {
    fn drop(&mut self) {
        self.host.0.arena.end_walk();
    }
}

impl std::fmt::Debug for MockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHost")
            .field("config", &self.0.config)
            .field("alloc", &self.alloc_stats())
            .finish()
    }
}

impl MockHost {
    /// A host with an arena of `config.table_capacity` poisoned pages and `config.guest_ram_pages` of
    /// guest RAM.
    ///
    /// # Panics
    /// If the arena would reach guest RAM (more than `GUEST_RAM_BASE_PFN - TABLE_BASE_PFN` pages), or
    /// guest RAM would end above 48 physical address bits.
    pub fn new(config: HostConfig) -> MockHost {
        assert!(
            (config.table_capacity as u64) <= GUEST_RAM_BASE_PFN - TABLE_BASE_PFN,
            "table_capacity {} would overlap guest RAM",
            config.table_capacity
        );
        assert!(
            config.guest_ram_pages <= MAX_HOST_PFN - GUEST_RAM_BASE_PFN,
            "guest_ram_pages {:#x} ends above 48 physical address bits",
            config.guest_ram_pages
        );
        MockHost(Arc::new(Inner {
            config,
            arena: Arena::new(config.table_capacity),
            readonly: std::sync::Mutex::new(BTreeSet::new()),
            device: std::sync::Mutex::new(BTreeSet::new()),
            data: std::sync::Mutex::new(HashMap::new()),
            host_mmu: host_mmu::HostMmu::default(),
            tlbs: std::sync::Mutex::new(Vec::new()),
            drop_flushes: AtomicBool::new(false),
            flushes_all: AtomicU64::new(0),
            flushes_range: AtomicU64::new(0),
            yield_calls: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            events: AtomicU64::new(0),
            trace: TraceCounters::default(),
            jitter_every: AtomicU64::new(0),
            jitter_calls: AtomicU64::new(0),
            tables_unlinked: AtomicU64::new(0),
            yield_hook: std::sync::Mutex::new(None),
            translate_hook: std::sync::Mutex::new(None),
            external: std::sync::Mutex::new(None),
        }))
    }

    /// The configuration the host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.0.config
    }

    // ---- table memory ----

    /// The state of the arena page in `pfn`, or `None` when `pfn` is not an arena page.
    pub fn page_state(&self, pfn: Pfn) -> Option<PageState> {
        self.0.arena.state(pfn)
    }
    /// The arena page in `pfn` whatever its state (`None` outside the arena). Unlike
    /// [`TableMemory::table`] it never panics: checkers use it to report, tests to corrupt entries.
    pub fn arena_table(&self, pfn: Pfn) -> Option<&Table> {
        self.0.arena.page(pfn)
    }
    /// Pages in the arena.
    pub fn table_capacity(&self) -> usize {
        self.0.arena.capacity()
    }
    /// Allows `budget` more successful allocations, after which every one fails (`None`: no limit).
    pub fn set_alloc_budget(&self, budget: Option<u64>) {
        self.0.arena.set_budget(budget);
    }
    /// Allocation counters.
    pub fn alloc_stats(&self) -> AllocStats {
        self.0.arena.stats()
    }
    /// Frees every deferred page now if no walk guard is alive (otherwise leaves them pending).
    pub fn reclaim(&self) {
        self.0.arena.reclaim();
    }
    /// Pages freed with deferral that are not yet reclaimed.
    pub fn pending_frees(&self) -> usize {
        self.0.arena.pending()
    }
    /// Chaos for concurrency tests: with `Some(n)`, every n-th table access (the core's
    /// [`TableMemory::table`] and each entry the hardware walker reads) yields the thread, widening
    /// race windows so that a missing deferral or flush shows up on a machine with few cores.
    pub fn set_walk_jitter(&self, every: Option<u64>) {
        self.0.jitter_every.store(every.unwrap_or(0), Ordering::Relaxed);
    }
    pub(crate) fn jitter(&self) {
        let every = self.0.jitter_every.load(Ordering::Relaxed);
        if every > 0 && (self.0.jitter_calls.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every) {
            // A yield alone returns at once when another core is idle; the spin keeps the window open.
            std::thread::yield_now();
            for _ in 0..JITTER_SPIN {
                std::hint::spin_loop();
            }
        }
    }
    /// Table pages that became reusable before any TLB flush since they were unlinked from a live tree:
    /// hardware could still walk such a page through a cached paging-structure entry while it is reused.
    /// Checked by [`check_tables`](crate::checker::check_tables) (I2); must stay 0.
    pub fn tables_freed_before_flush(&self) -> u64 {
        self.0.arena.freed_before_flush()
    }
    /// Walk guards alive now.
    pub fn active_walkers(&self) -> usize {
        self.0.arena.readers()
    }

    // ---- guest RAM ----

    /// The host address of the first guest-RAM page: use it (plus an offset) as a memslot's `host_base`.
    pub fn guest_ram_base(&self) -> u64 {
        GUEST_RAM_BASE_PFN << PAGE_SHIFT
    }
    /// Whether host frame `pfn` is guest RAM.
    pub fn is_guest_ram(&self, pfn: Pfn) -> bool {
        pfn.0 >= GUEST_RAM_BASE_PFN && pfn.0 - GUEST_RAM_BASE_PFN < self.0.config.guest_ram_pages
    }
    /// Makes the host mapping of `pfn` read-only (`true`) or writable again. A read-only page is mapped
    /// by the host at 4 KiB, and no huge host mapping covers it.
    pub fn set_host_readonly(&self, pfn: Pfn, readonly: bool) {
        set_member(&self.0.readonly, pfn, readonly);
    }
    /// Makes the host report frame `pfn` as device memory (`true`: a leaf mapping it is uncacheable) or
    /// RAM again.
    pub fn set_device_memory(&self, pfn: Pfn, device: bool) {
        set_member(&self.0.device, pfn, device);
    }
    /// What kind of memory frame `pfn` is.
    pub fn memory_kind(&self, pfn: Pfn) -> tdp_core::host::HostMemory {
        if lock(&self.0.device).contains(&pfn.0) {
            tdp_core::host::HostMemory::Device
        } else {
            tdp_core::host::HostMemory::Ram
        }
    }
    /// Whether the host maps `pfn` read-only.
    pub fn is_host_readonly(&self, pfn: Pfn) -> bool {
        lock(&self.0.readonly).contains(&pfn.0)
    }
    /// Whether any of `pages` frames from `start` is host read-only.
    pub fn any_host_readonly(&self, start: Pfn, pages: u64) -> bool {
        lock(&self.0.readonly).range(start.0..start.0.saturating_add(pages)).next().is_some()
    }
    /// The level at which the host maps guest frame `pfn` (`None` outside guest RAM): the configured
    /// level, lowered until the host page lies inside guest RAM and holds no read-only page.
    pub fn host_level(&self, pfn: Pfn) -> Option<Level> {
        if !self.is_guest_ram(pfn) {
            return None;
        }
        let readonly = lock(&self.0.readonly);
        if readonly.contains(&pfn.0) || self.0.host_mmu.any_changed(pfn.0, 1) {
            return Some(Level::L1);
        }
        let end_of_ram = GUEST_RAM_BASE_PFN + self.0.config.guest_ram_pages;
        let mut level = self.0.config.host_level.min(Level::L3);
        while let Some(lower) = level.lower() {
            let start = pfn.0 & !(level.pages() - 1);
            let end = start + level.pages();
            if start >= GUEST_RAM_BASE_PFN
                && end <= end_of_ram
                && readonly.range(start..end).next().is_none()
                && !self.0.host_mmu.any_changed(start, level.pages())
            {
                break;
            }
            level = lower;
        }
        Some(level)
    }

    /// Reads the little-endian `u64` at byte `offset` of host page `pfn` (zero if never written).
    ///
    /// # Panics
    /// If `offset + 8` exceeds the page.
    pub fn read_u64(&self, pfn: Pfn, offset: u64) -> u64 {
        let at = Self::data_offset(offset);
        let data = lock(&self.0.data);
        data.get(&pfn)
            .map_or(0, |page| u64::from_le_bytes(page[at..at + 8].try_into().expect("an 8-byte slice")))
    }
    /// Writes the little-endian `u64` `value` at byte `offset` of host page `pfn`.
    ///
    /// # Panics
    /// If `offset + 8` exceeds the page.
    pub fn write_u64(&self, pfn: Pfn, offset: u64, value: u64) {
        let at = Self::data_offset(offset);
        let mut data = lock(&self.0.data);
        let page = data.entry(pfn).or_insert_with(|| Box::new([0; PAGE_SIZE as usize]));
        page[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    fn data_offset(offset: u64) -> usize {
        assert!(offset <= PAGE_SIZE - 8, "offset {offset:#x} leaves no room for a u64 in a 4 KiB page");
        offset as usize
    }

    // ---- the host's own MMU ----

    /// Registers the VM's MMU notifier, which every host-MMU change calls before and after it changes a
    /// page (see [`HostInvalidation`]). [`crate::Machine`] registers one for its MMU.
    pub fn set_invalidation_hook(&self, hook: Option<InvalidationHook>) {
        self.0.host_mmu.set_hook(hook);
    }
    /// Runs `hook` after every translation, between the host's answer and the fault's install: a test
    /// changes the host mapping there to race a fault deterministically.
    pub fn set_translate_hook(&self, hook: Option<TranslateHook>) {
        *lock(&self.0.translate_hook) = hook;
    }
    pub(crate) fn after_translate(&self, gfn: tdp_core::addr::Gfn) {
        let hook = lock(&self.0.translate_hook).clone();
        if let Some(hook) = hook {
            hook(gfn);
        }
    }
    /// Gives the host `count` frames from `start` (guest RAM that no memslot uses) to move pages to.
    pub fn add_spare_frames(&self, start: Pfn, count: u64) {
        self.0.host_mmu.add_spare((0..count).map(|i| start.add(i)));
    }
    /// Swaps out the host page at `hva` (a memslot's host address): the VM's translations of it are
    /// invalidated, its bytes saved and its frame freed. The next translation swaps it back in, into
    /// another frame.
    ///
    /// # Errors
    /// [`HostMmuError`]; nothing changed.
    pub fn swap_out(&self, hva: u64) -> Result<(), HostMmuError> {
        self.0.host_mmu.swap_out(hva >> PAGE_SHIFT, self.huge_pages(), &self.0.data)
    }
    /// Moves the host page at `hva` to a spare frame (page migration, compaction); returns the frame.
    ///
    /// # Errors
    /// [`HostMmuError`]; nothing changed.
    pub fn migrate_page(&self, hva: u64) -> Result<Pfn, HostMmuError> {
        self.0.host_mmu.migrate(hva >> PAGE_SHIFT, self.huge_pages(), &self.0.data)
    }
    /// KSM: merges the identical host pages at `a` and `b` into one read-only frame; a write through
    /// either breaks the sharing again (copy-on-write, inside the VM's next translation for a write).
    ///
    /// # Errors
    /// [`HostMmuError`], e.g. when the pages differ; nothing changed.
    pub fn ksm_merge(&self, a: u64, b: u64) -> Result<(), HostMmuError> {
        self.0.host_mmu.merge((a >> PAGE_SHIFT, b >> PAGE_SHIFT), self.huge_pages(), &self.0.data)
    }
    /// Pages in the largest host mapping: a change to one page invalidates all of them (the split).
    pub(crate) fn huge_pages(&self) -> u64 {
        self.0.config.host_level.min(Level::L3).pages()
    }
    /// The frame the host page at `hva` lives in now (`None` while swapped out).
    pub fn host_frame(&self, hva: u64) -> Option<Pfn> {
        self.0.host_mmu.frame_of(hva >> PAGE_SHIFT)
    }
    /// Whether the host page at `hva` is merged by KSM (shared, read-only until a write copies it).
    pub fn is_ksm_shared(&self, hva: u64) -> bool {
        self.0.host_mmu.is_shared(hva >> PAGE_SHIFT)
    }
    /// What the host MMU did so far.
    pub fn host_mmu_stats(&self) -> HostMmuStats {
        self.0.host_mmu.stats()
    }
    /// Reads the `u64` at byte `offset` of the host page at `hva`, wherever it lives now, without
    /// swapping it in (a swapped-out page reads as what was saved).
    pub fn read_hva_u64(&self, hva: u64, offset: u64) -> u64 {
        match self.host_frame(hva) {
            Some(pfn) => self.read_u64(pfn, offset),
            None => self.0.host_mmu.read_swapped_u64(hva >> PAGE_SHIFT, Self::data_offset(offset)),
        }
    }

    // ---- TLBs and flushes ----

    /// Registers a vCPU TLB: every flush the MMU asks for is applied to it while it is alive. The host
    /// keeps only a weak reference, so a dropped vCPU's TLB goes away.
    pub fn register_tlb(&self, tlb: Arc<Tlb>) {
        let mut tlbs = lock(&self.0.tlbs);
        tlbs.retain(|t| t.strong_count() > 0);
        tlbs.push(Arc::downgrade(&tlb));
    }
    /// The registered TLBs still alive.
    pub fn tlbs(&self) -> Vec<Arc<Tlb>> {
        lock(&self.0.tlbs).iter().filter_map(Weak::upgrade).collect()
    }
    /// The broken variant for checker tests: when `true`, flushes are counted but not applied.
    pub fn set_drop_flushes(&self, drop: bool) {
        self.0.drop_flushes.store(drop, Ordering::Relaxed);
    }
    /// Flush counters.
    pub fn flush_stats(&self) -> FlushStats {
        FlushStats {
            all: self.0.flushes_all.load(Ordering::Relaxed),
            range: self.0.flushes_range.load(Ordering::Relaxed),
        }
    }

    // ---- yield and events ----

    /// Runs `hook` in every [`MmuYield::yield_now`], where a long walk has dropped the MMU lock: a test
    /// can act there as another thread would (take the lock, zap, check). `None` removes it. A hook that
    /// holds the MMU should hold it weakly, or be removed before the MMU is dropped.
    pub fn set_yield_hook(&self, hook: Option<YieldHook>) {
        *lock(&self.0.yield_hook) = hook;
    }
    /// How many times a walk yielded ([`MmuYield::yield_now`] calls).
    pub fn yields(&self) -> u64 {
        self.0.yields.load(Ordering::Relaxed)
    }
    /// How many SPTE changes the MMU reported ([`MmuEvents::spte_changed`] calls).
    pub fn events(&self) -> u64 {
        self.0.events.load(Ordering::Relaxed)
    }
    /// How many of each other trace event the MMU reported ([`MmuEvents`]).
    pub fn trace_counts(&self) -> TraceCounts {
        let t = &self.0.trace;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TraceCounts {
            faults: get(&t.faults),
            mmio_sptes: get(&t.mmio_sptes),
            huge_splits: get(&t.huge_splits),
            nx_recovered: get(&t.nx_recovered),
        }
    }
    /// How many table pages the MMU reported removed from a tree ([`MmuEvents::table_linked`] with
    /// `linked == false`).
    pub fn tables_unlinked(&self) -> u64 {
        self.0.tables_unlinked.load(Ordering::Relaxed)
    }

    fn flushes_applied(&self) -> bool {
        !self.0.drop_flushes.load(Ordering::Relaxed)
    }
}

/// Puts `pfn` into the frame set `set` (`member`) or takes it out.
fn set_member(set: &std::sync::Mutex<BTreeSet<u64>>, pfn: Pfn, member: bool) {
    let mut set = lock(set);
    if member {
        set.insert(pfn.0);
    } else {
        set.remove(&pfn.0);
    }
}

/// The trace events counted by kind (atomics: vCPU threads report concurrently).
#[derive(Debug, Default)]
pub(crate) struct TraceCounters {
    pub(crate) faults: AtomicU64,
    pub(crate) mmio_sptes: AtomicU64,
    pub(crate) huge_splits: AtomicU64,
    pub(crate) nx_recovered: AtomicU64,
}

/// How many of each trace event [`MockHost`] received, from [`MockHost::trace_counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCounts {
    /// Faults handled ([`MmuEvents::fault_handled`]).
    pub faults: u64,
    /// MMIO SPTEs installed ([`MmuEvents::mmio_spte_installed`]).
    pub mmio_sptes: u64,
    /// Huge leaves split ([`MmuEvents::huge_split`]).
    pub huge_splits: u64,
    /// Tables NX huge-page recovery unlinked ([`MmuEvents::nx_recovered`]).
    pub nx_recovered: u64,
}
