//! What a tenant stores, summed from the records that own the bytes.
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Bytes a tenant stores, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StoredBytes {
    /// Uploaded archives and videos, at their received size.
    pub uploads: i64,
    /// Training caches (raw RGB frames at the cache's size).
    pub caches: i64,
    /// Jobs' checkpoints as last written.
    pub checkpoints: i64,
    /// Trained models' files.
    pub models: i64,
    /// Registered TorchScript backbones.
    pub backbones: i64,
}

impl StoredBytes {
    pub fn total(&self) -> i64 {
        self.uploads + self.caches + self.checkpoints + self.models + self.backbones
    }
}

/// A tenant's stored bytes and its own quota (`None`: the server's default); `None` when the
/// tenant does not exist.
pub async fn of_tenant(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
) -> sqlx::Result<Option<(StoredBytes, Option<i64>)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        stored: StoredBytes,
        quota: Option<i64>,
    }
    let row: Option<Row> = sqlx::query_as(
        "select
           (select coalesce(sum(bytes), 0) from uploads where tenant_id = t.id)::bigint as uploads,
           (select coalesce(sum(cache_frames::bigint * cache_width * cache_height * 3), 0)
              from videos where tenant_id = t.id and cache_frames is not null)::bigint as caches,
           (select coalesce(sum(checkpoint_bytes), 0) from jobs where tenant_id = t.id)::bigint
              as checkpoints,
           (select coalesce(sum(bytes), 0) from models where tenant_id = t.id)::bigint as models,
           (select coalesce(sum(bytes), 0) from custom_backbones where tenant_id = t.id)::bigint
              as backbones,
           t.storage_quota_bytes as quota
         from tenants t where t.id = $1",
    )
    .bind(tenant_id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| (r.stored, r.quota)))
}
