//! Probe and decode one video with FFmpeg's libraries: validate it against the caps, and write
//! its training cache in the same single forward pass.
//!
//! Speed: frames are decoded forward once, and only the frames kept at the cache rate go through
//! swscale, which converts to RGB24 and resizes in one pass.
use std::path::Path;
use std::time::{Duration, Instant};

use ffmpeg_next as ff;
use serde::{Deserialize, Serialize};

use super::cache::CacheWriter;
use super::input::{self, OpenError};

/// Limits that keep one hostile or absurd file from exhausting the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Largest width × height of a frame.
    pub max_pixels: u64,
    /// Longest duration in seconds.
    pub max_duration_s: f64,
    /// Most frames decoded from one file.
    pub max_frames: u64,
    /// Wall-clock budget for decoding one file.
    pub max_decode_s: f64,
    /// Largest training cache of one video, in bytes: refused from the probe when the
    /// duration announces more, and stopped while writing when the stream holds more.
    #[serde(default = "default_max_cache_bytes")]
    pub max_cache_bytes: u64,
    /// Largest ratio of a frame's long side to its short side: the cache keeps the aspect, so
    /// a 4096×64 stream would be cached at 8192×128.
    #[serde(default = "default_max_aspect_ratio")]
    pub max_aspect_ratio: f64,
}

fn default_max_cache_bytes() -> u64 {
    32 << 30
}

fn default_max_aspect_ratio() -> f64 {
    4.0
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: 4096 * 2304,
            max_duration_s: 4.0 * 3600.0,
            max_frames: 500_000,
            max_decode_s: 600.0,
            // Four hours of 16:9 video at the default 128 px and 15 fps is about 19 GB.
            max_cache_bytes: default_max_cache_bytes(),
            // 32:9 (side-by-side stereo endoscopy) is 3.6:1.
            max_aspect_ratio: default_max_aspect_ratio(),
        }
    }
}

/// What the training cache holds for each video.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Short side of cached frames in pixels (the other side keeps the aspect ratio).
    pub short_side: u32,
    /// Frames per second kept (sources with a lower rate keep every frame).
    pub fps: f64,
    /// FFmpeg decoder threads (0: FFmpeg's automatic count). Not stored with a dataset.
    #[serde(default)]
    pub threads: usize,
    /// Crop and masks for DICOM objects' pixels.
    #[serde(default)]
    pub dicom: super::dicom::PixelPolicy,
}

impl Default for CacheSpec {
    fn default() -> Self {
        // torchvision's video classification recipe: 15 fps, resize to 128 × 171.
        Self {
            short_side: 128,
            fps: 15.0,
            threads: 0,
            dicom: Default::default(),
        }
    }
}

/// The form a cache spec is stored in: with a dataset (what ingest caches at), and copied into
/// each model trained on it (what serving decodes at), so that both read one definition.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSpec {
    short_side: u32,
    fps: f64,
    /// Absent when nothing is done to DICOM pixels (and in specs stored before DICOM).
    #[serde(default, skip_serializing_if = "super::dicom::PixelPolicy::is_default")]
    dicom: super::dicom::PixelPolicy,
}

impl CacheSpec {
    /// The stored form, `{"short_side": …, "fps": …}`.
    pub fn to_stored(&self) -> serde_json::Value {
        serde_json::to_value(StoredSpec {
            short_side: self.short_side,
            fps: self.fps,
            dicom: self.dicom.clone(),
        })
        .expect("serialises")
    }

    /// Read the stored form. An unreadable spec is an error, never the default: training and
    /// serving must see the frames at the size the dataset declared.
    pub fn from_stored(v: &serde_json::Value) -> anyhow::Result<Self> {
        let s: StoredSpec = serde_json::from_value(v.clone())
            .map_err(|e| anyhow::anyhow!("unreadable cache spec {v}: {e}"))?;
        Ok(Self {
            short_side: s.short_side,
            fps: s.fps,
            threads: 0,
            dicom: s.dicom,
        })
    }
}

