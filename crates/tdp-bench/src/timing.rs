//! Timing: each quantity is measured over several repetitions and summarised by the median per-op time;
//! the contenders of one comparison run interleaved (A B A B ...), so that frequency or cache drift hits
//! them alike.

use std::time::Instant;

/// Runs `timed` once; returns its duration in nanoseconds divided by `ops`, and its result (passed
/// through `black_box` first, so the work behind it cannot be dropped).
pub fn ns_per_op<R>(ops: u64, timed: impl FnOnce() -> R) -> (f64, R) {
    let start = Instant::now();
    let r = std::hint::black_box(timed());
    let elapsed = start.elapsed();
    (elapsed.as_nanos() as f64 / ops as f64, r)
}

/// The median of `samples` (the mean of the two middle ones for an even count).
///
/// # Panics
/// If `samples` is empty or holds a NaN.
#[must_use]
pub fn median(samples: &[f64]) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("timings are not NaN"));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 }
}

/// Samples of several contenders measured in interleaved rounds.
#[derive(Debug, Clone)]
pub struct Rounds<const N: usize> {
    samples: [Vec<f64>; N],
}

impl<const N: usize> Rounds<N> {
    /// Runs `warmup` unrecorded rounds and then `reps` recorded ones; each round calls `round`, which
    /// measures every contender once, in order, and returns their per-op times.
    pub fn run(warmup: usize, reps: usize, mut round: impl FnMut() -> [f64; N]) -> Self {
        for _ in 0..warmup {
            round();
        }
        let mut samples: [Vec<f64>; N] = core::array::from_fn(|_| Vec::with_capacity(reps));
        for _ in 0..reps {
            for (all, one) in samples.iter_mut().zip(round()) {
                all.push(one);
            }
        }
        Rounds { samples }
    }

    /// The median per-op time of contender `i`.
    #[must_use]
    pub fn median(&self, i: usize) -> f64 {
        median(&self.samples[i])
    }

    /// The recorded per-op times of contender `i`, in the order measured.
    #[must_use]
    pub fn samples(&self, i: usize) -> &[f64] {
        &self.samples[i]
    }

    /// The spread of contender `i`: interquartile range / median, a noise indicator that one sample hit by
    /// an interrupt does not dominate.
    #[must_use]
    pub fn spread(&self, i: usize) -> f64 {
        let mut s = self.samples[i].clone();
        s.sort_by(|a, b| a.partial_cmp(b).expect("timings are not NaN"));
        let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
        (q(0.75) - q(0.25)) / self.median(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn rounds_interleave_and_skip_warmup() {
        let mut calls = Vec::new();
        let mut n = 0.0;
        let r = Rounds::<2>::run(1, 3, || {
            n += 1.0;
            calls.push(n);
            [n, 10.0 * n]
        });
        assert_eq!(calls.len(), 4);
        assert_eq!(r.median(0), 3.0, "warm-up round 1 is not recorded: samples 2, 3, 4");
        assert_eq!(r.median(1), 30.0);
    }
}
