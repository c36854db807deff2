//! tdp-kvm (being built).
