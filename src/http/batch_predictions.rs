//! Batch predictions: a model over every accepted video of a dataset, in the background, read
//! straight from the dataset's training cache; results as JSON or CSV.
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Routes};
use crate::ingest::DatasetDirs;
use crate::serve::{ModelHandle, Stats};
use crate::train::data;

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchCreate {
    dataset_id: Uuid,
    /// Only this split (`train`, `val`, `test`); all accepted videos when omitted.
    split: Option<String>,
    clips: Option<u32>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Batch {
    id: Uuid,
    model_id: Uuid,
    dataset_id: Uuid,
    split: Option<String>,
    clips: i32,
    state: String,
    error: Option<String>,
    total: i32,
    done: i32,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    finished_at: Option<OffsetDateTime>,
}

async fn batch_prediction_create(
    State(s): State<AppState>,
    caller: Caller,
    Path(model_id): Path<Uuid>,
    Json(body): Json<BatchCreate>,
) -> ApiResult<Response> {
    let model = super::models::fetch_meta(&s, &caller, model_id).await?;
    if let Some(split) = &body.split
        && !["train", "val", "test"].contains(&split.as_str())
    {
        return Err(ApiError::validation("split", "train, val or test"));
    }
    let clips = body.clips.unwrap_or(model.0.eval_clips);
    if !(1..=32).contains(&clips) {
        return Err(ApiError::validation("clips", "between 1 and 32"));
    }
    let dataset = crate::db::datasets::get(&s.db, caller.tenant_id, body.dataset_id)
        .await?
        .ok_or_else(|| ApiError::validation("dataset_id", "no such dataset"))?;
    if dataset.status != crate::db::datasets::DatasetStatus::Ready {
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
    let wanted = (
        Some(model.0.decode.short_side as u64),
        Some(model.0.decode.fps),
    );
    if cached != wanted {
        return Err(ApiError::validation(
            "dataset_id",
            format!(
                "the dataset is cached at {:?} (short side, fps); this model needs {:?}",
                cached, wanted
            ),
        ));
    }
    let videos: Vec<_> = crate::db::datasets::dataset_videos(&s.db, body.dataset_id)
        .await?
        .into_iter()
        .filter(|v| {
            v.status == crate::db::videos::VideoStatus::Accepted
                && (body.split.is_none() || v.split.map(|s| s.as_str()) == body.split.as_deref())
        })
        .collect();
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into batch_predictions (id, tenant_id, model_id, dataset_id, split, clips, total)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(caller.tenant_id)
    .bind(model_id)
    .bind(body.dataset_id)
    .bind(&body.split)
    .bind(clips as i32)
    .bind(videos.len() as i32)
    .execute(&s.db)
    .await?;

    let handle = s
        .models
        .get(model.0.clone())
        .await
        .map_err(ApiError::internal)?;
    let (db, stats, dirs) = (
        s.db.clone(),
        s.models.stats.clone(),
        DatasetDirs::new(&s.settings.data_dir, body.dataset_id),
    );
    let deadline = s.models.config().deadline;
    let stride = model.1;
    tokio::spawn(async move {
        let outcome = run(
            &db, id, &handle, &stats, &dirs, videos, clips, stride, deadline,
        )
        .await;
        let (state, error) = match outcome {
            Ok(()) => ("succeeded", None),
            // The cause may name server paths or driver internals: it goes to the log, the
            // answer gets a stable sentence that the batch id finds there.
            Err(e) => {
                tracing::error!(batch_prediction = %id, error.cause_chain = ?e, "batch prediction failed");
                (
                    "failed",
                    Some("an internal error stopped this batch prediction; the server log has the details under its id".to_owned()),
                )
            }
        };
        let _ = sqlx::query("update batch_predictions set state = $2, error = $3, finished_at = now() where id = $1")
            .bind(id)
            .bind(state)
            .bind(error)
            .execute(&db)
            .await;
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/batch-predictions/{id}"))],
        AuditResource(id),
        Json(json!({ "id": id, "state": "running", "total": 0 })),
    )
        .into_response())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    db: &sqlx::PgPool,
    id: Uuid,
    handle: &Arc<ModelHandle>,
    stats: &Stats,
    dirs: &DatasetDirs,
    videos: Vec<crate::db::datasets::Video>,
    clips: u32,
    stride: u32,
    deadline: std::time::Duration,
) -> anyhow::Result<()> {
    let meta = &handle.meta;
    let spec = crate::serve::clip_spec(meta, stride);
    for v in videos {
        let cache = dirs.cache_file(v.id);
        let total = v.cache_frames.unwrap_or(1).max(1) as u32;
        let hw = (
            v.cache_height.unwrap_or(128) as i64,
            v.cache_width.unwrap_or(171) as i64,
        );
        let plans: Vec<_> = (0..clips)
            .map(|c| data::eval_plan(0, total, &spec, hw, c, clips))
            .collect();
        let (spec_b, prep) = (spec.clone(), meta.preprocessing.clone());
        let input = tokio::task::spawn_blocking(move || {
            crate::serve::read_input(&cache, &plans, &spec_b, &prep)
        })
        .await??;
        let probs = handle
            .infer(input, deadline, stats)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&probs)?;
        let p = crate::serve::mean_probs(&rows);
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0);
        let probabilities: serde_json::Map<String, Value> = meta
            .classes
            .iter()
            .zip(&p)
            .map(|(c, x)| (c.clone(), json!(x)))
            .collect();
        let mut tx = db.begin().await?;
        sqlx::query(
            "insert into batch_prediction_results (batch_id, video_id, path, truth, predicted, probability, probabilities)
             values ($1, $2, $3, $4, $5, $6, $7) on conflict do nothing",
        )
        .bind(id)
        .bind(v.id)
        .bind(&v.path)
        .bind(&v.label)
        .bind(&meta.classes[best])
        .bind(p[best])
        .bind(Value::Object(probabilities))
        .execute(&mut *tx)
        .await?;
        sqlx::query("update batch_predictions set done = done + 1 where id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewQuery {
    format: Option<String>,
}

#[derive(Serialize, sqlx::FromRow)]
struct ResultRow {
    video_id: Uuid,
    path: String,
    truth: Option<String>,
    predicted: String,
    probability: f64,
    probabilities: Value,
}

async fn batch_prediction_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<ViewQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let batch: Batch = sqlx::query_as(
        "select id, model_id, dataset_id, split, clips, state, error, total, done, created_at, finished_at
         from batch_predictions where tenant_id = $1 and id = $2",
    )
    .bind(caller.tenant_id)
    .bind(id)
    .fetch_optional(&s.db)
    .await?
    .ok_or_else(|| ApiError::not_found("batch prediction"))?;
    let results: Vec<ResultRow> = sqlx::query_as(
        "select video_id, path, truth, predicted, probability, probabilities
         from batch_prediction_results where batch_id = $1 order by path",
    )
    .bind(id)
    .fetch_all(&s.db)
    .await?;
    if let Some(f) = q.format.as_deref()
        && f != "json"
        && f != "csv"
    {
        return Err(ApiError::validation("format", "json or csv"));
    }
    let csv = q.format.as_deref() == Some("csv")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"));
    if csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["video_id", "path", "truth", "predicted", "probability"])
            .map_err(|e| ApiError::internal(e.into()))?;
        for r in &results {
            w.write_record([
                r.video_id.to_string(),
                r.path.clone(),
                r.truth.clone().unwrap_or_default(),
                r.predicted.clone(),
                r.probability.to_string(),
            ])
            .map_err(|e| ApiError::internal(e.into()))?;
        }
        let body = w
            .into_inner()
            .map_err(|e| ApiError::internal(anyhow::anyhow!("{e}")))?;
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response());
    }
    let labelled: Vec<&ResultRow> = results.iter().filter(|r| r.truth.is_some()).collect();
    let correct = labelled
        .iter()
        .filter(|r| r.truth.as_deref() == Some(r.predicted.as_str()))
        .count();
    let mut v = serde_json::to_value(&batch).expect("serialises");
    v["accuracy"] = if labelled.is_empty() {
        Value::Null
    } else {
        json!(correct as f64 / labelled.len() as f64)
    };
    v["results"] = serde_json::to_value(&results).expect("serialises");
    Ok(Json(v).into_response())
}
