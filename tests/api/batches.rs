//! Batch predictions outlive the server that started them, count right from the first answer,
//! and can be canceled.
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem, spawn_app, spawn_app_with};

/// Poll a batch until it leaves `running` (or `secs` pass); returns its view.
async fn wait_batch(app: &TestApp, key: &str, id: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let b: Value = app
            .get(&format!("/v1/batch-predictions/{id}"), key)
            .await
            .json()
            .await
            .unwrap();
        if b["state"] != "running" {
            return b;
        }
        assert!(Instant::now() < deadline, "the batch is still running: {b}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_batch_left_running_by_a_dead_server_is_finished_by_the_next_one(db: PgPool) {
    let first = spawn_app(db.clone()).await;
    let key = first.key_for("batches", false).await;
    let model = crate::serving::untrained_model(&first, &key).await;
    let ds = first.motion_dataset(&key, 2).await;
    let videos = first.videos(&key, &ds).await;
    let accepted: Vec<&Value> = videos
        .values()
        .filter(|v| v["status"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 4);

    // The answer counts the batch's videos at once.
    let resp = first
        .post_json(
            &format!("/v1/models/{model}/batch-predictions"),
            &key,
            json!({"dataset_id": ds, "clips": 1}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let created: Value = resp.json().await.unwrap();
    crate::openapi::assert_matches_schema("BatchPrediction", &created);
    assert_eq!(
        (&created["state"], &created["total"], &created["done"]),
        (&json!("running"), &json!(4), &json!(0)),
        "{created}"
    );
    let done = wait_batch(&first, &key, created["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!((&done["done"], &done["total"]), (&json!(4), &json!(4)));

    // A batch whose server died after one of its four videos: `running`, nobody renewing it.
    let orphan = Uuid::new_v4();
    sqlx::query(
        "insert into batch_predictions (id, tenant_id, model_id, dataset_id, clips, total, done)
         select $1, tenant_id, $2::uuid, $3::uuid, 1, 4, 1 from datasets where id = $3::uuid",
    )
    .bind(orphan)
    .bind(&model)
    .bind(&ds)
    .execute(&db)
    .await
    .unwrap();
    let first_video = accepted[0];
    sqlx::query(
        "insert into batch_prediction_results
             (batch_id, video_id, path, truth, predicted, probability, probabilities)
         values ($1, $2::uuid, $3, $4, 'a', 0.125, '{\"a\": 0.125, \"b\": 0.875}')",
    )
    .bind(orphan)
    .bind(first_video["id"].as_str().unwrap())
    .bind(first_video["path"].as_str().unwrap())
    .bind(first_video["label"].as_str())
    .execute(&db)
    .await
    .unwrap();

    // A server starting on the same database and data directory takes it over.
    let data_dir = first.data_dir.clone();
    let second = spawn_app_with(db.clone(), |s| s.data_dir = data_dir).await;
    let finished = wait_batch(&second, &key, &orphan.to_string(), 120).await;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert_eq!(
        (&finished["done"], &finished["total"]),
        (&json!(4), &json!(4))
    );
    let results = finished["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "one result per video: {finished}");
    // The video done before the crash kept its result; it was not predicted again.
    let kept = results
        .iter()
        .find(|r| r["video_id"] == first_video["id"])
        .unwrap();
    assert_eq!(kept["probability"], 0.125, "{kept}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_batch_can_be_canceled_and_stays_canceled(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("cancels", false).await;
    let other = app.key_for("elsewhere", false).await;
    let model = crate::serving::untrained_model(&app, &key).await;
    let ds = app.motion_dataset(&key, 2).await;
    let resp = app
        .post_json(
            &format!("/v1/models/{model}/batch-predictions"),
            &key,
            json!({"dataset_id": ds, "clips": 32}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancel = format!("/v1/batch-predictions/{id}/cancel");
    // Another tenant cannot.
    assert_problem(
        app.post_json(&cancel, &other, json!({})).await,
        404,
        "not_found",
    )
    .await;
    let resp = app.post_json(&cancel, &key, json!({})).await;
    assert_eq!(resp.status(), 200);
    let canceled: Value = resp.json().await.unwrap();
    crate::openapi::assert_matches_schema("BatchPrediction", &canceled);
    assert_eq!(canceled["state"], "canceled", "{canceled}");
    // The runner stops before its next video and records nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = wait_batch(&app, &key, &id, 5).await;
    assert_eq!(later["state"], "canceled", "{later}");
    let done = later["done"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = wait_batch(&app, &key, &id, 5).await;
    assert_eq!(last["done"].as_i64().unwrap(), done, "{last}");
    assert!(done < 4, "{last}");
    // Canceling again answers the batch as it is.
    let again: Value = app
        .post_json(&cancel, &key, json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["state"], "canceled");
}
