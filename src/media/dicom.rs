//! DICOM cine loops and DICOM video: one multi-frame object in, the same training cache out as
//! for any other video, and nothing of the object's identity kept.
//!
//! - Pixel data: native (8/16-bit, any photometric interpretation hospitals store: MONOCHROME1/2,
//!   RGB in either planar configuration, YBR_FULL, YBR_FULL_422, PALETTE COLOR), RLE and JPEG
//!   (decoded by `dicom-pixeldata`), and the video transfer syntaxes (MPEG-2, H.264, HEVC: the
//!   encapsulated stream is handed to FFmpeg, through the same guarded open as any upload, with
//!   only the elementary-stream demuxers allowed).
//! - Timing: Frame Time Vector, Frame Time, Cine Rate or Recommended Display Frame Rate, in that
//!   order; without any the frames are taken at the cache rate, and the video says so.
//! - Identity: the worker never answers with an identifier. The patient comes back as a keyed
//!   hash of Patient ID and the study, series and instance UIDs as keyed `2.25` UIDs (the same
//!   within a tenant, unlinkable across tenants); the Basic Application Level Confidentiality
//!   Profile attributes the object carried are named (never their values) so the QA report can
//!   say what was left behind. The source file itself is not kept after caching.
//! - Pixels: the ultrasound imaging region (0018,6011) can be the crop, and configured rectangles
//!   or everything outside that region can be blacked out, before the frames are scaled.
use std::path::Path;

use dicom_core::Tag;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::value::Value as DicomValue;
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use ffmpeg_next as ff;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::CacheWriter;
use super::decode::{
    CacheSpec, Limits, Rejection, VideoInfo, cache_failed, cache_size, cache_too_large, finish,
};

/// A rectangle of source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// What is done to a DICOM object's pixels before they are cached. Part of the cache spec, so
/// that serving treats a model's inputs exactly as its training data was treated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelPolicy {
    /// Crop every frame to the ultrasound imaging region, where the object declares one.
    #[serde(default)]
    pub crop_to_region: bool,
    /// Black out everything outside the ultrasound imaging region (labels, calipers, text).
    #[serde(default)]
    pub mask_outside_region: bool,
    /// Rectangles blacked out in every frame (burned-in names, dates, logos).
    #[serde(default)]
    pub masks: Vec<Rect>,
}

impl PixelPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What ingest asks of a DICOM object beyond its pixels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DicomJob {
    /// The tenant's de-identification key (hex) for the keyed replacements; without it no
    /// patient or UID is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deid_key: Option<String>,
    /// The attribute (keyword, or `gggg,eeee`) whose value labels the video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_attribute: Option<String>,
    /// Only read the header: the answer has the object's facts and frame count, no cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// The other single-frame objects of the source's series: all of them, ordered by
    /// Instance Number (then acquisition or content time), are cached as one clip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<std::path::PathBuf>,
}

/// Direct identifiers: never a label, whatever a dataset asks.
#[allow(deprecated)]
const NEVER_A_LABEL: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_ADDRESS,
    tags::PATIENT_TELEPHONE_NUMBERS,
    tags::PATIENT_MOTHER_BIRTH_NAME,
    tags::OTHER_PATIENT_I_DS,
    tags::OTHER_PATIENT_NAMES,
    tags::MEDICAL_RECORD_LOCATOR,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::OPERATORS_NAME,
    tags::PHYSICIANS_OF_RECORD,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::REQUESTING_PHYSICIAN,
    tags::ACCESSION_NUMBER,
    tags::STUDY_ID,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::DEVICE_SERIAL_NUMBER,
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
];

/// The tag a label attribute names (`SeriesDescription`, `0008,103E` or `(0008,103E)`), or why
/// it cannot be one: unknown, a sequence, or a direct identifier.
pub fn label_tag(name: &str) -> Result<Tag, String> {
    let t = name.trim().trim_start_matches('(').trim_end_matches(')');
    let tag = match t.split_once(',') {
        Some((g, e)) => {
            let g = u16::from_str_radix(g.trim(), 16);
            let e = u16::from_str_radix(e.trim(), 16);
            match (g, e) {
                (Ok(g), Ok(e)) => Tag(g, e),
                _ => return Err(format!("`{name}` is not a tag (gggg,eeee in hex)")),
            }
        }
        None => StandardDataDictionary
            .by_name(t)
            .map(|e| e.tag())
            .ok_or_else(|| format!("`{name}` is not a DICOM attribute keyword"))?,
    };
    if NEVER_A_LABEL.contains(&tag) {
        return Err(format!(
            "`{name}` identifies a person, a study or an institution and cannot be a label"
        ));
    }
    if tag == tags::PIXEL_DATA || tag.group() == 0x0002 {
        return Err(format!("`{name}` cannot be a label"));
    }
    Ok(tag)
}

/// What the worker tells about a DICOM object: no identifier, only keyed replacements.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DicomFacts {
    pub sop_class_uid: String,
    pub modality: Option<String>,
    pub transfer_syntax: String,
    pub photometric: String,
    /// `frame_time_vector`, `frame_time`, `cine_rate`, `recommended_display_frame_rate`,
    /// `stream` (the encapsulated video's own) or `assumed` (none: the cache rate).
    pub frame_rate_source: String,
    /// Keyed hash of Patient ID (`pt-…`), when the object has one and a key was given.
    pub patient: Option<String>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub sop_uid: Option<String>,
    /// Burned In Annotation (0028,0301) as the object states it: `YES`, `NO`, or absent.
    pub burned_in_annotation: Option<String>,
    /// The ultrasound imaging region, when declared.
    pub ultrasound_region: Option<Rect>,
    pub cropped: bool,
    /// Rectangles blacked out (configured, and the outside of the region as up to 4 bands).
    pub masked: Vec<Rect>,
    /// Keywords of the identifying attributes the object carried; none of them is kept.
    pub removed: Vec<String>,
    /// Keywords of the identifiers replaced by keyed values (Patient ID, UIDs).
    pub replaced: Vec<String>,
    /// Private attributes the object carried (none is kept).
    pub private_attributes: u32,
    /// The label attribute's value, when one was asked for and the object has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Whether `path` is a DICOM Part 10 file (128-byte preamble, then `DICM`).
pub fn is_dicom(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[128..] == b"DICM"
}

/// The video transfer syntaxes: the pixel data is one encapsulated MPEG-2, H.264 or HEVC stream.
const VIDEO_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.102",
    "1.2.840.10008.1.2.4.103",
    "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106",
    "1.2.840.10008.1.2.4.107",
    "1.2.840.10008.1.2.4.108",
    // The fragmentable variants (the stream split over fragments at any byte).
    "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106.1",
];

