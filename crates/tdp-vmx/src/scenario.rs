//! The shared Bochs / tdp-mock test scenario (being built).
