//! The frame allocator's deferred free and its I2 checks, and identity translation's levels and
//! refusals, over a region of ordinary heap pages.

extern crate std;

use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::host::{HostFaultError, HostTranslate, TableMemory};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::spte::Spte;
use tdp_core::sync::Ordering;

use crate::frames::TableFrames;
use crate::region::{IdentityRegion, TablePage};
use crate::translate::{IdentityTranslate, PhysRange};

fn pages(n: usize) -> Vec<TablePage> {
    (0..n).map(|_| TablePage::new()).collect()
}

#[test]
fn i2_deferred_pages_wait_for_every_guard_alive_at_the_free() {
    let mut mem = pages(3);
    let frames = TableFrames::new(IdentityRegion::from_pages(&mut mem)).unwrap();
    let [a, b, c] = [(); 3].map(|()| frames.alloc_table(Spte(0)).unwrap());
    assert_eq!(frames.alloc_table(Spte(0)), Err(tdp_core::host::AllocError));
    let outer = frames.begin_walk();
    frames.free_table_deferred(a);
    let inner = frames.begin_walk();
    frames.free_table_deferred(b);
    drop(outer);
    // `inner` may still hold a pointer into a or b (it started before b's free, and the count never hit
    // 0 since a's): neither is reusable.
    assert!(frames.alloc_table(Spte(0)).is_err());
    assert_eq!(frames.stats().deferred, 2);
    drop(inner);
    let stats = frames.stats();
    assert_eq!((stats.deferred, stats.deferred_released, stats.epochs), (0, 2, 1));
    // Both came back; with no guard alive a deferred free is immediate.
    let x = frames.alloc_table(Spte(7)).unwrap();
    let y = frames.alloc_table(Spte(7)).unwrap();
    assert_eq!([x, y].iter().filter(|p| [a, b].contains(p)).count(), 2);
    frames.free_table_deferred(c);
    assert_eq!(frames.alloc_table(Spte(0)).unwrap(), c);
    // A page handed out again is filled with the new value, not the old contents.
    assert!(frames.table(x).iter().all(|e| e.load(Ordering::Relaxed) == 7));
    assert_eq!((frames.stats().in_use, frames.stats().peak, frames.stats().alloc_failures), (3, 3, 2));
}

#[test]
fn i2_free_table_now_is_reusable_at_once_even_during_a_walk() {
    let mut mem = pages(1);
    let frames = TableFrames::new(IdentityRegion::from_pages(&mut mem)).unwrap();
    let a = frames.alloc_table(Spte(0)).unwrap();
    let _walk = frames.begin_walk();
    frames.free_table_now(a);
    assert_eq!(frames.alloc_table(Spte(0)), Ok(a));
}

#[test]
fn i2_double_free_and_foreign_frames_are_caught() {
    let mut mem = pages(2);
    let frames = TableFrames::new(IdentityRegion::from_pages(&mut mem)).unwrap();
    let a = frames.alloc_table(Spte(0)).unwrap();
    frames.free_table_now(a);
    let double = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| frames.free_table_deferred(a)));
    let foreign = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = frames.table(Pfn(a.0 + 100));
    }));
    for (what, result) in [("double free", double), ("foreign frame", foreign)] {
        let msg = result.expect_err(what);
        let text = msg.downcast_ref::<alloc::string::String>().map(alloc::string::String::as_str);
        assert!(text.is_some_and(|t| t.starts_with("I2 violation")), "{what}: {text:?}");
    }
}

#[test]
fn identity_translate_reports_the_largest_block_inside_guest_ram() {
    // RAM: 2 MiB at 2 MiB, then 1 GiB + 4 KiB at 1 GiB.
    let ram = [
        PhysRange { start: 0x20_0000, end: 0x40_0000 },
        PhysRange { start: 1 << 30, end: (2 << 30) + 0x1000 },
    ];
    let host = IdentityTranslate::new(&ram, Level::L3);
    let slot =
        |base: u64, pages: u64| Memslot::new(AsId(0), SlotId(0), Gfn(0), pages, base, SlotFlags::empty());
    let t = |s: &Memslot, g: u64| host.translate(s, Gfn(g), false).map(|p| (p.pfn, p.level));
    assert_eq!(t(&slot(0x20_0000, 512), 5), Ok((Pfn(0x205), Level::L2)));
    assert_eq!(t(&slot(1 << 30, 0x40001), 0x3ffff), Ok((Pfn(0x7ffff), Level::L3)));
    assert_eq!(t(&slot(1 << 30, 0x40001), 0x40000), Ok((Pfn(0x80000), Level::L1)), "the 4 KiB tail");
    assert_eq!(t(&slot(0x10_0000, 1024), 3), Err(HostFaultError::NoPage { gfn: Gfn(3) }), "below RAM");
    assert_eq!(t(&slot(0x20_0000, 512), 512), Err(HostFaultError::NoPage { gfn: Gfn(512) }), "outside slot");
    let capped = IdentityTranslate::new(&ram, Level::L2);
    assert_eq!(capped.translate(&slot(1 << 30, 16), Gfn(0), true).map(|p| p.level), Ok(Level::L2));
    let small = IdentityTranslate::new(&ram, Level::L1);
    assert_eq!(small.translate(&slot(1 << 30, 16), Gfn(0), true).map(|p| p.level), Ok(Level::L1));
}
