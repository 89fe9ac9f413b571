//! Datasets: create, list, view, delete; upload archives and single videos; list videos; the
//! QA report.
use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query};
use super::upload::{PartialFile, receive, verify_checksum};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Routes};
use crate::db::{self, datasets::Dataset};
use crate::ingest::split::{Split, SplitSpec};
use crate::ingest::{self, DatasetDirs, VideoMeta};
use crate::media::decode::CacheSpec;

pub fn routes(r: Routes) -> Routes {
    use Access::Tenant;
    r.op(
        Method::POST,
        "/v1/datasets",
        "dataset_create",
        Tenant,
        dataset_create,
    )
    .op(
        Method::GET,
        "/v1/datasets",
        "dataset_list",
        Tenant,
        dataset_list,
    )
    .op(
        Method::GET,
        "/v1/datasets/{dataset_id}",
        "dataset_view",
        Tenant,
        dataset_view,
    )
    .op(
        Method::DELETE,
        "/v1/datasets/{dataset_id}",
        "dataset_delete",
        Tenant,
        dataset_delete,
    )
    .streaming_op(
        Method::POST,
        "/v1/datasets/{dataset_id}/uploads",
        "dataset_upload",
        Tenant,
        dataset_upload,
    )
    .streaming_op(
        Method::POST,
        "/v1/datasets/{dataset_id}/videos",
        "video_create",
        Tenant,
        video_create,
    )
    .op(
        Method::GET,
        "/v1/datasets/{dataset_id}/videos",
        "video_list",
        Tenant,
        video_list,
    )
    .op(
        Method::GET,
        "/v1/datasets/{dataset_id}/report",
        "dataset_report",
        Tenant,
        dataset_report,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetCreate {
    name: String,
    #[serde(default)]
    description: String,
    /// Optional closed set of labels.
    classes: Option<Vec<String>>,
    #[serde(default)]
    split: SplitSpec,
    #[serde(default)]
    cache: Option<CacheCreate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheCreate {
    short_side: Option<u32>,
    fps: Option<f64>,
}

async fn dataset_create(
    State(s): State<AppState>,
    caller: Caller,
    Json(body): Json<DatasetCreate>,
) -> ApiResult<impl IntoResponse> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 || has_control(name) {
        return Err(ApiError::validation(
            "name",
            "1 to 200 characters, no control characters",
        ));
    }
    // PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database.
    if body.description.len() > 10_000 || body.description.contains('\0') {
        return Err(ApiError::validation(
            "description",
            "at most 10000 characters, no NUL",
        ));
    }
    if let Some(classes) = &body.classes {
        let unique: HashSet<_> = classes.iter().collect();
        if classes.is_empty()
            || unique.len() != classes.len()
            || classes
                .iter()
                .any(|c| c.trim().is_empty() || c.len() > 100 || has_control(c))
        {
            return Err(ApiError::validation(
                "classes",
                "a non-empty list of distinct, non-empty labels of at most 100 characters \
                 without control characters",
            ));
        }
    }
    body.split
        .validate()
        .map_err(|e| ApiError::validation("split", e))?;
    let mut cache = CacheSpec::default();
    if let Some(c) = &body.cache {
        if let Some(side) = c.short_side {
            if !(32..=1080).contains(&side) {
                return Err(ApiError::validation(
                    "cache.short_side",
                    "between 32 and 1080",
                ));
            }
            cache.short_side = side;
        }
        if let Some(fps) = c.fps {
            if !(fps.is_finite() && (1.0..=120.0).contains(&fps)) {
                return Err(ApiError::validation("cache.fps", "between 1 and 120"));
            }
            cache.fps = fps;
        }
    }
    let id = db::datasets::create(
        &s.db,
        &db::datasets::NewDataset {
            tenant_id: caller.tenant_id,
            name,
            description: &body.description,
            classes: body.classes.as_deref(),
            split: serde_json::to_value(body.split).expect("serialises"),
            cache_spec: json!({ "short_side": cache.short_side, "fps": cache.fps }),
        },
    )
    .await
    .map_err(|e| super::admin::on_unique(e, "a dataset with this name already exists"))?;
    let dataset = fetch(&s, &caller, id).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/datasets/{id}"))],
        AuditResource(id),
        Json(dataset),
    ))
}

