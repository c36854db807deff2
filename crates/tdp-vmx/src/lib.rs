#![no_std]
//! tdp-vmx (being built).

pub mod scenario;
