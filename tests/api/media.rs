//! Real media made for the tests with the ffmpeg command-line tool, and archives around them;
//! and the tests of what FFmpeg may open: only the uploaded file's own bytes, only the
//! containers hospitals use, with answers that carry no server internals.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_problem, spawn_app};

/// Encode a short test-pattern video. `codec`: `h264` (MP4), `mjpeg` (AVI), `vp9` (WebM),
/// `mpeg2` (MPEG-PS), `gif`; the container follows the name's extension (except for `gif`).
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
        // MPEG-2 video, as in an MPEG-PS (`.mpg`) file.
        "mpeg2" => &["-c:v", "mpeg2video", "-q:v", "5"],
        // An animated GIF, whatever the file is called.
        "gif" => &["-c:v", "gif", "-f", "gif"],
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

/// A named pipe outside every upload that hands `bytes` (a real video) to whoever opens it and
/// remembers that someone did: proof that a file was, or was not, read. A regular file's access
/// time would not do (relatime, noatime).
pub struct Tripwire {
    pub path: PathBuf,
    opened: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Tripwire {
    pub fn new(name: &str, bytes: Vec<u8>) -> Self {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
        let (opened, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, o, s) = (path.clone(), opened.clone(), stop.clone());
        // Opening a FIFO for writing without blocking succeeds only while a reader has it open.
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&p)
                {
                    Ok(mut f) => {
                        o.store(true, Ordering::SeqCst);
                        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
                        let _ = f.write_all(&bytes);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        Self {
            path,
            opened,
            stop,
            _dir: dir,
        }
    }

    pub fn was_opened(&self) -> bool {
        self.opened.load(Ordering::SeqCst)
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An HLS playlist whose one segment is `segment` (an absolute path on the server).
pub fn hls_playlist(segment: &Path) -> Vec<u8> {
    format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n\
         #EXTINF:3.0,\n{}\n#EXT-X-ENDLIST\n",
        segment.display()
    )
    .into_bytes()
}

/// A 45-frame MPEG-TS, the kind of file an HLS playlist points at.
fn outside_ts() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    read(&video(dir.path(), "outside.ts", "h264", 45, "160x120"))
}

/// Status and reason code of each video of a dataset, by path.
async fn verdicts(
    app: &TestApp,
    key: &str,
    ds: &str,
) -> std::collections::BTreeMap<String, (String, String)> {
    app.videos(key, ds)
        .await
        .into_iter()
        .map(|(p, v)| {
            let code = v["reason_code"].as_str().unwrap_or("").to_owned();
            (p, (v["status"].as_str().unwrap().to_owned(), code))
        })
        .collect()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn only_the_uploads_own_bytes_in_hospital_containers_are_decoded(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("endoscopy", false).await;
    let tripwire = Tripwire::new("outside.ts", outside_ts());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mp4 = read(&video(d, "a.mp4", "h264", 20, "160x120"));
    let mut entries = vec![
        file("polyp/a.mp4", mp4.clone()),
        file(
            "polyp/b.mkv",
            read(&video(d, "b.mkv", "h264", 20, "160x120")),
        ),
        file(
            "polyp/c.webm",
            read(&video(d, "c.webm", "vp9", 20, "128x96")),
        ),
        file(
            "polyp/d.mov",
            read(&video(d, "d.mov", "h264", 20, "160x120")),
        ),
        file(
            "normal/e.avi",
            read(&video(d, "e.avi", "mjpeg", 20, "160x120")),
        ),
        file(
            "normal/f.ts",
            read(&video(d, "f.ts", "h264", 20, "160x120")),
        ),
        file(
            "normal/g.mpg",
            read(&video(d, "g.mpg", "mpeg2", 20, "160x120")),
        ),
        // A playlist that would decode a server file as this upload's video.
        file("normal/playlist.mp4", hls_playlist(&tripwire.path)),
        // A list of files (here another file of the same upload).
        file(
            "normal/list.mp4",
            b"ffconcat version 1.0\nfile 'a.mp4'\n".to_vec(),
        ),
        file("normal/a.mp4", mp4),
        // Images are not videos: neither an animation nor a single picture.
        file(
            "normal/anim.mp4",
            read(&video(d, "anim.gif", "gif", 20, "64x48")),
        ),
        file("normal/still.mp4", read(&png(d, "still.png"))),
    ];
    entries.push(file("normal/audio.m4a", read(&audio_only(d, "tone.mp4"))));
    let ds = app.dataset(&key, json!({"name": "containers"})).await;
    app.upload_raw(&key, &ds, "application/zip", zip(&entries))
        .await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");

    let got = verdicts(&app, &key, &ds).await;
    for good in [
        "polyp/a.mp4",
        "polyp/b.mkv",
        "polyp/c.webm",
        "polyp/d.mov",
        "normal/e.avi",
        "normal/f.ts",
        "normal/g.mpg",
        "normal/a.mp4",
    ] {
        assert_eq!(got[good], ("accepted".into(), "".into()), "{good}: {got:?}");
    }
    let rejected = |code: &str| ("rejected".to_string(), code.to_string());
    assert_eq!(
        got["normal/playlist.mp4"],
        rejected("unsupported_container")
    );
    assert_eq!(got["normal/list.mp4"], rejected("unsupported_container"));
    assert_eq!(got["normal/anim.mp4"], rejected("unsupported_container"));
    assert_eq!(got["normal/still.mp4"], rejected("still_image"));
    // Audio-only MP4 is an accepted container without a video in it.
    assert_eq!(got["normal/audio.m4a"], rejected("no_video_stream"));
    assert!(
        !tripwire.was_opened(),
        "FFmpeg opened a file outside the upload"
    );

    let report: Value = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    let playlist = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == "normal/playlist.mp4")
        .expect("the playlist is listed as rejected");
    assert_eq!(playlist["code"], "unsupported_container", "{playlist}");
    let reason = playlist["reason"].as_str().unwrap();
    assert!(
        reason.contains("hls") && !reason.contains("outside.ts"),
        "{reason}"
    );
    assert_eq!(report["totals"]["accepted"], 8, "{report}");
}

/// A model record (no weights needed: the video is refused before the model is loaded).
async fn model_record(app: &TestApp, key: &str) -> String {
    let ds = app.dataset(key, json!({"name": "for-model"})).await;
    let tenant: uuid::Uuid =
        sqlx::query_scalar("select tenant_id from datasets where id = $1::uuid")
            .bind(&ds)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let job = uuid::Uuid::new_v4();
    sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, state, epochs) values ($1, $2, $3::uuid, 'r3d_18', '{}', 'succeeded', 1)")
        .bind(job).bind(tenant).bind(&ds).execute(&app.db).await.unwrap();
    let model = uuid::Uuid::new_v4();
    let prep = vidtune::backbone::Arch::R3d18.preprocessing();
    sqlx::query(
        "insert into models (id, tenant_id, job_id, dataset_id, base_model, hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, vidtune_version, libtorch_version, path)
         values ($1, $2, $3, $4::uuid, 'r3d_18', '{}', '{a,b}', $5, '{\"short_side\": 64, \"fps\": 15}', '{\"type\": \"linear\", \"dropout\": 0}', 1, '{}', '0', '0', $6)",
    )
    .bind(model).bind(tenant).bind(job).bind(&ds).bind(serde_json::to_value(&prep).unwrap()).bind(format!("models/{model}"))
    .execute(&app.db).await.unwrap();
    model.to_string()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn predicting_on_a_playlist_answers_unsupported_container(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cardiology", false).await;
    let model = model_record(&app, &key).await;
    let tripwire = Tripwire::new("segment.ts", outside_ts());
    let resp = app
        .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
        .header("content-type", "video/mp4")
        .body(hls_playlist(&tripwire.path))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, 422, "unsupported_container").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.starts_with("unsupported_container: "), "{problem}");
    assert!(
        !detail.contains(app.data_dir.to_str().unwrap()),
        "{problem}"
    );
    assert!(
        !tripwire.was_opened(),
        "FFmpeg opened a file outside the upload"
    );
}

