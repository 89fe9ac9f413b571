//! Extractors whose rejections are problem+json with a useful detail.
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};

use super::error::{ApiError, ErrorCode};

/// `axum::Json`, rejecting with `validation_failed` / `bad_request` / `unsupported_media_type`.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// `axum::extract::Path`; a malformed id answers 404, as an unknown one does.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` with a 400 problem naming what was wrong.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // 400 syntax, 413 too large, 415 not JSON, 422 wrong shape: the status says which.
        ApiError::new(ErrorCode::for_status(r.status()), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(_: PathRejection) -> Self {
        ApiError::new(ErrorCode::NotFound, "no such resource (malformed id)")
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl<T> axum::response::IntoResponse for Json<T>
where
    T: serde::Serialize,
{
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// How a listing is sent: JSON, or CSV for spreadsheets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

impl Format {
    /// `?format=json|csv` when given, else CSV when `Accept` asks for `text/csv`, else JSON.
    pub fn negotiate(
        format: Option<&str>,
        headers: &axum::http::HeaderMap,
    ) -> Result<Self, ApiError> {
        match format {
            Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some(_) => Err(ApiError::validation("format", "json or csv")),
            None => Ok(
                if headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("text/csv"))
                {
                    Format::Csv
                } else {
                    Format::Json
                },
            ),
        }
    }
}

/// A `text/csv` answer.
pub fn csv_response(body: impl Into<axum::body::Body>) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// A list answer, `{"items": [...]}`: the shape of every collection the API returns.
#[derive(Debug, serde::Serialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}

impl<T> From<Vec<T>> for Items<T> {
    fn from(items: Vec<T>) -> Self {
        Self { items }
    }
}

/// For `Option<Option<T>>` fields with `#[serde(default)]`: a missing field stays `None`, an
/// explicit `null` becomes `Some(None)`.
pub fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}
