//! Safe extraction of uploaded dataset archives (zip, tar, tar.gz).
//!
//! Entries with `..`, absolute paths or drive letters, symlinks, hard links and device files are
//! refused; nothing is ever written outside the destination directory (paths are rebuilt from
//! checked components, and files are created with `create_new`, so no existing link is
//! followed). Entry count, total uncompressed bytes and compression ratio are capped while
//! bytes flow, so a compression bomb stops at the cap instead of filling the disk.
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Caps applied to one archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveLimits {
    pub max_entries: usize,
    pub max_total_bytes: u64,
    /// Largest uncompressed/compressed ratio of a zip entry, or of a whole tar.gz.
    pub max_ratio: f64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 200 << 30,
            // Video barely compresses; 100:1 leaves room for CSVs and padding, and stops bombs.
            max_ratio: 100.0,
        }
    }
}

/// Archive formats recognised by their leading bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Zip,
    Tar,
    TarGz,
}

/// Recognise an archive by content, not by name.
pub fn sniff(path: &Path) -> io::Result<Option<ArchiveKind>> {
    let mut head = [0u8; 512];
    let mut f = File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &head[..n];
    Ok(
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(ArchiveKind::Zip)
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Some(ArchiveKind::TarGz)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(ArchiveKind::Tar)
        } else {
            None
        },
    )
}

/// A file written by extraction.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedFile {
    /// Path inside the archive, `/`-separated, as checked.
    pub rel: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// An entry that was not extracted, with the reason.
#[derive(Debug, Clone)]
pub struct RefusedEntry {
    pub rel: String,
    pub code: &'static str,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Extracted {
    pub files: Vec<ExtractedFile>,
    pub refused: Vec<RefusedEntry>,
}

/// The archive as a whole could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a readable {0:?} archive: {1}")]
    Invalid(ArchiveKind, String),
    #[error("the archive has more than {0} entries")]
    TooManyEntries(usize),
    #[error("the archive expands beyond the cap of {0} bytes")]
    TooLarge(u64),
    #[error("the archive expands more than {0}:1 (a compression bomb?)")]
    Bomb(f64),
    #[error("writing extracted files: {0}")]
    Io(#[from] io::Error),
}

/// Check an entry name and turn it into a relative path of normal components.
pub fn safe_relative(name: &str) -> Result<PathBuf, &'static str> {
    if name.contains('\0') {
        return Err("the entry name contains a NUL byte");
    }
    let unified = name.replace('\\', "/");
    if unified.starts_with('/') {
        return Err("absolute paths are not allowed");
    }
    // Longer names cannot be created on Linux (255 bytes a name) or shown usefully.
    if unified.len() > 1024 {
        return Err("the entry path is longer than 1024 bytes");
    }
    let mut out = PathBuf::new();
    for part in unified.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("`..` in an entry path is not allowed"),
            // Checked on the first component kept, so `./C:/x` is refused like `C:/x` (found
            // by `fuzz/fuzz_targets/archive_entry.rs`).
            p if out.as_os_str().is_empty() && p.as_bytes().get(1) == Some(&b':') => {
                return Err("drive-letter paths are not allowed");
            }
            p if p.len() > 255 => return Err("a name in the entry path is longer than 255 bytes"),
            p => {
                // One more guard: the platform must see exactly one normal component.
                let mut comps = Path::new(p).components();
                match (comps.next(), comps.next()) {
                    (Some(Component::Normal(_)), None) => out.push(p),
                    _ => return Err("the entry path is not a plain relative path"),
                }
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err("the entry has an empty path");
    }
    Ok(out)
}

/// Extract `archive` into `dest` (which must exist).
pub fn extract(
    archive: &Path,
    kind: ArchiveKind,
    dest: &Path,
    limits: &ArchiveLimits,
) -> Result<Extracted, ArchiveError> {
    let mut state = Extraction {
        dest,
        limits,
        total: 0,
        entries: 0,
        compressed: None,
        out: Extracted::default(),
    };
    match kind {
        ArchiveKind::Zip => extract_zip(archive, &mut state)?,
        ArchiveKind::Tar => {
            let file = BufReader::new(File::open(archive)?);
            extract_tar(tar::Archive::new(file), &mut state, kind)?
        }
        ArchiveKind::TarGz => {
            let compressed = CountingReader::new(BufReader::new(File::open(archive)?));
            state.compressed = Some(compressed.counter());
            let gz = flate2::read::MultiGzDecoder::new(compressed);
            extract_tar(tar::Archive::new(gz), &mut state, kind)?
        }
    }
    Ok(state.out)
}

