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