/// Native (uncompressed) transfer syntaxes: implicit and explicit little endian, deflated,
/// explicit big endian (retired).
const NATIVE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
];

/// Compressed image syntaxes decoded frame by frame: RLE, JPEG baseline/extended/lossless.
const IMAGE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

/// Attributes of the Basic Application Level Confidentiality Profile (PS3.15 Table E.1-1) that
/// identify a patient, a person or an institution, or date the encounter. vidtune keeps none of
/// them; the report names those an object carried. Retired attributes count: old objects carry
/// them.
#[allow(deprecated)]
const IDENTIFYING: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_SEX,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::PATIENT_ADDRESS,
    tags::PATIENT_TELEPHONE_NUMBERS,
    tags::PATIENT_MOTHER_BIRTH_NAME,
    tags::OTHER_PATIENT_I_DS,
    tags::OTHER_PATIENT_NAMES,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::MEDICAL_RECORD_LOCATOR,
    tags::ETHNIC_GROUP,
    tags::OCCUPATION,
    tags::MILITARY_RANK,
    tags::BRANCH_OF_SERVICE,
    tags::COUNTRY_OF_RESIDENCE,
    tags::REGION_OF_RESIDENCE,
    tags::ADDITIONAL_PATIENT_HISTORY,
    tags::PATIENT_COMMENTS,
    tags::RESPONSIBLE_PERSON,
    tags::ADMITTING_DIAGNOSES_DESCRIPTION,
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::INSTITUTIONAL_DEPARTMENT_NAME,
    tags::INSTITUTION_CODE_SEQUENCE,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::REFERRING_PHYSICIAN_ADDRESS,
    tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
    tags::PHYSICIANS_OF_RECORD,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::OPERATORS_NAME,
    tags::REQUESTING_PHYSICIAN,
    tags::ACCESSION_NUMBER,
    tags::STUDY_ID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::SERIES_DATE,
    tags::SERIES_TIME,
    tags::ACQUISITION_DATE,
    tags::ACQUISITION_TIME,
    tags::ACQUISITION_DATE_TIME,
    tags::CONTENT_DATE,
    tags::CONTENT_TIME,
    tags::INSTANCE_CREATION_DATE,
    tags::INSTANCE_CREATION_TIME,
    tags::STATION_NAME,
    tags::DEVICE_SERIAL_NUMBER,
    tags::STUDY_DESCRIPTION,
    tags::SERIES_DESCRIPTION,
    tags::PROTOCOL_NAME,
    tags::REQUEST_ATTRIBUTES_SEQUENCE,
    tags::PERFORMED_PROCEDURE_STEP_ID,
    tags::PERFORMED_PROCEDURE_STEP_DESCRIPTION,
    tags::REQUESTED_PROCEDURE_DESCRIPTION,
    tags::IMAGE_COMMENTS,
    tags::DERIVATION_DESCRIPTION,
    tags::FRAME_OF_REFERENCE_UID,
    tags::INSTANCE_CREATOR_UID,
    tags::STORAGE_MEDIA_FILE_SET_UID,
    tags::REFERENCED_SOP_INSTANCE_UID,
];

/// Keyed replacements: HMAC-SHA-256 under the tenant's de-identification key.
pub struct Pseudonyms {
    key: Vec<u8>,
}

impl Pseudonyms {
    /// `key_hex`: the tenant's key, hex.
    pub fn from_hex(key_hex: &str) -> Option<Self> {
        let key = hex::decode(key_hex).ok()?;
        (!key.is_empty()).then_some(Self { key })
    }

    fn mac(&self, domain: &str, value: &str) -> [u8; 32] {
        hmac_sha256(
            &self.key,
            &[domain.as_bytes(), b"\0", value.trim().as_bytes()],
        )
    }

    /// The patient, as vidtune stores it: `pt-` and 16 hex digits.
    pub fn patient(&self, patient_id: &str) -> String {
        format!("pt-{}", hex::encode(&self.mac("patient", patient_id)[..8]))
    }

    /// A UID replaced by a `2.25` UID derived from it (the same for the same tenant and UID).
    pub fn uid(&self, uid: &str) -> String {
        let mac = self.mac("uid", uid.trim_end_matches('\0'));
        let n = u128::from_be_bytes(mac[..16].try_into().expect("16 bytes"));
        format!("2.25.{n}")
    }
}

/// HMAC-SHA-256 (RFC 2104) of the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The imaging properties of the pixel data.
#[derive(Debug, Clone)]
struct Pixels {
    rows: u32,
    cols: u32,
    frames: u32,
    samples: u16,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    planar: u16,
    photometric: String,
    slope: f64,
    intercept: f64,
    window: Option<(f64, f64)>,
    palette: Option<[Vec<u8>; 3]>,
    palette_first: i64,
}

fn reject(code: &str, detail: impl Into<String>) -> Rejection {
    Rejection::new(code, detail)
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.element_opt(tag).ok()??.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_owned())
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let v = obj.element_opt(tag).ok()??.to_multi_float64().ok()?;
    (!v.is_empty()).then_some(v)
}

