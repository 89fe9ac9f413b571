//! Deletion and retention: what a tenant deletes leaves no bytes behind.
//!
//! Deleting a dataset, model, TorchScript backbone or tenant is one transaction that removes the
//! rows and records the files still to remove (the `deletions` table). The files then go in the
//! background; a server that starts finishes the deletions a previous process left pending, so
//! a crash between the commit and the last removal only delays it. Each deletion keeps who asked
//! (key, request), when, and when its bytes were gone.
//!
//! Lineage outlives a dataset: jobs and models keep its id and a copy of what it was, and a model
//! stays servable (its decode spec and files are its own). A dataset, backbone or tenant that a
//! queued or running job needs is refused (`*_in_use`) rather than pulled from under it.
//!
//! At start-up files no record refers to (left by a crash between writing and recording) are
//! removed once older than a grace period, provided the data directory is marked as this
//! database's (a server pointed at the wrong database must not take everything for orphans);
//! `vidtune doctor` reports records whose files are missing.
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use uuid::Uuid;

use crate::datadir::{self, DataDir};
use crate::db::{
    self, PgPool,
    deletions::{Deletion, Lock, Requester},
};

/// Why a deletion was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no such {0}")]
    NotFound(&'static str),
    /// An upload is being received or ingested.
    #[error("the {0} is receiving or processing an upload; delete it once that finishes")]
    Busy(&'static str),
    /// A queued or running job (or a model, for a backbone) needs it.
    #[error("{0}")]
    InUse(InUse),
    /// An operator cannot delete the tenant its own key belongs to.
    #[error("a key cannot delete its own tenant")]
    OwnTenant,
    #[error(transparent)]
    Database(#[from] db::Error),
}

/// What is in use, for [`DeleteError::InUse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InUse {
    Dataset,
    Model,
    BaseModel,
    Tenant,
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InUse::Dataset => {
                "a queued or running job or batch prediction uses this dataset; cancel it (or \
                 wait for it to end) and delete again"
            }
            InUse::Model => {
                "a batch prediction is running on this model; cancel it (or wait for it to \
                 end) and delete again"
            }
            InUse::BaseModel => {
                "models or queued or running jobs use this base model; delete those models \
                 first (a model needs its backbone to serve)"
            }
            InUse::Tenant => {
                "the tenant has queued or running jobs or batch predictions; cancel them and \
                 delete again"
            }
        })
    }
}

fn rel(p: impl AsRef<Path>) -> String {
    p.as_ref().to_string_lossy().into_owned()
}

/// Delete a tenant's dataset: its rows now, its sources, caches and the checkpoints of jobs
/// trained on it in the background. Jobs and models keep its lineage.
pub async fn delete_dataset(
    db: &PgPool,
    data: &DataDir,
    tenant_id: Uuid,
    id: Uuid,
    by: &Requester,
) -> Result<Deletion, DeleteError> {
    let mut tx = db.begin().await?;
    match db::deletions::lock_dataset(&mut tx, tenant_id, id).await? {
        Lock::Missing => return Err(DeleteError::NotFound("dataset")),
        Lock::Busy => return Err(DeleteError::Busy("dataset")),
        Lock::InUse => return Err(DeleteError::InUse(InUse::Dataset)),
        Lock::Free => {}
    }
    let jobs = db::deletions::retire_dataset(&mut tx, id).await?;
    let mut paths = vec![rel(DataDir::dataset_relative(id))];
    paths.extend(jobs.into_iter().map(|j| rel(DataDir::job_relative(j))));
    let record = Record {
        tenant_id,
        kind: "dataset",
        id,
        by,
    };
    commit(tx, db, data, record, &paths).await
}

/// Delete a tenant's model: its record now (its job keeps its history), its files (weights,
/// metadata, exports) and its job's checkpoints in the background. The caller evicts it from
/// the serving cache.
pub async fn delete_model(
    db: &PgPool,
    data: &DataDir,
    tenant_id: Uuid,
    id: Uuid,
    by: &Requester,
) -> Result<Deletion, DeleteError> {
    let mut tx = db.begin().await?;
    let path = match db::deletions::lock_model(&mut tx, tenant_id, id).await? {
        (Lock::Missing, _) | (_, None) => return Err(DeleteError::NotFound("model")),
        (Lock::InUse, _) => return Err(DeleteError::InUse(InUse::Model)),
        (_, Some(path)) => path,
    };
    let jobs = db::deletions::retire_model(&mut tx, id).await?;
    let mut paths = vec![path];
    paths.extend(jobs.into_iter().map(|j| rel(DataDir::job_relative(j))));
    let record = Record {
        tenant_id,
        kind: "model",
        id,
        by,
    };
    commit(tx, db, data, record, &paths).await
}

