//! Batch predictions (a model over the accepted videos of a dataset) and their per-video
//! results.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// Where a batch prediction is. Stored as the lowercase name (the table's check constraint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    Running,
    Succeeded,
    Failed,
}

/// A batch prediction as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Batch {
    pub id: Uuid,
    pub model_id: Uuid,
    pub dataset_id: Uuid,
    pub split: Option<String>,
    pub clips: i32,
    pub state: BatchState,
    pub error: Option<String>,
    pub total: i32,
    pub done: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// A batch prediction about to start (`running`, nothing done).
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub model_id: Uuid,
    pub dataset_id: Uuid,
    pub split: Option<&'a str>,
    pub clips: i32,
    /// Videos it will predict.
    pub total: i32,
}

pub async fn insert(db: impl PgExecutor<'_>, b: &NewBatch<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into batch_predictions (id, tenant_id, model_id, dataset_id, split, clips, total)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(b.id)
    .bind(b.tenant_id)
    .bind(b.model_id)
    .bind(b.dataset_id)
    .bind(b.split)
    .bind(b.clips)
    .bind(b.total)
    .execute(db)
    .await?;
    Ok(())
}

/// A tenant's batch prediction; `None` also for another tenant's id.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Batch>> {
    sqlx::query_as(
        "select id, model_id, dataset_id, split, clips, state, error, total, done, created_at,
                finished_at
         from batch_predictions where tenant_id = $1 and id = $2",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Record how a batch prediction ended.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    state: BatchState,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update batch_predictions set state = $2, error = $3, finished_at = now() where id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(error)
    .execute(db)
    .await?;
    Ok(())
}

/// One video's prediction within a batch.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BatchResult {
    pub video_id: Uuid,
    pub path: String,
    /// The video's label in the dataset, if it has one.
    pub truth: Option<String>,
    pub predicted: String,
    pub probability: f64,
    /// Class name → probability (passed through as stored).
    pub probabilities: Value,
}

/// One video's prediction to store.
#[derive(Debug, Clone)]
pub struct NewResult<'a> {
    pub video_id: Uuid,
    pub path: &'a str,
    pub truth: Option<&'a str>,
    pub predicted: &'a str,
    pub probability: f64,
    pub probabilities: &'a BTreeMap<String, f64>,
}

/// Store one video's result and count it done in one transaction, so the progress a client
/// polls never runs ahead of the results it can read.
pub async fn record_result(db: &PgPool, batch_id: Uuid, r: &NewResult<'_>) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into batch_prediction_results
             (batch_id, video_id, path, truth, predicted, probability, probabilities)
         values ($1, $2, $3, $4, $5, $6, $7) on conflict do nothing",
    )
    .bind(batch_id)
    .bind(r.video_id)
    .bind(r.path)
    .bind(r.truth)
    .bind(r.predicted)
    .bind(r.probability)
    .bind(Json(r.probabilities))
    .execute(&mut *tx)
    .await?;
    sqlx::query("update batch_predictions set done = done + 1 where id = $1")
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// A batch's results, ordered by video path.
pub async fn results(db: impl PgExecutor<'_>, batch_id: Uuid) -> sqlx::Result<Vec<BatchResult>> {
    sqlx::query_as(
        "select video_id, path, truth, predicted, probability, probabilities
         from batch_prediction_results where batch_id = $1 order by path",
    )
    .bind(batch_id)
    .fetch_all(db)
    .await
}
