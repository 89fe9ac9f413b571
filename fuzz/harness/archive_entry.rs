//! Archive entry names: whatever `safe_relative` accepts must stay inside the destination.
//! Shared by the fuzz target and by `tests/fuzz_seeds.rs`, which replays the seeds and every
//! input that once crashed on the stable toolchain in `scripts/test`.
use std::path::{Component, Path};

use vidtune::media::archive::safe_relative;

/// One input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    // Entry names reach the check as lossy UTF-8, as extraction makes them.
    let name = String::from_utf8_lossy(data);
    let Ok(rel) = safe_relative(&name) else {
        return;
    };
    assert!(rel.is_relative(), "{name:?} -> {rel:?}");
    assert!(!rel.as_os_str().is_empty());
    for c in rel.components() {
        let Component::Normal(part) = c else {
            panic!("{name:?} -> {rel:?} has the component {c:?}");
        };
        let part = part.to_string_lossy();
        assert!(part != ".." && part != ".", "{name:?} -> {rel:?}");
        assert!(!part.contains(['/', '\\', '\0']), "{name:?} -> {rel:?}");
    }
    let dest = Path::new("/srv/vidtune/data/datasets/x/incoming");
    assert!(dest.join(&rel).starts_with(dest), "{name:?} -> {rel:?}");
    // The checked path is itself accepted unchanged.
    let again = safe_relative(rel.to_str().expect("built from UTF-8")).expect("stays accepted");
    assert_eq!(again, rel);
}
