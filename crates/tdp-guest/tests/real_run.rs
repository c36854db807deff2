//! Real runs on `/dev/kvm`: the CPL3 guest writes the iteration number where its pattern says, the host
//! reads it back, faults become clear errors, and two vCPUs run concurrently on their own threads.
//! Each test prints `SKIPPED` and returns when `/dev/kvm` cannot be opened.

use std::collections::BTreeSet;
use std::time::Duration;

use tdp_guest::{
    BatchGate, Decision, GuestError, GuestExit, GuestSpec, GuestVm, Pattern, Workload, classify_exit,
};

fn vm_or_skip(spec: GuestSpec, test: &str) -> Option<GuestVm> {
    match GuestVm::new(spec) {
        Ok(vm) => Some(vm),
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: {test}: cannot open /dev/kvm: {e}");
            None
        }
        Err(e) => panic!("{test}: building the VM failed: {e}"),
    }
}

fn written_pages(vm: &GuestVm, iteration: u64) -> BTreeSet<u64> {
    (0..vm.data_pages()).filter(|&p| vm.page_iteration(p).ok() == Some(iteration)).collect()
}

#[test]
fn sequential_batches_write_the_iteration_in_order_and_wrap() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(64 + 3, 1), "sequential") else { return Ok(()) };
    vm.set_workload(0, &Workload::new(10, 20, 8, Pattern::Sequential))?;
    let mut vcpus = vm.create_vcpus()?;
    let vcpu = &mut vcpus[0];
    vm.set_iteration(7);
    assert_eq!(vcpu.run()?, GuestExit::BatchDone { tag: 0 });
    assert_eq!(written_pages(&vm, 7), (10..18).collect());
    assert_eq!((vm.page_tag(10)?, vm.page_iteration(9)?), (0, 0));
    vm.set_iteration(8);
    for _ in 0..2 {
        assert_eq!(vcpu.run()?, GuestExit::BatchDone { tag: 0 });
    }
    // Batches 2 and 3 wrote pages 18..30 and then wrapped to 10..14.
    assert_eq!(written_pages(&vm, 8), (18..30).chain(10..14).collect());
    assert_eq!(written_pages(&vm, 7), (14..18).collect());
    assert_eq!(vm.vcpu_stats(0)?.batches, 3);
    // It ran at CPL3 in 64-bit mode the whole time.
    let sregs = vcpu.fd().get_sregs().map_err(|source| GuestError::Ioctl { op: "KVM_GET_SREGS", source })?;
    assert_eq!((sregs.cs.dpl, sregs.cs.l, sregs.ss.dpl), (3, 1, 3));
    assert_eq!(vm.vcpu_stats(0)?.writes, 24);
    Ok(())
}

#[test]
fn random_and_hot_patterns_stay_in_their_ranges() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(1024 + 3, 1), "patterns") else { return Ok(()) };
    vm.set_workload(0, &Workload::new(100, 900, 256, Pattern::Random).with_tag(false))?;
    let mut vcpus = vm.create_vcpus()?;
    vm.set_iteration(1);
    for _ in 0..4 {
        assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));
    }
    let random = written_pages(&vm, 1);
    assert!(random.iter().all(|p| (100..1000).contains(p)), "a random write left the range");
    assert!(random.len() > 500, "1024 random writes over 900 pages hit only {} pages", random.len());

    vm.set_workload(0, &Workload::new(0, 1027, 1000, Pattern::Hot { hot_pages: 10, percent: 90 }))?;
    vm.set_iteration(2);
    assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));
    let hot = written_pages(&vm, 2);
    let in_hot_set = hot.iter().filter(|&&p| p < 10).count();
    assert_eq!(in_hot_set, 10, "900-odd writes to 10 hot pages cover them all");
    assert!(hot.len() < 200, "only ~100 writes are cold, yet {} pages were written", hot.len());
    Ok(())
}

