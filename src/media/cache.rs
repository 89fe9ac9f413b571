//! The training cache: each accepted video decoded once, at ingest, into the form training reads
//! fastest — uint8 RGB frames at a fixed rate with the short side resized (128 px by default),
//! stored contiguously after a 64-byte header so a clip is one `read_exact` (or a slice of a
//! memory map) away, with no decoding during epochs.
//!
//! Layout (little endian): `b"VTCACHE1"`, then u32 frames, height, width, channels (3),
//! f64 fps, zero padding to 64 bytes; then `frames × height × width × 3` bytes, `[T, H, W, C]`.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, bail};

pub const MAGIC: &[u8; 8] = b"VTCACHE1";
pub const HEADER_LEN: u64 = 64;

/// Shape and rate of a cached video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheHeader {
    pub frames: u32,
    pub height: u32,
    pub width: u32,
    pub fps: f64,
}

impl CacheHeader {
    pub fn frame_bytes(&self) -> usize {
        self.height as usize * self.width as usize * 3
    }

    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.frames.to_le_bytes());
        b[12..16].copy_from_slice(&self.height.to_le_bytes());
        b[16..20].copy_from_slice(&self.width.to_le_bytes());
        b[20..24].copy_from_slice(&3u32.to_le_bytes());
        b[24..32].copy_from_slice(&self.fps.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN as usize]) -> anyhow::Result<Self> {
        if &b[..8] != MAGIC {
            bail!("not a vidtune cache file");
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u(20) != 3 {
            bail!("unsupported channel count {}", u(20));
        }
        Ok(Self {
            frames: u(8),
            height: u(12),
            width: u(16),
            fps: f64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }

    /// Decode a header and check it against the length of its file, with checked arithmetic:
    /// once this succeeds, `frame_bytes()` and every frame offset fit (the fuzz target
    /// `cache_header` found the unchecked product overflowing).
    pub fn parse(b: &[u8; HEADER_LEN as usize], file_len: u64) -> anyhow::Result<Self> {
        let header = Self::decode(b)?;
        let frame_bytes = (header.height as u64)
            .checked_mul(header.width as u64)
            .and_then(|n| n.checked_mul(3))
            .filter(|&n| usize::try_from(n).is_ok_and(|n| n <= isize::MAX as usize))
            .with_context(|| {
                format!(
                    "cache frames of {}×{} do not fit in memory",
                    header.height, header.width
                )
            })?;
        let expected = frame_bytes
            .checked_mul(header.frames as u64)
            .and_then(|n| n.checked_add(HEADER_LEN));
        if expected != Some(file_len) {
            bail!(
                "cache is {file_len} bytes, but {} frames of {}×{} need {}",
                header.frames,
                header.height,
                header.width,
                expected.map_or("more than 2^64".to_owned(), |e| e.to_string())
            );
        }
        Ok(header)
    }
}

/// Streams frames into a cache file; the file appears under its final name only when complete.
pub struct CacheWriter {
    file: std::io::BufWriter<File>,
    part: std::path::PathBuf,
    dest: std::path::PathBuf,
    header: CacheHeader,
}

impl CacheWriter {
    pub fn create(dest: &Path, height: u32, width: u32, fps: f64) -> anyhow::Result<Self> {
        let part = dest.with_extension("part");
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            File::create(&part).with_context(|| format!("creating {}", part.display()))?,
        );
        let header = CacheHeader {
            frames: 0,
            height,
            width,
            fps,
        };
        file.write_all(&header.encode())?;
        Ok(Self {
            file,
            part,
            dest: dest.to_path_buf(),
            header,
        })
    }

    /// Append one packed RGB24 frame (`height × width × 3` bytes).
    pub fn push(&mut self, rgb: &[u8]) -> anyhow::Result<()> {
        debug_assert_eq!(rgb.len(), self.header.frame_bytes());
        self.file.write_all(rgb)?;
        self.header.frames += 1;
        Ok(())
    }

    pub fn frames(&self) -> u32 {
        self.header.frames
    }

    pub fn fps(&self) -> f64 {
        self.header.fps
    }

    /// Write the final header and move the file durably into place.
    pub fn finish(self) -> anyhow::Result<CacheHeader> {
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&self.header.encode())?;
        drop(file);
        crate::datadir::durable_rename(&self.part, &self.dest)
            .with_context(|| format!("moving cache into {}", self.dest.display()))?;
        Ok(self.header)
    }

    /// Drop the partial file.
    pub fn abandon(self) {
        let part = self.part.clone();
        drop(self.file);
        let _ = std::fs::remove_file(part);
    }
}

