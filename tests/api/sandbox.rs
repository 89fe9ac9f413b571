//! Custom TorchScript backbones are code: each of these modules does what a hostile tenant's
//! would, and the sandbox (`vidtune script-host`) must leave the server's files, memory and
//! time untouched.
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_problem, model_fixtures, spawn_app, spawn_app_with};

async fn register(app: &TestApp, fixture: &str) -> reqwest::Response {
    let module = std::fs::read(model_fixtures().join(format!("{fixture}.pt"))).unwrap();
    let form = Form::new()
        .text("name", fixture.to_owned())
        .text(
            "preprocessing",
            r#"{"frames":4,"sampling":"consecutive","resize":[20,20],"crop":16,"mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25]}"#,
        )
        .part("file", Part::bytes(module).file_name(format!("{fixture}.pt")));
    app.request(Method::POST, "/v1/base-models", &app.admin_key)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_cannot_read_a_file_outside_what_it_is_handed(db: PgPool) {
    let app = spawn_app(db).await;
    let canary = model_fixtures().join("canary_read.txt");
    // 'S' = 83: the feature width the module would report if it could read the file.
    std::fs::write(&canary, "SECRET from the server's disk").unwrap();
    let resp = register(&app, "hostile_reads").await;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_ne!(
        body["feature_dim"], 83,
        "the module read the canary: {body}"
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "invalid_model_file", "{body}");
    assert!(!body.to_string().contains("SECRET"), "{body}");
    // Refused by the sandbox, not for some other reason.
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{body}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_cannot_write_a_file(db: PgPool) {
    let app = spawn_app(db).await;
    let canary = model_fixtures().join("canary_write.txt");
    std::fs::write(&canary, "untouched canary").unwrap();
    let resp = register(&app, "hostile_writes").await;
    let body = assert_problem(resp, 422, "invalid_model_file").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{body}"
    );
    assert_eq!(
        std::fs::read_to_string(&canary).unwrap(),
        "untouched canary"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_that_allocates_100_gb_is_refused_and_the_server_carries_on(db: PgPool) {
    let app = spawn_app(db).await;
    let resp = register(&app, "hostile_allocates").await;
    let body = assert_problem(resp, 422, "invalid_model_file").await;
    assert!(
        body["detail"].as_str().unwrap().contains("allocate"),
        "{body}"
    );
    assert_eq!(app.get("/healthz", "").await.status(), 200);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_that_loops_forever_is_stopped_at_the_deadline(db: PgPool) {
    let app = spawn_app_with(db, |s| s.inspect_timeout = Duration::from_secs(3)).await;
    let started = Instant::now();
    let resp = register(&app, "hostile_loops").await;
    let body = assert_problem(resp, 422, "invalid_model_file").await;
    assert!(
        body["detail"].as_str().unwrap().contains("in time"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn the_sandbox_refuses_files_sockets_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("admin.key");
    std::fs::write(&secret, "vt_secret").unwrap();
    let target = dir.path().join("written");
    let probe = vidtune::sandbox::probe(
        std::path::Path::new(env!("CARGO_BIN_EXE_vidtune")),
        &secret,
        &target,
    )
    .unwrap();
    assert!(probe.confinement.is_complete(), "{probe:?}");
    assert!(probe.all_denied(), "{probe:?}");
    assert!(!target.exists());
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_custom_backbone_trains_and_serves_only_inside_its_sandbox(db: PgPool) {
    let app = spawn_app(db).await;
    let canary = model_fixtures().join("canary_serving.txt");
    std::fs::write(&canary, "untouched canary").unwrap();
    // Registered by the operator, in the operator's tenant: training and serving go through
    // the same sandbox as the inspection.
    let resp = register(&app, "hostile_when_serving").await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let key = &app.admin_key;
    let ds = app.motion_dataset(key, 3).await;
    let resp = app
        .post_json(
            "/v1/jobs",
            key,
            serde_json::json!({"dataset_id": ds, "base_model": "hostile_when_serving",
                "hyperparameters": {"epochs": 2, "batch_size": 4, "freeze": {"policy": "full"},
                    "optimizer": "adamw", "lr": 0.01, "eval_clips": 1, "loader_threads": 1}}),
        )
        .await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    let job = job["id"].as_str().unwrap().to_owned();
    let _workers = app.start_workers(1, 30).await;
    let done = app.wait_job(key, &job, 600).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let model = done["model_id"].as_str().unwrap().to_owned();
    // Both epochs trained the module's own parameters (full fine-tuning through the sandbox).
    let metrics: Value = app
        .get(&format!("/v1/jobs/{job}/metrics"), key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        metrics["epochs"].as_array().map(Vec::len),
        Some(2),
        "{metrics}"
    );

    let video = std::fs::read(crate::media::motion(
        tempfile::tempdir().unwrap().path(),
        "p.mp4",
        true,
        9,
    ))
    .unwrap();
    let predict = |clips: u32| {
        app.request(
            Method::POST,
            &format!("/v1/models/{model}/predict?clips={clips}"),
            key,
        )
        .header("content-type", "video/mp4")
        .body(video.clone())
        .send()
    };
    let ok = predict(1).await.unwrap();
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap());
    // Five clips make the module try to write the canary: the sandbox refuses, the request
    // fails, the server carries on.
    let refused = predict(5).await.unwrap();
    assert!(refused.status().is_server_error(), "{}", refused.status());
    assert_eq!(
        std::fs::read_to_string(&canary).unwrap(),
        "untouched canary"
    );
    let again = predict(1).await.unwrap();
    assert_eq!(again.status(), 200, "{}", again.text().await.unwrap());
}

/// A queued `r3d_18` job of a fresh tenant on a small motion dataset; its id.
async fn queued_r3d_job(app: &TestApp, hyperparameters: Value) -> String {
    let key = app.key_for("echo", false).await;
    let ds = app.motion_dataset(&key, 2).await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            serde_json::json!({"dataset_id": ds, "base_model": "r3d_18",
                "hyperparameters": hyperparameters}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_owned()
}

/// Children of `pid` (from /proc), with their command lines.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // The fields after the parenthesised command: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut fields = after.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(&pid.to_string()) && state != Some("Z") {
            let cmd = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            out.push((child, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
    !(stat.is_empty() || state.as_deref() == Some("Z"))
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn serve_killed_with_sigkill_leaves_no_training_process_behind(db: PgPool) {
    let app = spawn_app(db).await;
    let job = queued_r3d_job(
        &app,
        serde_json::json!({"epochs": 50, "batch_size": 2, "frames": 8, "crop": 56}),
    )
    .await;
    // A separate `vidtune serve` process with one worker claims the job.
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_vidtune"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
        .env("DATABASE_URL", app.database_url().await)
        .env("VIDTUNE_DATA_DIR", &app.data_dir)
        .env("VIDTUNE_DEVICES", "cpu")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let children = loop {
        let c = children_of(serve.id());
        if c.iter()
            .any(|(_, cmd)| cmd.contains(&format!("train-job --job {job}")))
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the job was never started: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    serve.kill().unwrap(); // SIGKILL: no shutdown code runs
    serve.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, cmd) in children {
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "{cmd} ({pid}) outlived vidtune serve"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_training_process_that_stops_making_progress_is_killed_and_retried(db: PgPool) {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app(db).await;
    let job = queued_r3d_job(&app, serde_json::json!({})).await;
    // A "training process" that hangs without a word, as a deadlocked one would.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hung-vidtune");
    std::fs::write(&exe, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg =
        vidtune::worker::pool::PoolConfig::new(exe, app.database_url().await, app.data_dir.clone());
    cfg.lease = Duration::from_secs(60);
    cfg.heartbeat = Duration::from_millis(200);
    cfg.poll = Duration::from_millis(200);
    cfg.stall = Duration::from_secs(2);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(vidtune::worker::pool::run(
        app.db.clone(),
        std::sync::Arc::new(cfg),
        vec![vidtune::worker::Device::Cpu],
        rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (state, error): (String, Option<String>) =
            sqlx::query_as("select state, error from jobs where id = $1::uuid")
                .bind(&job)
                .fetch_one(&app.db)
                .await
                .unwrap();
        // Back in the queue for another attempt (the lease alone would have kept it 60 s).
        if let Some(e) = error {
            assert!(e.contains("made no progress"), "{e}");
            assert_eq!(state, "queued");
            break;
        }
        assert!(Instant::now() < deadline, "the hung attempt kept its lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Queue a job (the `POST /v1/jobs` body) as the operator; its id.
async fn queued_job(app: &TestApp, body: Value) -> String {
    let resp = app.post_json("/v1/jobs", &app.admin_key, body).await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_owned()
}

/// Run `job` on one worker to its end: it must fail as the user's error on its first attempt,
/// not be retried as a machine fault. Its error text.
async fn fails_as_the_users_error(app: &TestApp, job: &str) -> String {
    let _workers = app.start_workers(1, 30).await;
    let done = app.wait_job(&app.admin_key, job, 300).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error_kind"], "user", "{done}");
    assert_eq!(done["attempt"], 1, "retried as a machine fault: {done}");
    done["error"].as_str().unwrap().to_owned()
}

/// A backbone whose feature width follows the clip size, asked for another `frames` than it was
/// registered with: refused at submission, naming the field; and a job queued with that size
/// anyway fails as the user's error, naming the hyperparameters, not retried as a machine fault.
#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_that_does_not_fit_the_jobs_clip_size_is_refused_or_fails_as_a_user_error(
    db: PgPool,
) {
    let app = spawn_app(db).await;
    let resp = register(&app, "clip_shaped").await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let key = &app.admin_key;
    let ds = app.motion_dataset(key, 2).await;
    let job_with = |frames: Option<u32>| {
        let mut hp = serde_json::json!({"epochs": 1, "warmup_epochs": 0, "batch_size": 2,
            "eval_clips": 1, "loader_threads": 1});
        if let Some(f) = frames {
            hp["frames"] = f.into();
        }
        serde_json::json!({"dataset_id": ds, "base_model": "clip_shaped", "max_attempts": 3,
            "hyperparameters": hp})
    };
    // At submission the module is tried on the job's clip size, in its sandbox.
    let resp = app.post_json("/v1/jobs", key, job_with(Some(8))).await;
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], "hyperparameters.frames", "{problem}");
    // A job queued with such a size all the same (here: changed behind the API's back, as an
    // older server could have queued it) fails as the user's error, without a retry.
    let job = queued_job(&app, job_with(None)).await;
    sqlx::query(
        "update jobs set hyperparameters = jsonb_set(hyperparameters, '{frames}', '8')
         where id = $1::uuid",
    )
    .bind(&job)
    .execute(&app.db)
    .await
    .unwrap();
    let error = fails_as_the_users_error(&app, &job).await;
    assert!(error.contains("hyperparameters.frames"), "{error}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_backbone_that_fails_in_evaluation_fails_the_job_as_a_user_error(db: PgPool) {
    let app = spawn_app(db).await;
    let resp = register(&app, "fails_in_evaluation").await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let key = &app.admin_key;
    let ds = app.motion_dataset(key, 2).await;
    // Three clips per video make the evaluation batches larger than the 2 it tolerates.
    let job = queued_job(
        &app,
        serde_json::json!({"dataset_id": ds, "base_model": "fails_in_evaluation",
            "max_attempts": 3, "hyperparameters": {"epochs": 1, "warmup_epochs": 0,
            "batch_size": 2, "eval_clips": 3, "loader_threads": 1}}),
    )
    .await;
    let error = fails_as_the_users_error(&app, &job).await;
    assert!(error.contains("TorchScript backbone failed"), "{error}");
}