/// Facts about an accepted video.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VideoInfo {
    pub container: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub duration_s: f64,
    /// Frames decoded from the source.
    pub frames: u64,
    pub cache_frames: u32,
    pub cache_width: u32,
    pub cache_height: u32,
    pub cache_fps: f64,
    /// What a DICOM object was and what its de-identification did; absent for other videos.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<Box<super::dicom::DicomFacts>>,
}

impl VideoInfo {
    /// Bytes of the frames in its training cache (raw RGB).
    pub fn cache_bytes(&self) -> u64 {
        u64::from(self.cache_frames)
            * u64::from(self.cache_width)
            * u64::from(self.cache_height)
            * 3
    }
}

/// Why a file was not accepted. `code` is stable; `detail` is for people and is shown to the
/// tenant, so it never names a server path or carries internals; those go in `log`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rejection {
    pub code: String,
    pub detail: String,
    /// The server-side cause of a failure that is not the file's fault (a cache that cannot be
    /// written, a worker that cannot start): for the server log, never for the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl Rejection {
    pub fn new(code: &str, detail: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            detail: detail.into(),
            log: None,
        }
    }
    /// A failure of the server, not of the file: `detail` is what the tenant sees, `log` the
    /// cause for the log (it may name server paths).
    pub fn server(code: &str, detail: impl Into<String>, log: impl Into<String>) -> Self {
        Self {
            log: Some(log.into()),
            ..Self::new(code, detail)
        }
    }
    /// Whether the server, not the file, is at fault (the tenant gets no internals either way).
    pub fn is_server_fault(&self) -> bool {
        self.code == "internal" || self.code == "io_error"
    }
    /// The file is not media at all (FFmpeg cannot recognise a container).
    pub fn is_not_media(&self) -> bool {
        self.code == "not_media" || self.code == "empty_file"
    }
}

/// Initialise FFmpeg once per process and keep its own logging quiet.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
    });
}

/// Cache frame size `(width, height)` for a source of `w × h`: short side `short`, aspect kept.
pub fn cache_size(w: u32, h: u32, short: u32) -> (u32, u32) {
    let scale = short as f64 / w.min(h) as f64;
    let long = |x: u32| ((x as f64 * scale).round() as u32).max(1);
    if w <= h {
        (short, long(h))
    } else {
        (long(w), short)
    }
}

/// Validate `src`, a container or a DICOM object, and write its cache to `cache_dest`. Nothing is
/// left at `cache_dest` unless the video is accepted. `dicom`: what a DICOM object is asked
/// beyond its pixels (the tenant's key for keyed identifiers, a label attribute).
pub fn ingest_any(
    src: &Path,
    cache_dest: &Path,
    spec: &CacheSpec,
    limits: &Limits,
    dicom: &super::dicom::DicomJob,
) -> Result<VideoInfo, Rejection> {
    if super::dicom::is_dicom(src) {
        super::dicom::ingest_dicom(src, cache_dest, spec, limits, dicom)
    } else {
        ingest_video(src, cache_dest, spec, limits)
    }
}

