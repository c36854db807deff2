//! Holder crate for the workspace's examples (see `examples/*.rs`); it has no code of its own.
