//! What one upload may cost the server: archives that expand past their size or name a path
//! twice, videos whose training cache would be huge, form fields held in memory, decoders per
//! upload; and the dataset's cache spec, which training and serving must both honour.
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_problem, spawn_app, spawn_app_with};
use crate::media::{self, file};

/// The overlapping-entry zip bomb, byte by byte: one stored local file and `names.len()`
/// central-directory entries that all point at it.
fn overlapping_zip(names: &[String], data: &[u8]) -> Vec<u8> {
    let le16 = |v: usize| (v as u16).to_le_bytes();
    let le32 = |v: usize| (v as u32).to_le_bytes();
    let crc = crc32fast::hash(data).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, stored, time, date
    out.extend_from_slice(&crc);
    out.extend_from_slice(&le32(data.len()));
    out.extend_from_slice(&le32(data.len()));
    out.extend_from_slice(&le16(names[0].len()));
    out.extend_from_slice(&le16(0));
    out.extend_from_slice(names[0].as_bytes());
    out.extend_from_slice(data);
    let cd_start = out.len();
    for name in names {
        out.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&crc);
        out.extend_from_slice(&le32(data.len()));
        out.extend_from_slice(&le32(data.len()));
        out.extend_from_slice(&le16(name.len()));
        out.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        out.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
        out.extend_from_slice(&le32(0)); // every entry's local header: the same one
        out.extend_from_slice(name.as_bytes());
    }
    let cd_len = out.len() - cd_start;
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&le16(names.len()));
    out.extend_from_slice(&le16(names.len()));
    out.extend_from_slice(&le32(cd_len));
    out.extend_from_slice(&le32(cd_start));
    out.extend_from_slice(&le16(0));
    out
}

/// Bytes under the data directory's folder of dataset `ds`, except its training cache.
fn bytes_on_disk(app: &TestApp, ds: &str) -> u64 {
    use vidtune::datadir::dir_bytes;
    let root = app.data_dir.join("datasets").join(ds);
    dir_bytes(&root) - dir_bytes(&root.join("cache"))
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn hostile_archives_fail_whole_with_a_stable_reason_and_leave_no_files(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("endoscopy", false).await;
    let dir = tempfile::tempdir().unwrap();

    // 64 directory entries over one 256 KiB stored file: 16 MiB from a 260 KiB upload, every
    // entry at 1:1, so no per-entry ratio stops it.
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let names: Vec<String> = (0..64).map(|i| format!("polyp/v{i}.mp4")).collect();
    let bomb = overlapping_zip(&names, &data);
    let ds = app.dataset(&key, json!({"name": "bomb"})).await;
    app.upload_raw(&key, &ds, "application/zip", bomb).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "failed", "{view}");
    let reason = view["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("overlap") && reason.contains("(overlapping_entries)"),
        "{reason}"
    );
    assert_eq!(
        bytes_on_disk(&app, &ds),
        0,
        "the archive and its files are gone"
    );
    assert_eq!(view["videos_total"], 0, "{view}");

    // One path twice in a tar.gz: the upload fails as a whole, named by the path; nothing
    // extracted stays, and the text carries no database or server internals.
    let good = media::read(&media::video(dir.path(), "a.mp4", "h264", 20, "160x120"));
    let archive = media::tar_gz(&[
        file("polyp/a.mp4", good.clone()),
        file("normal/b.mp4", good.clone()),
        file("polyp/a.mp4", good.clone()),
    ]);
    let ds = app.dataset(&key, json!({"name": "twice"})).await;
    app.upload_raw(&key, &ds, "application/gzip", archive).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "failed", "{view}");
    let reason = view["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("`polyp/a.mp4` more than once") && reason.ends_with("(duplicate_path)"),
        "{reason}"
    );
    for leak in ["duplicate key", "constraint", "violates", "/tmp/", "sqlx"] {
        assert!(!reason.contains(leak), "{reason}");
    }
    assert_eq!(
        bytes_on_disk(&app, &ds),
        0,
        "the archive and its files are gone"
    );

    // The same dataset takes a clean archive afterwards.
    let archive = media::tar_gz(&[file("polyp/a.mp4", good)]);
    app.upload_raw(&key, &ds, "application/gzip", archive).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
}

