//! Reading weight files that arrive from outside (`.pth`/`.pt` from `torch.save`, or
//! `.safetensors`) so that no file, however crafted, costs more than it plainly contains.
//!
//! Reading happens in three stages, and only the last touches libtorch:
//! 1. [`WeightsFile::open`] reads the structure — the pickle of a `.pth` (bounded in bytes,
//!    objects and nesting) or the JSON header of a `.safetensors` (bounded in bytes) — and
//!    checks every tensor against the bytes that back it with checked arithmetic: sizes,
//!    strides and offsets of a `.pth` view within its storage, byte ranges of a safetensors
//!    entry within the file. No tensor data is read.
//! 2. The caller looks at [`WeightsFile::tensors`] (names, dtypes, shapes) and decides what it
//!    needs — `read_backbone_weights` refuses unknown names and wrong shapes here, before any
//!    storage is read.
//! 3. [`WeightsFile::read_raw`] reads only the selected tensors' bytes (allocations never exceed
//!    what the file holds), and [`WeightsFile::read`] hands them to libtorch.
//!
//! Stages 1 and 2 are pure Rust over any `Read + Seek`, which is what the fuzz targets in
//! `fuzz/` drive. Error messages describe the file, never the server's paths.
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use anyhow::{Context, bail};
use tch::{Kind, Tensor};

use super::{pth, safetensors};

/// Budgets for one weight file. The defaults are far above what a real checkpoint needs (a
/// torchvision state dict's pickle is tens of kilobytes with a few thousand objects and a
/// nesting depth under ten) and far below what would hurt the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest pickle program (`data.pkl`, or the pickles that open a legacy file).
    pub max_pickle_bytes: u64,
    /// Values, stack slots and memo entries a pickle may create, all together.
    pub max_objects: usize,
    /// Bytes those values may occupy in memory (an estimate that errs high).
    pub max_value_bytes: usize,
    /// Deepest nesting of containers.
    pub max_depth: usize,
    /// Tensors in one file.
    pub max_tensors: usize,
    /// Dimensions of one tensor.
    pub max_rank: usize,
    /// Length of one tensor name, so names can be quoted in errors.
    pub max_name_bytes: usize,
    /// Largest safetensors JSON header (the safetensors crate's own limit).
    pub max_header_bytes: u64,
    /// Entries in a zip `.pth`, checked before the zip reader allocates its directory.
    pub max_zip_entries: u64,
    /// Bytes of a zip `.pth`'s central directory.
    pub max_zip_directory_bytes: u64,
    /// Storage bytes read from the file.
    pub max_read_bytes: u64,
    /// Bytes of the tensors handed out.
    pub max_tensor_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pickle_bytes: 64 << 20,
            max_objects: 1_000_000,
            max_value_bytes: 256 << 20,
            max_depth: 100,
            max_tensors: 100_000,
            max_rank: 16,
            max_name_bytes: 1024,
            max_header_bytes: 100_000_000,
            max_zip_entries: 200_000,
            max_zip_directory_bytes: 64 << 20,
            max_read_bytes: 16 << 30,
            max_tensor_bytes: 8 << 30,
        }
    }
}

impl Limits {
    /// Tight budgets for fuzzing: a fuzz input must not be able to reach libFuzzer's memory
    /// limit through a legitimate-looking allocation.
    pub fn fuzzing() -> Self {
        Self {
            max_pickle_bytes: 1 << 20,
            max_objects: 100_000,
            max_value_bytes: 16 << 20,
            max_tensors: 10_000,
            max_header_bytes: 1 << 20,
            max_read_bytes: 64 << 20,
            max_tensor_bytes: 64 << 20,
            ..Self::default()
        }
    }
}

/// Element types both formats can carry and libtorch can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Dtype::Bool => Kind::Bool,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::I16 => Kind::Int16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
        }
    }
}

/// What a file says about one tensor, checked against the bytes that back it but not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
}

impl TensorInfo {
    /// Elements of the tensor; cannot overflow, the readers have checked it.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&s| s as u64).product()
    }

    /// Bytes of the tensor, contiguous.
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// A tensor's contiguous little-endian bytes, read but not yet given to libtorch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    pub info: TensorInfo,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Hand the bytes to libtorch. `from_data_size` copies `numel × element size` bytes from the
    /// pointer without knowing the slice's length, so the length is checked here, always.
    pub fn into_tensor(self) -> Tensor {
        let expected = self.info.bytes();
        assert_eq!(
            self.data.len() as u64,
            expected,
            "tensor {} has {} bytes for {expected}",
            self.info.name,
            self.data.len()
        );
        Tensor::from_data_size(&self.data, &self.info.shape, self.info.dtype.kind())
    }
}

