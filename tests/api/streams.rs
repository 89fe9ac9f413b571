//! Shared resources under load: event streams that cannot starve the database pool, and the
//! compute budget of one prediction.
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem, spawn_app, spawn_app_with};

/// A queued job of `key`'s tenant that no worker will run: its event stream stays open.
async fn idle_job(app: &TestApp, key: &str) -> Uuid {
    let ds = app.dataset(key, json!({"name": "watched"})).await;
    let job = Uuid::new_v4();
    sqlx::query(
        "insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, state, epochs)
         select $1, tenant_id, id, 'r3d_18', '{}', 'queued', 1 from datasets where id = $2::uuid",
    )
    .bind(job)
    .bind(&ds)
    .execute(&app.db)
    .await
    .unwrap();
    job
}

/// The next chunk of an event stream that contains `needle`, within `secs`.
async fn read_until(resp: &mut reqwest::Response, needle: &str, secs: u64) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within {secs} s; got {seen:?}"))
            .unwrap();
        match chunk {
            Some(c) => seen.push_str(&String::from_utf8_lossy(&c)),
            None => panic!("stream ended before {needle:?}: {seen:?}"),
        }
    }
    seen
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn event_streams_are_capped_per_key_and_never_starve_other_tenants(db: PgPool) {
    // The test pool has 5 connections; one key tries to hold 8 streams.
    let app = spawn_app(db).await;
    let watcher = app.key_for("watcher", false).await;
    let other = app.key_for("other", false).await;
    let job = idle_job(&app, &watcher).await;
    let path = format!("/v1/jobs/{job}/events");

    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let resp = app.get(&path, &watcher).await;
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
            assert_problem(resp, 429, "too_many_streams").await;
            refused += 1;
        } else {
            assert_eq!(resp.status(), 200);
            open.push(resp);
        }
    }
    assert_eq!(
        (open.len(), refused),
        (4, 4),
        "the default cap is 4 per key"
    );

    // Another tenant, and the same key's other requests, are answered at once.
    for key in [&other, &watcher] {
        let resp = tokio::time::timeout(Duration::from_secs(15), app.get("/v1/datasets", key))
            .await
            .expect("dataset_list answered while streams are open");
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    // Idle streams hold no pooled connection: the pool has room for more than its size in
    // waiting requests of other tenants.
    let mut lists = Vec::new();
    for _ in 0..10 {
        let req = app.request(Method::GET, "/v1/datasets", &other);
        lists.push(tokio::spawn(
            async move { req.send().await.unwrap().status() },
        ));
    }
    for l in lists {
        let status = tokio::time::timeout(Duration::from_secs(15), l)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(status, 200);
    }

    // A client that goes away gives its slot back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = app.get(&path, &watcher).await;
        if resp.status() == 200 {
            open.push(resp);
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot of a closed stream is given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Events still reach every open stream, woken by the one shared LISTEN connection.
    vidtune::db::jobs::event_unfenced(&app.db, job, 0, "warning", "warn", "hello", json!({}))
        .await
        .unwrap();
    for resp in &mut open {
        let got = read_until(resp, "hello", 10).await;
        assert!(got.contains("event: warning"), "{got}");
    }
    // The job's final state ends the streams, which gives their slots back.
    sqlx::query("update jobs set state = 'canceled', finished_at = now() where id = $1")
        .bind(job)
        .execute(&app.db)
        .await
        .unwrap();
    vidtune::db::jobs::event_unfenced(&app.db, job, 0, "state", "info", "canceled", json!({}))
        .await
        .unwrap();
    for mut resp in open {
        read_until(&mut resp, "canceled", 10).await;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while resp.chunk().await.unwrap().is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the stream ends after the final state");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = app.get(&path, &watcher).await;
    assert_eq!(again.status(), 200, "slots are given back when streams end");
    let text = again.text().await.unwrap();
    assert!(
        text.contains("hello") && text.contains("canceled"),
        "{text}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_prediction_beyond_the_compute_budget_is_refused_with_a_problem(db: PgPool) {
    // Room for about 10 clips of the model's 8×112² (100,352 pixels each).
    let app = spawn_app_with(db, |s| s.serve.max_input_pixels = 1_000_000).await;
    let key = app.key_for("budget", false).await;
    let model = crate::serving::untrained_model(&app, &key).await;
    let dir = tempfile::tempdir().unwrap();
    // 2 s at 15 fps.
    let video = std::fs::read(crate::media::motion(dir.path(), "v.mp4", true, 1)).unwrap();
    let predict = |query: &str| {
        app.request(
            Method::POST,
            &format!("/v1/models/{model}/predict{query}"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(video.clone())
        .send()
    };
    // One clip fits.
    let resp = predict("").await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // A timeline of 0.1 s windows is about 20 windows and the clip: 2.1 million pixels.
    let resp = predict("?timeline=true&window=0.1s&stride=0.1s")
        .await
        .unwrap();
    let body = assert_problem(resp, 422, "prediction_budget_exceeded").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("clips") && detail.contains("1.0 million"),
        "{detail}"
    );
    // A coarser timeline fits again: 2 windows of 1 s and the clip.
    let resp = predict("?timeline=true&window=1s&stride=1s").await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let p: serde_json::Value = resp.json().await.unwrap();
    assert!(
        (2..=3).contains(&p["timeline"].as_array().unwrap().len()),
        "{p}"
    );
}

/// The largest resident set process `pid` has had, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_long_timeline_holds_one_batch_of_clips_in_memory(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("long", false).await;
    let mut prep = vidtune::backbone::Arch::R3d18.preprocessing();
    (prep.frames, prep.resize, prep.crop) = (4, [64, 85], 56);
    let model = crate::serving::untrained_model_with(&app, &key, prep).await;
    // `vidtune serve` in its own process, so that its memory is its own; no budget here: this
    // is about the memory a prediction within its budget takes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = tokio::process::Command::new(env!("CARGO_BIN_EXE_vidtune"))
        .arg("serve")
        .env("DATABASE_URL", app.database_url().await)
        .env("VIDTUNE_LISTEN", format!("127.0.0.1:{port}"))
        .env("VIDTUNE_DATA_DIR", &app.data_dir)
        .env("VIDTUNE_PREDICT_MAX_MPIXELS", "1000000")
        .env("VIDTUNE_PREDICT_RATE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = server.id().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !matches!(app.client.get(format!("{base}/healthz")).send().await, Ok(r) if r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let predict = |video: Vec<u8>| {
        app.client
            .post(format!(
                "{base}/v1/models/{model}/predict?timeline=true&window=0.1s&stride=0.1s"
            ))
            .bearer_auth(&key)
            .header("content-type", "video/mp4")
            .body(video)
            .send()
    };
    // Warm up: the model loaded, one short timeline run.
    let short = std::fs::read(crate::media::video(
        dir.path(),
        "s.mp4",
        "h264",
        30,
        "64x64",
    ))
    .unwrap();
    assert_eq!(predict(short).await.unwrap().status(), 200);
    let before = peak_rss(pid);
    // 200 s at 15 fps: 2,000 windows of 4×56² clips, 300 MB of float input were it read at once.
    let long = std::fs::read(crate::media::video(
        dir.path(),
        "l.mp4",
        "h264",
        3000,
        "64x64",
    ))
    .unwrap();
    let resp = predict(long).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let p: serde_json::Value = resp.json().await.unwrap();
    let windows = p["timeline"].as_array().unwrap().len();
    assert!(windows >= 1990, "{windows} windows");
    let grown = peak_rss(pid).saturating_sub(before);
    eprintln!(
        "a {windows}-window timeline grew the server's peak resident set by {} MB",
        grown >> 20
    );
    assert!(
        grown < 120 << 20,
        "the server's peak resident set grew by {} MB",
        grown >> 20
    );
}
