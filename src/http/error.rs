//! Errors as RFC 9457 `application/problem+json`, converted to HTTP in exactly this one place.
//!
//! Every kind of error has a stable `code` (the table below is the contract clients program
//! against, and is listed in openapi.yaml and the README). 5xx details are logged, never sent.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::media::decode::Rejection;

pub const PROBLEM_JSON: &str = "application/problem+json";

tokio::task_local! {
    /// The `x-request-id` of the request being handled, echoed in problem bodies.
    pub static REQUEST_ID: String;
}

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:ident, $title:literal),)*) => {
        /// Stable machine-readable error codes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            /// Every code, in documentation order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];
            pub fn as_str(self) -> &'static str { match self { $(ErrorCode::$variant => $code,)* } }
            pub fn status(self) -> StatusCode { match self { $(ErrorCode::$variant => StatusCode::$status,)* } }
            pub fn title(self) -> &'static str { match self { $(ErrorCode::$variant => $title,)* } }
        }
    };
}

error_codes! {
    BadRequest => ("bad_request", BAD_REQUEST, "The request is malformed"),
    ValidationFailed => ("validation_failed", UNPROCESSABLE_ENTITY, "A field has an invalid value"),
    ChecksumMismatch => ("checksum_mismatch", BAD_REQUEST, "The body does not match its checksum"),
    InvalidModelFile => ("invalid_model_file", UNPROCESSABLE_ENTITY, "The model file cannot be used"),
    InvalidVideo => ("invalid_video", UNPROCESSABLE_ENTITY, "The video cannot be used"),
    UnsupportedContainer => ("unsupported_container", UNPROCESSABLE_ENTITY, "The video's container format is not accepted"),
    Unauthenticated => ("unauthenticated", UNAUTHORIZED, "A valid API key is required"),
    Forbidden => ("forbidden", FORBIDDEN, "The API key may not do this"),
    NotFound => ("not_found", NOT_FOUND, "No such resource"),
    RouteNotFound => ("route_not_found", NOT_FOUND, "No such route"),
    MethodNotAllowed => ("method_not_allowed", METHOD_NOT_ALLOWED, "Method not allowed on this route"),
    RequestTimeout => ("request_timeout", REQUEST_TIMEOUT, "The request took too long"),
    Conflict => ("conflict", CONFLICT, "The request conflicts with the current state"),
    DatasetInUse => ("dataset_in_use", CONFLICT, "A queued or running job uses the dataset"),
    ModelInUse => ("model_in_use", CONFLICT, "A running batch prediction uses the model"),
    BaseModelInUse => ("base_model_in_use", CONFLICT, "Models or unfinished jobs use the base model"),
    TenantInUse => ("tenant_in_use", CONFLICT, "The tenant has queued or running work"),
    PayloadTooLarge => ("payload_too_large", PAYLOAD_TOO_LARGE, "The request body is too large"),
    UnsupportedMediaType => ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "Unsupported content type"),
    QuotaExceeded => ("quota_exceeded", FORBIDDEN, "The tenant's storage quota is used up"),
    RateLimited => ("rate_limited", TOO_MANY_REQUESTS, "Too many requests"),
    TooManyStreams => ("too_many_streams", TOO_MANY_REQUESTS, "Too many open event streams"),
    PredictionBudgetExceeded => ("prediction_budget_exceeded", UNPROCESSABLE_ENTITY, "The prediction needs more computation than one request may use"),
    Internal => ("internal", INTERNAL_SERVER_ERROR, "Internal error"),
    DatabaseUnavailable => ("database_unavailable", SERVICE_UNAVAILABLE, "The database is unreachable"),
    Overloaded => ("overloaded", SERVICE_UNAVAILABLE, "The service is overloaded"),
    PacsNotConfigured => ("pacs_not_configured", NOT_IMPLEMENTED, "No PACS is configured on this server"),
    PacsUnavailable => ("pacs_unavailable", BAD_GATEWAY, "The PACS could not be reached or refused the request"),
}

impl ErrorCode {
    /// The code a bare HTTP status maps to, for responses made outside the handlers
    /// (body limits, timeouts, unmatched routes).
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::BadRequest,
            StatusCode::UNAUTHORIZED => Self::Unauthenticated,
            StatusCode::FORBIDDEN => Self::Forbidden,
            StatusCode::NOT_FOUND => Self::RouteNotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::REQUEST_TIMEOUT => Self::RequestTimeout,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => Self::ValidationFailed,
            StatusCode::TOO_MANY_REQUESTS => Self::RateLimited,
            StatusCode::SERVICE_UNAVAILABLE => Self::Overloaded,
            _ if status.is_client_error() => Self::BadRequest,
            _ => Self::Internal,
        }
    }
}

