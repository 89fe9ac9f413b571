//! Fuzz target: see `fuzz/harness/archive_entry.rs`.
#![no_main]

#[path = "../harness/archive_entry.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
