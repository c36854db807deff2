//! The migration protocol's decoder on any bytes: `Message::read_from` never panics, never allocates
//! more than one frame, and every message it accepts encodes back to the same bytes it was read from
//! and decodes to the same message (I5 for the network peer).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tdp_cli::proto::{MAX_FRAME, Message};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut buf = Vec::new();
    while let Ok(m) = Message::read_from(&mut rest) {
        let consumed = &data[..data.len() - rest.len()];
        m.encode(&mut buf);
        assert!(buf.len() <= MAX_FRAME as usize + 4, "a frame longer than the limit was accepted");
        assert!(
            consumed.ends_with(&buf) || matches!(m, Message::Error { .. }),
            "{m:?} re-encodes differently"
        );
        let again = Message::read_from(&mut buf.as_slice()).expect("an encoded frame decodes");
        assert_eq!(again, m);
    }
});