impl Pixels {
    fn read(obj: &InMemDicomObject) -> Result<Self, Rejection> {
        let need = |tag: Tag, name: &str| {
            int(obj, tag).ok_or_else(|| {
                reject(
                    "corrupt",
                    format!("the DICOM object has no readable {name}"),
                )
            })
        };
        let rows = need(tags::ROWS, "Rows")?;
        let cols = need(tags::COLUMNS, "Columns")?;
        let samples = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        let bits_allocated = int(obj, tags::BITS_ALLOCATED).unwrap_or(8);
        let bits_stored = int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
        let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
        if !(1..=65535).contains(&rows) || !(1..=65535).contains(&cols) {
            return Err(reject(
                "corrupt",
                format!("a frame of {cols}×{rows} pixels"),
            ));
        }
        if !(samples == 1 || samples == 3)
            || !(bits_allocated == 8 || bits_allocated == 16)
            || !(1..=bits_allocated).contains(&bits_stored)
        {
            return Err(reject(
                "unsupported_pixel_data",
                format!(
                    "{samples} samples of {bits_allocated} bits ({bits_stored} stored) per pixel; \
                     vidtune reads 1 or 3 samples of 8 or 16 bits"
                ),
            ));
        }
        if !(1..=10_000_000).contains(&frames) {
            return Err(reject("corrupt", format!("Number of Frames is {frames}")));
        }
        let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_else(|| if samples == 3 { "RGB" } else { "MONOCHROME2" }.into());
        if photometric == "YBR_FULL_422" && cols % 2 == 1 {
            return Err(reject(
                "corrupt",
                "YBR_FULL_422 pixel data needs an even number of columns",
            ));
        }
        let window = match (
            floats(obj, tags::WINDOW_CENTER),
            floats(obj, tags::WINDOW_WIDTH),
        ) {
            (Some(c), Some(w)) if w[0] >= 1.0 => Some((c[0], w[0])),
            _ => None,
        };
        let mut palette = None;
        let mut palette_first = 0;
        if photometric == "PALETTE COLOR" {
            let (p, first) = read_palette(obj)?;
            palette = Some(p);
            palette_first = first;
        }
        Ok(Self {
            rows: rows as u32,
            cols: cols as u32,
            frames: frames as u32,
            samples: samples as u16,
            bits_allocated: bits_allocated as u16,
            bits_stored: bits_stored as u16,
            signed: int(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            planar: int(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0) as u16,
            photometric,
            slope: floats(obj, tags::RESCALE_SLOPE).map_or(1.0, |v| v[0]),
            intercept: floats(obj, tags::RESCALE_INTERCEPT).map_or(0.0, |v| v[0]),
            window,
            palette,
            palette_first,
        })
    }

    fn frame_bytes(&self) -> usize {
        let pixels = self.rows as usize * self.cols as usize;
        let per_pixel = if self.photometric == "YBR_FULL_422" {
            // Two samples per pixel on average: Y Y Cb Cr for each pair.
            2
        } else {
            self.samples as usize
        };
        pixels * per_pixel * (self.bits_allocated as usize / 8)
    }

    /// One frame of native samples to packed RGB24 at the source size.
    fn to_rgb(&self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Rejection> {
        let n = self.rows as usize * self.cols as usize;
        out.clear();
        out.reserve(n * 3);
        let wide = self.bits_allocated == 16;
        let sample = |i: usize| -> i64 {
            let raw = if wide {
                u16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as i64
            } else {
                data[i] as i64
            };
            let bits = self.bits_stored as u32;
            let mask = if bits >= 64 { -1 } else { (1i64 << bits) - 1 };
            let v = raw & mask;
            if self.signed && bits > 0 && v >> (bits - 1) & 1 == 1 {
                v - (1i64 << bits)
            } else {
                v
            }
        };
        // Colour samples to 8 bits over the range the stored bits hold (12-bit RGB is not dark).
        let top = (1i64 << self.bits_stored.min(16)) - 1;
        let to8 = |v: i64| -> u8 {
            if top == 255 {
                v.clamp(0, 255) as u8
            } else {
                (v.clamp(0, top) * 255 / top) as u8
            }
        };
        match self.photometric.as_str() {
            "MONOCHROME1" | "MONOCHROME2" => {
                let lut = self.grey_lut();
                let invert = self.photometric == "MONOCHROME1";
                for i in 0..n {
                    let g = lut(sample(i));
                    let g = if invert { 255 - g } else { g };
                    out.extend_from_slice(&[g, g, g]);
                }
            }
            "RGB" | "YBR_FULL" => {
                let at = |p: usize, c: usize| {
                    if self.planar == 1 {
                        sample(c * n + p)
                    } else {
                        sample(p * 3 + c)
                    }
                };
                for p in 0..n {
                    let (a, b, c) = (to8(at(p, 0)), to8(at(p, 1)), to8(at(p, 2)));
                    if self.photometric == "RGB" {
                        out.extend_from_slice(&[a, b, c]);
                    } else {
                        out.extend_from_slice(&ybr_to_rgb(a, b, c));
                    }
                }
            }
            "YBR_FULL_422" => {
                // Each pair of pixels in a row: Y1 Y2 Cb Cr.
                let cols = self.cols as usize;
                for r in 0..self.rows as usize {
                    for c in 0..cols {
                        let pair = (r * cols + c) / 2 * 4;
                        let y = to8(sample(pair + (c & 1)));
                        let (cb, cr) = (to8(sample(pair + 2)), to8(sample(pair + 3)));
                        out.extend_from_slice(&ybr_to_rgb(y, cb, cr));
                    }
                }
            }
            "PALETTE COLOR" => {
                let lut = self.palette.as_ref().expect("read with the photometric");
                let len = lut[0].len() as i64;
                for i in 0..n {
                    let idx = (sample(i) - self.palette_first).clamp(0, len - 1) as usize;
                    out.extend_from_slice(&[lut[0][idx], lut[1][idx], lut[2][idx]]);
                }
            }
            other => {
                return Err(reject(
                    "unsupported_pixel_data",
                    format!("the photometric interpretation {other} is not supported"),
                ));
            }
        }
        Ok(())
    }

    /// Grey levels to 8 bits: the rescale, then the first window when the object gives one,
    /// else the range the stored bits can hold.
    fn grey_lut(&self) -> impl Fn(i64) -> u8 + '_ {
        let (lo, hi) = match self.window {
            Some((c, w)) => (c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0),
            None => {
                let bits = self.bits_stored as i32;
                let (min, max) = if self.signed {
                    (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
                } else {
                    (0.0, 2f64.powi(bits) - 1.0)
                };
                let a = min * self.slope + self.intercept;
                let b = max * self.slope + self.intercept;
                (a.min(b), a.max(b))
            }
        };
        let span = (hi - lo).max(1e-9);
        move |v: i64| {
            let x = v as f64 * self.slope + self.intercept;
            ((x - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8
        }
    }
}

/// Full-range YCbCr (JFIF, as DICOM's YBR_FULL) to RGB.
fn ybr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (y as f32, cb as f32 - 128.0, cr as f32 - 128.0);
    let c = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    [
        c(y + 1.402 * cr),
        c(y - 0.344_136 * cb - 0.714_136 * cr),
        c(y + 1.772 * cb),
    ]
}

/// The three palette lookup tables, each to 8 bits, and the first index they map.
fn read_palette(obj: &InMemDicomObject) -> Result<([Vec<u8>; 3], i64), Rejection> {
    let bad = |d: &str| reject("unsupported_pixel_data", format!("PALETTE COLOR: {d}"));
    if obj
        .element_opt(tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA)
        .ok()
        .flatten()
        .is_some()
    {
        return Err(bad("segmented palettes are not supported"));
    }
    let mut out: [Vec<u8>; 3] = Default::default();
    let mut first = 0;
    for (i, (desc, data)) in [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let d = obj
            .element_opt(desc)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(|| bad("no readable lookup table descriptor"))?;
        let entries = if d[0] == 0 { 65536 } else { d[0] as usize };
        first = d[1];
        let bytes = obj
            .element_opt(data)
            .ok()
            .flatten()
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(|| bad("no lookup table data"))?;
        let lut: Vec<u8> = match d[2] {
            // 16-bit entries: the high byte. Some writers store 8-bit entries in 16-bit words.
            16 if bytes.len() >= entries * 2 => bytes
                .chunks_exact(2)
                .take(entries)
                .map(|w| (u16::from_le_bytes([w[0], w[1]]) >> 8) as u8)
                .collect(),
            8 if bytes.len() >= entries * 2 => {
                bytes.chunks_exact(2).take(entries).map(|w| w[0]).collect()
            }
            8 if bytes.len() >= entries => bytes[..entries].to_vec(),
            _ => return Err(bad("the lookup table data is shorter than its descriptor")),
        };
        out[i] = lut;
    }
    Ok((out, first))
}

/// When each frame was taken.
#[derive(Debug, Clone)]
enum Timing {
    /// Seconds from the first frame, one per frame (Frame Time Vector).
    Listed(Vec<f64>),
    /// A constant interval in seconds.
    Every(f64),
}

impl Timing {
    fn at(&self, i: u64) -> f64 {
        match self {
            Timing::Listed(t) => t.get(i as usize).copied().unwrap_or(f64::MAX),
            Timing::Every(d) => i as f64 * d,
        }
    }

    /// The mean rate.
    fn fps(&self) -> Option<f64> {
        match self {
            Timing::Listed(t) => {
                let span = t.last().copied().unwrap_or(0.0);
                (span > 0.0).then(|| (t.len() - 1) as f64 / span)
            }
            Timing::Every(d) => Some(1.0 / d),
        }
    }
}

/// The frames' timing and where it came from; `None` when the object says nothing about it.
fn frame_times(obj: &InMemDicomObject, frames: u32) -> (Option<Timing>, &'static str) {
    let n = frames as usize;
    if let Some(v) = floats(obj, tags::FRAME_TIME_VECTOR)
        && v.len() >= n
        && v.iter().all(|x| x.is_finite() && *x >= 0.0)
    {
        // Increments in ms; the first is the offset of the first frame (usually 0).
        let mut t = 0.0;
        let times = v[..n]
            .iter()
            .map(|ms| {
                t += ms / 1000.0;
                t
            })
            .collect::<Vec<_>>();
        let first = times[0];
        if times.last().copied().unwrap_or(0.0) > first || n == 1 {
            return (
                Some(Timing::Listed(
                    times.into_iter().map(|x| x - first).collect(),
                )),
                "frame_time_vector",
            );
        }
    }
    let rate = |fps: f64| (fps.is_finite() && fps > 0.0 && fps <= 1000.0).then_some(fps);
    let uniform = |fps: f64| Some(Timing::Every(1.0 / fps));
    if let Some(fps) = floats(obj, tags::FRAME_TIME).and_then(|v| rate(1000.0 / v[0])) {
        return (uniform(fps), "frame_time");
    }
    if let Some(fps) = floats(obj, tags::CINE_RATE).and_then(|v| rate(v[0])) {
        return (uniform(fps), "cine_rate");
    }
    if let Some(fps) = floats(obj, tags::RECOMMENDED_DISPLAY_FRAME_RATE).and_then(|v| rate(v[0])) {
        return (uniform(fps), "recommended_display_frame_rate");
    }
    (None, "assumed")
}

/// The first ultrasound region's bounds, clipped to the frame.
fn ultrasound_region(obj: &InMemDicomObject, cols: u32, rows: u32) -> Option<Rect> {
    let items = obj
        .element_opt(tags::SEQUENCE_OF_ULTRASOUND_REGIONS)
        .ok()??
        .items()?;
    let r = items.first()?;
    let x0 = int(r, tags::REGION_LOCATION_MIN_X0)?.max(0) as u32;
    let y0 = int(r, tags::REGION_LOCATION_MIN_Y0)?.max(0) as u32;
    let x1 = (int(r, tags::REGION_LOCATION_MAX_X1)?.max(0) as u32).min(cols - 1);
    let y1 = (int(r, tags::REGION_LOCATION_MAX_Y1)?.max(0) as u32).min(rows - 1);
    (x1 > x0 && y1 > y0).then_some(Rect {
        x: x0,
        y: y0,
        width: x1 - x0 + 1,
        height: y1 - y0 + 1,
    })
}

/// Identifying attributes present, by keyword, and the number of private attributes.
fn identifying_present(obj: &InMemDicomObject) -> (Vec<String>, u32) {
    let removed = IDENTIFYING
        .iter()
        .filter(|t| obj.element_opt(**t).ok().flatten().is_some())
        .map(|t| {
            StandardDataDictionary
                .by_tag(*t)
                .map_or_else(|| format!("{t}"), |e| e.alias().to_owned())
        })
        .collect();
    let private = obj.tags().filter(|t| t.group() % 2 == 1).count() as u32;
    (removed, private)
}

/// Where the frames go: mask, crop, scale to the cache size, write.
struct Sink {
    writer: CacheWriter,
    scaler: ff::software::scaling::Context,
    src: ff::frame::Video,
    dst: ff::frame::Video,
    crop: Rect,
    masks: Vec<Rect>,
    cw: u32,
    ch: u32,
    packed: Vec<u8>,
    timing: Timing,
    keep_every: f64,
    next_keep: f64,
    seen: u64,
    limits: Limits,
}

impl Sink {
    /// Offer frame number `seen` (RGB24, source size); kept when it falls on the cache rate.
    fn push(&mut self, rgb: &mut [u8], full_w: u32) -> Result<(), Rejection> {
        let i = self.seen;
        self.seen += 1;
        if self.seen > self.limits.max_frames {
            return Err(reject(
                "too_many_frames",
                format!("more than {} frames", self.limits.max_frames),
            ));
        }
        let t = self.timing.at(i);
        if t > self.limits.max_duration_s {
            return Err(reject(
                "too_long",
                format!("longer than the cap of {:.0} s", self.limits.max_duration_s),
            ));
        }
        if t + 1e-6 < self.next_keep {
            return Ok(());
        }
        self.next_keep = if self.next_keep.is_finite() {
            (self.next_keep + self.keep_every).max(t)
        } else {
            t + self.keep_every
        };
        for m in &self.masks {
            for y in m.y as usize..(m.y + m.height) as usize {
                let row = (y * full_w as usize + m.x as usize) * 3;
                rgb[row..row + m.width as usize * 3].fill(0);
            }
        }
        let stride = self.src.stride(0);
        let data = self.src.data_mut(0);
        let (cx, cy, cw) = (self.crop.x as usize, self.crop.y as usize, self.crop.width);
        for y in 0..self.crop.height as usize {
            let from = ((cy + y) * full_w as usize + cx) * 3;
            data[y * stride..y * stride + cw as usize * 3]
                .copy_from_slice(&rgb[from..from + cw as usize * 3]);
        }
        self.scaler
            .run(&self.src, &mut self.dst)
            .map_err(|e| reject("corrupt", format!("converting a frame: {e}")))?;
        let frames = self.writer.frames() as u64 + 1;
        let bytes = frames.saturating_mul(self.cw as u64 * self.ch as u64 * 3);
        if bytes > self.limits.max_cache_bytes {
            let (cw, ch) = (self.cw, self.ch);
            return Err(cache_too_large(frames, cw, ch, &self.limits, "as decoded"));
        }
        let (w, h) = (self.cw as usize, self.ch as usize);
        let stride = self.dst.stride(0);
        let data = self.dst.data(0);
        self.packed.clear();
        for row in 0..h {
            self.packed
                .extend_from_slice(&data[row * stride..row * stride + w * 3]);
        }
        self.writer.push(&self.packed).map_err(cache_failed)
    }
}

/// Validate a DICOM object and write its cache to `cache_dest`, as
/// [`super::decode::ingest_video`] does for a container. `key_hex` is the tenant's
/// de-identification key (without it no patient or UID is reported).
pub fn ingest_dicom(
    src: &Path,
    cache_dest: &Path,
    spec: &CacheSpec,
    limits: &Limits,
    job: &DicomJob,
) -> Result<VideoInfo, Rejection> {
    super::decode::init();
    let unreadable = |e: dicom_object::ReadError| {
        reject(
            "corrupt",
            format!(
                "not a readable DICOM object: {}",
                first_line(&e.to_string())
            ),
        )
    };
    // The header first: the limits are checked before the pixel data is read.
    let read_header = |path: &Path| {
        OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .map_err(unreadable)
    };
    let header = read_header(src)?;
    let mut px = Pixels::read(&header)?;
    // A series of single-frame objects: their order, and each object's own frame count of 1.
    let members = if job.series.is_empty() {
        Vec::new()
    } else {
        let mut all = vec![(src.to_path_buf(), header.clone())];
        for p in &job.series {
            all.push((p.clone(), read_header(p)?));
        }
        let series = series_order(all, &px)?;
        px.frames = series.len() as u32;
        series
    };
    let ts = header
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let video = VIDEO_SYNTAXES.contains(&ts.as_str());
    if !video && !NATIVE_SYNTAXES.contains(&ts.as_str()) && !IMAGE_SYNTAXES.contains(&ts.as_str()) {
        return Err(reject(
            "unsupported_transfer_syntax",
            format!(
                "the transfer syntax {ts} is not supported (native, RLE, JPEG baseline, \
                 extended and lossless, MPEG-2, H.264 and HEVC are)"
            ),
        ));
    }
    let (w, h) = (px.cols, px.rows);
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(reject(
            "frame_too_large",
            format!(
                "frames of {w}×{h} exceed the cap of {} pixels",
                limits.max_pixels
            ),
        ));
    }
    if job.probe {
        let f = facts(&header, job, &ts, &px, "assumed", None, None, Vec::new());
        return Ok(VideoInfo {
            container: "dicom".into(),
            codec: format!("dicom {ts}"),
            width: w,
            height: h,
            fps: 0.0,
            duration_s: 0.0,
            frames: px.frames as u64,
            cache_frames: 0,
            cache_width: 0,
            cache_height: 0,
            cache_fps: 0.0,
            dicom: Some(Box::new(f)),
        });
    }
    if video && !members.is_empty() {
        return Err(reject(
            "corrupt",
            "a DICOM video cannot be one frame of a series",
        ));
    }
    if !video && px.frames < 2 {
        return Err(reject(
            "still_image",
            "a single-frame DICOM image, not a cine loop or video",
        ));
    }
    if px.frames as u64 > limits.max_frames {
        return Err(reject(
            "too_many_frames",
            format!("{} frames; the cap is {}", px.frames, limits.max_frames),
        ));
    }
    let (times, mut rate_source) = match series_times(&members) {
        Some(t) => (Some(t), "acquisition_time"),
        None => frame_times(&header, px.frames),
    };
    let region = ultrasound_region(&header, w, h);
    let policy = &spec.dicom;
    let crop = match region {
        Some(r) if policy.crop_to_region => r,
        _ => Rect {
            x: 0,
            y: 0,
            width: w,
            height: h,
        },
    };
    let mut masks: Vec<Rect> = Vec::new();
    for m in &policy.masks {
        // Clipped to the frame; a rectangle wholly outside masks nothing.
        let x1 = m.x.saturating_add(m.width).min(w);
        let y1 = m.y.saturating_add(m.height).min(h);
        if m.x < x1 && m.y < y1 {
            masks.push(Rect {
                x: m.x,
                y: m.y,
                width: x1 - m.x,
                height: y1 - m.y,
            });
        }
    }
    if let (Some(r), true) = (region, policy.mask_outside_region) {
        let bands = [
            (0, 0, w, r.y),
            (0, r.y + r.height, w, h - (r.y + r.height)),
            (0, r.y, r.x, r.height),
            (r.x + r.width, r.y, w - (r.x + r.width), r.height),
        ];
        masks.extend(bands.into_iter().filter(|b| b.2 > 0 && b.3 > 0).map(
            |(x, y, width, height)| Rect {
                x,
                y,
                width,
                height,
            },
        ));
    }
    let aspect = crop.width.max(crop.height) as f64 / crop.width.min(crop.height) as f64;
    if aspect > limits.max_aspect_ratio {
        return Err(reject(
            "aspect_ratio",
            format!(
                "frames of {}×{} are {aspect:.1} times wider than high (or the reverse); the cap \
                 is {}:1",
                crop.width, crop.height, limits.max_aspect_ratio
            ),
        ));
    }
    let obj = if members.is_empty() {
        Some(OpenFileOptions::new().open_file(src).map_err(unreadable)?)
    } else {
        None
    };
    // The encapsulated video is opened before anything is written: its own rate counts when
    // the object gives none.
    let mut stream = match (&obj, video) {
        (Some(obj), true) => Some(open_stream(obj, cache_dest)?),
        _ => None,
    };
    let mut times = times;
    if let (None, Some(s)) = (&times, &stream)
        && let Some(fps) = s.rate
    {
        times = Some(Timing::Every(1.0 / fps));
        rate_source = "stream";
    }
    let source_fps = times.as_ref().and_then(Timing::fps);
    let cache_fps = source_fps.map_or(spec.fps, |r| r.min(spec.fps));
    let (cw, ch) = cache_size(crop.width, crop.height, spec.short_side);
    let duration = source_fps.map_or(px.frames as f64 / cache_fps, |r| px.frames as f64 / r);
    if duration > limits.max_duration_s {
        return Err(reject(
            "too_long",
            format!(
                "{duration:.0} s long; the cap is {:.0} s",
                limits.max_duration_s
            ),
        ));
    }
    let expected_frames = (duration * cache_fps).ceil() as u64;
    if expected_frames.saturating_mul(cw as u64 * ch as u64 * 3) > limits.max_cache_bytes {
        let how = "by its frame count";
        return Err(cache_too_large(expected_frames, cw, ch, limits, how));
    }

    let scaler = ff::software::scaling::Context::get(
        ff::format::Pixel::RGB24,
        crop.width,
        crop.height,
        ff::format::Pixel::RGB24,
        cw,
        ch,
        ff::software::scaling::Flags::AREA,
    )
    .map_err(|e| reject("unsupported_pixel_data", format!("scaling: {e}")))?;
    let writer = CacheWriter::create(cache_dest, ch, cw, cache_fps).map_err(cache_failed)?;
    let mut sink = Sink {
        writer,
        scaler,
        src: ff::frame::Video::new(ff::format::Pixel::RGB24, crop.width, crop.height),
        dst: ff::frame::Video::empty(),
        crop,
        masks: masks.clone(),
        cw,
        ch,
        packed: Vec::new(),
        timing: times.unwrap_or(Timing::Every(1.0 / cache_fps)),
        keep_every: 1.0 / cache_fps,
        next_keep: f64::NEG_INFINITY,
        seen: 0,
        limits: limits.clone(),
    };
    let decoded = match (stream.as_mut(), &obj) {
        (Some(s), _) => decode_stream(s, &px, &mut sink),
        (None, Some(obj)) => decode_frames(obj, &ts, &px, &mut sink),
        (None, None) => {
            // One object at a time, each a frame, in the series' order.
            let one = Pixels {
                frames: 1,
                ..px.clone()
            };
            members.iter().try_fold(0, |_, (path, _)| {
                let o = OpenFileOptions::new().open_file(path).map_err(unreadable)?;
                decode_frames(&o, &ts, &one, &mut sink)
            })
        }
    };
    let codec = match &stream {
        Some(s) => format!("dicom {}", s.codec),
        None => format!("dicom {}", syntax_name(&ts)),
    };
    let frames = match decoded {
        Ok(n) => n,
        Err(r) => {
            sink.writer.abandon();
            return Err(r);
        }
    };
    if sink.writer.frames() == 0 {
        sink.writer.abandon();
        return Err(reject("no_frames", "no frame could be decoded"));
    }
    let header_out = sink.writer.finish().map_err(cache_failed)?;
    let fps = source_fps.unwrap_or(cache_fps);

    let cropped = crop.width != w || crop.height != h;
    let facts = facts(
        &header,
        job,
        &ts,
        &px,
        rate_source,
        region,
        Some(cropped),
        masks,
    );
    Ok(VideoInfo {
        container: "dicom".into(),
        codec,
        width: w,
        height: h,
        fps,
        duration_s: frames as f64 / fps,
        frames,
        cache_frames: header_out.frames,
        cache_width: header_out.width,
        cache_height: header_out.height,
        cache_fps: header_out.fps,
        dicom: Some(Box::new(facts)),
    })
}

/// What the answer tells about an object (from its header): keyed identity, the identifying
/// attributes it carried, and facts without identity.
#[allow(clippy::too_many_arguments)]
fn facts(
    header: &InMemDicomObject,
    job: &DicomJob,
    ts: &str,
    px: &Pixels,
    rate_source: &str,
    region: Option<Rect>,
    cropped: Option<bool>,
    masked: Vec<Rect>,
) -> DicomFacts {
    let keys = job.deid_key.as_deref().and_then(Pseudonyms::from_hex);
    let label_tag = job
        .label_attribute
        .as_deref()
        .and_then(|n| label_tag(n).ok());
    let label = label_tag
        .and_then(|t| text(header, t))
        .map(|l| l.chars().take(100).collect());
    let (mut removed, private_attributes) = identifying_present(header);
    if let Some(t) = label_tag {
        // Kept, as the label: the report does not count it as removed.
        let kw = StandardDataDictionary
            .by_tag(t)
            .map(|e| e.alias().to_owned());
        removed.retain(|k| Some(k) != kw.as_ref());
    }
    let mut replaced = Vec::new();
    let mut pseudo = |tag: Tag, name: &str, f: &dyn Fn(&Pseudonyms, &str) -> String| {
        let v = text(header, tag)?;
        let k = keys.as_ref()?;
        replaced.push(name.to_owned());
        Some(f(k, &v))
    };
    let patient = pseudo(tags::PATIENT_ID, "PatientID", &|k, v| k.patient(v));
    let study_uid = pseudo(tags::STUDY_INSTANCE_UID, "StudyInstanceUID", &|k, v| {
        k.uid(v)
    });
    let series_uid = pseudo(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID", &|k, v| {
        k.uid(v)
    });
    let sop_uid = pseudo(tags::SOP_INSTANCE_UID, "SOPInstanceUID", &|k, v| k.uid(v));
    DicomFacts {
        sop_class_uid: text(header, tags::SOP_CLASS_UID).unwrap_or_default(),
        modality: text(header, tags::MODALITY),
        transfer_syntax: ts.to_owned(),
        photometric: px.photometric.clone(),
        frame_rate_source: rate_source.to_owned(),
        patient,
        study_uid,
        series_uid,
        sop_uid,
        burned_in_annotation: text(header, tags::BURNED_IN_ANNOTATION),
        ultrasound_region: region,
        cropped: cropped.unwrap_or(false),
        masked,
        removed,
        replaced,
        private_attributes,
        label,
    }
}

/// A series' single-frame objects in their order: all of one series and one frame geometry,
/// sorted by Instance Number, then acquisition (or content) time, then as given.
fn series_order(
    all: Vec<(std::path::PathBuf, DefaultDicomObject)>,
    first: &Pixels,
) -> Result<Vec<(std::path::PathBuf, DefaultDicomObject)>, Rejection> {
    let series = text(&all[0].1, tags::SERIES_INSTANCE_UID);
    let mut keyed = Vec::with_capacity(all.len());
    for (i, (path, h)) in all.into_iter().enumerate() {
        let px = Pixels::read(&h)?;
        if text(&h, tags::SERIES_INSTANCE_UID) != series
            || px.frames != 1
            || (px.rows, px.cols, px.samples, px.bits_allocated)
                != (first.rows, first.cols, first.samples, first.bits_allocated)
            || px.photometric != first.photometric
        {
            return Err(reject(
                "series_mismatch",
                "the series' images differ in series, size, encoding or frame count",
            ));
        }
        let number = int(&h, tags::INSTANCE_NUMBER);
        let time = acquisition_time(&h).unwrap_or(f64::MAX);
        keyed.push(((number.unwrap_or(i64::MAX), time, i), (path, h)));
    }
    keyed.sort_by(|a, b| a.0.partial_cmp(&b.0).expect("no NaN in the keys"));
    Ok(keyed.into_iter().map(|(_, m)| m).collect())
}

/// Seconds since midnight of an image's Acquisition Time (else Content Time), `HHMMSS.FFFFFF`.
fn acquisition_time(h: &InMemDicomObject) -> Option<f64> {
    let t = text(h, tags::ACQUISITION_TIME).or_else(|| text(h, tags::CONTENT_TIME))?;
    let t = t.replace(':', "");
    let (whole, frac) = t.split_once('.').unwrap_or((&t, ""));
    if whole.len() < 2 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let part = |r: std::ops::Range<usize>| whole.get(r).and_then(|x| x.parse::<f64>().ok());
    let secs = part(0..2)? * 3600.0 + part(2..4).unwrap_or(0.0) * 60.0 + part(4..6).unwrap_or(0.0);
    let frac = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}").parse::<f64>().ok()?
    };
    Some(secs + frac)
}

