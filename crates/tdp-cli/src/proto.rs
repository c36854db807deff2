//! The migration wire protocol, version 2: how a `tdp migrate` source and a `tdp receive` destination
//! talk over one TCP connection.
//!
//! # Framing
//! Every message is a frame: a little-endian `u32` length `L` (the bytes that follow, 1 to
//! [`MAX_FRAME`]), a one-byte type, then `L - 1` bytes of payload whose layout the type fixes. All
//! integers are little-endian. A reader checks `L` against [`MAX_FRAME`] *before* it allocates, and
//! checks every payload's exact length, so a peer sending garbage gets a [`ProtoError`], never a panic,
//! a hang on an absurd length, or an allocation it chose.
//!
//! # Messages
//! | type | name | direction | payload |
//! |---|---|---|---|
//! | 1 | `Hello` | source → dest | magic `b"TDPM"`, `u16` version, `u32` page size, `u64` session, `u8` resume (0/1), `u16` slot count (1..=[`MAX_SLOTS`]), then per slot `u32` slot, `u64` guest-physical address, `u64` pages |
//! | 2 | `Welcome` | dest → source | `u16` version, `u8` resumed (0/1), `u64` pages received so far |
//! | 3 | `Pages` | source → dest | `u32` slot, `u64` first page in the slot, `u32` count (1..=[`MAX_RUN`]), `count × page size` bytes |
//! | 4 | `RoundEnd` | source → dest | `u32` round, `u64` pages sent in the round |
//! | 5 | `RoundAck` | dest → source | `u32` round, `u64` pages received so far |
//! | 6 | `DigestRequest` | source → dest | (empty) |
//! | 7 | `Digest` | dest → source | 32-byte BLAKE3 digest of all guest memory ([`MemoryDigest`]), `u64` pages received |
//! | 8 | `Error` | either | `u16` code, UTF-8 message (at most [`MAX_ERROR_TEXT`] bytes) |
//! | 9 | `Done` | source → dest | `u8` 1 if the digests matched, else 0 |
//!
//! A session is `Hello`/`Welcome`, then rounds of `Pages` frames each closed by `RoundEnd` (which the
//! destination acknowledges, so the source measures the link end to end and learns at once when the
//! destination is gone), then `DigestRequest`/`Digest` after the final (stop-and-copy) round, then
//! `Done`. `Pages` carries a run of consecutive pages of one memslot, so sequential dirtying costs one
//! header per [`MAX_RUN`] pages. A version mismatch is answered with `Error` and the connection is
//! closed: the decoder reads a `Hello`'s magic and version before anything else and reports another
//! version as [`ProtoError::Version`], whatever layout that version's `Hello` has.
//!
//! # Guest memory: every memslot
//! A guest's memory is several memslots (the KVM guest's code slot, with its page tables, GDT, program
//! and control page, and its data slot). `Hello` announces each one as a [`SlotInfo`]: the slot as KVM
//! numbers it (`address space << 16 | slot id`), where it lies in guest-physical memory and how many
//! pages it has. The table is valid when [`validate_slots`] accepts it: 1 to [`MAX_SLOTS`] slots in
//! ascending slot order, each of at least one page-aligned page, none overlapping another of its address
//! space, none past the end of the address space. Each `Pages` frame names its slot and an offset in
//! it; the destination refuses a slot it was not told of or a run past its slot's end. The digest
//! ([`MemoryDigest`]) covers every slot, each preceded by its [`SlotInfo`] so that a page applied to the
//! wrong slot cannot go unnoticed.
//!
//! Version 1 (before the slot table) carried one flat memory: its `Hello` had a `u64` page count where
//! the slot table now is, and its `Pages` no slot.
//!
//! # Resuming
//! A connection that breaks mid-migration does not end the session: the destination keeps the memory
//! it holds and accepts a new connection. A source that reconnects sends `Hello` with the same
//! `session` number, the same slot table and `resume = 1`; if the destination still holds that session
//! it answers `Welcome` with `resumed = 1` and the source sends only what it still owes (its pending
//! pages, including every page of the round that failed); otherwise `resumed = 0` and the source sends
//! everything again.
//!
//! Keeps: I5 for the network peer (bounded frames, exact lengths, slot tables validated, page runs
//! checked against the slots announced in `Hello`).

use std::io::{self, Read, Write};

