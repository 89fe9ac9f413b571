//! Safe extraction of uploaded dataset archives (zip, tar, tar.gz).
//!
//! Entries with `..`, absolute paths or drive letters, symlinks, hard links and device files are
//! refused; nothing is ever written outside the destination directory (paths are rebuilt from
//! checked components, and files are created with `create_new`, so no existing link is
//! followed). Entry count, total uncompressed bytes (absolutely and as a multiple of the
//! archive's own size) and compression ratio are capped while bytes flow, so a compression bomb
//! stops at the cap instead of filling the disk. A zip whose entries share bytes (the
//! overlapping-entry bomb) and an archive naming one path twice are refused before use.
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Caps applied to one archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveLimits {
    pub max_entries: usize,
    /// Most bytes extracted from one archive, whatever its size.
    pub max_total_bytes: u64,
    /// Most bytes extracted from one archive as a multiple of the archive's own size (but at
    /// least [`EXPANSION_FLOOR`]): what a 1 MB upload may cost the disk.
    pub max_expansion: f64,
    /// Largest uncompressed/compressed ratio of a zip entry, or of a whole tar.gz.
    pub max_ratio: f64,
}

/// Extraction may always write this much, so that a small archive of small files is not
/// refused by the expansion multiple.
pub const EXPANSION_FLOOR: u64 = 16 << 20;

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 200 << 30,
            // Video barely compresses (about 1:1); 20× leaves room for CSVs and uncompressed
            // formats, and keeps the disk cost of an upload proportional to its size.
            max_expansion: 20.0,
            // 100:1 for one entry leaves room for CSVs and padding, and stops bombs.
            max_ratio: 100.0,
        }
    }
}

impl ArchiveLimits {
    /// Most bytes an archive of `archive_bytes` may extract to.
    pub fn total_cap(&self, archive_bytes: u64) -> u64 {
        let relative = (archive_bytes as f64 * self.max_expansion).min(u64::MAX as f64) as u64;
        relative.max(EXPANSION_FLOOR).min(self.max_total_bytes)
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

/// The archive as a whole could not be used. The text is shown to the tenant (it names only
/// what the archive itself holds); [`ArchiveError::code`] is the stable part.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a readable {0:?} archive: {1}")]
    Invalid(ArchiveKind, String),
    #[error("the archive has more than {0} entries")]
    TooManyEntries(usize),
    #[error("the archive expands beyond the cap of {0} bytes")]
    TooLarge(u64),
    #[error(
        "the archive expands beyond {multiple}× its own size ({cap} bytes); \
         upload smaller archives or fewer compressible files"
    )]
    Expands { multiple: f64, cap: u64 },
    #[error("the archive expands more than {0}:1 (a compression bomb?)")]
    Bomb(f64),
    /// Two zip entries share stored bytes: the overlapping-entry bomb.
    #[error(
        "zip entries `{0}` and `{1}` overlap (they share stored bytes, as in a zip bomb); \
         the archive is refused"
    )]
    Overlapping(String, String),
    /// One path twice (named, in backticks, where known): which copy is meant is ambiguous,
    /// so neither is used.
    #[error("the archive holds {0} more than once; each path may appear only once")]
    DuplicatePath(String),
    #[error("writing extracted files: {0}")]
    Io(#[from] io::Error),
}

impl ArchiveError {
    /// A stable code for the problem.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(..) => "invalid_archive",
            Self::TooManyEntries(_) => "too_many_entries",
            Self::TooLarge(_) | Self::Expands { .. } => "archive_too_large",
            Self::Bomb(_) => "compression_bomb",
            Self::Overlapping(..) => "overlapping_entries",
            Self::DuplicatePath(_) => "duplicate_path",
            Self::Io(_) => "internal",
        }
    }
}

