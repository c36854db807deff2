//! Sorting a harvest's page offsets: an LSD radix sort of 32-bit offsets, in as few passes as digits of
//! at most 11 bits allow, the bits split evenly between the passes.
//!
//! A ring collect sorts every slot's harvested offsets before they join the slot's sorted set. The
//! standard comparison sort spends most of its time on mispredicted branches (about 10 ns per entry
//! for 1000 random offsets on this machine); a radix pass has no data-dependent branch. What keeps the
//! passes cheap:
//! - their number follows the slot's size, which bounds every offset (18 bits for a 1 GiB slot: two
//!   passes of 9 bits; 24 bits for 64 GiB: three of 8), and a pass whose digit is the same for every
//!   entry is skipped (a large slot written only in its first part);
//! - no pass has a narrow digit (a 2-bit last digit sends most entries to the same few counters, whose
//!   increments then wait on one another);
//! - the list is read once before anything moves, counting every pass's digits and checking whether it is
//!   in order already (sequential writes: then nothing moves);
//! - offsets are 32 bits (KVM's largest memslot has `2^31 - 1` pages): in a collect, right after the
//!   guest's run has pushed the tracker's memory out of the near caches, every cache line a pass touches is
//!   a miss, and half the bytes is half the lines.
//!
//! Short lists keep the standard sort.

/// Below this length the standard sort wins.
const SMALL: usize = 64;
/// The widest digit: its counters (2048 of 4 bytes) stay in the L1 cache.
const MAX_DIGIT_BITS: u32 = 11;
/// The most passes a 32-bit offset needs.
const MAX_PASSES: usize = u32::BITS.div_ceil(MAX_DIGIT_BITS) as usize;
const _: () = assert!(MAX_PASSES == 3, "the count and prefix loops handle one to three passes");

/// Scratch memory for [`sort`], kept from call to call so that a sort writes no more of it than it uses.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The other buffer of the passes; at least as long as the longest list sorted.
    placed: Vec<u32>,
    /// One row of counters per pass, each as long as a digit has values, side by side.
    counts: Vec<u32>,
}

impl Scratch {
    /// Starts bringing the scratch into the caches ([`crate::sys::prefetch`]).
    pub(crate) fn prefetch(&self) {
        crate::sys::prefetch(self.placed.as_ptr().cast(), self.placed.len() * size_of::<u32>());
        crate::sys::prefetch(self.counts.as_ptr().cast(), self.counts.len() * size_of::<u32>());
    }
}