/// Formats recognised by their first bytes, never by the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A `torch.save` zip (PyTorch ≥ 1.6).
    PthZip,
    /// A legacy `torch.save` file: a pickle stream followed by raw storages.
    PthLegacy,
    Safetensors,
}

/// Bytes [`sniff`] looks at.
pub const SNIFF_BYTES: usize = 9;

/// Recognise a weight file from its first [`SNIFF_BYTES`] bytes (fewer if the file is shorter).
pub fn sniff(head: &[u8]) -> Option<Format> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Format::PthZip)
    } else if head.len() > 8 && head[8] == b'{' {
        // An 8-byte header length, then the JSON header, which always opens with `{`.
        Some(Format::Safetensors)
    } else if head.first() == Some(&0x80) {
        // The PROTO opcode every pickle since protocol 2 starts with.
        Some(Format::PthLegacy)
    } else {
        None
    }
}

/// Read up to [`SNIFF_BYTES`] bytes from the start of `r`.
fn read_head<R: Read + Seek>(r: &mut R) -> anyhow::Result<Vec<u8>> {
    r.rewind()?;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    r.by_ref().take(SNIFF_BYTES as u64).read_to_end(&mut head)?;
    r.rewind()?;
    Ok(head)
}

/// A weight file opened and checked, its tensor data not yet read.
pub struct WeightsFile<R> {
    inner: Inner<R>,
}

enum Inner<R> {
    Pth(pth::Checkpoint<R>),
    Safetensors(safetensors::SafetensorsFile<R>),
}

impl WeightsFile<BufReader<File>> {
    /// Open and check a weight file; see the module documentation for what is read when.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).context("opening the weights file")?;
        Self::from_reader(BufReader::new(file), Limits::default())
    }
}

impl<R: Read + Seek> WeightsFile<R> {
    pub fn from_reader(mut r: R, limits: Limits) -> anyhow::Result<Self> {
        let head = read_head(&mut r)?;
        let inner = match sniff(&head) {
            Some(Format::Safetensors) => {
                Inner::Safetensors(safetensors::SafetensorsFile::from_reader(r, limits)?)
            }
            Some(Format::PthZip | Format::PthLegacy) => {
                Inner::Pth(pth::Checkpoint::from_reader(r, limits)?)
            }
            None => bail!("neither a PyTorch checkpoint (torch.save) nor a safetensors file"),
        };
        Ok(Self { inner })
    }

    /// The tensors the file declares, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        match &self.inner {
            Inner::Pth(c) => c.tensors(),
            Inner::Safetensors(s) => s.tensors(),
        }
    }

    /// Read the bytes of the tensors `keep` selects (in file order), and nothing else.
    pub fn read_raw(
        &mut self,
        keep: impl FnMut(&TensorInfo) -> bool,
    ) -> anyhow::Result<Vec<RawTensor>> {
        match &mut self.inner {
            Inner::Pth(c) => c.read_raw(keep),
            Inner::Safetensors(s) => s.read_raw(keep),
        }
    }

    /// [`WeightsFile::read_raw`], as libtorch tensors.
    pub fn read(
        &mut self,
        keep: impl FnMut(&TensorInfo) -> bool,
    ) -> anyhow::Result<Vec<(String, Tensor)>> {
        Ok(named_tensors(self.read_raw(keep)?))
    }
}

/// Sum `bytes` of the selected tensors against `max`, before anything is allocated for them.
pub(crate) fn check_total_bytes<'a>(
    selected: impl Iterator<Item = &'a TensorInfo>,
    max: u64,
) -> anyhow::Result<()> {
    let mut total = 0u64;
    for t in selected {
        total = total.saturating_add(t.bytes());
        if total > max {
            bail!("the selected tensors hold more than {max} bytes");
        }
    }
    Ok(())
}

