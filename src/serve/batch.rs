//! Batch predictions: a model over the accepted videos of a dataset, in the background, read
//! straight from the dataset's training cache (decoded as the model was trained), each result
//! stored as it comes.
//!
//! A batch outlives the process that started it. The process running it holds a lease in its
//! row and renews it every [`HEARTBEAT`]; every server looks for batches whose lease ran out
//! (their process died) at start-up and every [`RESCUE`], claims them, and predicts the videos
//! that have no result yet. Results are idempotent (one per video), so a video predicted twice
//! around a takeover is stored and counted once.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ModelCache, ModelHandle, classify, model_meta};
use crate::datadir::DataDir;
use crate::db;
use crate::db::batch_predictions::{Batch, BatchState, Claimed, NewBatch, NewResult};
use crate::db::videos::{Split, VideoStatus};

/// How long a batch stays its process's without a renewal.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often the running process renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a server looks for batches whose process died.
pub const RESCUE: Duration = Duration::from_secs(30);

/// What a failed batch shows its tenant. The cause may name server paths or driver internals:
/// it goes to the log, under the batch's id.
const FAILED: &str = "an internal error stopped this batch prediction; the server log has the \
                      details under its id";

/// The accepted videos of `dataset_id` (only those of `split`, when given): what a batch
/// prediction over it predicts.
pub async fn batch_videos(
    db: &PgPool,
    dataset_id: Uuid,
    split: Option<Split>,
) -> sqlx::Result<Vec<db::datasets::Video>> {
    Ok(db::datasets::dataset_videos(db, dataset_id)
        .await?
        .into_iter()
        .filter(|v| v.status == VideoStatus::Accepted && (split.is_none() || v.split == split))
        .collect())
}

/// Runs this process's batch predictions and takes over those of processes that died.
pub struct BatchRunner {
    db: PgPool,
    data: DataDir,
    models: Arc<ModelCache>,
    /// This process, as the owner of the leases it holds.
    owner: Uuid,
}

impl BatchRunner {
    pub fn new(db: PgPool, data: DataDir, models: Arc<ModelCache>) -> Self {
        Self {
            db,
            data,
            models,
            owner: Uuid::new_v4(),
        }
    }

    /// Store batch `new` leased to this process and start it; returns it as stored (its
    /// `total` already counted).
    pub async fn start(self: &Arc<Self>, new: &NewBatch<'_>) -> sqlx::Result<Batch> {
        let batch = db::batch_predictions::insert(&self.db, new, self.owner, LEASE).await?;
        let claimed = Claimed {
            id: new.id,
            tenant_id: new.tenant_id,
            model_id: new.model_id,
            dataset_id: new.dataset_id,
            split: new.split.map(str::to_owned),
            clips: new.clips,
        };
        tokio::spawn(self.clone().run(claimed));
        Ok(batch)
    }

    /// Claim and resume abandoned batches now and every [`RESCUE`]; runs until the process
    /// ends.
    pub async fn rescue(self: Arc<Self>) {
        loop {
            match db::batch_predictions::claim_abandoned(&self.db, self.owner, LEASE, 16).await {
                Ok(claimed) => {
                    for c in claimed {
                        tracing::info!(batch_prediction = %c.id, "resuming an abandoned batch prediction");
                        tokio::spawn(self.clone().run(c));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for abandoned batch predictions")
                }
            }
            tokio::time::sleep(RESCUE).await;
        }
    }

    /// Run a batch this process holds the lease of, renewing the lease meanwhile; stop when the
    /// lease is lost (canceled, or taken over), else record how it ended.
    async fn run(self: Arc<Self>, c: Claimed) {
        let id = c.id;
        let heartbeat = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                match db::batch_predictions::renew(&self.db, id, self.owner, LEASE).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    // A database hiccup: the lease has time left to try again.
                    Err(e) => {
                        tracing::warn!(batch_prediction = %id, error = %e, "could not renew a batch's lease")
                    }
                }
            }
        };
        let outcome = tokio::select! {
            r = self.predict_remaining(&c) => r,
            () = heartbeat => {
                tracing::info!(batch_prediction = %id, "batch prediction stopped: canceled or taken over");
                return;
            }
        };
        let (state, error) = match outcome {
            Ok(()) => (BatchState::Succeeded, None),
            Err(e) => {
                tracing::error!(batch_prediction = %id, error.cause_chain = ?e, "batch prediction failed");
                (BatchState::Failed, Some(FAILED))
            }
        };
        if let Err(e) = db::batch_predictions::finish(&self.db, id, self.owner, state, error).await
        {
            tracing::warn!(batch_prediction = %id, error = %e, "could not record the batch's end");
        }
    }

    /// Predict the batch's videos that have no result yet.
    async fn predict_remaining(&self, c: &Claimed) -> anyhow::Result<()> {
        let model = db::models::get(&self.db, c.tenant_id, c.model_id)
            .await?
            .context("the batch's model is gone")?;
        let meta = model_meta(&self.db, &self.data, c.tenant_id, &model).await?;
        let handle = self.models.get(meta).await?;
        let split = c.split.as_deref().and_then(Split::parse);
        let done: HashSet<Uuid> = db::batch_predictions::done_videos(&self.db, c.id)
            .await?
            .into_iter()
            .collect();
        let dirs = self.data.dataset(c.dataset_id);
        for v in batch_videos(&self.db, c.dataset_id, split).await? {
            if done.contains(&v.id) {
                continue;
            }
            // Canceled between two videos: stop (the heartbeat would, within its period).
            if !db::batch_predictions::renew(&self.db, c.id, self.owner, LEASE).await? {
                return Ok(());
            }
            self.predict_one(&handle, c, &v, &dirs.cache_file(v.id))
                .await?;
        }
        Ok(())
    }

    async fn predict_one(
        &self,
        handle: &ModelHandle,
        c: &Claimed,
        v: &db::datasets::Video,
        cache: &std::path::Path,
    ) -> anyhow::Result<()> {
        // A row without cache geometry reads as the training cache's usual size.
        let frames = v.cache_frames.unwrap_or(1).max(1) as u32;
        let hw = (
            v.cache_height.unwrap_or(128) as i64,
            v.cache_width.unwrap_or(171) as i64,
        );
        let clips = c.clips.max(1) as u32;
        let p = classify(&self.models, handle, cache, frames, hw, clips).await?;
        let result = NewResult {
            video_id: v.id,
            path: &v.path,
            truth: v.label.as_deref(),
            predicted: &p.label,
            probability: p.probability,
            probabilities: &p.probabilities,
        };
        db::batch_predictions::record_result(&self.db, c.id, &result).await?;
        Ok(())
    }
}
