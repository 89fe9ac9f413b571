//! Fine-tuning jobs end to end: real videos, real libtorch training in worker child processes,
//! the Postgres queue.
use serde_json::{Value, json};
use sqlx::PgPool;
use vidtune::device::Device;

use crate::helpers::{assert_problem, spawn_app};

/// Small clips so a 3D ResNet trains in seconds per epoch on a 2-core CPU.
fn small_hp(epochs: u32) -> Value {
    json!({
        "epochs": epochs, "batch_size": 4, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0,
        "warmup_epochs": 0, "freeze": {"policy": "full"}, "frames": 8, "frame_stride": 2,
        "crop": 56, "eval_clips": 3, "seed": 7, "loader_threads": 2
    })
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn r3d_18_learns_motion_that_no_single_frame_shows(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cardiology", false).await;
    let ds = app.motion_dataset(&key, 16).await;
    let _workers = app.start_workers(1, 30).await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": small_hp(8)}),
        )
        .await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let done = app.wait_job(&key, id, 900).await;
    let logs = app
        .get(&format!("/v1/jobs/{id}/logs"), &key)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(done["state"], "succeeded", "{done}\n{logs}");
    let metrics: Value = app
        .get(&format!("/v1/jobs/{id}/metrics"), &key)
        .await
        .json()
        .await
        .unwrap();
    let epochs = metrics["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 8);
    let best = epochs
        .iter()
        .map(|e| e["val"]["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    println!("{logs}");
    assert!(best >= 0.9, "best validation accuracy {best}\n{logs}");
    assert!(done["model_id"].is_string());
    assert_eq!(done["progress"], 1.0);
    assert!(done["latest_metrics"]["val_accuracy"].is_number());
    let per_class = epochs[0]["val"]["per_class"].as_array().unwrap();
    assert_eq!(per_class.len(), 2);
    for m in ["precision", "recall", "specificity", "f1"] {
        assert!(per_class[0][m].is_number(), "{m}");
    }
    assert_eq!(epochs[0]["val"]["confusion"].as_array().unwrap().len(), 2);
    assert!(epochs[0]["clips_per_s"].as_f64().unwrap() > 0.0);
    assert!(!metrics["steps"].as_array().unwrap().is_empty());

    // CSV for spreadsheets, one row per epoch.
    let csv = app
        .get(&format!("/v1/jobs/{id}/metrics?format=csv"), &key)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 9);
    assert!(csv.starts_with("epoch,train_loss,"));
    // The event stream replays everything and ends with the final state.
    let sse = app
        .get(&format!("/v1/jobs/{id}/events"), &key)
        .await
        .text()
        .await
        .unwrap();
    assert!(sse.contains("event: epoch"), "{sse}");
    assert!(
        sse.trim_end().ends_with('}') && sse.contains("\"succeeded\""),
        "{sse}"
    );
    // The job says what it computed in and why: `precision` left out is `auto`, bf16 only where
    // this CPU runs it natively and it checks out. Its start-up and each epoch's phases are timed.
    let event = |kind: &str| -> Value {
        let data = sse
            .split(&format!("event: {kind}\n"))
            .nth(1)
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("data:")))
            .unwrap_or_else(|| panic!("no {kind} event in {sse}"));
        serde_json::from_str::<Value>(data.trim()).unwrap()["data"].clone()
    };
    let started = event("started");
    let reason = started["precision_reason"].as_str().unwrap();
    assert!(reason.starts_with("precision auto"), "{started}");
    if vidtune::device::bf16_support(vidtune::device::Device::Cpu).native {
        // A candidate for bf16: the job checked its gradients and its speed before choosing.
        assert!(
            reason.contains("fp32's") || reason.contains("not faster"),
            "{started}"
        );
    } else {
        assert_eq!(started["precision"], "fp32", "{started}");
    }
    assert!(started["startup_s"].as_f64().unwrap() > 0.0);
    let epoch = event("epoch");
    for phase in [
        "train_s",
        "data_wait_s",
        "eval_s",
        "checkpoint_s",
        "checkpoint_mb",
    ] {
        assert!(epoch[phase].as_f64().unwrap() >= 0.0, "{phase}: {epoch}");
    }
    // The model's lineage.
    let model: (Vec<String>, Option<String>, i32, serde_json::Value) = sqlx::query_as(
        "select classes, dataset_hash, eval_clips, preprocessing from models where id = $1::uuid",
    )
    .bind(done["model_id"].as_str().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(model.0, ["leftward", "rightward"]);
    assert!(model.1.is_some());
    assert_eq!(model.2, 3);
    assert_eq!(model.3["crop"], 56);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_users_mistake_fails_at_once_with_the_reason(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("nov", false).await;
    let dir = tempfile::tempdir().unwrap();
    let mut entries = Vec::new();
    for (i, right) in [(0, true), (1, false), (2, true), (3, false)] {
        let p = crate::media::motion(dir.path(), &format!("{i}.mp4"), right, i);
        let label = if right { "r" } else { "l" };
        entries.push(crate::media::file(
            &format!("{label}/{i}.mp4"),
            std::fs::read(p).unwrap(),
        ));
    }
    let ds = app
        .dataset(
            &key,
            json!({"name": "trainonly", "split": {"train": 1.0, "val": 0.0, "test": 0.0}}),
        )
        .await;
    app.upload_raw(&key, &ds, "application/zip", crate::media::zip(&entries))
        .await;
    assert_eq!(app.wait_ingested(&key, &ds).await["status"], "ready");
    let _workers = app.start_workers(1, 30).await;
    let job = create_job(&app, &key, &ds, small_hp(2)).await;
    let done = app.wait_job(&key, &job, 120).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["error_kind"], "user");
    assert_eq!(done["attempt"], 1, "a user's mistake is not retried");
    assert!(
        done["error"].as_str().unwrap().contains("validation"),
        "{done}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn job_requests_are_validated_field_by_field(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("lab", false).await;
    let ds = app.dataset(&key, json!({"name": "empty"})).await;
    let cases = [
        (
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochz": 3}}),
            "hyperparameters",
        ),
        (
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"lr": 0}}),
            "hyperparameters.lr",
        ),
        (
            json!({"dataset_id": ds, "base_model": "nope"}),
            "base_model",
        ),
        (
            json!({"dataset_id": uuid::Uuid::new_v4(), "base_model": "r3d_18"}),
            "dataset_id",
        ),
        (
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"freeze": {"policy": "last_stages", "stages": 9}}}),
            "hyperparameters.freeze.stages",
        ),
        // `head_only` and `full` take no other member, like every object of a request.
        (
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"freeze": {"policy": "full", "colour": 1}}}),
            "hyperparameters",
        ),
        (
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"freeze": {"policy": "head_only", "stages": 2}}}),
            "hyperparameters",
        ),
    ];
    for (body, field) in cases {
        let resp = app.post_json("/v1/jobs", &key, body.clone()).await;
        let problem = assert_problem(resp, 422, "validation_failed").await;
        assert_eq!(problem["field"], field, "{body}");
    }
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "colour": 1}),
        )
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18"}),
        )
        .await;
    assert_problem(resp, 409, "conflict").await;
}