/// A series' timing from its images' acquisition times, when every image has one and they
/// increase.
fn series_times(members: &[(std::path::PathBuf, DefaultDicomObject)]) -> Option<Timing> {
    if members.len() < 2 {
        return None;
    }
    let t: Vec<f64> = members
        .iter()
        .map(|(_, h)| acquisition_time(h))
        .collect::<Option<_>>()?;
    if t.windows(2).any(|w| w[1] <= w[0]) {
        return None;
    }
    Some(Timing::Listed(t.iter().map(|x| x - t[0]).collect()))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

/// Native, RLE and JPEG pixel data, frame by frame.
fn decode_frames(
    obj: &DefaultDicomObject,
    ts: &str,
    px: &Pixels,
    sink: &mut Sink,
) -> Result<u64, Rejection> {
    use dicom_pixeldata::PixelDecoder;
    let started = std::time::Instant::now();
    let budget = std::time::Duration::from_secs_f64(sink.limits.max_decode_s);
    let mut rgb = Vec::new();
    let native = NATIVE_SYNTAXES.contains(&ts);
    let element = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| reject("no_frames", "the DICOM object has no pixel data"))?;
    let bytes = if native {
        Some(
            element
                .to_bytes()
                .map_err(|_| reject("corrupt", "the pixel data cannot be read"))?,
        )
    } else {
        None
    };
    let frame_bytes = px.frame_bytes();
    // What a decoded JPEG frame is: the codec converts colour to RGB, interleaved.
    let jpeg = ts.starts_with("1.2.840.10008.1.2.4.");
    let decoded_px = Pixels {
        photometric: if jpeg && px.samples == 3 {
            "RGB".into()
        } else if px.photometric == "YBR_FULL_422" {
            // RLE of YBR_FULL_422 is not allowed; a decoder hands back full samples.
            "YBR_FULL".into()
        } else {
            px.photometric.clone()
        },
        planar: 0,
        ..px.clone()
    };
    for i in 0..px.frames {
        if started.elapsed() > budget {
            return Err(reject(
                "decode_timeout",
                format!(
                    "decoding took longer than {:.0} s",
                    sink.limits.max_decode_s
                ),
            ));
        }
        let result = if let Some(all) = &bytes {
            let from = i as usize * frame_bytes;
            let Some(frame) = all.get(from..from + frame_bytes) else {
                if i == 0 {
                    return Err(reject(
                        "corrupt",
                        "the pixel data is shorter than one frame",
                    ));
                }
                // Truncated: what came whole is kept only when most of the loop did.
                if (i as u64) * 20 < px.frames as u64 * 19 {
                    return Err(reject(
                        "corrupt",
                        format!(
                            "the pixel data holds {i} of the {} frames it declares",
                            px.frames
                        ),
                    ));
                }
                break;
            };
            px.to_rgb(frame, &mut rgb)
        } else {
            let d = obj.decode_pixel_data_frame(i).map_err(|e| {
                reject(
                    "corrupt",
                    format!(
                        "frame {i} cannot be decoded: {}",
                        first_line(&e.to_string())
                    ),
                )
            })?;
            let data = d.data();
            let want = decoded_px.rows as usize
                * decoded_px.cols as usize
                * decoded_px.samples as usize
                * (decoded_px.bits_allocated as usize / 8);
            if data.len() < want {
                return Err(reject(
                    "corrupt",
                    format!("frame {i} decodes to fewer samples than its size"),
                ));
            }
            decoded_px.to_rgb(&data[..want], &mut rgb)
        };
        result?;
        sink.push(&mut rgb, px.cols)?;
    }
    Ok(sink.seen)
}

