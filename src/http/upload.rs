//! Streaming request bodies to disk: never held whole in memory, SHA-256 computed on the way,
//! size-capped while bytes arrive, and removed again if the body does not arrive whole.
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::multipart::Field;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::{ApiError, ErrorCode};

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
pub async fn write_body(body: Body, dest: &Path, cap: u64) -> Result<Received, ApiError> {
    write_stream(body.into_data_stream(), dest, cap).await
}

/// Stream one multipart field.
pub async fn write_field(field: Field<'_>, dest: &Path, cap: u64) -> Result<Received, ApiError> {
    write_stream(field, dest, cap).await
}

/// Deletes a partly received file unless disarmed: also runs when the client disconnects and
/// the handler future is dropped mid-body.
pub struct PartialFile {
    path: Option<PathBuf>,
}

impl PartialFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }
    pub fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
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
