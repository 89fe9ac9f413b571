use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::spawn_app;

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn every_v1_request_is_audited_without_its_body(db: PgPool) {
    let app = spawn_app(db).await;
    let created = app
        .client
        .post(app.url("/v1/tenants"))
        .bearer_auth(&app.admin_key)
        .header("x-request-id", "req-create-1")
        .json(&json!({"name": "patient-smith-ward"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let tenant: Value = created.json().await.unwrap();
    let unauth = app.client.get(app.url("/v1/tenants")).send().await.unwrap();
    assert_eq!(unauth.status(), 401);

    let mut rows = vidtune::db::audit::list(&app.db, None, None, 10)
        .await
        .unwrap();
    rows.reverse();
    assert_eq!(rows.len(), 2, "{rows:?}");

    let create = &rows[0];
    assert_eq!(create.action, "tenant_create");
    assert!(create.tenant_id.is_some() && create.key_id.is_some());
    assert_eq!(
        create.resource_id.unwrap().to_string(),
        tenant["id"].as_str().unwrap()
    );
    assert_eq!(create.status, 201);
    assert_eq!(create.request_id, "req-create-1");
    assert_eq!(create.client_addr.as_deref(), Some("127.0.0.1"));
    // Bodies never reach the audit trail.
    assert!(!create.details.to_string().contains("patient-smith"));

    let refused = &rows[1];
    assert_eq!(refused.action, "tenant_list");
    assert!(refused.tenant_id.is_none());
    assert_eq!(refused.status, 401);

    // Admins can read the trail back through the API.
    let listed: Value = app
        .get("/v1/audit-events?limit=10", &app.admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["action"], "tenant_list");
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn audit_rows_cannot_be_changed_or_removed(db: PgPool) {
    let app = spawn_app(db).await;
    assert_eq!(app.get("/v1/me", &app.admin_key).await.status(), 200);

    for sql in [
        "update audit_events set status = 200",
        "delete from audit_events",
        "truncate audit_events",
    ] {
        let err = sqlx::query(sql).execute(&app.db).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let n: i64 = sqlx::query_scalar("select count(*) from audit_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 1);
}
