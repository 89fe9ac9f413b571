//! Fuzz target: see `fuzz/harness/cache_header.rs`.
#![no_main]

#[path = "../harness/cache_header.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
