//! Datasets: the rows the API shows, the receiving flag that serialises uploads, and the
//! progress and outcome ingest writes. Uploads and videos have their own modules.
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

use super::videos::VIDEO_COLUMNS;
/// The rows [`dataset_videos`] returns, here as well because callers reach them through datasets.
pub use super::videos::Video;

/// Where a dataset stands. Stored and served as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DatasetStatus {
    /// Created, or receiving an upload, with nothing usable yet.
    Uploading,
    /// An upload is being ingested.
    Processing,
    /// Holds accepted videos: jobs may train on it.
    Ready,
    /// No usable video; `status_reason` says why.
    Failed,
}

impl DatasetStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetStatus::Uploading => "uploading",
            DatasetStatus::Processing => "processing",
            DatasetStatus::Ready => "ready",
            DatasetStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for DatasetStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dataset as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Dataset {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub description: String,
    pub status: DatasetStatus,
    pub status_reason: Option<String>,
    pub classes: Option<Vec<String>>,
    pub split: serde_json::Value,
    pub cache_spec: serde_json::Value,
    /// DICOM options (`label_attribute`, `series_as_clip`).
    pub dicom: serde_json::Value,
    /// Whether each video's source is deleted once its training cache is written.
    pub discard_sources: bool,
    pub videos_total: i32,
    pub videos_done: i32,
    pub videos_accepted: i64,
    pub videos_rejected: i64,
    pub videos_skipped: i64,
    pub content_hash: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

const DATASET_SELECT: &str = "
    select d.id, d.tenant_id, d.name, d.description, d.status, d.status_reason, d.classes,
           d.split, d.cache_spec, d.dicom, d.discard_sources, d.videos_total, d.videos_done, d.content_hash,
           d.created_at, d.updated_at,
           count(v.id) filter (where v.status = 'accepted') as videos_accepted,
           count(v.id) filter (where v.status = 'rejected') as videos_rejected,
           count(v.id) filter (where v.status = 'skipped') as videos_skipped
    from datasets d left join videos v on v.dataset_id = d.id";

/// Fields of a new dataset.
pub struct NewDataset<'a> {
    pub tenant_id: Uuid,
    pub name: &'a str,
    pub description: &'a str,
    pub classes: Option<&'a [String]>,
    pub split: serde_json::Value,
    pub cache_spec: serde_json::Value,
    pub dicom: serde_json::Value,
    pub discard_sources: bool,
}

pub async fn create(db: impl PgExecutor<'_>, d: &NewDataset<'_>) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into datasets (id, tenant_id, name, description, classes, split, cache_spec,
             dicom, discard_sources)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(d.tenant_id)
    .bind(d.name)
    .bind(d.description)
    .bind(d.classes)
    .bind(&d.split)
    .bind(&d.cache_spec)
    .bind(&d.dicom)
    .bind(d.discard_sources)
    .execute(db)
    .await?;
    Ok(id)
}

pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Dataset>> {
    sqlx::query_as(&format!(
        "{DATASET_SELECT} where d.tenant_id = $1 and d.id = $2 group by d.id"
    ))
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn list(db: impl PgExecutor<'_>, tenant_id: Uuid) -> sqlx::Result<Vec<Dataset>> {
    sqlx::query_as(&format!(
        "{DATASET_SELECT} where d.tenant_id = $1 group by d.id order by d.created_at desc"
    ))
    .bind(tenant_id)
    .fetch_all(db)
    .await
}

/// Mark the dataset as receiving an upload. `Ok(None)`: no such dataset; `Ok(Some(false))`:
/// another upload or an ingest is in progress.
pub async fn begin_receiving(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<bool>> {
    let row: Option<(bool,)> = sqlx::query_as(
        "with target as (select id from datasets where tenant_id = $1 and id = $2),
              claimed as (update datasets d set receiving = true, status = 'uploading'
                          from target t
                          where d.id = t.id and not d.receiving and d.status <> 'processing'
                          returning d.id)
         select exists (select 1 from claimed) from target",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
}

/// The body did not arrive whole: go back to what the dataset was before (ready if it already
/// holds accepted videos), so nothing half-received is ever usable.
pub async fn abort_receiving(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "update datasets set receiving = false,
             status = case when exists (select 1 from videos v where v.dataset_id = $1
                                         and v.status = 'accepted') then 'ready' else 'uploading' end
         where id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Datasets left `receiving` by a process that died mid-upload.
pub async fn reset_interrupted_receiving(db: &sqlx::PgPool) -> sqlx::Result<u64> {
    let ids: Vec<(Uuid,)> = sqlx::query_as("select id from datasets where receiving")
        .fetch_all(db)
        .await?;
    for (id,) in &ids {
        abort_receiving(db, *id).await?;
    }
    Ok(ids.len() as u64)
}

/// A dataset row needed by ingest.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IngestTarget {
    pub id: Uuid,
    pub classes: Option<Vec<String>>,
    pub split: serde_json::Value,
    pub cache_spec: serde_json::Value,
    /// The DICOM attribute whose value labels an object nothing else labelled.
    pub label_attribute: Option<String>,
    /// Whether single-frame DICOM images of one series form one clip.
    pub series_as_clip: bool,
    pub discard_sources: bool,
}

pub async fn ingest_target(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<IngestTarget>> {
    sqlx::query_as(
        "select id, classes, split, cache_spec, dicom->>'label_attribute' as label_attribute,
                coalesce((dicom->>'series_as_clip')::boolean, false) as series_as_clip,
                discard_sources
         from datasets where id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Ingest found `added` more files in an upload, `done` of them already refused by the plan.
pub async fn add_progress(
    db: impl PgExecutor<'_>,
    id: Uuid,
    added: usize,
    done: usize,
) -> sqlx::Result<()> {
    sqlx::query(
        "update datasets set videos_total = videos_total + $2, videos_done = videos_done + $3
         where id = $1",
    )
    .bind(id)
    .bind(added as i32)
    .bind(done as i32)
    .execute(db)
    .await?;
    Ok(())
}

/// One more video has its verdict.
pub async fn video_done(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("update datasets set videos_done = videos_done + 1 where id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// An interrupted upload is ingested again: take back the progress its `removed` videos counted.
pub async fn restart_processing(
    db: impl PgExecutor<'_>,
    id: Uuid,
    removed: u64,
) -> sqlx::Result<()> {
    sqlx::query(
        "update datasets set videos_total = greatest(videos_total - $2, 0),
             videos_done = greatest(videos_done - $2, 0), status = 'processing'
         where id = $1",
    )
    .bind(id)
    .bind(removed as i32)
    .execute(db)
    .await?;
    Ok(())
}

/// Ingest finished an upload: the dataset's final status, the summary the tenant reads, and the
/// content hash (none when nothing was accepted).
pub async fn finish_ingest(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: DatasetStatus,
    reason: &str,
    content_hash: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "update datasets set status = $2, status_reason = $3, content_hash = $4 where id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(reason)
    .bind(content_hash)
    .execute(db)
    .await?;
    Ok(())
}

/// An upload could not be used as a whole: the dataset keeps what it had (ready if it already
/// holds accepted videos) and says why.
pub async fn upload_failed(db: impl PgExecutor<'_>, id: Uuid, reason: &str) -> sqlx::Result<()> {
    sqlx::query(
        "update datasets set
             status = case when exists (select 1 from videos v where v.dataset_id = $1
                                        and v.status = 'accepted') then 'ready' else 'failed' end,
             status_reason = $2
         where id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(db)
    .await?;
    Ok(())
}

/// Videos of a dataset for ingest and reports (all statuses).
pub async fn dataset_videos(db: impl PgExecutor<'_>, dataset_id: Uuid) -> sqlx::Result<Vec<Video>> {
    sqlx::query_as(&format!(
        "select {VIDEO_COLUMNS} from videos where dataset_id = $1 order by path, id"
    ))
    .bind(dataset_id)
    .fetch_all(db)
    .await
}

/// The dataset's content hash (`None` for a dataset without one, or none at all).
pub async fn content_hash(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<String>> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("select content_hash from datasets where id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(row.and_then(|r| r.0))
}
