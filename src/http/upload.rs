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

/// Largest form field other than `file`, in bytes: those are labels, ids and names, read into
/// memory, so a large one is refused (413) rather than held.
pub const MAX_FORM_FIELD_BYTES: usize = 64 << 10;
/// Most form fields other than `file`.
pub const MAX_FORM_FIELDS: usize = 32;

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

/// Stream the body to `dest`: the whole raw body, or multipart field `file` (the other fields
/// are collected, each at most [`MAX_FORM_FIELD_BYTES`], at most [`MAX_FORM_FIELDS`] of them).
/// An empty file and a second `file` field are refused.
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
            if name == "file" {
                if file.is_some() {
                    return Err(ApiError::validation(
                        "file",
                        "the form has more than one `file` field; send one file per request",
                    ));
                }
                let file_name = field.file_name().map(str::to_owned);
                file = Some((write_field(field, dest, cap).await?, file_name));
            } else {
                if fields.len() == MAX_FORM_FIELDS {
                    return Err(ApiError::validation(
                        name,
                        format!("the form has more than {MAX_FORM_FIELDS} fields besides `file`"),
                    ));
                }
                check_name("form", &name)?;
                let value = small_field(field, &name).await?;
                check_text(&name, &value)?;
                fields.push((name, value));
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

/// A form field other than `file`, as text, read only up to [`MAX_FORM_FIELD_BYTES`].
async fn small_field(mut field: Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if value.len() + chunk.len() > MAX_FORM_FIELD_BYTES {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "form field `{}` exceeds the limit of {MAX_FORM_FIELD_BYTES} bytes for fields \
                     other than `file`",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        value.extend_from_slice(&chunk);
    }
    String::from_utf8(value).map_err(|_| ApiError::validation(name, "not UTF-8 text"))
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

/// The most one upload of a tenant may stream: the route's limit, or what is left of the
/// tenant's storage quota when that is less (going over it then answers `quota_exceeded`).
/// Nothing is left: refused before a byte is read.
pub struct UploadCap {
    pub bytes: u64,
    by_quota: bool,
}

impl UploadCap {
    pub async fn of(
        s: &super::AppState,
        tenant_id: uuid::Uuid,
        limit: u64,
    ) -> Result<Self, ApiError> {
        let room = crate::quota::room(&s.db, s.settings.tenant_quota_bytes, tenant_id).await?;
        Ok(Self {
            bytes: limit.min(room),
            by_quota: room < limit,
        })
    }

    /// `e` as the quota's error when it is the quota that stopped the upload.
    pub fn explain(&self, e: ApiError) -> ApiError {
        if self.by_quota && e.code == ErrorCode::PayloadTooLarge {
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "the upload is larger than what remains of the tenant's storage quota \
                     ({} bytes); delete datasets or models, or ask an operator for more",
                    self.bytes
                ),
            )
        } else {
            e
        }
    }
}

/// The media type of a request, lowercase, without parameters (`""` when absent).
pub(super) fn content_type(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}
