use std::net::SocketAddr;

use reqwest::{Client, Method, Response};
use serde_json::Value;
use sqlx::PgPool;
use vidtune::app::Application;
use vidtune::auth::Role;
use vidtune::config::Settings;
use vidtune::http::Operation;

/// A running server plus an operator key of tenant `ops` (the host's key).
pub struct TestApp {
    pub addr: SocketAddr,
    /// Where `/metrics` is served without a key, when the settings asked for it.
    pub metrics_addr: Option<SocketAddr>,
    pub client: Client,
    pub db: PgPool,
    /// An operator key (so also an admin of `ops`): for the global operations.
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
    vidtune::client::install_tls_provider();
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
    let metrics_addr = app.metrics_addr();
    let operations = app.operations().to_vec();
    tokio::spawn(app.run_until(std::future::pending()));
    let mut test = TestApp {
        addr,
        metrics_addr,
        client: Client::new(),
        db,
        admin_key: String::new(),
        operations,
        data_dir: data.path().to_path_buf(),
        _data: data,
    };
    test.admin_key = test.key_for_role("ops", Role::Operator).await;
    test
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Create (directly in the database) a key for `tenant`, creating the tenant if needed:
    /// an admin key of that tenant, or a plain tenant key.
    pub async fn key_for(&self, tenant: &str, admin: bool) -> String {
        let role = if admin { Role::Admin } else { Role::Member };
        self.key_for_role(tenant, role).await
    }

    /// Create (directly in the database, as `vidtune keys create` does) a key with `role`.
    pub async fn key_for_role(&self, tenant: &str, role: Role) -> String {
        let t = vidtune::db::tenants::ensure_tenant(&self.db, tenant)
            .await
            .unwrap();
        let minted = vidtune::auth::mint();
        vidtune::db::tenants::insert_key(&self.db, t.id, "", &minted.prefix, &minted.digest, role)
            .await
            .unwrap();
        minted.secret
    }

    /// The id of the tenant called `name`.
    pub async fn tenant_id(&self, name: &str) -> String {
        let id: uuid::Uuid = sqlx::query_scalar("select id from tenants where name = $1")
            .bind(name)
            .fetch_one(&self.db)
            .await
            .unwrap();
        id.to_string()
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
    /// The body of `GET path`, as text.
    pub async fn get_text(&self, path: &str, key: &str) -> String {
        self.get(path, key).await.text().await.unwrap()
    }

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

impl TestApp {
    /// The URL of this test's own database (the pool's), for worker child processes.
    pub async fn database_url(&self) -> String {
        let name: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&self.db)
            .await
            .unwrap();
        let base = std::env::var("DATABASE_URL").expect("DATABASE_URL for the tests");
        let (prefix, _) = base.rsplit_once('/').unwrap();
        format!("{prefix}/{name}")
    }

    /// Start an in-process worker pool on `devices` CPU slots with short leases; dropping the
    /// returned sender stops it.
    pub async fn start_workers(
        &self,
        slots: usize,
        lease_s: u64,
    ) -> tokio::sync::watch::Sender<bool> {
        let mut cfg = vidtune::worker::pool::PoolConfig::new(
            env!("CARGO_BIN_EXE_vidtune").into(),
            self.database_url().await,
            self.data_dir.clone(),
        );
        cfg.lease = std::time::Duration::from_secs(lease_s);
        cfg.heartbeat = std::time::Duration::from_millis(500);
        cfg.poll = std::time::Duration::from_millis(300);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let devices = vec![vidtune::worker::Device::Cpu; slots];
        tokio::spawn(vidtune::worker::pool::run(
            self.db.clone(),
            std::sync::Arc::new(cfg),
            devices,
            rx,
        ));
        tx
    }

    /// Poll a job until it reaches a final state (or `secs` pass); returns its view.
    pub async fn wait_job(&self, key: &str, job: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let v: Value = self
                .get(&format!("/v1/jobs/{job}"), key)
                .await
                .json()
                .await
                .unwrap();
            if ["succeeded", "failed", "canceled"].contains(&v["state"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job did not finish: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// A ready dataset of motion clips (`per_class` each way), cached at 64 px.
    pub async fn motion_dataset(&self, key: &str, per_class: u32) -> String {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for i in 0..per_class {
            for (label, right) in [("rightward", true), ("leftward", false)] {
                let p = crate::media::motion(dir.path(), &format!("{label}{i}.mp4"), right, i);
                entries.push(crate::media::file(
                    &format!("{label}/{i}.mp4"),
                    std::fs::read(p).unwrap(),
                ));
            }
        }
        let ds = self
            .dataset(key, serde_json::json!({"name": format!("motion-{}", uuid::Uuid::new_v4()), "cache": {"short_side": 64}, "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1}}))
            .await;
        self.upload_raw(key, &ds, "application/zip", crate::media::zip(&entries))
            .await;
        let v = self.wait_ingested(key, &ds).await;
        assert_eq!(v["status"], "ready", "{v}");
        ds
    }
}
