//! Protocol tests: every message round-trips; garbage of every kind is rejected without a panic.

use super::*;

fn round_trip(m: Message) {
    let mut buf = Vec::new();
    m.encode(&mut buf);
    let mut r = buf.as_slice();
    assert_eq!(Message::read_from(&mut r).expect("decodes"), m);
    assert!(r.is_empty(), "{}: the frame is consumed exactly", m.name());
}

#[test]
fn every_message_round_trips() {
    round_trip(Message::Hello {
        version: VERSION,
        page_size: 4096,
        session: 77,
        resume: true,
        slots: vec![SlotInfo::new(0, 0, 12), SlotInfo::new(1, 1 << 32, 1 << 20)],
    });
    let many = (0..MAX_SLOTS as u32).map(|i| SlotInfo::new(i, u64::from(i) << 32, 1)).collect();
    round_trip(Message::Hello { version: VERSION, page_size: 4096, session: 1, resume: false, slots: many });
    round_trip(Message::Welcome { version: VERSION, resumed: true, received: 12 });
    round_trip(Message::Welcome { version: VERSION, resumed: false, received: 0 });
    round_trip(Message::Pages { slot: 1, first: 7, data: (0..2 * PAGE_SIZE).map(|i| i as u8).collect() });
    round_trip(Message::Pages {
        slot: u32::MAX,
        first: u64::MAX - 1,
        data: vec![0xa5; MAX_RUN as usize * PAGE_SIZE],
    });
    round_trip(Message::RoundEnd { round: 4, pages: 99 });
    round_trip(Message::RoundAck { round: 4, received: 1234 });
    round_trip(Message::DigestRequest);
    round_trip(Message::Digest { hash: [9; 32], received: 5 });
    round_trip(Message::Error { code: ErrorCode::Version as u16, text: "version 9 not spoken".into() });
    round_trip(Message::Done { matched: true });
    round_trip(Message::Done { matched: false });
}

#[test]
fn error_text_is_truncated_at_a_char_boundary() {
    let mut buf = Vec::new();
    Message::Error { code: 4, text: "é".repeat(MAX_ERROR_TEXT) }.encode(&mut buf);
    let Ok(Message::Error { text, .. }) = Message::read_from(&mut buf.as_slice()) else {
        panic!("an Error frame");
    };
    assert_eq!(text.len(), MAX_ERROR_TEXT);
}

/// A `Hello` payload up to its slot count: magic, version, page size, session, resume.
fn hello_head() -> &'static [u8] {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| {
        [&b"TDPM"[..], &VERSION.to_le_bytes(), &4096u32.to_le_bytes(), &[0; 8], &[0]].concat()
    })
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(payload);
    v
}

#[test]
fn garbage_is_rejected_without_panic() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "closed"),
        (vec![0, 0, 0, 0], "length"),
        (u32::MAX.to_le_bytes().to_vec(), "length"),
        ((MAX_FRAME + 1).to_le_bytes().to_vec(), "length"),
        (vec![5, 0], "io"),
        (vec![10, 0, 0, 0, 1], "io"),
        (frame(0, &[]), "type"),
        (frame(200, &[1, 2]), "type"),
        (frame(1, b"XXXX\x01\x00"), "magic"),
        (frame(1, b"TDPM"), "payload"),
        (frame(1, b"TDPM\x02"), "payload"),
        // Version 1's Hello (a u64 page count, no slot table): refused by its version, not its layout.
        (frame(1, &[&b"TDPM"[..], &[1, 0], &4096u32.to_le_bytes(), &[0; 17]].concat()), "version"),
        (frame(1, &[&b"TDPM"[..], &[9, 9]].concat()), "version"),
        // A slot count the bytes that follow do not match, or one over the limit.
        (frame(1, &[hello_head(), &2u16.to_le_bytes(), &[0; SLOT_BYTES]].concat()), "payload"),
        (frame(1, &[hello_head(), &0u16.to_le_bytes(), &[0; 3]].concat()), "payload"),
        (frame(1, &[hello_head(), &(MAX_SLOTS as u16 + 1).to_le_bytes()].concat()), "payload"),
        (frame(2, &[1]), "payload"),
        (frame(2, &[1, 0, 0]), "payload"),
        (frame(2, &[1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]), "payload"),
        (
            frame(1, &[&b"TDPM"[..], &VERSION.to_le_bytes(), &4096u32.to_le_bytes(), &[0; 8], &[7]].concat()),
            "payload",
        ),
        (frame(3, &[0; 16]), "payload"),
        (frame(3, &[0; 12]), "payload"),
        (frame(3, &[&[0u8; 12][..], &2u32.to_le_bytes(), &[0; PAGE_SIZE]].concat()), "payload"),
        (frame(3, &[&[0u8; 12][..], &(MAX_RUN + 1).to_le_bytes()].concat()), "payload"),
        (frame(6, &[0]), "payload"),
        (frame(9, &[2]), "payload"),
        (frame(8, &vec![b'a'; MAX_ERROR_TEXT + 3]), "payload"),
    ];
    for (bytes, want) in cases {
        let got = Message::read_from(&mut bytes.as_slice());
        let kind = match &got {
            Err(ProtoError::Closed) => "closed",
            Err(ProtoError::FrameLength { .. }) => "length",
            Err(ProtoError::Io { .. }) => "io",
            Err(ProtoError::UnknownType { .. }) => "type",
            Err(ProtoError::BadMagic { .. }) => "magic",
            Err(ProtoError::Version { .. }) => "version",
            Err(ProtoError::BadPayload { .. }) => "payload",
            Ok(_) => "ok",
        };
        assert_eq!(kind, want, "{bytes:02x?} -> {got:?}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        let n = (x % 64) as usize;
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut r = bytes.as_slice();
        while Message::read_from(&mut r).is_ok() {}
    }
}

