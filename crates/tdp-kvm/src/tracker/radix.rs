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
/// Counters for the widest digit.
const MAX_COUNTS: usize = 1 << MAX_DIGIT_BITS;

/// Scratch memory for [`sort`], kept from call to call so that a sort writes no more of it than it uses.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The other buffer of the passes; at least as long as the longest list sorted.
    placed: Vec<u64>,
    /// [`MAX_COUNTS`] counters once a long list was sorted.
    counts: Vec<u32>,
}

/// Sorts `v` ascending, using `scratch` (which grows to `v.len()` entries and [`MAX_COUNTS`] counters).
pub(crate) fn sort(v: &mut Vec<u64>, scratch: &mut Scratch) {
    let n = v.len();
    if n <= SMALL || u32::try_from(n).is_err() {
        v.sort_unstable();
        return;
    }
    if v.is_sorted() {
        return;
    }
    let (mut min, mut max) = (u64::MAX, 0);
    for &x in v.iter() {
        min = min.min(x);
        max = max.max(x);
    }
    // Not sorted, so not all equal: at least one bit.
    let bits = u64::BITS - (max - min).leading_zeros();
    let passes = bits.div_ceil(MAX_DIGIT_BITS);
    let width = bits.div_ceil(passes);
    let buckets = 1usize << width;
    let mask = (buckets - 1) as u64;
    scratch.counts.resize(MAX_COUNTS, 0);
    let Ok(counts) = <&mut [u32; MAX_COUNTS]>::try_from(scratch.counts.as_mut_slice()) else {
        v.sort_unstable();
        return;
    };
    if scratch.placed.len() < n {
        scratch.placed.resize(n, 0);
    }
    // In 0..MAX_COUNTS: the digit has at most `width` <= MAX_DIGIT_BITS bits; the mask says so to the
    // compiler, which then checks no counter index.
    let digit = |x: u64, shift: u32| (((x - min) >> shift) & mask) as usize & (MAX_COUNTS - 1);
    let mut in_v = true;
    for pass in 0..passes {
        let shift = pass * width;
        let (src, dst) =
            if in_v { (&v[..], &mut scratch.placed[..n]) } else { (&scratch.placed[..n], &mut v[..]) };
        counts[..buckets].fill(0);
        for &x in src {
            counts[digit(x, shift)] += 1;
        }
        // Every entry has the same digit: the pass would only copy.
        if counts[..buckets].contains(&(n as u32)) {
            continue;
        }
        let mut next = 0;
        for c in &mut counts[..buckets] {
            let k = *c;
            *c = next;
            next += k;
        }
        for &x in src {
            let start = &mut counts[digit(x, shift)];
            // In bounds: the starts partition 0..n and each digit gets exactly its count.
            if let Some(d) = dst.get_mut(*start as usize) {
                *d = x;
            }
            *start += 1;
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
