//! Receiver tests over scripted streams: a session applies pages to the memslots they name and digests
//! every slot; bad sessions (a slot not announced, a run past its slot) are refused with an `Error`
//! frame; a lost connection keeps the session for a resumption. (The server
//! around `serve`, which keeps serving after a refused connection, is tested in another process by
//! `tests/receiver_server.rs`.)

use super::*;

const CFG: ReceiverConfig =
    ReceiverConfig { idle_timeout: Duration::from_secs(5), ..ReceiverConfig::new(1 << 20) };

/// A duplex stand-in: reads a scripted input, collects what the receiver writes.
struct Script {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}
impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}
impl crate::deadline::Timeouts for Script {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}
impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = Vec::new();
    for m in msgs {
        m.encode(&mut buf);
        all.extend_from_slice(&buf);
    }
    all
}

fn run(msgs: &[Message]) -> (Result<Received, ReceiveError>, Vec<Message>) {
    run_in(msgs, &mut None)
}

fn run_in(msgs: &[Message], session: &mut Option<Session>) -> (Result<Received, ReceiveError>, Vec<Message>) {
    let mut s = Script { input: std::io::Cursor::new(frames(msgs)), output: Vec::new() };
    let r = serve(&mut s, "test".into(), CFG, session);
    let mut replies = Vec::new();
    let mut out = s.output.as_slice();
    while let Ok(m) = Message::read_from(&mut out) {
        replies.push(m);
    }
    (r, replies)
}

/// The code slot: one page at 0.
const CODE: u32 = 0;
/// The data slot, at 4 GiB, of the size the test asks for.
const DATA: u32 = 1;

fn layout(pages: u64) -> Vec<SlotInfo> {
    vec![SlotInfo::new(CODE, 0, 1), SlotInfo::new(DATA, 1 << 32, pages)]
}

fn hello(pages: u64) -> Message {
    let slots = layout(pages);
    Message::Hello { version: VERSION, page_size: PAGE_SIZE as u32, session: 5, resume: false, slots }
}

fn resume(pages: u64, session: u64) -> Message {
    let slots = layout(pages);
    Message::Hello { version: VERSION, page_size: PAGE_SIZE as u32, session, resume: true, slots }
}

fn data(first: u64, bytes: Vec<u8>) -> Message {
    Message::Pages { slot: DATA, first, data: bytes }
}

/// The protocol's digest of a code page `code` and the data slot `data` (one slot after the other).
fn digest_of(code: &[u8], data: &[u8]) -> String {
    let mut d = MemoryDigest::new();
    let slots = layout((data.len() / PAGE_SIZE) as u64);
    d.slot(&slots[0]);
    d.pages(code);
    d.slot(&slots[1]);
    d.pages(data);
    hex(&d.finish())
}

#[test]
fn a_session_applies_pages_and_digests_them() {
    let bytes = vec![7u8; 2 * PAGE_SIZE];
    let code = vec![9u8; PAGE_SIZE];
    let (r, replies) = run(&[
        hello(4),
        data(1, bytes.clone()),
        Message::Pages { slot: CODE, first: 0, data: code.clone() },
        Message::RoundEnd { round: 0, pages: 3 },
        Message::DigestRequest,
        Message::Done { matched: true },
    ]);
    let r = r.expect("the session succeeds");
    let mut want = vec![0u8; 4 * PAGE_SIZE];
    want[PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&bytes);
    assert_eq!(r.digest, digest_of(&code, &want), "the digest covers both slots");
    assert_eq!((r.pages, r.rounds, r.pages_received), (5, 1, 3));
    assert!(matches!(replies[1], Message::RoundAck { round: 0, received: 3 }));
    // Each slot's own digest is reported too.
    let mut one = MemoryDigest::new();
    one.slot(&layout(4)[0]);
    one.pages(&code);
    assert_eq!(r.slots.len(), 2);
    assert_eq!((r.slots[0].info, r.slots[0].digest.as_str()), (layout(4)[0], hex(&one.finish()).as_str()));
}

#[test]
fn i5_a_page_of_a_slot_not_announced_or_past_its_slot_is_refused() {
    let page = vec![1u8; PAGE_SIZE];
    for (m, want) in [
        (Message::Pages { slot: 2, first: 0, data: page.clone() }, "memslot 2 was not announced"),
        (Message::Pages { slot: 1 << 16 | DATA, first: 0, data: page.clone() }, "not announced"),
        (Message::Pages { slot: CODE, first: 1, data: page.clone() }, "outside memslot 0's 1 pages"),
        (Message::Pages { slot: CODE, first: 0, data: [page.clone(), page.clone()].concat() }, "outside"),
        (data(3, [page.clone(), page.clone()].concat()), "outside memslot 1's 4 pages"),
    ] {
        let (r, replies) = run(&[hello(4), m]);
        let err = r.expect_err("refused").to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(replies.iter().any(|m| matches!(m, Message::Error { code: 2, .. })), "{replies:?}");
    }
}

