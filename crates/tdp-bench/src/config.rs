//! How much a run measures ([`Config`]) and the sizes the groups share: the leaf the measuring modules
//! and [`crate::suite`] both use, so that the groups do not depend on the suite that runs them.

use tdp_core::addr::Level;

/// 4 KiB pages in 1 GiB.
pub const PAGES_1G: u64 = 1 << 18;
/// 4 KiB pages in 2 MiB.
pub const PAGES_2M: u64 = 512;

/// How much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Recorded rounds per comparison.
    pub reps: usize,
    /// Unrecorded rounds first.
    pub warmup: usize,
    /// 2 MiB faults per round (512 per GiB).
    pub faults_2m: u64,
}

impl Config {
    /// `--quick`: a few seconds.
    pub const QUICK: Config = Config { reps: 5, warmup: 1, faults_2m: 128 * 512 };
    /// The default: more rounds, more 2 MiB faults per round (a few seconds too).
    pub const FULL: Config = Config { reps: 31, warmup: 3, faults_2m: 256 * 512 };
}

/// Table pages an MMU needs to map `pages` 4 KiB pages from gfn 0 at `level`, plus a root, the tables
/// above, and more than a page cache's worth of slack (a cache holds at most 10).
#[must_use]
pub fn arena_pages(pages: u64, level: Level) -> usize {
    let leaves_per_table = PAGES_2M * level.pages();
    let bottom = pages.div_ceil(leaves_per_table) as usize;
    bottom + bottom.div_ceil(512) + 4 + 16
}
