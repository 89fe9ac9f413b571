//! Storage quotas: usage is reported, an operator sets a tenant's quota, and uploads and jobs
//! are refused with `quota_exceeded` once it is used up.
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{assert_problem, spawn_app};

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn a_tenant_stores_at_most_its_quota(db: PgPool) {
    let app = spawn_app(db).await;
    let key = app.key_for("clinic", false).await;
    let tenant = app.tenant_id("clinic").await;
    let usage = |k: String| {
        let app = &app;
        async move {
            app.get("/v1/usage", &k)
                .await
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let set_quota = |q: Value| {
        let app = &app;
        let tenant = tenant.clone();
        async move {
            app.request(
                Method::PATCH,
                &format!("/v1/tenants/{tenant}"),
                &app.admin_key,
            )
            .json(&json!({ "storage_quota_bytes": q }))
            .send()
            .await
            .unwrap()
        }
    };

    // Nothing stored yet, under the server's default quota.
    let u = usage(key.clone()).await;
    assert_eq!(u["used_bytes"], 0, "{u}");
    assert_eq!(u["quota_is_default"], true, "{u}");
    assert_eq!(u["quota_bytes"], 1u64 << 40, "{u}");

    // Only operators set quotas; a tenant key may not.
    let r = app
        .request(Method::PATCH, &format!("/v1/tenants/{tenant}"), &key)
        .json(&json!({"storage_quota_bytes": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "forbidden").await;
    assert_problem(set_quota(json!(-1)).await, 422, "validation_failed").await;
    let r = set_quota(json!(20_000_000)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["storage_quota_bytes"],
        20_000_000
    );

    // An upload larger than what remains stops at the quota, and leaves nothing behind.
    let ds = app
        .dataset(&key, json!({"name": "echo", "cache": {"short_side": 64}}))
        .await;
    let r = app
        .request(Method::POST, &format!("/v1/datasets/{ds}/uploads"), &key)
        .header("content-type", "application/zip")
        .body(vec![0u8; 21_000_000])
        .send()
        .await
        .unwrap();
    let p = assert_problem(r, 403, "quota_exceeded").await;
    assert!(p["detail"].as_str().unwrap().contains("20000000"), "{p}");
    let incoming = app.data_dir.join("datasets").join(&ds).join("incoming");
    let left = std::fs::read_dir(&incoming).map_or(0, |d| d.count());
    assert_eq!(left, 0, "a refused upload left files in {incoming:?}");

    // One that fits is stored and counted: the upload at its size, the cache from its frames.
    let dir = tempfile::tempdir().unwrap();
    let clip = crate::media::motion(dir.path(), "a.mp4", true, 0);
    let zip = crate::media::zip(&[
        crate::media::file("rightward/a.mp4", std::fs::read(&clip).unwrap()),
        crate::media::file("leftward/b.mp4", std::fs::read(&clip).unwrap()),
    ]);
    app.upload_raw(&key, &ds, "application/zip", zip.clone())
        .await;
    let v = app.wait_ingested(&key, &ds).await;
    assert_eq!(v["status"], "ready", "{v}");
    let u = usage(key.clone()).await;
    assert_eq!(u["quota_bytes"], 20_000_000, "{u}");
    assert_eq!(u["quota_is_default"], false, "{u}");
    assert_eq!(u["by_kind"]["uploads"], zip.len() as u64, "{u}");
    let caches = u["by_kind"]["caches"].as_u64().unwrap();
    let on_disk: u64 = std::fs::read_dir(app.data_dir.join("datasets").join(&ds).join("cache"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Raw RGB frames: the count is the cache files less their small headers.
    assert!(
        caches > 0 && caches <= on_disk && on_disk - caches < 4096,
        "{caches} vs {on_disk}"
    );
    assert_eq!(
        u["used_bytes"].as_u64().unwrap(),
        zip.len() as u64 + caches,
        "{u}"
    );
    // Admins see their own tenant's usage; another tenant's id is not found.
    let other_admin = app.key_for("elsewhere", true).await;
    let r = app
        .get(&format!("/v1/tenants/{tenant}/usage"), &other_admin)
        .await;
    assert_problem(r, 404, "not_found").await;
    let r = app
        .get(&format!("/v1/tenants/{tenant}/usage"), &app.admin_key)
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["used_bytes"],
        u["used_bytes"]
    );

    // Room for the upload but not for its caches: ingest refuses each video before decoding.
    let used = u["used_bytes"].as_u64().unwrap();
    assert_eq!(
        set_quota(json!(used + zip.len() as u64 + 1000))
            .await
            .status(),
        200
    );
    let ds3 = app
        .dataset(&key, json!({"name": "echo-3", "cache": {"short_side": 64}}))
        .await;
    app.upload_raw(&key, &ds3, "application/zip", zip.clone())
        .await;
    app.wait_ingested(&key, &ds3).await;
    let videos = app.videos(&key, &ds3).await;
    assert_eq!(videos.len(), 2);
    for v in videos.values() {
        assert_eq!(v["status"], "rejected", "{v}");
        assert_eq!(v["reason_code"], "quota_exceeded", "{v}");
    }
    let u = usage(key.clone()).await;
    assert_eq!(u["by_kind"]["caches"], caches, "{u}");
    assert!(
        std::fs::read_dir(app.data_dir.join("datasets").join(&ds3).join("cache"))
            .map_or(0, |d| d.count())
            == 0
    );

    // Used up: uploads and jobs are refused before anything is read or queued.
    assert_eq!(set_quota(json!(1000)).await.status(), 200);
    let ds2 = app.dataset(&key, json!({"name": "echo-2"})).await;
    let r = app
        .request(Method::POST, &format!("/v1/datasets/{ds2}/uploads"), &key)
        .header("content-type", "application/zip")
        .body(zip.clone())
        .send()
        .await
        .unwrap();
    assert_problem(r, 403, "quota_exceeded").await;
    let job = json!({"dataset_id": ds, "base_model": "r3d_18", "hyperparameters": {"epochs": 2}});
    let r = app.post_json("/v1/jobs", &key, job.clone()).await;
    assert_problem(r, 403, "quota_exceeded").await;

    // Back to the server's default: the job is queued.
    let r = set_quota(Value::Null).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["storage_quota_bytes"],
        Value::Null
    );
    let r = app.post_json("/v1/jobs", &key, job).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}