/// `frames` of 160×120 H.264 in Matroska written to a pipe, so the file declares no duration.
fn piped_mkv(frames: u32) -> Vec<u8> {
    let out = std::process::Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=15",
        ])
        .args([
            "-frames:v",
            &frames.to_string(),
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-preset", "ultrafast", "-f", "matroska", "pipe:1"])
        .output()
        .expect("ffmpeg on PATH");
    assert!(out.status.success());
    out.stdout
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn videos_whose_cache_would_be_huge_are_refused_before_decoding(db: PgPool) {
    // 1 MiB of cache per video: 12 frames of 171×128 fit, 24 do not.
    let app = spawn_app_with(db, |s| s.ingest.video_limits.max_cache_bytes = 1 << 20).await;
    let key = app.key_for("endoscopy", false).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let archive = media::zip(&[
        // 4.5 KB that would be cached at 8192×128 per frame.
        file(
            "polyp/strip.mp4",
            media::read(&media::video(d, "s.mp4", "h264", 30, "4096x64")),
        ),
        file(
            "polyp/long.mp4",
            media::read(&media::video(d, "l.mp4", "h264", 24, "160x120")),
        ),
        // No duration in the container (written to a pipe): only the frames tell its size.
        file("polyp/piped.mkv", piped_mkv(24)),
        file(
            "polyp/short.mp4",
            media::read(&media::video(d, "t.mp4", "h264", 12, "160x120")),
        ),
    ]);
    let ds = app.dataset(&key, json!({"name": "shapes"})).await;
    app.upload_raw(&key, &ds, "application/zip", archive).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    let videos = app.videos(&key, &ds).await;
    let verdict = |p: &str| {
        (
            videos[p]["status"].as_str().unwrap().to_owned(),
            videos[p]["reason_code"].as_str().unwrap_or("").to_owned(),
        )
    };
    assert_eq!(
        verdict("polyp/strip.mp4"),
        ("rejected".into(), "aspect_ratio".into())
    );
    assert!(
        videos["polyp/strip.mp4"]["reason"]
            .as_str()
            .unwrap()
            .contains("4096×64"),
        "{}",
        videos["polyp/strip.mp4"]
    );
    assert_eq!(
        verdict("polyp/long.mp4"),
        ("rejected".into(), "cache_too_large".into())
    );
    // Foreseen from the probe, before a frame was decoded; the piped file only as decoded.
    let reason = |p: &str| videos[p]["reason"].as_str().unwrap().to_owned();
    assert!(
        reason("polyp/long.mp4").contains("by its duration"),
        "{}",
        reason("polyp/long.mp4")
    );
    assert!(
        reason("polyp/piped.mkv").contains("as decoded"),
        "{}",
        reason("polyp/piped.mkv")
    );
    assert_eq!(
        verdict("polyp/piped.mkv"),
        ("rejected".into(), "cache_too_large".into())
    );
    assert_eq!(verdict("polyp/short.mp4"), ("accepted".into(), "".into()));
    // The refused videos' extracted files are gone; only the accepted video has a cache.
    let source = |p: &str| {
        app.data_dir
            .join("datasets")
            .join(&ds)
            .join("files")
            .join(videos[p]["upload_id"].as_str().unwrap())
            .join(p)
    };
    assert!(source("polyp/short.mp4").exists());
    assert!(!source("polyp/strip.mp4").exists());
    assert!(!source("polyp/long.mp4").exists());
    let caches: Vec<_> = std::fs::read_dir(app.data_dir.join("datasets").join(&ds).join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        caches,
        [format!(
            "{}.vtc",
            videos["polyp/short.mp4"]["id"].as_str().unwrap()
        )]
    );
    let report: Value = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["totals"]["rejected"], 3, "{report}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn the_cache_spec_is_honoured_and_serving_decodes_as_training_read(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cardiology", false).await;
    let dir = tempfile::tempdir().unwrap();
    let src = media::video(dir.path(), "v.mp4", "h264", 20, "160x120");

    // Out of bounds or unknown: 422, never silently replaced by the default.
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "small", "cache": {"short_side": 8}}),
        )
        .await;
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], "cache.short_side");
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "typo", "cache": {"shortside": 64}}),
        )
        .await;
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("shortside"),
        "{problem}"
    );

    let ds = app
        .dataset(
            &key,
            json!({"name": "echo", "cache": {"short_side": 64, "fps": 10}}),
        )
        .await;
    let resp = app
        .request(
            Method::POST,
            &format!("/v1/datasets/{ds}/videos?label=normal"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(media::read(&src))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["cache_spec"]["short_side"], 64, "{view}");
    assert_eq!(view["cache_spec"]["fps"].as_f64(), Some(10.0), "{view}");
    let video = app.videos(&key, &ds).await["video"].clone();
    assert_eq!(
        (&video["cache_width"], &video["cache_height"]),
        (&json!(85), &json!(64)),
        "{video}"
    );
    let trained_on = app
        .data_dir
        .join("datasets")
        .join(&ds)
        .join("cache")
        .join(format!("{}.vtc", video["id"].as_str().unwrap()));

    // A model trained on the dataset records its cache spec; serving decodes with it.
    let dataset: uuid::Uuid = ds.parse().unwrap();
    let tenant: uuid::Uuid = app.tenant_id("cardiology").await.parse().unwrap();
    let (job, model) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, state, epochs) values ($1, $2, $3, 'r3d_18', '{}', 'succeeded', 1)")
        .bind(job).bind(tenant).bind(dataset).execute(&app.db).await.unwrap();
    let metrics = vidtune::evaluation::Metrics::default();
    vidtune::db::models::insert(
        &app.db,
        &vidtune::db::models::NewModel {
            id: model,
            tenant_id: tenant,
            job_id: job,
            dataset_id: dataset,
            dataset_hash: None,
            base_model: "r3d_18",
            base_weights_sha256: None,
            hyperparameters: &json!({}),
            classes: &["normal".to_string(), "other".to_string()],
            preprocessing: serde_json::to_value(vidtune::backbone::Arch::R3d18.preprocessing())
                .unwrap(),
            head: json!({"type": "linear", "dropout": 0}),
            eval_clips: 1,
            val_metrics: &metrics,
            test_metrics: None,
            vidtune_version: "0",
            libtorch_version: "0",
            path: &format!("models/{model}"),
            bytes: 0,
        },
    )
    .await
    .unwrap();
    let record = vidtune::db::models::get(&app.db, tenant, model)
        .await
        .unwrap()
        .unwrap();
    let data = vidtune::datadir::DataDir::new(&app.data_dir);
    let meta = vidtune::serve::model_meta(&app.db, &data, tenant, &record)
        .await
        .unwrap();
    assert_eq!((meta.decode.short_side, meta.decode.fps), (64, 10.0));
    let served = dir.path().join("served.vtc");
    vidtune::media::decode::ingest_video(
        &src,
        &served,
        &meta.decode,
        &vidtune::media::decode::Limits::default(),
    )
    .unwrap();
    // The frames serving classifies are, byte for byte, those training read.
    assert_eq!(
        std::fs::read(&served).unwrap(),
        std::fs::read(&trained_on).unwrap()
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn form_fields_are_small_and_one_file_comes_per_request(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("radiology", false).await;
    let dir = tempfile::tempdir().unwrap();
    let video = media::read(&media::video(dir.path(), "v.mp4", "h264", 12, "64x48"));
    let ds = app.dataset(&key, json!({"name": "forms"})).await;
    let post = |form: Form| {
        app.request(Method::POST, &format!("/v1/datasets/{ds}/videos"), &key)
            .multipart(form)
            .send()
    };

    // A 1 MiB text field is refused, not read into memory (also one the server has no use for).
    let form = Form::new()
        .text("label", "liver")
        .text("note", "x".repeat(1 << 20))
        .part("file", Part::bytes(video.clone()).file_name("v.mp4"));
    let problem = assert_problem(post(form).await.unwrap(), 413, "payload_too_large").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("`note`"),
        "{problem}"
    );

    // Two files in one request: which is meant is ambiguous.
    let form = Form::new()
        .text("label", "liver")
        .part("file", Part::bytes(video.clone()).file_name("a.mp4"))
        .part("file", Part::bytes(video.clone()).file_name("b.mp4"));
    let problem = assert_problem(post(form).await.unwrap(), 422, "validation_failed").await;
    assert_eq!(problem["field"], "file");

    // Fields without end.
    let mut form = Form::new().text("label", "liver");
    for i in 0..40 {
        form = form.text(format!("extra{i}"), "x");
    }
    let form = form.part("file", Part::bytes(video.clone()).file_name("v.mp4"));
    assert_problem(post(form).await.unwrap(), 422, "validation_failed").await;

    // Nothing was kept, and the dataset takes a proper upload.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(bytes_on_disk(&app, &ds), 0, "partial uploads left on disk");
    let form = Form::new()
        .text("label", "liver")
        .part("file", Part::bytes(video).file_name("v.mp4"));
    assert_eq!(post(form).await.unwrap().status(), 202);
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["videos_accepted"], 1, "{view}");
}

