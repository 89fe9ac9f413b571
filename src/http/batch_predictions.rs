//! Batch predictions: a model over every accepted video of a dataset, in the background, read
//! straight from the dataset's training cache; results as JSON or CSV.
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query, csv_response};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Format, Routes};
use crate::db;
use crate::db::batch_predictions::{Batch, BatchResult, NewBatch};
use crate::db::datasets::DatasetStatus;
use crate::db::videos::Split;
use crate::serve::{self, ModelMeta};

pub fn routes(r: Routes) -> Routes {
    use Access::Tenant;
    r.op(
        Method::POST,
        "/v1/models/{model_id}/batch-predictions",
        "batch_prediction_create",
        Tenant,
        batch_prediction_create,
    )
    .op(
        Method::GET,
        "/v1/batch-predictions/{batch_id}",
        "batch_prediction_view",
        Tenant,
        batch_prediction_view,
    )
    .op(
        Method::POST,
        "/v1/batch-predictions/{batch_id}/cancel",
        "batch_prediction_cancel",
        Tenant,
        batch_prediction_cancel,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchCreate {
    dataset_id: Uuid,
    /// Only this split (`train`, `val`, `test`); all accepted videos when omitted.
    split: Option<String>,
    clips: Option<u32>,
}

async fn batch_prediction_create(
    State(s): State<AppState>,
    caller: Caller,
    Path(model_id): Path<Uuid>,
    Json(body): Json<BatchCreate>,
) -> ApiResult<Response> {
    let model = db::models::get(&s.db, caller.tenant_id, model_id)
        .await?
        .ok_or_else(|| ApiError::not_found("model"))?;
    let meta = serve::model_meta(&s.db, &s.data, caller.tenant_id, &model).await?;
    let split = match body.split.as_deref() {
        None => None,
        Some(name) => Some(
            Split::ALL
                .into_iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| ApiError::validation("split", "train, val or test"))?,
        ),
    };
    let clips = body.clips.unwrap_or(meta.eval_clips);
    if !(1..=32).contains(&clips) {
        return Err(ApiError::validation("clips", "between 1 and 32"));
    }
    let videos = dataset_videos(&s, &caller, body.dataset_id, split, &meta).await?;
    let new = NewBatch {
        id: Uuid::new_v4(),
        tenant_id: caller.tenant_id,
        model_id,
        dataset_id: body.dataset_id,
        split: split.map(Split::as_str),
        clips: clips as i32,
        total: videos.len() as i32,
    };
    let batch = s.batches.start(&new).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(
            header::LOCATION,
            format!("/v1/batch-predictions/{}", batch.id),
        )],
        AuditResource(batch.id),
        Json(batch),
    )
        .into_response())
}

/// The videos of the requested dataset (and split) that a batch prediction with the model
/// `meta` runs over: the accepted ones, read from a cache decoded as the model was trained.
async fn dataset_videos(
    s: &AppState,
    caller: &Caller,
    dataset_id: Uuid,
    split: Option<Split>,
    meta: &ModelMeta,
) -> ApiResult<Vec<db::datasets::Video>> {
    let dataset = db::datasets::get(&s.db, caller.tenant_id, dataset_id)
        .await?
        .ok_or_else(|| ApiError::validation("dataset_id", "no such dataset"))?;
    if dataset.status != DatasetStatus::Ready {
        return Err(ApiError::conflict(format!(
            "the dataset is `{}`",
            dataset.status
        )));
    }
    // The cache holds frames decoded at the dataset's rate and size; the model must see what it
    // was trained on.
    let cached = (
        dataset.cache_spec["short_side"].as_u64(),
        dataset.cache_spec["fps"].as_f64(),
    );
    let wanted = (Some(meta.decode.short_side as u64), Some(meta.decode.fps));
    if cached != wanted {
        return Err(ApiError::validation(
            "dataset_id",
            format!(
                "the dataset is cached at {:?} (short side, fps); this model needs {:?}",
                cached, wanted
            ),
        ));
    }
    Ok(serve::batch_videos(&s.db, dataset_id, split).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewQuery {
    format: Option<String>,
}

/// A batch prediction with its results so far.
#[derive(Serialize)]
struct BatchView<'a> {
    #[serde(flatten)]
    batch: &'a Batch,
    /// Share of the labelled videos predicted right; `null` without labelled videos.
    accuracy: Option<f64>,
    results: &'a [BatchResult],
}

async fn batch_prediction_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<ViewQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let batch = db::batch_predictions::get(&s.db, caller.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch prediction"))?;
    let results = db::batch_predictions::results(&s.db, id).await?;
    if Format::negotiate(q.format.as_deref(), &headers)? == Format::Csv {
        return Ok(csv_response(to_csv(&results).map_err(ApiError::internal)?));
    }
    let labelled: Vec<&BatchResult> = results.iter().filter(|r| r.truth.is_some()).collect();
    let correct = labelled
        .iter()
        .filter(|r| r.truth.as_deref() == Some(r.predicted.as_str()))
        .count();
    let view = BatchView {
        batch: &batch,
        accuracy: (!labelled.is_empty()).then(|| correct as f64 / labelled.len() as f64),
        results: &results,
    };
    // Through a JSON value: its keys are sorted, the order this answer has always had.
    Ok(Json(serde_json::to_value(view).map_err(|e| ApiError::internal(e.into()))?).into_response())
}

/// Stop a running batch before its next video (the results so far stay); a finished one is
/// returned as it is.
async fn batch_prediction_cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Batch>> {
    db::batch_predictions::cancel(&s.db, caller.tenant_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("batch prediction"))
}

fn to_csv(results: &[BatchResult]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["video_id", "path", "truth", "predicted", "probability"])?;
    for r in results {
        w.write_record([
            r.video_id.to_string(),
            r.path.clone(),
            r.truth.clone().unwrap_or_default(),
            r.predicted.clone(),
            r.probability.to_string(),
        ])?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
}
