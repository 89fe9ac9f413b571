//! Base models: listing, pretrained weight import (admin), TorchScript backbones.
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{assert_problem, model_fixtures, spawn_app, spawn_app_with};

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn admins_import_torchvision_weights_and_everyone_sees_them(db: PgPool) {
    let app = spawn_app(db).await;
    let tenant = app.key_for("cardiology", false).await;
    let list: Value = app
        .get("/v1/base-models", &tenant)
        .await
        .json()
        .await
        .unwrap();
    let r3d = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "r3d_18")
        .unwrap()
        .clone();
    assert_eq!(r3d["weights"]["installed"], false);
    assert_eq!(r3d["preprocessing"]["crop"], 112);
    assert_eq!(r3d["preprocessing"]["frames"], 16);
    assert_eq!(r3d["pretrained_on"], "Kinetics-400");

    let bytes = std::fs::read(model_fixtures().join("r3d_18.pth")).unwrap();
    // Tenants cannot install weights for everyone.
    let resp = app
        .request(Method::POST, "/v1/base-models/r3d_18/weights", &tenant)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_problem(resp, 403, "forbidden").await;

    let form = Form::new().part(
        "file",
        Part::bytes(bytes.clone()).file_name("r3d_18-test.pth"),
    );
    let resp = app
        .request(
            Method::POST,
            "/v1/base-models/r3d_18/weights",
            &app.admin_key,
        )
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let w: Value = resp.json().await.unwrap();
    assert_eq!(w["source"], "r3d_18-test.pth");
    let installed = app
        .data_dir
        .join("weights/r3d_18")
        .join(format!("{}.safetensors", w["sha256"].as_str().unwrap()));
    assert!(installed.exists());

    let list: Value = app
        .get("/v1/base-models", &tenant)
        .await
        .json()
        .await
        .unwrap();
    let r3d = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "r3d_18")
        .unwrap()
        .clone();
    assert_eq!(r3d["weights"]["installed"], true);
    assert_eq!(r3d["weights"]["sha256"], w["sha256"]);

    // The wrong architecture's weights are refused with the key at fault named.
    let resp = app
        .request(
            Method::POST,
            "/v1/base-models/resnet18/weights",
            &app.admin_key,
        )
        .body(bytes)
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, 422, "invalid_model_file").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unexpected key `stem.0.weight`"),
        "{body}"
    );
    let resp = app
        .request(
            Method::POST,
            "/v1/base-models/nonsense/weights",
            &app.admin_key,
        )
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 404, "not_found").await;
}

#[sqlx::test(migrator = "vidtune::db::MIGRATOR")]
async fn tenants_register_torchscript_backbones_that_honour_the_contract(db: PgPool) {
    // Tenant keys register backbones only where the server allows it (operators always may).
    let app = spawn_app_with(db, |s| s.tenant_backbones = true).await;
    let a = app.key_for("surgery", false).await;
    let b = app.key_for("radiology", false).await;
    let good = std::fs::read(model_fixtures().join("tiny_backbone.pt")).unwrap();
    let form = Form::new()
        .text("name", "tiny3d")
        .text("description", "a small 3D CNN")
        .text("preprocessing", r#"{"frames":8,"sampling":"consecutive","resize":[128,171],"crop":64,"mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25]}"#)
        .part("file", Part::bytes(good.clone()).file_name("tiny.pt"));
    let resp = app
        .request(Method::POST, "/v1/base-models", &a)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["feature_dim"], 16);
    assert_eq!(created["preprocessing"]["crop"], 64);

    let mine: Value = app.get("/v1/base-models", &a).await.json().await.unwrap();
    assert!(
        mine["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "tiny3d" && m["kind"] == "torchscript")
    );
    let theirs: Value = app.get("/v1/base-models", &b).await.json().await.unwrap();
    assert!(
        !theirs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "tiny3d")
    );

    let bad = std::fs::read(model_fixtures().join("bad_backbone.pt")).unwrap();
    let form = Form::new()
        .text("name", "bad")
        .part("file", Part::bytes(bad).file_name("bad.pt"));
    let resp = app
        .request(Method::POST, "/v1/base-models", &a)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, 422, "invalid_model_file").await;
    assert!(
        body["detail"].as_str().unwrap().contains("[N, D]"),
        "{body}"
    );

    let form = Form::new().text("name", "junk").part(
        "file",
        Part::bytes(b"not torchscript".to_vec()).file_name("x.pt"),
    );
    let resp = app
        .request(Method::POST, "/v1/base-models", &a)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(resp, 422, "invalid_model_file").await;

    let form = Form::new()
        .text("name", "r3d_18")
        .part("file", Part::bytes(good).file_name("x.pt"));
    let resp = app
        .request(Method::POST, "/v1/base-models", &a)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        assert_problem(resp, 422, "validation_failed").await["field"],
        "name"
    );
    // Refused uploads leave no files behind.
    let left = std::fs::read_dir(app.data_dir.join("backbones"))
        .unwrap()
        .count();
    assert_eq!(left, 1);
}
