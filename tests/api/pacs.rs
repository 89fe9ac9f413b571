//! Studies pulled from a real PACS: Debian's Orthanc with its DICOMweb plugin, started on a
//! free port and loaded over STOW-RS with the DICOM fixtures; vidtune imports by study UIDs and
//! by a QIDO-RS query, and predicts from a study reference, with no identifier kept anywhere.
use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::dicom::{assert_no_identifier, fixtures, identifiers};
use crate::helpers::{TestApp, assert_problem, spawn_app, spawn_app_with};

/// A private Orthanc, stopped when dropped.
pub struct Orthanc {
    dir: tempfile::TempDir,
    /// The DICOMweb root.
    pub url: String,
    pub user: String,
    pub password: String,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

impl Orthanc {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("bash")
            .arg(script("orthanc"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("scripts/orthanc");
        assert!(
            out.status.success(),
            "Orthanc did not start (scripts/setup installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} in {text}"))
                .to_owned()
        };
        Self {
            url: get("DICOMWEB_URL"),
            user: get("ORTHANC_USER"),
            password: get("ORTHANC_PASSWORD"),
            dir,
        }
    }

    /// Store `files` over STOW-RS.
    pub fn stow(&self, files: &[PathBuf]) {
        let out = std::process::Command::new("python3")
            .arg(script("orthanc_stow.py"))
            .args(files)
            .args([&self.url, &self.user, &self.password])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "STOW-RS: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn config(&self) -> vidtune::pacs::PacsConfig {
        vidtune::pacs::PacsConfig {
            url: self.url.clone(),
            user: Some(self.user.clone()),
            password: Some(self.password.clone()),
            timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script("orthanc"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

async fn import(app: &TestApp, key: &str, ds: &str, body: Value) -> reqwest::Response {
    app.post_json(&format!("/v1/datasets/{ds}/imports"), key, body)
        .await
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn studies_are_imported_from_a_pacs_and_predicted_by_reference(db: PgPool) {
    let pacs = Orthanc::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = fixtures(dir.path(), &[]);
    let multiframe: Vec<&Value> = manifest
        .iter()
        .filter(|e| e["kind"] == "multiframe")
        .collect();
    let files: Vec<PathBuf> = multiframe
        .iter()
        .map(|e| dir.path().join(e["path"].as_str().unwrap()))
        .collect();
    pacs.stow(&files);

    // Without a configured PACS, an import is refused with a clear code.
    let bare = spawn_app(db.clone()).await;
    let bare_key = bare.key_for("clinic", false).await;
    let ds = bare.dataset(&bare_key, json!({"name": "x"})).await;
    let r = import(
        &bare,
        &bare_key,
        &ds,
        json!({"studies": ["1.2.3"], "labels": {"value": "a"}}),
    )
    .await;
    assert_problem(r, 501, "pacs_not_configured").await;

    let cfg = pacs.config();
    let (logs, _capture) = crate::dicom::capture_logs();
    let app = spawn_app_with(db, |s| s.ingest.pacs = Some(cfg)).await;
    let key = app.key_for("clinic", false).await;

    // Two patients' studies by UID, labelled per series from the fixtures' labels.
    let patients: Vec<&str> = {
        let mut p: Vec<&str> = multiframe
            .iter()
            .map(|e| e["patient_id"].as_str().unwrap())
            .collect();
        p.sort();
        p.dedup();
        p
    };
    assert!(patients.len() >= 3, "{patients:?}");
    let of = |pid: &str| -> Vec<&Value> {
        multiframe
            .iter()
            .copied()
            .filter(|e| e["patient_id"] == pid)
            .collect()
    };
    let chosen: Vec<&Value> = of(patients[0]).into_iter().chain(of(patients[1])).collect();
    let mut studies: Vec<&str> = chosen
        .iter()
        .map(|e| e["study_uid"].as_str().unwrap())
        .collect();
    studies.sort();
    studies.dedup();
    let by_series: serde_json::Map<String, Value> = chosen
        .iter()
        .map(|e| {
            (
                e["series_uid"].as_str().unwrap().to_owned(),
                e["label"].clone(),
            )
        })
        .collect();
    let ds = app
        .dataset(
            &key,
            json!({"name": "from-pacs", "cache": {"short_side": 64}}),
        )
        .await;
    // Bad requests are refused before anything is fetched.
    for bad in [
        json!({"studies": studies, "query": {"PatientID": "x"}, "labels": {"value": "a"}}),
        json!({"query": {"PatientName": "Doe*"}, "labels": {"value": "a"}}),
        json!({"studies": ["1.2.3/../x"], "labels": {"value": "a"}}),
        json!({"studies": studies, "labels": {"value": "a", "attribute": "SeriesDescription"}}),
        json!({"studies": studies, "labels": {"attribute": "PatientName"}}),
    ] {
        let r = import(&app, &key, &ds, bad.clone()).await;
        assert_problem(r, 422, "validation_failed").await;
    }
    let r = import(
        &app,
        &key,
        &ds,
        json!({"studies": studies, "labels": {"by_series": by_series}}),
    )
    .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let view = app.wait_ingested(&key, &ds).await;
    assert_eq!(view["status"], "ready", "{view}");
    let videos = app.videos(&key, &ds).await;
    assert_eq!(videos.len(), chosen.len(), "{videos:?}");
    let mut labels = std::collections::BTreeMap::<String, usize>::new();
    for (path, v) in &videos {
        assert!(path.starts_with("pacs/2.25."), "{path}");
        assert_eq!(v["status"], "accepted", "{path}: {v}");
        assert!(v["patient_id"].as_str().unwrap().starts_with("pt-"), "{v}");
        *labels
            .entry(v["label"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let mut want = std::collections::BTreeMap::<String, usize>::new();
    for e in &chosen {
        *want
            .entry(e["label"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(labels, want);
    let distinct: std::collections::BTreeSet<_> = videos
        .values()
        .map(|v| v["patient_id"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), 2, "{distinct:?}");
    let report = app
        .get(&format!("/v1/datasets/{ds}/report"), &key)
        .await
        .text()
        .await
        .unwrap();

    // The third patient by a QIDO-RS query, one label for all.
    let ds2 = app
        .dataset(
            &key,
            json!({"name": "by-query", "cache": {"short_side": 64}}),
        )
        .await;
    let r = import(
        &app,
        &key,
        &ds2,
        json!({"query": {"PatientID": patients[2]}, "labels": {"value": "rightward"}}),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(app.wait_ingested(&key, &ds2).await["status"], "ready");
    assert_eq!(app.videos(&key, &ds2).await.len(), of(patients[2]).len());

    // A study the PACS does not have fails the import with a reason, and keeps nothing.
    let ds3 = app.dataset(&key, json!({"name": "missing"})).await;
    let r = import(
        &app,
        &key,
        &ds3,
        json!({"studies": ["1.2.999.1"], "labels": {"value": "a"}}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let v = app.wait_ingested(&key, &ds3).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["status_reason"]
            .as_str()
            .unwrap()
            .contains("no instances"),
        "{v}"
    );

    // Predict from a study reference: the PACS is asked, the answer names nothing of it.
    let model = crate::serving::untrained_model(&app, &key).await;
    let e = chosen[0];
    let predict = |body: Value| {
        app.request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
            .json(&body)
            .send()
    };
    let r = predict(json!({"study_uid": e["study_uid"]})).await.unwrap();
    if of(patients[0]).len() > 1 {
        assert_problem(r, 422, "validation_failed").await;
    }
    let r = predict(json!({
        "study_uid": e["study_uid"],
        "series_uid": e["series_uid"],
        "sop_instance_uid": e["sop_uid"],
    }))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let p = r.text().await.unwrap();
    let r = predict(json!({"study_uid": "1.2.999.2"})).await.unwrap();
    assert_problem(r, 404, "not_found").await;

    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let answers = [
        logged,
        report,
        p,
        app.get_text(&format!("/v1/datasets/{ds}/videos"), &key)
            .await,
        app.get_text(&format!("/v1/datasets/{ds2}/videos"), &key)
            .await,
    ];
    assert_no_identifier(&app, &identifiers(&manifest), &answers).await;
}
