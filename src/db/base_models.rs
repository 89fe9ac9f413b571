//! Installed pretrained weights and tenant TorchScript backbones.
use serde::Serialize;
use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BaseWeights {
    pub id: Uuid,
    pub arch: String,
    pub sha256: String,
    pub source: String,
    #[serde(skip)]
    pub path: String,
    pub tensors: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const WEIGHTS_COLUMNS: &str = "id, arch, sha256, source, path, tensors, created_at";

/// Record imported weights; importing the same file twice returns the first record.
pub async fn insert_weights(
    db: impl PgExecutor<'_>,
    arch: &str,
    sha256: &str,
    source: &str,
    path: &str,
    tensors: i32,
) -> sqlx::Result<BaseWeights> {
    sqlx::query_as(&format!(
        "insert into base_weights (id, arch, sha256, source, path, tensors)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (arch, sha256) do update set source = base_weights.source
         returning {WEIGHTS_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(arch)
    .bind(sha256)
    .bind(source)
    .bind(path)
    .bind(tensors)
    .fetch_one(db)
    .await
}

/// The newest weights of each architecture.
pub async fn latest_weights(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<BaseWeights>> {
    sqlx::query_as(&format!(
        "select distinct on (arch) {WEIGHTS_COLUMNS} from base_weights
         order by arch, created_at desc"
    ))
    .fetch_all(db)
    .await
}

/// The newest weights installed for one architecture.
pub async fn latest_weights_of(
    db: impl PgExecutor<'_>,
    arch: &str,
) -> sqlx::Result<Option<BaseWeights>> {
    sqlx::query_as(&format!(
        "select {WEIGHTS_COLUMNS} from base_weights where arch = $1
         order by created_at desc limit 1"
    ))
    .bind(arch)
    .fetch_optional(db)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CustomBackbone {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub description: String,
    pub feature_dim: i32,
    pub preprocessing: serde_json::Value,
    pub sha256: String,
    #[serde(skip)]
    pub path: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const CUSTOM_COLUMNS: &str =
    "id, tenant_id, name, description, feature_dim, preprocessing, sha256, path, created_at";

pub struct NewCustomBackbone<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: &'a str,
    pub description: &'a str,
    pub feature_dim: i32,
    pub preprocessing: serde_json::Value,
    pub sha256: &'a str,
    pub path: &'a str,
    pub bytes: i64,
}

pub async fn insert_custom(
    db: impl PgExecutor<'_>,
    b: &NewCustomBackbone<'_>,
) -> sqlx::Result<CustomBackbone> {
    sqlx::query_as(&format!(
        "insert into custom_backbones
           (id, tenant_id, name, description, feature_dim, preprocessing, sha256, path, bytes)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning {CUSTOM_COLUMNS}"
    ))
    .bind(b.id)
    .bind(b.tenant_id)
    .bind(b.name)
    .bind(b.description)
    .bind(b.feature_dim)
    .bind(&b.preprocessing)
    .bind(b.sha256)
    .bind(b.path)
    .bind(b.bytes)
    .fetch_one(db)
    .await
}

pub async fn list_custom(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
) -> sqlx::Result<Vec<CustomBackbone>> {
    sqlx::query_as(&format!(
        "select {CUSTOM_COLUMNS} from custom_backbones where tenant_id = $1 order by name"
    ))
    .bind(tenant_id)
    .fetch_all(db)
    .await
}

pub async fn get_custom_by_name(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    name: &str,
) -> sqlx::Result<Option<CustomBackbone>> {
    sqlx::query_as(&format!(
        "select {CUSTOM_COLUMNS} from custom_backbones where tenant_id = $1 and name = $2"
    ))
    .bind(tenant_id)
    .bind(name)
    .fetch_optional(db)
    .await
}
