use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

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

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn metrics_on_the_api_address_need_an_operator_key(db: PgPool) {
    let app = spawn_app(db).await;
    // Job counts of every tenant: neither anonymous callers nor tenant admins see them.
    let anonymous = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_problem(anonymous, 401, "unauthenticated").await;
    let admin = app.key_for("cardiology", true).await;
    assert_problem(app.get("/metrics", &admin).await, 403, "forbidden").await;

    let resp = app.get("/metrics", &app.admin_key).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("vidtune_jobs{state=\"queued\"} 0"), "{text}");
    // Requests and latency per /v1 operation are part of the exposition.
    assert!(
        text.contains("# TYPE vidtune_http_requests_total counter"),
        "{text}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn the_metrics_address_serves_metrics_without_a_key_and_nothing_else(db: PgPool) {
    let app = spawn_app_with(db, |s| {
        s.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let metrics = app.metrics_addr.expect("a metrics address");
    assert_ne!(metrics, app.addr);
    assert_eq!(app.get("/v1/me", &app.admin_key).await.status(), 200);

    let resp = app
        .client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("vidtune_jobs{state=\"queued\"} 0"), "{text}");
    assert!(
        text.contains("vidtune_http_requests_total{operation=\"caller_view\",status=\"200\"} 1"),
        "{text}"
    );
    // The API is not reachable through the metrics address, not even with a key.
    let api = app
        .client
        .get(format!("http://{metrics}/v1/me"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_problem(api, 404, "route_not_found").await;
    // The API address keeps asking for a key.
    let anonymous = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
}