/// Read exactly `len` bytes from `r`, reserving no more than `cap_hint` up front: a declared
/// length is a claim, so beyond what the caller knows the file holds (its length, say), memory
/// grows only as bytes actually arrive.
pub(crate) fn read_exactly(r: &mut impl Read, len: u64, cap_hint: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(cap_hint) as usize);
    r.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file ends after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// Why a strided view cannot be read from its storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("it has {sizes} sizes but {strides} strides")]
    RankMismatch { sizes: usize, strides: usize },
    #[error("it has {0} dimensions, more than {1}")]
    TooManyDims(usize, usize),
    #[error("it has a negative size ({0})")]
    NegativeSize(i64),
    #[error("it has a negative storage offset ({0})")]
    NegativeOffset(i64),
    #[error("its element count overflows")]
    NumelOverflow,
    #[error("stride {stride} on a dimension of size {size}: zero and negative strides are refused")]
    BadStride { size: i64, stride: i64 },
    #[error("it reaches element {last} of a storage of {storage} elements")]
    OutOfBounds { last: u128, storage: u64 },
    #[error("its offset {offset} is past the end of a storage of {storage} elements")]
    OffsetPastEnd { offset: i64, storage: u64 },
    #[error("it is a self-overlapping view (sizes {size:?}, strides {stride:?})")]
    SelfOverlap { size: Vec<i64>, stride: Vec<i64> },
}

/// Check a strided view (PyTorch's `as_strided(size, stride, offset)`) against a storage of
/// `storage_numel` elements, with checked arithmetic throughout, and return how many storage
/// elements it reaches (0 for an empty view). Refused: negative sizes or offset; zero or
/// negative strides on a dimension of size above 1 (the stride of a size-0/1 dimension is never
/// applied); views that reach past the storage; views whose elements overlap one another (so a
/// small storage cannot be blown up into a large tensor).
pub fn check_view(
    size: &[i64],
    stride: &[i64],
    offset: i64,
    storage_numel: u64,
    max_rank: usize,
) -> Result<u64, ViewError> {
    if size.len() != stride.len() {
        return Err(ViewError::RankMismatch {
            sizes: size.len(),
            strides: stride.len(),
        });
    }
    if size.len() > max_rank {
        return Err(ViewError::TooManyDims(size.len(), max_rank));
    }
    if let Some(&s) = size.iter().find(|&&s| s < 0) {
        return Err(ViewError::NegativeSize(s));
    }
    if offset < 0 {
        return Err(ViewError::NegativeOffset(offset));
    }
    let mut numel: u64 = 1;
    for &s in size {
        numel = numel
            .checked_mul(s as u64)
            .ok_or(ViewError::NumelOverflow)?;
    }
    if numel == 0 {
        // Nothing is read, but an offset beyond the storage is still a malformed file.
        if offset as u64 > storage_numel {
            return Err(ViewError::OffsetPastEnd {
                offset,
                storage: storage_numel,
            });
        }
        return Ok(0);
    }
    // Each term is below 2^126 in u128; the sum is still checked, for ranks above 4.
    let out_of_bounds = |last| ViewError::OutOfBounds {
        last,
        storage: storage_numel,
    };
    let mut last = offset as u128;
    let mut dims: Vec<(u64, u64)> = Vec::with_capacity(size.len());
    for (&s, &st) in size.iter().zip(stride) {
        if s <= 1 {
            continue;
        }
        if st <= 0 {
            return Err(ViewError::BadStride {
                size: s,
                stride: st,
            });
        }
        last = last
            .checked_add((s as u128 - 1) * st as u128)
            .ok_or(out_of_bounds(u128::MAX))?;
        dims.push((st as u64, s as u64));
    }
    if last >= storage_numel as u128 {
        return Err(out_of_bounds(last));
    }
    // Distinct indices reach distinct elements when, ordered by stride, each stride steps over
    // everything the smaller ones span (the contiguous and permuted layouts PyTorch saves).
    dims.sort_unstable();
    let mut span: u128 = 1;
    for &(st, s) in &dims {
        if (st as u128) < span {
            return Err(ViewError::SelfOverlap {
                size: size.to_vec(),
                stride: stride.to_vec(),
            });
        }
        span = st as u128 * s as u128;
    }
    Ok(last as u64 + 1)
}

