//! The upload layout planner: `labels.csv` parsing, wrapper-folder stripping, folder labels.
//!
//! Input: the bytes of `labels.csv` (none when empty), a NUL, then the paths of the other
//! extracted files, one a line. A first line ending in `/` is instead the folder holding
//! `labels.csv` (a wrapper folder, as zip tools make).
//! Shared by the fuzz target and by `tests/fuzz_seeds.rs`, which replays the seeds and every
//! input that once crashed on the stable toolchain in `scripts/test`.
use std::path::PathBuf;
use std::sync::OnceLock;

use vidtune::ingest::layout::{make_storable, plan};
use vidtune::media::archive::ExtractedFile;

/// One scratch file per process for `labels.csv` (libFuzzer runs inputs one at a time).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vidtune-fuzz-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("labels.csv")
    })
}

fn file(rel: &str, path: PathBuf) -> ExtractedFile {
    ExtractedFile {
        rel: rel.to_owned(),
        path,
        bytes: 1,
        sha256: String::new(),
    }
}

/// One input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let (csv, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let rest = String::from_utf8_lossy(rest);
    let mut lines: Vec<&str> = rest.split('\n').take(256).collect();
    let folder = match lines.first() {
        Some(l) if l.ends_with('/') => lines.remove(0),
        _ => "",
    };
    let mut files: Vec<ExtractedFile> = lines
        .iter()
        .map(|l| file(l, PathBuf::from("/nonexistent")))
        .collect();
    if !csv.is_empty() {
        std::fs::write(scratch(), csv).unwrap();
        files.push(file(&format!("{folder}labels.csv"), scratch().clone()));
    }
    let inputs = files.len();
    // Declared classes, or none, chosen by the input's length.
    let classes = ["polyp".to_owned(), "normal".to_owned()];
    let classes = data.len().is_multiple_of(2).then_some(&classes[..]);
    let Ok(plan) = plan(files, classes) else {
        return;
    };
    let mut planned = plan.files;
    assert!(planned.iter().filter(|p| p.file.is_some()).count() <= inputs);
    make_storable(&mut planned);
    let mut seen = std::collections::HashSet::new();
    for p in &planned {
        assert!(!p.path.contains('\0'));
        assert!(seen.insert(p.path.as_str()), "{:?} twice", p.path);
    }
}
