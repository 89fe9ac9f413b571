//! Reading `.safetensors` files that arrive from outside, without trusting a byte of them: an
//! 8-byte little-endian header length, a JSON header
//! (`{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the tensors' bytes, offsets relative to the end of the header.
//!
//! Checked before anything else is read, with checked arithmetic: the header length against
//! [`Limits::max_header_bytes`] (the safetensors crate's 100 MB) and the file's length; the
//! header as JSON with bounded counts (tensors, dimensions, name lengths) and no duplicate
//! names; every dtype known; `shape × element size` equal to each byte range; the ranges,
//! ordered, tiling the data exactly (no gap, no overlap, nothing past the end). Only then are
//! the selected tensors' bytes read, each range once. libtorch's own reader (which reads the
//! whole file into memory and names the path in its errors) is never used on such files.
use std::collections::HashSet;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};

use anyhow::{Context, bail};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::weights::{self, Dtype, Limits, RawTensor, TensorInfo};

fn dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "BOOL" => Dtype::Bool,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "I32" => Dtype::I32,
        "I64" => Dtype::I64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        _ => return None,
    })
}

/// A safetensors file whose header has been read and checked, its data not yet read.
pub struct SafetensorsFile<R> {
    r: R,
    data_start: u64,
    infos: Vec<TensorInfo>,
    /// Byte range of each tensor, relative to `data_start`.
    ranges: Vec<(u64, u64)>,
    limits: Limits,
}

impl<R: Read + Seek> SafetensorsFile<R> {
    pub fn from_reader(mut r: R, limits: Limits) -> anyhow::Result<Self> {
        let file_len = r.seek(SeekFrom::End(0))?;
        r.rewind()?;
        let mut n = [0u8; 8];
        r.read_exact(&mut n)
            .context("the file is too short to be a safetensors file")?;
        let n = u64::from_le_bytes(n);
        if n > limits.max_header_bytes {
            bail!(
                "the safetensors header is {n} bytes, more than the {} allowed",
                limits.max_header_bytes
            );
        }
        let data_len = (file_len - 8).checked_sub(n).with_context(|| {
            format!("the safetensors header ({n} bytes) runs past the end of the file ({file_len} bytes)")
        })?;
        // The file is known to hold these bytes, so reserving them up front is honest.
        let header = weights::read_exactly(&mut r, n, n)?;
        let entries = parse_header(&header, &limits)?;
        drop(header);
        let (infos, ranges) = check_layout(entries, data_len)?;
        Ok(Self {
            r,
            data_start: 8 + n,
            infos,
            ranges,
            limits,
        })
    }

    /// The tensors, in the order of their bytes in the file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// Read the bytes of the tensors `keep` selects, and only those.
    pub fn read_raw(
        &mut self,
        mut keep: impl FnMut(&TensorInfo) -> bool,
    ) -> anyhow::Result<Vec<RawTensor>> {
        let selected: Vec<usize> = (0..self.infos.len())
            .filter(|&i| keep(&self.infos[i]))
            .collect();
        let max = self.limits.max_tensor_bytes.min(self.limits.max_read_bytes);
        weights::check_total_bytes(selected.iter().map(|&i| &self.infos[i]), max)?;
        let mut out = Vec::with_capacity(selected.len());
        for i in selected {
            let info = &self.infos[i];
            let (begin, end) = self.ranges[i];
            self.r.seek(SeekFrom::Start(self.data_start + begin))?;
            let mut data = weights::read_exactly(&mut self.r, end - begin, end - begin)
                .with_context(|| format!("reading tensor `{}`", info.name))?;
            weights::normalise_bools(info.dtype, &mut data);
            out.push(RawTensor {
                info: info.clone(),
                data,
            });
        }
        Ok(out)
    }
}

/// One header entry as written, before its numbers are checked.
#[derive(Debug)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: [u64; 2],
}

