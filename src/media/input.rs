//! Opening an untrusted media file: FFmpeg reads that file's own bytes and nothing else, and only
//! through the demuxers of the containers hospitals record in.
//!
//! Left to itself, FFmpeg opens whatever a file points at: an HLS or DASH playlist reads its
//! segments, an ffconcat list reads other files, a QuickTime reference atom (`dref`) reads an
//! external file, an image pattern reads a sequence. An upload could so make the decoder read a
//! file of the server (or a URL) and have it ingested as the upload's own video. Two layers keep
//! every read inside the uploaded file:
//!
//! 1. No second file can be opened. The file is handed to FFmpeg already open, as a custom
//!    AVIOContext, and the format context's `io_open` callback (which every demuxer calls to open
//!    a segment, list entry or reference) refuses everything. `protocol_whitelist` names no
//!    protocol, and the mov demuxer's `enable_drefs` is pinned off, in case a demuxer went around
//!    `io_open`.
//! 2. Only allow-listed demuxers run. The content is probed first (names and extensions are
//!    ignored) and the demuxer it picks must be one of [`ALLOWED_DEMUXERS`]; anything else is
//!    refused before its header is parsed. FFmpeg's own `format_whitelist` enforces the same
//!    list inside `avformat_open_input`.
use std::ffi::{CStr, c_char, c_int};
use std::fs::File;
use std::path::Path;
use std::ptr;

use ff::ffi;
use ff::format::context::{Input, StreamIo};
use ffmpeg_next as ff;

/// FFmpeg demuxers (by their full `AVInputFormat.name`) that may read an upload: MP4/MOV (and
/// their 3GP/MJ2 relatives), Matroska/WebM, AVI, MPEG-TS and MPEG-PS. None of them opens another
/// file by itself (mov only with `enable_drefs`, which stays off).
pub const ALLOWED_DEMUXERS: &[&str] = &[
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi",
    "mpegts",
    "mpeg",
];

/// Raw elementary streams, which carry no container: only for the video that a DICOM object
/// encapsulates (MPEG-2, H.264, HEVC transfer syntaxes), never for an upload itself. None of them
/// opens another file.
pub const ELEMENTARY_DEMUXERS: &[&str] = &["h264", "hevc", "mpegvideo"];

/// The accepted containers, for messages.
pub const ALLOWED_DESCRIPTION: &str = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS or MPEG-PS";

/// Read-ahead of the custom AVIOContext (FFmpeg's file protocol reads 32 KiB at a time too).
const IO_BUFFER: usize = 64 << 10;

/// Probe scores at or below this are FFmpeg's guesses ("misdetection possible"): a refused
/// demuxer that only guessed is reported as unrecognised content, not as its container.
const GUESS_SCORE: c_int = ffi::AVPROBE_SCORE_MAX / 4;

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file itself cannot be read.
    #[error("cannot read the file: {0}")]
    Unreadable(std::io::Error),
    /// FFmpeg recognises no container in the content, or the allowed demuxer it picked cannot
    /// read the header.
    #[error("no recognised container: {0}")]
    NotMedia(ff::Error),
    /// The content is a container that is not allowed: FFmpeg's demuxer name (`hls`, `concat`,
    /// `png_pipe`, …). Its header was never parsed.
    #[error("the container `{0}` is not allowed")]
    Refused(String),
}

/// Whether FFmpeg's demuxer `name` reads single images (`image2`, `png_pipe`, `jpeg_pipe`, …)
/// rather than a video container.
pub fn is_image_demuxer(name: &str) -> bool {
    name == "image2" || name.ends_with("_pipe") || name == "tty"
}

/// Open `path` for demuxing under the rules above; stream information is already probed.
pub fn open(path: &Path) -> Result<Input, OpenError> {
    open_allowing(path, ALLOWED_DEMUXERS)
}