#[test]
fn i5_an_invalid_slot_table_is_refused_with_the_rule() {
    let table = |slots: Vec<SlotInfo>| Message::Hello {
        version: VERSION,
        page_size: PAGE_SIZE as u32,
        session: 1,
        resume: false,
        slots,
    };
    for (slots, want) in [
        (vec![], "1 to 1024 are allowed"),
        (vec![SlotInfo::new(1, 0, 1), SlotInfo::new(0, 1 << 20, 1)], "ascending"),
        (vec![SlotInfo::new(0, 0, 4), SlotInfo::new(1, 8192, 1)], "overlap"),
        (vec![SlotInfo::new(0, 0, 0)], "no pages"),
    ] {
        let (r, replies) = run(&[table(slots)]);
        let err = r.expect_err("refused").to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(replies.iter().any(|m| matches!(m, Message::Error { code: 2, .. })), "{replies:?}");
    }
}

#[test]
fn bad_sessions_are_refused_with_an_error_frame() {
    let too_big = hello((1 << 20) / PAGE_SIZE as u64 + 1);
    let outside = data(3, vec![0; 2 * PAGE_SIZE]);
    for (msgs, want) in [
        (vec![too_big], "limit"),
        (vec![Message::DigestRequest], "expected Hello"),
        (vec![hello(4), outside], "outside"),
        (vec![hello(4), Message::Done { matched: true }], "Done before"),
        (vec![hello(4), Message::Welcome { version: 1, resumed: false, received: 0 }], "unexpected Welcome"),
    ] {
        let (r, replies) = run(&msgs);
        let err = r.expect_err("refused").to_string();
        assert!(err.contains(want), "{err}");
        assert!(
            replies.iter().any(|m| matches!(m, Message::Error { .. })),
            "{want}: an Error frame was sent"
        );
    }
    // Another protocol version (version 1's Hello, without the slot table): a Version error frame.
    let mut s = Script { input: std::io::Cursor::new(old_hello(5, false)), output: Vec::new() };
    let err = serve(&mut s, "test".into(), CFG, &mut None).expect_err("refused").to_string();
    assert!(err.contains("protocol version 1, this destination 2"), "{err}");
    let mut out = s.output.as_slice();
    assert!(matches!(Message::read_from(&mut out), Ok(Message::Error { code: 1, .. })));
}

/// A version-1 `Hello` frame (magic, version 1, page size, `u64` pages, session, resume).
fn old_hello(session: u64, resume: bool) -> Vec<u8> {
    let payload = [
        &b"TDPM"[..],
        &1u16.to_le_bytes(),
        &4096u32.to_le_bytes(),
        &4u64.to_le_bytes(),
        &session.to_le_bytes(),
        &[u8::from(resume)],
    ]
    .concat();
    [&(payload.len() as u32 + 1).to_le_bytes()[..], &[1], &payload].concat()
}

#[test]
fn a_source_that_vanishes_is_a_clear_error() {
    let (r, _) = run(&[hello(4), data(0, vec![1; PAGE_SIZE])]);
    let err = r.expect_err("cut off").to_string();
    assert!(err.contains("closed the connection before the migration finished"), "{err}");
}

