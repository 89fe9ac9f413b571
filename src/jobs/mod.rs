//! Fine-tuning jobs as the API offers them: a request checked and queued (idempotently),
//! cancellation, the job with its latest metrics, its history as CSV, and its charts
//! (`plots`). The queue itself (claims, leases, fenced writes) is [`db::jobs`]; running an
//! attempt is `worker` and `train`.
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::backbone::{Freeze, Preprocessing};
use crate::datadir::DataDir;
use crate::db::base_models::CustomBackbone;
use crate::db::datasets::DatasetStatus;
use crate::db::{
    self,
    jobs::{EpochRow, Job, JobState},
};
use crate::device::DeviceRequest;
use crate::quota;
use crate::registry::{self, BaseModel, ImportError};
use crate::train::hyper::Hyperparameters;

pub mod events;
pub mod plots;

pub use plots::{PlotRequest, plot};

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

/// Why a job operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A field is out of range or names nothing (the field as the API names it).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The request is well formed but cannot be served now (a dataset still processing, an
    /// idempotency key reused for another request, no epoch finished yet).
    #[error("{0}")]
    Conflict(String),
    /// What the request names does not exist (the kind of thing).
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The tenant's storage quota is used up.
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The server failed (logged, never sent).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl JobError {
    /// A field the API names is wrong.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        JobError::Invalid {
            field: field.into(),
            message: message.into(),
        }
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
    backbones: &Backbones<'_>,
    tenant_id: Uuid,
    req: &JobRequest,
    idempotency_key: Option<&str>,
) -> Result<Submitted, JobError> {
    let request_hash = hex::encode(Sha256::digest(serde_json::to_vec(req).expect("serialises")));
    if let Some(k) = idempotency_key
        && let Some(existing) = db::jobs::by_idempotency_key(db, tenant_id, k).await?
    {
        return replay(existing, &request_hash);
    }
    let hp = hyperparameters(&req.hyperparameters)?;
    // A job writes checkpoints and a model: none is queued for a tenant with no room left.
    quota::room(db, backbones.tenant_quota_bytes, tenant_id).await?;
    if !(0..=1000).contains(&req.priority) {
        return Err(JobError::invalid("priority", "between 0 and 1000"));
    }
    if !(1..=10).contains(&req.max_attempts) {
        return Err(JobError::invalid("max_attempts", "between 1 and 10"));
    }
    let base = registry::resolve(db, tenant_id, &req.base_model)
        .await?
        .ok_or_else(|| {
            JobError::invalid("base_model", "no such base model (see GET /v1/base-models)")
        })?;
    let stages = base.stage_count();
    if let Freeze::LastStages { stages: k } = hp.freeze
        && (k == 0 || k > stages)
    {
        return Err(JobError::invalid(
            "hyperparameters.freeze.stages",
            format!("between 1 and {stages} for {}", req.base_model),
        ));
    }
    let dataset = db::datasets::get(db, tenant_id, req.dataset_id)
        .await?
        .ok_or_else(|| JobError::invalid("dataset_id", "no such dataset"))?;
    if dataset.status != DatasetStatus::Ready {
        return Err(JobError::Conflict(format!(
            "the dataset is `{}`; jobs need a ready dataset",
            dataset.status
        )));
    }
    // Last, as the one check that starts a process: trying a TorchScript backbone.
    if let BaseModel::Custom(b) = &base {
        backbone_fits(backbones, b, &base.preprocessing()?, &hp).await?;
    }
    let device = DeviceRequest::parse(&hp.device)
        .ok_or_else(|| JobError::invalid("hyperparameters.device", "auto, cpu, cuda or cuda:N"))?;
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
                .ok_or_else(|| JobError::Conflict("Idempotency-Key in use".into()))?;
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

/// The largest clip a submission tries a TorchScript backbone on (2 clips of float32).
const TRIAL_CLIP_BYTES: i64 = 256 << 20;

/// What a submission checks against: where registered TorchScript backbones live, how long
/// trying one may take, and the storage quota of a tenant without one of its own.
pub struct Backbones<'a> {
    pub data: &'a DataDir,
    pub inspect_timeout: Duration,
    pub tenant_quota_bytes: u64,
}