/// Validate a container `src` and write its cache to `cache_dest`. Nothing is left at
/// `cache_dest` unless the video is accepted.
pub fn ingest_video(
    src: &Path,
    cache_dest: &Path,
    spec: &CacheSpec,
    limits: &Limits,
) -> Result<VideoInfo, Rejection> {
    init();
    let size = std::fs::metadata(src)
        .map_err(|e| Rejection::new("unreadable", format!("cannot read the file: {e}")))?
        .len();
    if size == 0 {
        return Err(Rejection::new("empty_file", "the file is empty (0 bytes)"));
    }
    let mut ictx = input::open(src).map_err(open_rejection)?;
    let container = ictx.format().name().to_owned();
    let stream = ictx.streams().best(ff::media::Type::Video).ok_or_else(|| {
        let has_audio = ictx.streams().best(ff::media::Type::Audio).is_some();
        if has_audio {
            Rejection::new(
                "no_video_stream",
                "audio only: the file has no video stream",
            )
        } else {
            Rejection::new("no_video_stream", "the file has no video stream")
        }
    })?;
    let stream_index = stream.index();
    let time_base = f64::from(stream.time_base());
    let avg_rate = f64::from(stream.avg_frame_rate());
    let rate = if avg_rate.is_finite() && avg_rate > 0.0 {
        avg_rate
    } else {
        let r = f64::from(stream.rate());
        if r.is_finite() && r > 0.0 { r } else { 0.0 }
    };
    let duration_s = if ictx.duration() > 0 {
        ictx.duration() as f64 / f64::from(ff::ffi::AV_TIME_BASE)
    } else if stream.duration() > 0 {
        stream.duration() as f64 * time_base
    } else {
        0.0
    };
    if duration_s > limits.max_duration_s {
        return Err(Rejection::new(
            "too_long",
            format!(
                "{duration_s:.0} s long; the cap is {:.0} s",
                limits.max_duration_s
            ),
        ));
    }

    let mut codec_ctx = ff::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| Rejection::new("unsupported_codec", format!("cannot set up decoding: {e}")))?;
    let mut threading = ff::codec::threading::Config::kind(ff::codec::threading::Type::Frame);
    threading.count = spec.threads;
    codec_ctx.set_threading(threading);
    let mut decoder = codec_ctx.decoder().video().map_err(|e| {
        Rejection::new(
            "unsupported_codec",
            format!("no decoder for this video codec: {e}"),
        )
    })?;
    let codec = decoder
        .codec()
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let (width, height) = (decoder.width(), decoder.height());
    if width == 0 || height == 0 {
        return Err(Rejection::new(
            "corrupt",
            "the video stream declares no frame size",
        ));
    }
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(Rejection::new(
            "frame_too_large",
            format!(
                "frames of {width}×{height} exceed the cap of {} pixels",
                limits.max_pixels
            ),
        ));
    }

    let aspect = width.max(height) as f64 / width.min(height) as f64;
    if aspect > limits.max_aspect_ratio {
        return Err(Rejection::new(
            "aspect_ratio",
            format!(
                "frames of {width}×{height} are {aspect:.1} times wider than high (or the \
                 reverse); the cap is {}:1",
                limits.max_aspect_ratio
            ),
        ));
    }
    let (cw, ch) = cache_size(width, height, spec.short_side);
    let cache_fps = if rate > 0.0 {
        rate.min(spec.fps)
    } else {
        spec.fps
    };
    // The cache's size is known from the probe: refuse before decoding a single frame.
    let frame_bytes = cw as u64 * ch as u64 * 3;
    let expected_frames = (duration_s * cache_fps).ceil() as u64;
    let expected = expected_frames.saturating_mul(frame_bytes);
    if expected > limits.max_cache_bytes {
        return Err(cache_too_large(
            expected_frames,
            cw,
            ch,
            limits,
            "by its duration",
        ));
    }
    let mut writer = CacheWriter::create(cache_dest, ch, cw, cache_fps).map_err(cache_failed)?;
    let result = decode_into(
        &mut ictx,
        &mut decoder,
        stream_index,
        time_base,
        rate,
        (cw, ch),
        &mut writer,
        limits,
    );
    let frames = match result {
        Ok(frames) => frames,
        Err(r) => {
            writer.abandon();
            return Err(r);
        }
    };
    if frames == 0 {
        writer.abandon();
        return Err(Rejection::new("no_frames", "no frame could be decoded"));
    }
    if frames == 1 && duration_s < 0.1 {
        writer.abandon();
        return Err(Rejection::new(
            "still_image",
            "a single frame: a still image, not a video",
        ));
    }
    let header = writer.finish().map_err(cache_failed)?;
    let fps = if rate > 0.0 {
        rate
    } else if duration_s > 0.0 {
        frames as f64 / duration_s
    } else {
        0.0
    };
    Ok(VideoInfo {
        container,
        codec,
        width,
        height,
        fps,
        duration_s: if duration_s > 0.0 {
            duration_s
        } else if fps > 0.0 {
            frames as f64 / fps
        } else {
            0.0
        },
        frames,
        cache_frames: header.frames,
        cache_width: header.width,
        cache_height: header.height,
        cache_fps: header.fps,
        dicom: None,
    })
}

