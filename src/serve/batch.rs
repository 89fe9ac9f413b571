//! Batch predictions: a model over the accepted videos of a dataset, in the background, read
//! straight from the dataset's training cache (decoded as the model was trained), each result
//! stored as it comes.
use std::path::PathBuf;
use std::sync::Arc;

use sqlx::PgPool;
use uuid::Uuid;

use super::{ModelCache, ModelHandle, classify};
use crate::db;
use crate::db::batch_predictions::{BatchState, NewResult};

/// One video of a batch and where its decoded frames are.
#[derive(Debug, Clone)]
pub struct BatchVideo {
    pub video: db::datasets::Video,
    /// The video's file in the dataset's training cache.
    pub cache: PathBuf,
}

/// What a failed batch shows its tenant. The cause may name server paths or driver internals:
/// it goes to the log, under the batch's id.
const FAILED: &str = "an internal error stopped this batch prediction; the server log has the \
                      details under its id";

/// Run batch prediction `id` over `videos` with `clips` clips each, then record how it ended.
pub async fn run_batch(
    db: PgPool,
    models: Arc<ModelCache>,
    handle: Arc<ModelHandle>,
    id: Uuid,
    videos: Vec<BatchVideo>,
    clips: u32,
) {
    let (state, error) = match predict_all(&db, &models, &handle, id, videos, clips).await {
        Ok(()) => (BatchState::Succeeded, None),
        Err(e) => {
            tracing::error!(batch_prediction = %id, error.cause_chain = ?e, "batch prediction failed");
            (BatchState::Failed, Some(FAILED))
        }
    };
    if let Err(e) = db::batch_predictions::finish(&db, id, state, error).await {
        tracing::warn!(batch_prediction = %id, error = %e, "could not record the batch's end");
    }
}

async fn predict_all(
    db: &PgPool,
    models: &ModelCache,
    handle: &ModelHandle,
    id: Uuid,
    videos: Vec<BatchVideo>,
    clips: u32,
) -> anyhow::Result<()> {
    for BatchVideo { video: v, cache } in videos {
        // A row without cache geometry reads as the training cache's usual size.
        let frames = v.cache_frames.unwrap_or(1).max(1) as u32;
        let hw = (
            v.cache_height.unwrap_or(128) as i64,
            v.cache_width.unwrap_or(171) as i64,
        );
        let c = classify(models, handle, &cache, frames, hw, clips).await?;
        let result = NewResult {
            video_id: v.id,
            path: &v.path,
            truth: v.label.as_deref(),
            predicted: &c.label,
            probability: c.probability,
            probabilities: &c.probabilities,
        };
        db::batch_predictions::record_result(db, id, &result).await?;
    }
    Ok(())
}
