//! Streaming request bodies to disk: never held whole in memory, SHA-256 computed on the way,
//! size-capped while bytes arrive, and removed again if the body does not arrive whole.
use std::path::Path;

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::{ApiError, ErrorCode};
use super::extract::{check_name, check_text};

/// A body written to disk.
#[derive(Debug, Clone)]
pub struct Received {
    pub bytes: u64,
    pub sha256: String,
}

/// Write `stream` to `dest` (which must not exist), refusing more than `cap` bytes.
pub async fn write_stream<S, E>(mut stream: S, dest: &Path, cap: u64) -> Result<Received, ApiError>
where
    S: Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
    }
    let mut file = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::options()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(|e| ApiError::internal(e.into()))?,
    );
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the upload was interrupted: {e}")))?;
        bytes += chunk.len() as u64;
        if bytes > cap {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the upload exceeds the limit of {cap} bytes"),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    file.into_inner()
        .sync_all()
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    Ok(Received {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Stream a raw request body.
async fn write_body(body: Body, dest: &Path, cap: u64) -> Result<Received, ApiError> {
    write_stream(body.into_data_stream(), dest, cap).await
}

/// Stream one multipart field.
async fn write_field(field: Field<'_>, dest: &Path, cap: u64) -> Result<Received, ApiError> {
    write_stream(field, dest, cap).await
}

/// A received upload: the file, its name as the client gave it, and the other form fields.
pub struct Incoming {
    pub received: Received,
    pub file_name: Option<String>,
    pub fields: Vec<(String, String)>,
}

impl Incoming {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether the request carries a multipart form.
pub fn is_multipart(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

/// Stream the body to `dest`: the whole raw body, or multipart field `file` (the other, small
/// fields are collected). An empty file is refused.
pub async fn receive<S: Send + Sync>(
    state: &S,
    req: Request,
    dest: &Path,
    cap: u64,
) -> Result<Incoming, ApiError> {
    let incoming = if is_multipart(&req) {
        let mut form = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let mut file = None;
        let mut fields = Vec::new();
        while let Some(field) = form.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "file" && file.is_none() {
                let file_name = field.file_name().map(str::to_owned);
                file = Some((write_field(field, dest, cap).await?, file_name));
            } else if fields.len() < 32 {
                let text = field.text().await.map_err(multipart_error)?;
                check_name("form", &name)?;
                check_text(&name, &text)?;
                fields.push((name, text));
            }
        }
        let (received, file_name) = file.ok_or_else(|| {
            ApiError::validation("file", "the multipart body has no `file` field")
        })?;
        Incoming {
            received,
            file_name,
            fields,
        }
    } else {
        Incoming {
            received: write_body(req.into_body(), dest, cap).await?,
            file_name: None,
            fields: Vec::new(),
        }
    };
    if incoming.received.bytes == 0 {
        return Err(ApiError::validation(
            "file",
            "the upload is empty (0 bytes)",
        ));
    }
    Ok(incoming)
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, e.body_text())
    } else {
        ApiError::bad_request(format!(
            "the upload was interrupted or malformed: {}",
            e.body_text()
        ))
    }
}

/// Checks an optional `x-content-sha256` header (hex) against what arrived.
pub fn verify_checksum(headers: &axum::http::HeaderMap, got: &Received) -> Result<(), ApiError> {
    let Some(want) = headers.get("x-content-sha256") else {
        return Ok(());
    };
    let want = want
        .to_str()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if want != got.sha256 {
        return Err(ApiError::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "x-content-sha256 is {want} but the received body hashes to {}",
                got.sha256
            ),
        ));
    }
    Ok(())
}
