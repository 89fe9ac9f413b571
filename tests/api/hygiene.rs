//! What a client may put in text fields, and defaults that never contradict each other.
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, assert_problem, spawn_app};

async fn ready_dataset(app: &TestApp, key: &str) -> String {
    let ds = app.dataset(key, json!({"name": "ready"})).await;
    sqlx::query("update datasets set status = 'ready' where id = $1::uuid")
        .bind(&ds)
        .execute(&app.db)
        .await
        .unwrap();
    ds
}

async fn refused_naming(resp: reqwest::Response, field: &str) {
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], field, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("control characters"),
        "{problem}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn control_characters_in_client_text_are_refused_naming_the_field(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", true).await;

    // JSON bodies: a dataset's name, a job's base model, a key's name, a nested field.
    let resp = app
        .post_json("/v1/datasets", &key, json!({"name": "echo\u{0}"}))
        .await;
    refused_naming(resp, "name").await;
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "echo", "classes": ["a", "b\u{1b}[31m"]}),
        )
        .await;
    refused_naming(resp, "classes[1]").await;

    let ds = ready_dataset(&app, &key).await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18\u{0}"}),
        )
        .await;
    refused_naming(resp, "base_model").await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"device": "cpu\u{0}"}}),
        )
        .await;
    refused_naming(resp, "hyperparameters.device").await;

    let tenant = app.tenant_id("clinic").await;
    let resp = app
        .post_json(
            &format!("/v1/tenants/{tenant}/keys"),
            &key,
            json!({"name": "ci\u{0}bot"}),
        )
        .await;
    refused_naming(resp, "name").await;

    // A query parameter and a header carrying data.
    let resp = app.get("/v1/jobs?state=queued%00", &key).await;
    refused_naming(resp, "state").await;
    let resp = app
        .request(reqwest::Method::POST, "/v1/jobs", &key)
        .header("idempotency-key", "order\t17")
        .json(&json!({"dataset_id": ds, "base_model": "r3d_18"}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], "Idempotency-Key", "{problem}");

    // Nothing was stored, and tab, line feed and carriage return remain ordinary text.
    let names: Vec<String> = sqlx::query_scalar("select name from datasets")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(names, ["ready"]);
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "two lines", "description": "line one\r\n\tline two"}),
        )
        .await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn integers_written_with_a_zero_fraction_are_integers(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "seeded", "split": {"seed": 3.0}}),
        )
        .await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let ds: Value = resp.json().await.unwrap();
    assert_eq!(ds["split"]["seed"], 3);
    let resp = app
        .post_json(
            "/v1/datasets",
            &key,
            json!({"name": "seeded", "split": {"seed": 3.5}}),
        )
        .await;
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(problem["field"], "split.seed", "{problem}");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_one_epoch_job_takes_a_warmup_that_fits_it(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let ds = ready_dataset(&app, &key).await;
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 1}}),
        )
        .await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["hyperparameters"]["warmup_epochs"], 0, "{job}");
    assert_eq!(job["hyperparameters"]["epochs"], 1, "{job}");

    // The default is stated in what is stored: one warm-up epoch for longer jobs.
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 3}}),
        )
        .await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["hyperparameters"]["warmup_epochs"], 1, "{job}");

    // A contradiction the client wrote is still refused, naming the field.
    let resp = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"dataset_id": ds, "base_model": "r3d_18",
                   "hyperparameters": {"epochs": 1, "warmup_epochs": 1}}),
        )
        .await;
    let problem = assert_problem(resp, 422, "validation_failed").await;
    assert_eq!(
        problem["field"], "hyperparameters.warmup_epochs",
        "{problem}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn an_object_written_as_an_array_is_refused(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    for (body, field) in [
        (json!({"name": "c", "cache": [null, null]}), "cache"),
        (json!({"name": "s", "split": []}), "split"),
    ] {
        let resp = app.post_json("/v1/datasets", &key, body.clone()).await;
        let problem = assert_problem(resp, 422, "validation_failed").await;
        assert_eq!(problem["field"], field, "{body}: {problem}");
    }
    let resp = app
        .post_json("/v1/datasets", &key, json!(["positional"]))
        .await;
    assert_problem(resp, 422, "validation_failed").await;
    let n: i64 = sqlx::query_scalar("select count(*) from datasets")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn form_fields_and_query_parameters_with_nul_are_refused_before_anything_is_stored(
    db: PgPool,
) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let ds = app.dataset(&key, json!({"name": "us"})).await;
    let path = format!("/v1/datasets/{ds}/videos");
    let form = reqwest::multipart::Form::new()
        .text("label", "liver")
        .text("patient_id", "p\u{0}17")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"not a video".to_vec()).file_name("a.mp4"),
        );
    let resp = app
        .request(reqwest::Method::POST, &path, &key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    refused_naming(resp, "patient_id").await;
    let resp = app
        .request(
            reqwest::Method::POST,
            &format!("{path}?label=kidney&filename=k%00.mp4"),
            &key,
        )
        .header("content-type", "video/mp4")
        .body(b"not a video".to_vec())
        .send()
        .await
        .unwrap();
    refused_naming(resp, "filename").await;
    let n: i64 = sqlx::query_scalar("select count(*) from videos")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
}