/// The protocol version this build speaks.
pub const VERSION: u16 = 2;
/// The magic at the start of `Hello`.
pub const MAGIC: [u8; 4] = *b"TDPM";
/// The page size carried in `Hello`; the only one supported.
pub const PAGE_SIZE: usize = 4096;
/// The most pages one `Pages` frame carries.
pub const MAX_RUN: u32 = 64;
/// The longest `Error` text.
pub const MAX_ERROR_TEXT: usize = 1024;
/// The most memslots one `Hello` announces. KVM allows 32764 per address space, but VMMs use a few
/// (QEMU's vhost backends cap a guest at 509); 1024 keeps the largest `Hello` at 20 KiB.
pub const MAX_SLOTS: usize = 1024;
/// The largest frame (type byte plus payload): one full `Pages` run.
pub const MAX_FRAME: u32 = 1 + PAGES_HEADER as u32 + MAX_RUN * PAGE_SIZE as u32;
/// Bytes of a `Pages` payload before the pages: slot, first page, count.
const PAGES_HEADER: usize = 4 + 8 + 4;
/// Bytes of one slot in the `Hello` table.
const SLOT_BYTES: usize = 4 + 8 + 8;

/// One memslot of the guest, as `Hello` announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SlotInfo {
    /// The slot as KVM numbers it: address space in the upper 16 bits, slot id in the lower 16.
    pub slot: u32,
    /// Guest-physical address of its first page.
    pub gpa: u64,
    /// Its size in pages.
    pub pages: u64,
}

impl SlotInfo {
    /// A slot `slot` of `pages` pages at guest-physical `gpa`.
    #[must_use]
    pub const fn new(slot: u32, gpa: u64, pages: u64) -> SlotInfo {
        SlotInfo { slot, gpa, pages }
    }

    /// The address space (the upper 16 bits of `slot`).
    #[must_use]
    pub const fn as_id(&self) -> u16 {
        (self.slot >> 16) as u16
    }

    /// The guest-physical address just past the slot, if it does not overflow.
    #[must_use]
    pub fn end(&self) -> Option<u64> {
        self.pages.checked_mul(PAGE_SIZE as u64).and_then(|b| b.checked_add(self.gpa))
    }
}

impl std::fmt::Display for SlotInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {} ({} pages at {:#x}", self.slot & 0xffff, self.pages, self.gpa)?;
        if self.as_id() != 0 {
            write!(f, ", address space {}", self.as_id())?;
        }
        f.write_str(")")
    }
}

/// Why a slot table is refused (the message names the slot and the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SlotTableError(pub String);

/// Checks a slot table as `Hello` must carry it: 1 to [`MAX_SLOTS`] slots, slot numbers strictly
/// ascending, every slot at least one page at a page-aligned address, ending inside the 64-bit address
/// space, and no two slots of one address space overlapping. Returns the total pages.
///
/// ```
/// use tdp_cli::proto::{SlotInfo, validate_slots};
/// let code = SlotInfo::new(0, 0, 12);
/// let data = SlotInfo::new(1, 1 << 32, 256);
/// assert_eq!(validate_slots(&[code, data]), Ok(268));
/// assert!(validate_slots(&[data, code]).is_err(), "not in slot order");
/// assert!(validate_slots(&[code, SlotInfo::new(1, 4096, 1)]).is_err(), "overlaps the code slot");
/// assert!(validate_slots(&[]).is_err());
/// ```
///
/// # Errors
/// [`SlotTableError`] naming the first rule broken.
pub fn validate_slots(slots: &[SlotInfo]) -> Result<u64, SlotTableError> {
    let bad = |s: String| Err(SlotTableError(s));
    if slots.is_empty() || slots.len() > MAX_SLOTS {
        return bad(format!("{} memslots announced (1 to {MAX_SLOTS} are allowed)", slots.len()));
    }
    let mut total = 0u64;
    for (i, s) in slots.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).and_then(|p| slots.get(p))
            && prev.slot >= s.slot
        {
            return bad(format!(
                "memslot {} follows memslot {}: slots must be in ascending order",
                s.slot, prev.slot
            ));
        }
        if s.pages == 0 {
            return bad(format!("memslot {} has no pages", s.slot));
        }
        if !s.gpa.is_multiple_of(PAGE_SIZE as u64) {
            return bad(format!("memslot {} starts at {:#x}, not on a page boundary", s.slot, s.gpa));
        }
        if s.end().is_none() {
            return bad(format!(
                "memslot {} ({} pages at {:#x}) runs past the address space",
                s.slot, s.pages, s.gpa
            ));
        }
        total = match total.checked_add(s.pages) {
            Some(t) => t,
            None => return bad("the memslots' pages add up past 2^64".into()),
        };
    }
    let mut by_gpa: Vec<&SlotInfo> = slots.iter().collect();
    by_gpa.sort_by_key(|s| (s.as_id(), s.gpa));
    for pair in by_gpa.windows(2) {
        if let [a, b] = pair
            && a.as_id() == b.as_id()
            && a.end().is_some_and(|end| end > b.gpa)
        {
            return bad(format!("memslots {} and {} overlap in guest-physical memory", a.slot, b.slot));
        }
    }
    Ok(total)
}

