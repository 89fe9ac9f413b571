//! Fuzz target: see `fuzz/harness/labels_csv.rs`.
#![no_main]

#[path = "../harness/labels_csv.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