/// [`open`] with another list of demuxers (by their full names).
pub fn open_allowing(path: &Path, allowed: &[&str]) -> Result<Input, OpenError> {
    super::decode::init();
    let file = File::open(path).map_err(OpenError::Unreadable)?;
    let mut io =
        StreamIo::from_read_seek_with_capacity(file, IO_BUFFER).map_err(OpenError::NotMedia)?;
    // SAFETY: `ps` is freed on every early return (by us before `avformat_open_input`, by
    // `avformat_open_input` itself when it fails, by `avformat_close_input` after it), and `io`
    // outlives it: on success it moves into the returned `Input`, which closes the context
    // before freeing the AVIOContext; on failure it drops after the context is gone. With
    // AVFMT_FLAG_CUSTOM_IO FFmpeg never frees `pb` itself.
    unsafe {
        let mut ps = ffi::avformat_alloc_context();
        if ps.is_null() {
            return Err(OpenError::NotMedia(ff::Error::Other { errno: ffi::ENOMEM }));
        }
        (*ps).pb = io.as_mut_ptr();
        (*ps).flags |= ffi::AVFMT_FLAG_CUSTOM_IO;
        (*ps).io_open = Some(refuse_nested_open);

        // Probe by content alone (no file name: an extension must not sway the choice, and the
        // same bytes must get the same verdict in a dataset and in a prediction). The probe
        // rewinds `pb`, so the demuxer then reads from the start.
        let mut format: *const ffi::AVInputFormat = ptr::null();
        let score =
            ffi::av_probe_input_buffer2((*ps).pb, &mut format, ptr::null(), ps.cast(), 0, 0);
        if score < 0 || format.is_null() {
            ffi::avformat_free_context(ps);
            return Err(OpenError::NotMedia(ff::Error::from(
                score.min(ffi::AVERROR_INVALIDDATA),
            )));
        }
        let name = CStr::from_ptr((*format).name)
            .to_string_lossy()
            .into_owned();
        if !allowed.contains(&name.as_str()) {
            ffi::avformat_free_context(ps);
            return Err(if score <= GUESS_SCORE {
                OpenError::NotMedia(ff::Error::InvalidData)
            } else {
                OpenError::Refused(name)
            });
        }

        let mut options = guard_options(allowed).disown();
        let r = ffi::avformat_open_input(&mut ps, ptr::null(), format, &mut options);
        ff::Dictionary::own(options);
        if r < 0 {
            return Err(OpenError::NotMedia(ff::Error::from(r)));
        }
        let r = ffi::avformat_find_stream_info(ps, ptr::null_mut());
        if r < 0 {
            ffi::avformat_close_input(&mut ps);
            return Err(OpenError::NotMedia(ff::Error::from(r)));
        }
        Ok(Input::wrap_with_custom_io(ps, io))
    }
}

/// The options every open carries: the second line of defence behind `io_open`.
fn guard_options(allowed: &[&str]) -> ff::Dictionary<'static> {
    let mut d = ff::Dictionary::new();
    // Enforced by avformat_open_input itself, before the demuxer reads its header.
    d.set("format_whitelist", &allowed.join(","));
    // Names no protocol: any URL a demuxer opened through FFmpeg's default I/O would be
    // refused ("not on whitelist"). The upload itself needs none, it is read through `pb`.
    d.set("protocol_whitelist", "");
    // mov: never follow data references to other files (off by default; kept off explicitly).
    d.set("enable_drefs", "0");
    d
}

/// `AVFormatContext.io_open` that refuses every open: segments, list entries, references.
unsafe extern "C" fn refuse_nested_open(
    _s: *mut ffi::AVFormatContext,
    _pb: *mut *mut ffi::AVIOContext,
    _url: *const c_char,
    _flags: c_int,
    _options: *mut *mut ffi::AVDictionary,
) -> c_int {
    ffi::AVERROR(ffi::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A real, small H.264 MP4.
    fn mp4(path: &Path) {
        let mut w = crate::media::encode::Mp4Writer::create(path, 32, 24, 15, 15).unwrap();
        for i in 0..8u8 {
            w.push_gray(&[16 + 8 * i; 32 * 24]).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn playlists_and_lists_of_files_are_refused_before_they_open_anything() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.mp4");
        mp4(&outside);
        // The outside file itself is a perfectly good video.
        assert_eq!(open(&outside).unwrap().format().name(), ALLOWED_DEMUXERS[0]);

        let hls = format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
            outside.display()
        );
        let concat = format!("ffconcat version 1.0\nfile '{}'\n", outside.display());
        for (name, text, demuxer) in [
            ("a.mp4", hls.as_str(), "hls"),
            ("b.mp4", concat.as_str(), "concat"),
        ] {
            let p = write(dir.path(), name, text.as_bytes());
            match open(&p) {
                Err(OpenError::Refused(d)) => assert_eq!(d, demuxer),
                other => panic!("{name}: {:?}", other.map(|i| i.format().name().to_owned())),
            }
        }
    }

    #[test]
    fn unrecognised_bytes_are_not_media() {
        let dir = tempfile::tempdir().unwrap();
        let random: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let p = write(dir.path(), "r.mp4", &random);
        assert!(matches!(open(&p), Err(OpenError::NotMedia(_))));
        let missing = dir.path().join("missing.mp4");
        assert!(matches!(open(&missing), Err(OpenError::Unreadable(_))));
    }

    #[test]
    fn a_refused_open_from_inside_a_demuxer_fails_cleanly() {
        // What a demuxer sees when it tries to open a segment.
        let r = unsafe {
            refuse_nested_open(
                ptr::null_mut(),
                ptr::null_mut(),
                c"file:/etc/passwd".as_ptr(),
                0,
                ptr::null_mut(),
            )
        };
        assert_eq!(r, ffi::AVERROR(ffi::EPERM));
    }
}
