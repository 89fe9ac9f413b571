//! DICOM in: cine loops and DICOM video of every pixel encoding and timing that
//! `scripts/dicom_fixtures.py` writes (with pydicom and FFmpeg) are ingested with the right
//! colours, rates and patients, no identifier survives anywhere, and a model predicts from a
//! DICOM file.
use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::spawn_app;

/// Run the fixture script into `dir`; returns its manifest.
pub fn fixtures(dir: &Path, only: &[&str]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dicom_fixtures.py");
    let mut cmd = std::process::Command::new(crate::models::venv_python());
    cmd.arg(script).arg(dir).arg("--no-verify");
    if !only.is_empty() {
        cmd.arg("--only").arg(only.join(","));
    }
    let out = cmd
        .output()
        .expect("the venv from scripts/setup (pydicom) and ffmpeg");
    assert!(
        out.status.success(),
        "dicom_fixtures.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    serde_json::from_slice(&manifest).unwrap()
}

/// Everything logged on this test's thread (the server's handlers and background tasks run on
/// it) while the guard lives: vidtune at every level, the request traces and SQL statements at
/// debug, the HTTP and TLS libraries (which would log the test's own request bytes) at info.
pub fn capture_logs() -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    #[derive(Clone)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = Buffer(logs.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,vidtune=trace,hyper=info,hyper_util=info,h2=info,reqwest=info,rustls=info",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// The fixtures' identifying strings (names, IDs, dates, addresses) and original UIDs.
pub fn identifiers(manifest: &[Value]) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    for e in manifest {
        for p in e["phi"].as_array().unwrap() {
            secrets.push(p.as_str().unwrap().to_owned());
        }
        for k in ["study_uid", "series_uid", "sop_uid"] {
            if let Some(u) = e[k].as_str() {
                secrets.push(u.to_owned());
            }
        }
    }
    secrets.sort();
    secrets.dedup();
    secrets
}