/// A short name for a transfer syntax, for the report's codec counts.
fn syntax_name(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2.2" => "native",
        "1.2.840.10008.1.2.1.99" => "native deflated",
        "1.2.840.10008.1.2.5" => "rle",
        "1.2.840.10008.1.2.4.50" => "jpeg baseline",
        "1.2.840.10008.1.2.4.51" => "jpeg extended",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "jpeg lossless",
        _ => "other",
    }
}

/// The encapsulated MPEG-2 / H.264 / HEVC stream, open in FFmpeg.
struct Stream {
    input: ff::format::context::Input,
    index: usize,
    decoder: ff::decoder::Video,
    /// The stream's own frame rate, when it has one.
    rate: Option<f64>,
    /// FFmpeg's name for the stream's codec (`h264`, `hevc`, `mpeg2video`).
    codec: String,
    /// The extracted stream beside the cache, removed with this.
    _file: RemoveOnDrop,
}

/// Write the pixel data's fragments out as one stream and open it with the guarded open, the
/// elementary-stream demuxers allowed besides the containers.
fn open_stream(obj: &DefaultDicomObject, cache_dest: &Path) -> Result<Stream, Rejection> {
    let element = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| reject("no_frames", "the DICOM object has no pixel data"))?;
    let DicomValue::PixelSequence(seq) = element.value() else {
        return Err(reject(
            "corrupt",
            "a video transfer syntax with native pixel data",
        ));
    };
    let es = cache_dest.with_extension("es");
    let file = RemoveOnDrop(es.clone());
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&es).map_err(|e| cache_failed(e.into()))?;
        for frag in seq.fragments() {
            f.write_all(frag).map_err(|e| cache_failed(e.into()))?;
        }
    }
    let allowed: Vec<&str> = super::input::ALLOWED_DEMUXERS
        .iter()
        .chain(super::input::ELEMENTARY_DEMUXERS)
        .copied()
        .collect();
    let input = super::input::open_allowing(&es, &allowed).map_err(|e| {
        reject(
            "corrupt",
            format!("the encapsulated video cannot be opened: {e}"),
        )
    })?;
    let stream = input
        .streams()
        .best(ff::media::Type::Video)
        .ok_or_else(|| reject("no_video_stream", "the encapsulated stream holds no video"))?;
    let index = stream.index();
    let rate = f64::from(stream.avg_frame_rate());
    let decoder = ff::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|c| c.decoder().video())
        .map_err(|e| {
            reject(
                "unsupported_codec",
                format!("no decoder for the stream: {e}"),
            )
        })?;
    let codec = decoder
        .codec()
        .map_or_else(|| "video".to_owned(), |c| c.name().to_owned());
    Ok(Stream {
        input,
        index,
        codec,
        decoder,
        rate: (rate.is_finite() && rate > 0.0 && rate <= 1000.0).then_some(rate),
        _file: file,
    })
}