/// An entry name as shown back to the tenant: no control characters (PostgreSQL text cannot
/// hold NUL), at most 200 characters.
fn shown(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .take(200)
        .collect();
    if name.chars().count() > 200 {
        out.push('…');
    }
    out
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
    let archive_bytes = std::fs::metadata(archive)?.len();
    let mut state = Extraction {
        dest,
        limits,
        cap: limits.total_cap(archive_bytes),
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
    /// Most bytes this archive may extract to ([`ArchiveLimits::total_cap`]).
    cap: u64,
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
            // The same path twice (also spelt differently, `a.mp4` and `./a.mp4`): which copy
            // is meant is ambiguous, and the tenant must learn that one was not used.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ArchiveError::DuplicatePath(format!(
                    "`{}`",
                    shown(rel_name)
                )));
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
            if self.total > self.cap {
                drop(file);
                let _ = std::fs::remove_file(&path);
                return Err(if self.cap == self.limits.max_total_bytes {
                    ArchiveError::TooLarge(self.cap)
                } else {
                    ArchiveError::Expands {
                        multiple: self.limits.max_expansion,
                        cap: self.cap,
                    }
                });
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
    check_zip_layout(&mut zip)?;
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

/// Refuse a zip whose central directory lists a name twice (the reader would keep only one
/// copy, silently) or whose entries' stored bytes overlap: the overlapping-entry bomb points
/// many directory entries at one compressed stream, so each stays under the per-entry ratio
/// while the whole expands thousands of times. Checked before anything is written.
fn check_zip_layout<R: Read + io::Seek>(zip: &mut zip::ZipArchive<R>) -> Result<(), ArchiveError> {
    if zip.has_duplicate_names() {
        // The reader has already merged the copies, so which name is not known here.
        return Err(ArchiveError::DuplicatePath("one path".into()));
    }
    // `[start, end)` of each entry's local header and data, with its name.
    let mut ranges: Vec<(u64, u64, String)> = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        // An unreadable entry is refused on its own when it is extracted.
        let Ok(entry) = zip.by_index_raw(i) else {
            continue;
        };
        let start = entry.header_start();
        let data = entry.data_start().unwrap_or(start);
        let end = data
            .checked_add(entry.compressed_size())
            .ok_or_else(|| {
                ArchiveError::Invalid(ArchiveKind::Zip, "an entry's size overflows".into())
            })?
            .max(start + 1);
        ranges.push((
            start,
            end,
            String::from_utf8_lossy(entry.name_raw()).into_owned(),
        ));
    }
    ranges.sort_by_key(|r| r.0);
    for pair in ranges.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.0 < a.1 {
            return Err(ArchiveError::Overlapping(shown(&a.2), shown(&b.2)));
        }
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

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *bytes).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn extract_bytes(
        bytes: &[u8],
        kind: ArchiveKind,
        limits: &ArchiveLimits,
    ) -> (tempfile::TempDir, Result<Extracted, ArchiveError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("upload");
        std::fs::write(&archive, bytes).unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let got = extract(&archive, kind, &dest, limits);
        (dir, got)
    }

    #[test]
    fn a_file_and_a_folder_of_one_name_refuse_the_later_entry() {
        let archive = tar_of(&[
            ("polyp/a.mp4", b"first"),
            ("polyp", b"a file named like the folder"),
            ("notes", b"a file"),
            ("notes/x.txt", b"under the file"),
        ]);
        let (dir, got) = extract_bytes(&archive, ArchiveKind::Tar, &ArchiveLimits::default());
        let got = got.unwrap();
        let files: Vec<_> = got.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(files, ["polyp/a.mp4", "notes"]);
        assert_eq!(
            std::fs::read(dir.path().join("out/polyp/a.mp4")).unwrap(),
            b"first"
        );
        let refused: Vec<_> = got
            .refused
            .iter()
            .map(|r| (r.rel.as_str(), r.code))
            .collect();
        assert_eq!(
            refused,
            [("polyp", "path_conflict"), ("notes/x.txt", "path_conflict")]
        );
    }

    #[test]
    fn the_same_path_twice_refuses_the_archive() {
        // Also when spelt differently: both name `polyp/a.mp4`.
        for second in ["polyp/a.mp4", "./polyp//a.mp4"] {
            let archive = tar_of(&[("polyp/a.mp4", b"first"), (second, b"second")]);
            let (_dir, got) = extract_bytes(&archive, ArchiveKind::Tar, &ArchiveLimits::default());
            let e = got.unwrap_err();
            assert_eq!(e.code(), "duplicate_path", "{e}");
            assert!(e.to_string().contains("polyp/a.mp4"), "{e}");
        }
        // A zip's central directory naming one path twice (the reader would keep one silently).
        let data = b"0123456789".repeat(10);
        let zip = raw_zip(&[("a.mp4", &data), ("a.mp4", &data)], false);
        let (_dir, got) = extract_bytes(&zip, ArchiveKind::Zip, &ArchiveLimits::default());
        assert_eq!(got.unwrap_err().code(), "duplicate_path");
    }

    /// A zip of stored (uncompressed) entries, written byte by byte. With `overlap`, only the
    /// first entry's local header and data are written and every central-directory entry
    /// points at them: the overlapping-entry bomb.
    pub(crate) fn raw_zip(entries: &[(&str, &[u8])], overlap: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offsets = Vec::new();
        for (i, (name, data)) in entries.iter().enumerate() {
            if overlap && i > 0 {
                offsets.push(0u32);
                continue;
            }
            offsets.push(out.len() as u32);
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes()); // version needed
            out.extend_from_slice(&0u16.to_le_bytes()); // flags
            out.extend_from_slice(&0u16.to_le_bytes()); // stored
            out.extend_from_slice(&[0; 4]); // time, date
            out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes()); // extra
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
        }
        let cd_start = out.len() as u32;
        for ((name, data), offset) in entries.iter().zip(&offsets) {
            out.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes()); // made by
            out.extend_from_slice(&20u16.to_le_bytes()); // needed
            out.extend_from_slice(&0u16.to_le_bytes()); // flags
            out.extend_from_slice(&0u16.to_le_bytes()); // stored
            out.extend_from_slice(&[0; 4]); // time, date
            out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
            out.extend_from_slice(&0o100644u32.wrapping_shl(16).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        let cd_len = out.len() as u32 - cd_start;
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // disk numbers
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&cd_len.to_le_bytes());
        out.extend_from_slice(&cd_start.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn overlapping_zip_entries_are_refused_before_anything_is_written() {
        // 64 directory entries over one 256 KiB stored file: 16 MiB from a 256 KiB upload,
        // with every entry at 1:1 (no per-entry ratio cap applies).
        let data: Vec<u8> = (0..256u32 << 10)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let names: Vec<String> = (0..64).map(|i| format!("polyp/v{i}.mp4")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &data[..])).collect();
        let limits = ArchiveLimits {
            max_expansion: 1000.0,
            ..Default::default()
        };
        let honest = raw_zip(&entries[..2], false);
        let (_dir, got) = extract_bytes(&honest, ArchiveKind::Zip, &limits);
        assert_eq!(
            got.unwrap().files.len(),
            2,
            "a well-formed zip of stored files"
        );

        let bomb = raw_zip(&entries, true);
        assert!(bomb.len() < 300 << 10);
        let (dir, got) = extract_bytes(&bomb, ArchiveKind::Zip, &limits);
        let e = got.unwrap_err();
        assert_eq!(e.code(), "overlapping_entries", "{e}");
        assert!(e.to_string().contains("polyp/v0.mp4"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            0
        );
    }

    #[test]
    fn extraction_is_capped_by_a_multiple_of_the_archive_size() {
        // 40 entries of 1 MiB at about 30:1 each (under the per-entry ratio): 40 MiB from an
        // upload of about 1.4 MiB.
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let mut x = 7u32;
        for i in 0..40 {
            w.start_file(format!("polyp/{i}.mp4"), opts).unwrap();
            // A few random bits per byte: deflate gets roughly 30:1, not 1000:1.
            let block: Vec<u8> = (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    if x.is_multiple_of(32) {
                        (x >> 8) as u8
                    } else {
                        0
                    }
                })
                .collect();
            w.write_all(&block).unwrap();
        }
        let zip = w.finish().unwrap().into_inner();
        let unlimited = ArchiveLimits {
            max_expansion: 1000.0,
            ..Default::default()
        };
        let (_dir, got) = extract_bytes(&zip, ArchiveKind::Zip, &unlimited);
        let got = got.unwrap();
        assert!(got.refused.is_empty(), "{:?}", got.refused);
        assert_eq!(got.files.len(), 40);

        let limits = ArchiveLimits {
            max_expansion: 10.0,
            ..Default::default()
        };
        let (dir, got) = extract_bytes(&zip, ArchiveKind::Zip, &limits);
        let e = got.unwrap_err();
        assert_eq!(e.code(), "archive_too_large", "{e}");
        assert!(e.to_string().contains("10× its own size"), "{e}");
        let written: u64 = crate::datadir::dir_bytes(&dir.path().join("out"));
        assert!(written <= limits.total_cap(zip.len() as u64), "{written}");
        // The absolute cap applies too.
        let limits = ArchiveLimits {
            max_total_bytes: 2 << 20,
            ..unlimited
        };
        let (_dir, got) = extract_bytes(&zip, ArchiveKind::Zip, &limits);
        assert!(matches!(got, Err(ArchiveError::TooLarge(_))), "{got:?}");
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
