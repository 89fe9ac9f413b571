//! Deletion and retention: a deleted dataset, model, backbone or tenant leaves no file under the
//! data directory, what was trained on it keeps its lineage and keeps serving, deletions resume
//! after a restart, orphans are removed at start-up and `vidtune doctor` reports missing files.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem, model_fixtures, spawn_app, spawn_app_with};
use crate::media;

/// Every file and folder under `root`, relative.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

async fn delete(app: &TestApp, path: &str, key: &str) -> reqwest::Response {
    app.request(Method::DELETE, path, key).send().await.unwrap()
}

/// A 202 deletion answer; waits until its files are gone and returns the deletion.
async fn deleted(app: &TestApp, resp: reqwest::Response, key: &str) -> Value {
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = resp.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/deletions/{}", accepted["id"].as_str().unwrap())
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = app.get(&location, key).await.json().await.unwrap();
        if v["completed_at"].is_string() {
            return v;
        }
        assert!(Instant::now() < deadline, "deletion did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn deleting_a_dataset_a_finished_job_used_leaves_no_file_and_keeps_lineage_and_serving(
    db: PgPool,
) {
    let app = spawn_app(db).await;
    let key = app.key_for("hospital", false).await;
    let ds = app.motion_dataset(&key, 3).await;
    let before: Value = app
        .get(&format!("/v1/datasets/{ds}"), &key)
        .await
        .json()
        .await
        .unwrap();
    let workers = app.start_workers(1, 30).await;
    let hp = json!({
        "epochs": 1, "batch_size": 2, "warmup_epochs": 0, "freeze": {"policy": "full"},
        "frames": 8, "frame_stride": 2, "crop": 56, "eval_clips": 1, "seed": 3
    });
    let body = json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": hp});
    let job: Value = app
        .post_json("/v1/jobs", &key, body.clone())
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_owned();
    let done = app.wait_job(&key, &job_id, 600).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let model = done["model_id"].as_str().unwrap().to_owned();
    drop(workers);
    let files_before = walk(&app.data_dir);
    assert!(
        files_before.iter().any(|p| p.contains(&ds)),
        "{files_before:?}"
    );
    assert!(
        app.data_dir.join("jobs").join(&job_id).exists(),
        "checkpoints"
    );

    // A job that has not ended needs the dataset: refused, nothing removed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued: Value = app
        .post_json("/v1/jobs", &key, body)
        .await
        .json()
        .await
        .unwrap();
    let queued_id = queued["id"].as_str().unwrap();
    let resp = delete(&app, &format!("/v1/datasets/{ds}"), &key).await;
    assert_problem(resp, 409, "dataset_in_use").await;
    assert_eq!(walk(&app.data_dir), files_before);
    let resp = app
        .request(Method::POST, &format!("/v1/jobs/{queued_id}/cancel"), &key)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());

    let resp = delete(&app, &format!("/v1/datasets/{ds}"), &key).await;
    let deletion = deleted(&app, resp, &key).await;
    assert_eq!(deletion["kind"], "dataset");
    assert_eq!(deletion["resource_id"], ds.as_str());

    // No file of the dataset remains anywhere under the data directory, nor the checkpoints
    // of the jobs trained on it; the model's own files stay.
    let left = walk(&app.data_dir);
    assert!(!left.iter().any(|p| p.contains(&ds)), "{left:?}");
    assert!(!left.iter().any(|p| p.contains(&job_id)), "{left:?}");
    assert!(
        left.contains(&format!("models/{model}/model.safetensors")),
        "{left:?}"
    );
    assert_problem(
        app.get(&format!("/v1/datasets/{ds}"), &key).await,
        404,
        "not_found",
    )
    .await;

    // Its uploads, cache and the jobs' checkpoints no longer count against the tenant's
    // storage; the model does.
    let usage: Value = app.get("/v1/usage", &key).await.json().await.unwrap();
    let kinds = &usage["by_kind"];
    assert_eq!(
        (&kinds["uploads"], &kinds["caches"], &kinds["checkpoints"]),
        (&json!(0), &json!(0), &json!(0)),
        "{usage}"
    );
    assert!(kinds["models"].as_i64().unwrap() > 0, "{usage}");

    // No new job can be made on it, through the API or behind it.
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 1}}),
        )
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let tenant = app.tenant_id("hospital").await;
    let orphan_job = sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, epochs) values ($1, $2::uuid, $3::uuid, 'r3d_18', '{}', 1)")
        .bind(Uuid::new_v4()).bind(&tenant).bind(&ds).execute(&app.db).await;
    assert!(orphan_job.is_err(), "a job on a deleted dataset was stored");

    // Lineage: the job and the model still say what they were trained on.
    let job: Value = app
        .get(&format!("/v1/jobs/{job_id}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["dataset_id"], ds.as_str());
    assert_eq!(job["hyperparameters"]["epochs"], 1);
    let lineage = &job["dataset_lineage"];
    assert_eq!(lineage["content_hash"], before["content_hash"], "{job}");
    assert_eq!(lineage["name"], before["name"]);
    assert_eq!(lineage["videos_accepted"], 6);
    assert!(lineage["deleted_at"].is_string());
    let m: Value = app
        .get(&format!("/v1/models/{model}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(m["dataset_id"], ds.as_str());
    assert_eq!(m["dataset_hash"], before["content_hash"]);
    assert_eq!(m["dataset_lineage"], *lineage);
    assert_eq!(m["hyperparameters"]["epochs"], 1);
    crate::openapi::assert_matches_schema("Deletion", &deletion);

    // The model still serves.
    let dir = tempfile::tempdir().unwrap();
    let video = std::fs::read(media::motion(dir.path(), "v.mp4", true, 50)).unwrap();
    let resp = app
        .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
        .header("content-type", "video/mp4")
        .body(video)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    // Audited: who deleted what, and when.
    let (key_id, status): (Option<Uuid>, i16) = sqlx::query_as(
        "select key_id, status from audit_events where action = 'dataset_delete'
         and resource_id = $1::uuid and status = 202",
    )
    .bind(&ds)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(key_id.is_some());
    assert_eq!(status, 202);
    let by: Option<Uuid> = sqlx::query_scalar("select key_id from deletions where id = $1::uuid")
        .bind(deletion["id"].as_str().unwrap())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(by, key_id);

    // Deleting the model removes its files (and exports); its job keeps its history.
    let resp = delete(&app, &format!("/v1/models/{model}"), &key).await;
    deleted(&app, resp, &key).await;
    assert!(!app.data_dir.join("models").join(&model).exists());
    let job: Value = app
        .get(&format!("/v1/jobs/{job_id}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "succeeded");
    assert!(job["model_id"].is_null());
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_deleted_tenant_leaves_no_file_and_no_working_key(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("closing", false).await;
    let tenant = app.tenant_id("closing").await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = media::read(&media::video(dir.path(), "v.mp4", "h264", 16, "64x64"));
    let ds = app.dataset(&key, json!({"name": "last"})).await;
    app.upload_raw(
        &key,
        &ds,
        "application/zip",
        media::zip(&[media::file("a/v.mp4", bytes)]),
    )
    .await;
    app.wait_ingested(&key, &ds).await;
    assert!(app.data_dir.join("datasets").join(&ds).exists());

    // Not its own tenant, not a tenant admin, and not while a job is queued.
    let ops = app.tenant_id("ops").await;
    let resp = delete(&app, &format!("/v1/tenants/{ops}"), &app.admin_key).await;
    assert_problem(resp, 409, "conflict").await;
    let admin = app.key_for("closing", true).await;
    let resp = delete(&app, &format!("/v1/tenants/{tenant}"), &admin).await;
    assert_problem(resp, 403, "forbidden").await;
    let job = Uuid::new_v4();
    sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, epochs) values ($1, $2::uuid, $3::uuid, 'r3d_18', '{}', 1)")
        .bind(job).bind(&tenant).bind(&ds).execute(&app.db).await.unwrap();
    let resp = delete(&app, &format!("/v1/tenants/{tenant}"), &app.admin_key).await;
    assert_problem(resp, 409, "tenant_in_use").await;
    sqlx::query("update jobs set state = 'canceled' where id = $1")
        .bind(job)
        .execute(&app.db)
        .await
        .unwrap();
    std::fs::create_dir_all(app.data_dir.join("jobs").join(job.to_string())).unwrap();

    let resp = delete(&app, &format!("/v1/tenants/{tenant}"), &app.admin_key).await;
    let deletion = deleted(&app, resp, &app.admin_key).await;
    assert_eq!(deletion["kind"], "tenant");
    let left = walk(&app.data_dir);
    assert!(
        !left
            .iter()
            .any(|p| p.contains(&ds) || p.contains(&job.to_string())),
        "{left:?}"
    );
    assert_problem(app.get("/v1/datasets", &key).await, 401, "unauthenticated").await;
    assert_problem(
        app.get(&format!("/v1/tenants/{tenant}"), &app.admin_key)
            .await,
        404,
        "not_found",
    )
    .await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_deleted_backbone_leaves_no_file_unless_a_model_needs_it(db: PgPool) {
    let app = spawn_app(db).await;
    let key = &app.admin_key;
    let register = |name: &str| {
        let good = std::fs::read(model_fixtures().join("tiny_backbone.pt")).unwrap();
        reqwest::multipart::Form::new()
            .text("name", name.to_owned())
            .text("preprocessing", r#"{"frames":8,"sampling":"consecutive","resize":[128,171],"crop":64,"mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25]}"#)
            .part("file", reqwest::multipart::Part::bytes(good).file_name("tiny.pt"))
    };
    let mut ids = Vec::new();
    for name in ["kept", "dropped"] {
        let resp = app
            .request(Method::POST, "/v1/base-models", key)
            .multipart(register(name))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let b: Value = resp.json().await.unwrap();
        ids.push(b["id"].as_str().unwrap().to_owned());
    }
    let file = |id: &str| app.data_dir.join("backbones").join(format!("{id}.pt"));
    // A model trained on "kept" needs it to serve.
    let tenant = app.tenant_id("ops").await;
    let ds = app.dataset(key, json!({"name": "d"})).await;
    let job = Uuid::new_v4();
    sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, state, epochs) values ($1, $2::uuid, $3::uuid, 'kept', '{}', 'succeeded', 1)")
        .bind(job).bind(&tenant).bind(&ds).execute(&app.db).await.unwrap();
    sqlx::query("insert into models (id, tenant_id, job_id, dataset_id, base_model, hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, vidtune_version, libtorch_version, path) values ($1, $2::uuid, $3, $4::uuid, 'kept', '{}', '{a,b}', '{}', '{}', '{}', 1, '{}', '0', '0', 'models/x')")
        .bind(Uuid::new_v4()).bind(&tenant).bind(job).bind(&ds).execute(&app.db).await.unwrap();
    let resp = delete(&app, &format!("/v1/base-models/{}", ids[0]), key).await;
    assert_problem(resp, 409, "base_model_in_use").await;
    assert!(file(&ids[0]).exists());

    let other = app.key_for("other", false).await;
    let resp = delete(&app, &format!("/v1/base-models/{}", ids[1]), &other).await;
    assert_problem(resp, 404, "not_found").await;
    let resp = delete(&app, &format!("/v1/base-models/{}", ids[1]), key).await;
    let d = deleted(&app, resp, key).await;
    assert_eq!(d["kind"], "base_model");
    assert!(!file(&ids[1]).exists());
    let listed: Value = app.get("/v1/base-models", key).await.json().await.unwrap();
    assert!(!listed.to_string().contains(&ids[1]));
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn start_up_finishes_pending_deletions_and_removes_orphans(db: PgPool) {
    // What a crashed server left: a deletion recorded but not carried out, files no record
    // refers to, and the files of a dataset that still exists.
    let tenant = vidtune::db::tenants::ensure_tenant(&db, "restart")
        .await
        .unwrap();
    let kept = vidtune::db::datasets::create(
        &db,
        &vidtune::db::datasets::NewDataset {
            tenant_id: tenant.id,
            name: "kept",
            description: "",
            classes: None,
            split: json!({}),
            cache_spec: json!({}),
            dicom: json!({}),
            discard_sources: false,
        },
    )
    .await
    .unwrap();
    let gone = Uuid::new_v4();
    let pending = vidtune::db::deletions::insert(
        &db,
        tenant.id,
        "dataset",
        gone,
        &Default::default(),
        &[format!("datasets/{gone}")],
    )
    .await
    .unwrap();
    let orphan = Uuid::new_v4();
    let planted: Vec<PathBuf> = vec![
        format!("datasets/{gone}/cache/v.vtc").into(),
        format!("datasets/{orphan}/files/u/video").into(),
        format!("jobs/{orphan}/checkpoints/attempt-1/epoch-0001/state.json").into(),
        format!("models/{orphan}.part/model.safetensors").into(),
        format!("backbones/{orphan}.pt").into(),
        "weights/r3d_18/0123.safetensors".into(),
        "weights/incoming/upload".into(),
        "tmp/predict/scratch".into(),
    ];
    let kept_file: PathBuf = format!("datasets/{kept}/cache/v.vtc").into();
    let installation: Uuid = sqlx::query_scalar("select id from installation")
        .fetch_one(&db)
        .await
        .unwrap();
    let app = spawn_app_with(db, |s| {
        s.orphan_grace = Duration::ZERO;
        std::fs::write(
            s.data_dir.join(".vidtune-installation"),
            installation.to_string(),
        )
        .unwrap();
        for p in planted.iter().chain([&kept_file]) {
            let p = s.data_dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"bytes").unwrap();
        }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = walk(&app.data_dir);
        let done: bool =
            sqlx::query_scalar("select completed_at is not null from deletions where id = $1")
                .bind(pending.id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        let orphans_left: Vec<_> = planted
            .iter()
            .filter(|p| app.data_dir.join(p).exists())
            .collect();
        if done && orphans_left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {orphans_left:?}, deletion done {done}; {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        app.data_dir.join(&kept_file).exists(),
        "a recorded dataset's files stay"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn no_file_is_taken_for_an_orphan_unless_the_data_directory_is_this_databases(db: PgPool) {
    // A server started against the wrong database (fresh, or another site's) sees no record
    // of anything: it must not remove the data directory's files.
    let installation: Uuid = sqlx::query_scalar("select id from installation")
        .fetch_one(&db)
        .await
        .unwrap();
    let file = format!("datasets/{}/cache/v.vtc", Uuid::new_v4());
    let plant = |s: &mut vidtune::config::Settings, marker: Option<&str>| {
        s.orphan_grace = Duration::ZERO;
        let p = s.data_dir.join(&file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"bytes").unwrap();
        if let Some(m) = marker {
            std::fs::write(s.data_dir.join(".vidtune-installation"), m).unwrap();
        }
    };
    let unmarked = spawn_app_with(db.clone(), |s| plant(s, None)).await;
    let other = Uuid::new_v4().to_string();
    let foreign = spawn_app_with(db, |s| plant(s, Some(&other))).await;
    // The first start binds an unmarked data directory to this database and removes nothing.
    let marker = unmarked.data_dir.join(".vidtune-installation");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "no marker written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        installation.to_string()
    );
    assert!(unmarked.data_dir.join(&file).exists());
    assert!(foreign.data_dir.join(&file).exists());
    assert_eq!(
        std::fs::read_to_string(foreign.data_dir.join(".vidtune-installation")).unwrap(),
        other
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn doctor_reports_records_whose_files_are_missing(db: PgPool) {
    let app = spawn_app(db).await;
    let tenant = app.tenant_id("ops").await;
    let (present, missing) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, name) in [(present, "present"), (missing, "missing")] {
        sqlx::query("insert into custom_backbones (id, tenant_id, name, feature_dim, preprocessing, sha256, path) values ($1, $2::uuid, $3, 8, '{}', 'x', $4)")
            .bind(id).bind(&tenant).bind(name).bind(format!("backbones/{id}.pt"))
            .execute(&app.db).await.unwrap();
    }
    std::fs::create_dir_all(app.data_dir.join("backbones")).unwrap();
    std::fs::write(
        app.data_dir.join(format!("backbones/{present}.pt")),
        b"module",
    )
    .unwrap();
    sqlx::query("insert into base_weights (id, arch, sha256, source, path, tensors) values ($1, 'r3d_18', 'abc', 'test', 'weights/r3d_18/abc.safetensors', 1)")
        .bind(Uuid::new_v4()).execute(&app.db).await.unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vidtune"))
        .arg("doctor")
        .arg("--data-dir")
        .arg(&app.data_dir)
        .env("DATABASE_URL", app.database_url().await)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("MISSING for 2 record(s)"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "base_model {missing}: backbones/{missing}.pt is missing"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("weights/r3d_18/abc.safetensors is missing"),
        "{stdout}"
    );
    assert!(!stdout.contains(&present.to_string()), "{stdout}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_deleted_model_takes_its_jobs_checkpoints_along(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("ward", false).await;
    let tenant = app.tenant_id("ward").await;
    let ds = app.dataset(&key, json!({"name": "d"})).await;
    // A finished job with checkpoints on disk and the model it made (the dataset stays).
    let (job, model) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, state, epochs, checkpoint, checkpoint_bytes) values ($1, $2::uuid, $3::uuid, 'r3d_18', '{}', 'succeeded', 1, $4, 5)")
        .bind(job).bind(&tenant).bind(&ds)
        .bind(format!("jobs/{job}/checkpoints/attempt-1/epoch-0001"))
        .execute(&app.db).await.unwrap();
    let ckpt = app
        .data_dir
        .join(format!("jobs/{job}/checkpoints/attempt-1/epoch-0001"));
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("state.json"), "{}").unwrap();
    let model_dir = app.data_dir.join(format!("models/{model}"));
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.safetensors"), "x").unwrap();
    sqlx::query("insert into models (id, tenant_id, job_id, dataset_id, base_model, hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, vidtune_version, libtorch_version, path) values ($1, $2::uuid, $3, $4::uuid, 'r3d_18', '{}', '{a,b}', '{}', '{}', '{}', 1, '{}', '0', '0', $5)")
        .bind(model).bind(&tenant).bind(job).bind(&ds).bind(format!("models/{model}"))
        .execute(&app.db).await.unwrap();
    sqlx::query("update jobs set model_id = $1 where id = $2")
        .bind(model)
        .bind(job)
        .execute(&app.db)
        .await
        .unwrap();

    // Not while a batch prediction runs on it (held by a live server's lease).
    let batch = Uuid::new_v4();
    sqlx::query("insert into batch_predictions (id, tenant_id, model_id, dataset_id, clips, lease_owner, lease_expires_at) values ($1, $2::uuid, $3, $4::uuid, 1, $1, now() + interval '1 hour')")
        .bind(batch).bind(&tenant).bind(model).bind(&ds)
        .execute(&app.db).await.unwrap();
    let resp = delete(&app, &format!("/v1/models/{model}"), &key).await;
    assert_problem(resp, 409, "model_in_use").await;
    assert!(model_dir.exists() && ckpt.exists());
    sqlx::query("update batch_predictions set state = 'canceled' where id = $1")
        .bind(batch)
        .execute(&app.db)
        .await
        .unwrap();

    let resp = delete(&app, &format!("/v1/models/{model}"), &key).await;
    deleted(&app, resp, &key).await;
    assert!(!model_dir.exists());
    assert!(
        !app.data_dir.join(format!("jobs/{job}")).exists(),
        "left: {:?}",
        walk(&app.data_dir.join("jobs"))
    );
    let usage: Value = app.get("/v1/usage", &key).await.json().await.unwrap();
    assert_eq!(usage["by_kind"]["checkpoints"], 0, "{usage}");
    let job: Value = app
        .get(&format!("/v1/jobs/{job}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
}