/// Copy a view that [`check_view`] accepted out of `storage` (`element_size`-byte elements)
/// into contiguous row-major bytes.
pub fn gather(
    storage: &[u8],
    element_size: usize,
    size: &[i64],
    stride: &[i64],
    offset: u64,
) -> Vec<u8> {
    let numel: usize = size.iter().map(|&s| s as usize).product();
    let mut out = Vec::with_capacity(numel * element_size);
    if numel == 0 {
        return out;
    }
    // Size-1 dimensions never move the index; dropping them leaves the real loop.
    let dims: Vec<(usize, usize)> = size
        .iter()
        .zip(stride)
        .filter(|(s, _)| **s > 1)
        .map(|(&s, &st)| (s as usize, st as usize))
        .collect();
    let base = offset as usize;
    let contiguous = {
        let mut expect = 1usize;
        dims.iter().rev().all(|&(s, st)| {
            let ok = st == expect;
            expect *= s;
            ok
        })
    };
    if contiguous {
        out.extend_from_slice(&storage[base * element_size..(base + numel) * element_size]);
        return out;
    }
    let (inner_size, inner_stride) = *dims.last().expect("a non-contiguous view has a dimension");
    let outer = &dims[..dims.len() - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let start = base
            + outer
                .iter()
                .zip(&index)
                .map(|(&(_, st), &i)| i * st)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(
                &storage[start * element_size..(start + inner_size) * element_size],
            );
        } else {
            for i in 0..inner_size {
                let e = (start + i * inner_stride) * element_size;
                out.extend_from_slice(&storage[e..e + element_size]);
            }
        }
        // Odometer over the outer dimensions, last fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d].0 {
                break;
            }
            index[d] = 0;
        }
    }
}

/// libtorch expects booleans to be 0 or 1; a file may hold any byte.
pub(crate) fn normalise_bools(dtype: Dtype, data: &mut [u8]) {
    if dtype == Dtype::Bool {
        for b in data {
            *b = (*b != 0) as u8;
        }
    }
}

/// A name from the file, bounded so that it can be quoted in an error message.
pub(crate) fn check_name(name: &str, limits: &Limits) -> anyhow::Result<()> {
    if name.len() > limits.max_name_bytes {
        let mut cut = 40;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        bail!(
            "a tensor name is {} bytes long (at most {}): `{}…`",
            name.len(),
            limits.max_name_bytes,
            &name[..cut]
        );
    }
    Ok(())
}

