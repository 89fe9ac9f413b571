//! The HTTP API: one module per resource, each adding its operations to a [`Routes`] builder.
//!
//! Every `/v1` operation is declared once with its OpenAPI `operationId` and access level; the
//! builder wraps it in the guard that authenticates the API key and writes the audit row, and
//! remembers it so a test can compare the router with `openapi.yaml`.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use axum::{Router, extract::ConnectInfo};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::config::Settings;
use crate::db;

pub mod admin;
pub mod auth;
pub mod base_models;
pub mod batch_predictions;
pub mod datasets;
pub mod deletions;
pub mod error;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod models;
pub mod state;
pub mod upload;

pub use auth::Caller;
pub use error::{ApiError, ApiResult, ErrorCode};
pub use extract::{Format, Items};
pub use state::AppState;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any valid key; the operation sees only the key's tenant.
    Tenant,
    /// Admin keys (and operators): their own tenant's keys and audit trail. The handler scopes
    /// the work to the tenants the caller administers ([`Caller::administers`]).
    Admin,
    /// Operator keys only: what every tenant shares (tenants, pretrained weights).
    Operator,
}

/// A declared API operation.
#[derive(Debug, Clone)]
pub struct Operation {
    pub method: Method,
    /// Path in axum/OpenAPI template form, e.g. `/v1/keys/{key_id}`.
    pub path: &'static str,
    /// OpenAPI operationId, `resource_verb`; also the audit `action`.
    pub id: &'static str,
    pub access: Access,
}

/// Set by a handler on its response to name the resource it created or acted on, for the audit row.
#[derive(Debug, Clone, Copy)]
pub struct AuditResource(pub Uuid);

/// Set by a handler on its response: extra facts for the audit row (never patient content).
#[derive(Debug, Clone)]
pub struct AuditDetails(pub serde_json::Value);

/// Builder that registers guarded `/v1` operations.
pub struct Routes {
    state: AppState,
    router: Router<AppState>,
    ops: Vec<Operation>,
    timeout: Duration,
}

impl Routes {
    fn new(state: AppState, timeout: Duration) -> Self {
        Self {
            state,
            router: Router::new(),
            ops: Vec::new(),
            timeout,
        }
    }

    /// Add one operation. `handler` runs after the key was authenticated (and, for
    /// [`Access::Admin`] and [`Access::Operator`], found to have that role); the outcome is
    /// audited either way.
    pub fn op<H, T>(
        self,
        method: Method,
        path: &'static str,
        id: &'static str,
        access: Access,
        handler: H,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(method, path, id, access, handler, false)
    }

    /// Add a streaming operation (uploads, event streams): no request timeout and no JSON body
    /// limit (upload handlers stream to disk and enforce their own size cap).
    pub fn streaming_op<H, T>(
        self,
        method: Method,
        path: &'static str,
        id: &'static str,
        access: Access,
        handler: H,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(method, path, id, access, handler, true)
    }

    fn add<H, T>(
        mut self,
        method: Method,
        path: &'static str,
        id: &'static str,
        access: Access,
        handler: H,
        streaming: bool,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let op = Operation {
            method: method.clone(),
            path,
            id,
            access,
        };
        let filter = MethodFilter::try_from(method).expect("standard HTTP method");
        let guard = Guard {
            state: self.state.clone(),
            op: Arc::new(op.clone()),
        };
        let route = if streaming {
            on(filter, handler).layer(DefaultBodyLimit::disable())
        } else {
            on(filter, handler).layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                self.timeout,
            ))
        };
        let route = route.layer(middleware::from_fn_with_state(guard, guard_operation));
        self.router = self.router.route(path, route);
        self.ops.push(op);
        self
    }
}

/// The router of the optional metrics address (`VIDTUNE_METRICS_LISTEN`): `/metrics` without a
/// key, for a Prometheus that scrapes from inside the cluster. Nothing else is served there, so
/// exposing that address never exposes the API.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .merge(health::metrics_router())
        .fallback(route_not_found)
        .layer(middleware::from_fn(request_context))
        .with_state(state)
}

