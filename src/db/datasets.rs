//! Datasets, uploads and videos.
use serde::Serialize;
use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

/// A dataset as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Dataset {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    pub description: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub classes: Option<Vec<String>>,
    pub split: serde_json::Value,
    pub cache_spec: serde_json::Value,
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
           d.split, d.cache_spec, d.videos_total, d.videos_done, d.content_hash,
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
}

pub async fn create(db: impl PgExecutor<'_>, d: &NewDataset<'_>) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into datasets (id, tenant_id, name, description, classes, split, cache_spec)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(d.tenant_id)
    .bind(d.name)
    .bind(d.description)
    .bind(d.classes)
    .bind(&d.split)
    .bind(&d.cache_spec)
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

/// Delete a dataset unless data is being received or ingested. `Ok(None)`: no such dataset;
/// `Ok(Some(false))`: busy.
pub async fn delete(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<bool>> {
    let row: Option<(bool,)> = sqlx::query_as(
        "with target as (select id, status, receiving from datasets where tenant_id = $1 and id = $2),
              gone as (delete from datasets d using target t
                       where d.id = t.id and t.status <> 'processing' and not t.receiving
                       returning d.id)
         select exists (select 1 from gone) from target",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| r.0))
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

/// Record a received upload and hand the dataset to ingest.
pub async fn upload_received(db: &sqlx::PgPool, upload: &NewUpload<'_>) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "insert into uploads (id, dataset_id, tenant_id, kind, bytes, sha256, meta)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(upload.id)
    .bind(upload.dataset_id)
    .bind(upload.tenant_id)
    .bind(upload.kind)
    .bind(upload.bytes as i64)
    .bind(upload.sha256)
    .bind(&upload.meta)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update datasets set receiving = false, status = 'processing', status_reason = null
         where id = $1",
    )
    .bind(upload.dataset_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

pub struct NewUpload<'a> {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: &'a str,
    pub bytes: u64,
    pub sha256: &'a str,
    pub meta: serde_json::Value,
}

/// An upload waiting for ingest.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingUpload {
    pub id: Uuid,
    /// SHA-256 of the received body (computed while it streamed to disk).
    pub sha256: String,
    pub dataset_id: Uuid,
    pub tenant_id: Uuid,
    pub kind: String,
    pub meta: serde_json::Value,
}

/// Uploads not yet ingested (after a restart, ingest resumes from these).
pub async fn pending_uploads(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<PendingUpload>> {
    sqlx::query_as(
        "select id, sha256, dataset_id, tenant_id, kind, meta from uploads
         where status = 'received' order by created_at",
    )
    .fetch_all(db)
    .await
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
}

pub async fn ingest_target(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<IngestTarget>> {
    sqlx::query_as("select id, classes, split, cache_spec from datasets where id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// A video row as listed by the API.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Video {
    pub id: Uuid,
    pub upload_id: Uuid,
    pub path: String,
    pub status: String,
    pub reason_code: Option<String>,
    pub reason: Option<String>,
    pub label: Option<String>,
    pub split: Option<String>,
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
}

const VIDEO_COLUMNS: &str = "id, upload_id, path, status, reason_code, reason, label, split,
    patient_id, sha256, bytes, container, codec, width, height, fps, duration_s, frames,
    cache_frames, cache_width, cache_height, cache_fps";

pub async fn list_videos(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    dataset_id: Uuid,
    status: Option<&str>,
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