/// The BLAKE3 digest of a guest's memory as the protocol defines it: for each slot of the `Hello`
/// table, in its order, the slot's [`SlotInfo`] (`u32` slot, `u64` address, `u64` pages, little-endian)
/// and then its pages in order. Source and destination compute it the same way.
///
/// ```
/// use tdp_cli::proto::{MemoryDigest, SlotInfo, PAGE_SIZE};
/// let mut d = MemoryDigest::new();
/// d.slot(&SlotInfo::new(0, 0, 1));
/// d.pages(&[0u8; PAGE_SIZE]);
/// let mut e = MemoryDigest::new();
/// e.slot(&SlotInfo::new(1, 0, 1)); // the same bytes under another slot number
/// e.pages(&[0u8; PAGE_SIZE]);
/// assert_ne!(d.finish(), e.finish());
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryDigest(blake3::Hasher);

impl MemoryDigest {
    /// An empty digest.
    #[must_use]
    pub fn new() -> MemoryDigest {
        MemoryDigest(blake3::Hasher::new())
    }
    /// Starts slot `s` (its pages follow).
    pub fn slot(&mut self, s: &SlotInfo) {
        self.0.update(&s.slot.to_le_bytes());
        self.0.update(&s.gpa.to_le_bytes());
        self.0.update(&s.pages.to_le_bytes());
    }
    /// Adds page contents.
    pub fn pages(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The digest.
    #[must_use]
    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The source opens a session for the guest memory in `slots`, pages of `page_size` bytes.
    Hello {
        /// The sender's protocol version ([`VERSION`]; the decoder refuses any other).
        version: u16,
        /// Bytes per page (4096).
        page_size: u32,
        /// The migration's session number (random, the same across reconnections).
        session: u64,
        /// Whether the source asks to continue `session` where it broke off.
        resume: bool,
        /// The guest's memslots (checked by [`validate_slots`] at the destination, not by the decoder).
        slots: Vec<SlotInfo>,
    },
    /// The destination accepts the session.
    Welcome {
        /// The destination's protocol version.
        version: u16,
        /// Whether the destination continues the session it holds (`resume` was asked and it matches).
        resumed: bool,
        /// Pages applied in the session so far (0 for a new one).
        received: u64,
    },
    /// A run of consecutive pages of memslot `slot`, `data.len() / PAGE_SIZE` of them from `first`.
    Pages {
        /// The memslot, as in the `Hello` table.
        slot: u32,
        /// Index of the first page within the slot.
        first: u64,
        /// The pages' contents.
        data: Vec<u8>,
    },
    /// The source finished round `round`, in which it sent `pages` pages.
    RoundEnd {
        /// The round number (0 is the bulk copy).
        round: u32,
        /// Pages sent in that round.
        pages: u64,
    },
    /// The destination applied every page up to the end of `round`.
    RoundAck {
        /// The round acknowledged.
        round: u32,
        /// Pages applied since the session began (repeats included).
        received: u64,
    },
    /// The source asks for the digest of the destination's memory.
    DigestRequest,
    /// The destination's digest of all its memory, every slot ([`MemoryDigest`]).
    Digest {
        /// The digest.
        hash: [u8; 32],
        /// Pages applied since the session began.
        received: u64,
    },
    /// A fatal error, with a code and a human message.
    Error {
        /// [`ErrorCode`] as a number.
        code: u16,
        /// What went wrong.
        text: String,
    },
    /// The session is over; `matched` tells the destination whether the digests agreed.
    Done {
        /// The source's verdict.
        matched: bool,
    },
}

/// `Error` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer speaks another version.
    Version = 1,
    /// The peer sent something the protocol does not allow here.
    Protocol = 2,
    /// The destination cannot hold the memory announced.
    TooLarge = 3,
    /// Anything else.
    Other = 4,
}

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The connection failed or closed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame length outside `1..=MAX_FRAME`.
    #[error("bad frame length {len} (allowed 1 to {MAX_FRAME})")]
    FrameLength {
        /// The length read.
        len: u32,
    },
    /// An unknown message type.
    #[error("unknown message type {kind}")]
    UnknownType {
        /// The type byte.
        kind: u8,
    },
    /// A payload whose length does not fit its type.
    #[error("message type {kind}: payload of {len} bytes is malformed")]
    BadPayload {
        /// The type byte.
        kind: u8,
        /// The payload length.
        len: usize,
    },
    /// A `Hello` of another protocol version (its payload is not decoded further: its layout is that
    /// version's).
    #[error("the peer speaks protocol version {version}, this build version {VERSION}")]
    Version {
        /// The version the peer sent.
        version: u16,
    },
    /// A `Hello` without the magic.
    #[error("not a tdp migration stream (bad magic {magic:02x?})")]
    BadMagic {
        /// The bytes found.
        magic: [u8; 4],
    },
}

