//! Datasets: create, list, view, delete; upload archives and single videos; list videos; the
//! QA report. The work is `ingest`'s; these handlers parse, call it and map its errors.
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::extract::{Json, Path, Query};
use super::upload::{UploadCap, receive, verify_checksum};
use super::{Access, ApiError, ApiResult, AuditResource, Caller, Items, Routes};
use crate::datadir::PartialFile;
use crate::db;
use crate::db::datasets::{Dataset, DatasetStatus};
use crate::db::videos::{Video, VideoStatus};
use crate::ingest::datasets::{NewDataset, VideoFields};
use crate::ingest::{self, DatasetError, Receiving, Report, UploadContent, VideoMeta};
use crate::retention;

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
        Method::POST,
        "/v1/datasets/{dataset_id}/imports",
        "dataset_import",
        Tenant,
        dataset_import,
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

impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        match e {
            DatasetError::Invalid { field, detail } => ApiError::validation(field, detail),
            DatasetError::NotFound => ApiError::not_found("dataset"),
            DatasetError::NameTaken => ApiError::conflict("a dataset with this name already exists"),
            DatasetError::UploadInProgress => ApiError::conflict(
                "another upload to this dataset is being received or processed; retry when it is ready",
            )
            .with_retry_after(10),
            DatasetError::Import(ingest::import::ImportError::Invalid { field, detail }) => {
                ApiError::validation(field, detail)
            }
            DatasetError::Import(ingest::import::ImportError::NoPacs) => ApiError::new(
                super::ErrorCode::PacsNotConfigured,
                "imports need a PACS: an operator sets VIDTUNE_PACS_URL (and its credentials)",
            ),
            DatasetError::Database(e) => e.into(),
            DatasetError::Internal(e) => ApiError::internal(e),
        }
    }
}

async fn dataset_create(
    State(s): State<AppState>,
    caller: Caller,
    Json(body): Json<NewDataset>,
) -> ApiResult<impl IntoResponse> {
    let dataset = ingest::datasets::create(&s.db, caller.tenant_id, &body).await?;
    let id = dataset.id;
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

/// Delete the dataset: its rows now, its sources, caches and the checkpoints of jobs trained on
/// it in the background (202). Jobs and models keep its lineage; a queued or running job on it
/// refuses the deletion (`dataset_in_use`).
async fn dataset_delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<impl IntoResponse> {
    let by = super::deletions::requester(&caller);
    let d = retention::delete_dataset(&s.db, &s.data, caller.tenant_id, id, &by).await?;
    Ok(super::deletions::accepted(d))
}

/// The 202 answer to an upload. Fields in alphabetical order, as the API has always sent them.
#[derive(Serialize)]
struct UploadAccepted {
    bytes: u64,
    dataset_id: Uuid,
    sha256: String,
    /// Always `processing`: ingest has begun.
    status: DatasetStatus,
    upload_id: Uuid,
}

/// Once the body is safely on disk: record it, start ingest, and answer 202 with the dataset's
/// Location.
async fn accept_upload(
    s: &AppState,
    receiving: Receiving,
    dataset_id: Uuid,
    content: UploadContent,
    received: &super::upload::Received,
) -> ApiResult<impl IntoResponse + use<>> {
    let upload_id = receiving.upload_id();
    let (data_dir, config) = (s.settings.data_dir.clone(), s.ingest.clone());
    receiving
        .accept(data_dir, config, content, received.bytes, &received.sha256)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/datasets/{dataset_id}"))],
        AuditResource(dataset_id),
        Json(UploadAccepted {
            bytes: received.bytes,
            dataset_id,
            sha256: received.sha256.clone(),
            status: DatasetStatus::Processing,
            upload_id,
        }),
    ))
}

/// `202` for an import: its fetch and ingest run in the background, its videos and report say
/// how it went.
#[derive(Serialize)]
struct ImportAccepted {
    dataset_id: Uuid,
    /// Always `processing`.
    status: DatasetStatus,
    upload_id: Uuid,
}

