//! Unit tests that need private items of the ring: the flag predicates.

use super::*;

#[test]
fn i5_reset_reads_only_the_reset_bit_and_harvest_needs_dirty_without_reset() {
    for flags in [DIRTY_GFN_F_RESET, DIRTY_GFN_F_MASK, u32::MAX, 0xffff_fff2] {
        assert!(is_harvested(flags), "{flags:#x}");
    }
    for flags in [0, DIRTY_GFN_F_DIRTY, 0xffff_fffd, 0x8000_0001] {
        assert!(!is_harvested(flags), "{flags:#x}");
    }
    for flags in [DIRTY_GFN_F_DIRTY, 0x8000_0001] {
        assert!(is_dirty(flags), "{flags:#x}");
    }
    for flags in [0, DIRTY_GFN_F_RESET, DIRTY_GFN_F_MASK, u32::MAX] {
        assert!(!is_dirty(flags), "{flags:#x}");
    }
}
