//! The safetensors reader on arbitrary bytes: header length, JSON header, layout checks, and
//! the reads of the selected byte ranges.
//! Shared by the fuzz target and by `tests/fuzz_seeds.rs`, which replays the seeds and every
//! input that once crashed on the stable toolchain in `scripts/test`.
use std::io::Cursor;

use vidtune::backbone::safetensors::SafetensorsFile;
use vidtune::backbone::weights::{Limits, WeightsFile};

/// One input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    // Also through the sniffing entry point the server uses.
    if let Ok(mut f) = WeightsFile::from_reader(Cursor::new(data), Limits::fuzzing()) {
        let _ = f.read_raw(|_| true);
    }
    let Ok(mut file) = SafetensorsFile::from_reader(Cursor::new(data), Limits::fuzzing()) else {
        return;
    };
    let declared = file.tensors().to_vec();
    let total: u64 = declared.iter().map(|t| t.bytes()).sum();
    // Accepted layouts tile the data after the header exactly.
    let header = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(8 + header + total, data.len() as u64);
    let raw = file
        .read_raw(|_| true)
        .expect("an accepted layout reads back");
    assert_eq!(raw.len(), declared.len());
    for r in &raw {
        assert_eq!(r.data.len() as u64, r.info.bytes());
    }
}
