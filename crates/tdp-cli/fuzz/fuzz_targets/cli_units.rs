//! The command line's size and rate parsers on any text: no panic, no overflow, and what they accept is
//! consistent (a rate is countable in bytes per second; a plain number of bytes is itself) (I5 for the
//! command line).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tdp_cli::units::{PAGE_SIZE, human_bytes, parse_rate, parse_size};

fuzz_target!(|text: &str| {
    if let Ok(bytes) = parse_size("size", text) {
        let _ = human_bytes(bytes);
        let t = text.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(t.parse::<u64>().ok(), Some(bytes), "{text:?}");
        }
    }
    if let Ok(rate) = parse_rate("rate", text) {
        assert!(rate.pages_per_sec.checked_mul(PAGE_SIZE).is_some(), "{text:?}: bytes/s overflow u64");
        let _ = rate.to_string();
    }
});