#[test]
fn i5_an_error_text_of_invalid_utf8_decodes_to_what_encodes_unchanged() {
    // 1024 invalid bytes become 1024 replacement characters (3 bytes each) when decoded.
    let mut frame = Vec::new();
    frame.extend_from_slice(&(1 + 2 + MAX_ERROR_TEXT as u32).to_le_bytes());
    frame.push(8);
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend(std::iter::repeat_n(0xff, MAX_ERROR_TEXT));
    let m = Message::read_from(&mut frame.as_slice()).expect("a valid Error frame");
    let Message::Error { text, .. } = &m else { panic!("{m:?}") };
    assert!(text.len() <= MAX_ERROR_TEXT, "{}", text.len());
    let mut buf = Vec::new();
    m.encode(&mut buf);
    assert_eq!(Message::read_from(&mut buf.as_slice()).expect("re-decodes"), m);
}

#[test]
fn i5_slot_tables_are_validated_with_the_rule_named() {
    let ok = [SlotInfo::new(0, 0, 12), SlotInfo::new(1, 1 << 32, 64), SlotInfo::new(1 << 16, 0, 12)];
    assert_eq!(validate_slots(&ok), Ok(88), "SMM's address space may reuse addresses");
    let cases: [(&[SlotInfo], &str); 7] = [
        (&[], "1 to"),
        (&[SlotInfo::new(0, 0, 0)], "no pages"),
        (&[SlotInfo::new(0, 100, 1)], "page boundary"),
        (&[SlotInfo::new(0, u64::MAX - 4095, 2)], "past the address space"),
        (&[SlotInfo::new(0, 0, u64::MAX)], "past the address space"),
        (&[SlotInfo::new(1, 0, 1), SlotInfo::new(1, 1 << 20, 1)], "ascending"),
        (&[SlotInfo::new(0, 0, 2), SlotInfo::new(1, 4096, 1)], "overlap"),
    ];
    for (slots, want) in cases {
        let e = validate_slots(slots).expect_err("refused");
        assert!(e.0.contains(want), "{slots:?}: {e}");
    }
    let too_many: Vec<_> = (0..=MAX_SLOTS as u32).map(|i| SlotInfo::new(i, u64::from(i) << 12, 1)).collect();
    assert!(validate_slots(&too_many).is_err());
}

#[test]
fn the_digest_covers_every_slot_and_its_place() {
    let page = [3u8; PAGE_SIZE];
    let digest = |slots: &[SlotInfo]| {
        let mut d = MemoryDigest::new();
        for s in slots {
            d.slot(s);
            d.pages(&page);
        }
        d.finish()
    };
    let both = digest(&[SlotInfo::new(0, 0, 1), SlotInfo::new(1, 1 << 32, 1)]);
    assert_ne!(both, digest(&[SlotInfo::new(1, 1 << 32, 1)]), "a slot left out changes the digest");
    assert_ne!(both, digest(&[SlotInfo::new(0, 0, 1), SlotInfo::new(1, 2 << 32, 1)]), "so does its address");
}
