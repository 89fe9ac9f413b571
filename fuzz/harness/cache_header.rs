//! The training-cache header: 64 bytes of shape and rate, checked against the file's length;
//! then the reader on the same bytes.
//! Shared by the fuzz target and by `tests/fuzz_seeds.rs`, which replays the seeds and every
//! input that once crashed on the stable toolchain in `scripts/test`.
use vidtune::media::cache::{CacheHeader, CacheReader, HEADER_LEN};

/// One scratch file per process (libFuzzer runs inputs one at a time).
fn scratch() -> &'static std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("vidtune-fuzz-cache-{}", std::process::id()))
    })
}

/// One input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some(head) = data.get(..HEADER_LEN as usize) else {
        return;
    };
    let head: &[u8; HEADER_LEN as usize] = head.try_into().unwrap();
    let Ok(h) = CacheHeader::parse(head, data.len() as u64) else {
        return;
    };
    assert_eq!(
        HEADER_LEN + h.frames as u64 * h.frame_bytes() as u64,
        data.len() as u64
    );
    std::fs::write(scratch(), data).unwrap();
    let mut reader = CacheReader::open(scratch()).expect("the header was accepted");
    let mut out = Vec::new();
    if h.frames > 0 {
        reader.read_frames(&[0, h.frames - 1], &mut out).unwrap();
        assert_eq!(out.len(), 2 * h.frame_bytes());
        assert_eq!(&out[..h.frame_bytes()], &data[64..64 + h.frame_bytes()]);
    }
    assert!(reader.read_frames(&[h.frames], &mut out).is_err());
}