/// Reads frames of a cached video.
pub struct CacheReader {
    file: File,
    pub header: CacheHeader,
}

impl CacheReader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut b = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut b)?;
        let header = CacheHeader::parse(&b, file.metadata()?.len())
            .with_context(|| format!("cache {}", path.display()))?;
        Ok(Self { file, header })
    }

    /// Read frames `indices` (each `< frames`) into `out`, `[len, H, W, 3]` packed.
    /// Consecutive indices are read in one call.
    pub fn read_frames(&mut self, indices: &[u32], out: &mut Vec<u8>) -> anyhow::Result<()> {
        let fb = self.header.frame_bytes();
        // Indices first: memory is only reserved for frames that exist.
        if let Some(bad) = indices.iter().find(|&&i| i >= self.header.frames) {
            bail!("frame {bad} out of range ({} frames)", self.header.frames);
        }
        out.clear();
        out.resize(indices.len() * fb, 0);
        let mut i = 0;
        while i < indices.len() {
            let start = indices[i];
            if start >= self.header.frames {
                bail!("frame {start} out of range ({} frames)", self.header.frames);
            }
            let mut run = 1;
            while i + run < indices.len()
                && indices[i + run] == start + run as u32
                && start + (run as u32) < self.header.frames
            {
                run += 1;
            }
            self.file
                .seek(SeekFrom::Start(HEADER_LEN + start as u64 * fb as u64))?;
            self.file.read_exact(&mut out[i * fb..(i + run) * fb])?;
            i += run;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_partial_files_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("v.cache");
        let mut w = CacheWriter::create(&dest, 2, 3, 15.0).unwrap();
        for f in 0..5u8 {
            w.push(&[f; 18]).unwrap();
        }
        assert!(!dest.exists(), "incomplete cache must not be visible");
        let header = w.finish().unwrap();
        assert_eq!(header.frames, 5);

        let mut r = CacheReader::open(&dest).unwrap();
        assert_eq!(r.header, header);
        let mut out = Vec::new();
        r.read_frames(&[1, 2, 4], &mut out).unwrap();
        assert_eq!(out.len(), 3 * 18);
        assert!(out[..18].iter().all(|&b| b == 1));
        assert!(out[18..36].iter().all(|&b| b == 2));
        assert!(out[36..].iter().all(|&b| b == 4));
        assert!(r.read_frames(&[5], &mut out).is_err());
    }

    fn header(frames: u32, height: u32, width: u32) -> [u8; HEADER_LEN as usize] {
        CacheHeader {
            frames,
            height,
            width,
            fps: 15.0,
        }
        .encode()
    }

    #[test]
    fn headers_whose_sizes_overflow_are_refused() {
        // Fuzz finding: 1212367106 frames of 143685×131072 overflowed `frames × frame_bytes`.
        let e = CacheHeader::parse(&header(1212367106, 143685, 131072), 101).unwrap_err();
        assert!(e.to_string().contains("more than 2^64"), "{e}");
        // A frame size that overflows by itself, even with no frames at all.
        let e = CacheHeader::parse(&header(0, u32::MAX, u32::MAX), 64).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        assert!(CacheHeader::parse(&header(2, 2, 3), 64 + 36).is_ok());
        assert!(CacheHeader::parse(&header(2, 2, 3), 64 + 35).is_err());
        // Out-of-range indices are refused before memory is reserved for them.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("big.cache");
        std::fs::write(&dest, header(0, 65535, 65535)).unwrap();
        let mut r = CacheReader::open(&dest).unwrap();
        let mut out = Vec::new();
        assert!(r.read_frames(&[0; 1000], &mut out).is_err());
        assert!(out.capacity() < 1 << 20);
    }
}