async fn create_job(app: &crate::helpers::TestApp, key: &str, ds: &str, hp: Value) -> String {
    let resp = app
        .post_json(
            "/v1/jobs",
            key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": hp}),
        )
        .await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    job["id"].as_str().unwrap().to_owned()
}

fn epoch_losses(metrics: &Value) -> Vec<(i64, f64)> {
    metrics["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["epoch"].as_i64().unwrap(),
                e["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn train_job_pids(job: &str) -> Vec<i32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("train-job --job {job}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_killed_worker_is_reclaimed_and_resumes_exactly(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("echo", false).await;
    let ds = app.motion_dataset(&key, 6).await;

    // The reference: the same job, uninterrupted.
    let workers = app.start_workers(1, 3).await;
    let reference = create_job(&app, &key, &ds, small_hp(4)).await;
    assert_eq!(
        app.wait_job(&key, &reference, 600).await["state"],
        "succeeded"
    );
    drop(workers);

    let workers = app.start_workers(1, 3).await;
    let job = create_job(&app, &key, &ds, small_hp(4)).await;
    // Wait for the checkpoint of epoch 2, then kill the worker's process tree with SIGKILL.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from job_epochs where job_id = $1::uuid")
            .bind(&job)
            .fetch_one(&app.db)
            .await
            .unwrap();
        let ckpt: Option<String> =
            sqlx::query_scalar("select checkpoint from jobs where id = $1::uuid")
                .bind(&job)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if n >= 2 && ckpt.is_some_and(|c| c.ends_with("epoch-0002")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "epoch 2 never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(workers); // the worker is gone...
    for pid in train_job_pids(&job) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    // ...and another one reclaims the job once its lease lapses.
    let _workers = app.start_workers(1, 3).await;
    let done = app.wait_job(&key, &job, 600).await;
    let logs = app
        .get(&format!("/v1/jobs/{job}/logs"), &key)
        .await
        .text()
        .await
        .unwrap();
    println!("{logs}");
    assert_eq!(done["state"], "succeeded", "{done}\n{logs}");
    assert!(done["attempt"].as_i64().unwrap() >= 2, "{done}");
    assert!(
        logs.contains("resumed from the checkpoint after epoch"),
        "{logs}"
    );

    let ours: Value = app
        .get(&format!("/v1/jobs/{job}/metrics"), &key)
        .await
        .json()
        .await
        .unwrap();
    let theirs: Value = app
        .get(&format!("/v1/jobs/{reference}/metrics"), &key)
        .await
        .json()
        .await
        .unwrap();
    let (ours, theirs) = (epoch_losses(&ours), epoch_losses(&theirs));
    assert_eq!(
        ours.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "exactly one row per epoch"
    );
    for (a, b) in ours.iter().zip(&theirs) {
        println!(
            "epoch {}: train loss resumed {:.6} vs uninterrupted {:.6}",
            a.0, a.1, b.1
        );
        assert!(
            (a.1 - b.1).abs() < 1e-4,
            "epoch {}: resumed loss {} vs uninterrupted {}",
            a.0,
            a.1,
            b.1
        );
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_job_for_one_gpu_is_claimed_only_by_that_gpus_worker(db: PgPool) {
    use vidtune::db::jobs;
    let app = spawn_app(db).await;
    let key = app.key_for("gpu", false).await;
    let ds = app.dataset(&key, json!({"name": "g"})).await;
    sqlx::query("update datasets set status = 'ready' where id = $1::uuid")
        .bind(&ds)
        .execute(&app.db)
        .await
        .unwrap();
    let job = create_job(&app, &key, &ds, json!({"epochs": 3, "device": "cuda:1"})).await;
    for other in [Device::Cpu, Device::Cuda(0)] {
        assert_eq!(
            jobs::claim(&app.db, "w", other, 60.0).await.unwrap(),
            None,
            "a worker on {other} took a job for cuda:1"
        );
    }
    let (claimed, _) = jobs::claim(&app.db, "w1", Device::Cuda(1), 60.0)
        .await
        .unwrap()
        .expect("the cuda:1 worker claims it");
    assert_eq!(claimed.to_string(), job);
    let view: Value = app
        .get(&format!("/v1/jobs/{job}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["device"], "cuda:1");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_stale_attempt_changes_nothing(db: PgPool) {
    use vidtune::db::jobs;
    let app = spawn_app(db).await;
    let key = app.key_for("fence", false).await;
    let ds = app.dataset(&key, json!({"name": "f"})).await;
    sqlx::query("update datasets set status = 'ready' where id = $1::uuid")
        .bind(&ds)
        .execute(&app.db)
        .await
        .unwrap();
    let job = create_job(&app, &key, &ds, json!({"epochs": 3})).await;
    let id: uuid::Uuid = job.parse().unwrap();
    let (_, first) = jobs::claim(&app.db, "w1", Device::Cpu, 0.1)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(jobs::reap_expired(&app.db).await.unwrap(), 1);
    let (_, second) = jobs::claim(&app.db, "w2", Device::Cpu, 60.0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first, second), (1, 2));

    let val = vidtune::evaluation::compute(
        &["a".to_owned(), "b".to_owned()],
        &[vec![0.9, 0.1], vec![0.9, 0.1]],
        &[0, 1],
        0.7,
    );
    let epoch = vidtune::evaluation::EpochRecord {
        epoch: 1,
        train_loss: 1.0,
        train_accuracy: 0.5,
        val: &val,
        lr: 0.1,
        clips_per_s: 1.0,
        data_wait_share: 0.1,
    };
    assert_eq!(
        jobs::insert_epoch(&app.db, id, first, &epoch)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        jobs::insert_step(&app.db, id, first, 10, 0, 1.0, 0.1)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        jobs::progress(&app.db, id, first, 1, 10, 0.3, None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        jobs::heartbeat(&app.db, id, first, 60.0).await.unwrap(),
        None
    );
    assert!(!jobs::set_checkpoint(&app.db, id, first, "x").await.unwrap());
    assert!(
        !jobs::finish(&app.db, id, first, jobs::JobState::Succeeded, None, None)
            .await
            .unwrap()
    );
    assert!(!jobs::retry_or_fail(&app.db, id, first, "x").await.unwrap());
    // The current attempt's writes land.
    assert_eq!(
        jobs::insert_epoch(&app.db, id, second, &epoch)
            .await
            .unwrap(),
        1
    );
    let v: Value = app
        .get(&format!("/v1/jobs/{job}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["attempt"], 2);
    let ckpt: Option<String> = sqlx::query_scalar("select checkpoint from jobs where id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(ckpt, None);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn cancel_stops_a_running_job_and_never_retries(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cancel", false).await;
    let ds = app.motion_dataset(&key, 6).await;

    // Queued (no worker yet): canceled at once.
    let queued = create_job(&app, &key, &ds, small_hp(50)).await;
    let resp = app
        .request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{queued}/cancel"),
            &key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["state"], "canceled");

    let _workers = app.start_workers(1, 30).await;
    let running = create_job(&app, &key, &ds, small_hp(50)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let v: Value = app
            .get(&format!("/v1/jobs/{running}"), &key)
            .await
            .json()
            .await
            .unwrap();
        if v["state"] == "running" && v["step"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never started: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let asked = std::time::Instant::now();
    let resp = app
        .request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            &key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let done = app.wait_job(&key, &running, 60).await;
    assert_eq!(done["state"], "canceled");
    assert_eq!(done["attempt"], 1, "a canceled job is never retried");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(15),
        "cancel took {:?}",
        asked.elapsed()
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        train_job_pids(&running).is_empty(),
        "the training process is gone"
    );
    // Cancel after the end changes nothing.
    let resp = app
        .request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            &key,
        )
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["state"], "canceled");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn several_workers_share_one_queue(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("queue", false).await;
    let ds = app.motion_dataset(&key, 4).await;
    let mut jobs = Vec::new();
    for precision in ["fp32", "bf16", "fp32"] {
        let mut hp = small_hp(1);
        hp["precision"] = json!(precision);
        jobs.push(create_job(&app, &key, &ds, hp).await);
    }
    let _a = app.start_workers(1, 30).await;
    let _b = app.start_workers(1, 30).await;
    for j in &jobs {
        let v = app.wait_job(&key, j, 600).await;
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["attempt"], 1, "each job claimed exactly once");
    }
    let models: i64 = sqlx::query_scalar("select count(*) from models")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(models, 3);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn idempotency_keys_make_retries_safe(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("idem", false).await;
    let ds = app.dataset(&key, json!({"name": "i"})).await;
    sqlx::query("update datasets set status = 'ready' where id = $1::uuid")
        .bind(&ds)
        .execute(&app.db)
        .await
        .unwrap();
    let body = json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 2}});
    let send = |b: Value| {
        app.request(reqwest::Method::POST, "/v1/jobs", &key)
            .header("idempotency-key", "order-17")
            .json(&b)
            .send()
    };
    let first: Value = send(body.clone()).await.unwrap().json().await.unwrap();
    let again = send(body.clone()).await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let other =
        send(json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 3}}))
            .await
            .unwrap();
    assert_problem(other, 409, "conflict").await;
    let n: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 1);
}
