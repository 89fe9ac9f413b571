//! Fine-tuning jobs: create (idempotent), list, view, cancel, metric history (JSON or CSV),
//! live events (Server-Sent Events), logs, and plots (SVG).
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::extract::{Json, Path, Query, csv_response};
use super::{Access, ApiError, ApiResult, AppState, AuditResource, Caller, Format, Items, Routes};
use crate::db::{
    self,
    jobs::{Job, JobState},
};
use crate::jobs::{self, JobRequest, SubmitError};

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
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| {
                    ApiError::bad_request("Idempotency-Key must be 1 to 200 visible characters")
                })?,
        ),
    };
    let submitted = jobs::submit(&s.db, caller.tenant_id, &body, key)
        .await
        .map_err(|e| match e {
            SubmitError::Invalid { field, message } => ApiError::validation(field, message),
            SubmitError::Conflict(msg) => ApiError::conflict(msg),
            SubmitError::Database(e) => e.into(),
        })?;
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
) -> ApiResult<Json<Value>> {
    let job = fetch(&s, &caller, id).await?;
    let latest = db::jobs::latest_epoch(&s.db, id).await?;
    let mut v = serde_json::to_value(&job).expect("serialises");
    v["latest_metrics"] = latest.as_ref().map_or(Value::Null, |e| {
        json!({
            "epoch": e.epoch,
            "train_loss": e.train_loss,
            "train_accuracy": e.train_accuracy,
            "val_loss": e.val["loss"],
            "val_accuracy": e.val["accuracy"],
            "val_balanced_accuracy": e.val["balanced_accuracy"],
            "val_macro_f1": e.val["macro_f1"],
            "val_macro_auc": e.val["macro_auc"],
        })
    });
    Ok(Json(v))
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
        let mut out = String::from(
            "epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_balanced_accuracy,val_macro_f1,val_macro_auc,lr,clips_per_s,data_wait_share\n",
        );
        for e in &epochs {
            let f = |k: &str| e.val[k].as_f64().map(|x| x.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{}\n",
                e.epoch,
                e.train_loss,
                e.train_accuracy,
                f("loss"),
                f("accuracy"),
                f("balanced_accuracy"),
                f("macro_f1"),
                f("macro_auc"),
                e.lr,
                e.clips_per_s,
                e.data_wait_share
            ));
        }
        return Ok(csv_response(out));
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
/// event id; reconnect with `Last-Event-ID`). The stream ends after the job's final state.
async fn job_events(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    fetch(&s, &caller, id).await?;
    let mut after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or(q.after)
        .unwrap_or(0);
    let db = s.db.clone();
    let tenant = caller.tenant_id;
    let stream = async_stream::stream! {
        let mut listener = db::jobs::listen_events(&db).await;
        loop {
            let rows = db::jobs::events_after(&db, id, after).await.unwrap_or_default();
            for r in &rows {
                after = r.id;
                yield Ok(Event::default().id(r.id.to_string()).event(r.kind.clone()).data(serde_json::to_string(r).unwrap_or_default()));
            }
            if rows.is_empty() {
                let done = db::jobs::get(&db, tenant, id).await.ok().flatten()
                    .is_none_or(|j| j.state.is_final());
                if done {
                    break;
                }
                let wait = async {
                    match listener.as_mut() {
                        Some(l) => { let _ = l.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = wait => {},
                    () = tokio::time::sleep(Duration::from_secs(2)) => {},
                }
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
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

/// `training-curves`: loss and validation metrics per epoch, the best epoch marked.
/// `confusion-matrix`: the test evaluation of the final model by default (the latest
/// validation until there is one); `?split=val&epoch=N` for an epoch's validation.
async fn job_plot(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(Uuid, String)>,
    Query(q): Query<PlotQuery>,
) -> ApiResult<Response> {
    let job = fetch(&s, &caller, id).await?;
    let short = &id.to_string()[..8];
    let epochs = db::jobs::epochs(&s.db, id).await?;
    let svg = match name.as_str() {
        "training-curves" => {
            if q.split.is_some() || q.epoch.is_some() {
                return Err(ApiError::validation(
                    "split",
                    "training-curves takes no split or epoch",
                ));
            }
            if epochs.is_empty() {
                return Err(ApiError::conflict("no epoch has finished yet"));
            }
            let metric = job.hyperparameters["selection_metric"]
                .as_str()
                .unwrap_or("balanced_accuracy");
            training_curves(
                &format!("{} on job {short}", job.base_model),
                metric,
                &epochs,
            )
        }
        "confusion-matrix" => {
            let test = match q.split.as_deref() {
                None => q.epoch.is_none(),
                Some("test") => true,
                Some("val") => false,
                Some(_) => return Err(ApiError::validation("split", "test or val")),
            };
            let test_metrics = if test {
                db::jobs::model_test_metrics(&s.db, id).await?
            } else {
                None
            };
            let (title, metrics) = match test_metrics {
                Some(m) => (format!("job {short}: test split, final model"), m),
                None if test && q.split.is_some() => {
                    return Err(ApiError::conflict(
                        "the job has no test evaluation (yet, or its dataset has no test split)",
                    ));
                }
                None => {
                    let e = match q.epoch {
                        Some(n) => epochs.iter().find(|e| e.epoch == n).ok_or_else(|| {
                            ApiError::validation("epoch", format!("no epoch {n} has finished"))
                        })?,
                        None => epochs
                            .last()
                            .ok_or_else(|| ApiError::conflict("no epoch has finished yet"))?,
                    };
                    (
                        format!("job {short}: validation split, epoch {}", e.epoch),
                        e.val.clone(),
                    )
                }
            };
            let labels: Vec<String> = metrics["per_class"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| c["label"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default();
            let matrix: Vec<Vec<usize>> =
                serde_json::from_value(metrics["confusion"].clone()).unwrap_or_default();
            crate::plots::confusion_matrix(&title, &labels, &matrix)
        }
        _ => {
            return Err(ApiError::not_found(
                "plot (training-curves or confusion-matrix)",
            ));
        }
    };
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

fn training_curves(title: &str, metric: &str, epochs: &[db::jobs::EpochRow]) -> String {
    use crate::plots::{Panel, Series, line_panels};
    let series =
        |name: &'static str, f: &dyn Fn(&db::jobs::EpochRow) -> Option<f64>, dashed| Series {
            name,
            points: epochs
                .iter()
                .filter_map(|e| f(e).map(|v| (f64::from(e.epoch), v)))
                .collect(),
            dashed,
        };
    let val = |k: &'static str| move |e: &db::jobs::EpochRow| e.val[k].as_f64();
    let mut best: Option<(i32, f64)> = None;
    for e in epochs {
        if let Some(v) = e.val[metric].as_f64()
            && crate::train::run::better(metric, v, best.map(|b| b.1))
        {
            best = Some((e.epoch, v));
        }
    }
    let label = best.map(|(e, v)| format!("best: epoch {e}, {metric} {v:.3}"));
    line_panels(
        title,
        &[
            Panel {
                title: "loss",
                series: vec![
                    series("train", &|e| Some(e.train_loss), false),
                    series("validation", &val("loss"), false),
                ],
                y_range: None,
            },
            Panel {
                title: "validation metrics",
                series: vec![
                    series("accuracy", &val("accuracy"), false),
                    series("balanced accuracy", &val("balanced_accuracy"), false),
                    series("macro-F1", &val("macro_f1"), false),
                    series("macro ROC-AUC", &val("macro_auc"), false),
                    series("train accuracy", &|e| Some(e.train_accuracy), true),
                ],
                y_range: Some((0.0, 1.0)),
            },
        ],
        best.zip(label.as_deref())
            .map(|((e, _), l)| (f64::from(e), l)),
    )
}
