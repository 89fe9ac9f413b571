//! The database side of a training attempt: [`load`] reads everything the attempt needs before
//! it starts, and [`PgLog`] writes what it reports, every write fenced by the attempt.
use anyhow::Context as _;
use sqlx::PgPool;
use tokio::runtime::Runtime;
use uuid::Uuid;

use crate::datadir::DataDir;
use crate::db::{self, jobs::JobState, videos::VideoStatus};
use crate::evaluation::EpochRecord;
use crate::registry::{self, BaseModel};
use crate::train::TrainError;
use crate::train::hyper::Hyperparameters;
use crate::train::run::{AttemptLog, Control, Job, Outcome, Pretrained, Progress, TrainedModel};
use crate::train::splits::{SplitVideo, Splits};

/// What the model row records besides what training produced.
pub struct Provenance {
    pub tenant_id: Uuid,
    pub dataset_id: Uuid,
    pub dataset_hash: Option<String>,
    pub base_model: String,
    /// As stored with the job.
    pub hyperparameters: serde_json::Value,
    pub base_weights_sha256: Option<String>,
}

fn system(e: sqlx::Error) -> TrainError {
    TrainError::System(e.into())
}

fn user(msg: String) -> TrainError {
    TrainError::User(msg)
}

/// Read the job, its dataset's splits and its base model.
pub async fn load(
    db: &PgPool,
    job_id: Uuid,
    attempt: i32,
    data: &DataDir,
) -> Result<(Job, Provenance), TrainError> {
    let job = db::jobs::get_any(db, job_id)
        .await
        .map_err(system)?
        .context("the job no longer exists")?;
    let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())
        .map_err(|e| user(format!("invalid hyperparameters: {e}")))?;
    let videos = db::datasets::dataset_videos(db, job.dataset_id)
        .await
        .map_err(system)?;
    let dataset_hash = db::datasets::content_hash(db, job.dataset_id)
        .await
        .map_err(system)?;
    let dirs = data.dataset(job.dataset_id);
    let splits = Splits::new(
        videos
            .into_iter()
            .filter(|v| v.status == VideoStatus::Accepted)
            .map(|v| SplitVideo {
                cache: dirs.cache_file(v.id),
                frames: v.cache_frames.unwrap_or(0).max(1) as u32,
                hw: (
                    v.cache_height.unwrap_or(128) as i64,
                    v.cache_width.unwrap_or(171) as i64,
                ),
                split: v.split,
                label: v.label,
            })
            .collect(),
    )?;
    let base_model = registry::resolve(db, job.tenant_id, &job.base_model)
        .await
        .map_err(system)?
        .ok_or_else(|| user(format!("base model `{}` no longer exists", job.base_model)))?;
    let pretrained = match &base_model {
        BaseModel::Builtin(arch) => db::base_models::latest_weights_of(db, arch.name())
            .await
            .map_err(system)?
            .map(|w| Pretrained {
                path: data.resolve(&w.path),
                sha256: w.sha256,
            }),
        BaseModel::Custom(_) => None,
    };
    let (base, prep) = (base_model.base(data), base_model.preprocessing()?);
    let provenance = Provenance {
        tenant_id: job.tenant_id,
        dataset_id: job.dataset_id,
        dataset_hash,
        base_model: job.base_model.clone(),
        hyperparameters: job.hyperparameters,
        base_weights_sha256: pretrained.as_ref().map(|w| w.sha256.clone()),
    };
    let job = Job {
        id: job.id,
        attempt,
        base_model: job.base_model,
        hp,
        base,
        prep,
        pretrained,
        splits,
        checkpoint: job.checkpoint,
    };
    Ok((job, provenance))
}

/// The attempt's reports as rows in Postgres.
pub struct PgLog<'a> {
    pub db: &'a PgPool,
    pub rt: &'a Runtime,
    pub job_id: Uuid,
    pub attempt: i32,
    pub provenance: Provenance,
}

fn json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("serialises")
}

