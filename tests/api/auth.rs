use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{assert_problem, spawn_app};

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn v1_needs_a_valid_bearer_key(db: PgPool) {
    let app = spawn_app(db).await;

    let missing = app.client.get(app.url("/v1/me")).send().await.unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_problem(missing, 401, "unauthenticated").await;

    let basic = app
        .client
        .get(app.url("/v1/me"))
        .basic_auth("user", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_problem(basic, 401, "unauthenticated").await;

    let forged = vidtune::auth::mint().secret; // well-formed but never stored
    assert_problem(app.get("/v1/me", &forged).await, 401, "unauthenticated").await;
    assert_problem(app.get("/v1/me", "not-a-key").await, 401, "unauthenticated").await;

    let me = app.get("/v1/me", &app.admin_key).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["tenant"]["name"], "ops");
    assert_eq!(me["admin"], true);
    assert_eq!(me["operator"], true);
    assert_eq!(me["key_prefix"], &app.admin_key[3..11]);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn operator_creates_tenants_and_keys_that_work_until_revoked(db: PgPool) {
    let app = spawn_app(db).await;

    let created = app
        .post_json("/v1/tenants", &app.admin_key, json!({"name": "cardiology"}))
        .await;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let tenant: Value = created.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/tenants/{}", tenant["id"].as_str().unwrap())
    );

    let dup = app
        .post_json("/v1/tenants", &app.admin_key, json!({"name": "cardiology"}))
        .await;
    assert_problem(dup, 409, "conflict").await;
    let bad = app
        .post_json(
            "/v1/tenants",
            &app.admin_key,
            json!({"name": "Cardiology Dept"}),
        )
        .await;
    let body = assert_problem(bad, 422, "validation_failed").await;
    assert_eq!(body["field"], "name");

    let key = app
        .post_json(
            &format!("{location}/keys"),
            &app.admin_key,
            json!({"name": "pacs"}),
        )
        .await;
    assert_eq!(key.status(), 201);
    let key: Value = key.json().await.unwrap();
    let secret = key["key"].as_str().unwrap().to_owned();
    assert_eq!(key["admin"], false);
    assert_eq!(key["operator"], false);
    assert_eq!(key["name"], "pacs");

    let me: Value = app.get("/v1/me", &secret).await.json().await.unwrap();
    assert_eq!(me["tenant"]["name"], "cardiology");
    // Listings never show the secret.
    let listed: Value = app.get("/v1/keys", &secret).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains(&secret));

    let revoked = app
        .request(
            Method::DELETE,
            &format!("/v1/keys/{}", key["id"].as_str().unwrap()),
            &app.admin_key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let body = assert_problem(app.get("/v1/me", &secret).await, 401, "unauthenticated").await;
    assert!(
        body["detail"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn tenant_keys_cannot_use_admin_routes(db: PgPool) {
    let app = spawn_app(db).await;
    let tenant_key = app.key_for("radiology", false).await;
    let body = assert_problem(app.get("/v1/tenants", &tenant_key).await, 403, "forbidden").await;
    assert!(body["detail"].as_str().unwrap().contains("tenant_list"));
    let create = app
        .post_json("/v1/tenants", &tenant_key, json!({"name": "x"}))
        .await;
    assert_problem(create, 403, "forbidden").await;
    // ...and the forbidden attempt created nothing.
    let names: Vec<String> = sqlx::query_scalar("select name from tenants order by name")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(names, ["ops", "radiology"]);
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn another_tenants_resource_answers_404(db: PgPool) {
    let app = spawn_app(db).await;
    let a = app.key_for("endoscopy", false).await;
    let b = app.key_for("surgery", false).await;
    let b_keys: Value = app.get("/v1/keys", &b).await.json().await.unwrap();
    let b_key_id = b_keys["items"][0]["id"].as_str().unwrap().to_owned();

    assert_eq!(
        app.get(&format!("/v1/keys/{b_key_id}"), &b).await.status(),
        200
    );
    assert_problem(
        app.get(&format!("/v1/keys/{b_key_id}"), &a).await,
        404,
        "not_found",
    )
    .await;
    // Not even an operator sees it through tenant-scoped routes.
    assert_problem(
        app.get(&format!("/v1/keys/{b_key_id}"), &app.admin_key)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_problem(app.get("/v1/keys/not-a-uuid", &a).await, 404, "not_found").await;
}
