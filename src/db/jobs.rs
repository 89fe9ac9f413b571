//! The job queue. Claims use `FOR UPDATE SKIP LOCKED` by priority then age; a running job holds
//! a lease renewed by heartbeats; every write of an attempt is fenced by its attempt number, so
//! a stale attempt (its lease expired and the job was claimed again) changes nothing.
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::device::{Device, claimable_prefs};
use crate::evaluation::{EpochRecord, Metrics};

/// Where a job is in its life: `queued → running → succeeded | failed | canceled`; an expired
/// lease or a retried machine fault goes from `running` back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
    ];

    /// The state's name, as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }

    /// A job in a final state never runs again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Canceled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub dataset_id: Uuid,
    /// What the dataset was, copied in when it was deleted; `null` while it exists.
    pub dataset_lineage: Option<serde_json::Value>,
    pub base_model: String,
    pub hyperparameters: serde_json::Value,
    pub state: JobState,
    pub cancel_requested: bool,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<String>,
    pub device: Option<String>,
    pub epoch: i32,
    pub epochs: i32,
    pub step: i64,
    pub progress: f64,
    pub eta_s: Option<f64>,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub model_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(skip)]
    pub request_hash: Option<String>,
    #[serde(skip)]
    pub checkpoint: Option<String>,
}

const JOB_COLUMNS: &str =
    "id, tenant_id, dataset_id, dataset_lineage, base_model, hyperparameters, state,
    cancel_requested, priority, attempt, max_attempts, worker_id, device, epoch, epochs, step,
    progress, eta_s, error_kind, error, model_id, created_at, started_at, finished_at,
    request_hash, checkpoint";

pub struct NewJob<'a> {
    pub tenant_id: Uuid,
    pub dataset_id: Uuid,
    pub base_model: &'a str,
    pub hyperparameters: serde_json::Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub device_pref: &'a str,
    pub epochs: i32,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: &'a str,
}

pub async fn create(db: impl PgExecutor<'_>, j: &NewJob<'_>) -> sqlx::Result<Job> {
    sqlx::query_as(&format!(
        "insert into jobs (id, tenant_id, dataset_id, base_model, hyperparameters, priority,
             device_pref, epochs, idempotency_key, request_hash, max_attempts)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) returning {JOB_COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(j.tenant_id)
    .bind(j.dataset_id)
    .bind(j.base_model)
    .bind(&j.hyperparameters)
    .bind(j.priority)
    .bind(j.device_pref)
    .bind(j.epochs)
    .bind(j.idempotency_key)
    .bind(j.request_hash)
    .bind(j.max_attempts)
    .fetch_one(db)
    .await
}

pub async fn by_idempotency_key(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    key: &str,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where tenant_id = $1 and idempotency_key = $2"
    ))
    .bind(tenant_id)
    .bind(key)
    .fetch_optional(db)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where tenant_id = $1 and id = $2"
    ))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Any tenant's job (workers and the training process).
pub async fn get_any(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!("select {JOB_COLUMNS} from jobs where id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    state: Option<JobState>,
) -> sqlx::Result<Vec<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where tenant_id = $1 and ($2::text is null or state = $2)
         order by created_at desc limit 500"
    ))
    .bind(tenant_id)
    .bind(state)
    .fetch_all(db)
    .await
}

/// Ask a job to stop. A queued job is canceled at once; a running one stops within a step.
pub async fn request_cancel(db: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "update jobs set state = 'canceled', cancel_requested = true, finished_at = now()
         where tenant_id = $1 and id = $2 and state = 'queued'",
    )
    .bind(tenant_id)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("update jobs set cancel_requested = true where tenant_id = $1 and id = $2 and state = 'running'")
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let job = get(&mut *tx, tenant_id, id).await?;
    tx.commit().await?;
    Ok(job)
}

/// Claim the next job a worker on `device` may run: one whose `device_pref` the device admits
/// (`auto`, its kind, or exactly this GPU).
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    device: Device,
    lease_s: f64,
) -> sqlx::Result<Option<(Uuid, i32)>> {
    sqlx::query_as(
        "update jobs set state = 'running', attempt = attempt + 1, worker_id = $1, device = $2,
             lease_expires_at = now() + make_interval(secs => $4),
             started_at = coalesce(started_at, now()), error = null, error_kind = null
         where id = (
             select id from jobs
             where state = 'queued' and run_after <= now() and not cancel_requested
               and device_pref = any($3)
             order by priority desc, created_at
             for update skip locked
             limit 1)
         returning id, attempt",
    )
    .bind(worker_id)
    .bind(device.to_string())
    .bind(claimable_prefs(device))
    .bind(lease_s)
    .fetch_optional(db)
    .await
}

