//! The README's curl walkthrough, run exactly as written against a live server, and the
//! command-line client: `vidtune demo` drives `datasets synth`, the upload, `jobs watch`,
//! `predict` and the plots through the REST API.
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_problem, spawn_app};

/// The shell block between the README's walkthrough markers.
fn readme_walkthrough() -> String {
    readme_block("walkthrough")
}

/// The shell block between the README's `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .expect("walkthrough start marker");
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .expect("walkthrough end marker");
    let section = &readme[start..end];
    let body = section
        .split_once("```sh\n")
        .expect("a ```sh block after the start marker")
        .1;
    body.rsplit_once("```")
        .expect("the block closes before the end marker")
        .0
        .to_string()
}

/// Run `program args` in `dir` with the built `vidtune` first on PATH; fails the test after
/// `secs`.
async fn run_in(
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    secs: u64,
) -> Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_vidtune")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("VIDTUNE_API_KEY")
        .env_remove("VIDTUNE_URL")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(secs), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} took more than {secs} s"))
        .expect("spawn")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run a README block with `bash -euo pipefail` in `dir` (15 minutes at most); it must succeed.
/// Returns what it printed (also printed here).
async fn run_script(dir: &Path, script: &str, env: &[(&str, &str)]) -> String {
    let out = run_in(dir, "bash", &["-euo", "pipefail", "-c", script], env, 900).await;
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The first line of `stdout` that starts with `prefix`, as JSON.
fn json_line(stdout: &str, prefix: &str) -> Value {
    let l = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix}\n{stdout}"));
    serde_json::from_str(l).unwrap()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn the_readme_walkthrough_runs_as_written(db: PgPool) {
    let app = spawn_app(db).await;
    let _workers = app.start_workers(1, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let script = readme_walkthrough();
    assert!(
        script.contains("curl") && script.lines().count() > 20,
        "{script}"
    );
    let base = app.url("");
    let stdout = run_script(
        dir.path(),
        &script,
        &[("VT", &base), ("KEY", &app.admin_key)],
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    let json_line = |prefix: &str| json_line(&stdout, prefix);
    assert_eq!(
        json_line("{\"status\":\"ok\"")["version"],
        env!("CARGO_PKG_VERSION")
    );
    let report = json_line("{\"status\":\"ready\"");
    assert_eq!(report["totals"]["accepted"], 24, "{report}");
    assert_eq!(report["totals"]["rejected"], 0, "{report}");
    // The events stream ended with the job's final state.
    assert!(lines.iter().any(|l| l.starts_with("epoch 3/3")), "{stdout}");
    let job = json_line("{\"state\":");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["epoch"], 3);
    let csv_rows = lines
        .iter()
        .skip_while(|l| !l.starts_with("epoch,train_loss"))
        .skip(1)
        .take_while(|l| l.split(',').count() == 11)
        .count();
    assert_eq!(csv_rows, 3, "{stdout}");
    let prediction = json_line("{\"predictions\":");
    let preds = prediction["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2, "{prediction}");
    let total: f64 = preds
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "{prediction}");
    assert_eq!(prediction["clips"], 2);
    // A 6 s video in 2 s windows every second.
    let windows = lines
        .iter()
        .filter(|l| l.starts_with("{\"start_s\":"))
        .count();
    assert!((4..=5).contains(&windows), "{stdout}");
    assert!(
        lines.contains(&"model.safetensors") && lines.contains(&"model.json"),
        "{stdout}"
    );
    for svg in ["curves.svg", "confusion.svg"] {
        let s = std::fs::read_to_string(dir.path().join(svg)).unwrap();
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{s}"
        );
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn vidtune_demo_runs_the_whole_loop_through_the_api(db: PgPool) {
    let app = spawn_app(db).await;
    let _workers = app.start_workers(1, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let base = app.url("");
    let out = run_in(
        dir.path(),
        "vidtune",
        &[
            "demo",
            "--patients",
            "5",
            "--epochs",
            "2",
            "--workdir",
            "demo",
        ],
        &[("VIDTUNE_URL", &base), ("VIDTUNE_API_KEY", &app.admin_key)],
        900,
    )
    .await;
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in ["1/5", "2/5", "3/5", "4/5", "5/5"] {
        assert!(stdout.contains(step), "{stdout}");
    }
    assert!(
        stdout.contains("30 videos accepted, 0 rejected"),
        "{stdout}"
    );
    assert!(stdout.contains("epoch 2/2"), "{stdout}");
    assert!(
        stdout.contains("accuracy") && stdout.contains("sensitivity"),
        "{stdout}"
    );
    // Two held-out patients per class, one clip each, each printed with its truth.
    assert_eq!(stdout.matches(" truth ").count(), 6, "{stdout}");
    assert!(stdout.contains(" of 6 correct"), "{stdout}");
    let curves = std::fs::read_to_string(dir.path().join("demo/training-curves.svg")).unwrap();
    assert_eq!(
        curves.matches("<polyline").count(),
        7,
        "two loss and five metric curves"
    );
    let confusion = std::fs::read_to_string(dir.path().join("demo/confusion-matrix.svg")).unwrap();
    assert_eq!(confusion.matches("<rect x=").count(), 9, "3 × 3 cells");
    for label in ["bradycardia", "normal", "tachycardia"] {
        assert!(confusion.contains(label));
    }

    // The client commands on what the demo left behind.
    let model = stdout
        .lines()
        .find_map(|l| l.strip_prefix("model "))
        .and_then(|l| l.split(':').next())
        .expect("the demo names its model")
        .to_string();
    let env = [
        ("VIDTUNE_URL", base.as_str()),
        ("VIDTUNE_API_KEY", app.admin_key.as_str()),
    ];
    let held = dir.path().join("demo/held-out/normal/s1001-c1-p000_0.mp4");
    let out = run_in(
        dir.path(),
        "vidtune",
        &["predict", &model, held.to_str().unwrap()],
        &env,
        120,
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("s1001-c1-p000_0.mp4  "), "{stdout}");
    let out = run_in(
        dir.path(),
        "vidtune",
        &["jobs", "list", "--state", "succeeded"],
        &env,
        60,
    )
    .await;
    let (stdout, _) = text(&out);
    assert_eq!(
        stdout.lines().count(),
        2,
        "a header and the demo's job: {stdout}"
    );
    assert!(stdout.contains(&model), "{stdout}");
    plots_refuse_bad_requests(&app, &stdout).await;
}

/// The plot endpoint's problems, on a finished job from `jobs list` output.
async fn plots_refuse_bad_requests(app: &TestApp, jobs_list: &str) {
    let job = jobs_list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let key = &app.admin_key;
    let resp = app.get(&format!("/v1/jobs/{job}/plots/roc"), key).await;
    assert_problem(resp, 404, "not_found").await;
    let resp = app
        .get(
            &format!("/v1/jobs/{job}/plots/confusion-matrix?split=train"),
            key,
        )
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let resp = app
        .get(
            &format!("/v1/jobs/{job}/plots/confusion-matrix?split=val&epoch=9"),
            key,
        )
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let resp = app
        .get(
            &format!("/v1/jobs/{job}/plots/confusion-matrix?split=val&epoch=1"),
            key,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/svg+xml");
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("validation split, epoch 1")
    );
    // Another tenant sees no such job.
    let other = app.key_for("elsewhere", false).await;
    let resp = app
        .get(&format!("/v1/jobs/{job}/plots/training-curves"), &other)
        .await;
    assert_problem(resp, 404, "not_found").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn client_commands_report_problems_and_unreachable_servers(db: PgPool) {
    let app = spawn_app(db).await;
    let dir = tempfile::tempdir().unwrap();
    let base = app.url("");
    let out = run_in(
        dir.path(),
        "vidtune",
        &["jobs", "list", "--url", &base, "--key", "vt_00000000_nope"],
        &[],
        60,
    )
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("unauthenticated") && stderr.contains("401"),
        "{stderr}"
    );
    // No key anywhere: says where one comes from.
    let out = run_in(
        dir.path(),
        "vidtune",
        &["jobs", "list", "--url", &base],
        &[],
        60,
    )
    .await;
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("no API key") && stderr.contains("admin.key"),
        "{stderr}"
    );
    // Nothing listening.
    let out = run_in(
        dir.path(),
        "vidtune",
        &["jobs", "list", "--url", "http://127.0.0.1:9", "--key", "k"],
        &[],
        60,
    )
    .await;
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("cannot reach vidtune at http://127.0.0.1:9"),
        "{stderr}"
    );
    // A job on a dataset that does not exist: the field is named.
    let out = run_in(
        dir.path(),
        "vidtune",
        &[
            "jobs",
            "create",
            "--dataset",
            "00000000-0000-0000-0000-000000000000",
            "--set",
            "epochs=2",
            "--url",
            &base,
            "--key",
            &app.admin_key,
        ],
        &[],
        60,
    )
    .await;
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("validation_failed") && stderr.contains("no such dataset"),
        "{stderr}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn the_readme_dicom_and_pacs_walkthrough_runs_as_written(db: PgPool) {
    let pacs = crate::pacs::Orthanc::start();
    let cfg = pacs.config();
    let app = crate::helpers::spawn_app_with(db, |s| s.ingest.pacs = Some(cfg)).await;
    let _workers = app.start_workers(1, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let script = readme_block("dicom-walkthrough");
    assert!(
        script.contains("/imports") && script.contains("application/dicom"),
        "{script}"
    );
    let base = app.url("");
    let stdout = run_script(
        dir.path(),
        &script,
        &[
            ("VT", &base),
            ("KEY", &app.admin_key),
            ("PACS", &pacs.url),
            ("PACS_USER", &pacs.user),
            ("PACS_PASSWORD", &pacs.password),
            ("VIDTUNE_ROOT", env!("CARGO_MANIFEST_DIR")),
        ],
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    let json_line = |prefix: &str| json_line(&stdout, prefix);
    // 2 classes × 4 patients × 1 clip, each de-identified.
    let report = json_line("{\"status\":\"ready\"");
    assert_eq!(report["totals"]["accepted"], 8, "{report}");
    let deid = &report["deidentification"];
    assert_eq!(deid["dicom_videos"], 8, "{report}");
    assert_eq!(deid["removed"]["PatientName"], 8, "{report}");
    assert_eq!(deid["replaced"]["PatientID"], 8, "{report}");
    assert_eq!(json_line("{\"stored\":")["stored"], 6);
    let imported = json_line("{\"imported\":");
    assert_eq!(imported, serde_json::json!({"imported": 6, "accepted": 6}));
    let predictions: Vec<Value> = lines
        .iter()
        .filter(|l| l.starts_with("{\"predictions\":"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(predictions.len(), 2, "{stdout}");
    for p in &predictions {
        assert_eq!(p["predictions"].as_array().unwrap().len(), 2, "{p}");
    }
    // The synthetic names, IDs and birth date are nowhere in what the server keeps.
    let answers = [stdout.clone()];
    let secrets: Vec<String> = [
        "Synthetic^s1-c0-p000",
        "Synthetic^s9-c0-p001",
        "s9-c0-p001",
        "s1-c1-p003",
        "19700101",
        "Synthetic^Referrer",
    ]
    .map(String::from)
    .to_vec();
    crate::dicom::assert_no_identifier(&app, &secrets, &answers[1..]).await;
}
