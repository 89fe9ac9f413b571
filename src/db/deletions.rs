//! Deletions: the queue of files still to remove after a tenant deleted something, which doubles
//! as the record of who deleted what and when its bytes were gone; and the statements that take
//! a dataset, model, TorchScript backbone or tenant out of the database, each run inside the
//! caller's transaction together with the [`insert`] of its files.
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;
use uuid::Uuid;

/// A deletion as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Deletion {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    /// `dataset`, `model`, `base_model` or `tenant`.
    pub kind: String,
    pub resource_id: Uuid,
    /// Files and folders to remove, relative to the data directory: a server detail.
    #[serde(skip)]
    pub paths: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// When the last file was removed; `null` while removal is pending.
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, tenant_id, kind, resource_id, paths, requested_at, completed_at";

/// Who asked for a deletion.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    pub key_id: Option<Uuid>,
    pub request_id: Option<String>,
}

/// Record the files of a deleted resource, in the transaction that deletes its rows.
pub async fn insert(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    kind: &str,
    resource_id: Uuid,
    by: &Requester,
    paths: &[String],
) -> sqlx::Result<Deletion> {
    sqlx::query_as(&format!(
        "insert into deletions (id, tenant_id, kind, resource_id, key_id, request_id, paths)
         values ($1, $2, $3, $4, $5, $6, $7) returning {COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(tenant_id)
    .bind(kind)
    .bind(resource_id)
    .bind(by.key_id)
    .bind(by.request_id.as_deref())
    .bind(paths)
    .fetch_one(db)
    .await
}

/// A deletion visible to `tenant_id` (its own), or any with `all`.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    all: bool,
    id: Uuid,
) -> sqlx::Result<Option<Deletion>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from deletions where id = $1 and ($2 or tenant_id = $3)"
    ))
    .bind(id)
    .bind(all)
    .bind(tenant_id)
    .fetch_optional(db)
    .await
}

