//! Trained models.
use sqlx::PgExecutor;
use uuid::Uuid;

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
    pub val_metrics: serde_json::Value,
    pub test_metrics: Option<serde_json::Value>,
    pub vidtune_version: &'a str,
    pub libtorch_version: &'a str,
    /// Relative to the data directory.
    pub path: &'a str,
}

/// Insert a model; its decode spec is the dataset's cache spec at this moment.
pub async fn insert(db: impl PgExecutor<'_>, m: &NewModel<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into models (id, tenant_id, job_id, dataset_id, dataset_hash, base_model,
             base_weights_sha256, hyperparameters, classes, preprocessing, head, eval_clips,
             val_metrics, test_metrics, vidtune_version, libtorch_version, path, decode)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 (select cache_spec from datasets where id = $4))",
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
    .bind(&m.val_metrics)
    .bind(&m.test_metrics)
    .bind(m.vidtune_version)
    .bind(m.libtorch_version)
    .bind(m.path)
    .execute(db)
    .await?;
    Ok(())
}