/// None of `secrets` in `answers` (API answers, logs), in any database row, or in any file under
/// the data directory.
pub async fn assert_no_identifier(
    app: &crate::helpers::TestApp,
    secrets: &[String],
    answers: &[String],
) {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = 'public'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut rows = String::new();
    for t in tables {
        let dump: Option<String> =
            sqlx::query_scalar(&format!("select json_agg(t)::text from \"{t}\" t"))
                .fetch_one(&app.db)
                .await
                .unwrap();
        rows.push_str(&dump.unwrap_or_default());
    }
    let files: Vec<(PathBuf, Vec<u8>)> = files_under(&app.data_dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    for s in secrets {
        for a in answers {
            assert!(!a.contains(s.as_str()), "`{s}` in an API answer: {a}");
        }
        assert!(!rows.contains(s.as_str()), "`{s}` in a database row");
        for (p, b) in &files {
            assert!(
                !b.windows(s.len()).any(|w| w == s.as_bytes()),
                "`{s}` in {p:?}"
            );
        }
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The mean RGB of frame 0 of a cache over `[x0, y0, x1)` × `[y0, y1)`.
fn mean_rgb(cache: &Path, region: &[u64]) -> [f64; 3] {
    let mut r = vidtune::media::cache::CacheReader::open(cache).unwrap();
    let w = r.header.width as usize;
    let mut frame = Vec::new();
    r.read_frames(&[0], &mut frame).unwrap();
    let (x0, y0, x1, y1) = (
        region[0] as usize,
        region[1] as usize,
        region[2] as usize,
        region[3] as usize,
    );
    let mut sum = [0f64; 3];
    for y in y0..y1 {
        for x in x0..x1 {
            for c in 0..3 {
                sum[c] += frame[(y * w + x) * 3 + c] as f64;
            }
        }
    }
    let n = ((x1 - x0) * (y1 - y0)) as f64;
    sum.map(|s| s / n)
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn dicom_objects_are_cached_with_their_colours_rates_and_patients_and_no_identifier(
    db: PgPool,
) {
    let (logs, _capture) = capture_logs();
    tracing::info!("log capture on");
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = fixtures(dir.path(), &[]);
    let multiframe: Vec<&Value> = manifest
        .iter()
        .filter(|e| e["kind"] == "multiframe")
        .collect();
    assert!(multiframe.len() >= 15, "{}", multiframe.len());
    let entries: Vec<_> = multiframe
        .iter()
        .map(|e| {
            crate::media::file(
                &format!(
                    "{}/{}.dcm",
                    e["label"].as_str().unwrap(),
                    e["name"].as_str().unwrap()
                ),
                std::fs::read(dir.path().join(e["path"].as_str().unwrap())).unwrap(),
            )
        })
        .collect();
    // Cached at the fixtures' own size (short side 64): the colours are compared pixel for pixel.
    let ds = app
        .dataset(
            &key,
            json!({"name": "echo", "cache": {"short_side": 64, "fps": 30}}),
        )
        .await;
    let zip = crate::media::zip(&entries);
    app.upload_raw(&key, &ds, "application/zip", zip).await;
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    let videos = app.videos(&key, &ds).await;

    let cache_dir = app.data_dir.join("datasets").join(&ds).join("cache");
    let mut patients = std::collections::BTreeMap::new();
    for e in &multiframe {
        let name = e["name"].as_str().unwrap();
        let path = format!("{}/{name}.dcm", e["label"].as_str().unwrap());
        let v = &videos[&path];
        assert_eq!(v["status"], "accepted", "{name}: {v}");
        assert_eq!(v["container"], "dicom", "{name}");
        let d = &v["dicom"];
        assert_eq!(d["transfer_syntax"], e["transfer_syntax"], "{name}");
        // The rate the object states, or the cache rate when it states none.
        let fps = v["fps"].as_f64().unwrap();
        match e["expected_fps"].as_f64() {
            Some(want) => assert!((fps - want).abs() < 0.01 * want, "{name}: {fps} vs {want}"),
            None => assert_eq!(d["frame_rate_source"], "assumed", "{name}: {d}"),
        }
        // The colours came through the photometric conversion.
        let id = v["id"].as_str().unwrap();
        let region: Vec<u64> = e["sample_region"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let got = mean_rgb(&cache_dir.join(format!("{id}.vtc")), &region);
        let tol = e["left_rgb_tolerance"].as_f64().unwrap() + 1.0;
        for c in 0..3 {
            let want = e["left_rgb"][c].as_f64().unwrap();
            assert!(
                (got[c] - want).abs() <= tol,
                "{name} ({}): {got:?} vs {} (±{tol})",
                e["photometric"],
                e["left_rgb"]
            );
        }
        crate::openapi::assert_matches_schema("Video", v);
        // One keyed patient per patient ID, never the ID itself.
        let patient = v["patient_id"].as_str().unwrap().to_owned();
        assert!(patient.starts_with("pt-"), "{name}: {patient}");
        let pid = e["patient_id"].as_str().unwrap().to_owned();
        assert_eq!(
            patients.entry(pid.clone()).or_insert(patient.clone()),
            &patient,
            "{name}: one patient, one hash"
        );
        // UIDs replaced; the identifying attributes named, never their values.
        assert!(d["study_uid"].as_str().unwrap().starts_with("2.25."), "{d}");
        assert_ne!(d["study_uid"], e["study_uid"]);
        let removed: Vec<&str> = d["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        for kw in [
            "PatientName",
            "PatientBirthDate",
            "InstitutionName",
            "AccessionNumber",
        ] {
            assert!(removed.contains(&kw), "{name}: {kw} in {removed:?}");
        }
    }
    assert!(patients.len() >= 2, "{patients:?}");
    let distinct: std::collections::BTreeSet<_> = patients.values().collect();
    assert_eq!(distinct.len(), patients.len());

    // The QA report sums up what de-identification did and warns of burned-in text.
    let report: Value = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    crate::openapi::assert_matches_schema("DatasetReport", &report);
    let deid = &report["deidentification"];
    assert_eq!(deid["dicom_videos"], multiframe.len(), "{deid}");
    assert_eq!(deid["replaced"]["PatientID"], multiframe.len(), "{deid}");
    assert_eq!(deid["removed"]["PatientName"], multiframe.len(), "{deid}");
    let burned: Vec<&Value> = multiframe
        .iter()
        .copied()
        .filter(|e| e["burned_in"] == true)
        .collect();
    assert_eq!(
        deid["burned_in_annotation"].as_array().unwrap().len(),
        burned.len(),
        "{deid}"
    );
    if !burned.is_empty() {
        assert!(
            report["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["code"] == "burned_in_annotation"),
            "{report}"
        );
    }

    // No identifier anywhere: API answers, database rows, files under the data directory.
    let secrets = identifiers(&manifest);
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains("log capture on") && logged.lines().count() > 3,
        "{logged}"
    );
    let answers = [
        app.get_text(&format!("/v1/datasets/{ds}"), &key).await,
        app.get_text(&format!("/v1/datasets/{ds}/videos"), &key)
            .await,
        report.to_string(),
        logged,
    ];
    assert_no_identifier(&app, &secrets, &answers).await;
    // The DICOM sources are gone once cached; the caches stay.
    let sources = files_under(&app.data_dir.join("datasets").join(&ds).join("files"));
    assert!(sources.is_empty(), "{sources:?}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn the_ultrasound_region_crops_and_masks_and_a_model_predicts_from_dicom(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = fixtures(dir.path(), &["us_regions", "native_rgb", "native_mono2"]);
    let find = |n: &str| manifest.iter().find(|e| e["name"] == n).unwrap();
    let us = find("us_regions");
    let region = &us["us_region"];
    let bytes = std::fs::read(dir.path().join(us["path"].as_str().unwrap())).unwrap();

    // Cropped to the region: the cache has the region's aspect, and the burned-in text outside
    // it is gone.
    let ds = app
        .dataset(
            &key,
            json!({"name": "us", "cache": {"short_side": 32, "dicom": {"crop_to_region": true}}}),
        )
        .await;
    let entries = vec![crate::media::file("rightward/us.dcm", bytes.clone())];
    app.upload_raw(&key, &ds, "application/zip", crate::media::zip(&entries))
        .await;
    assert_eq!(app.wait_ingested(&key, &ds).await["status"], "ready");
    let v = &app.videos(&key, &ds).await["rightward/us.dcm"];
    let d = &v["dicom"];
    assert_eq!(d["cropped"], true, "{v}");
    assert_eq!(d["burned_in_annotation"], "YES", "{v}");
    let r = |k: &str| region[k].as_u64().unwrap();
    let (rw, rh) = (r("max_x1") - r("min_x0") + 1, r("max_y1") - r("min_y0") + 1);
    assert_eq!(
        d["ultrasound_region"],
        json!({"x": r("min_x0"), "y": r("min_y0"), "width": rw, "height": rh}),
        "{v}"
    );
    let (cw, ch) = (
        v["cache_width"].as_f64().unwrap(),
        v["cache_height"].as_f64().unwrap(),
    );
    let aspect = rw as f64 / rh as f64;
    assert!(((cw / ch) - aspect).abs() < 0.1, "{cw}x{ch} vs {rw}x{rh}");

    // Masked outside the region instead: the report lists the bands, no warning remains.
    let ds2 = app
        .dataset(
            &key,
            json!({"name": "us-masked", "cache": {"short_side": 32, "dicom": {"mask_outside_region": true}}}),
        )
        .await;
    app.upload_raw(&key, &ds2, "application/zip", crate::media::zip(&entries))
        .await;
    assert_eq!(app.wait_ingested(&key, &ds2).await["status"], "ready");
    let report: Value = app
        .get(&format!("/v1/datasets/{ds2}/report"), &key)
        .await
        .json()
        .await
        .unwrap();
    let video = &report["deidentification"]["videos"][0];
    assert!(!video["masked"].as_array().unwrap().is_empty(), "{report}");
    assert!(
        !report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "burned_in_annotation"),
        "{report}"
    );
    // A bad mask is refused at creation.
    let r = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "bad", "cache": {"dicom": {"masks": [{"x": 0, "y": 0, "width": 0, "height": 4}]}}}),
        )
        .await;
    crate::helpers::assert_problem(r, 422, "validation_failed").await;

    // A model predicts from a DICOM file as from any video.
    let model = crate::serving::untrained_model(&app, &key).await;
    for n in ["native_rgb", "native_mono2"] {
        let body = std::fs::read(dir.path().join(find(n)["path"].as_str().unwrap())).unwrap();
        let r = app
            .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
            .header("content-type", "application/dicom")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let p: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{n}: {p}");
        assert_eq!(p["predictions"].as_array().unwrap().len(), 2, "{p}");
        assert!(!p.to_string().contains("FIXTURE"), "{p}");
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn single_frame_images_of_one_series_form_a_clip_in_instance_order(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = fixtures(dir.path(), &["single_frame_series"]);
    let e = &manifest[0];
    let instances = e["instances"].as_array().unwrap();
    let entries: Vec<_> = instances
        .iter()
        .map(|i| {
            let path = i["path"].as_str().unwrap();
            let name = path.rsplit('/').next().unwrap();
            crate::media::file(
                &format!("rightward/{name}"),
                std::fs::read(dir.path().join(path)).unwrap(),
            )
        })
        .collect();
    let zip = crate::media::zip(&entries);

    // Without the setting each image is a still image.
    let ds = app.dataset(&key, json!({"name": "stills"})).await;
    app.upload_raw(&key, &ds, "application/zip", zip.clone())
        .await;
    assert_eq!(app.wait_ingested(&key, &ds).await["status"], "failed");
    for v in app.videos(&key, &ds).await.values() {
        assert_eq!(v["reason_code"], "still_image", "{v}");
    }

    // With it, one clip of every image, in Instance Number order, timed by acquisition time.
    let ds = app
        .dataset(
            &key,
            json!({"name": "series", "cache": {"short_side": 64, "fps": 30}, "dicom": {"series_as_clip": true}}),
        )
        .await;
    app.upload_raw(&key, &ds, "application/zip", zip).await;
    assert_eq!(app.wait_ingested(&key, &ds).await["status"], "ready");
    let videos = app.videos(&key, &ds).await;
    let accepted: Vec<&Value> = videos
        .values()
        .filter(|v| v["status"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{videos:?}");
    let v = accepted[0];
    assert_eq!(v["frames"], instances.len(), "{v}");
    assert_eq!(v["dicom"]["frame_rate_source"], "acquisition_time", "{v}");
    assert!((v["fps"].as_f64().unwrap() - 25.0).abs() < 0.1, "{v}");
    let skipped = videos
        .values()
        .filter(|v| v["status"] == "skipped" && v["reason_code"] == "series_member")
        .count();
    assert_eq!(skipped, instances.len() - 1);
    // The bar moves as the instance numbers say, not as the shuffled file names would.
    let cache = app
        .data_dir
        .join("datasets")
        .join(&ds)
        .join("cache")
        .join(format!("{}.vtc", v["id"].as_str().unwrap()));
    let mut r = vidtune::media::cache::CacheReader::open(&cache).unwrap();
    let (w, n) = (r.header.width as usize, r.header.frames);
    assert_eq!(n as usize, instances.len());
    let want: Vec<u64> = e["bar"]["x_per_frame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    for (k, x) in want.iter().enumerate() {
        let mut frame = Vec::new();
        r.read_frames(&[k as u32], &mut frame).unwrap();
        let row = 32 * w * 3;
        let first_white = (w / 2..w)
            .find(|&c| frame[row + c * 3] > 200 && frame[row + c * 3 + 1] > 200)
            .unwrap();
        assert_eq!(first_white as u64, *x, "frame {k}");
    }
    crate::openapi::assert_matches_schema("Video", v);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_labels_csv_keyed_by_uid_labels_and_splits_the_objects_it_names(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = fixtures(
        dir.path(),
        &["native_mono2", "native_rgb", "palette", "native_ybr_full"],
    );
    let find = |n: &str| manifest.iter().find(|e| e["name"] == n).unwrap();
    // A PACS-style export: folders named after nothing the labels are; the labels by UID.
    let mut entries: Vec<_> = manifest
        .iter()
        .enumerate()
        .map(|(i, e)| {
            crate::media::file(
                &format!("DICOM/ST{i}/IM{i}"),
                std::fs::read(dir.path().join(e["path"].as_str().unwrap())).unwrap(),
            )
        })
        .collect();
    let csv = format!(
        "sop_instance_uid,label,split\n{},normal,test\n{},dilated,train\n{},normal,\n1.2.3.999,normal,val\n",
        find("native_mono2")["sop_uid"].as_str().unwrap(),
        find("native_rgb")["sop_uid"].as_str().unwrap(),
        find("palette")["sop_uid"].as_str().unwrap(),
    );
    entries.push(crate::media::file("labels.csv", csv.into_bytes()));
    let ds = app
        .dataset(
            &key,
            json!({"name": "by-uid", "cache": {"short_side": 64}, "split": {"group_by": "study", "seed": 3}}),
        )
        .await;
    app.upload_raw(&key, &ds, "application/zip", crate::media::zip(&entries))
        .await;
    assert_eq!(app.wait_ingested(&key, &ds).await["status"], "ready");
    let videos = app.videos(&key, &ds).await;
    let by_name = |n: &str| {
        let i = manifest.iter().position(|e| e["name"] == n).unwrap();
        videos[&format!("DICOM/ST{i}/IM{i}")].clone()
    };
    let v = by_name("native_mono2");
    assert_eq!(
        (
            v["status"].as_str(),
            v["label"].as_str(),
            v["split"].as_str()
        ),
        (Some("accepted"), Some("normal"), Some("test")),
        "{v}"
    );
    let v = by_name("native_rgb");
    assert_eq!(
        (v["label"].as_str(), v["split"].as_str()),
        (Some("dilated"), Some("train")),
        "{v}"
    );
    let v = by_name("palette");
    assert_eq!(
        (v["status"].as_str(), v["label"].as_str()),
        (Some("accepted"), Some("normal")),
        "{v}"
    );
    // Named by no row: refused for its label, whatever its folder is called.
    let v = by_name("native_ybr_full");
    assert_eq!(
        (v["status"].as_str(), v["reason_code"].as_str()),
        (Some("rejected"), Some("missing_label")),
        "{v}"
    );
    // A row whose UID no object has is a refused row, named by its line, not by the UID.
    let row = videos
        .get("labels.csv row 5")
        .unwrap_or_else(|| panic!("{videos:?}"));
    assert_eq!(row["reason_code"], "missing_file", "{row}");
    assert!(
        !serde_json::to_string(&videos)
            .unwrap()
            .contains("1.2.3.999")
    );
    let view: Value = app
        .get(&format!("/v1/datasets/{ds}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["split"]["group_by"], "study", "{view}");
}
