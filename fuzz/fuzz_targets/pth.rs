//! Fuzz target: see `fuzz/harness/pth.rs`.
#![no_main]

#[path = "../harness/pth.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