/// Renew the lease of a running attempt. `None`: the attempt is no longer the job's (fenced
/// out); `Some(cancel_requested)` otherwise.
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    lease_s: f64,
) -> sqlx::Result<Option<bool>> {
    let row: Option<(bool,)> = sqlx::query_as(
        "update jobs set lease_expires_at = now() + make_interval(secs => $3)
         where id = $1 and attempt = $2 and state = 'running'
         returning cancel_requested",
    )
    .bind(id)
    .bind(attempt)
    .bind(lease_s)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Jobs whose worker vanished: back to the queue (to resume from the last checkpoint) while
/// attempts remain, failed otherwise. Returns how many were rescued.
pub async fn reap_expired(db: &PgPool) -> sqlx::Result<u64> {
    let requeued = sqlx::query(
        "update jobs set state = 'queued', worker_id = null, lease_expires_at = null,
             error_kind = 'system', error = 'the worker stopped answering; resuming from the last checkpoint'
         where state = 'running' and lease_expires_at < now() and attempt < max_attempts",
    )
    .execute(db)
    .await?
    .rows_affected();
    sqlx::query(
        "update jobs set state = 'failed', finished_at = now(), error_kind = 'system',
             error = 'the worker stopped answering and no attempts remain'
         where state = 'running' and lease_expires_at < now() and attempt >= max_attempts",
    )
    .execute(db)
    .await?;
    Ok(requeued)
}

/// Move a running attempt to a final state. Fenced: `false` when the attempt is stale or the
/// job already ended (so racing cancel and completion end in exactly one state).
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    state: JobState,
    error: Option<(&str, &str)>,
    model_id: Option<Uuid>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "update jobs set state = $3, finished_at = now(), lease_expires_at = null,
             error_kind = $4, error = $5, model_id = coalesce($6, model_id),
             progress = case when $3 = 'succeeded' then 1 else progress end
         where id = $1 and attempt = $2 and state = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(state)
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
    .bind(model_id)
    .execute(db)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// A machine fault: retry later (from the last checkpoint) while attempts remain, else fail.
pub async fn retry_or_fail(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    error: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "update jobs set
             state = case when attempt < max_attempts and not cancel_requested then 'queued'
                          when cancel_requested then 'canceled' else 'failed' end,
             finished_at = case when attempt < max_attempts and not cancel_requested then null else now() end,
             run_after = now() + make_interval(secs => least(300, 5 * power(2, attempt - 1))::double precision),
             worker_id = null, lease_expires_at = null, error_kind = 'system', error = $3
         where id = $1 and attempt = $2 and state = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(error)
    .execute(db)
    .await?
    .rows_affected();
    Ok(done == 1)
}

const FENCE: &str =
    "exists (select 1 from jobs where id = $1 and attempt = $2 and state = 'running')";

/// Progress of a running attempt (fenced). Returns whether cancel was requested, `None` if fenced.
pub async fn progress(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    epoch: i32,
    step: i64,
    progress: f64,
    eta_s: Option<f64>,
) -> sqlx::Result<Option<bool>> {
    let row: Option<(bool,)> = sqlx::query_as(
        "update jobs set epoch = $3, step = $4, progress = $5, eta_s = $6
         where id = $1 and attempt = $2 and state = 'running' returning cancel_requested",
    )
    .bind(id)
    .bind(attempt)
    .bind(epoch)
    .bind(step)
    .bind(progress)
    .bind(eta_s)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Record where the newest checkpoint is (fenced).
pub async fn set_checkpoint(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    path: &str,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "update jobs set checkpoint = $3 where id = $1 and attempt = $2 and state = 'running'",
    )
    .bind(id)
    .bind(attempt)
    .bind(path)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The bytes the job's checkpoints take (fenced).
pub async fn set_checkpoint_bytes(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    bytes: i64,
) -> sqlx::Result<()> {
    sqlx::query("update jobs set checkpoint_bytes = $3 where id = $1 and attempt = $2")
        .bind(id)
        .bind(attempt)
        .bind(bytes)
        .execute(db)
        .await?;
    Ok(())
}

/// Record an epoch (fenced; an epoch already recorded by an earlier attempt stays). Returns
/// the rows written.
pub async fn insert_epoch(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    e: &EpochRecord<'_>,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(&format!(
        "insert into job_epochs (job_id, epoch, attempt, train_loss, train_accuracy, val, lr,
             clips_per_s, data_wait_share)
         select $1, $3, $2, $4, $5, $6, $7, $8, $9 where {FENCE}
         on conflict (job_id, epoch) do nothing"
    ))
    .bind(id)
    .bind(attempt)
    .bind(e.epoch as i32)
    .bind(e.train_loss)
    .bind(e.train_accuracy)
    .bind(Json(e.val))
    .bind(e.lr)
    .bind(e.clips_per_s)
    .bind(e.data_wait_share)
    .execute(db)
    .await?
    .rows_affected())
}

