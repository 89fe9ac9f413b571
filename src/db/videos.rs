//! Videos: one row per file of an upload, from the plan through probing and caching to its split.
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::media::decode::VideoInfo;

/// Where a video stands. Stored and served as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum VideoStatus {
    /// Known to ingest, not yet probed.
    Pending,
    /// Probed, cached and labelled: it takes part in training.
    Accepted,
    /// A video that cannot be used; `reason_code` says why.
    Rejected,
    /// Not a video at all (notes, system files), and not claimed to be one.
    Skipped,
}

impl VideoStatus {
    pub const ALL: [VideoStatus; 4] = [
        VideoStatus::Pending,
        VideoStatus::Accepted,
        VideoStatus::Rejected,
        VideoStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VideoStatus::Pending => "pending",
            VideoStatus::Accepted => "accepted",
            VideoStatus::Rejected => "rejected",
            VideoStatus::Skipped => "skipped",
        }
    }

    /// The exact stored name, as the `status` filter of the video list takes it.
    pub fn parse(s: &str) -> Option<VideoStatus> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VideoStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The part of a dataset a video belongs to. Stored and served as the lowercase name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Accepts the usual folder spellings.
    pub fn parse(s: &str) -> Option<Split> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" | "testing" => Some(Split::Test),
            _ => None,
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A video row as listed by the API.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Video {
    pub id: Uuid,
    pub upload_id: Uuid,
    pub path: String,
    pub status: VideoStatus,
    pub reason_code: Option<String>,
    pub reason: Option<String>,
    pub label: Option<String>,
    pub split: Option<Split>,
    pub patient_id: Option<String>,
    pub sha256: Option<String>,
    pub bytes: Option<i64>,
    pub container: Option<String>,
    pub codec: Option<String>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub fps: Option<f64>,
    pub duration_s: Option<f64>,
    pub frames: Option<i64>,
    pub cache_frames: Option<i32>,
    pub cache_width: Option<i32>,
    pub cache_height: Option<i32>,
    pub cache_fps: Option<f64>,
    /// A DICOM object's de-identified facts ([`crate::media::dicom::DicomFacts`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dicom: Option<serde_json::Value>,
}

pub(super) const VIDEO_COLUMNS: &str =
    "id, upload_id, path, status, reason_code, reason, label, split,
    patient_id, sha256, bytes, container, codec, width, height, fps, duration_s, frames,
    cache_frames, cache_width, cache_height, cache_fps, dicom";

pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    dataset_id: Uuid,
    status: Option<VideoStatus>,
) -> sqlx::Result<Vec<Video>> {
    sqlx::query_as(&format!(
        "select {VIDEO_COLUMNS} from videos
         where tenant_id = $1 and dataset_id = $2 and ($3::text is null or status = $3)
         order by path, id"
    ))
    .bind(tenant_id)
    .bind(dataset_id)
    .bind(status)
    .fetch_all(db)
    .await
}

/// A file of an upload as ingest first records it.
pub struct NewVideo<'a> {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub tenant_id: Uuid,
    pub upload_id: Uuid,
    pub path: &'a str,
    /// `Pending` unless the plan already refused the file.
    pub status: VideoStatus,
    pub reason_code: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub label: Option<&'a str>,
    /// The split the upload gave, if any (kept as `split_given`).
    pub split: Option<Split>,
    pub patient_id: Option<&'a str>,
    pub sha256: Option<&'a str>,
    pub bytes: Option<u64>,
}

pub async fn insert(db: impl PgExecutor<'_>, v: &NewVideo<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into videos (id, dataset_id, tenant_id, upload_id, path, status, reason_code,
             reason, label, split, split_given, patient_id, sha256, bytes)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(v.id)
    .bind(v.dataset_id)
    .bind(v.tenant_id)
    .bind(v.upload_id)
    .bind(v.path)
    .bind(v.status)
    .bind(v.reason_code)
    .bind(v.reason)
    .bind(v.label)
    .bind(v.split)
    .bind(v.split.is_some())
    .bind(v.patient_id)
    .bind(v.sha256)
    .bind(v.bytes.map(|b| b as i64))
    .execute(db)
    .await?;
    Ok(())
}

/// What ingest decided for a video that decoded: its status, and the label, split and patient
/// it learnt from the object (a DICOM UID or attribute), each kept as planned when `None`.
pub struct Probed<'a> {
    pub status: VideoStatus,
    pub reason_code: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub label: Option<&'a str>,
    pub split: Option<Split>,
    pub patient_id: Option<&'a str>,
}

/// A video that decoded: its verdict (accepted, or rejected for its label) and its media facts.
/// A DICOM object's facts are stored with it, and its hashed patient becomes the video's
/// patient unless the upload named one.
pub async fn record_probed(
    db: impl PgExecutor<'_>,
    id: Uuid,
    verdict: &Probed<'_>,
    info: &VideoInfo,
) -> sqlx::Result<()> {
    sqlx::query(
        "update videos set status = $2, reason_code = $3, reason = $4, container = $5,
             codec = $6, width = $7, height = $8, fps = $9, duration_s = $10, frames = $11,
             cache_frames = $12, cache_width = $13, cache_height = $14, cache_fps = $15,
             dicom = $16, patient_id = coalesce($18, patient_id, $17),
             label = coalesce($19, label), split = coalesce($20, split),
             split_given = split_given or $20 is not null
         where id = $1",
    )
    .bind(id)
    .bind(verdict.status)
    .bind(verdict.reason_code)
    .bind(verdict.reason)
    .bind(&info.container)
    .bind(&info.codec)
    .bind(info.width as i32)
    .bind(info.height as i32)
    .bind(info.fps)
    .bind(info.duration_s)
    .bind(info.frames as i64)
    .bind(info.cache_frames as i32)
    .bind(info.cache_width as i32)
    .bind(info.cache_height as i32)
    .bind(info.cache_fps)
    .bind(info.dicom.as_ref().map(sqlx::types::Json))
    .bind(info.dicom.as_ref().and_then(|d| d.patient.as_deref()))
    .bind(verdict.patient_id)
    .bind(verdict.label)
    .bind(verdict.split)
    .execute(db)
    .await?;
    Ok(())
}

/// A video that could not be decoded (or is no video): its verdict and why.
pub async fn record_refused(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: VideoStatus,
    reason_code: &str,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query("update videos set status = $2, reason_code = $3, reason = $4 where id = $1")
        .bind(id)
        .bind(status)
        .bind(reason_code)
        .bind(reason)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn set_split(db: impl PgExecutor<'_>, id: Uuid, split: Split) -> sqlx::Result<()> {
    sqlx::query("update videos set split = $2 where id = $1")
        .bind(id)
        .bind(split)
        .execute(db)
        .await?;
    Ok(())
}

/// Forget what an interrupted ingest of this upload recorded; returns how many rows went.
pub async fn delete_for_upload(db: impl PgExecutor<'_>, upload_id: Uuid) -> sqlx::Result<u64> {
    Ok(sqlx::query("delete from videos where upload_id = $1")
        .bind(upload_id)
        .execute(db)
        .await?
        .rows_affected())
}
