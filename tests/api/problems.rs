use std::collections::HashSet;

use serde_json::json;
use sqlx::PgPool;
use vidtune::http::ErrorCode;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

#[test]
fn error_codes_are_unique_and_snake_case() {
    let mut seen = HashSet::new();
    for code in ErrorCode::ALL {
        let s = code.as_str();
        assert!(seen.insert(s), "duplicate code {s}");
        assert!(
            s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{s}"
        );
        assert!(code.status().is_client_error() || code.status().is_server_error());
    }
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn unknown_routes_and_methods_are_problems(db: PgPool) {
    let app = spawn_app(db).await;
    let resp = app.get("/v1/nothing-here", &app.admin_key).await;
    assert_problem(resp, 404, "route_not_found").await;

    let resp = app
        .request(reqwest::Method::PUT, "/v1/me", &app.admin_key)
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["allow"].to_str().unwrap().contains("GET"));
    assert_problem(resp, 405, "method_not_allowed").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn malformed_json_bodies_are_explained(db: PgPool) {
    let app = spawn_app(db).await;
    let syntax = app
        .request(reqwest::Method::POST, "/v1/tenants", &app.admin_key)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_problem(syntax, 400, "bad_request").await;

    let unknown = app
        .post_json(
            "/v1/tenants",
            &app.admin_key,
            json!({"name": "a", "colour": "red"}),
        )
        .await;
    let body = assert_problem(unknown, 422, "validation_failed").await;
    assert!(
        body["detail"].as_str().unwrap().contains("colour"),
        "{body}"
    );

    let not_json = app
        .request(reqwest::Method::POST, "/v1/tenants", &app.admin_key)
        .header("content-type", "text/plain")
        .body("name=a")
        .send()
        .await
        .unwrap();
    assert_problem(not_json, 415, "unsupported_media_type").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn oversized_bodies_get_413(db: PgPool) {
    let app = spawn_app_with(db, |s| s.max_json_bytes = 1024).await;
    let big = "x".repeat(4096);
    let resp = app
        .post_json("/v1/tenants", &app.admin_key, json!({ "name": big }))
        .await;
    assert_problem(resp, 413, "payload_too_large").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_callers_request_id_is_kept_and_a_bad_one_replaced(db: PgPool) {
    let app = spawn_app(db).await;
    let resp = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "pacs-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "pacs-4711");

    let resp = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "has spaces and\ttabs")
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}