/// Parse the JSON header: counts and lengths are bounded while parsing, so a 100 MB header of
/// tiny entries or of one endless shape fails early instead of filling memory.
fn parse_header(json: &[u8], limits: &Limits) -> anyhow::Result<Vec<Entry>> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let entries = HeaderSeed(limits)
        .deserialize(&mut de)
        .and_then(|e| de.end().map(|()| e))
        .map_err(|e| anyhow::anyhow!("the safetensors header is not valid: {e}"))?;
    Ok(entries)
}

/// The checked tensors and their byte ranges, in file order.
type Layout = (Vec<TensorInfo>, Vec<(u64, u64)>);

/// Check every entry's numbers and that the byte ranges tile `data_len` bytes exactly.
fn check_layout(entries: Vec<Entry>, data_len: u64) -> anyhow::Result<Layout> {
    let mut checked = Vec::with_capacity(entries.len());
    for e in entries {
        let name = e.name;
        let dtype = dtype(&e.dtype).with_context(|| {
            format!(
                "tensor `{name}` has the unsupported dtype {:?}",
                e.dtype.chars().take(20).collect::<String>()
            )
        })?;
        let mut shape = Vec::with_capacity(e.shape.len());
        let mut numel = 1u64;
        for &d in &e.shape {
            let d = i64::try_from(d)
                .ok()
                .with_context(|| format!("tensor `{name}` has a dimension of {d}"))?;
            numel = numel
                .checked_mul(d as u64)
                .with_context(|| format!("tensor `{name}`: its element count overflows"))?;
            shape.push(d);
        }
        let bytes = numel
            .checked_mul(dtype.size() as u64)
            .with_context(|| format!("tensor `{name}`: its byte count overflows"))?;
        let [begin, end] = e.offsets;
        if end.checked_sub(begin) != Some(bytes) {
            bail!(
                "tensor `{name}` has data offsets [{begin}, {end}], but {numel} {dtype:?} \
                 elements take {bytes} bytes"
            );
        }
        checked.push((TensorInfo { name, dtype, shape }, (begin, end)));
    }
    // Ordered by position, the ranges must follow one another from 0 to the end of the data.
    checked.sort_by_key(|(_, r)| *r);
    let mut expected = 0u64;
    for (info, (begin, end)) in &checked {
        if *begin < expected {
            bail!("tensor `{}` overlaps the tensor before it", info.name);
        }
        if *begin > expected {
            bail!(
                "the bytes {expected}..{begin} before tensor `{}` belong to no tensor",
                info.name
            );
        }
        expected = *end;
    }
    if expected != data_len {
        bail!("the tensors cover {expected} bytes, but the file holds {data_len} after the header");
    }
    Ok(checked.into_iter().unzip())
}

struct HeaderSeed<'a>(&'a Limits);

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Vec<Entry>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Vec<Entry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of tensor names to {dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let limits = self.0;
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                // Free-form strings; serde_json's recursion limit bounds any nesting.
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if name.len() > limits.max_name_bytes {
                return Err(de::Error::custom(format_args!(
                    "a tensor name is {} bytes long (at most {})",
                    name.len(),
                    limits.max_name_bytes
                )));
            }
            if entries.len() >= limits.max_tensors {
                return Err(de::Error::custom(format_args!(
                    "more than {} tensors",
                    limits.max_tensors
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format_args!(
                    "the tensor `{name}` is named twice"
                )));
            }
            let (dtype, shape, offsets) = map.next_value_seed(EntrySeed(limits.max_rank))?;
            entries.push(Entry {
                name,
                dtype,
                shape,
                offsets,
            });
        }
        Ok(entries)
    }
}

struct EntrySeed(usize);

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = (String, Vec<u64>, [u64; 2]);

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = (String, Vec<u64>, [u64; 2]);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("{dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        while let Some(field) = map.next_key::<String>()? {
            let dup = match field.as_str() {
                "dtype" => dtype.replace(map.next_value::<String>()?).is_some(),
                "shape" => shape
                    .replace(map.next_value_seed(ShapeSeed(self.0))?)
                    .is_some(),
                "data_offsets" => offsets.replace(map.next_value::<[u64; 2]>()?).is_some(),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    false
                }
            };
            if dup {
                return Err(de::Error::custom(format_args!("`{field}` given twice")));
            }
        }
        Ok((
            dtype.ok_or_else(|| de::Error::missing_field("dtype"))?,
            shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            offsets.ok_or_else(|| de::Error::missing_field("data_offsets"))?,
        ))
    }
}

