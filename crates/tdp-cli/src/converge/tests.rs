//! Convergence and throttle tests: the downtime estimate, the max-rounds stop with its reason, QEMU's
//! two-rounds trigger, quota halving and floors, and pacing with interrupts.

use super::*;

fn policy(max_rounds: u32, dirty_limit: bool) -> Policy {
    Policy { max_rounds, downtime_target: Duration::from_millis(100), dirty_limit, vcpu_quota: None }
}

/// A round that sent `sent` pages at 4096 pages/s (16 MiB/s) and saw `dirtied` new dirty pages.
fn obs(round: u32, sent: u64, dirtied: u64, rates: &[f64]) -> RoundObservation {
    let t = Duration::from_secs_f64(sent as f64 / 4096.0);
    RoundObservation {
        round,
        pages_sent: sent,
        send_time: t,
        round_time: t,
        dirtied,
        remaining: dirtied,
        vcpu_rates: rates.to_vec(),
    }
}

#[test]
fn converges_when_the_estimate_meets_the_target() {
    let mut c = Convergence::new(policy(10, false), 2);
    // 400 pages at 4096 pages/s: ~98 ms <= 100 ms.
    let s = c.observe(&obs(1, 4096, 400, &[]));
    assert!(matches!(s.decision, Decision::StopAndCopy { converged: true, .. }), "{s:?}");
    assert!((s.throughput - 16.0 * (1 << 20) as f64).abs() < 1.0);
    let mut c = Convergence::new(policy(10, false), 2);
    let s = c.observe(&obs(1, 4096, 500, &[]));
    assert_eq!(s.decision, Decision::Continue, "{s:?}");
}

#[test]
fn max_rounds_forces_stop_and_copy_with_a_reason() {
    let mut c = Convergence::new(policy(3, false), 2);
    for r in 0..3 {
        assert_eq!(c.observe(&obs(r, 4096, 3000, &[])).decision, Decision::Continue);
    }
    match c.observe(&obs(3, 4096, 3000, &[])).decision {
        Decision::StopAndCopy { converged: false, reason } => {
            assert!(reason.contains("did not converge in 3 rounds"), "{reason}");
            assert!(reason.contains("3000 pages left"), "{reason}");
            assert!(reason.contains("dirty limit off"), "{reason}");
        }
        other => panic!("expected a forced stop, got {other:?}"),
    }
}

#[test]
fn throttle_triggers_after_two_high_rounds_and_spares_slow_vcpus() {
    let mut c = Convergence::new(policy(20, true), 2);
    assert_eq!(c.observe(&obs(0, 4096, 3000, &[])).quotas, None, "never on the bulk copy");
    assert_eq!(c.observe(&obs(1, 4096, 3000, &[3000.0, 100.0])).quotas, None, "one high round");
    // Link 4096 pages/s: a quarter split over 2 vCPUs is 512 pages/s; vCPU 1 runs at 100.
    let q = c.observe(&obs(2, 4096, 3000, &[3000.0, 100.0])).quotas;
    assert_eq!(q, Some(vec![Some(512), None]));
    assert_eq!(c.quota(), Some(512));
    // Still high: the quota halves.
    let q = c.observe(&obs(3, 4096, 3000, &[3000.0, 3000.0])).quotas;
    assert_eq!(q, Some(vec![Some(256), Some(256)]));
}

#[test]
fn throttle_stays_off_when_disabled_or_low() {
    let mut c = Convergence::new(policy(20, false), 2);
    for r in 0..5 {
        assert_eq!(c.observe(&obs(r, 4096, 3000, &[])).quotas, None);
    }
    let mut c = Convergence::new(policy(20, true), 2);
    for r in 0..5 {
        // Dirtied below half of what was sent: no trigger.
        assert_eq!(c.observe(&obs(r, 4096, 1000, &[])).quotas, None);
    }
}

#[test]
fn fixed_quota_is_used_as_given_with_a_floor_for_computed_ones() {
    let mut p = policy(20, true);
    p.vcpu_quota = Some(1000);
    let mut c = Convergence::new(p, 1);
    c.observe(&obs(1, 4096, 4000, &[]));
    assert_eq!(c.observe(&obs(2, 4096, 4000, &[])).quotas, Some(vec![Some(1000)]));
    let mut c = Convergence::new(policy(20, true), 64);
    c.observe(&obs(1, 64, 64, &[]));
    assert_eq!(c.observe(&obs(2, 64, 64, &[])).quotas.map(|q| q[0]), Some(Some(MIN_QUOTA)));
}

#[test]
fn nothing_left_is_zero_downtime() {
    let mut c = Convergence::new(policy(0, true), 1);
    let s = c.observe(&obs(0, 0, 0, &[]));
    assert_eq!(s.estimated_downtime, Duration::ZERO);
    assert!(matches!(s.decision, Decision::StopAndCopy { converged: true, .. }));
}

#[test]
fn pace_sleeps_only_over_quota() {
    let t = Throttle::new(1);
    let mut pacer = Pacer::new();
    assert_eq!(t.pace(0, &mut pacer, 1_000_000), Duration::ZERO, "no quota");
    t.set_quota(0, Some(1000));
    // 10 pages at 1000 pages/s is 10 ms of allowance: some sleep, bounded by MAX_SLEEP.
    let slept = t.pace(0, &mut pacer, 10);
    assert!(slept > Duration::ZERO, "{slept:?}");
    assert_eq!(t.throttled_exits(0), 1);
    assert!(t.slept(0) >= slept.saturating_sub(Duration::from_micros(1)));
    // A long sleep is cut short by an interrupt from another thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            // The exit is counted as the sleep starts: interrupt once it has.
            while t.throttled_exits(0) < 2 {
                std::thread::yield_now();
            }
            t.interrupt();
        });
        let slept = t.pace(0, &mut pacer, 1_000_000);
        assert!(slept < MAX_SLEEP, "interrupted: {slept:?}");
        assert_eq!(t.throttled_exits(0), 2, "the interrupted sleep counts as a throttled exit");
    });
    assert_eq!(t.pace(0, &mut pacer, 1_000_000), Duration::ZERO, "held after an interrupt");
    t.release();
    t.set_quota(0, None);
    assert_eq!(t.pace(0, &mut pacer, 1_000_000), Duration::ZERO);
}
