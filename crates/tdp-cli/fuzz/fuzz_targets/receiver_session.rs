//! The receiver's session state machine on frames in any order (and raw bytes between them), over two
//! connections that share the session slot, as a source that loses its connection and resumes would:
//! no panic, no unbounded allocation, and a session that completes reports figures within what it
//! announced (I5 for the network peer). `Hello` carries a slot table of 0 to 4 slots (valid or not:
//! ids out of order, overlaps, empty slots), and `Pages` names any slot, announced or not.

#![no_main]

use std::io::{Cursor, Read, Write};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tdp_cli::deadline::Timeouts;
use tdp_cli::proto::{MAX_RUN, Message, PAGE_SIZE, SlotInfo, VERSION};
use tdp_cli::receiver::{ReceiverConfig, serve};

/// The receiver's limit: 64 pages, so that sessions are small and page runs often fall outside.
const MAX_PAGES: u64 = 64;

/// One slot of a `Hello` table: small ids and page-granular addresses, so that valid tables, overlaps
/// and out-of-order ids all come up.
#[derive(Arbitrary, Debug)]
struct Slot {
    slot: u8,
    as_id: bool,
    gpa_pages: u8,
    pages: u8,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Hello { slots: Vec<Slot>, session: u8, resume: bool, version_off: bool },
    Pages { slot: u8, first: u16, count: u8, fill: u8 },
    RoundEnd { round: u32, pages: u64 },
    DigestRequest,
    Done { matched: bool },
    Error { code: u16, text: String },
    Welcome,
    RoundAck { round: u32 },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    first: Vec<Step>,
    second: Vec<Step>,
}

fn bytes(steps: &[Step]) -> Vec<u8> {
    let (mut all, mut buf) = (Vec::new(), Vec::new());
    for s in steps {
        let m = match s {
            Step::Hello { slots, session, resume, version_off } => Message::Hello {
                version: if *version_off { VERSION + 1 } else { VERSION },
                page_size: PAGE_SIZE as u32,
                session: u64::from(*session),
                resume: *resume,
                slots: slots
                    .iter()
                    .take(4)
                    .map(|s| {
                        let id = u32::from(s.slot % 4) | if s.as_id { 1 << 16 } else { 0 };
                        SlotInfo::new(id, u64::from(s.gpa_pages) * PAGE_SIZE as u64, u64::from(s.pages % 40))
                    })
                    .collect(),
            },
            Step::Pages { slot, first, count, fill } => {
                let count = u32::from(*count).clamp(1, MAX_RUN) as usize;
                let slot = u32::from(*slot % 6);
                Message::Pages { slot, first: u64::from(*first), data: vec![*fill; count * PAGE_SIZE] }
            }
            Step::RoundEnd { round, pages } => Message::RoundEnd { round: *round, pages: *pages },
            Step::DigestRequest => Message::DigestRequest,
            Step::Done { matched } => Message::Done { matched: *matched },
            Step::Error { code, text } => Message::Error { code: *code, text: text.clone() },
            Step::Welcome => Message::Welcome { version: VERSION, resumed: false, received: 0 },
            Step::RoundAck { round } => Message::RoundAck { round: *round, received: 0 },
            Step::Raw(raw) => {
                all.extend_from_slice(raw);
                continue;
            }
        };
        m.encode(&mut buf);
        all.extend_from_slice(&buf);
    }
    all
}

/// A connection: scripted input, collected output, no real timeouts.
struct Script {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
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

impl Timeouts for Script {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|input: Input| {
    let cfg = ReceiverConfig { log_connections: false, ..ReceiverConfig::new(MAX_PAGES * PAGE_SIZE as u64) };
    let mut session = None;
    for steps in [&input.first, &input.second] {
        let mut s = Script { input: Cursor::new(bytes(steps)), output: Vec::new() };
        if let Ok(r) = serve(&mut s, "fuzz".into(), cfg, &mut session) {
            assert!(r.pages >= 1 && r.pages <= MAX_PAGES, "{r:?}");
            assert_eq!(r.digest.len(), 64, "{r:?}");
            assert!(!r.slots.is_empty() && r.slots.iter().all(|s| s.info.pages >= 1), "{r:?}");
            assert_eq!(r.slots.iter().map(|s| s.info.pages).sum::<u64>(), r.pages, "{r:?}");
        }
        // Whatever the receiver answered is well-formed frames.
        let mut out = s.output.as_slice();
        while !out.is_empty() {
            Message::read_from(&mut out).expect("the receiver writes only valid frames");
        }
        assert!(session.as_ref().is_none_or(|s| s.bytes() <= (MAX_PAGES as usize) * PAGE_SIZE));
    }
});