/// `media-worker` children started from `exe` that are alive now.
fn decoders_running(exe: &std::path::Path) -> usize {
    let want = exe.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmd| {
            let mut args = cmd.split(|&b| b == 0);
            args.next() == Some(want) && args.next() == Some(b"media-worker")
        })
        .count()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn ingest_decoders_are_bounded_for_the_process_not_per_upload(db: PgPool) {
    // The server's binary under a name of this test's own, to count its decoders alone.
    let bin = tempfile::tempdir().unwrap();
    let exe = bin.path().join("vidtune-decoder-count");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vidtune"), &exe).unwrap();
    let worker_exe = exe.clone();
    let app = spawn_app_with(db, move |s| {
        s.ingest.concurrency = 1;
        s.ingest.media_worker_exe = worker_exe;
    })
    .await;
    let key = app.key_for("endoscopy", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut datasets = Vec::new();
    let mut archives = Vec::new();
    for n in 0..3 {
        datasets.push(app.dataset(&key, json!({"name": format!("d{n}")})).await);
        let entries: Vec<_> = (0..3)
            .map(|i| {
                let name = format!("v{n}{i}.mp4");
                let v = media::video(dir.path(), &name, "h264", 20 + i, "96x72");
                file(&format!("polyp/{name}"), media::read(&v))
            })
            .collect();
        archives.push(media::zip(&entries));
    }
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (watching, exe) = (watching.clone(), exe.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(decoders_running(&exe));
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            most
        })
    };
    // Three uploads at once.
    let uploads = datasets.iter().zip(archives).map(|(ds, archive)| {
        app.request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
            .header("content-type", "application/zip")
            .body(archive)
            .send()
    });
    for resp in futures_util::future::join_all(uploads).await {
        assert_eq!(resp.unwrap().status(), 202);
    }
    for ds in &datasets {
        let view = app.wait_ingested(&key, ds).await;
        assert_eq!(view["videos_accepted"], 3, "{view}");
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.join().unwrap();
    assert_eq!(most, 1, "decoders alive at once across three uploads");
}
