//! tdp-guest (being built).
