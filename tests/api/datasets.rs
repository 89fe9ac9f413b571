//! Dataset upload and ingest with real videos, real archives and real FFmpeg decoding.
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;
use vidtune::media::cache::CacheReader;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};
use crate::media::{self, Entry, file};

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_messy_zip_keeps_its_good_videos_and_explains_every_bad_file(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("endoscopy", false).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h264 = media::read(&media::video(d, "a.mp4", "h264", 24, "160x120"));
    let mjpeg = media::read(&media::video(d, "b.avi", "mjpeg", 20, "160x120"));
    let vp9 = media::read(&media::video(d, "c.webm", "vp9", 20, "128x96"));
    let truncated = h264[..h264.len() / 3].to_vec();
    let random: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let png = media::read(&media::png(d, "still.png"));
    let audio = media::read(&media::audio_only(d, "tone.mp4"));
    let archive = media::zip(&[
        file("polyp/a.mp4", h264.clone()),
        file("polyp/b.avi", mjpeg),
        file("normal/c.webm", vp9),
        file("normal/c-copy.mp4", h264.clone()),
        file("normal/truncated.mp4", truncated),
        file("normal/random.mp4", random),
        file("normal/still.mp4", png),
        file("normal/audio.mp4", audio),
        file("normal/empty.mp4", Vec::new()),
        file("notes/README.txt", b"scanned at site 3".to_vec()),
        file("../escape.mp4", h264.clone()),
        file("/etc/absolute.mp4", h264.clone()),
        Entry::Symlink("normal/link.mp4".into(), "/etc/passwd".into()),
        file("normal/bomb.mp4", vec![0u8; 30 << 20]),
    ]);
    let ds = app
        .dataset(&key, json!({"name": "colon", "description": "site 3"}))
        .await;
    let form = Form::new().part("file", Part::bytes(archive).file_name("ds.zip"));
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.headers()["location"],
        format!("/v1/datasets/{ds}").as_str()
    );

    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    assert_eq!(view["videos_done"], view["videos_total"]);
    let videos = app.videos(&key, &ds).await;
    let status = |p: &str| {
        let v = &videos[p];
        (
            v["status"].as_str().unwrap().to_owned(),
            v["reason_code"].as_str().unwrap_or("").to_owned(),
        )
    };
    for good in [
        "polyp/a.mp4",
        "polyp/b.avi",
        "normal/c.webm",
        "normal/c-copy.mp4",
    ] {
        assert_eq!(
            status(good),
            ("accepted".into(), "".into()),
            "{good}: {}",
            videos[good]
        );
    }
    assert_eq!(videos["polyp/a.mp4"]["codec"], "h264");
    assert_eq!(videos["polyp/b.avi"]["codec"], "mjpeg");
    assert_eq!(videos["normal/c.webm"]["codec"], "vp9");
    assert_eq!(videos["polyp/a.mp4"]["width"], 160);
    assert_eq!(videos["polyp/a.mp4"]["frames"], 24);
    assert_eq!(videos["polyp/a.mp4"]["label"], "polyp");
    assert_eq!(status("normal/truncated.mp4").0, "rejected");
    assert_eq!(
        status("normal/random.mp4"),
        ("rejected".into(), "not_media".into())
    );
    assert_eq!(
        status("normal/still.mp4"),
        ("rejected".into(), "still_image".into())
    );
    assert_eq!(
        status("normal/audio.mp4"),
        ("rejected".into(), "no_video_stream".into())
    );
    assert_eq!(
        status("normal/empty.mp4"),
        ("rejected".into(), "empty_file".into())
    );
    assert_eq!(status("notes/README.txt").0, "skipped");
    assert_eq!(
        status("../escape.mp4"),
        ("rejected".into(), "unsafe_path".into())
    );
    assert_eq!(
        status("/etc/absolute.mp4"),
        ("rejected".into(), "unsafe_path".into())
    );
    assert_eq!(
        status("normal/link.mp4"),
        ("rejected".into(), "symlink".into())
    );
    assert_eq!(
        status("normal/bomb.mp4"),
        ("rejected".into(), "compression_bomb".into())
    );
    for v in videos.values() {
        if v["status"] != "accepted" {
            assert!(!v["reason"].as_str().unwrap().is_empty(), "{v}");
        }
    }
    // Nothing was written outside the dataset's folder.
    assert!(!app.data_dir.join("datasets").join("escape.mp4").exists());
    assert!(
        !app.data_dir
            .join("datasets")
            .join(&ds)
            .join("files")
            .join("escape.mp4")
            .exists()
    );

    // The training cache holds every accepted video at 15 fps, short side 128, uint8 RGB.
    let a = &videos["polyp/a.mp4"];
    let cache = app
        .data_dir
        .join("datasets")
        .join(&ds)
        .join("cache")
        .join(format!("{}.vtc", a["id"].as_str().unwrap()));
    let mut reader = CacheReader::open(&cache).unwrap();
    assert_eq!((reader.header.width, reader.header.height), (171, 128));
    assert_eq!(reader.header.frames, 24);
    let mut frames = Vec::new();
    reader.read_frames(&[0, 1, 23], &mut frames).unwrap();
    assert_eq!(frames.len(), 3 * 171 * 128 * 3);
    assert!(
        frames.iter().any(|&b| b > 0),
        "decoded pixels are not blank"
    );
    assert_eq!(a["cache_frames"], 24);

    let report: Value = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["totals"]["accepted"], 4);
    assert_eq!(report["totals"]["skipped"], 1);
    assert_eq!(report["totals"]["rejected"], 9);
    let codes: Vec<&str> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"few_videos_in_class"), "{codes:?}");
    assert!(
        codes.iter().any(|c| c.starts_with("duplicate")),
        "{codes:?}"
    );
    assert_eq!(report["rejected"].as_array().unwrap().len(), 9);
    crate::openapi::assert_matches_schema("DatasetReport", &report);

    // The list filters on the stored status; anything else is refused by name.
    let rejected: Value = app
        .get(&format!("/v1/datasets/{ds}/videos?status=rejected"), &key)
        .await
        .json()
        .await
        .unwrap();
    let items = rejected["items"].as_array().unwrap();
    assert_eq!(items.len(), 9);
    assert!(
        items.iter().all(|v| v["status"] == "rejected"),
        "{rejected}"
    );
    let problem = assert_problem(
        app.get(&format!("/v1/datasets/{ds}/videos?status=done"), &key)
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["field"], "status");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn split_folders_in_a_tar_gz_are_respected(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cardiology", false).await;
    let dir = tempfile::tempdir().unwrap();
    let v = media::read(&media::video(dir.path(), "v.mp4", "h264", 16, "96x96"));
    let w = media::read(&media::video(dir.path(), "w.mp4", "h264", 18, "96x96"));
    let archive = media::tar_gz(&[
        file("echo/train/normal/1.mp4", v.clone()),
        file("echo/train/abnormal/2.mp4", w.clone()),
        file("echo/val/normal/3.mp4", w.clone()),
        file("echo/test/abnormal/4.mp4", v.clone()),
    ]);
    let ds = app.dataset(&key, json!({"name": "echo"})).await;
    app.upload_raw(&key, &ds, "application/gzip", archive).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    let videos = app.videos(&key, &ds).await;
    let split = |p: &str| videos[p]["split"].as_str().unwrap().to_owned();
    assert_eq!(split("train/normal/1.mp4"), "train");
    assert_eq!(split("val/normal/3.mp4"), "val");
    assert_eq!(split("test/abnormal/4.mp4"), "test");
    assert_eq!(videos["train/abnormal/2.mp4"]["label"], "abnormal");
    // Identical content across splits is called out.
    let report: Value = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    let codes: Vec<&str> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"duplicate_across_splits"), "{codes:?}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn labels_csv_with_patients_keeps_each_patient_in_one_split(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("surgery", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut entries = Vec::new();
    let mut csv = String::from("path,label,patient_id\n");
    for i in 0..12u32 {
        // Distinct content per video (different lengths) so nothing is a duplicate.
        let bytes = media::read(&media::video(
            dir.path(),
            &format!("{i}.mp4"),
            "h264",
            16 + i,
            "64x64",
        ));
        let label = if i % 2 == 0 { "phase_a" } else { "phase_b" };
        entries.push(file(&format!("clips/{i}.mp4"), bytes));
        csv.push_str(&format!("clips/{i}.mp4,{label},p{}\n", i / 3));
    }
    csv.push_str("clips/missing.mp4,phase_a,p9\n");
    csv.push_str("clips/0.mp4,phase_c,p0\n");
    entries.push(file("labels.csv", csv.into_bytes()));
    entries.push(file("clips/extra.mp4", Vec::from(&b"not listed"[..])));
    let ds = app
        .dataset(&key, json!({"name": "phases", "classes": ["phase_a", "phase_b"], "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 3}}))
        .await;
    app.upload_raw(&key, &ds, "application/zip", media::zip(&entries))
        .await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    let videos = app.videos(&key, &ds).await;
    assert_eq!(videos["clips/missing.mp4"]["reason_code"], "missing_file");
    assert_eq!(videos["clips/extra.mp4"]["status"], "skipped");
    let accepted: Vec<&Value> = videos
        .values()
        .filter(|v| v["status"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 12);
    let mut by_patient = std::collections::HashMap::new();
    for v in &accepted {
        let p = v["patient_id"].as_str().unwrap();
        let s = v["split"].as_str().unwrap();
        assert_eq!(
            *by_patient.entry(p).or_insert(s),
            s,
            "patient {p} spans splits"
        );
    }
    // The duplicate row naming an undeclared class is refused, the first row kept.
    let rejected: Vec<&Value> = videos
        .values()
        .filter(|v| v["status"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn single_videos_arrive_by_multipart_or_raw_body(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("ultrasound", false).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = media::read(&media::video(dir.path(), "v.mp4", "h264", 20, "80x60"));
    let ds = app.dataset(&key, json!({"name": "us"})).await;

    let form = Form::new()
        .text("label", "liver")
        .text("split", "val")
        .text("patient_id", "p-17")
        .part("file", Part::bytes(bytes.clone()).file_name("clip one.mp4"));
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/videos"), &key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    app.wait_ingested(&key, &ds).await;

    let resp = app
        .request(
            Method::POST,
            &format!("/v1/datasets/{ds}/videos?label=kidney&filename=k.mp4"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["videos_accepted"], 2, "{view}");
    let videos = app.videos(&key, &ds).await;
    assert_eq!(videos["clip one.mp4"]["split"], "val");
    assert_eq!(videos["clip one.mp4"]["patient_id"], "p-17");
    assert_eq!(videos["k.mp4"]["label"], "kidney");

    // No label, or a bad split: 422 naming the field, and nothing is kept.
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/videos"), &key)
        .header("content-type", "video/mp4")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        assert_problem(resp, 422, "validation_failed").await["field"],
        "label"
    );
    let resp = app
        .request(
            Method::POST,
            &format!("/v1/datasets/{ds}/videos?label=x&split=holdout"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(
        assert_problem(resp, 422, "validation_failed").await["field"],
        "split"
    );
    let view: Value = app
        .get(&format!("/v1/datasets/{ds}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["status"], "ready");
    assert_eq!(view["videos_total"], 2);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn oversized_uploads_get_413_and_leave_nothing_behind(db: PgPool) {
    let app = spawn_app_with(db, |s| s.max_upload_bytes = 64 << 10).await;
    let key = app.key_for("radiology", false).await;
    let ds = app.dataset(&key, json!({"name": "big"})).await;
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "application/zip")
        .body(vec![b'P'; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_problem(resp, 413, "payload_too_large").await;
    // The dataset is still waiting for data, and accepts the next upload.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let view: Value = app
            .get(&format!("/v1/datasets/{ds}"), &key)
            .await
            .json()
            .await
            .unwrap();
        if view["status"] == "uploading"
            && sqlx::query_scalar::<_, bool>(
                "select not receiving from datasets where id = $1::uuid",
            )
            .bind(&ds)
            .fetch_one(&app.db)
            .await
            .unwrap()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{view}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let incoming = app.data_dir.join("datasets").join(&ds).join("incoming");
    let left = std::fs::read_dir(&incoming).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "partial upload left on disk");

    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 415, "unsupported_media_type").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn an_upload_that_is_no_archive_fails_and_frees_its_disk(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("radiology", false).await;
    let ds = app.dataset(&key, json!({"name": "junk"})).await;
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "application/zip")
        .body(vec![7u8; 256 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "failed", "{view}");
    assert!(
        view["status_reason"]
            .as_str()
            .unwrap()
            .contains("not a zip, tar or tar.gz archive"),
        "{view}"
    );
    let root = app.data_dir.join("datasets").join(&ds);
    let left = std::fs::read_dir(root.join("incoming"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "the refused upload is still on disk");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_checksum_mismatch_is_refused(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("lab", false).await;
    let ds = app.dataset(&key, json!({"name": "sums"})).await;
    let resp = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "application/zip")
        .header("x-content-sha256", "00".repeat(32))
        .body(media::zip(&[file("a/x.txt", b"x".to_vec())]))
        .send()
        .await
        .unwrap();
    assert_problem(resp, 400, "checksum_mismatch").await;
    let n: i64 = sqlx::query_scalar("select count(*) from uploads")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn datasets_are_private_to_their_tenant_and_deletable(db: PgPool) {
    let app = spawn_app(db).await;
    let a = app.key_for("site-a", false).await;
    let b = app.key_for("site-b", false).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = media::read(&media::video(dir.path(), "v.mp4", "h264", 16, "64x64"));
    let ds = app.dataset(&a, json!({"name": "mine"})).await;
    app.upload_raw(
        &a,
        &ds,
        "application/zip",
        media::zip(&[file("x/v.mp4", bytes)]),
    )
    .await;
    app.wait_ingested(&a, &ds).await;

    for path in [
        format!("/v1/datasets/{ds}"),
        format!("/v1/datasets/{ds}/videos"),
        format!("/v1/datasets/{ds}/report"),
    ] {
        assert_problem(app.get(&path, &b).await, 404, "not_found").await;
    }
    let listed: Value = app.get("/v1/datasets", &b).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 0);
    let resp = app
        .request(Method::DELETE, &format!("/v1/datasets/{ds}"), &b)
        .send()
        .await
        .unwrap();
    assert_problem(resp, 404, "not_found").await;

    let dup = app
        .post_json("/v1/datasets", &a, json!({"name": "mine"}))
        .await;
    assert_problem(dup, 409, "conflict").await;

    let root = app.data_dir.join("datasets").join(&ds);
    assert!(root.join("cache").read_dir().unwrap().count() == 1);
    let resp = app
        .request(Method::DELETE, &format!("/v1/datasets/{ds}"), &a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while root.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "dataset files removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_problem(
        app.get(&format!("/v1/datasets/{ds}"), &a).await,
        404,
        "not_found",
    )
    .await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn an_exported_cache_has_the_datasets_labels_patients_and_splits(db: PgPool) {
    use vidtune::ingest::split::SplitSpec;
    use vidtune::train::offline::Manifest;
    let app = spawn_app(db.clone()).await;
    let key = app.key_for("cardiology", false).await;
    let ds = app.motion_dataset(&key, 3).await;
    let out = tempfile::tempdir().unwrap();
    let exported = vidtune::ingest::export::export_cache(
        &db,
        &vidtune::datadir::DataDir::new(&app.data_dir),
        ds.parse().unwrap(),
        out.path(),
    )
    .await
    .unwrap();
    assert_eq!(Manifest::read(out.path()).unwrap(), exported);
    let videos: Value = app
        .get(&format!("/v1/datasets/{ds}/videos"), &key)
        .await
        .json()
        .await
        .unwrap();
    let videos = videos["items"].as_array().unwrap();
    assert_eq!(exported.videos.len(), 6);
    for v in videos {
        let id = v["id"].as_str().unwrap();
        let m = exported
            .videos
            .iter()
            .find(|m| m.cache == format!("{id}.vtc"))
            .unwrap_or_else(|| panic!("{id} not exported"));
        assert_eq!(json!(m.label), v["label"]);
        assert_eq!(json!(m.split), v["split"]);
        let header = CacheReader::open(&out.path().join(&m.cache))
            .unwrap()
            .header;
        assert_eq!(header.height, 64);
    }
    // Splits as the dataset has them: the assignment changes none.
    let splits = exported.splits(out.path(), &SplitSpec::default()).unwrap();
    let count = |s: &str| videos.iter().filter(|v| v["split"] == s).count();
    assert_eq!(splits.train.items.len(), count("train"));
    assert_eq!(splits.val.items.len(), count("val"));
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_dataset_can_discard_each_source_once_it_is_cached(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = crate::media::motion(dir.path(), "a.mp4", true, 0);
    let zip = crate::media::zip(&[
        crate::media::file("rightward/a.mp4", std::fs::read(&clip).unwrap()),
        crate::media::file("leftward/b.mp4", std::fs::read(&clip).unwrap()),
    ]);
    let sources = |ds: &str| {
        crate::dicom::files_under(&app.data_dir.join("datasets").join(ds).join("files")).len()
    };
    for (discard, kept) in [(false, 2), (true, 0)] {
        let ds = app
            .dataset(
                &key,
                json!({"name": format!("d{discard}"), "cache": {"short_side": 64}, "discard_sources": discard}),
            )
            .await;
        app.upload_raw(&key, &ds, "application/zip", zip.clone())
            .await;
        let v = app.wait_ingested(&key, &ds).await;
        assert_eq!(v["status"], "ready", "{v}");
        assert_eq!(v["discard_sources"], discard, "{v}");
        assert_eq!(sources(&ds), kept, "discard_sources {discard}");
    }
}