/// Sorts `v` ascending, for offsets of a slot of `pages` pages (an offset at or past `pages` is sorted
/// too, only with more passes than the slot's size calls for), using `scratch`, which grows to
/// `v.len()` entries and at most 2^[`MAX_DIGIT_BITS`] counters per pass.
pub(crate) fn sort(v: &mut Vec<u32>, pages: u64, scratch: &mut Scratch) {
    let n = v.len();
    if n <= SMALL || u32::try_from(n).is_err() {
        v.sort_unstable();
        return;
    }
    let slot_bits = u64::BITS - pages.saturating_sub(1).leading_zeros();
    let bits = slot_bits.clamp(1, u32::BITS);
    let passes = bits.div_ceil(MAX_DIGIT_BITS) as usize;
    let width = bits.div_ceil(passes as u32);
    let buckets = 1usize << width;
    let mask = (buckets - 1) as u32;
    scratch.counts.clear();
    scratch.counts.resize(passes * buckets, 0);
    let counts = scratch.counts.as_mut_slice();
    let top_shift = (passes as u32 - 1) * width;
    // `outside`: an offset with bits above the passes' digits (past the slot), which the passes would not
    // sort; it sends the list to the standard sort.
    let (mut sorted, mut outside) = (true, false);
    let mut prev = v.first().copied().unwrap_or(0);
    // One read of the list: every pass's counts, whether it is sorted, whether any offset is outside.
    let mut note = |x: u32| {
        sorted &= prev <= x;
        outside |= (x >> top_shift) as usize >= buckets;
        prev = x;
    };
    let count = |row: &mut [u32], digit: usize| {
        if let Some(c) = row.get_mut(digit) {
            *c += 1;
        }
    };
    let digit = |x: u32, shift: u32| ((x >> shift) & mask) as usize;
    match passes {
        1 => v.iter().for_each(|&x| {
            count(counts, digit(x, 0));
            note(x);
        }),
        2 => {
            let (a, b) = counts.split_at_mut(buckets);
            v.iter().for_each(|&x| {
                count(a, digit(x, 0));
                count(b, digit(x, width));
                note(x);
            });
        }
        _ => {
            let (a, rest) = counts.split_at_mut(buckets);
            let (b, c) = rest.split_at_mut(buckets);
            v.iter().for_each(|&x| {
                count(a, digit(x, 0));
                count(b, digit(x, width));
                count(c, digit(x, 2 * width));
                note(x);
            });
        }
    }
    if sorted {
        return;
    }
    if outside {
        v.sort_unstable();
        return;
    }
    if scratch.placed.len() < n {
        scratch.placed.resize(n, 0);
    }
    // A pass whose entries all have the same digit would only copy: skipped.
    let mut skip = [false; MAX_PASSES];
    for (s, row) in skip.iter_mut().zip(scratch.counts.chunks_exact(buckets)) {
        *s = row.contains(&(n as u32));
    }
    // Every row's counts become its digits' starts, all rows in one loop: their running sums are
    // independent chains, which the CPU runs side by side (row after row, each would wait on its own).
    let start = |c: &mut u32, next: &mut u32| {
        let k = *c;
        *c = *next;
        *next += k;
    };
    let counts = scratch.counts.as_mut_slice();
    match passes {
        1 => {
            let mut a = 0;
            counts.iter_mut().for_each(|c| start(c, &mut a));
        }
        2 => {
            let (ra, rb) = counts.split_at_mut(buckets);
            let (mut a, mut b) = (0, 0);
            for (x, y) in ra.iter_mut().zip(rb) {
                start(x, &mut a);
                start(y, &mut b);
            }
        }
        _ => {
            let (ra, rest) = counts.split_at_mut(buckets);
            let (rb, rc) = rest.split_at_mut(buckets);
            let (mut a, mut b, mut c) = (0, 0, 0);
            for ((x, y), z) in ra.iter_mut().zip(rb.iter_mut()).zip(rc) {
                start(x, &mut a);
                start(y, &mut b);
                start(z, &mut c);
            }
        }
    }
    let mut in_v = true;
    for (pass, row) in scratch.counts.chunks_exact_mut(buckets).enumerate() {
        if skip.get(pass).copied().unwrap_or(true) {
            continue;
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
    fn sorts_like_the_standard_sort_at_every_length_spread_clustering_and_slot_size() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        };
        let mut tmp = super::Scratch::default();
        for len in [0, 1, 2, 64, 65, 66, 200, 1000, 4096] {
            for bits in [0u32, 1, 7, 8, 9, 18, 24, 31, 32] {
                let mask = if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 };
                // Uniform; and half clustered on a few values, half spread (large buckets).
                let uniform: Vec<u32> = (0..len).map(|_| rand() & mask).collect();
                let clustered: Vec<u32> =
                    (0..len).map(|i| if i % 2 == 0 { rand() & mask } else { (rand() % 5) & mask }).collect();
                // The slot as large as the offsets need, larger, and too small for some of them.
                let fits = 1u64 << bits;
                for pages in [fits, fits << 6, (fits / 3).max(1)] {
                    for mut v in [uniform.clone(), clustered.clone()] {
                        let mut want = v.clone();
                        want.sort_unstable();
                        sort(&mut v, pages, &mut tmp);
                        assert_eq!(v, want, "len {len}, {bits} bits, {pages} pages");
                        sort(&mut v, pages, &mut tmp);
                        assert_eq!(v, want, "len {len}, {bits} bits, {pages} pages, sorted input");
                    }
                }
            }
        }
        // Descending with repeats, and the extremes of u32.
        let mut v: Vec<u32> =
            (0..500u32).rev().map(|i| (i % 37) << 8).chain([u32::MAX, 0, u32::MAX]).collect();
        let mut want = v.clone();
        want.sort_unstable();
        sort(&mut v, 1 << 31, &mut tmp);
        assert_eq!(v, want);
    }
}
