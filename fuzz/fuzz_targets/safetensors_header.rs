//! Fuzz target: see `fuzz/harness/safetensors_header.rs`.
#![no_main]

#[path = "../harness/safetensors_header.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