impl ProtoError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> ProtoError {
        move |source| ProtoError::Io { op, source }
    }
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::Pages { .. } => 3,
            Message::RoundEnd { .. } => 4,
            Message::RoundAck { .. } => 5,
            Message::DigestRequest => 6,
            Message::Digest { .. } => 7,
            Message::Error { .. } => 8,
            Message::Done { .. } => 9,
        }
    }

    /// Encodes the message as one frame into `out` (cleared first).
    ///
    /// ```
    /// use tdp_cli::proto::Message;
    /// let mut buf = Vec::new();
    /// Message::RoundEnd { round: 3, pages: 10 }.encode(&mut buf);
    /// assert_eq!(Message::read_from(&mut buf.as_slice())?, Message::RoundEnd { round: 3, pages: 10 });
    /// # Ok::<(), tdp_cli::proto::ProtoError>(())
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&[0; 4]);
        out.push(self.kind());
        match self {
            Message::Hello { version, page_size, session, resume, slots } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&page_size.to_le_bytes());
                out.extend_from_slice(&session.to_le_bytes());
                out.push(u8::from(*resume));
                // A table longer than the protocol allows is cut at MAX_SLOTS (the destination then
                // refuses the memory it does not cover); the count always matches what follows.
                let slots = &slots[..slots.len().min(MAX_SLOTS)];
                out.extend_from_slice(&(slots.len() as u16).to_le_bytes());
                for s in slots {
                    out.extend_from_slice(&s.slot.to_le_bytes());
                    out.extend_from_slice(&s.gpa.to_le_bytes());
                    out.extend_from_slice(&s.pages.to_le_bytes());
                }
            }
            Message::Welcome { version, resumed, received } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.push(u8::from(*resumed));
                out.extend_from_slice(&received.to_le_bytes());
            }
            Message::Pages { slot, first, data } => return encode_pages(*slot, *first, data, out),
            Message::RoundEnd { round, pages } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Message::RoundAck { round, received } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&received.to_le_bytes());
            }
            Message::DigestRequest => {}
            Message::Digest { hash, received } => {
                out.extend_from_slice(hash);
                out.extend_from_slice(&received.to_le_bytes());
            }
            Message::Error { code, text } => {
                out.extend_from_slice(&code.to_le_bytes());
                let mut end = text.len().min(MAX_ERROR_TEXT);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&text.as_bytes()[..end]);
            }
            Message::Done { matched } => out.push(u8::from(*matched)),
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
    }

    /// Writes the message as one frame.
    ///
    /// # Errors
    /// [`ProtoError::Io`] naming the message.
    pub fn write_to(&self, w: &mut impl Write, scratch: &mut Vec<u8>) -> Result<(), ProtoError> {
        self.encode(scratch);
        w.write_all(scratch).map_err(ProtoError::io("sending a frame"))
    }

    /// Reads one frame and decodes it, allocating at most [`MAX_FRAME`] bytes.
    ///
    /// # Errors
    /// [`ProtoError::Closed`] at a clean end of stream, [`ProtoError::Io`] on a failed read (a cut-off
    /// frame included), and the decoding errors for a malformed frame.
    pub fn read_from(r: &mut impl Read) -> Result<Message, ProtoError> {
        let mut len = [0u8; 4];
        loop {
            match r.read(&mut len[..1]) {
                Ok(0) => return Err(ProtoError::Closed),
                Ok(_) => break,
                // A signal (a stop and continue, say) interrupted the wait: nothing was read, wait again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtoError::Io { op: "reading a frame", source: e }),
            }
        }
        r.read_exact(&mut len[1..]).map_err(ProtoError::io("reading a frame length"))?;
        let len = u32::from_le_bytes(len);
        if len == 0 || len > MAX_FRAME {
            return Err(ProtoError::FrameLength { len });
        }
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).map_err(ProtoError::io("reading a frame body"))?;
        Message::decode(body[0], &body[1..])
    }

    /// Decodes the payload `p` of a frame of type `kind`.
    ///
    /// # Errors
    /// [`ProtoError::UnknownType`], [`ProtoError::BadPayload`] or [`ProtoError::BadMagic`].
    pub fn decode(kind: u8, p: &[u8]) -> Result<Message, ProtoError> {
        let bad = || ProtoError::BadPayload { kind, len: p.len() };
        let mut c = Cursor(p);
        let msg = match kind {
            1 => {
                let magic: [u8; 4] = c.array().ok_or_else(bad)?;
                if magic != MAGIC {
                    return Err(ProtoError::BadMagic { magic });
                }
                let version = c.u16().ok_or_else(bad)?;
                if version != VERSION {
                    return Err(ProtoError::Version { version });
                }
                let page_size = c.u32().ok_or_else(bad)?;
                let session = c.u64().ok_or_else(bad)?;
                let resume = c.flag().ok_or_else(bad)?;
                let count = usize::from(c.u16().ok_or_else(bad)?);
                // The count is checked against the bytes that follow before anything is allocated.
                if count > MAX_SLOTS || c.0.len() != count * SLOT_BYTES {
                    return Err(bad());
                }
                let mut slots = Vec::with_capacity(count);
                for _ in 0..count {
                    let slot = c.u32().ok_or_else(bad)?;
                    let gpa = c.u64().ok_or_else(bad)?;
                    let pages = c.u64().ok_or_else(bad)?;
                    slots.push(SlotInfo { slot, gpa, pages });
                }
                Message::Hello { version, page_size, session, resume, slots }
            }
            2 => Message::Welcome {
                version: c.u16().ok_or_else(bad)?,
                resumed: c.flag().ok_or_else(bad)?,
                received: c.u64().ok_or_else(bad)?,
            },
            3 => {
                let slot = c.u32().ok_or_else(bad)?;
                let first = c.u64().ok_or_else(bad)?;
                let count = c.u32().ok_or_else(bad)?;
                if count == 0 || count > MAX_RUN || c.0.len() != count as usize * PAGE_SIZE {
                    return Err(bad());
                }
                let data = std::mem::take(&mut c.0).to_vec();
                Message::Pages { slot, first, data }
            }
            4 => Message::RoundEnd { round: c.u32().ok_or_else(bad)?, pages: c.u64().ok_or_else(bad)? },
            5 => Message::RoundAck { round: c.u32().ok_or_else(bad)?, received: c.u64().ok_or_else(bad)? },
            6 => Message::DigestRequest,
            7 => Message::Digest { hash: c.array().ok_or_else(bad)?, received: c.u64().ok_or_else(bad)? },
            8 => {
                let code = c.u16().ok_or_else(bad)?;
                if c.0.len() > MAX_ERROR_TEXT {
                    return Err(bad());
                }
                let mut text = String::from_utf8_lossy(std::mem::take(&mut c.0)).into_owned();
                // Invalid bytes grow into U+FFFD (3 bytes each): cut back to the limit, so that the
                // message decoded is one `encode` writes unchanged (found by the proto_decode fuzz target).
                let mut end = text.len().min(MAX_ERROR_TEXT);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                Message::Error { code, text }
            }
            9 => Message::Done { matched: c.flag().ok_or_else(bad)? },
            _ => return Err(ProtoError::UnknownType { kind }),
        };
        if c.0.is_empty() { Ok(msg) } else { Err(bad()) }
    }

    /// A short name for messages about unexpected frames.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Pages { .. } => "Pages",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundAck { .. } => "RoundAck",
            Message::DigestRequest => "DigestRequest",
            Message::Digest { .. } => "Digest",
            Message::Error { .. } => "Error",
            Message::Done { .. } => "Done",
        }
    }
}

/// Encodes a `Pages` frame for the pages of memslot `slot` from `first` held in `data` into `out`
/// (cleared first), without building a [`Message`]. `data` should hold 1 to [`MAX_RUN`] whole pages; a
/// reader rejects anything else.
pub fn encode_pages(slot: u32, first: u64, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let len = (1 + PAGES_HEADER + data.len()) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.push(3);
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&((data.len() / PAGE_SIZE) as u32).to_le_bytes());
    out.extend_from_slice(data);
}

/// A little-endian reader over a payload that never panics: each read returns `None` past the end.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    /// A byte that must be 0 or 1.
    fn flag(&mut self) -> Option<bool> {
        match self.array::<1>()? {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests;
