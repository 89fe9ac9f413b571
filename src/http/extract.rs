//! Extractors whose rejections are problem+json with a useful detail, and the one check every
//! string a client sends passes through: no control characters (Postgres refuses NUL in text, and
//! the others have no business in names, labels or logs).
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, ErrorCode};

/// Whether `c` may appear in text a client sends: anything but a control character (Unicode
/// `Cc`: U+0000–U+001F, U+007F–U+009F), except tab, line feed and carriage return.
pub fn allowed_char(c: char) -> bool {
    !c.is_control() || matches!(c, '\t' | '\n' | '\r')
}

/// Refuse `text` (the value of `field`) when it holds a control character: 422 naming the field.
pub fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    match text.chars().find(|&c| !allowed_char(c)) {
        None => Ok(()),
        Some(c) => Err(ApiError::validation(
            field,
            format!(
                "control characters are not accepted (found U+{:04X})",
                u32::from(c)
            ),
        )),
    }
}

/// Refuse a name a client gives (an object key, a query parameter or a form field's name) that
/// holds any control character, tab and line breaks included: 422 naming `field`.
pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    match name.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(ApiError::validation(
            field,
            format!(
                "control characters are not accepted in names (found U+{:04X})",
                u32::from(c)
            ),
        )),
    }
}

/// Every string in a JSON document checked by [`check_text`], and every key by [`check_name`];
/// the field is named by its path (`hyperparameters.device`, `classes[2]`).
fn check_json(value: &Value, at: &mut String) -> Result<(), ApiError> {
    let len = at.len();
    match value {
        Value::String(s) => check_text(field_name(at), s),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| {
            at.push_str(&format!("[{i}]"));
            let r = check_json(v, at);
            at.truncate(len);
            r
        }),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            // A key is named by the object that holds it: the key itself may not be printable.
            check_name(field_name(at), k)?;
            if !at.is_empty() {
                at.push('.');
            }
            at.push_str(k);
            let r = check_json(v, at);
            at.truncate(len);
            r
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

fn field_name(at: &str) -> &str {
    if at.is_empty() { "body" } else { at }
}

/// A number written with a zero fraction (`3.0`) is the integer it spells, as JSON Schema reads
/// it: integer fields accept it, and number fields read it as before.
fn integral_floats_as_integers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().expect("an f64 number");
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// A JSON value read as serde_json reads one, except that an object (a struct) must be written
/// as an object: serde would also take an array of its fields in order, which no document allows.
struct Strict(Value);

impl<'de> serde::de::IntoDeserializer<'de, serde_json::Error> for Strict {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> serde::Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        use serde::de::value::{MapDeserializer, SeqDeserializer};
        match self.0 {
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Strict));
                let out = v.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Object(map) => {
                let mut map = MapDeserializer::new(map.into_iter().map(|(k, x)| (k, Strict(x))));
                let out = v.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
            scalar => scalar.deserialize_any(v),
        }
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        if let Value::Array(_) = self.0 {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &"an object",
            ));
        }
        self.deserialize_any(v)
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(map) => {
                let map = serde::de::value::MapDeserializer::new(
                    map.into_iter().map(|(k, x)| (k, Strict(x))),
                );
                v.visit_enum(serde::de::value::MapAccessDeserializer::new(map))
            }
            other => other.deserialize_enum(name, variants, v),
        }
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        v.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// `axum::Json`, rejecting with `validation_failed` / `bad_request` / `unsupported_media_type`;
/// strings holding control characters are refused with 422 naming the field.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Content type, size and syntax as axum checks them; then the strings, then the shape.
        let axum::Json(mut value) = axum::Json::<Value>::from_request(req, state).await?;
        check_json(&value, &mut String::new())?;
        integral_floats_as_integers(&mut value);
        serde_path_to_error::deserialize(Strict(value))
            .map(Json)
            .map_err(|e| {
                let path = e.path().to_string();
                let detail =
                    format!("Failed to deserialize the JSON body into the target type: {e}");
                if path == "." {
                    ApiError::new(ErrorCode::ValidationFailed, detail)
                } else {
                    ApiError::validation(path, detail)
                }
            })
    }
}

/// `axum::extract::Path`; a malformed id answers 404, as an unknown one does.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` with a 400 problem naming what was wrong; a parameter holding a
/// control character is refused with 422 naming it.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            check_name("query", &name)?;
            check_text(&name, &value)?;
        }
        let axum::extract::Query(q) =
            axum::extract::Query::from_request_parts(parts, state).await?;
        Ok(Query(q))
    }
}

/// A request header carrying data (such as `Idempotency-Key`): `None` when absent, else 1 to
/// `max_len` printable ASCII characters (spaces included), or 422 naming the header.
pub fn header_text<'h>(
    headers: &'h HeaderMap,
    name: &str,
    max_len: usize,
) -> Result<Option<&'h str>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .filter(|t| {
            !t.is_empty() && t.len() <= max_len && t.bytes().all(|b| (0x20..0x7f).contains(&b))
        })
        .map(Some)
        .ok_or_else(|| {
            ApiError::validation(
                name,
                format!("{name} must be 1 to {max_len} printable ASCII characters"),
            )
        })
}

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