/// Build the whole application router. Returns the declared `/v1` operations alongside.
pub fn router(state: AppState, settings: &Settings) -> (Router, Vec<Operation>) {
    let routes = Routes::new(state.clone(), settings.request_timeout);
    let routes = admin::routes(routes);
    let routes = datasets::routes(base_models::routes(routes));
    let routes = jobs::routes(routes);
    let routes = batch_predictions::routes(models::routes(routes));
    let routes = deletions::routes(routes);
    let Routes { router, ops, .. } = routes;

    let app = Router::new()
        .merge(health::router())
        .merge(router)
        .fallback(route_not_found)
        .layer(DefaultBodyLimit::max(settings.max_json_bytes))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(middleware::from_fn(request_context))
        .with_state(state);
    (app, ops)
}

const REQUEST_ID_HEADER: &str = "x-request-id";

/// Give every request an id (a caller's well-formed `x-request-id` is kept, so hospital systems
/// can correlate), echo it on the response, expose it to problem bodies, and turn every bare
/// error response made outside a handler (body limit, timeout, unknown method) into problem+json.
async fn request_context(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).expect("validated header value");
    req.headers_mut().insert(REQUEST_ID_HEADER, value.clone());

    let mut resp = error::REQUEST_ID
        .scope(id, async move {
            let resp = next.run(req).await;
            let status = resp.status();
            let is_problem = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(error::PROBLEM_JSON.as_bytes()));
            if (status.is_client_error() || status.is_server_error()) && !is_problem {
                let code = ErrorCode::for_status(status);
                let mut problem = ApiError::new(code, bare_detail(status)).into_response();
                *problem.status_mut() = status;
                for keep in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
                    if let Some(v) = resp.headers().get(&keep) {
                        problem.headers_mut().insert(keep, v.clone());
                    }
                }
                problem
            } else {
                resp
            }
        })
        .await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, value);
    resp
}

fn bare_detail(status: axum::http::StatusCode) -> &'static str {
    use axum::http::StatusCode as S;
    match status {
        S::PAYLOAD_TOO_LARGE => "the request body exceeds the configured limit",
        S::REQUEST_TIMEOUT => "the request did not complete within the configured timeout",
        S::METHOD_NOT_ALLOWED => "this route does not accept that method; see the Allow header",
        S::NOT_FOUND => "no route matches this path",
        _ => "the request could not be processed",
    }
}

async fn route_not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no route matches this path")
}

#[derive(Clone)]
struct Guard {
    state: AppState,
    op: Arc<Operation>,
}

/// Whether `caller`'s role reaches `op`'s access level.
fn authorise(op: &Operation, caller: &Caller) -> Result<(), ApiError> {
    match op.access {
        Access::Admin if !caller.admin => {
            Err(ApiError::forbidden(format!("{} needs an admin key", op.id)))
        }
        Access::Operator if !caller.operator => Err(ApiError::forbidden(format!(
            "{} needs an operator key (`vidtune keys create --operator` on the host)",
            op.id
        ))),
        _ => Ok(()),
    }
}

/// Authenticate, authorise by access level, run the handler, and append the audit row.
async fn guard_operation(State(g): State<Guard>, mut req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let client_addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let path_resource = req
        .uri()
        .path()
        .rsplit('/')
        .find_map(|seg| Uuid::parse_str(seg).ok());

    let caller = auth::authenticate(&g.state.db, req.headers()).await;
    let (resp, caller) = match caller {
        Err(e) => (e.into_response(), None),
        Ok(c) => match authorise(&g.op, &c) {
            Err(e) => (e.into_response(), Some(c)),
            Ok(()) => {
                req.extensions_mut().insert(c.clone());
                (next.run(req).await, Some(c))
            }
        },
    };

    let event = db::audit::NewAuditEvent {
        tenant_id: caller.as_ref().map(|c| c.tenant_id),
        key_id: caller.as_ref().map(|c| c.key_id),
        action: g.op.id.to_owned(),
        resource_id: resp
            .extensions()
            .get::<AuditResource>()
            .map(|r| r.0)
            .or(path_resource),
        status: resp.status().as_u16(),
        request_id,
        client_addr,
        details: resp
            .extensions()
            .get::<AuditDetails>()
            .map_or(serde_json::Value::Null, |d| d.0.clone()),
    };
    g.state
        .http_metrics
        .record(g.op.id, event.status, started.elapsed().as_secs_f64());
    if let Err(e) = db::audit::insert(&g.state.db, &event).await {
        tracing::error!(error.cause_chain = ?e, action = g.op.id, "could not write the audit row");
    }
    resp
}

impl axum::response::IntoResponseParts for AuditResource {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

impl axum::response::IntoResponseParts for AuditDetails {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}
