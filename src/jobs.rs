//! Fine-tuning jobs as the API offers them: a request checked and queued (idempotently), and
//! cancellation. The queue itself (claims, leases, fenced writes) is [`db::jobs`]; running an
//! attempt is `worker` and `train`.
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::backbone::Freeze;
use crate::db::{
    self,
    jobs::{Job, JobState},
};
use crate::device::DeviceRequest;
use crate::registry;
use crate::train::hyper::Hyperparameters;

/// A job as submitted. Its serialisation is what an `Idempotency-Key` replay is compared
/// against, so the field order is part of the contract.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub dataset_id: Uuid,
    pub base_model: String,
    #[serde(default)]
    pub hyperparameters: Value,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "default_attempts")]
    pub max_attempts: i32,
}

fn default_attempts() -> i32 {
    3
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A field is out of range or names nothing (the field as the API names it).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The request is well formed but cannot be taken now (a dataset still processing, an
    /// idempotency key reused for another request).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SubmitError {
    SubmitError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A queued job, or the one an earlier request with the same idempotency key queued.
#[derive(Debug)]
pub struct Submitted {
    pub job: Job,
    pub replayed: bool,
}

/// Check `req` and queue it for `tenant_id`. With an `idempotency_key`, a retry of the same
/// request returns the job the first one queued, and a different request under that key is a
/// conflict.
pub async fn submit(
    db: &PgPool,
    tenant_id: Uuid,
    req: &JobRequest,
    idempotency_key: Option<&str>,
) -> Result<Submitted, SubmitError> {
    let request_hash = hex::encode(Sha256::digest(serde_json::to_vec(req).expect("serialises")));
    if let Some(k) = idempotency_key
        && let Some(existing) = db::jobs::by_idempotency_key(db, tenant_id, k).await?
    {
        return replay(existing, &request_hash);
    }
    let hp = hyperparameters(&req.hyperparameters)?;
    if !(0..=1000).contains(&req.priority) {
        return Err(invalid("priority", "between 0 and 1000"));
    }
    if !(1..=10).contains(&req.max_attempts) {
        return Err(invalid("max_attempts", "between 1 and 10"));
    }
    let base = registry::resolve(db, tenant_id, &req.base_model)
        .await?
        .ok_or_else(|| invalid("base_model", "no such base model (see GET /v1/base-models)"))?;
    let stages = base.stage_count();
    if let Freeze::LastStages { stages: k } = hp.freeze
        && (k == 0 || k > stages)
    {
        return Err(invalid(
            "hyperparameters.freeze.stages",
            format!("between 1 and {stages} for {}", req.base_model),
        ));
    }
    let dataset = db::datasets::get(db, tenant_id, req.dataset_id)
        .await?
        .ok_or_else(|| invalid("dataset_id", "no such dataset"))?;
    if dataset.status != "ready" {
        return Err(SubmitError::Conflict(format!(
            "the dataset is `{}`; jobs need a ready dataset",
            dataset.status
        )));
    }
    let device = DeviceRequest::parse(&hp.device)
        .ok_or_else(|| invalid("hyperparameters.device", "auto, cpu, cuda or cuda:N"))?;
    // The job and its `queued` event become visible together, so a worker that claims it at
    // once cannot log `running` before `queued`.
    let mut tx = db.begin().await?;
    let created = db::jobs::create(
        &mut *tx,
        &db::jobs::NewJob {
            tenant_id,
            dataset_id: req.dataset_id,
            base_model: &req.base_model,
            hyperparameters: serde_json::to_value(&hp).expect("serialises"),
            priority: req.priority,
            max_attempts: req.max_attempts,
            device_pref: &device.to_string(),
            epochs: hp.epochs as i32,
            idempotency_key,
            request_hash: &request_hash,
        },
    )
    .await;
    let job = match (created, idempotency_key) {
        (Ok(job), _) => job,
        (Err(sqlx::Error::Database(d)), Some(key)) if d.is_unique_violation() => {
            // A concurrent retry with the same key won the race.
            drop(tx);
            let existing = db::jobs::by_idempotency_key(db, tenant_id, key)
                .await?
                .ok_or_else(|| SubmitError::Conflict("Idempotency-Key in use".into()))?;
            return replay(existing, &request_hash);
        }
        (Err(e), _) => return Err(e.into()),
    };
    state_event(&mut *tx, &job, JobState::Queued).await?;
    tx.commit().await?;
    Ok(Submitted {
        job,
        replayed: false,
    })
}

/// The hyperparameters of a request, defaults filled in and checked.
fn hyperparameters(v: &Value) -> Result<Hyperparameters, SubmitError> {
    let v = if v.is_null() { json!({}) } else { v.clone() };
    let hp: Hyperparameters =
        serde_json::from_value(v).map_err(|e| invalid("hyperparameters", format!("{e}")))?;
    hp.validate()
        .map_err(|(field, msg)| invalid(format!("hyperparameters.{field}"), msg))?;
    Ok(hp)
}

/// The answer to a retried request: the job it queued, unless the key was reused for a
/// different request.
fn replay(existing: Job, request_hash: &str) -> Result<Submitted, SubmitError> {
    if existing.request_hash.as_deref() != Some(request_hash) {
        return Err(SubmitError::Conflict(
            "this Idempotency-Key was used for a different request".into(),
        ));
    }
    Ok(Submitted {
        job: existing,
        replayed: true,
    })
}

/// Ask a tenant's job to stop: a queued job is canceled at once, a running one stops within a
/// step (its attempt records the final state). `None`: no such job.
pub async fn cancel(db: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    let Some(job) = db::jobs::request_cancel(db, tenant_id, id).await? else {
        return Ok(None);
    };
    if job.state == JobState::Canceled {
        state_event(db, &job, JobState::Canceled).await?;
    }
    Ok(Some(job))
}

/// The event that tells a job's watchers it entered `state`.
async fn state_event(
    db: impl sqlx::PgExecutor<'_>,
    job: &Job,
    state: JobState,
) -> sqlx::Result<()> {
    db::jobs::event_unfenced(
        db,
        job.id,
        job.attempt,
        "state",
        "info",
        state.as_str(),
        json!({ "state": state }),
    )
    .await
}