/// Text the tenant reads must not carry server paths or database internals.
fn assert_no_internals(app: &TestApp, what: &str, text: &str) {
    let data_dir = app.data_dir.to_str().unwrap();
    for leak in [
        data_dir,
        "/tmp/",
        "/work/",
        "duplicate key",
        "violates",
        "constraint",
        "sqlx",
        "error returned from database",
        "invalid byte sequence",
    ] {
        assert!(!text.contains(leak), "{what} leaks `{leak}`: {text}");
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn hostile_uploads_get_reasons_without_server_internals(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("surgery", false).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = read(&video(d, "a.mp4", "h264", 20, "160x120"));
    let other = read(&video(d, "b.mp4", "h264", 24, "128x96"));
    let outside = d.join("outside.ts");
    std::fs::write(&outside, outside_ts()).unwrap();
    // A tar with a corrupt video, a playlist, a file and folder of one name (one path twice
    // fails the whole upload: `ingest_bounds`).
    let archive = tar_gz(&[
        file("polyp/a.mp4", good.clone()),
        file("polyp/corrupt.mp4", good[..good.len() / 3].to_vec()),
        file("polyp/playlist.mp4", hls_playlist(&outside)),
        file("normal/b.mp4", other),
        file("normal/b.mp4/inside.mp4", good.clone()),
    ]);
    let ds = app.dataset(&key, json!({"name": "hostile"})).await;
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "application/gzip")
        .body(archive)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_no_internals(&app, "the upload answer", &resp.text().await.unwrap());
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_no_internals(&app, "the dataset", &view.to_string());

    let got = verdicts(&app, &key, &ds).await;
    let rejected = |code: &str| ("rejected".to_string(), code.to_string());
    assert_eq!(
        got["polyp/a.mp4"],
        ("accepted".into(), "".into()),
        "{got:?}"
    );
    assert_eq!(got["polyp/corrupt.mp4"].0, "rejected", "{got:?}");
    assert_eq!(got["polyp/playlist.mp4"], rejected("unsupported_container"));
    assert_eq!(got["normal/b.mp4/inside.mp4"], rejected("path_conflict"));
    for path in [
        format!("/v1/datasets/{ds}/report"),
        format!("/v1/datasets/{ds}/videos"),
    ] {
        let body = app.get(&path, &key).await.text().await.unwrap();
        assert_no_internals(&app, &path, &body);
    }

    // A zip entry named with a NUL byte and a label with one: stored, shown, not a DB error.
    let zipped = zip(&[
        file("normal/c.mp4", good.clone()),
        file("normal/bad\0name.mp4", good.clone()),
        file(
            "labels.csv",
            b"path,label\nnormal/c.mp4,nor\0mal\nnormal/bad\0name.mp4,normal\n".to_vec(),
        ),
    ]);
    let ds2 = app.dataset(&key, json!({"name": "hostile-zip"})).await;
    app.upload_raw(&key, &ds2, "application/zip", zipped).await;
    let view = app.wait_ingested(&key, &ds2).await;
    assert_no_internals(&app, "the dataset", &view.to_string());
    assert!(
        view["status_reason"].as_str().unwrap().contains("rejected"),
        "{view}"
    );
    let body = app
        .get(&format!("/v1/datasets/{ds2}/report"), &key)
        .await
        .text()
        .await
        .unwrap();
    assert_no_internals(&app, "the report", &body);

    // Names and labels the database cannot hold are refused up front, not answered with a 500.
    let resp = app
        .post_json("/v1/datasets", &key, json!({"name": "bad\u{0}name"}))
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let resp = app
        .request(
            Method::POST,
            &format!("/v1/datasets/{ds}/videos?label=po%00lyp"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(good)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], "label");
}