/// Delete a tenant's TorchScript backbone, unless a model or an unfinished job uses it.
pub async fn delete_backbone(
    db: &PgPool,
    data: &DataDir,
    tenant_id: Uuid,
    id: Uuid,
    by: &Requester,
) -> Result<Deletion, DeleteError> {
    let mut tx = db.begin().await?;
    let path = match db::deletions::lock_backbone(&mut tx, tenant_id, id).await? {
        (Lock::Free, Some(path)) => path,
        (Lock::InUse | Lock::Busy, _) => return Err(DeleteError::InUse(InUse::BaseModel)),
        _ => return Err(DeleteError::NotFound("base model")),
    };
    db::deletions::retire_backbone(&mut tx, id).await?;
    let record = Record {
        tenant_id,
        kind: "base_model",
        id,
        by,
    };
    commit(tx, db, data, record, &[path]).await
}

/// Delete a tenant with its keys, datasets, jobs, models and backbones (the audit trail stays).
/// `caller_tenant` is the tenant of the deleting key, which cannot delete itself.
pub async fn delete_tenant(
    db: &PgPool,
    data: &DataDir,
    caller_tenant: Uuid,
    id: Uuid,
    by: &Requester,
) -> Result<Deletion, DeleteError> {
    if id == caller_tenant {
        return Err(DeleteError::OwnTenant);
    }
    let mut tx = db.begin().await?;
    match db::deletions::lock_tenant(&mut tx, id).await? {
        Lock::Missing => return Err(DeleteError::NotFound("tenant")),
        Lock::Busy => return Err(DeleteError::Busy("tenant")),
        Lock::InUse => return Err(DeleteError::InUse(InUse::Tenant)),
        Lock::Free => {}
    }
    let held = db::deletions::retire_tenant(&mut tx, id).await?;
    let mut paths: Vec<String> = held
        .datasets
        .into_iter()
        .map(|d| rel(DataDir::dataset_relative(d)))
        .collect();
    paths.extend(held.jobs.into_iter().map(|j| rel(DataDir::job_relative(j))));
    paths.extend(held.paths);
    let record = Record {
        tenant_id: id,
        kind: "tenant",
        id,
        by,
    };
    commit(tx, db, data, record, &paths).await
}

/// What a deletion records besides its files: whose, of what, asked by whom.
struct Record<'a> {
    tenant_id: Uuid,
    kind: &'static str,
    id: Uuid,
    by: &'a Requester,
}

/// Record the files to remove in the transaction that removed the rows, commit both, and
/// start removing the files.
async fn commit(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    db: &PgPool,
    data: &DataDir,
    r: Record<'_>,
    paths: &[String],
) -> Result<Deletion, DeleteError> {
    let deletion = db::deletions::insert(&mut *tx, r.tenant_id, r.kind, r.id, r.by, paths).await?;
    tx.commit().await?;
    spawn_removal(db.clone(), data.clone(), deletion.clone());
    Ok(deletion)
}

/// Remove a committed deletion's files in the background.
fn spawn_removal(db: PgPool, data: DataDir, deletion: Deletion) {
    tokio::spawn(async move {
        if let Err(e) = finish(&db, &data, &deletion).await {
            tracing::warn!(deletion_id = %deletion.id, error.cause_chain = ?e,
                "could not remove a deleted resource's files; retried at the next start");
        }
    });
}

/// Remove a deletion's files (each durably) and mark it complete.
pub async fn finish(db: &PgPool, data: &DataDir, deletion: &Deletion) -> anyhow::Result<()> {
    let paths: Vec<_> = deletion
        .paths
        .iter()
        .filter_map(|p| inside(data, p))
        .collect();
    let removed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for p in &paths {
            datadir::remove_durably(p)?;
        }
        Ok(())
    })
    .await
    .context("removal task")?;
    if let Err(e) = removed {
        db::deletions::failed(db, deletion.id, &e.to_string()).await?;
        return Err(e).context("removing files");
    }
    db::deletions::complete(db, deletion.id).await?;
    tracing::info!(deletion_id = %deletion.id, kind = %deletion.kind,
        resource_id = %deletion.resource_id, files = deletion.paths.len(), "deleted files removed");
    Ok(())
}

/// A recorded relative path under the data directory; never anything outside it.
fn inside(data: &DataDir, relative: &str) -> Option<std::path::PathBuf> {
    let p = Path::new(relative);
    let plain = p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && !relative.is_empty()).then(|| data.resolve(p))
}

/// Finish the deletions a previous process left pending; returns how many.
pub async fn resume(db: &PgPool, data: &DataDir) -> anyhow::Result<usize> {
    let pending = db::deletions::pending(db).await?;
    for d in &pending {
        finish(db, data, d).await?;
    }
    Ok(pending.len())
}