/// Decode the whole stream forward once; convert and keep frames at the cache rate.
#[allow(clippy::too_many_arguments)]
fn decode_into(
    ictx: &mut ff::format::context::Input,
    decoder: &mut ff::decoder::Video,
    stream_index: usize,
    time_base: f64,
    rate: f64,
    (cw, ch): (u32, u32),
    writer: &mut CacheWriter,
    limits: &Limits,
) -> Result<u64, Rejection> {
    let started = Instant::now();
    let budget = Duration::from_secs_f64(limits.max_decode_s);
    let keep_every = 1.0 / writer.fps();
    let mut scaler: Option<(ff::format::Pixel, u32, u32, ff::software::scaling::Context)> = None;
    let mut frame = ff::frame::Video::empty();
    let mut rgb = ff::frame::Video::empty();
    let mut packed = Vec::with_capacity(cw as usize * ch as usize * 3);
    let mut decoded: u64 = 0;
    let mut next_keep = f64::NEG_INFINITY;
    let mut errors = 0u32;
    let mut packet = ff::Packet::empty();
    let mut eof = false;

    loop {
        if !eof {
            match packet.read(ictx) {
                Ok(()) => {
                    if packet.stream() != stream_index {
                        continue;
                    }
                    if decoder.send_packet(&packet).is_err() {
                        errors += 1;
                    }
                }
                Err(ff::Error::Eof) => {
                    eof = true;
                    let _ = decoder.send_eof();
                }
                Err(ff::Error::InvalidData) => {
                    errors += 1;
                    continue;
                }
                Err(e) => {
                    return Err(Rejection::new(
                        "corrupt",
                        format!("reading the file failed after {decoded} frames: {e}"),
                    ));
                }
            }
        }
        loop {
            match decoder.receive_frame(&mut frame) {
                Ok(()) => {}
                Err(ff::Error::Eof) => return finish(decoded, errors),
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => break,
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
            decoded += 1;
            if decoded > limits.max_frames {
                return Err(Rejection::new(
                    "too_many_frames",
                    format!("more than {} frames", limits.max_frames),
                ));
            }
            if started.elapsed() > budget {
                return Err(Rejection::new(
                    "decode_timeout",
                    format!("decoding took longer than {:.0} s", limits.max_decode_s),
                ));
            }
            let t = match frame.timestamp() {
                Some(pts) => pts as f64 * time_base,
                None if rate > 0.0 => (decoded - 1) as f64 / rate,
                None => (decoded - 1) as f64 * keep_every,
            };
            if t > limits.max_duration_s {
                return Err(Rejection::new(
                    "too_long",
                    format!("longer than the cap of {:.0} s", limits.max_duration_s),
                ));
            }
            if t + 1e-6 < next_keep {
                continue;
            }
            next_keep = if next_keep.is_finite() {
                next_keep + keep_every
            } else {
                t + keep_every
            };
            // Catch up when the source skips ahead (variable frame rate, gaps).
            if next_keep < t {
                next_keep = t + keep_every;
            }
            let (fmt, w, h) = (frame.format(), frame.width(), frame.height());
            if w as u64 * h as u64 > limits.max_pixels || w == 0 || h == 0 {
                return Err(Rejection::new(
                    "frame_too_large",
                    format!("a frame of {w}×{h} exceeds the cap"),
                ));
            }
            let rebuild =
                !matches!(&scaler, Some((f, sw, sh, _)) if *f == fmt && *sw == w && *sh == h);
            if rebuild {
                let ctx = ff::software::scaling::Context::get(
                    fmt,
                    w,
                    h,
                    ff::format::Pixel::RGB24,
                    cw,
                    ch,
                    ff::software::scaling::Flags::AREA,
                )
                .map_err(|e| Rejection::new("unsupported_codec", format!("pixel format: {e}")))?;
                scaler = Some((fmt, w, h, ctx));
            }
            let (_, _, _, ctx) = scaler.as_mut().expect("scaler set above");
            ctx.run(&frame, &mut rgb)
                .map_err(|e| Rejection::new("corrupt", format!("converting a frame: {e}")))?;
            // The duration may lie: the stream itself must stay within the cap too.
            let frames = writer.frames() as u64 + 1;
            if frames.saturating_mul(cw as u64 * ch as u64 * 3) > limits.max_cache_bytes {
                return Err(cache_too_large(frames, cw, ch, limits, "as decoded"));
            }
            pack_rgb(&rgb, cw as usize, ch as usize, &mut packed);
            writer.push(&packed).map_err(cache_failed)?;
        }
        if eof {
            // The decoder drained without signalling EOF: treat what we have as the end.
            return finish(decoded, errors);
        }
    }
}

/// The rejection for a file [`input::open`] refused.
fn open_rejection(e: OpenError) -> Rejection {
    match e {
        // An io::Error's text is its kind ("Permission denied (os error 13)"), never the path.
        OpenError::Unreadable(e) => {
            Rejection::new("unreadable", format!("cannot read the file: {e}"))
        }
        OpenError::NotMedia(e) => Rejection::new(
            "not_media",
            format!("FFmpeg does not recognise this as a video ({e})"),
        ),
        OpenError::Refused(demuxer) if input::is_image_demuxer(&demuxer) => Rejection::new(
            "still_image",
            format!("a still image ({demuxer}), not a video"),
        ),
        OpenError::Refused(demuxer) => {
            let what = match demuxer.as_str() {
                "hls" | "dash" | "concat" => {
                    "a playlist or list of other files; only a file's own frames are read"
                }
                _ => "not one of the accepted containers",
            };
            Rejection::new(
                "unsupported_container",
                format!(
                    "the container `{demuxer}` is {what} (accepted: {})",
                    input::ALLOWED_DESCRIPTION
                ),
            )
        }
    }
}

/// `how`: whether the size was foreseen from the probe ("by its duration", before decoding)
/// or reached while writing ("as decoded").
pub(super) fn cache_too_large(
    frames: u64,
    cw: u32,
    ch: u32,
    limits: &Limits,
    how: &str,
) -> Rejection {
    Rejection::new(
        "cache_too_large",
        format!(
            "its training cache ({frames} frames of {cw}×{ch} {how}) would exceed the cap of \
             {} MiB per video",
            limits.max_cache_bytes >> 20
        ),
    )
}

/// The cache could not be written: the server's fault, and its error names server paths.
pub(super) fn cache_failed(e: anyhow::Error) -> Rejection {
    Rejection::server(
        "io_error",
        "the server could not write the training cache for this video",
        format!("{e:#}"),
    )
}

pub(super) fn finish(decoded: u64, errors: u32) -> Result<u64, Rejection> {
    // A file whose packets fail to decode is truncated or corrupt, even if some frames came out.
    if errors > 0 && (decoded == 0 || errors as u64 * 20 > decoded) {
        return Err(Rejection::new(
            "corrupt",
            format!("corrupt or truncated: {errors} decoding errors, {decoded} frames decoded"),
        ));
    }
    Ok(decoded)
}

/// Copy an RGB24 frame into a tightly packed buffer (FFmpeg rows may carry padding).
fn pack_rgb(frame: &ff::frame::Video, w: usize, h: usize, out: &mut Vec<u8>) {
    let stride = frame.stride(0);
    let data = frame.data(0);
    out.clear();
    for row in 0..h {
        out.extend_from_slice(&data[row * stride..row * stride + w * 3]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_size_keeps_aspect_and_short_side() {
        assert_eq!(cache_size(320, 240, 128), (171, 128));
        assert_eq!(cache_size(1280, 720, 128), (228, 128));
        assert_eq!(cache_size(240, 320, 128), (128, 171));
        assert_eq!(cache_size(64, 64, 128), (128, 128));
    }
}