async fn fetch(s: &AppState, caller: &Caller, id: Uuid) -> ApiResult<Dataset> {
    db::datasets::get(&s.db, caller.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("dataset"))
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

async fn dataset_list(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Items<Dataset>>> {
    Ok(Json(Items {
        items: db::datasets::list(&s.db, caller.tenant_id).await?,
    }))
}

async fn dataset_view(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Dataset>> {
    Ok(Json(fetch(&s, &caller, id).await?))
}

async fn dataset_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    match db::datasets::delete(&s.db, caller.tenant_id, id).await? {
        None => Err(ApiError::not_found("dataset")),
        Some(false) => Err(ApiError::conflict(
            "the dataset is receiving or processing an upload; delete it once that finishes",
        )),
        Some(true) => {
            let root = DatasetDirs::new(&s.settings.data_dir, id).root;
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&root))
                .await
                .map_err(|e| ApiError::internal(e.into()))?
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| ApiError::internal(e.into()))?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Holds the dataset's "receiving" flag; puts the dataset back if the upload does not complete
/// (also when the client disconnects and the handler is dropped).
struct Receiving {
    db: sqlx::PgPool,
    dataset_id: Uuid,
    armed: bool,
}

impl Receiving {
    async fn claim(s: &AppState, caller: &Caller, dataset_id: Uuid) -> ApiResult<Self> {
        match db::datasets::begin_receiving(&s.db, caller.tenant_id, dataset_id).await? {
            None => Err(ApiError::not_found("dataset")),
            Some(false) => Err(ApiError::conflict(
                "another upload to this dataset is being received or processed; retry when it is ready",
            )
            .with_retry_after(10)),
            Some(true) => Ok(Self {
                db: s.db.clone(),
                dataset_id,
                armed: true,
            }),
        }
    }
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if self.armed {
            let (db, id) = (self.db.clone(), self.dataset_id);
            tokio::spawn(async move {
                if let Err(e) = db::datasets::abort_receiving(&db, id).await {
                    tracing::error!(error = %e, dataset_id = %id, "could not release an aborted upload");
                }
            });
        }
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// 202 with the dataset's Location, once the body is safely on disk and ingest has begun.
async fn accept_upload(
    s: &AppState,
    receiving: Receiving,
    upload: db::datasets::NewUpload<'_>,
) -> ApiResult<impl IntoResponse + use<>> {
    db::datasets::upload_received(&s.db, &upload).await?;
    receiving.disarm();
    let dataset_id = upload.dataset_id;
    ingest::spawn(
        s.db.clone(),
        s.settings.data_dir.clone(),
        s.ingest.clone(),
        db::datasets::PendingUpload {
            id: upload.id,
            sha256: upload.sha256.to_owned(),
            dataset_id,
            tenant_id: upload.tenant_id,
            kind: upload.kind.to_owned(),
            meta: upload.meta,
        },
    );
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/datasets/{dataset_id}"))],
        AuditResource(dataset_id),
        Json(json!({
            "dataset_id": dataset_id,
            "upload_id": upload.id,
            "bytes": upload.bytes,
            "sha256": upload.sha256,
            "status": "processing",
        })),
    ))
}

const ARCHIVE_TYPES: &[&str] = &[
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-compressed-tar",
    "application/octet-stream",
];

/// An archive (zip, tar, tar.gz) into a dataset: raw body or multipart field `file`.
async fn dataset_upload(
    State(s): State<AppState>,
    caller: Caller,
    Path(dataset_id): Path<Uuid>,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    let headers = req.headers().clone();
    let ctype = content_type(&headers);
    let multipart = ctype == "multipart/form-data";
    if !multipart && !ARCHIVE_TYPES.contains(&ctype.as_str()) {
        return Err(ApiError::new(
            super::ErrorCode::UnsupportedMediaType,
            "send the archive as application/zip, application/x-tar, application/gzip or \
             application/octet-stream, or as multipart/form-data field `file`",
        ));
    }
    let receiving = Receiving::claim(&s, &caller, dataset_id).await?;
    let upload_id = Uuid::new_v4();
    let dest = DatasetDirs::new(&s.settings.data_dir, dataset_id)
        .incoming()
        .join(upload_id.to_string());
    let partial = PartialFile::new(dest.clone());
    let received = receive(&s, req, &dest, s.settings.max_upload_bytes)
        .await?
        .received;
    verify_checksum(&headers, &received)?;
    let upload = db::datasets::NewUpload {
        id: upload_id,
        dataset_id,
        tenant_id: caller.tenant_id,
        kind: "archive",
        bytes: received.bytes,
        sha256: &received.sha256,
        meta: json!({}),
    };
    let response = accept_upload(&s, receiving, upload).await?;
    partial.keep();
    Ok(response)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VideoQuery {
    label: Option<String>,
    split: Option<String>,
    patient_id: Option<String>,
    filename: Option<String>,
}

/// One video: multipart (`file`, `label`, optional `split`, `patient_id`) or a raw body with
/// those as query parameters.
async fn video_create(
    State(s): State<AppState>,
    caller: Caller,
    Path(dataset_id): Path<Uuid>,
    Query(q): Query<VideoQuery>,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    let headers = req.headers().clone();
    let receiving = Receiving::claim(&s, &caller, dataset_id).await?;
    let upload_id = Uuid::new_v4();
    let dir = DatasetDirs::new(&s.settings.data_dir, dataset_id).files(upload_id);
    let dest = dir.join("video");
    let partial = PartialFile::new(dest.clone());
    let incoming = receive(&s, req, &dest, s.settings.max_video_bytes).await?;
    // Form fields win over query parameters.
    let mut fields = q;
    for (name, slot) in [
        ("label", &mut fields.label),
        ("split", &mut fields.split),
        ("patient_id", &mut fields.patient_id),
        ("filename", &mut fields.filename),
    ] {
        if let Some(v) = incoming.field(name) {
            *slot = Some(v.to_owned());
        }
    }
    if fields.filename.is_none() {
        fields.filename = incoming.file_name.clone();
    }
    let received = incoming.received;
    verify_checksum(&headers, &received)?;
    let meta = video_meta(fields)?;
    let upload = db::datasets::NewUpload {
        id: upload_id,
        dataset_id,
        tenant_id: caller.tenant_id,
        kind: "video",
        bytes: received.bytes,
        sha256: &received.sha256,
        meta: serde_json::to_value(meta).expect("serialises"),
    };
    let response = accept_upload(&s, receiving, upload).await?;
    partial.keep();
    Ok(response)
}

/// Control characters (NUL above all, which PostgreSQL text cannot hold) have no place in names
/// and labels.
fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn video_meta(q: VideoQuery) -> ApiResult<VideoMeta> {
    let label = q.label.unwrap_or_default().trim().to_owned();
    if label.is_empty() || label.len() > 100 || has_control(&label) {
        return Err(ApiError::validation(
            "label",
            "a label of 1 to 100 characters, without control characters, is required",
        ));
    }
    let split = match q.split.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            Split::parse(s).ok_or_else(|| ApiError::validation("split", "train, val or test"))?,
        ),
    };
    let patient_id = q
        .patient_id
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty());
    if patient_id
        .as_ref()
        .is_some_and(|p| p.len() > 100 || has_control(p))
    {
        return Err(ApiError::validation(
            "patient_id",
            "at most 100 characters, no control characters",
        ));
    }
    // Only shown back to the tenant: keep it, minus what cannot be stored or displayed.
    let filename = q
        .filename
        .map(|f| f.rsplit(['/', '\\']).next().unwrap_or_default().to_owned())
        .map(|f| f.replace(char::is_control, "\u{FFFD}"))
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "video".into());
    Ok(VideoMeta {
        filename,
        label,
        split,
        patient_id,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VideoListQuery {
    status: Option<String>,
}

async fn video_list(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<VideoListQuery>,
) -> ApiResult<Json<Items<db::datasets::Video>>> {
    if let Some(st) = &q.status
        && !["pending", "accepted", "rejected", "skipped"].contains(&st.as_str())
    {
        return Err(ApiError::validation(
            "status",
            "pending, accepted, rejected or skipped",
        ));
    }
    fetch(&s, &caller, id).await?;
    Ok(Json(Items {
        items: db::datasets::list_videos(&s.db, caller.tenant_id, id, q.status.as_deref()).await?,
    }))
}

/// A video shorter than this many cached frames cannot fill one standard 16-frame clip.
const TYPICAL_CLIP_FRAMES: i32 = 16;
/// Fewer videos than this in a class makes its metrics unreliable.
const FEW_VIDEOS: usize = 10;

async fn dataset_report(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Value>> {
    let dataset = fetch(&s, &caller, id).await?;
    let videos = db::datasets::dataset_videos(&s.db, id).await?;
    Ok(Json(report(&dataset, &videos)))
}

fn stats(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    json!({
        "min": values[0],
        "median": median,
        "max": values[n - 1],
        "mean": values.iter().sum::<f64>() / n as f64,
        "total": values.iter().sum::<f64>(),
    })
}

/// The QA report: what is in the dataset and what a careful engineer would want to know.
fn report(d: &Dataset, videos: &[db::datasets::Video]) -> Value {
    let accepted: Vec<_> = videos.iter().filter(|v| v.status == "accepted").collect();
    let mut classes: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for v in &accepted {
        let label = v.label.as_deref().unwrap_or("");
        let split = v.split.as_deref().unwrap_or("unassigned");
        *classes.entry(label).or_default().entry(split).or_default() += 1;
    }
    let mut warnings = Vec::new();
    let spec: SplitSpec = serde_json::from_value(d.split.clone()).unwrap_or_default();
    let class_rows: Vec<Value> = classes
        .iter()
        .map(|(label, by_split)| {
            let total: usize = by_split.values().sum();
            if total < FEW_VIDEOS {
                warnings.push(json!({
                    "code": "few_videos_in_class",
                    "detail": format!("class `{label}` has {total} videos; at least {FEW_VIDEOS} are advisable"),
                    "label": label,
                }));
            }
            for (split, ratio) in [("val", spec.val), ("test", spec.test)] {
                if ratio > 0.0 && by_split.get(split).copied().unwrap_or(0) == 0 {
                    warnings.push(json!({
                        "code": "class_missing_from_split",
                        "detail": format!("class `{label}` has no video in the {split} split"),
                        "label": label,
                        "split": split,
                    }));
                }
            }
            json!({
                "label": label,
                "total": total,
                "train": by_split.get("train").copied().unwrap_or(0),
                "val": by_split.get("val").copied().unwrap_or(0),
                "test": by_split.get("test").copied().unwrap_or(0),
            })
        })
        .collect();
    if classes.len() == 1 {
        warnings.push(json!({
            "code": "single_class",
            "detail": "only one class: a classifier needs at least two",
        }));
    }

    let short: Vec<&str> = accepted
        .iter()
        .filter(|v| v.cache_frames.unwrap_or(0) < TYPICAL_CLIP_FRAMES)
        .map(|v| v.path.as_str())
        .collect();
    if !short.is_empty() {
        warnings.push(json!({
            "code": "short_videos",
            "detail": format!("{} videos are shorter than a {TYPICAL_CLIP_FRAMES}-frame clip at the cache rate; clips from them repeat frames", short.len()),
            "paths": short,
        }));
    }

    let mut by_hash: HashMap<&str, Vec<&db::datasets::Video>> = HashMap::new();
    for v in &accepted {
        if let Some(h) = v.sha256.as_deref() {
            by_hash.entry(h).or_default().push(v);
        }
    }
    let mut dups: Vec<_> = by_hash.into_iter().filter(|(_, vs)| vs.len() > 1).collect();
    dups.sort_by(|a, b| a.0.cmp(b.0));
    for (hash, vs) in dups {
        let splits: HashSet<_> = vs.iter().filter_map(|v| v.split.as_deref()).collect();
        let across = splits.len() > 1;
        warnings.push(json!({
            "code": if across { "duplicate_across_splits" } else { "duplicate_content" },
            "detail": if across {
                "identical videos in different splits: evaluation would measure memory, not skill"
            } else {
                "identical videos appear more than once"
            },
            "sha256": hash,
            "paths": vs.iter().map(|v| v.path.as_str()).collect::<Vec<_>>(),
        }));
    }

    let mut patients: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for v in &accepted {
        if let (Some(p), Some(s)) = (v.patient_id.as_deref(), v.split.as_deref()) {
            patients.entry(p).or_default().insert(s);
        }
    }
    for (patient, splits) in patients {
        if splits.len() > 1 {
            let mut splits: Vec<_> = splits.into_iter().collect();
            splits.sort();
            warnings.push(json!({
                "code": "patient_in_two_splits",
                "detail": "one patient's videos are in more than one split (leakage between training and evaluation)",
                "patient_id": patient,
                "splits": splits,
            }));
        }
    }

    let mut resolutions: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    let mut codecs: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &accepted {
        *resolutions
            .entry((v.width.unwrap_or(0), v.height.unwrap_or(0)))
            .or_default() += 1;
        *codecs
            .entry(v.codec.as_deref().unwrap_or("unknown"))
            .or_default() += 1;
    }
    let listed = |status: &str| -> Vec<Value> {
        videos
            .iter()
            .filter(|v| v.status == status)
            .map(|v| json!({ "id": v.id, "path": v.path, "code": v.reason_code, "reason": v.reason }))
            .collect()
    };
    let count = |status: &str| videos.iter().filter(|v| v.status == status).count();
    json!({
        "dataset_id": d.id,
        "status": d.status,
        "content_hash": d.content_hash,
        "totals": {
            "videos": videos.len(),
            "accepted": accepted.len(),
            "rejected": count("rejected"),
            "skipped": count("skipped"),
            "pending": count("pending"),
        },
        "classes": class_rows,
        "splits": {
            "train": accepted.iter().filter(|v| v.split.as_deref() == Some("train")).count(),
            "val": accepted.iter().filter(|v| v.split.as_deref() == Some("val")).count(),
            "test": accepted.iter().filter(|v| v.split.as_deref() == Some("test")).count(),
        },
        "duration_s": stats(accepted.iter().filter_map(|v| v.duration_s).collect()),
        "fps": stats(accepted.iter().filter_map(|v| v.fps).collect()),
        "frames": stats(accepted.iter().filter_map(|v| v.frames.map(|f| f as f64)).collect()),
        "resolutions": resolutions.into_iter().map(|((w, h), n)| json!({"width": w, "height": h, "videos": n})).collect::<Vec<_>>(),
        "codecs": codecs,
        "rejected": listed("rejected"),
        "skipped": listed("skipped"),
        "warnings": warnings,
    })
}
