//! The dirty bitmap's errors, each with the values that broke a rule and the errno KVM returns for the
//! same request.
//!
//! Keeps: I5 (errors name the operation and carry the values).

/// Why a bitmap operation was refused. Every refusal leaves the bitmap unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// The bitmap's words could not be allocated.
    #[error("no memory for a dirty bitmap of {pages} pages")]
    NoMemory {
        /// The slot's size in pages.
        pages: u64,
    },
    /// `mark` was given a page outside the slot.
    #[error("mark-dirty: page offset {offset} is outside the slot's {pages} pages")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The slot's size in pages.
        pages: u64,
    },
    /// The output buffer of a get is smaller than the slot's bitmap (KVM: `-EFAULT`).
    #[error("get-dirty-log: the output buffer has {have} words, the slot's bitmap needs {need}")]
    ShortBuffer {
        /// Words the caller gave.
        have: usize,
        /// Words the slot's bitmap has.
        need: u64,
    },
    /// `first_page` is not a multiple of 64 (KVM: `-EINVAL`).
    #[error("clear-dirty-log: first_page {first_page} is not a multiple of 64")]
    Misaligned {
        /// The bad first page.
        first_page: u64,
    },
    /// The range does not lie inside the slot (KVM: `-EINVAL`).
    #[error(
        "clear-dirty-log: pages {first_page}..{first_page}+{num_pages} are not inside the slot's {pages}"
    )]
    OutOfRange {
        /// The first page asked for.
        first_page: u64,
        /// The length asked for.
        num_pages: u32,
        /// The slot's size in pages.
        pages: u64,
    },
    /// `num_pages` is not a multiple of 64 and the range does not end at the slot's end (KVM: `-EINVAL`).
    #[error(
        "clear-dirty-log: num_pages {num_pages} is not a multiple of 64 and {first_page}+{num_pages} is not \
         the slot's end {pages}"
    )]
    BadLength {
        /// The first page asked for.
        first_page: u64,
        /// The bad length.
        num_pages: u32,
        /// The slot's size in pages.
        pages: u64,
    },
    /// The caller's mask has fewer words than `num_pages` needs (KVM: `-EFAULT`).
    #[error("clear-dirty-log: the mask has {have} words, {need} are needed")]
    ShortMask {
        /// Words the caller gave.
        have: usize,
        /// Words `num_pages` needs: `ceil(num_pages / 64)`.
        need: u64,
    },
    /// The VM tracks dirty pages with the dirty ring, which excludes the bitmap (KVM: `-ENXIO`).
    #[error("dirty-log: the vm tracks dirty pages with the dirty ring, not the bitmap")]
    NotInBitmapMode,
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` with bits KVM refuses (KVM: `-EINVAL`).
    #[error("enable-manual-dirty-log-protect: argument {args:#x} is invalid")]
    BadCapArgs {
        /// The argument (`args[0]`).
        args: u64,
    },
}

impl BitmapError {
    /// The positive errno KVM returns for the same request (`EINVAL`, `EFAULT`, `ENXIO`, `ENOMEM`).
    ///
    /// ```
    /// use tdp_core::dirty_bitmap::BitmapError;
    /// assert_eq!(BitmapError::Misaligned { first_page: 3 }.kvm_errno(), 22);
    /// assert_eq!(BitmapError::NotInBitmapMode.kvm_errno(), 6);
    /// ```
    #[must_use]
    pub const fn kvm_errno(&self) -> i32 {
        const ENXIO: i32 = 6;
        const ENOMEM: i32 = 12;
        const EFAULT: i32 = 14;
        const EINVAL: i32 = 22;
        match self {
            BitmapError::NoMemory { .. } => ENOMEM,
            BitmapError::ShortBuffer { .. } | BitmapError::ShortMask { .. } => EFAULT,
            BitmapError::NotInBitmapMode => ENXIO,
            BitmapError::OffsetOutOfRange { .. }
            | BitmapError::Misaligned { .. }
            | BitmapError::OutOfRange { .. }
            | BitmapError::BadLength { .. }
            | BitmapError::BadCapArgs { .. } => EINVAL,
        }
    }
}