#[test]
fn a_guest_fault_is_a_triple_fault_error_with_rip() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(16, 1), "fault") else { return Ok(()) };
    let mut vcpus = vm.create_vcpus()?;
    assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));
    // Jump into the unmapped guard page: the fetch faults (#PF), and with no IDT that is a triple fault.
    let fd = vcpus[0].fd();
    let mut regs = fd.get_regs().map_err(|source| GuestError::Ioctl { op: "KVM_GET_REGS", source })?;
    regs.rip = 0x10;
    fd.set_regs(&regs).map_err(|source| GuestError::Ioctl { op: "KVM_SET_REGS", source })?;
    match vcpus[0].run() {
        Err(GuestError::TripleFault { vcpu: 0, rip }) => {
            let msg = GuestError::TripleFault { vcpu: 0, rip }.to_string();
            assert!(msg.contains("triple fault"), "{msg}");
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
    Ok(())
}

#[test]
fn two_vcpus_run_concurrently_and_pause_at_batch_boundaries() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(2048 + 3, 2), "two vCPUs") else { return Ok(()) };
    let vcpus = vm.create_vcpus()?;
    let gate = BatchGate::new(2);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .map(|mut vcpu| {
                let gate = &gate;
                s.spawn(move || {
                    let outcome = loop {
                        match vcpu.run() {
                            Ok(GuestExit::BatchDone { .. }) => {
                                if gate.at_batch_boundary() == Decision::Stop {
                                    break Ok(());
                                }
                            }
                            Ok(GuestExit::Interrupted) => {}
                            Ok(GuestExit::DirtyRingFull) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    };
                    gate.leave();
                    outcome
                })
            })
            .collect();
        let mut checks = Vec::new();
        for iteration in 2..6 {
            assert!(gate.pause_all(Duration::from_secs(30)), "vCPUs did not park");
            let stats = || (vm.vcpu_stats(0).ok(), vm.vcpu_stats(1).ok());
            let before = stats();
            // Parked: nothing moves.
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(before, stats());
            checks.push(written_pages(&vm, iteration - 1).len());
            vm.set_iteration(iteration);
            gate.resume();
            std::thread::sleep(Duration::from_millis(20));
        }
        gate.stop();
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (checks, joined)
    });
    let (checks, joined) = results;
    for r in joined {
        match r {
            Ok(outcome) => outcome?,
            Err(_) => panic!("a vCPU thread panicked"),
        }
    }
    assert!(checks[1..].iter().all(|&n| n > 0), "every phase wrote pages: {checks:?}");
    // Each vCPU writes only its half and tags its pages.
    for page in 0..vm.data_pages() {
        if vm.page_iteration(page)? != 0 {
            assert_eq!(vm.page_tag(page)?, u64::from(page >= 1025), "page {page}");
        }
    }
    assert!(vm.vcpu_stats(0)?.batches > 0 && vm.vcpu_stats(1)?.batches > 0);
    // An unknown exit is reported, not swallowed.
    assert!(classify_exit(&kvm_ioctls::VcpuExit::Hlt).is_err());
    Ok(())
}

#[test]
fn dirty_logging_toggles_by_re_registering_the_data_slot() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(128 + 3, 1), "logging toggle") else { return Ok(()) };
    let bytes = (vm.data_pages() * 4096) as usize;
    let count = |vm: &GuestVm| {
        vm.vm_fd()
            .get_dirty_log(vm.data_slot(), bytes)
            .map(|b| b.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
    };
    assert!(!vm.dirty_logging());
    assert_eq!(count(&vm).map_err(|e| e.errno()), Err(libc::ENOENT), "an unlogged slot has no log");
    vm.set_workload(0, &Workload::new(0, 131, 131, Pattern::Sequential))?;
    let mut vcpus = vm.create_vcpus()?;
    assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));

    vm.set_dirty_logging(true)?;
    assert!(vm.dirty_logging());
    assert_eq!(count(&vm).ok(), Some(0), "writes before logging are not reported");
    vm.set_iteration(2);
    vm.set_workload(0, &Workload::new(100, 31, 31, Pattern::Sequential))?;
    assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));
    let log = vm
        .vm_fd()
        .get_dirty_log(vm.data_slot(), bytes)
        .map_err(|source| GuestError::Ioctl { op: "KVM_GET_DIRTY_LOG", source })?;
    let dirty: Vec<u64> = (0..131).filter(|&p| log[(p / 64) as usize] & (1 << (p % 64)) != 0).collect();
    assert_eq!(
        dirty,
        (100..131).collect::<Vec<_>>(),
        "exactly the pages written, the slot's last 3 included"
    );
    assert_eq!(written_pages(&vm, 2), (100..131).collect());

    vm.set_dirty_logging(false)?;
    assert_eq!(count(&vm).map_err(|e| e.errno()), Err(libc::ENOENT));
    Ok(())
}

/// The host rewrites the workload while the vCPU runs, thousands of times, between two ranges whose
/// mix (A's base with B's length) would write pages in neither: the seqlock must keep every batch on one
/// whole workload, and nothing may fault.
#[test]
fn workload_changes_while_running_never_mix_two_workloads() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(4096 + 3, 1), "live workload changes") else {
        return Ok(());
    };
    let a = Workload::new(0, 10, 4, Pattern::Random).with_tag(false);
    let b = Workload::new(3000, 1099, 4, Pattern::Sequential).with_tag(false);
    vm.set_workload(0, &a)?;
    let mut vcpus = vm.create_vcpus()?;
    let mut vcpu = vcpus.remove(0);
    let gate = BatchGate::new(1);
    let outcome = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let r = loop {
                match vcpu.run() {
                    Ok(GuestExit::BatchDone { .. }) if gate.at_batch_boundary() == Decision::Stop => {
                        break Ok(());
                    }
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            gate.leave();
            r
        });
        let mut result = Ok(());
        for i in 0..20_000 {
            if let Err(e) = vm.set_workload(0, if i % 2 == 0 { &b } else { &a }) {
                result = Err(e);
                break;
            }
        }
        gate.stop();
        match runner.join() {
            Ok(r) => result.and(r),
            Err(_) => panic!("the vCPU thread panicked"),
        }
    });
    outcome?;
    let stats = vm.vcpu_stats(0)?;
    eprintln!("live workload changes: {stats:?}");
    assert!(stats.batches > 0);
    let stray: Vec<u64> =
        written_pages(&vm, 1).into_iter().filter(|p| !(*p < 10 || (3000..4099).contains(p))).collect();
    assert!(stray.is_empty(), "pages outside both workloads were written: {stray:?}");
    Ok(())
}

