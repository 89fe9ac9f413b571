//! Trained models: the registry (list, view, delete, export) and predictions, with multi-clip
//! averaging as in evaluation and optional per-window timelines.
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::Tensor;
use time::OffsetDateTime;
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query};
use super::upload::{PartialFile, receive, verify_checksum};
use super::{Access, ApiError, ApiResult, AuditDetails, AuditResource, Caller, ErrorCode, Routes};
use crate::backbone::{Arch, export};
use crate::db;
use crate::media::worker::Job;
use crate::serve::{InferError, ModelMeta};
use crate::train::data::{self, Plan};

pub fn routes(r: Routes) -> Routes {
    use Access::Tenant;
    r.op(Method::GET, "/v1/models", "model_list", Tenant, model_list)
        .op(
            Method::GET,
            "/v1/models/{model_id}",
            "model_view",
            Tenant,
            model_view,
        )
        .op(
            Method::DELETE,
            "/v1/models/{model_id}",
            "model_delete",
            Tenant,
            model_delete,
        )
        .streaming_op(
            Method::GET,
            "/v1/models/{model_id}/export",
            "model_export",
            Tenant,
            model_export,
        )
        .streaming_op(
            Method::POST,
            "/v1/models/{model_id}/predict",
            "model_predict",
            Tenant,
            model_predict,
        )
}

/// A model with its lineage.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct ModelRow {
    id: Uuid,
    job_id: Uuid,
    dataset_id: Uuid,
    dataset_hash: Option<String>,
    base_model: String,
    base_weights_sha256: Option<String>,
    hyperparameters: Value,
    classes: Vec<String>,
    preprocessing: Value,
    decode: Value,
    head: Value,
    eval_clips: i32,
    val_metrics: Value,
    test_metrics: Option<Value>,
    vidtune_version: String,
    libtorch_version: String,
    #[serde(skip)]
    path: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

const COLUMNS: &str = "id, job_id, dataset_id, dataset_hash, base_model, base_weights_sha256,
    hyperparameters, classes, preprocessing, decode, head, eval_clips, val_metrics, test_metrics,
    vidtune_version, libtorch_version, path, created_at";

async fn fetch(s: &AppState, caller: &Caller, id: Uuid) -> ApiResult<ModelRow> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from models where tenant_id = $1 and id = $2"
    ))
    .bind(caller.tenant_id)
    .bind(id)
    .fetch_optional(&s.db)
    .await?
    .ok_or_else(|| ApiError::not_found("model"))
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

