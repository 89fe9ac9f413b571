use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{assert_problem, spawn_app};

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn healthz_and_readyz_answer_without_a_key(db: PgPool) {
    let app = spawn_app(db).await;
    let live = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert!(live.headers().contains_key("x-request-id"));
    let body: serde_json::Value = live.json().await.unwrap();
    assert_eq!(body["status"], "ok");

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn readyz_is_503_when_the_database_cannot_be_reached() {
    // Nothing listens on port 1: every connection attempt fails.
    let unreachable = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://vidtune@127.0.0.1:1/vidtune")
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let app = vidtune::app::Application::build(
        vidtune::config::Settings::ephemeral(
            data.path().to_path_buf(),
            env!("CARGO_BIN_EXE_vidtune").into(),
        ),
        unreachable,
    )
    .await
    .unwrap();
    let addr = app.local_addr();
    tokio::spawn(app.run_until(std::future::pending()));
    vidtune::client::install_tls_provider();
    let client = reqwest::Client::new();

    let live = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        live.status(),
        200,
        "liveness does not depend on the database"
    );
    let ready = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert!(ready.headers().contains_key("retry-after"));
    assert_problem(ready, 503, "database_unavailable").await;
}
