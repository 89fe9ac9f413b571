//! The append-only audit trail of `/v1` requests. The database refuses updates and deletes.
use serde::Serialize;
use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

/// One audited request. Holds identifiers and outcomes only, never bodies or file names.
#[derive(Debug, Clone, Default)]
pub struct NewAuditEvent {
    pub tenant_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub action: String,
    pub resource_id: Option<Uuid>,
    pub status: u16,
    pub request_id: String,
    pub client_addr: Option<String>,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub tenant_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub action: String,
    pub resource_id: Option<Uuid>,
    pub status: i16,
    pub request_id: String,
    pub client_addr: Option<String>,
    pub details: serde_json::Value,
}

pub async fn insert(db: impl PgExecutor<'_>, e: &NewAuditEvent) -> sqlx::Result<()> {
    let details = if e.details.is_null() {
        serde_json::json!({})
    } else {
        e.details.clone()
    };
    sqlx::query(
        "insert into audit_events
           (tenant_id, key_id, action, resource_id, status, request_id, client_addr, details)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(e.tenant_id)
    .bind(e.key_id)
    .bind(&e.action)
    .bind(e.resource_id)
    .bind(e.status as i16)
    .bind(&e.request_id)
    .bind(&e.client_addr)
    .bind(details)
    .execute(db)
    .await?;
    Ok(())
}

/// Newest first; `before` pages backwards by id; `tenant_id` narrows to one tenant.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Option<Uuid>,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<AuditEvent>> {
    sqlx::query_as(
        "select id, at, tenant_id, key_id, action, resource_id, status, request_id,
                client_addr, details
         from audit_events
         where ($1::uuid is null or tenant_id = $1) and ($2::bigint is null or id < $2)
         order by id desc limit $3",
    )
    .bind(tenant_id)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await
}
