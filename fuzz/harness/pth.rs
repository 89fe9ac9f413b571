//! The `.pth` reader on arbitrary bytes: the pickle machine, both container formats, the view
//! checks and the gather into contiguous bytes. Everything short of libtorch.
//! Shared by the fuzz target and by `tests/fuzz_seeds.rs`, which replays the seeds and every
//! input that once crashed on the stable toolchain in `scripts/test`.
use std::io::Cursor;

use vidtune::backbone::pth::Checkpoint;
use vidtune::backbone::weights::Limits;

/// One input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Ok(mut checkpoint) = Checkpoint::from_reader(Cursor::new(data), Limits::fuzzing()) else {
        return;
    };
    let declared = checkpoint.tensors().to_vec();
    // Every second tensor, then all: a partial read must not disturb a later one.
    let mut flip = false;
    let _ = checkpoint.read_raw(|_| {
        flip = !flip;
        flip
    });
    if let Ok(raw) = checkpoint.read_raw(|_| true) {
        assert_eq!(raw.len(), declared.len());
        for (r, d) in raw.iter().zip(&declared) {
            assert_eq!(&r.info, d);
            // What `RawTensor::into_tensor` relies on before handing the bytes to libtorch.
            assert_eq!(r.data.len() as u64, r.info.bytes());
        }
    }
}
