//! The training-cache header: 64 bytes of shape and rate, checked against the file's length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vidtune::media::cache::CacheReader;

/// One scratch file per process (libFuzzer runs inputs one at a time).
fn scratch() -> &'static std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("vidtune-fuzz-cache-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(scratch(), data).unwrap();
    let Ok(mut reader) = CacheReader::open(scratch()) else {
        return;
    };
    let h = reader.header;
    let mut out = Vec::new();
    if h.frames > 0 {
        reader.read_frames(&[0, h.frames - 1], &mut out).unwrap();
        assert_eq!(out.len(), 2 * h.frame_bytes());
    }
    assert!(reader.read_frames(&[h.frames], &mut out).is_err());
});