/// A TorchScript backbone was tried at registration on clips of its own size only. A job that
/// asks for other `frames` or `crop` tries it on one such clip now (in its sandbox), so a module
/// that cannot take them is refused here, naming the field, instead of failing in the queue.
async fn backbone_fits(
    backbones: &Backbones<'_>,
    b: &CustomBackbone,
    registered: &Preprocessing,
    hp: &Hyperparameters,
) -> Result<(), JobError> {
    let wanted = hp.preprocessing(registered);
    if (wanted.frames, wanted.crop) == (registered.frames, registered.crop) {
        return Ok(());
    }
    // The trial clip is allocated in this process: one trial at a time, and none for a clip
    // beyond the budget (the training process then checks the size itself, as a user error).
    let clip_bytes = 2 * 3 * 4 * wanted.frames * wanted.crop * wanted.crop;
    if clip_bytes > TRIAL_CLIP_BYTES {
        return Ok(());
    }
    static ONE_TRIAL_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let _turn = ONE_TRIAL_AT_A_TIME
        .acquire()
        .await
        .map_err(|e| JobError::Internal(e.into()))?;
    let field = if wanted.frames != registered.frames {
        "hyperparameters.frames"
    } else {
        "hyperparameters.crop"
    };
    let path = backbones.data.resolve(&b.path);
    let tried = registry::inspect_torchscript(&path, &wanted, backbones.inspect_timeout).await;
    let problem = match tried {
        Ok(i) if i.feature_dim == i64::from(b.feature_dim) => return Ok(()),
        Ok(i) => format!(
            "it returns {} features for these clips, {} at the size it was registered with",
            i.feature_dim, b.feature_dim
        ),
        Err(ImportError::Invalid(msg)) => msg,
        Err(e) => return Err(JobError::Internal(e.into())),
    };
    Err(JobError::invalid(
        field,
        format!(
            "the backbone `{}` does not take clips of {} frames at {}×{} (it was registered \
             with {} frames at {}×{}): {problem}",
            b.name,
            wanted.frames,
            wanted.crop,
            wanted.crop,
            registered.frames,
            registered.crop,
            registered.crop
        ),
    ))
}

/// The hyperparameters of a request, defaults filled in and checked.
fn hyperparameters(v: &Value) -> Result<Hyperparameters, JobError> {
    let v = if v.is_null() { json!({}) } else { v.clone() };
    let mut hp: Hyperparameters = serde_json::from_value(v)
        .map_err(|e| JobError::invalid("hyperparameters", format!("{e}")))?;
    hp.resolve_defaults();
    hp.validate()
        .map_err(|(field, msg)| JobError::invalid(format!("hyperparameters.{field}"), msg))?;
    Ok(hp)
}

/// The answer to a retried request: the job it queued, unless the key was reused for a
/// different request.
fn replay(existing: Job, request_hash: &str) -> Result<Submitted, JobError> {
    if existing.request_hash.as_deref() != Some(request_hash) {
        return Err(JobError::Conflict(
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

/// A job with its latest epoch's figures (`GET /v1/jobs/{id}`).
#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub latest_metrics: Option<LatestMetrics>,
}

/// The newest epoch's training and validation figures.
#[derive(Debug, Serialize)]
pub struct LatestMetrics {
    pub epoch: i32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_balanced_accuracy: f64,
    pub val_macro_f1: f64,
    pub val_macro_auc: Option<f64>,
}

/// A tenant's job with its latest epoch; `None`: no such job.
pub async fn view(db: &PgPool, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<JobView>> {
    let Some(job) = db::jobs::get(db, tenant_id, id).await? else {
        return Ok(None);
    };
    let latest_metrics = db::jobs::latest_epoch(db, id)
        .await?
        .map(|e| LatestMetrics {
            epoch: e.epoch,
            train_loss: e.train_loss,
            train_accuracy: e.train_accuracy,
            val_loss: e.val.loss,
            val_accuracy: e.val.accuracy,
            val_balanced_accuracy: e.val.balanced_accuracy,
            val_macro_f1: e.val.macro_f1,
            val_macro_auc: e.val.macro_auc,
        });
    Ok(Some(JobView {
        job,
        latest_metrics,
    }))
}

/// One CSV row per epoch, for spreadsheets (`GET /v1/jobs/{id}/metrics?format=csv`).
pub fn epochs_csv(epochs: &[EpochRow]) -> String {
    let mut out = String::from(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_balanced_accuracy,val_macro_f1,val_macro_auc,lr,clips_per_s,data_wait_share\n",
    );
    for e in epochs {
        let auc = e.val.macro_auc.map(|x| x.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            e.epoch,
            e.train_loss,
            e.train_accuracy,
            e.val.loss,
            e.val.accuracy,
            e.val.balanced_accuracy,
            e.val.macro_f1,
            auc,
            e.lr,
            e.clips_per_s,
            e.data_wait_share
        ));
    }
    out
}
