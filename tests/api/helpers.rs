use std::net::SocketAddr;

use reqwest::{Client, Method, Response};
use serde_json::Value;
use sqlx::PgPool;
use vidtune::app::Application;
use vidtune::config::Settings;
use vidtune::http::Operation;

/// A running server plus an admin key of tenant `ops`.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    pub db: PgPool,
    pub admin_key: String,
    pub operations: Vec<Operation>,
    pub data_dir: std::path::PathBuf,
    _data: tempfile::TempDir,
}

pub async fn spawn_app(db: PgPool) -> TestApp {
    spawn_app_with(db, |_| {}).await
}

pub async fn spawn_app_with(db: PgPool, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        vidtune::telemetry::init(vidtune::config::LogFormat::Pretty);
    }
    let data = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::ephemeral(
        data.path().to_path_buf(),
        env!("CARGO_BIN_EXE_vidtune").into(),
    );
    tweak(&mut settings);
    let app = Application::build(settings, db.clone())
        .await
        .expect("build app");
    let addr = app.local_addr();
    let operations = app.operations().to_vec();
    tokio::spawn(app.run_until(std::future::pending()));
    let mut test = TestApp {
        addr,
        client: Client::new(),
        db,
        admin_key: String::new(),
        operations,
        data_dir: data.path().to_path_buf(),
        _data: data,
    };
    test.admin_key = test.key_for("ops", true).await;
    test
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Create (directly in the database) a key for `tenant`, creating the tenant if needed.
    pub async fn key_for(&self, tenant: &str, admin: bool) -> String {
        let t = vidtune::db::tenants::ensure_tenant(&self.db, tenant)
            .await
            .unwrap();
        let minted = vidtune::auth::mint();
        vidtune::db::tenants::insert_key(&self.db, t.id, "", &minted.prefix, &minted.digest, admin)
            .await
            .unwrap();
        minted.secret
    }

    pub fn request(&self, method: Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(key)
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        self.request(Method::GET, path, key).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, key: &str, body: Value) -> Response {
        self.request(Method::POST, path, key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

impl TestApp {
    /// Create a dataset and return its id.
    pub async fn dataset(&self, key: &str, body: Value) -> String {
        let resp = self.post_json("/v1/datasets", key, body).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let v: Value = resp.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// Upload an archive as a raw body; assert 202.
    pub async fn upload_raw(&self, key: &str, dataset: &str, ctype: &str, bytes: Vec<u8>) {
        let resp = self
            .request(
                Method::POST,
                &format!("/v1/datasets/{dataset}/uploads"),
                key,
            )
            .header("content-type", ctype)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }

    /// Poll the dataset until ingest ends (ready or failed); return the final view.
    pub async fn wait_ingested(&self, key: &str, dataset: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let v: Value = self
                .get(&format!("/v1/datasets/{dataset}"), key)
                .await
                .json()
                .await
                .unwrap();
            if v["status"] == "ready" || v["status"] == "failed" {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ingest did not finish: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Videos of a dataset keyed by path.
    pub async fn videos(
        &self,
        key: &str,
        dataset: &str,
    ) -> std::collections::BTreeMap<String, Value> {
        let v: Value = self
            .get(&format!("/v1/datasets/{dataset}/videos"), key)
            .await
            .json()
            .await
            .unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["path"].as_str().unwrap().to_owned(), x.clone()))
            .collect()
    }
}

/// Assert a response is an RFC 9457 problem with the given status and code; return its body.
pub async fn assert_problem(resp: Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status of {}", resp.url());
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(ctype, "application/problem+json");
    let header_id = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id on every response")
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["type"], format!("urn:vidtune:problem:{code}"));
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert_eq!(body["request_id"], header_id.as_str(), "{body}");
    body
}

/// Reference checkpoints and TorchScript modules (only the small ones the API tests need).
pub fn model_fixtures() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        crate::models::ensure(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-models"),
            &["r3d_18", "resnet18"],
        )
    })
}