/// Decode the stream forward once into the sink; returns the frames decoded.
fn decode_stream(s: &mut Stream, px: &Pixels, sink: &mut Sink) -> Result<u64, Rejection> {
    let started = std::time::Instant::now();
    let budget = std::time::Duration::from_secs_f64(sink.limits.max_decode_s);
    let mut frame = ff::frame::Video::empty();
    let mut rgb_frame = ff::frame::Video::empty();
    let mut scaler: Option<ff::software::scaling::Context> = None;
    let mut rgb = Vec::new();
    let mut errors = 0u32;
    let mut eof = false;
    let mut packet = ff::Packet::empty();
    loop {
        if !eof {
            match packet.read(&mut s.input) {
                Ok(()) if packet.stream() != s.index => continue,
                Ok(()) => {
                    if s.decoder.send_packet(&packet).is_err() {
                        errors += 1;
                    }
                }
                Err(ff::Error::Eof) => {
                    eof = true;
                    let _ = s.decoder.send_eof();
                }
                Err(_) => {
                    errors += 1;
                    if errors > 100 {
                        return Err(reject("corrupt", "the encapsulated stream is corrupt"));
                    }
                    continue;
                }
            }
        }
        loop {
            match s.decoder.receive_frame(&mut frame) {
                Ok(()) => {}
                Err(ff::Error::Eof) => return finish(sink.seen, errors),
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => break,
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
            if started.elapsed() > budget {
                return Err(reject(
                    "decode_timeout",
                    format!(
                        "decoding took longer than {:.0} s",
                        sink.limits.max_decode_s
                    ),
                ));
            }
            let (fw, fh) = (frame.width(), frame.height());
            if fw != px.cols || fh != px.rows {
                return Err(reject(
                    "corrupt",
                    format!(
                        "the stream's frames are {fw}×{fh}, the object declares {}×{}",
                        px.cols, px.rows
                    ),
                ));
            }
            if scaler.is_none() {
                scaler = Some(
                    ff::software::scaling::Context::get(
                        frame.format(),
                        fw,
                        fh,
                        ff::format::Pixel::RGB24,
                        fw,
                        fh,
                        ff::software::scaling::Flags::POINT,
                    )
                    .map_err(|e| reject("unsupported_codec", format!("pixel format: {e}")))?,
                );
            }
            scaler
                .as_mut()
                .expect("set above")
                .run(&frame, &mut rgb_frame)
                .map_err(|e| reject("corrupt", format!("converting a frame: {e}")))?;
            let (stride, data) = (rgb_frame.stride(0), rgb_frame.data(0));
            rgb.clear();
            for row in 0..fh as usize {
                rgb.extend_from_slice(&data[row * stride..row * stride + fw as usize * 3]);
            }
            sink.push(&mut rgb, fw)?;
        }
        if eof {
            return finish(sink.seen, errors);
        }
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn pseudonyms_are_stable_within_a_key_and_differ_across_keys() {
        let a = Pseudonyms::from_hex("00112233").unwrap();
        let b = Pseudonyms::from_hex("00112234").unwrap();
        assert_eq!(a.patient("PID-1"), a.patient("PID-1 "));
        assert_ne!(a.patient("PID-1"), a.patient("PID-2"));
        assert_ne!(a.patient("PID-1"), b.patient("PID-1"));
        let uid = a.uid("1.2.3.4");
        assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
        assert_eq!(uid, a.uid("1.2.3.4\0"));
        assert_ne!(uid, b.uid("1.2.3.4"));
    }

    fn pixels(photometric: &str, samples: u16, bits_stored: u16) -> Pixels {
        Pixels {
            rows: 1,
            cols: 2,
            frames: 1,
            samples,
            bits_allocated: 16,
            bits_stored,
            signed: false,
            planar: 0,
            photometric: photometric.into(),
            slope: 1.0,
            intercept: 0.0,
            window: None,
            palette: None,
            palette_first: 0,
        }
    }

    #[test]
    fn sixteen_bit_samples_span_their_stored_bits() {
        let words = |w: &[u16]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut out = Vec::new();
        // 12-bit RGB: full scale is 4095, not 65535.
        pixels("RGB", 3, 12)
            .to_rgb(&words(&[4095, 0, 2048, 0, 4095, 0]), &mut out)
            .unwrap();
        assert_eq!(out, vec![255, 0, 127, 0, 255, 0]);
        // 12-bit grey without a window: the stored range; MONOCHROME1 inverts it.
        pixels("MONOCHROME2", 1, 12)
            .to_rgb(&words(&[4095, 0]), &mut out)
            .unwrap();
        assert_eq!(out, vec![255, 255, 255, 0, 0, 0]);
        pixels("MONOCHROME1", 1, 12)
            .to_rgb(&words(&[4095, 0]), &mut out)
            .unwrap();
        assert_eq!(out, vec![0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn ybr_full_converts_as_jfif() {
        assert_eq!(ybr_to_rgb(128, 128, 128), [128, 128, 128]);
        // Pure red in full-range YCbCr.
        let [r, g, b] = ybr_to_rgb(76, 85, 255);
        assert!(r >= 253 && g <= 2 && b <= 2, "{r} {g} {b}");
    }
}