/// An error a handler returns; becomes a problem+json response.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: String,
    /// The request field at fault, for validation errors.
    pub field: Option<String>,
    /// Seconds, sent as `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// The cause of an internal error: logged, never sent.
    source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            field: None,
            retry_after: None,
            source: None,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, detail)
    }
    pub fn validation(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(ErrorCode::ValidationFailed, detail)
        }
    }
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, detail)
    }
    /// `what` names the resource kind, e.g. "dataset".
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such {what}"))
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, detail)
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    /// A video the media worker did not accept (predictions). The detail starts with the
    /// rejection's reason code; a container outside the allow-list has its own problem code, and
    /// a failure of the server itself is a 500 whose cause is logged, not sent.
    pub fn video_rejected(r: Rejection) -> Self {
        if r.is_server_fault() {
            let cause = r.log.unwrap_or(r.detail);
            return Self::internal(anyhow::anyhow!("{}: {cause}", r.code));
        }
        let code = match r.code.as_str() {
            "unsupported_container" => ErrorCode::UnsupportedContainer,
            _ => ErrorCode::InvalidVideo,
        };
        Self::new(code, format!("{}: {}", r.code, r.detail))
    }
    pub fn internal(source: anyhow::Error) -> Self {
        Self {
            source: Some(source),
            ..Self::new(
                ErrorCode::Internal,
                "internal error; the request id identifies it in the logs",
            )
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.detail)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::error!(error = %e, "database unavailable");
                Self::new(
                    ErrorCode::DatabaseUnavailable,
                    "the database is unreachable; try again shortly",
                )
                .with_retry_after(5)
            }
            e => Self::internal(e.into()),
        }
    }
}

/// Turn a unique-constraint violation into 409 with `detail`, anything else into the usual
/// mapping.
pub(crate) fn on_unique(e: sqlx::Error, detail: &str) -> ApiError {
    if crate::db::is_unique_violation(&e) {
        ApiError::conflict(detail)
    } else {
        e.into()
    }
}

impl From<crate::quota::QuotaError> for ApiError {
    fn from(e: crate::quota::QuotaError) -> Self {
        use crate::quota::QuotaError;
        match e {
            QuotaError::Exceeded(_) => ApiError::new(ErrorCode::QuotaExceeded, e.to_string()),
            QuotaError::NoTenant => ApiError::not_found("tenant"),
            QuotaError::Db(e) => e.into(),
        }
    }
}

impl From<crate::serve::MetaError> for ApiError {
    fn from(e: crate::serve::MetaError) -> Self {
        match e {
            crate::serve::MetaError::Db(e) => e.into(),
            crate::serve::MetaError::Record(e) => Self::internal(e),
        }
    }
}

impl From<crate::serve::PredictError> for ApiError {
    fn from(e: crate::serve::PredictError) -> Self {
        use crate::serve::PredictError;
        match e {
            PredictError::Overloaded => Self::new(
                ErrorCode::Overloaded,
                "the model's queue is full; retry shortly",
            )
            .with_retry_after(1),
            PredictError::Deadline => Self::new(
                ErrorCode::Overloaded,
                "the prediction did not run within the deadline",
            )
            .with_retry_after(5),
            PredictError::Rejected(r) => Self::video_rejected(r),
            PredictError::BudgetExceeded {
                clips,
                needed,
                budget,
            } => Self::new(
                ErrorCode::PredictionBudgetExceeded,
                format!(
                    "this prediction would feed the model {clips} clips, {:.1} million pixels; \
                     one request may use {:.1} million (fewer clips, a longer timeline stride or \
                     window, or a shorter video fit)",
                    needed as f64 / 1e6,
                    budget as f64 / 1e6
                ),
            ),
            PredictError::Internal(e) => Self::internal(e),
        }
    }
}

impl From<crate::serve::ExportError> for ApiError {
    fn from(e: crate::serve::ExportError) -> Self {
        match e {
            e @ crate::serve::ExportError::CustomBackbone => {
                Self::validation("format", e.to_string())
            }
            crate::serve::ExportError::Internal(e) => Self::internal(e),
        }
    }
}

/// The problem document (RFC 9457) plus vidtune's extension members.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        if let Some(source) = &self.source {
            tracing::error!(error.cause_chain = ?source, code = self.code.as_str(), "request failed");
        }
        let body = Problem {
            kind: format!("urn:vidtune:problem:{}", self.code.as_str()),
            title: self.code.title(),
            status: status.as_u16(),
            detail: &self.detail,
            code: self.code.as_str(),
            field: self.field.as_deref(),
            request_id: REQUEST_ID.try_with(Clone::clone).ok(),
        };
        let mut resp = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.code == ErrorCode::Unauthenticated {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;
