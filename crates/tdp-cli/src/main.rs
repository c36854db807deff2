//! The `tdp` command (being built).

fn main() {}