struct Extraction<'a> {
    dest: &'a Path,
    limits: &'a ArchiveLimits,
    total: u64,
    entries: usize,
    /// Compressed bytes consumed so far, for a compressed stream (tar.gz).
    compressed: Option<std::rc::Rc<std::cell::Cell<u64>>>,
    out: Extracted,
}

impl Extraction<'_> {
    fn count_entry(&mut self) -> Result<(), ArchiveError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries(self.limits.max_entries));
        }
        Ok(())
    }

    /// The entry's path if it is safe, else the entry is refused.
    fn checked_path(&mut self, name: &str) -> Option<PathBuf> {
        safe_relative(name)
            .map_err(|why| self.refuse(name, "unsafe_path", why))
            .ok()
    }

    fn refuse(&mut self, rel: &str, code: &'static str, detail: impl Into<String>) {
        self.out.refused.push(RefusedEntry {
            rel: rel.to_owned(),
            code,
            detail: detail.into(),
        });
    }

    /// Copy one entry's bytes to its checked path. `entry_cap` bounds this entry (ratio cap).
    fn write_entry(
        &mut self,
        rel_name: &str,
        rel: &Path,
        reader: &mut dyn Read,
        entry_cap: Option<u64>,
    ) -> Result<(), ArchiveError> {
        let path = self.dest.join(rel);
        // A file and a folder of the same name (`a`, then `a/b.mp4`, or the reverse) is the
        // archive's contradiction, not the server's failure: refuse the later entry.
        let conflict = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory
            )
        };
        if let Some(parent) = path.parent()
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            if conflict(&e) {
                self.refuse(
                    rel_name,
                    "path_conflict",
                    "a folder of this path is also a file of the archive",
                );
                return Ok(());
            }
            return Err(e.into());
        }
        let mut file = match File::options().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if path.is_dir() && conflict(&e) => {
                self.refuse(
                    rel_name,
                    "path_conflict",
                    "this path is also a folder of the archive",
                );
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.refuse(
                    rel_name,
                    "duplicate_entry",
                    "the archive holds this path twice; the first copy is used",
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut bytes = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    self.refuse(
                        rel_name,
                        "corrupt_entry",
                        format!("cannot read this entry: {e}"),
                    );
                    return Ok(());
                }
            };
            bytes += n as u64;
            self.total += n as u64;
            if self.total > self.limits.max_total_bytes {
                drop(file);
                let _ = std::fs::remove_file(&path);
                return Err(ArchiveError::TooLarge(self.limits.max_total_bytes));
            }
            if let Some(c) = &self.compressed
                && self.total > (1 << 20)
                && self.total as f64 > c.get().max(1) as f64 * self.limits.max_ratio
            {
                drop(file);
                let _ = std::fs::remove_file(&path);
                return Err(ArchiveError::Bomb(self.limits.max_ratio));
            }
            if entry_cap.is_some_and(|cap| bytes > cap) {
                drop(file);
                let _ = std::fs::remove_file(&path);
                self.total -= bytes;
                self.refuse(
                    rel_name,
                    "compression_bomb",
                    format!(
                        "expands more than {}:1; extraction of this entry was stopped",
                        self.limits.max_ratio
                    ),
                );
                return Ok(());
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
        }
        self.out.files.push(ExtractedFile {
            rel: rel_name.to_owned(),
            path,
            bytes,
            sha256: hex::encode(hasher.finalize()),
        });
        Ok(())
    }
}