/// Studies from the configured PACS into the dataset (QIDO-RS query or study UIDs, a label
/// mapping).
async fn dataset_import(
    State(s): State<AppState>,
    caller: Caller,
    Path(dataset_id): Path<Uuid>,
    Json(body): Json<ingest::import::ImportRequest>,
) -> ApiResult<impl IntoResponse> {
    let data_dir = &s.settings.data_dir;
    let upload_id = ingest::import::start(
        &s.db,
        data_dir,
        &s.ingest,
        caller.tenant_id,
        dataset_id,
        body,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/datasets/{dataset_id}"))],
        AuditResource(dataset_id),
        Json(ImportAccepted {
            dataset_id,
            status: DatasetStatus::Processing,
            upload_id,
        }),
    ))
}

/// Reads and checks an upload's body while the dataset is held for it; a refusal gives the
/// dataset back before it is answered, so a client that retries at once finds it free.
async fn or_release<T>(
    receiving: Receiving,
    body: impl Future<Output = ApiResult<T>>,
) -> ApiResult<(Receiving, T)> {
    match body.await {
        Ok(v) => Ok((receiving, v)),
        Err(e) => {
            receiving.release().await;
            Err(e)
        }
    }
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
    let ctype = super::upload::content_type(&headers);
    let multipart = ctype == "multipart/form-data";
    if !multipart && !ARCHIVE_TYPES.contains(&ctype.as_str()) {
        return Err(ApiError::new(
            super::ErrorCode::UnsupportedMediaType,
            "send the archive as application/zip, application/x-tar, application/gzip or \
             application/octet-stream, or as multipart/form-data field `file`",
        ));
    }
    let cap = UploadCap::of(&s, caller.tenant_id, s.settings.max_upload_bytes).await?;
    let receiving = Receiving::claim(&s.db, caller.tenant_id, dataset_id).await?;
    let dest = s
        .data
        .dataset(dataset_id)
        .archive_body(receiving.upload_id());
    let partial = PartialFile::new(dest.clone());
    let received = async {
        let received = receive(&s, req, &dest, cap.bytes)
            .await
            .map_err(|e| cap.explain(e))?
            .received;
        verify_checksum(&headers, &received)?;
        Ok(received)
    };
    let (receiving, received) = or_release(receiving, received).await?;
    let response =
        accept_upload(&s, receiving, dataset_id, UploadContent::Archive, &received).await?;
    partial.keep();
    Ok(response)
}

/// One video: multipart (`file`, `label`, optional `split`, `patient_id`) or a raw body with
/// those as query parameters.
async fn video_create(
    State(s): State<AppState>,
    caller: Caller,
    Path(dataset_id): Path<Uuid>,
    Query(q): Query<VideoFields>,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    let headers = req.headers().clone();
    let cap = UploadCap::of(&s, caller.tenant_id, s.settings.max_video_bytes).await?;
    let receiving = Receiving::claim(&s.db, caller.tenant_id, dataset_id).await?;
    let dest = s.data.dataset(dataset_id).video_body(receiving.upload_id());
    let partial = PartialFile::new(dest.clone());
    let body = async {
        let incoming = receive(&s, req, &dest, cap.bytes)
            .await
            .map_err(|e| cap.explain(e))?;
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
        let content = UploadContent::Video(VideoMeta::parse(fields)?);
        Ok((content, received))
    };
    let (receiving, (content, received)) = or_release(receiving, body).await?;
    let response = accept_upload(&s, receiving, dataset_id, content, &received).await?;
    partial.keep();
    Ok(response)
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
) -> ApiResult<Json<Items<Video>>> {
    let status = match q.status.as_deref() {
        None => None,
        Some(st) => Some(VideoStatus::parse(st).ok_or_else(|| {
            ApiError::validation("status", "pending, accepted, rejected or skipped")
        })?),
    };
    fetch(&s, &caller, id).await?;
    Ok(Json(Items {
        items: db::videos::list(&s.db, caller.tenant_id, id, status).await?,
    }))
}

async fn dataset_report(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Report>> {
    let dataset = fetch(&s, &caller, id).await?;
    let videos = db::datasets::dataset_videos(&s.db, id).await?;
    Ok(Json(ingest::report(&dataset, &videos)))
}
