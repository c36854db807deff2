//! I4 for the chunked clear (`TrackingMode::ClearLogChunked`), as a migration uses it: a real CPL3 guest
//! writes its data slot; each round the host collects (KVM's log is only copied), then for each 64-page
//! chunk clears it and copies its pages to a shadow, and in the middle of those chunks lets the guest run
//! another batch (writes landing before their chunk's clear, after it, and into chunks already copied).
//! After a last round with the guest stopped, the shadow must equal guest memory page for page: any
//! write lost between a collect and a clear would leave a stale page.

// The guest runs on kvm-ioctls.
#![cfg(feature = "kvm-ioctls")]

use tdp_guest::{GuestError, GuestExit, GuestSpec, GuestVm, Pattern, Workload};
use tdp_kvm::{DirtyTracker, Error, SlotSpec, TrackingMode};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Not a multiple of 64: the last chunk is short.
const PAGES: u64 = 512 + 3;
const ROUNDS: u64 = 8;

#[test]
fn i4_chunked_clear_then_copy_loses_no_write() -> TestResult {
    let mut vm = match GuestVm::new(GuestSpec::new(PAGES, 1)) {
        Ok(vm) => vm,
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    match tdp_kvm::enable_manual_protect(vm.vm_fd(), true) {
        Ok(()) => {}
        Err(e @ Error::CapabilityMissing { .. }) => {
            eprintln!("SKIPPED: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let tracker = DirtyTracker::new(vm.vm_fd(), TrackingMode::ClearLogChunked)?;
    vm.set_dirty_logging(true)?;
    let region = vm.data_region();
    let spec = SlotSpec::from_region(region.slot, region.guest_phys_addr, region.memory_size);
    tracker.register_slot(spec)?;
    vm.set_workload(0, &Workload::new(0, PAGES, 40, Pattern::Random).with_tag(false))?;
    vm.set_iteration(1);
    let mut vcpu = vm.create_vcpus()?.pop().ok_or("no vCPU")?;
    tracker.attach_vcpu(vcpu.fd())?;
    let mut batch = || -> TestResult {
        loop {
            match vcpu.run()? {
                GuestExit::BatchDone { .. } => return Ok(()),
                GuestExit::Interrupted => {}
                GuestExit::DirtyRingFull => return Err("no ring in clear-log mode".into()),
            }
        }
    };
    let mut shadow = vec![0u8; (PAGES * 4096) as usize];
    let mut copied = 0u64;
    let mut chunks = 0u64;
    for round in 1..=ROUNDS + 1 {
        let last = round > ROUNDS;
        vm.set_iteration(round);
        if !last {
            batch()?;
        }
        let sets = tracker.collect()?;
        let set = sets.get(spec.key()).ok_or("the slot's set")?;
        let list: Vec<(u64, u64)> = set.chunks().collect();
        for (i, &(first, mask)) in list.iter().enumerate() {
            if !last && i == list.len() / 2 {
                batch()?; // the guest writes while the round's chunks are being cleared and copied
            }
            tracker.clear_chunk(spec.key(), first, mask)?;
            for b in (0..64).filter(|b| mask & (1 << b) != 0) {
                let p = first + b;
                let page = &mut shadow[(p * 4096) as usize..((p + 1) * 4096) as usize];
                vm.copy_data_page(p, page)?;
                copied += 1;
            }
            chunks += 1;
        }
        if round == 1 {
            assert_eq!(set.count(), PAGES, "INITIALLY_SET: the first round reports every page");
        }
    }
    let mut page = vec![0u8; 4096];
    for p in 0..PAGES {
        vm.copy_data_page(p, &mut page)?;
        let written = vm.page_iteration(p)?;
        assert!(
            page[..] == shadow[(p * 4096) as usize..((p + 1) * 4096) as usize],
            "page {p} (last written in round {written}) differs from its copy: a write was lost"
        );
    }
    let touched = (0..PAGES).filter(|&p| vm.page_iteration(p).is_ok_and(|v| v > 0)).count();
    assert!(touched >= 200, "the guest wrote only {touched} pages");
    eprintln!(
        "chunked clear: {ROUNDS} rounds, {chunks} chunks cleared, {copied} pages copied, {touched} pages written"
    );
    Ok(())
}