pub async fn insert_step(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    step: i64,
    epoch: i32,
    loss: f64,
    lr: f64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(&format!(
        "insert into job_steps (job_id, step, epoch, attempt, loss, lr)
         select $1, $3, $4, $2, $5, $6 where {FENCE}
         on conflict (job_id, step) do nothing"
    ))
    .bind(id)
    .bind(attempt)
    .bind(step)
    .bind(epoch)
    .bind(loss)
    .bind(lr)
    .execute(db)
    .await?
    .rows_affected())
}

/// An event of a running attempt (fenced: a stale attempt's events are dropped). Returns the
/// rows written.
pub async fn event(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    kind: &str,
    level: &str,
    message: &str,
    data: serde_json::Value,
) -> sqlx::Result<u64> {
    insert_event(db, id, attempt, kind, level, message, data, true).await
}

/// An event recorded whatever the job's state (queueing, retries, final states).
pub async fn event_unfenced(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    kind: &str,
    level: &str,
    message: &str,
    data: serde_json::Value,
) -> sqlx::Result<()> {
    insert_event(db, id, attempt, kind, level, message, data, false).await?;
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "the columns of one event row")]
async fn insert_event(
    db: impl PgExecutor<'_>,
    id: Uuid,
    attempt: i32,
    kind: &str,
    level: &str,
    message: &str,
    data: serde_json::Value,
    fenced: bool,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(&format!(
        "insert into job_events (job_id, attempt, kind, level, message, data)
         select $1, $2, $3, $4, $5, $6 where {}",
        if fenced { FENCE } else { "true" }
    ))
    .bind(id)
    .bind(attempt)
    .bind(kind)
    .bind(level)
    .bind(message)
    .bind(data)
    .execute(db)
    .await?
    .rows_affected())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EpochRow {
    pub epoch: i32,
    pub attempt: i32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val: Json<Metrics>,
    pub lr: f64,
    pub clips_per_s: f64,
    pub data_wait_share: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

pub async fn epochs(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Vec<EpochRow>> {
    sqlx::query_as(
        "select epoch, attempt, train_loss, train_accuracy, val, lr, clips_per_s, data_wait_share, created_at
         from job_epochs where job_id = $1 order by epoch",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// The newest epoch's metrics, if any.
pub async fn latest_epoch(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<EpochRow>> {
    sqlx::query_as(
        "select epoch, attempt, train_loss, train_accuracy, val, lr, clips_per_s, data_wait_share, created_at
         from job_epochs where job_id = $1 order by epoch desc limit 1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub step: i64,
    pub epoch: i32,
    pub loss: f64,
    pub lr: f64,
}

pub async fn steps(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Vec<StepRow>> {
    sqlx::query_as("select step, epoch, loss, lr from job_steps where job_id = $1 order by step")
        .bind(id)
        .fetch_all(db)
        .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub attempt: i32,
    pub kind: String,
    pub level: String,
    pub message: String,
    pub data: serde_json::Value,
}

pub async fn events_after(
    db: impl PgExecutor<'_>,
    id: Uuid,
    after: i64,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(
        "select id, at, attempt, kind, level, message, data from job_events
         where job_id = $1 and id > $2 order by id limit 1000",
    )
    .bind(id)
    .bind(after)
    .fetch_all(db)
    .await
}

/// How many jobs are in each state, every state listed (for `/metrics`).
pub async fn count_by_state(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(JobState, i64)>> {
    let rows: Vec<(JobState, i64)> =
        sqlx::query_as("select state, count(*) from jobs group by state")
            .fetch_all(db)
            .await?;
    Ok(JobState::ALL
        .iter()
        .map(|s| (*s, rows.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n)))
        .collect())
}

/// A connection woken when a job is queued (`vidtune_jobs`), for idle workers. `None` when it
/// cannot be opened: callers then poll.
pub async fn listen_queue(db: &PgPool) -> Option<sqlx::postgres::PgListener> {
    listen(db, "vidtune_jobs").await
}

/// The connection woken when any job writes an event (`vidtune_job_events`). A process opens
/// one and fans it out to every event stream (see `jobs::events`): one connection held by a
/// LISTEN, however many clients watch.
pub struct EventListener(sqlx::postgres::PgListener);

impl EventListener {
    pub async fn connect(db: &PgPool) -> sqlx::Result<Self> {
        let mut l = sqlx::postgres::PgListener::connect_with(db).await?;
        l.listen("vidtune_job_events").await?;
        Ok(Self(l))
    }

    /// The next job that wrote an event; `None` for a notification that names no job. An error
    /// means the connection was lost (notifications may have been missed meanwhile); the next
    /// call reconnects.
    pub async fn recv(&mut self) -> sqlx::Result<Option<Uuid>> {
        let n = self.0.recv().await?;
        Ok(n.payload().parse().ok())
    }
}

async fn listen(db: &PgPool, channel: &str) -> Option<sqlx::postgres::PgListener> {
    let mut l = sqlx::postgres::PgListener::connect_with(db).await.ok()?;
    l.listen(channel).await.ok()?;
    Some(l)
}
