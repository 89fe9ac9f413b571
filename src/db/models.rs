//! Trained models: the record a successful job leaves behind, with its lineage.
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::evaluation::Metrics;

/// A trained model and where it came from (the `models` table).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Model {
    pub id: Uuid,
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub dataset_hash: Option<String>,
    /// What the dataset was (name, content hash, accepted videos per split, classes), copied
    /// in when the dataset was deleted; `null` while it exists.
    pub dataset_lineage: Option<Value>,
    pub base_model: String,
    pub base_weights_sha256: Option<String>,
    pub hyperparameters: Value,
    pub classes: Vec<String>,
    pub preprocessing: Value,
    pub decode: Value,
    pub head: Value,
    pub eval_clips: i32,
    pub val_metrics: Json<Metrics>,
    pub test_metrics: Option<Json<Metrics>>,
    pub vidtune_version: String,
    pub libtorch_version: String,
    /// The model's directory, relative to the data directory: a server detail.
    #[serde(skip)]
    pub path: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

const COLUMNS: &str =
    "id, job_id, dataset_id, dataset_hash, dataset_lineage, base_model, base_weights_sha256,
    hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, test_metrics,
    vidtune_version, libtorch_version, path, created_at";

/// A tenant's model; `None` also for another tenant's id, so ids leak nothing.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Model>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from models where tenant_id = $1 and id = $2"
    ))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// A tenant's newest models (at most 500).
pub async fn list(db: impl PgExecutor<'_>, tenant_id: Uuid) -> sqlx::Result<Vec<Model>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from models where tenant_id = $1 order by created_at desc limit 500"
    ))
    .bind(tenant_id)
    .fetch_all(db)
    .await
}

/// A trained model as its job records it (the files are already in place under `path`).
pub struct NewModel<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub dataset_hash: Option<&'a str>,
    pub base_model: &'a str,
    pub base_weights_sha256: Option<&'a str>,
    /// The job's hyperparameters as stored with the job.
    pub hyperparameters: &'a serde_json::Value,
    pub classes: &'a [String],
    pub preprocessing: serde_json::Value,
    pub head: serde_json::Value,
    pub eval_clips: i32,
    pub val_metrics: &'a Metrics,
    pub test_metrics: Option<&'a Metrics>,
    pub vidtune_version: &'a str,
    pub libtorch_version: &'a str,
    /// Relative to the data directory.
    pub path: &'a str,
    /// Bytes of the model's files.
    pub bytes: i64,
}

/// Insert a model; its decode spec is the dataset's cache spec at this moment.
pub async fn insert(db: impl PgExecutor<'_>, m: &NewModel<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into models (id, tenant_id, job_id, dataset_id, dataset_hash, base_model,
             base_weights_sha256, hyperparameters, classes, preprocessing, head, eval_clips,
             val_metrics, test_metrics, vidtune_version, libtorch_version, path, bytes, decode)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, (select cache_spec from datasets where id = $4))",
    )
    .bind(m.id)
    .bind(m.tenant_id)
    .bind(m.job_id)
    .bind(m.dataset_id)
    .bind(m.dataset_hash)
    .bind(m.base_model)
    .bind(m.base_weights_sha256)
    .bind(m.hyperparameters)
    .bind(m.classes)
    .bind(&m.preprocessing)
    .bind(&m.head)
    .bind(m.eval_clips)
    .bind(Json(m.val_metrics))
    .bind(m.test_metrics.map(Json))
    .bind(m.vidtune_version)
    .bind(m.libtorch_version)
    .bind(m.path)
    .bind(m.bytes)
    .execute(db)
    .await?;
    Ok(())
}

/// The test-split metrics of the model a job produced, if it has one and it was evaluated.
pub async fn test_metrics_of_job(
    db: impl PgExecutor<'_>,
    job_id: Uuid,
) -> sqlx::Result<Option<Metrics>> {
    Ok(sqlx::query_scalar::<_, Option<Json<Metrics>>>(
        "select test_metrics from models where job_id = $1",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await?
    .flatten()
    .map(|m| m.0))
}