fn extract_zip(archive: &Path, st: &mut Extraction<'_>) -> Result<(), ArchiveError> {
    let file = BufReader::new(File::open(archive)?);
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| ArchiveError::Invalid(ArchiveKind::Zip, e.to_string()))?;
    if zip.len() > st.limits.max_entries {
        return Err(ArchiveError::TooManyEntries(st.limits.max_entries));
    }
    for i in 0..zip.len() {
        st.count_entry()?;
        let mut entry = match zip.by_index(i) {
            Ok(e) => e,
            Err(e) => {
                st.refuse(
                    &format!("#{i}"),
                    "corrupt_entry",
                    format!("unreadable entry: {e}"),
                );
                continue;
            }
        };
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            st.refuse(
                &name,
                "symlink",
                "symbolic links are not allowed in dataset archives",
            );
            continue;
        }
        let Some(rel) = st.checked_path(&name) else {
            continue;
        };
        // Never trust the declared size: cap by ratio against the compressed size actually stored.
        let cap =
            ((entry.compressed_size().max(1) as f64) * st.limits.max_ratio) as u64 + (64 << 10);
        st.write_entry(&name, &rel, &mut entry, Some(cap))?;
    }
    Ok(())
}

fn extract_tar<R: Read>(
    mut tar: tar::Archive<R>,
    st: &mut Extraction<'_>,
    kind: ArchiveKind,
) -> Result<(), ArchiveError> {
    let entries = tar
        .entries()
        .map_err(|e| ArchiveError::Invalid(kind, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::Invalid(kind, e.to_string()))?;
        st.count_entry()?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let etype = entry.header().entry_type();
        if etype.is_dir() {
            continue;
        }
        if etype.is_symlink() || etype.is_hard_link() {
            st.refuse(
                &name,
                "symlink",
                "links are not allowed in dataset archives",
            );
            continue;
        }
        if etype.is_pax_global_extensions()
            || etype.is_pax_local_extensions()
            || etype.is_gnu_longname()
        {
            continue;
        }
        if !(etype.is_file() || etype.is_contiguous()) {
            st.refuse(
                &name,
                "unsafe_entry",
                "only regular files are allowed in dataset archives",
            );
            continue;
        }
        let Some(rel) = st.checked_path(&name) else {
            continue;
        };
        st.write_entry(&name, &rel, &mut entry, None)?;
    }
    Ok(())
}

/// Counts bytes read from the compressed stream, to measure the expansion ratio.
struct CountingReader<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R> CountingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            count: Default::default(),
        }
    }
    fn counter(&self) -> std::rc::Rc<std::cell::Cell<u64>> {
        self.count.clone()
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_path_twice_or_as_file_and_folder_refuses_the_later_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in [
            ("polyp/a.mp4", &b"first"[..]),
            ("polyp/a.mp4", b"second"),
            ("polyp", b"a file named like the folder"),
            ("notes", b"a file"),
            ("notes/x.txt", b"under the file"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, bytes).unwrap();
        }
        let archive = dir.path().join("a.tar");
        std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let got = extract(&archive, ArchiveKind::Tar, &dest, &ArchiveLimits::default()).unwrap();
        let files: Vec<_> = got.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(files, ["polyp/a.mp4", "notes"]);
        assert_eq!(std::fs::read(dest.join("polyp/a.mp4")).unwrap(), b"first");
        let refused: Vec<_> = got
            .refused
            .iter()
            .map(|r| (r.rel.as_str(), r.code))
            .collect();
        assert_eq!(
            refused,
            [
                ("polyp/a.mp4", "duplicate_entry"),
                ("polyp", "path_conflict"),
                ("notes/x.txt", "path_conflict"),
            ]
        );
    }

    #[test]
    fn unsafe_names_are_refused() {
        assert!(safe_relative("../etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("C:\\x.mp4").is_err());
        assert!(safe_relative("a\\..\\b").is_err());
        assert!(safe_relative("").is_err());
        assert!(safe_relative(&format!("{}.mp4", "a".repeat(300))).is_err());
        assert!(safe_relative(&"a/".repeat(600)).is_err());
        assert_eq!(
            safe_relative("./train/polyp/a.mp4").unwrap(),
            PathBuf::from("train/polyp/a.mp4")
        );
    }

    #[test]
    fn drive_letters_behind_dot_components_are_refused() {
        // Fuzz finding: the drive-letter check looked at the raw name only.
        for name in ["./C:/x.mp4", ".\\C:\\x.mp4", "./$:", "././d:"] {
            assert_eq!(
                safe_relative(name),
                Err("drive-letter paths are not allowed"),
                "{name}"
            );
        }
        // A colon further in is an ordinary character on Linux.
        assert_eq!(
            safe_relative("a/C:x.mp4").unwrap(),
            PathBuf::from("a/C:x.mp4")
        );
    }
}
