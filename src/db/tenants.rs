//! Tenants and their API keys.
use serde::Serialize;
use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::Role;

/// A hospital, department or team: every resource belongs to exactly one tenant.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    /// The tenant's storage quota in bytes; `None`: the server's default.
    pub storage_quota_bytes: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const TENANT_COLUMNS: &str = "id, name, storage_quota_bytes, created_at";

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub admin: bool,
    pub operator: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// The identity behind a valid key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyOwner {
    pub key_id: Uuid,
    pub key_prefix: String,
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub admin: bool,
    pub operator: bool,
    pub revoked: bool,
}

impl KeyOwner {
    pub fn role(&self) -> Role {
        Role::from_flags(self.admin, self.operator)
    }
}

pub async fn create_tenant(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Tenant> {
    sqlx::query_as(&format!(
        "insert into tenants (id, name) values ($1, $2) returning {TENANT_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(name)
    .fetch_one(db)
    .await
}

/// The tenant with this name, created if it does not exist yet.
pub async fn ensure_tenant(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Tenant> {
    sqlx::query_as(&format!(
        "insert into tenants (id, name) values ($1, $2)
         on conflict (name) do update set name = excluded.name
         returning {TENANT_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(name)
    .fetch_one(db)
    .await
}

/// Set (or with `None` clear) a tenant's storage quota; the tenant, if it exists.
pub async fn set_storage_quota(
    db: impl PgExecutor<'_>,
    id: Uuid,
    bytes: Option<i64>,
) -> sqlx::Result<Option<Tenant>> {
    sqlx::query_as(&format!(
        "update tenants set storage_quota_bytes = $2 where id = $1 returning {TENANT_COLUMNS}"
    ))
    .bind(id)
    .bind(bytes)
    .fetch_optional(db)
    .await
}

/// The tenant's de-identification key: made from `fresh` on first use (by whichever caller
/// comes first), the same ever after. It keys the hashes of patient IDs and the replacement
/// UIDs, so it never leaves the server.
pub async fn deid_key(
    db: impl PgExecutor<'_>,
    id: Uuid,
    fresh: &[u8],
) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar(
        "update tenants set deid_key = coalesce(deid_key, $2) where id = $1 returning deid_key",
    )
    .bind(id)
    .bind(fresh)
    .fetch_optional(db)
    .await
}

pub async fn get_tenant(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Tenant>> {
    sqlx::query_as(&format!(
        "select {TENANT_COLUMNS} from tenants where id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn list_tenants(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Tenant>> {
    sqlx::query_as(&format!(
        "select {TENANT_COLUMNS} from tenants order by name"
    ))
    .fetch_all(db)
    .await
}

const KEY_COLUMNS: &str =
    "id, tenant_id, name, prefix, admin, operator, created_at, last_used_at, revoked_at";

pub async fn insert_key(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    name: &str,
    prefix: &str,
    digest: &[u8; 32],
    role: Role,
) -> sqlx::Result<ApiKey> {
    sqlx::query_as(&format!(
        "insert into api_keys (id, tenant_id, name, prefix, digest, admin, operator)
         values ($1, $2, $3, $4, $5, $6, $7) returning {KEY_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(tenant_id)
    .bind(name)
    .bind(prefix)
    .bind(&digest[..])
    .bind(role.is_admin())
    .bind(role.is_operator())
    .fetch_one(db)
    .await
}

pub async fn list_keys(db: impl PgExecutor<'_>, tenant_id: Uuid) -> sqlx::Result<Vec<ApiKey>> {
    sqlx::query_as(&format!(
        "select {KEY_COLUMNS} from api_keys where tenant_id = $1 order by created_at"
    ))
    .bind(tenant_id)
    .fetch_all(db)
    .await
}

/// A key of the given tenant (another tenant's key is simply not found).
pub async fn get_key(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    key_id: Uuid,
) -> sqlx::Result<Option<ApiKey>> {
    sqlx::query_as(&format!(
        "select {KEY_COLUMNS} from api_keys where tenant_id = $1 and id = $2"
    ))
    .bind(tenant_id)
    .bind(key_id)
    .fetch_optional(db)
    .await
}

/// Revoke a key; revoking twice keeps the first revocation time. `tenant_id` limits the search
/// to one tenant's keys (`None`: any tenant's, for operators). `None` when no such key.
pub async fn revoke_key(
    db: impl PgExecutor<'_>,
    tenant_id: Option<Uuid>,
    key_id: Uuid,
) -> sqlx::Result<Option<ApiKey>> {
    sqlx::query_as(&format!(
        "update api_keys set revoked_at = coalesce(revoked_at, now())
         where id = $1 and ($2::uuid is null or tenant_id = $2)
         returning {KEY_COLUMNS}"
    ))
    .bind(key_id)
    .bind(tenant_id)
    .fetch_optional(db)
    .await
}

/// Look a key up by digest and note its use. Revoked keys are returned (flagged) so the caller
/// can say why it was refused.
pub async fn authenticate(
    db: impl PgExecutor<'_>,
    digest: &[u8; 32],
) -> sqlx::Result<Option<KeyOwner>> {
    sqlx::query_as(
        "update api_keys k set last_used_at = now()
         from tenants t
         where k.digest = $1 and t.id = k.tenant_id
         returning k.id as key_id, k.prefix as key_prefix, t.id as tenant_id,
                   t.name as tenant_name, k.admin, k.operator,
                   k.revoked_at is not null as revoked",
    )
    .bind(&digest[..])
    .fetch_optional(db)
    .await
}
