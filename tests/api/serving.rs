//! Serving end to end: upload → train → predict held-out videos, timelines, export, audit,
//! metrics, tenancy.
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{assert_problem, spawn_app};
use crate::media;

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_trained_model_predicts_held_out_videos_with_timelines(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("serving", false).await;
    let other = app.key_for("elsewhere", false).await;
    let ds = app.motion_dataset(&key, 16).await;
    let _workers = app.start_workers(1, 30).await;
    let hp = json!({
        "epochs": 10, "batch_size": 4, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0,
        "warmup_epochs": 0, "freeze": {"policy": "full"}, "frames": 8, "frame_stride": 2,
        "crop": 56, "eval_clips": 3, "seed": 11
    });
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": hp}),
        )
        .await;
    let job: Value = resp.json().await.unwrap();
    let done = app.wait_job(&key, job["id"].as_str().unwrap(), 900).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let model = done["model_id"].as_str().unwrap().to_owned();

    let view: Value = app
        .get(&format!("/v1/models/{model}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["classes"], json!(["leftward", "rightward"]));
    assert_eq!(view["eval_clips"], 3);
    assert!(view["dataset_hash"].is_string());
    assert_problem(
        app.get(&format!("/v1/models/{model}"), &other).await,
        404,
        "not_found",
    )
    .await;
    let listed: Value = app.get("/v1/models", &key).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // Held-out videos the model never saw (other heights, speeds and starts).
    let dir = tempfile::tempdir().unwrap();
    let mut right = 0;
    let held_out = [
        (true, 40),
        (false, 41),
        (true, 42),
        (false, 43),
        (true, 44),
        (false, 45),
    ];
    for (rightwards, variant) in held_out {
        let path = media::motion(dir.path(), &format!("h{variant}.mp4"), rightwards, variant);
        let resp = app
            .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
            .header("content-type", "video/mp4")
            .body(std::fs::read(&path).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let p: Value = resp.json().await.unwrap();
        assert_eq!(
            p["clips"], 3,
            "serving averages as many clips as evaluation"
        );
        let want = if rightwards { "rightward" } else { "leftward" };
        if p["predictions"][0]["label"] == want {
            right += 1;
        }
        let total: f64 = p["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["probability"].as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-4);
    }
    assert!(right >= 5, "{right} of 6 held-out videos right");

    // A timeline covers the whole video with overlapping windows.
    let path = media::motion(dir.path(), "timeline.mp4", true, 50);
    let resp = app
        .request(
            Method::POST,
            &format!("/v1/models/{model}/predict?timeline=true&window=1s&stride=0.5s"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(std::fs::read(&path).unwrap())
        .send()
        .await
        .unwrap();
    let p: Value = resp.json().await.unwrap();
    println!("{}", serde_json::to_string(&p).unwrap());
    let timeline = p["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 3, "{p}");
    assert_eq!(timeline[0]["start_s"], 0.0);
    let duration = p["input"]["duration_s"].as_f64().unwrap();
    assert!((timeline.last().unwrap()["end_s"].as_f64().unwrap() - duration).abs() < 1e-6);
    for w in timeline.windows(2) {
        assert!(
            w[1]["start_s"].as_f64().unwrap() <= w[0]["end_s"].as_f64().unwrap(),
            "no gaps"
        );
    }
    assert!(timeline[0]["probabilities"]["rightward"].is_number());

    // Bad input is a 4xx, never a 500.
    let resp = app
        .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
        .header("content-type", "video/mp4")
        .body(b"definitely not a video".to_vec())
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, 422, "invalid_video").await;
    assert!(
        problem["detail"].as_str().unwrap().starts_with("not_media"),
        "{problem}"
    );
    let resp = app
        .request(Method::POST, &format!("/v1/models/{model}/predict"), &other)
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_problem(resp, 404, "not_found").await;

    // Every prediction is audited with the input's hash and the answer, never its content.
    let rows: Vec<(Value,)> = sqlx::query_as(
        "select details from audit_events where action = 'model_predict' and status = 200",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 7);
    assert!(rows[0].0["input_sha256"].as_str().unwrap().len() == 64);
    assert!(rows[0].0["top_label"].is_string());
    assert!(rows[0].0["latency_ms"].is_number());

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&app.admin_key) // an operator key: /metrics spans every tenant
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vidtune_predictions_total 7"), "{metrics}");
    assert!(
        metrics.contains("vidtune_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );

    // A batch prediction over the dataset's test split, from its training cache.
    let resp = app
        .post_json(
            &format!("/v1/models/{model}/batch-predictions"),
            &key,
            json!({"dataset_id": ds, "split": "test"}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["state"], "running");
    assert_eq!(
        location,
        format!("/v1/batch-predictions/{}", created["id"].as_str().unwrap())
    );
    let batch = loop {
        let b: Value = app.get(&location, &key).await.json().await.unwrap();
        if b["state"] != "running" {
            break b;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(batch["state"], "succeeded", "{batch}");
    assert_eq!(batch["split"], "test");
    assert_eq!(batch["clips"], 3, "the model's evaluation setting");
    let results = batch["results"].as_array().unwrap();
    assert!(!results.is_empty());
    assert_eq!(batch["total"], results.len());
    assert_eq!(batch["done"], results.len());
    let mut correct = 0;
    for r in results {
        let p = r["probabilities"].as_object().unwrap();
        assert_eq!(p.len(), 2, "{r}");
        let (best, prob) = p
            .iter()
            .map(|(c, v)| (c.clone(), v.as_f64().unwrap()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert!((p.values().map(|v| v.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-4);
        assert_eq!(r["predicted"], best.as_str());
        assert_eq!(r["probability"].as_f64().unwrap(), prob);
        if r["truth"] == r["predicted"] {
            correct += 1;
        }
    }
    assert_eq!(
        batch["accuracy"].as_f64().unwrap(),
        correct as f64 / results.len() as f64
    );
    let csv = app
        .get(&format!("{location}?format=csv"), &key)
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "video_id,path,truth,predicted,probability");
    assert_eq!(lines.len(), results.len() + 1);

    // Exports: safetensors + metadata as a tar, and TorchScript.
    let tar = app.get(&format!("/v1/models/{model}/export"), &key).await;
    assert_eq!(tar.headers()["content-type"], "application/x-tar");
    let bytes = tar.bytes().await.unwrap();
    let mut names: Vec<String> = tar::Archive::new(&bytes[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["model.json", "model.safetensors"]);
    let ts = app
        .get(
            &format!("/v1/models/{model}/export?format=torchscript"),
            &key,
        )
        .await;
    assert_eq!(ts.status(), 200);
    let ts_path = dir.path().join("model.ts.pt");
    std::fs::write(&ts_path, ts.bytes().await.unwrap()).unwrap();
    let module = tch::CModule::load(&ts_path).unwrap();
    let out = module
        .forward_ts(&[tch::Tensor::zeros(
            [1, 3, 8, 56, 56],
            (tch::Kind::Float, tch::Device::Cpu),
        )])
        .unwrap();
    assert_eq!(out.size(), [1, 2]);

    let resp = app
        .request(Method::DELETE, &format!("/v1/models/{model}"), &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_problem(
        app.get(&format!("/v1/models/{model}"), &key).await,
        404,
        "not_found",
    )
    .await;
}

/// A model record with random r3d_18 weights, written straight to the database and disk.
pub(crate) async fn untrained_model(app: &crate::helpers::TestApp, key: &str) -> String {
    // Full-size clips, so each prediction computes for a while.
    let mut prep = vidtune::backbone::Arch::R3d18.preprocessing();
    prep.frames = 8;
    untrained_model_with(app, key, prep).await
}

/// [`untrained_model`] with its clips cut as `prep` says.
pub(crate) async fn untrained_model_with(
    app: &crate::helpers::TestApp,
    key: &str,
    prep: vidtune::backbone::Preprocessing,
) -> String {
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
    let dir = app.data_dir.join("models").join(model.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _m = vidtune::backbone::VideoClassifier::new(
        &vs.root(),
        vidtune::backbone::Arch::R3d18,
        2,
        &Default::default(),
        vidtune::backbone::Freeze::Full,
    )
    .unwrap();
    vs.save(dir.join("model.safetensors")).unwrap();
    sqlx::query(
        "insert into models (id, tenant_id, job_id, dataset_id, base_model, hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, vidtune_version, libtorch_version, path)
         values ($1, $2, $3, $4::uuid, 'r3d_18', '{\"frame_stride\": 2}', '{a,b}', $5, '{\"short_side\": 64, \"fps\": 15}', '{\"type\": \"linear\", \"dropout\": 0}', 1, '{}', '0', '0', $6)",
    )
    .bind(model).bind(tenant).bind(job).bind(&ds).bind(serde_json::to_value(&prep).unwrap()).bind(format!("models/{model}"))
    .execute(&app.db).await.unwrap();
    model.to_string()
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn overload_gets_503_while_accepted_predictions_succeed(db: PgPool) {
    // Room for one waiting request: while the model computes, a third request is refused.
    let app = crate::helpers::spawn_app_with(db, |s| {
        s.serve.queue = 1;
        s.serve.max_delay = std::time::Duration::ZERO;
    })
    .await;
    let key = app.key_for("busy", false).await;
    let model = untrained_model(&app, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let video = std::fs::read(media::motion(dir.path(), "v.mp4", true, 1)).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = app
            .request(
                Method::POST,
                &format!("/v1/models/{model}/predict?clips=32"),
                &key,
            )
            .header("content-type", "video/mp4")
            .body(video.clone());
        tasks.push(tokio::spawn(async move { req.send().await.unwrap() }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let resp = t.await.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                assert_problem(resp, 503, "overloaded").await;
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
        }
    }
    assert!(ok >= 1 && refused >= 1, "{ok} answered, {refused} refused");
    // The server is still up and answers the next request.
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let resp = app
        .request(Method::POST, &format!("/v1/models/{model}/predict"), &key)
        .header("content-type", "video/mp4")
        .body(video)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&app.admin_key) // an operator key: /metrics spans every tenant
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "vidtune_predictions_rejected_total{{reason=\"overloaded\"}} {refused}"
        )),
        "{metrics}"
    );
}
