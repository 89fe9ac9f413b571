//! Trained models: the registry (list, view, delete, export) and predictions, with multi-clip
//! averaging as in evaluation and optional per-window timelines.
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query};
use super::upload::{receive, verify_checksum};
use super::{
    Access, ApiError, ApiResult, AuditDetails, AuditResource, Caller, ErrorCode, Items, Routes,
};
use crate::datadir::PartialFile;
use crate::db;
use crate::db::models::Model;
use crate::serve::{self, ExportFormat, PredictOptions, Serving, TimelineOptions, Upload};

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

async fn fetch(s: &AppState, caller: &Caller, id: Uuid) -> ApiResult<Model> {
    db::models::get(&s.db, caller.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("model"))
}

async fn model_list(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Items<Model>>> {
    let items = db::models::list(&s.db, caller.tenant_id).await?;
    Ok(Json(items.into()))
}

async fn model_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Model>> {
    Ok(Json(fetch(&s, &caller, id).await?))
}

/// Delete the model: its record now (its job keeps its metric history), its files (weights,
/// metadata, exports) in the background (202).
async fn model_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<impl IntoResponse> {
    let by = super::deletions::requester(&caller);
    let d = crate::retention::delete_model(&s.db, &s.data, caller.tenant_id, id, &by).await?;
    s.models.evict(id);
    Ok(super::deletions::accepted(d))
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
    let format = ExportFormat::parse(q.format.as_deref())
        .ok_or_else(|| ApiError::validation("format", "safetensors or torchscript"))?;
    let dir = s.data.resolve(&m.path);
    let file = match format {
        ExportFormat::Safetensors => serve::export_safetensors(&dir).await?,
        ExportFormat::TorchScript => {
            let meta = serve::model_meta(&s.db, &s.data, caller.tenant_id, &m).await?;
            serve::export_torchscript(&meta, &dir).await?
        }
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
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", format.file_name(id)),
            ),
        ],
        body,
    )
        .into_response())
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

impl PredictQuery {
    /// The options for model `m`, whose defaults fill what the query leaves out.
    fn options(&self, m: &Model) -> ApiResult<PredictOptions> {
        let clips = self.clips.unwrap_or(m.eval_clips as u32);
        if !(1..=32).contains(&clips) {
            return Err(ApiError::validation("clips", "between 1 and 32"));
        }
        let top_k = self.top_k.unwrap_or(5).clamp(1, m.classes.len());
        // Window and stride are checked even without a timeline, as they always were.
        let window_s = seconds("window", self.window.as_deref(), 2.0)?;
        let stride_s = seconds("stride", self.stride.as_deref(), window_s / 2.0)?;
        Ok(PredictOptions {
            clips,
            top_k,
            timeline: self
                .timeline
                .then_some(TimelineOptions { window_s, stride_s }),
        })
    }
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

/// Fetch the instance a JSON body names (`{"study_uid", "series_uid"?, "sop_instance_uid"?}`)
/// from the configured PACS into `dest`; returns what was received.
async fn fetch_reference(
    s: &AppState,
    req: Request,
    dest: &std::path::Path,
) -> ApiResult<super::upload::Received> {
    let Some(pacs) = s.ingest.pacs.as_ref() else {
        return Err(ApiError::new(
            ErrorCode::PacsNotConfigured,
            "predicting by study reference needs a PACS: an operator sets VIDTUNE_PACS_URL",
        ));
    };
    let body = axum::body::to_bytes(req.into_body(), s.settings.max_json_bytes)
        .await
        .map_err(|_| ApiError::new(ErrorCode::PayloadTooLarge, "the reference is too large"))?;
    let r: crate::pacs::StudyRef = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            "body",
            format!(
                "a study reference {{\"study_uid\", \"series_uid\"?, \"sop_instance_uid\"?}}: {e}"
            ),
        )
    })?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ApiError::internal(e.into()))?;
    }
    use crate::pacs::PacsError as P;
    let bytes = pacs
        .fetch_reference(&r, dest, s.settings.max_video_bytes)
        .await
        .map_err(|e| match e {
            P::NotFound => ApiError::not_found("study instance"),
            P::Ambiguous(_) => ApiError::validation("sop_instance_uid", e.to_string()),
            P::TooLarge(_) => ApiError::new(ErrorCode::PayloadTooLarge, e.to_string()),
            P::Malformed(ref m) if m.contains("digits and dots") => {
                ApiError::validation("study_uid", "UIDs are digits and dots")
            }
            P::Io(e) => ApiError::internal(e.into()),
            P::Unavailable(_) | P::Malformed(_) => {
                ApiError::new(ErrorCode::PacsUnavailable, e.to_string())
            }
        })?;
    let sha256 = crate::ingest::sha256_file(dest).map_err(|e| ApiError::internal(e.into()))?;
    Ok(super::upload::Received { bytes, sha256 })
}

/// Classify a video (raw body or multipart `file`, or a study reference on the PACS as JSON).
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
            .fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many predictions for this API key",
        )
        .with_retry_after(wait.ceil() as u64));
    }
    let m = fetch(&s, &caller, id).await?;
    let opts = q.options(&m)?;
    let meta = serve::model_meta(&s.db, &s.data, caller.tenant_id, &m).await?;

    // The body goes to a scratch file, removed however the request ends.
    let src = s
        .data
        .predict_scratch()
        .join(Uuid::new_v4().to_string())
        .with_extension("upload");
    let _src_guard = PartialFile::new(src.clone());
    let headers = req.headers().clone();
    let received = if super::upload::content_type(&headers) == "application/json" {
        fetch_reference(&s, req, &src).await?
    } else {
        let received = receive(&s, req, &src, s.settings.max_video_bytes)
            .await?
            .received;
        verify_checksum(&headers, &received)?;
        received
    };
    let upload = Upload {
        path: src.clone(),
        sha256: received.sha256,
        bytes: received.bytes,
    };
    let serving = Serving {
        models: &s.models,
        media: &s.media,
        video_limits: &s.ingest.config.video_limits,
    };
    let p = serve::predict(serving, &meta, &upload, &opts, started).await?;
    let audit = AuditDetails(json!({
        "input_sha256": p.input.sha256,
        "top_label": p.predictions[0].label,
        "latency_ms": started.elapsed().as_secs_f64() * 1e3,
    }));
    Ok((StatusCode::OK, AuditResource(id), audit, Json(p)).into_response())
}
