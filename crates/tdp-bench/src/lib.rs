//! `tdp-bench`: the benchmarks of `tdp-core` against peers and limits, measured in one run.
//!
//! The `tdp-bench` binary (run by `cargo xtask bench [--quick]`) prints a table `name | ours | peer |
//! unit | ratio` and writes the same rows to `target/bench/summary.json`. The Criterion bench
//! `benches/fault.rs` covers the 4 KiB fault against `x86_64`'s `map_to` for those who prefer Criterion.
//! A run that includes the `harvest` group also draws `docs/img/harvest_vs_memory.svg`.
//! What each row measures, and why its peer or limit is a fair one, is in `docs/benchmarks.md`.
//!
//! Modules:
//! - [`host`]: a lean single-threaded backend for `tdp-core` (arena of table pages, identity-style
//!   translation, counting TLB flush).
//! - [`ours`]: an MMU with one memslot and a vCPU's root, driven through the public API.
//! - [`peer`]: `x86_64`'s `OffsetPageTable` over userspace memory, and the write / atomic sweeps.
//! - [`floor`]: the design floor of a 4 KiB fault (read lock, atomic walk, compare-exchanges), a limit.
//! - [`ring`]: dirty-ring push + harvest + reset throughput beside the `rtrb` SPSC queue.
//! - [`logging`]: the enable-logging pass over 1 and 16 GiB of 4 KiB leaves beside two sweeps.
//! - [`recover`]: huge pages recovered in place when logging stops, against zap + refault; eager
//!   splitting at enable and at the first clear, against allocating and filling a table.
//! - [`harvest`]: harvest cost against memory size at 1000 dirty pages, ring against bitmap.
//! - [`kvm`]: on real `/dev/kvm`: harvest cost (ring, bitmap, raw `kvm-ioctls`), guest dirtying
//!   throughput under each kind of logging, live migration with the `tdp` command.
//! - [`plot`]: the SVG plot of the harvest figures.
//! - [`timing`]: medians of interleaved rounds.
//! - [`suite`]: the comparisons, running the groups above.
//! - [`config`]: how much a run measures and the sizes the groups share; [`outcome`]: what a run
//!   produced (rows, notes, the harvest series, charts). Both are leaves: the groups use them, never
//!   [`suite`].
//! - [`report`]: rows, the table, the JSON file, the metadata accounting and the targets.
//! - [`targets`]: the dirty-tracking targets, judged from the rows.

pub mod aging;
pub mod config;
pub mod floor;
pub mod harvest;
pub mod host;
pub mod kvm;
pub mod logging;
pub mod nx;
pub mod ours;
pub mod outcome;
pub mod parallel;
pub mod peer;
pub mod plot;
pub mod recover;
pub mod report;
pub mod ring;
pub mod suite;
pub mod targets;
pub mod timing;
