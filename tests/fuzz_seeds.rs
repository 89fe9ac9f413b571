//! The fuzz targets' harnesses (`fuzz/harness/`) on stable, over every seed in `fuzz/seeds/` and
//! every input kept in `fuzz/regressions/`: the short mode of the fuzzing that `scripts/test`
//! runs. `scripts/fuzz` is the long mode (libFuzzer on nightly, minutes per target).
use std::path::Path;

#[path = "../fuzz/harness/archive_entry.rs"]
mod archive_entry;
#[path = "../fuzz/harness/cache_header.rs"]
mod cache_header;
#[path = "../fuzz/harness/labels_csv.rs"]
mod labels_csv;
#[path = "../fuzz/harness/pth.rs"]
mod pth;
#[path = "../fuzz/harness/safetensors_header.rs"]
mod safetensors_header;

/// A fuzz harness: one input, panics on a broken invariant.
type Harness = fn(&[u8]);

/// Run `harness` on every file kept for `target`; returns how many it saw.
fn replay(target: &str, harness: Harness) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let outcome = std::panic::catch_unwind(|| harness(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} breaks an invariant",
                f.display()
            );
            // Every prefix too: truncated files are what a broken upload looks like.
            for cut in [0, 1, 8, data.len() / 2, data.len().saturating_sub(1)] {
                harness(&data[..cut.min(data.len())]);
            }
            seen += 1;
        }
    }
    seen
}

#[test]
fn every_kept_input_passes_every_harness() {
    let targets: [(&str, Harness); 5] = [
        ("pth", pth::run),
        ("safetensors_header", safetensors_header::run),
        ("archive_entry", archive_entry::run),
        ("labels_csv", labels_csv::run),
        ("cache_header", cache_header::run),
    ];
    for (target, harness) in targets {
        assert!(replay(target, harness) > 0, "no seeds for {target}");
    }
}