/// Checked raw tensors as libtorch tensors under their names.
pub fn named_tensors(raw: Vec<RawTensor>) -> Vec<(String, Tensor)> {
    raw.into_iter()
        .map(|raw| (raw.info.name.clone(), raw.into_tensor()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn views_are_checked_against_their_storage() {
        // Contiguous and permuted layouts are fine, and report the elements they reach.
        assert_eq!(check_view(&[2, 3], &[3, 1], 0, 6, 16), Ok(6));
        assert_eq!(check_view(&[2, 3], &[1, 2], 0, 6, 16), Ok(6));
        assert_eq!(check_view(&[2, 3], &[3, 1], 4, 10, 16), Ok(10));
        // Size-1 and size-0 dimensions may carry any stride: it is never applied.
        assert_eq!(check_view(&[1, 4], &[-7, 1], 0, 4, 16), Ok(4));
        assert_eq!(check_view(&[0, 4], &[0, -1], 0, 0, 16), Ok(0));
        assert_eq!(check_view(&[], &[], 3, 4, 16), Ok(4));

        assert!(matches!(
            check_view(&[16384, 16384], &[0, 0], 0, 1, 16),
            Err(ViewError::BadStride { .. })
        ));
        assert!(matches!(
            check_view(&[4], &[-1], 3, 4, 16),
            Err(ViewError::BadStride { .. })
        ));
        assert!(matches!(
            check_view(&[2, 3], &[3, 1], 1, 6, 16),
            Err(ViewError::OutOfBounds {
                last: 6,
                storage: 6
            })
        ));
        assert!(matches!(
            check_view(&[2], &[1], -1, 6, 16),
            Err(ViewError::NegativeOffset(-1))
        ));
        assert!(matches!(
            check_view(&[-2], &[1], 0, 6, 16),
            Err(ViewError::NegativeSize(-2))
        ));
        assert!(matches!(
            check_view(&[2, 3], &[1], 0, 6, 16),
            Err(ViewError::RankMismatch { .. })
        ));
        assert!(matches!(
            check_view(&[1; 17], &[1; 17], 0, 6, 16),
            Err(ViewError::TooManyDims(17, 16))
        ));
        assert!(matches!(
            check_view(&[0, 4], &[1, 1], 7, 6, 16),
            Err(ViewError::OffsetPastEnd { .. })
        ));
        // A small storage viewed as a large tensor with overlapping rows.
        assert!(matches!(
            check_view(&[4096, 4096], &[1, 1], 0, 8191, 16),
            Err(ViewError::SelfOverlap { .. })
        ));
    }

    #[test]
    fn view_arithmetic_cannot_overflow() {
        let big = i64::MAX;
        assert_eq!(
            check_view(&[big, big], &[1, 1], 0, u64::MAX, 16),
            Err(ViewError::NumelOverflow)
        );
        assert!(matches!(
            check_view(&[2], &[big], big, 1 << 40, 16),
            Err(ViewError::OutOfBounds { .. })
        ));
        // Sixteen dimensions of maximal strides: far past any storage, and no overflow.
        assert!(matches!(
            check_view(&[2; 16], &[big; 16], big, u64::MAX, 16),
            Err(ViewError::OutOfBounds { .. })
        ));
        assert!(matches!(
            check_view(&[big], &[big], 0, u64::MAX, 16),
            Err(ViewError::OutOfBounds { .. })
        ));
        // Strides whose products overflow 64 bits are judged in 128.
        let r = check_view(&[3, 3, 3], &[1 << 62, 1 << 62, 1], 0, u64::MAX, 16);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn gather_follows_strides() {
        let storage: Vec<u8> = (0u8..24).collect();
        // A transposed 3×4 matrix of 2-byte elements: rows of the result are columns.
        let out = gather(&storage, 2, &[4, 3], &[1, 4], 0);
        let elements: Vec<u8> = out.chunks(2).map(|c| c[0] / 2).collect();
        assert_eq!(elements, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        // A contiguous slice with an offset.
        assert_eq!(gather(&storage, 1, &[2, 2], &[2, 1], 3), [3, 4, 5, 6]);
        // Every second element, then a size-1 dimension with a nonsense stride.
        assert_eq!(gather(&storage, 1, &[3, 1], &[2, -5], 1), [1, 3, 5]);
        assert_eq!(gather(&storage, 4, &[], &[], 2), [8, 9, 10, 11]);
        assert!(gather(&storage, 4, &[0, 3], &[3, 1], 0).is_empty());
    }

    #[test]
    fn sniffing_reads_only_the_first_bytes() {
        /// Counts what is read, to show that recognising an 8 GiB file costs nine bytes.
        struct Counting<R>(R, u64);
        impl<R: Read> Read for Counting<R> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n as u64;
                Ok(n)
            }
        }
        impl<R: Seek> Seek for Counting<R> {
            fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
                self.0.seek(pos)
            }
        }
        let mut file = vec![0u8; 1 << 20];
        file[..4].copy_from_slice(b"\0\0\0\0");
        let mut r = Counting(Cursor::new(file), 0);
        let head = read_head(&mut r).unwrap();
        assert_eq!(r.1, SNIFF_BYTES as u64);
        assert_eq!(sniff(&head), None);
        assert_eq!(sniff(b"PK\x03\x04rest"), Some(Format::PthZip));
        assert_eq!(sniff(b"\x80\x02\x8a\x0a"), Some(Format::PthLegacy));
        assert_eq!(
            sniff(b"\x10\0\0\0\0\0\0\0{\"a\""),
            Some(Format::Safetensors)
        );
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn refusals_never_name_server_paths() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pth");
        std::fs::write(&junk, b"definitely not a checkpoint").unwrap();
        let missing = dir.path().join("missing.pth");
        let truncated = dir.path().join("truncated.pth");
        std::fs::write(&truncated, b"\x80\x02\x8a\x0a\x6c\xfc").unwrap();
        let header_only = dir.path().join("h.safetensors");
        std::fs::write(&header_only, b"\xff\0\0\0\0\0\0\0{}").unwrap();
        let root = dir.path().to_str().unwrap();
        for path in [&junk, &missing, &truncated, &header_only] {
            let err = crate::backbone::read_backbone_weights(crate::backbone::Arch::Resnet18, path)
                .unwrap_err();
            let msg = format!("{err:#}");
            assert!(!msg.contains(root), "{msg}");
            assert!(!msg.contains("/tmp"), "{msg}");
        }
    }

    #[test]
    fn bytes_arrive_before_memory_is_committed() {
        // A claim of 1 TiB from a 10-byte source reserves 10 bytes and fails after reading them.
        let err = read_exactly(&mut &[0u8; 10][..], 1 << 40, 10).unwrap_err();
        assert!(err.to_string().contains("after 10 of"), "{err}");
        assert_eq!(read_exactly(&mut &[7u8; 10][..], 4, 0).unwrap(), [7; 4]);
    }
}