impl AttemptLog for PgLog<'_> {
    fn progress(&mut self, p: Progress) -> anyhow::Result<Control> {
        let cancel = self.rt.block_on(db::jobs::progress(
            self.db,
            self.job_id,
            self.attempt,
            p.epoch as i32,
            p.step,
            p.fraction,
            Some(p.eta_s),
        ))?;
        Ok(match cancel {
            None => Control::FencedOut,
            Some(true) => Control::CancelRequested,
            Some(false) => Control::Continue,
        })
    }

    fn step(&mut self, step: i64, epoch: u32, loss: f64, lr: f64) -> anyhow::Result<()> {
        self.rt.block_on(db::jobs::insert_step(
            self.db,
            self.job_id,
            self.attempt,
            step,
            epoch as i32,
            loss,
            lr,
        ))?;
        Ok(())
    }

    fn epoch(&mut self, e: &EpochRecord) -> anyhow::Result<u64> {
        Ok(self.rt.block_on(db::jobs::insert_epoch(
            self.db,
            self.job_id,
            self.attempt,
            e,
        ))?)
    }

    fn event(
        &mut self,
        kind: &str,
        level: &str,
        message: &str,
        data: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.rt.block_on(db::jobs::event(
            self.db,
            self.job_id,
            self.attempt,
            kind,
            level,
            message,
            data,
        ))?;
        Ok(())
    }

    fn checkpoint(&mut self, path: &str) -> anyhow::Result<bool> {
        Ok(self.rt.block_on(db::jobs::set_checkpoint(
            self.db,
            self.job_id,
            self.attempt,
            path,
        ))?)
    }

    fn checkpoint_bytes(&mut self, bytes: u64) -> anyhow::Result<()> {
        self.rt.block_on(db::jobs::set_checkpoint_bytes(
            self.db,
            self.job_id,
            self.attempt,
            bytes as i64,
        ))?;
        Ok(())
    }

    /// The model row and the job's `succeeded` state in one transaction, committed only
    /// while the attempt still holds the job.
    fn finish(&mut self, m: &TrainedModel) -> anyhow::Result<bool> {
        let p = &self.provenance;
        let path = m.path.to_string_lossy();
        let row = db::models::NewModel {
            id: m.id,
            tenant_id: p.tenant_id,
            job_id: self.job_id,
            dataset_id: p.dataset_id,
            dataset_hash: p.dataset_hash.as_deref(),
            base_model: &p.base_model,
            base_weights_sha256: p.base_weights_sha256.as_deref(),
            hyperparameters: &p.hyperparameters,
            classes: m.classes,
            preprocessing: json(m.preprocessing),
            head: json(m.head),
            eval_clips: m.eval_clips as i32,
            val_metrics: m.val,
            test_metrics: m.test,
            vidtune_version: env!("CARGO_PKG_VERSION"),
            libtorch_version: env!("VIDTUNE_LIBTORCH_VERSION"),
            path: &path,
            bytes: m.bytes as i64,
        };
        let committed = self.rt.block_on(async {
            let mut tx = self.db.begin().await?;
            db::models::insert(&mut *tx, &row).await?;
            let ours = db::jobs::finish(
                &mut *tx,
                self.job_id,
                self.attempt,
                JobState::Succeeded,
                None,
                Some(m.id),
            )
            .await?;
            if ours {
                tx.commit().await?;
            }
            Ok::<bool, sqlx::Error>(ours)
        })?;
        Ok(committed)
    }
}

/// Record how an attempt ended: its final state (fenced, so a stale attempt changes nothing)
/// and the event that tells watchers. `false` for a machine fault, which the worker retries.
pub async fn conclude(
    db: &PgPool,
    job: Uuid,
    attempt: i32,
    outcome: Result<Outcome, TrainError>,
) -> bool {
    let note = |state: JobState, level: &'static str, msg: String| async move {
        let data = serde_json::json!({ "state": state });
        let _ = db::jobs::event_unfenced(db, job, attempt, "state", level, &msg, data).await;
    };
    let finish = |state: JobState, error: Option<(&'static str, String)>| async move {
        let error = error.as_ref().map(|(k, m)| (*k, m.as_str()));
        db::jobs::finish(db, job, attempt, state, error, None)
            .await
            .unwrap_or(false)
    };
    match outcome {
        Ok(Outcome::Succeeded(model)) => {
            note(
                JobState::Succeeded,
                "info",
                format!("succeeded; model {model}"),
            )
            .await;
        }
        Ok(Outcome::Canceled) => {
            if finish(JobState::Canceled, None).await {
                note(JobState::Canceled, "info", "canceled".into()).await;
            }
        }
        Ok(Outcome::FencedOut) => {}
        Err(TrainError::User(msg)) => {
            if finish(JobState::Failed, Some(("user", msg.clone()))).await {
                note(JobState::Failed, "error", msg).await;
            }
        }
        Err(TrainError::System(e)) => {
            tracing::error!(error = %format!("{e:#}"), "training failed");
            return false;
        }
    }
    true
}