/// What the database knows of the data directory.
struct Known {
    /// Relative paths of recorded top-level entries (`datasets/<id>`, `models/<id>`, …).
    paths: HashSet<String>,
}

async fn known(db: &PgPool) -> anyhow::Result<Known> {
    let mut paths = HashSet::new();
    for r in db::deletions::recorded(db).await? {
        match r.kind.as_str() {
            "dataset" => paths.insert(rel(DataDir::dataset_relative(r.id))),
            "job" => paths.insert(rel(DataDir::job_relative(r.id))),
            _ => match r.path {
                Some(p) => paths.insert(p),
                None => false,
            },
        };
    }
    Ok(Known { paths })
}

/// The folders whose entries are each one record's files, and the scratch folders whose
/// entries are only ever temporary.
const RECORDED: &[&str] = &["datasets", "jobs", "models", "backbones"];
const SCRATCH: &[&str] = &["weights/incoming", "tmp/predict"];

/// Remove files under the data directory that no record refers to and that are older than
/// `grace` (younger ones may be a write whose record is about to be committed, by this or
/// another host). Returns the removed paths, relative.
pub async fn remove_orphans(
    db: &PgPool,
    data: &DataDir,
    grace: Duration,
) -> anyhow::Result<Vec<String>> {
    let known = known(db).await?;
    let data = data.clone();
    tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        let old = |p: &Path| {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= grace)
        };
        let mut candidates = Vec::new();
        let entries = |dir: &str| -> Vec<String> {
            std::fs::read_dir(data.resolve(dir))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
                .collect()
        };
        for dir in RECORDED {
            candidates.extend(
                entries(dir)
                    .into_iter()
                    .filter(|p| !known.paths.contains(p)),
            );
        }
        for arch in entries("weights") {
            if arch != "weights/incoming" {
                candidates.extend(
                    entries(&arch)
                        .into_iter()
                        .filter(|p| !known.paths.contains(p)),
                );
            }
        }
        for dir in SCRATCH {
            candidates.extend(entries(dir));
        }
        let mut removed = Vec::new();
        for p in candidates {
            let path = data.resolve(&p);
            if old(&path) {
                datadir::remove_durably(&path).with_context(|| format!("removing {p}"))?;
                removed.push(p);
            }
        }
        Ok(removed)
    })
    .await
    .context("orphan removal task")?
}

/// What the server does with the data directory when it starts: finish pending deletions, then
/// remove orphans older than `grace` — only when the data directory's installation marker names
/// this database (the first start writes it and removes nothing).
pub async fn at_start(db: &PgPool, data: &DataDir, grace: Duration) -> anyhow::Result<()> {
    let resumed = resume(db, data).await?;
    if resumed > 0 {
        tracing::info!(deletions = resumed, "finished deletions left pending");
    }
    // Orphans only where the data directory demonstrably belongs to this database.
    let id = db::deletions::installation_id(db).await?.to_string();
    let marker = data.installation_marker();
    match std::fs::read_to_string(&marker) {
        Ok(found) if found.trim() == id => {}
        Ok(found) => {
            tracing::warn!(data_dir = %data.root().display(), database = %id,
                data_dir_database = %found.trim(),
                "the data directory belongs to another database; no file is taken for an orphan");
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let part = marker.with_extension("part");
            std::fs::write(&part, &id).context("writing the installation marker")?;
            datadir::durable_rename(&part, &marker).context("writing the installation marker")?;
            tracing::info!(database = %id,
                "data directory bound to this database; files without a record are removed from the next start");
            return Ok(());
        }
        Err(e) => return Err(e).context("reading the installation marker"),
    }
    let removed = remove_orphans(db, data, grace).await?;
    if !removed.is_empty() {
        tracing::info!(count = removed.len(), paths = ?removed,
            "removed files that no record refers to");
    }
    Ok(())
}

/// Records whose files are missing, one line each (for `vidtune doctor`).
pub async fn missing_files(db: &PgPool, data: &DataDir) -> anyhow::Result<Vec<String>> {
    let records = db::deletions::recorded(db).await?;
    let data = data.clone();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut videos_missing: std::collections::BTreeMap<Uuid, usize> = Default::default();
        for r in records {
            match (r.kind.as_str(), r.owner, r.path) {
                ("video", Some(dataset), _) if !data.dataset(dataset).cache_file(r.id).exists() => {
                    *videos_missing.entry(dataset).or_default() += 1;
                }
                ("video" | "dataset", ..) => {}
                (kind, _, Some(path)) if !data.resolve(&path).exists() => {
                    lines.push(format!("{kind} {}: {path} is missing", r.id));
                }
                _ => {}
            }
        }
        for (dataset, n) in videos_missing {
            lines.push(format!(
                "dataset {dataset}: the training cache of {n} accepted video(s) is missing"
            ));
        }
        lines
    })
    .await?;
    Ok(lines)
}
