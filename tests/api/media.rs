//! Real media made for the tests with the ffmpeg command-line tool, and archives around them.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Encode a short test-pattern video. `codec`: `h264` (MP4), `mjpeg` (AVI), `vp9` (WebM).
pub fn video(dir: &Path, name: &str, codec: &str, frames: u32, size: &str) -> PathBuf {
    let out = dir.join(name);
    let codec_args: &[&str] = match codec {
        "h264" => &[
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
        ],
        "mjpeg" => &["-c:v", "mjpeg", "-q:v", "5"],
        "vp9" => &[
            "-c:v",
            "libvpx-vp9",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
        ],
        other => panic!("unknown codec {other}"),
    };
    let frames = frames.to_string();
    let src = format!("testsrc=size={size}:rate=15");
    run(&[
        &["-f", "lavfi", "-i", &src, "-frames:v", &frames],
        codec_args,
        &[out.to_str().unwrap()],
    ]
    .concat());
    out
}

/// An audio-only MP4.
pub fn audio_only(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=1",
        "-c:a",
        "aac",
        out.to_str().unwrap(),
    ]);
    out
}

/// A PNG still image.
pub fn png(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48",
        "-frames:v",
        "1",
        "-f",
        "image2",
        "-c:v",
        "png",
        out.to_str().unwrap(),
    ]);
    out
}

fn run(args: &[&str]) {
    let status = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error"])
        .args(args)
        .status()
        .expect("ffmpeg on PATH (scripts/setup installs it)");
    assert!(status.success(), "ffmpeg {args:?}");
}

/// What goes into a test archive.
pub enum Entry {
    File(String, Vec<u8>),
    Symlink(String, String),
}

pub fn file(name: &str, bytes: Vec<u8>) -> Entry {
    Entry::File(name.into(), bytes)
}

pub fn zip(entries: &[Entry]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for e in entries {
        match e {
            Entry::File(name, bytes) => {
                w.start_file(name.as_str(), opts).unwrap();
                w.write_all(bytes).unwrap();
            }
            Entry::Symlink(name, target) => {
                w.add_symlink(name.as_str(), target.as_str(), opts).unwrap()
            }
        }
    }
    w.finish().unwrap().into_inner()
}

pub fn tar_gz(entries: &[Entry]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        match e {
            Entry::File(name, bytes) => {
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                // Write the raw name so `..` and absolute paths reach the server unchanged.
                set_raw_name(&mut h, name);
                h.set_cksum();
                b.append(&h, bytes.as_slice()).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                set_raw_name(&mut h, name);
                h.set_link_name(target).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn set_raw_name(h: &mut tar::Header, name: &str) {
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A clip of a white square crossing a black field, `rightwards` or leftwards: the two classes
/// differ only in motion, so no single frame tells them apart. `variant` varies height, speed
/// and start.
pub fn motion(dir: &Path, name: &str, rightwards: bool, variant: u32) -> PathBuf {
    let out = dir.join(name);
    let y = 8 + (variant * 7) % 40;
    let speed = 18 + (variant * 5) % 12;
    let start = (variant * 11) % 16;
    let x = if rightwards {
        format!("{start}+t*{speed}")
    } else {
        format!("52-{start}-t*{speed}")
    };
    let graph = format!(
        "color=black:s=64x64:r=15:d=2[bg];color=white:s=12x12:r=15:d=2[box];[bg][box]overlay=x='{x}':y={y}:shortest=1"
    );
    run(&[
        "-filter_complex",
        &graph,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-preset",
        "ultrafast",
        out.to_str().unwrap(),
    ]);
    out
}
