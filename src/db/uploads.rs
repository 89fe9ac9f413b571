//! Uploads: bodies received whole and waiting for, or done with, ingest.
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use uuid::Uuid;

/// Where an upload stands. Stored as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum UploadStatus {
    /// On disk and recorded; ingest has not finished it (after a restart it starts again).
    Received,
    /// Ingested: its videos have their verdicts.
    Done,
    /// Could not be used as a whole; `reason` says why.
    Failed,
}

/// What an upload holds. Stored as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum UploadKind {
    /// A zip, tar or tar.gz of many files, stored under `incoming/` until extracted.
    Archive,
    /// One video with its metadata, stored where its files go.
    Video,
    /// Instances fetched from the configured PACS over DICOMweb.
    Import,
}

pub struct NewUpload<'a> {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: UploadKind,
    pub bytes: u64,
    pub sha256: &'a str,
    pub meta: serde_json::Value,
}

/// Record a received upload and hand the dataset to ingest.
pub async fn received(db: &sqlx::PgPool, upload: &NewUpload<'_>) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into uploads (id, dataset_id, tenant_id, kind, bytes, sha256, meta)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(upload.id)
    .bind(upload.dataset_id)
    .bind(upload.tenant_id)
    .bind(upload.kind)
    .bind(upload.bytes as i64)
    .bind(upload.sha256)
    .bind(&upload.meta)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update datasets set receiving = false, status = 'processing', status_reason = null
         where id = $1",
    )
    .bind(upload.dataset_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The bytes an import fetched (counted against the tenant's quota like an upload's body).
pub async fn set_bytes(db: impl PgExecutor<'_>, id: Uuid, bytes: u64) -> sqlx::Result<()> {
    sqlx::query("update uploads set bytes = $2 where id = $1")
        .bind(id)
        .bind(bytes as i64)
        .execute(db)
        .await?;
    Ok(())
}

/// An upload waiting for ingest.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingUpload {
    pub id: Uuid,
    /// SHA-256 of the received body (computed while it streamed to disk).
    pub sha256: String,
    pub dataset_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: UploadKind,
    pub meta: serde_json::Value,
}

/// Uploads not yet ingested (after a restart, ingest resumes from these).
pub async fn pending(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<PendingUpload>> {
    sqlx::query_as(
        "select id, sha256, dataset_id, tenant_id, kind, meta from uploads
         where status = 'received' order by created_at",
    )
    .fetch_all(db)
    .await
}

/// Ingest has finished the upload: `Done`, or `Failed` with the reason the tenant reads.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: UploadStatus,
    reason: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query("update uploads set status = $2, reason = coalesce($3, reason) where id = $1")
        .bind(id)
        .bind(status)
        .bind(reason)
        .execute(db)
        .await?;
    Ok(())
}