/// A shape of at most `max_rank` dimensions, refused as soon as it grows longer.
struct ShapeSeed(usize);

impl<'de> DeserializeSeed<'de> for ShapeSeed {
    type Value = Vec<u64>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed {
    type Value = Vec<u64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of dimensions")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(d) = seq.next_element::<u64>()? {
            if v.len() >= self.0 {
                return Err(de::Error::custom(format_args!(
                    "a shape of more than {} dimensions",
                    self.0
                )));
            }
            v.push(d);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tch::{Device, Kind, Tensor};

    /// A safetensors file from a header and data, as the format lays them out.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        f
    }

    fn open(bytes: Vec<u8>) -> anyhow::Result<SafetensorsFile<Cursor<Vec<u8>>>> {
        SafetensorsFile::from_reader(Cursor::new(bytes), Limits::default())
    }

    fn err(bytes: Vec<u8>) -> String {
        match open(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn files_written_by_libtorch_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let b = Tensor::from_slice(&[true, false, true]);
        let c = Tensor::arange(5, (Kind::Int64, Device::Cpu));
        Tensor::write_safetensors(&[("a", &a), ("b", &b), ("c", &c)], &path).unwrap();
        let mut f = SafetensorsFile::from_reader(
            std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
            Limits::default(),
        )
        .unwrap();
        let mut names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        let read: Vec<(String, Tensor)> = f
            .read_raw(|t| t.name != "c")
            .unwrap()
            .into_iter()
            .map(|r| (r.info.name.clone(), r.into_tensor()))
            .collect();
        assert_eq!(read.len(), 2);
        for (name, t) in read {
            match name.as_str() {
                "a" => assert!(t.equal(&a)),
                "b" => assert!(t.equal(&b)),
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn header_lengths_are_bounded_before_anything_is_allocated() {
        // 2^64 - 1 bytes of header claimed by a 20-byte file.
        let mut f = u64::MAX.to_le_bytes().to_vec();
        f.extend(b"{}{}{}{}{}{}");
        let e = err(f);
        assert!(e.contains("more than the 100000000 allowed"), "{e}");
        // Within the limit, but past the end of the file.
        let mut f = 50_000_000u64.to_le_bytes().to_vec();
        f.extend(b"{}");
        let e = err(f);
        assert!(e.contains("runs past the end of the file"), "{e}");
        let e = err(vec![1, 2, 3]);
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn byte_ranges_must_match_shapes_and_tile_the_data() {
        let t = |name: &str, dtype: &str, shape: &str, b: u64, e: u64| {
            format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}"#)
        };
        let one = |entries: &[String], data: usize| {
            file(&format!("{{{}}}", entries.join(",")), &vec![0u8; data])
        };
        // Fine: two tensors back to back, an empty one, metadata.
        let ok = file(
            &format!(
                r#"{{"__metadata__":{{"format":"pt"}},{},{},{}}}"#,
                t("a", "F32", "[2,2]", 0, 16),
                t("b", "I8", "[3]", 16, 19),
                t("z", "F64", "[0,7]", 19, 19)
            ),
            &[0; 19],
        );
        assert_eq!(open(ok).unwrap().tensors().len(), 3);

        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                one(&[t("a", "F32", "[2,2]", 0, 12)], 12),
                "elements take 16 bytes",
            ),
            (
                one(&[t("a", "F32", "[2,2]", 16, 0)], 16),
                "data offsets [16, 0]",
            ),
            (
                one(
                    &[t("a", "F32", "[2]", 0, 8), t("b", "F32", "[2]", 4, 12)],
                    12,
                ),
                "overlaps",
            ),
            (
                one(
                    &[t("a", "F32", "[2]", 0, 8), t("b", "F32", "[2]", 12, 20)],
                    20,
                ),
                "belong to no tensor",
            ),
            (
                one(&[t("a", "F32", "[2]", 0, 8)], 9),
                "cover 8 bytes, but the file holds 9",
            ),
            (
                one(&[t("a", "F32", "[2]", 0, 8)], 4),
                "cover 8 bytes, but the file holds 4",
            ),
            (
                one(&[t("a", "F32", "[4294967296,4294967296,4]", 0, 0)], 0),
                "element count overflows",
            ),
            (
                one(&[t("a", "F64", "[4611686018427387904]", 0, 0)], 0),
                "byte count overflows",
            ),
            (
                one(&[t("a", "F32", "[18446744073709551615]", 0, 0)], 0),
                "a dimension of",
            ),
            (
                one(
                    &[t(
                        "a",
                        "F32",
                        "[1]",
                        18446744073709551611,
                        18446744073709551615,
                    )],
                    0,
                ),
                "belong to no tensor",
            ),
            (one(&[t("a", "U16", "[1]", 0, 2)], 2), "unsupported dtype"),
            (
                one(&[t("a", "F32", "[1]", 0, 4), t("a", "F32", "[1]", 4, 8)], 8),
                "named twice",
            ),
            (
                one(
                    &[t("a", "F32", &format!("[{}]", ["1"; 17].join(",")), 0, 4)],
                    4,
                ),
                "more than 16 dimensions",
            ),
            (
                file(r#"{"a":{"dtype":"F32","shape":[1]}}"#, &[0; 4]),
                "missing field `data_offsets`",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "given twice",
            ),
            (file(r#"{"a":1}"#, &[]), "not valid"),
            (file(r#"[]"#, &[]), "not valid"),
            (file(r#"{} trailing"#, &[]), "not valid"),
        ];
        for (bytes, want) in cases {
            let e = err(bytes);
            assert!(e.contains(want), "wanted `{want}` in: {e}");
        }
    }

    #[test]
    fn header_counts_are_bounded_while_parsing() {
        let entries: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                    i + 1
                )
            })
            .collect();
        let bytes = file(&format!("{{{}}}", entries.join(",")), &[0; 20]);
        let limits = Limits {
            max_tensors: 10,
            ..Limits::default()
        };
        let e = SafetensorsFile::from_reader(Cursor::new(bytes), limits)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("more than 10 tensors"), "{e:#}");
        let long = "n".repeat(2000);
        let e = err(file(
            &format!(r#"{{"{long}":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#),
            &[0],
        ));
        assert!(e.contains("2000 bytes long") && e.len() < 200, "{e}");
        // Deeply nested metadata is skipped without recursion (serde_json ignores values with
        // an explicit stack), so even a 64 KiB stack is enough.
        let deep = format!(
            r#"{{"__metadata__":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let f = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || open(file(&deep, &[])).map(|f| f.tensors().len()).unwrap())
            .unwrap();
        assert_eq!(f.join().unwrap(), 0);
    }

    #[test]
    fn only_selected_tensors_are_read() {
        let header = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"BOOL","shape":[1048576],"data_offsets":[4,1048580]}}"#;
        let mut data = vec![1u8, 2, 3, 4];
        data.extend(vec![7u8; 1 << 20]);
        let mut f = open(file(header, &data)).unwrap();
        assert_eq!(f.r.position(), 8 + header.len() as u64);
        let raw = f.read_raw(|t| t.name == "a").unwrap();
        assert_eq!(raw[0].data, [1, 2, 3, 4]);
        assert_eq!(f.r.position(), 8 + header.len() as u64 + 4);
        // Booleans come out as 0 or 1 whatever the file holds.
        let raw = f.read_raw(|t| t.name == "b").unwrap();
        assert!(raw[0].data.iter().all(|&b| b == 1));
        let limits = Limits {
            max_tensor_bytes: 1000,
            ..Limits::default()
        };
        let mut f = SafetensorsFile::from_reader(Cursor::new(file(header, &data)), limits).unwrap();
        assert!(f.read_raw(|_| true).is_err());
    }
}