/// Deletions whose files are not all removed yet, oldest first.
pub async fn pending(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Deletion>> {
    sqlx::query_as(&format!(
        "select {COLUMNS} from deletions where completed_at is null order by requested_at"
    ))
    .fetch_all(db)
    .await
}

/// Every file has been removed.
pub async fn complete(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("update deletions set completed_at = now(), error = null where id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Removal failed; it stays pending and is retried at the next start.
pub async fn failed(db: impl PgExecutor<'_>, id: Uuid, error: &str) -> sqlx::Result<()> {
    sqlx::query("update deletions set error = $2 where id = $1")
        .bind(id)
        .bind(error)
        .execute(db)
        .await?;
    Ok(())
}

/// Whether a resource can go now.
#[derive(Debug, PartialEq, Eq)]
pub enum Lock {
    /// No such resource (of this tenant).
    Missing,
    /// An upload is being received or ingested.
    Busy,
    /// A queued or running job (or a running batch prediction) needs it.
    InUse,
    /// Locked until the transaction ends; nothing needs it.
    Free,
}

/// Lock a tenant's dataset for deletion (`for update`: no upload or job can start on it while
/// the transaction runs).
pub async fn lock_dataset(tx: &mut PgConnection, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Lock> {
    let row: Option<(String, bool)> = sqlx::query_as(
        "select status, receiving from datasets where tenant_id = $1 and id = $2 for update",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, receiving)) = row else {
        return Ok(Lock::Missing);
    };
    if receiving || status == "processing" {
        return Ok(Lock::Busy);
    }
    let in_use: bool = sqlx::query_scalar(
        "select exists (select 1 from jobs where dataset_id = $1 and state in ('queued', 'running'))
             or exists (select 1 from batch_predictions where dataset_id = $1 and state = 'running')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(if in_use { Lock::InUse } else { Lock::Free })
}

/// Delete a locked dataset's rows (uploads, videos and batch predictions over it go with it).
/// Its jobs and models keep its id and get a copy of what it was: name, content hash, accepted
/// videos per split, classes; the jobs' checkpoints, removed with it, stop counting against the
/// tenant's storage. Returns the ids of the jobs trained on it.
pub async fn retire_dataset(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query(
        "with splits as (select coalesce(split, 'none') as split, count(*) as n from videos
                         where dataset_id = $1 and status = 'accepted' group by 1),
              lineage as (select jsonb_build_object(
                     'name', d.name,
                     'content_hash', d.content_hash,
                     'classes', d.classes,
                     'videos_accepted', (select coalesce(sum(n), 0) from splits),
                     'videos_per_split', (select coalesce(jsonb_object_agg(split, n), '{}') from splits),
                     'deleted_at', now()) as l
                  from datasets d where d.id = $1),
              j as (update jobs set dataset_lineage = (select l from lineage), checkpoint_bytes = 0
                    where dataset_id = $1)
         update models set dataset_lineage = (select l from lineage) where dataset_id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let jobs = sqlx::query_scalar("select id from jobs where dataset_id = $1")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query("delete from datasets where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(jobs)
}

/// Lock a tenant's model for deletion; its folder (relative), if it exists.
pub async fn lock_model(
    tx: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<(Lock, Option<String>)> {
    let path: Option<String> =
        sqlx::query_scalar("select path from models where tenant_id = $1 and id = $2 for update")
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if path.is_none() {
        return Ok((Lock::Missing, None));
    }
    // A running batch prediction reads the model and writes results that refer to it.
    let in_use: bool = sqlx::query_scalar(
        "select exists (select 1 from batch_predictions where model_id = $1 and state = 'running')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    Ok((if in_use { Lock::InUse } else { Lock::Free }, path))
}

/// Delete a model's record. Its job stays, with its metric history, and forgets the model in
/// the same transaction, so no job ever points at a missing model.
pub async fn retire_model(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<Uuid>> {
    // The job that trained it keeps its history, not its checkpoints: they go with the model.
    let jobs: Vec<Uuid> = sqlx::query_scalar(
        "update jobs set model_id = null, checkpoint = null, checkpoint_bytes = 0
         where model_id = $1 returning id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("delete from models where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(jobs)
}

/// Lock a tenant's TorchScript backbone for deletion: its module path, or why it cannot go
/// (a model trained on it needs it to serve; a queued or running job to train).
pub async fn lock_backbone(
    tx: &mut PgConnection,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<(Lock, Option<String>)> {
    let row: Option<(String, String)> = sqlx::query_as(
        "select name, path from custom_backbones where tenant_id = $1 and id = $2 for update",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((name, path)) = row else {
        return Ok((Lock::Missing, None));
    };
    let in_use: bool = sqlx::query_scalar(
        "select exists (select 1 from jobs where tenant_id = $1 and base_model = $2
                          and state in ('queued', 'running'))
             or exists (select 1 from models where tenant_id = $1 and base_model = $2)",
    )
    .bind(tenant_id)
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
    Ok((if in_use { Lock::InUse } else { Lock::Free }, Some(path)))
}

pub async fn retire_backbone(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("delete from custom_backbones where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What a tenant holds on disk, by id.
#[derive(Debug, Default)]
pub struct TenantFiles {
    pub datasets: Vec<Uuid>,
    pub jobs: Vec<Uuid>,
    /// Relative paths of model folders and backbone modules.
    pub paths: Vec<String>,
}

/// Lock a tenant for deletion: refused while any of its jobs is queued or running or any
/// upload is received or ingested.
pub async fn lock_tenant(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Lock> {
    let found: Option<Uuid> = sqlx::query_scalar("select id from tenants where id = $1 for update")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if found.is_none() {
        return Ok(Lock::Missing);
    }
    // Locks its datasets too, so no upload starts meanwhile.
    let busy: Vec<bool> = sqlx::query_scalar(
        "select receiving or status = 'processing' from datasets where tenant_id = $1 for update",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    if busy.into_iter().any(|b| b) {
        return Ok(Lock::Busy);
    }
    let in_use: bool = sqlx::query_scalar(
        "select exists (select 1 from jobs where tenant_id = $1 and state in ('queued', 'running'))
             or exists (select 1 from batch_predictions where tenant_id = $1 and state = 'running')",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(if in_use { Lock::InUse } else { Lock::Free })
}

/// Delete a locked tenant and everything it owns except the audit trail (which keeps its id).
/// Returns what it held on disk.
pub async fn retire_tenant(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<TenantFiles> {
    let datasets = sqlx::query_scalar("select id from datasets where tenant_id = $1")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    let jobs = sqlx::query_scalar("select id from jobs where tenant_id = $1")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    let paths = sqlx::query_scalar(
        "select path from models where tenant_id = $1
         union all select path from custom_backbones where tenant_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    for table in [
        "batch_predictions",
        "models",
        "jobs",
        "videos",
        "uploads",
        "datasets",
        "custom_backbones",
        "api_keys",
        "tenants",
    ] {
        let column = if table == "tenants" {
            "id"
        } else {
            "tenant_id"
        };
        sqlx::query(&format!("delete from {table} where {column} = $1"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(TenantFiles {
        datasets,
        jobs,
        paths,
    })
}

/// A record that refers to files: its kind (`dataset`, `job`, `model`, `weights`, `base_model`,
/// `video`), id, owner (a video's dataset) and recorded path (a job's only while it is queued
/// or running: the checkpoint it resumes from).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recorded {
    pub kind: String,
    pub id: Uuid,
    pub owner: Option<Uuid>,
    pub path: Option<String>,
}

/// Every record that refers to files under the data directory.
pub async fn recorded(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Recorded>> {
    sqlx::query_as(
        "select 'dataset' as kind, id, null::uuid as owner, null::text as path from datasets
         union all
         select 'job', id, null, case when state in ('queued', 'running') then checkpoint end
         from jobs
         union all select 'model', id, null, path from models
         union all select 'weights', id, null, path from base_weights
         union all select 'base_model', id, null, path from custom_backbones
         union all select 'video', id, dataset_id, null from videos where status = 'accepted'",
    )
    .fetch_all(db)
    .await
}

/// This database's identity (one row, made by the migration).
pub async fn installation_id(db: impl PgExecutor<'_>) -> sqlx::Result<Uuid> {
    sqlx::query_scalar("select id from installation order by created_at limit 1")
        .fetch_one(db)
        .await
}
