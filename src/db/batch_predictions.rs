//! Batch predictions (a model over the accepted videos of a dataset) and their per-video
//! results.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::types::Json;
use std::time::Duration;

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
    Canceled,
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

const COLUMNS: &str = "id, model_id, dataset_id, split, clips, state, error, total, done, \
                       created_at, finished_at";

/// Store a new batch, leased for `lease` to `owner` (the process that will run it); returns it
/// as the API shows it.
pub async fn insert(
    db: impl PgExecutor<'_>,
    b: &NewBatch<'_>,
    owner: Uuid,
    lease: Duration,
) -> sqlx::Result<Batch> {
    sqlx::query_as(&format!(
        "insert into batch_predictions
             (id, tenant_id, model_id, dataset_id, split, clips, total, lease_owner,
              lease_expires_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
         returning {COLUMNS}"
    ))
    .bind(b.id)
    .bind(b.tenant_id)
    .bind(b.model_id)
    .bind(b.dataset_id)
    .bind(b.split)
    .bind(b.clips)
    .bind(b.total)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_one(db)
    .await
}

/// What a process needs to run (or resume) a batch it holds the lease of.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub model_id: Uuid,
    pub dataset_id: Uuid,
    pub split: Option<String>,
    pub clips: i32,
}

/// Take over up to `limit` running batches whose lease ran out (their process died), or that
/// never had one, leasing them to `owner` for `lease`. Several servers may claim at once: each
/// batch goes to one (`skip locked`).
pub async fn claim_abandoned(
    db: impl PgExecutor<'_>,
    owner: Uuid,
    lease: Duration,
    limit: i64,
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as(
        "update batch_predictions
            set lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
          where id in (select id from batch_predictions
                        where state = 'running'
                          and (lease_expires_at is null or lease_expires_at < now())
                        order by created_at
                        limit $3
                        for update skip locked)
          returning id, tenant_id, model_id, dataset_id, split, clips",
    )
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Extend `owner`'s lease on a running batch; `false` when the batch is no longer its to run
/// (canceled, finished, or taken over after the lease ran out).
pub async fn renew(
    db: impl PgExecutor<'_>,
    id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "update batch_predictions set lease_expires_at = now() + make_interval(secs => $3)
          where id = $1 and lease_owner = $2 and state = 'running'",
    )
    .bind(id)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The videos of a batch that have a result already (a resumed batch skips them).
pub async fn done_videos(db: impl PgExecutor<'_>, batch_id: Uuid) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("select video_id from batch_prediction_results where batch_id = $1")
        .bind(batch_id)
        .fetch_all(db)
        .await
}

/// Cancel a tenant's running batch (its runner stops before the next video); a finished one is
/// returned unchanged. `None` for an unknown id or another tenant's.
pub async fn cancel(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Batch>> {
    sqlx::query_as(&format!(
        "with c as (
             update batch_predictions set state = 'canceled', finished_at = now()
              where tenant_id = $1 and id = $2 and state = 'running'
          returning {COLUMNS})
         select {COLUMNS} from c
         union all
         select {COLUMNS} from batch_predictions
          where tenant_id = $1 and id = $2 and not exists (select 1 from c)"
    ))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// A tenant's batch prediction; `None` also for another tenant's id.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Batch>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from batch_predictions where tenant_id = $1 and id = $2"
    ))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Record how a batch prediction ended, if it is still `owner`'s running batch (a canceled
/// batch stays canceled; a process that lost its lease changes nothing).
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    owner: Uuid,
    state: BatchState,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update batch_predictions set state = $3, error = $4, finished_at = now(),
                lease_expires_at = null
          where id = $1 and lease_owner = $2 and state = 'running'",
    )
    .bind(id)
    .bind(owner)
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
/// polls never runs ahead of the results it can read. Idempotent: a video predicted again (a
/// resumed batch) keeps its first result and is counted once; nothing is stored once the batch
/// is no longer running (canceled).
pub async fn record_result(db: &PgPool, batch_id: Uuid, r: &NewResult<'_>) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into batch_prediction_results
             (batch_id, video_id, path, truth, predicted, probability, probabilities)
         select $1, $2, $3, $4, $5, $6, $7
          where exists (select 1 from batch_predictions where id = $1 and state = 'running')
         on conflict do nothing",
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
    sqlx::query(
        "update batch_predictions
            set done = (select count(*) from batch_prediction_results where batch_id = $1)
          where id = $1",
    )
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
