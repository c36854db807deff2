//! Sorting a harvest's page offsets: an LSD radix sort over `offset - min`, in as few passes as digits
//! of at most 11 bits allow, the bits split evenly between the passes.
//!
//! A ring collect sorts every slot's harvested offsets before they join the slot's sorted set. The
//! standard comparison sort spends most of its time on mispredicted branches (about 10 ns per entry
//! for 1000 random offsets on this machine); a radix pass has no data-dependent branch. Two things keep
//! the passes cheap: their number follows the span of the offsets (18 bits for 1000 random pages of a
//! 1 GiB slot: two passes of 9 bits; 24 bits for 64 GiB: three of 8), and no pass has a narrow digit
//! (a 2-bit last digit sends most entries to the same few counters, whose increments then wait on one
//! another). A pass whose digit is the same for every entry is skipped. Short lists keep the standard
//! sort; a sorted list (sequential writes) is left as it is after one check.

/// Below this length the standard sort wins.
const SMALL: usize = 64;
/// The widest digit: its counters (2048 of 4 bytes) stay in the L1 cache.
const MAX_DIGIT_BITS: u32 = 11;

/// Scratch memory for [`sort`], kept from call to call so that a sort writes no more of it than it uses.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The other buffer of the passes; at least as long as the longest list sorted.
    placed: Vec<u64>,
    /// One row of counters per pass, each as long as a digit has values, side by side.
    counts: Vec<u32>,
}

/// Sorts `v` ascending, using `scratch` (which grows to `v.len()` entries and at most
/// 2^[`MAX_DIGIT_BITS`] counters per pass).
///
/// Reads the list twice before moving anything: once for its smallest and largest entries and whether it
/// is sorted already, once to count every pass's digits; then each pass moves every entry once.
pub(crate) fn sort(v: &mut Vec<u64>, scratch: &mut Scratch) {
    let n = v.len();
    if n <= SMALL || u32::try_from(n).is_err() {
        v.sort_unstable();
        return;
    }
    let (mut min, mut max, mut sorted) = (u64::MAX, 0, true);
    let mut prev = v.first().copied().unwrap_or(0);
    for &x in v.iter() {
        min = min.min(x);
        max = max.max(x);
        sorted &= prev <= x;
        prev = x;
    }
    if sorted {
        return;
    }
    // Not sorted, so not all equal: at least one bit.
    let bits = u64::BITS - (max - min).leading_zeros();
    let passes = bits.div_ceil(MAX_DIGIT_BITS) as usize;
    let width = bits.div_ceil(passes as u32);
    let buckets = 1usize << width;
    let mask = (buckets - 1) as u64;
    scratch.counts.clear();
    scratch.counts.resize(passes * buckets, 0);
    // In 0..buckets: the digit has `width` bits.
    let digit = |x: u64, shift: u32| (((x - min) >> shift) & mask) as usize;
    // Counts one digit of every entry in `row`. A row has a counter for every value of a digit, so no
    // count is missed; `get_mut` stands in for the compiler's bounds check.
    let count = |row: &mut [u32], x: u64, shift: u32| {
        if let Some(c) = row.get_mut(digit(x, shift)) {
            *c += 1;
        }
    };
    let counts = scratch.counts.as_mut_slice();
    // One read of the list for every pass's counts (for the usual two or three passes).
    match passes {
        2 => {
            let (a, b) = counts.split_at_mut(buckets);
            v.iter().for_each(|&x| {
                count(a, x, 0);
                count(b, x, width);
            });
        }
        3 => {
            let (a, rest) = counts.split_at_mut(buckets);
            let (b, c) = rest.split_at_mut(buckets);
            v.iter().for_each(|&x| {
                count(a, x, 0);
                count(b, x, width);
                count(c, x, 2 * width);
            });
        }
        _ => {
            for (pass, row) in counts.chunks_exact_mut(buckets).enumerate() {
                v.iter().for_each(|&x| count(row, x, pass as u32 * width));
            }
        }
    }
    if scratch.placed.len() < n {
        scratch.placed.resize(n, 0);
    }
    let mut in_v = true;
    for (pass, row) in scratch.counts.chunks_exact_mut(buckets).enumerate() {
        // Every entry has the same digit: the pass would only copy.
        if row.contains(&(n as u32)) {
            continue;
        }
        let mut next = 0;
        for c in row.iter_mut() {
            let k = *c;
            *c = next;
            next += k;
        }
        let shift = pass as u32 * width;
        let (src, dst) =
            if in_v { (&v[..], &mut scratch.placed[..n]) } else { (&scratch.placed[..n], &mut v[..]) };
        for &x in src {
            // In bounds: the digit is below `buckets`; the starts partition 0..n and each digit gets
            // exactly its count.
            if let Some(start) = row.get_mut(digit(x, shift)) {
                if let Some(d) = dst.get_mut(*start as usize) {
                    *d = x;
                }
                *start += 1;
            }
        }
        in_v = !in_v;
    }
    if !in_v {
        // The sorted entries become `v`; `v`'s memory becomes the next call's scratch.
        std::mem::swap(v, &mut scratch.placed);
        v.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::sort;

    #[test]
    fn sorts_like_the_standard_sort_at_every_length_spread_and_clustering() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut tmp = super::Scratch::default();
        for len in [0, 1, 2, 64, 65, 66, 200, 1000, 4096] {
            for bits in [0, 1, 7, 8, 9, 18, 24, 31, 52, 64] {
                let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
                // Uniform; and half clustered on a few values, half spread (large buckets).
                let uniform: Vec<u64> = (0..len).map(|_| rand() & mask).collect();
                let clustered: Vec<u64> =
                    (0..len).map(|i| if i % 2 == 0 { rand() & mask } else { (rand() % 5) & mask }).collect();
                for mut v in [uniform, clustered] {
                    let mut want = v.clone();
                    want.sort_unstable();
                    sort(&mut v, &mut tmp);
                    assert_eq!(v, want, "len {len}, {bits} bits");
                    sort(&mut v, &mut tmp);
                    assert_eq!(v, want, "len {len}, {bits} bits, sorted input");
                }
            }
        }
        // Descending with repeats, and the extremes of u64.
        let mut v: Vec<u64> =
            (0..500u64).rev().map(|i| (i % 37) << 8).chain([u64::MAX, 0, u64::MAX]).collect();
        let mut want = v.clone();
        want.sort_unstable();
        sort(&mut v, &mut tmp);
        assert_eq!(v, want);
    }
}