async fn model_list(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Items<ModelRow>>> {
    let items = sqlx::query_as(&format!(
        "select {COLUMNS} from models where tenant_id = $1 order by created_at desc limit 500"
    ))
    .bind(caller.tenant_id)
    .fetch_all(&s.db)
    .await?;
    Ok(Json(Items { items }))
}

async fn model_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<ModelRow>> {
    Ok(Json(fetch(&s, &caller, id).await?))
}

/// Delete the model's record and files (its job keeps its metric history).
async fn model_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    let m = fetch(&s, &caller, id).await?;
    let mut tx = s.db.begin().await?;
    sqlx::query("update jobs set model_id = null where model_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("delete from models where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    s.models.evict(id);
    let _ = tokio::fs::remove_dir_all(s.settings.data_dir.join(&m.path)).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn meta(s: &AppState, caller: &Caller, m: &ModelRow) -> ApiResult<ModelMeta> {
    let custom = if Arch::parse(&m.base_model).is_none() {
        db::base_models::get_custom_by_name(&s.db, caller.tenant_id, &m.base_model)
            .await?
            .map(|b| (s.settings.data_dir.join(b.path), b.feature_dim as i64))
    } else {
        None
    };
    ModelMeta::from_record(
        m.id,
        &m.base_model,
        custom,
        m.classes.clone(),
        m.head.clone(),
        m.preprocessing.clone(),
        m.decode.clone(),
        m.eval_clips,
        s.settings.data_dir.join(&m.path).join("model.safetensors"),
    )
    .map_err(ApiError::internal)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    format: Option<String>,
}

/// Download the model: `safetensors` (a tar of `model.safetensors` and `model.json`, the
/// default) or `torchscript` (traced; input a normalised `[N, 3, T, H, W]` clip, output logits).
async fn model_export(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    let m = fetch(&s, &caller, id).await?;
    let dir = s.settings.data_dir.join(&m.path);
    let format = q.format.unwrap_or_else(|| "safetensors".into());
    let (file, ctype, name) = match format.as_str() {
        "safetensors" => {
            let tar = dir.join("export.tar");
            if !tar.exists() {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let part = d.join("export.tar.part");
                    let mut b = tar::Builder::new(std::fs::File::create(&part)?);
                    b.append_path_with_name(d.join("model.safetensors"), "model.safetensors")?;
                    b.append_path_with_name(d.join("model.json"), "model.json")?;
                    b.into_inner()?.sync_all()?;
                    std::fs::rename(part, d.join("export.tar"))?;
                    Ok(())
                })
                .await
                .map_err(|e| ApiError::internal(e.into()))??;
            }
            (tar, "application/x-tar", format!("model-{id}.tar"))
        }
        "torchscript" => {
            let ts = dir.join("model.ts.pt");
            if !ts.exists() {
                let meta = meta(&s, &caller, &m).await?;
                // A custom backbone runs only in its sandbox; tracing would run it here.
                if matches!(meta.base, crate::backbone::Base::TorchScript { .. }) {
                    return Err(ApiError::validation(
                        "format",
                        "models on a custom TorchScript backbone export as safetensors only",
                    ));
                }
                let out = ts.clone();
                tokio::task::spawn_blocking(move || trace(&meta, &out))
                    .await
                    .map_err(|e| ApiError::internal(e.into()))??;
            }
            (ts, "application/octet-stream", format!("model-{id}.ts.pt"))
        }
        _ => return Err(ApiError::validation("format", "safetensors or torchscript")),
    };
    let f = tokio::fs::File::open(&file)
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

fn trace(meta: &ModelMeta, out: &std::path::Path) -> anyhow::Result<()> {
    use crate::backbone::{Freeze, VideoClassifier};
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = VideoClassifier::new(
        &vs.root(),
        meta.base.clone(),
        meta.classes.len() as i64,
        &meta.head,
        Freeze::Full,
    )?;
    vs.load(&meta.weights)?;
    let p = &meta.preprocessing;
    let example = Tensor::zeros(
        [1, 3, p.frames, p.crop, p.crop],
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let part = out.with_extension("part");
    export::write_torchscript(&vs, &model, &example, &part)?;
    std::fs::rename(part, out)?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictQuery {
    /// Clips averaged (default: the model's evaluation setting).
    clips: Option<u32>,
    top_k: Option<usize>,
    #[serde(default)]
    timeline: bool,
    /// Timeline window and stride, e.g. `2s` or `1.5`.
    window: Option<String>,
    stride: Option<String>,
}

fn seconds(field: &'static str, v: Option<&str>, default: f64) -> ApiResult<f64> {
    let Some(v) = v else { return Ok(default) };
    let n: f64 = v
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| ApiError::validation(field, "seconds, e.g. 2s or 0.5"))?;
    if !(0.1..=3600.0).contains(&n) {
        return Err(ApiError::validation(field, "between 0.1 s and 3600 s"));
    }
    Ok(n)
}

/// Classify a video (raw body or multipart `file`).
async fn model_predict(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<PredictQuery>,
    req: Request,
) -> ApiResult<Response> {
    let started = Instant::now();
    if let Err(wait) = s.limiter.check(caller.key_id, s.models.config().rate_per_s) {
        s.models
            .stats
            .rejected_rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many predictions for this API key",
        )
        .with_retry_after(wait.ceil() as u64));
    }
    let m = fetch(&s, &caller, id).await?;
    let clips = q.clips.unwrap_or(m.eval_clips as u32);
    if !(1..=32).contains(&clips) {
        return Err(ApiError::validation("clips", "between 1 and 32"));
    }
    let top_k = q.top_k.unwrap_or(5).clamp(1, m.classes.len());
    let window = seconds("window", q.window.as_deref(), 2.0)?;
    let stride = seconds("stride", q.stride.as_deref(), window / 2.0)?;
    let meta = meta(&s, &caller, &m).await?;

    // Body → scratch file → decoded frames (in a media-worker child) at the training rate.
    let scratch = crate::serve::scratch_dir(&s.settings.data_dir);
    let base = scratch.join(Uuid::new_v4().to_string());
    let (src, cache) = (base.with_extension("upload"), base.with_extension("vtc"));
    let _src_guard = PartialFile::new(src.clone());
    let _cache_guard = PartialFile::new(cache.clone());
    let headers = req.headers().clone();
    let received = receive(&s, req, &src, s.settings.max_video_bytes)
        .await?
        .received;
    verify_checksum(&headers, &received)?;
    let t_upload = started.elapsed();
    let job = Job {
        src: src.clone(),
        cache: cache.clone(),
        spec: meta.decode.clone(),
        limits: s.ingest.video_limits.clone(),
    };
    let info = s
        .media
        .run(
            &job,
            Duration::from_secs_f64(s.ingest.video_limits.max_decode_s + 30.0),
        )
        .await
        .map_err(ApiError::video_rejected)?;
    let t_decode = started.elapsed() - t_upload;

    let handle = s
        .models
        .get(meta.clone())
        .await
        .map_err(ApiError::internal)?;
    let prep = meta.preprocessing.clone();
    let spec = crate::serve::clip_spec(&meta, meta_stride(&m));
    let total = info.cache_frames;
    let hw = (info.cache_height as i64, info.cache_width as i64);
    let fps = info.cache_fps.max(1e-6);
    // The whole-video prediction's clips, then one clip per timeline window.
    let mut plans: Vec<Plan> = (0..clips)
        .map(|c| data::eval_plan(0, total, &spec, hw, c, clips))
        .collect();
    let mut windows = Vec::new();
    if q.timeline {
        let duration = total as f64 / fps;
        let mut start = 0.0;
        loop {
            let end = (start + window).min(duration);
            let first = (start * fps).floor() as u32;
            let last = ((end * fps).ceil() as u32).clamp(first + 1, total);
            let mut p = data::eval_plan(0, last - first, &spec, hw, 0, 1);
            for i in &mut p.indices {
                *i += first;
            }
            windows.push((start, end));
            plans.push(p);
            if end >= duration || windows.len() >= 10_000 {
                break;
            }
            start += stride;
        }
    }
    let (cache_path, plans_b) = (cache.clone(), plans.clone());
    let input = tokio::task::spawn_blocking(move || {
        crate::serve::read_input(&cache_path, &plans_b, &spec, &prep)
    })
    .await
    .map_err(|e| ApiError::internal(e.into()))?
    .map_err(ApiError::internal)?;

    let t_infer_start = started.elapsed();
    let deadline = s.models.config().deadline;
    let mut probs_parts = Vec::new();
    // Large timelines go through in model-sized pieces so others can batch in between.
    for chunk in input.split(s.models.config().max_batch_clips.max(1), 0) {
        let p = handle
            .infer(chunk, deadline, &s.models.stats)
            .await
            .map_err(|e| match e {
                InferError::Overloaded => ApiError::new(
                    ErrorCode::Overloaded,
                    "the model's queue is full; retry shortly",
                )
                .with_retry_after(1),
                InferError::Deadline => ApiError::new(
                    ErrorCode::Overloaded,
                    "the prediction did not run within the deadline",
                )
                .with_retry_after(5),
                InferError::Failed(e) => ApiError::internal(e),
            })?;
        probs_parts.push(p);
    }
    let probs = Tensor::cat(&probs_parts, 0);
    let t_infer = started.elapsed() - t_infer_start;
    let rows: Vec<Vec<f32>> =
        Vec::<Vec<f32>>::try_from(&probs).map_err(|e| ApiError::internal(e.into()))?;
    let k = m.classes.len();
    let video = crate::serve::mean_probs(&rows[..clips as usize]);
    let ranked = |p: &[f64]| -> Vec<Value> {
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        idx.into_iter()
            .take(top_k)
            .map(|i| json!({"label": m.classes[i], "probability": p[i]}))
            .collect()
    };
    let predictions = ranked(&video);
    let top = predictions[0]["label"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    s.models
        .stats
        .predictions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    s.models
        .stats
        .prediction_seconds
        .observe(started.elapsed().as_secs_f64());
    let mut body = json!({
        "model_id": id,
        "predictions": predictions,
        "clips": clips,
        "input": {
            "sha256": received.sha256,
            "bytes": received.bytes,
            "duration_s": info.duration_s,
            "frames": info.frames,
            "width": info.width,
            "height": info.height,
        },
        "timings_ms": {
            "upload": t_upload.as_secs_f64() * 1e3,
            "decode": t_decode.as_secs_f64() * 1e3,
            "inference": t_infer.as_secs_f64() * 1e3,
            "total": started.elapsed().as_secs_f64() * 1e3,
        },
    });
    if q.timeline {
        body["timeline"] = windows
            .iter()
            .zip(&rows[clips as usize..])
            .map(|((a, b), row)| {
                let p: Vec<f64> = row.iter().map(|v| *v as f64).collect();
                let best = (0..k).max_by(|&x, &y| p[x].total_cmp(&p[y])).unwrap_or(0);
                json!({
                    "start_s": a,
                    "end_s": b,
                    "label": m.classes[best],
                    "probabilities": m.classes.iter().zip(&p).map(|(c, v)| (c.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
    }
    let audit = AuditDetails(json!({
        "input_sha256": received.sha256,
        "top_label": top,
        "latency_ms": started.elapsed().as_secs_f64() * 1e3,
    }));
    Ok((StatusCode::OK, AuditResource(id), audit, Json(body)).into_response())
}

/// A tenant's model ready to load, with the frame stride it was trained with.
pub(super) async fn fetch_meta(
    s: &AppState,
    caller: &Caller,
    id: Uuid,
) -> ApiResult<(ModelMeta, u32)> {
    let m = fetch(s, caller, id).await?;
    Ok((meta(s, caller, &m).await?, meta_stride(&m)))
}

/// The frame stride the model was trained with.
fn meta_stride(m: &ModelRow) -> u32 {
    m.hyperparameters["frame_stride"]
        .as_u64()
        .unwrap_or(1)
        .max(1) as u32
}
