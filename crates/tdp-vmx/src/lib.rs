#![no_std]
//! tdp-vmx (being built).