#[test]
fn a_lost_connection_keeps_the_session_for_its_resumption() {
    let mut session = None;
    let (r, _) = run_in(&[hello(4), data(0, vec![1; PAGE_SIZE])], &mut session);
    assert!(r.expect_err("cut off").resumable, "a lost connection is resumable");
    // The same session resumes: the page applied before the break is still there.
    let (r, replies) = run_in(
        &[
            resume(4, 5),
            data(1, vec![2; PAGE_SIZE]),
            Message::RoundEnd { round: 0, pages: 1 },
            Message::DigestRequest,
            Message::Done { matched: true },
        ],
        &mut session,
    );
    assert!(matches!(replies[0], Message::Welcome { resumed: true, received: 1, .. }), "{replies:?}");
    let mut want = vec![0u8; 4 * PAGE_SIZE];
    want[..PAGE_SIZE].fill(1);
    want[PAGE_SIZE..2 * PAGE_SIZE].fill(2);
    let code = vec![0u8; PAGE_SIZE];
    assert_eq!(r.expect("resumed session finishes").digest, digest_of(&code, &want));

    // Another session number, or no resume asked: a fresh session, old memory gone.
    let mut session = None;
    let _ = run_in(&[hello(4), data(0, vec![1; PAGE_SIZE])], &mut session);
    let (_, replies) = run_in(&[resume(4, 6)], &mut session);
    assert!(matches!(replies[0], Message::Welcome { resumed: false, received: 0, .. }), "{replies:?}");
    // The same session number with another slot table: a fresh session too.
    let mut session = None;
    let _ = run_in(&[hello(4), data(0, vec![1; PAGE_SIZE])], &mut session);
    let (_, replies) = run_in(&[resume(5, 5)], &mut session);
    assert!(matches!(replies[0], Message::Welcome { resumed: false, received: 0, .. }), "{replies:?}");
}

#[test]
fn i5_a_stray_connection_does_not_end_a_held_session() {
    let mut session = None;
    let _ = run_in(&[hello(4), data(2, vec![3; PAGE_SIZE])], &mut session);
    // Garbage, then a Hello of another protocol version: refused, but the session is kept.
    let mut garbage = Script { input: std::io::Cursor::new(vec![0xff; 16]), output: Vec::new() };
    let e = serve(&mut garbage, "stray".into(), CFG, &mut session).expect_err("garbage is refused");
    assert!(e.resumable, "{e}");
    let mut old = Script { input: std::io::Cursor::new(old_hello(5, true)), output: Vec::new() };
    let e = serve(&mut old, "old".into(), CFG, &mut session).expect_err("old version refused");
    assert!(e.resumable, "{e}");
    let (_, replies) = run_in(&[resume(4, 5)], &mut session);
    assert!(matches!(replies[0], Message::Welcome { resumed: true, received: 1, .. }), "{replies:?}");
}

#[test]
fn i5_garbage_is_refused_and_creates_no_session() {
    let mut garbage = Script { input: std::io::Cursor::new(vec![0xff; 16]), output: Vec::new() };
    let mut session = None;
    let e = serve(&mut garbage, "stray".into(), CFG, &mut session).expect_err("garbage is refused");
    assert!(e.to_string().contains("bad frame length"), "{e}");
    assert!(session.is_none());
}

#[test]
fn i5_a_round_number_at_u32_max_is_refused_not_wrapped() {
    let (r, replies) = run(&[hello(4), Message::RoundEnd { round: u32::MAX, pages: 0 }]);
    let err = r.expect_err("refused").to_string();
    assert!(err.contains("round number 4294967295"), "{err}");
    assert!(replies.iter().any(|m| matches!(m, Message::Error { .. })), "{replies:?}");
}

#[test]
fn i5_page_runs_at_the_end_of_u64_are_refused() {
    let page = vec![1u8; PAGE_SIZE];
    for first in [u64::MAX, u64::MAX / PAGE_SIZE as u64, 4] {
        let (r, _) = run(&[hello(4), data(first, page.clone())]);
        assert!(r.expect_err("refused").to_string().contains("outside"), "{first}");
    }
}

#[test]
fn i5_the_source_text_is_escaped() {
    let text = "\x1b]0;pwned\x07\r\nerror: fake line".to_owned();
    let (r, _) = run(&[hello(4), Message::Error { code: 4, text }]);
    let err = r.expect_err("the source aborted").to_string();
    assert!(!err.chars().any(char::is_control), "{err:?}");
    assert!(err.contains("\\u{1b}]0;pwned\\u{7}\\r\\nerror: fake line"), "{err}");
}

#[test]
fn i5_memory_the_host_cannot_give_is_refused_with_the_figure() {
    // Far more than any host has available (1 PiB), below the configured limit.
    let cfg = ReceiverConfig::new(u64::MAX);
    let o = Opening { session: 1, slots: layout(1 << 38), resume: false };
    let CannotHold(why) = Session::open(&o, 0).expect_err("refused");
    assert!(why.contains("MemAvailable"), "{why}");
    let mut s = Script { input: std::io::Cursor::new(frames(&[hello(1 << 38)])), output: Vec::new() };
    let e = serve(&mut s, "test".into(), cfg, &mut None).expect_err("refused");
    assert!(e.to_string().contains("more than this host has available"), "{e}");
    let mut out = s.output.as_slice();
    assert!(matches!(Message::read_from(&mut out), Ok(Message::Error { code: 3, .. })));
}
