//! A client of vidtune's own REST API, for the command-line commands (`datasets upload`, `jobs`,
//! `predict`, `demo`). It speaks exactly what curl users send: bearer key, JSON, raw uploads,
//! Server-Sent Events; problems come back as errors that carry their `code`.
pub mod commands;

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use indicatif::ProgressBar;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the server is and which key to present (flags, then environment, then the quickstart's
/// key file).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Base URL of the vidtune API.
    #[arg(long, env = "VIDTUNE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key (default: the `admin.key` that `scripts/run` keeps in the data directory).
    #[arg(long, env = "VIDTUNE_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Data directory holding `admin.key`, used when no key is given.
    #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

/// A problem+json answer, kept whole so that callers can branch on `code`.
#[derive(Debug, thiserror::Error)]
#[error("{title} ({code}, HTTP {status}): {detail}")]
pub struct Problem {
    pub status: u16,
    pub code: String,
    pub title: String,
    pub detail: String,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// Install the process-wide TLS provider (ring) that reqwest needs for https:// URLs, for
/// example a hospital's TLS-terminating proxy; idempotent.
pub fn install_tls_provider() {
    static TLS: Once = Once::new();
    TLS.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let key = match &args.key {
            Some(k) => k.trim().to_string(),
            None => {
                let file = args.data_dir.join("admin.key");
                std::fs::read_to_string(&file)
                    .map(|k| k.trim().to_string())
                    .map_err(|_| {
                        anyhow!(
                            "no API key: pass --key, set VIDTUNE_API_KEY, or run scripts/run (it keeps one in {})",
                            file.display()
                        )
                    })?
            }
        };
        install_tls_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("vidtune-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            base: args.url.trim_end_matches('/').to_string(),
            key,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Send, and turn a non-2xx answer into a [`Problem`] (or a plain error for non-problems).
    pub async fn send(&self, rb: RequestBuilder) -> anyhow::Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach vidtune at {}: is the server running? (scripts/run starts one)",
                    self.base
                )
            } else {
                anyhow!(e)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<Value>(&body) {
            Ok(v) if v.get("code").is_some() => Problem {
                status: status.as_u16(),
                code: v["code"].as_str().unwrap_or_default().to_string(),
                title: v["title"].as_str().unwrap_or_default().to_string(),
                detail: v["detail"].as_str().unwrap_or_default().to_string(),
            }
            .into(),
            _ => anyhow!("HTTP {status}: {}", body.trim()),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .send(self.request(Method::GET, path))
            .await?
            .json()
            .await?)
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> anyhow::Result<T> {
        Ok(self
            .send(self.request(Method::POST, path).json(body))
            .await?
            .json()
            .await?)
    }

    /// Stream a file as the raw request body, advancing `bar` by the bytes sent.
    pub async fn upload_file(
        &self,
        rb: RequestBuilder,
        file: &Path,
        bar: &ProgressBar,
    ) -> anyhow::Result<Response> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let len = f.metadata().await?.len();
        bar.set_length(len);
        let b = bar.clone();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).inspect(move |chunk| {
                if let Ok(c) = chunk {
                    b.inc(c.len() as u64);
                }
            });
        let rb = rb
            .header(reqwest::header::CONTENT_TYPE, content_type(file))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        self.send(rb).await
    }

    /// Follow a job's Server-Sent Events; `on_event(kind, data)` is called for each. Returns
    /// when the server ends the stream (after the job's final state).
    pub async fn follow_events(
        &self,
        job: &str,
        mut on_event: impl FnMut(&str, &Value),
    ) -> anyhow::Result<()> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/v1/jobs/{job}/events"))
                    .header(reqwest::header::ACCEPT, "text/event-stream"),
            )
            .await?;
        let mut body = resp.bytes_stream();
        // Bytes until a whole event has arrived: a chunk may end inside a UTF-8 character.
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = buf.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&raw);
                let mut kind = "message".to_string();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    on_event(&kind, &serde_json::from_str(&data).unwrap_or(Value::Null));
                }
            }
        }
        Ok(())
    }
}

/// The Content-Type a file is sent with, from its extension.
pub fn content_type(file: &Path) -> &'static str {
    let ext = file
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "zip" => "application/zip",
        "tar" => "application/x-tar",
        "gz" | "tgz" => "application/gzip",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "mkv" => "video/x-matroska",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

/// Whether an error is a problem with this status.
pub fn is_status(e: &anyhow::Error, status: StatusCode) -> bool {
    e.downcast_ref::<Problem>()
        .is_some_and(|p| p.status == status.as_u16())
}
