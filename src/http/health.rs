//! Liveness and readiness probes (unauthenticated) and Prometheus metrics; none of them audited
//! (a scraper or a load balancer would drown the trail).
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::metrics::Exposition;

/// The probes and `/metrics` on the API address.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_for_operators))
}

/// `/metrics` on the metrics address (`VIDTUNE_METRICS_LISTEN`), which is meant to be reachable
/// only from the cluster's own network: no key, so Prometheus needs no secret.
pub fn metrics_router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// The process is up and answering.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// Ready to serve: the database answers within two seconds.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let ping = crate::db::ping(&state.db);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok(Json(json!({ "status": "ready", "database": "ok" }))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            Err(ApiError::new(
                ErrorCode::DatabaseUnavailable,
                "the database is unreachable",
            )
            .with_retry_after(5))
        }
        Err(_) => Err(ApiError::new(
            ErrorCode::DatabaseUnavailable,
            "the database did not answer within 2 s",
        )
        .with_retry_after(5)),
    }
}

/// `/metrics` on the API address. The numbers span every tenant (jobs by state, requests per
/// operation), so there only an operator key reads them.
async fn metrics_for_operators(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = super::auth::authenticate(&state.db, &headers).await?;
    if !caller.operator {
        return Err(ApiError::forbidden(
            "/metrics on the API address needs an operator key; \
             scrape the metrics address (VIDTUNE_METRICS_LISTEN) without one",
        ));
    }
    Ok(metrics(State(state)).await.into_response())
}

/// Prometheus text exposition: API requests and latency, predictions and their latency, batch
/// sizes, rejections, loaded models, jobs by state.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut e = Exposition::default();
    state.models.stats.render(&mut e);
    state.http_metrics.render(e.raw());
    e.family(
        "vidtune_models_loaded",
        "gauge",
        "Models loaded for serving.",
    )
    .sample("vidtune_models_loaded", "", state.models.loaded_count());
    let jobs = crate::db::jobs::count_by_state(&state.db)
        .await
        .unwrap_or_default();
    e.family("vidtune_jobs", "gauge", "Jobs by state.");
    for (s, n) in jobs {
        e.sample("vidtune_jobs", &format!("state=\"{s}\""), n);
    }
    let out = e.finish();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
