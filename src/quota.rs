//! Storage quotas: every tenant stores at most its quota (its own, or the server's default) in
//! uploads, caches, checkpoints, models and backbones together.
//!
//! The quota is checked before bytes are written: an upload may stream at most what remains
//! (uploads already running are each held to what remained when they began, so concurrent
//! uploads of one tenant can overshoot by what they share), a job is queued only while some
//! room remains, and ingest caches a video only when its cache fits.
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db;
use crate::db::usage::StoredBytes;

/// A tenant's storage against its quota.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub tenant_id: Uuid,
    pub quota_bytes: u64,
    /// Whether the quota is the tenant's own (else the server's default).
    pub quota_is_default: bool,
    pub used_bytes: u64,
    pub remaining_bytes: u64,
    pub by_kind: StoredBytes,
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "the tenant stores {} of its {} byte quota; delete datasets or models, or ask an \
         operator for a larger quota",
        .0.used_bytes,
        .0.quota_bytes
    )]
    Exceeded(Box<Usage>),
    #[error("no such tenant")]
    NoTenant,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// `tenant_id`'s usage; `default_quota` applies when the tenant has no quota of its own.
pub async fn usage(db: &PgPool, default_quota: u64, tenant_id: Uuid) -> Result<Usage, QuotaError> {
    let (stored, own) = db::usage::of_tenant(db, tenant_id)
        .await?
        .ok_or(QuotaError::NoTenant)?;
    let quota = own.map_or(default_quota, |q| q.max(0) as u64);
    let used = stored.total().max(0) as u64;
    Ok(Usage {
        tenant_id,
        quota_bytes: quota,
        quota_is_default: own.is_none(),
        used_bytes: used,
        remaining_bytes: quota.saturating_sub(used),
        by_kind: stored,
    })
}

/// The bytes `tenant_id` may still store; [`QuotaError::Exceeded`] when nothing is left.
pub async fn room(db: &PgPool, default_quota: u64, tenant_id: Uuid) -> Result<u64, QuotaError> {
    let u = usage(db, default_quota, tenant_id).await?;
    if u.remaining_bytes == 0 {
        return Err(QuotaError::Exceeded(Box::new(u)));
    }
    Ok(u.remaining_bytes)
}

/// Whether `bytes` more fit in `tenant_id`'s quota; [`QuotaError::Exceeded`] when they do not.
pub async fn reserve(
    db: &PgPool,
    default_quota: u64,
    tenant_id: Uuid,
    bytes: u64,
) -> Result<(), QuotaError> {
    let u = usage(db, default_quota, tenant_id).await?;
    if bytes > u.remaining_bytes {
        return Err(QuotaError::Exceeded(Box::new(u)));
    }
    Ok(())
}
