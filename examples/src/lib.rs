//! Holder crate for the workspace's examples (see `examples/*.rs`). It also compiles and runs the README's
//! code as a doctest, so the README cannot drift from the API.
#![doc = include_str!("../../README.md")]