#[test]
fn tiny_slots_and_many_vcpus_get_sane_default_workloads() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(1, 3), "tiny slot") else { return Ok(()) };
    let mut vcpus = vm.create_vcpus()?;
    for vcpu in &mut vcpus {
        assert_eq!(vcpu.run()?, GuestExit::BatchDone { tag: vcpu.index() as u32 });
    }
    // Only the last vCPU's share holds the one page; the others idle.
    assert_eq!(vm.page_iteration(0)?, 1);
    assert_eq!(vm.page_tag(0)?, 2);
    let writes: Vec<u64> = (0..3).map(|i| vm.vcpu_stats(i).map(|s| s.writes)).collect::<Result<_, _>>()?;
    assert_eq!(writes, [0, 0, 1]);
    assert!(matches!(vm.page_iteration(1), Err(GuestError::PageOutOfRange { page: 1, pages: 1 })));
    Ok(())
}

#[test]
fn filled_pages_hold_the_iteration_in_every_word() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(64 + 3, 1), "fill") else { return Ok(()) };
    vm.set_workload(0, &Workload::new(60, 7, 7, Pattern::Sequential).with_fill(true))?;
    vm.set_iteration(0x1122_3344_5566_7788);
    let mut vcpus = vm.create_vcpus()?;
    assert_eq!(vcpus[0].run()?, GuestExit::BatchDone { tag: 0 });
    let mut page = vec![0u8; 4096];
    for p in 60..67 {
        vm.copy_data_page(p, &mut page)?;
        for (w, word) in page.chunks_exact(8).enumerate() {
            let expected: u64 = if w == 1 { 0 } else { 0x1122_3344_5566_7788 };
            assert_eq!(word, expected.to_le_bytes(), "page {p} word {w}");
        }
    }
    vm.copy_data_page(59, &mut page)?;
    assert!(page.iter().all(|&b| b == 0), "page 59 untouched");
    // The fill left the vCPU's registers as the program expects: the next batch still works.
    vm.set_workload(0, &Workload::new(0, 3, 3, Pattern::Sequential))?;
    assert_eq!(vcpus[0].run()?, GuestExit::BatchDone { tag: 0 });
    assert_eq!(vm.page_iteration(2)?, 0x1122_3344_5566_7788);
    Ok(())
}

#[test]
fn an_unexpected_exit_is_an_error_naming_the_exit_and_rip() -> Result<(), GuestError> {
    let Some(mut vm) = vm_or_skip(GuestSpec::new(16, 1), "unexpected exit") else { return Ok(()) };
    let mut vcpus = vm.create_vcpus()?;
    assert!(matches!(vcpus[0].run()?, GuestExit::BatchDone { .. }));
    // Put an `in al, 0x60` (assembled, like the program) in data page 3 and jump there: a port read the
    // program never does, so KVM_EXIT_IO (in) must come back as an error, not be taken for a batch.
    let entry = tdp_guest::DATA_GPA + 3 * 4096;
    let mut asm = iced_x86::code_asm::CodeAssembler::new(64).map_err(GuestError::Assemble)?;
    asm.in_(iced_x86::code_asm::al, 0x60).map_err(GuestError::Assemble)?;
    let mut code = asm.assemble(entry).map_err(GuestError::Assemble)?;
    code.resize(4096, 0);
    vm.write_data_page(3, &code)?;
    let fd = vcpus[0].fd();
    let mut regs = fd.get_regs().map_err(|source| GuestError::Ioctl { op: "KVM_GET_REGS", source })?;
    regs.rip = entry;
    fd.set_regs(&regs).map_err(|source| GuestError::Ioctl { op: "KVM_SET_REGS", source })?;
    match vcpus[0].run() {
        Err(GuestError::UnexpectedExit { vcpu: 0, exit, rip }) => {
            assert!(exit.starts_with("IoIn(96"), "{exit}");
            assert!((entry..entry + 4096).contains(&rip), "rip {rip:#x}");
            let msg = GuestError::UnexpectedExit { vcpu: 0, exit, rip }.to_string();
            assert!(msg.contains("unexpected exit IoIn(96") && msg.contains("vCPU 0"), "{msg}");
        }
        other => panic!("expected an unexpected-exit error, got {other:?}"),
    }
    Ok(())
}
