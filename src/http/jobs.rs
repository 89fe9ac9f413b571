//! Fine-tuning jobs: create (idempotent), list, view, cancel, metric history (JSON or CSV),
//! live events (Server-Sent Events), logs, and plots (SVG).
use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::extract::{Json, Path, Query, csv_response, header_text};
use super::{
    Access, ApiError, ApiResult, AppState, AuditResource, Caller, ErrorCode, Format, Items, Routes,
};
use crate::db::{
    self,
    jobs::{Job, JobState},
};
use crate::jobs::{self, Backbones, JobError, JobRequest, JobView, PlotRequest};

pub fn routes(r: Routes) -> Routes {
    use Access::Tenant;
    r.op(Method::POST, "/v1/jobs", "job_create", Tenant, job_create)
        .op(Method::GET, "/v1/jobs", "job_list", Tenant, job_list)
        .op(
            Method::GET,
            "/v1/jobs/{job_id}",
            "job_view",
            Tenant,
            job_view,
        )
        .op(
            Method::POST,
            "/v1/jobs/{job_id}/cancel",
            "job_cancel",
            Tenant,
            job_cancel,
        )
        .op(
            Method::GET,
            "/v1/jobs/{job_id}/metrics",
            "job_metrics",
            Tenant,
            job_metrics,
        )
        .streaming_op(
            Method::GET,
            "/v1/jobs/{job_id}/events",
            "job_events",
            Tenant,
            job_events,
        )
        .op(
            Method::GET,
            "/v1/jobs/{job_id}/logs",
            "job_logs",
            Tenant,
            job_logs,
        )
        .op(
            Method::GET,
            "/v1/jobs/{job_id}/plots/{name}",
            "job_plot",
            Tenant,
            job_plot,
        )
}

async fn job_create(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<JobRequest>,
) -> ApiResult<Response> {
    let key = header_text(&headers, "Idempotency-Key", 200)?;
    let backbones = Backbones {
        data: &s.data,
        inspect_timeout: s.settings.inspect_timeout,
        tenant_quota_bytes: s.settings.tenant_quota_bytes,
    };
    let submitted = jobs::submit(&s.db, &backbones, caller.tenant_id, &body, key).await?;
    let job = submitted.job;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)).expect("a path is a header value"),
    );
    if submitted.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((
        StatusCode::ACCEPTED,
        headers,
        AuditResource(job.id),
        Json(job),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
}

async fn job_list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Items<Job>>> {
    let state = match q.state.as_deref() {
        None => None,
        Some(st) => Some(
            JobState::ALL
                .into_iter()
                .find(|s| s.as_str() == st)
                .ok_or_else(|| {
                    ApiError::validation("state", "queued, running, succeeded, failed or canceled")
                })?,
        ),
    };
    Ok(Json(
        db::jobs::list(&s.db, caller.tenant_id, state).await?.into(),
    ))
}

async fn fetch(s: &AppState, caller: &Caller, id: Uuid) -> ApiResult<Job> {
    db::jobs::get(&s.db, caller.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))
}

/// The job with its latest epoch's metrics.
async fn job_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<JobView>> {
    jobs::view(&s.db, caller.tenant_id, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

async fn job_cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let job = jobs::cancel(&s.db, caller.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let status = if job.state == JobState::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    format: Option<String>,
}

/// Per-epoch metrics and per-step loss and learning rate; `?format=csv` (or `Accept: text/csv`)
/// for one CSV row per epoch.
async fn job_metrics(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<MetricsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    fetch(&s, &caller, id).await?;
    let epochs = db::jobs::epochs(&s.db, id).await?;
    if Format::negotiate(q.format.as_deref(), &headers)? == Format::Csv {
        return Ok(csv_response(jobs::epochs_csv(&epochs)));
    }
    let steps = db::jobs::steps(&s.db, id).await?;
    Ok(Json(json!({ "job_id": id, "epochs": epochs, "steps": steps })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
}

/// State changes, epoch metrics, warnings as Server-Sent Events (`event:` = kind, `id:` =
/// event id; reconnect with `Last-Event-ID`). The stream ends after the job's final state. A key
/// may hold `max_streams_per_key` streams open at once; one more is answered 429.
async fn job_events(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    fetch(&s, &caller, id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(q.after)
        .unwrap_or(0);
    let max = s.settings.max_streams_per_key;
    let slot = s.streams.take(caller.key_id, max).ok_or_else(|| {
        ApiError::new(
            ErrorCode::TooManyStreams,
            format!("this API key already has {max} event streams open; close one first"),
        )
        .with_retry_after(5)
    })?;
    let rows = jobs::events::stream(
        s.db.clone(),
        s.events.subscribe(),
        caller.tenant_id,
        id,
        after,
    );
    let events = rows.map(move |r| {
        // The slot is given back when the stream is dropped.
        let _held = &slot;
        Ok(Event::default()
            .id(r.id.to_string())
            .event(r.kind.clone())
            .data(serde_json::to_string(&r).unwrap_or_default()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The job's events as plain text, one line each.
async fn job_logs(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    fetch(&s, &caller, id).await?;
    let mut out = String::new();
    let mut after = 0;
    loop {
        let rows = db::jobs::events_after(&s.db, id, after).await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            after = r.id;
            let at =
                r.at.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
            out.push_str(&format!(
                "{at} attempt={} {:<7} {}: {}\n",
                r.attempt, r.level, r.kind, r.message
            ));
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlotQuery {
    split: Option<String>,
    epoch: Option<i32>,
}

/// `training-curves` or `confusion-matrix` as SVG (see [`jobs::plot`]).
async fn job_plot(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(Uuid, String)>,
    Query(q): Query<PlotQuery>,
) -> ApiResult<Response> {
    let job = fetch(&s, &caller, id).await?;
    let req = PlotRequest {
        name: &name,
        split: q.split.as_deref(),
        epoch: q.epoch,
    };
    let svg = jobs::plot(&s.db, &job, &req).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        AuditResource(id),
        svg,
    )
        .into_response())
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid { field, message } => ApiError::validation(field, message),
            JobError::Conflict(msg) => ApiError::conflict(msg),
            JobError::NotFound(what) => ApiError::not_found(what),
            JobError::Quota(e) => e.into(),
            JobError::Database(e) => e.into(),
            JobError::Internal(e) => ApiError::internal(e),
        }
    }
}
