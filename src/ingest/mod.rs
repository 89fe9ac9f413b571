//! Ingest: turn a received upload into labelled, validated, cached videos.
//!
//! Runs in the background after an upload is answered 202. Extraction and FFmpeg work happen off
//! the async executor (blocking threads and `media-worker` child processes); progress is written
//! to the dataset row as each video finishes. Uploads left unfinished by a restart are ingested
//! again from their stored bytes at the next start.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db;
use crate::media::archive::{self, ArchiveLimits, ExtractedFile};
use crate::media::decode::{CacheSpec, Limits};
use crate::media::worker::{Job, MediaWorker};

pub mod layout;
pub mod split;

use split::{Split, SplitSpec};

/// How ingest runs; part of the server settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The vidtune binary, started as `media-worker` children.
    pub media_worker_exe: PathBuf,
    /// Videos decoded at once (each in its own child, one FFmpeg thread each when > 1).
    pub concurrency: usize,
    pub archive_limits: ArchiveLimits,
    pub video_limits: Limits,
}

impl IngestConfig {
    pub fn new(media_worker_exe: PathBuf) -> Self {
        Self {
            media_worker_exe,
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            archive_limits: ArchiveLimits::default(),
            video_limits: Limits::default(),
        }
    }
}

/// Where a dataset's bytes live under the data directory.
pub struct DatasetDirs {
    pub root: PathBuf,
}

impl DatasetDirs {
    pub fn new(data_dir: &Path, dataset_id: Uuid) -> Self {
        Self {
            root: data_dir.join("datasets").join(dataset_id.to_string()),
        }
    }
    /// Received upload bodies, `<upload_id>`, until ingest has extracted them.
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    /// Source files, one folder per upload.
    pub fn files(&self, upload_id: Uuid) -> PathBuf {
        self.root.join("files").join(upload_id.to_string())
    }
    /// Training cache, one file per accepted video.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn cache_file(&self, video_id: Uuid) -> PathBuf {
        self.cache().join(format!("{video_id}.vtc"))
    }
}

/// Metadata stored with a single-video upload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
pub struct VideoMeta {
    pub filename: String,
    pub label: String,
    pub split: Option<Split>,
    pub patient_id: Option<String>,
}

/// The `status_reason` detail of an upload that failed because of the server, not the upload.
const INTERNAL_FAILURE: &str =
    "an internal error stopped ingest; the server log has the details under this upload id";

/// Start ingesting an upload in the background.
pub fn spawn(
    db: PgPool,
    data_dir: PathBuf,
    config: Arc<IngestConfig>,
    upload: db::datasets::PendingUpload,
) {
    tokio::spawn(async move {
        let dataset_id = upload.dataset_id;
        if let Err(e) = run(&db, &data_dir, &config, &upload).await {
            // The cause (database text, server paths) is for the log; the tenant reads a stable
            // reason that the upload id ties to this log line.
            tracing::error!(error.cause_chain = ?e, %dataset_id, upload_id = %upload.id, "ingest failed");
            let _ = finish_failed(&db, &upload, INTERNAL_FAILURE).await;
        }
    });
}

/// Resume uploads a previous process did not finish.
pub async fn resume(
    db: &PgPool,
    data_dir: &Path,
    config: &Arc<IngestConfig>,
) -> anyhow::Result<()> {
    let reset = db::datasets::reset_interrupted_receiving(db).await?;
    if reset > 0 {
        tracing::warn!(
            datasets = reset,
            "discarded uploads interrupted by a restart"
        );
    }
    for upload in db::datasets::pending_uploads(db).await? {
        tracing::info!(dataset_id = %upload.dataset_id, upload_id = %upload.id, "resuming ingest");
        // Start again from the stored bytes: forget what the interrupted run recorded.
        let removed = sqlx::query("delete from videos where upload_id = $1 returning id")
            .bind(upload.id)
            .execute(db)
            .await?
            .rows_affected();
        sqlx::query(
            "update datasets set videos_total = greatest(videos_total - $2, 0),
                 videos_done = greatest(videos_done - $2, 0), status = 'processing'
             where id = $1",
        )
        .bind(upload.dataset_id)
        .bind(removed as i32)
        .execute(db)
        .await?;
        spawn(db.clone(), data_dir.to_path_buf(), config.clone(), upload);
    }
    Ok(())
}

async fn run(
    db: &PgPool,
    data_dir: &Path,
    config: &IngestConfig,
    upload: &db::datasets::PendingUpload,
) -> anyhow::Result<()> {
    let target = db::datasets::ingest_target(db, upload.dataset_id)
        .await?
        .context("the dataset was deleted")?;
    let dirs = DatasetDirs::new(data_dir, upload.dataset_id);
    let files_dir = dirs.files(upload.id);
    std::fs::create_dir_all(dirs.cache())?;

    // 1. Files and their labels.
    let mut planned = if upload.kind == "archive" {
        let incoming = dirs.incoming().join(upload.id.to_string());
        let limits = config.archive_limits.clone();
        let dest = files_dir.clone();
        let (dataset_id, upload_id) = (upload.dataset_id, upload.id);
        let extracted = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            if dest.exists() {
                std::fs::remove_dir_all(&dest)?;
            }
            std::fs::create_dir_all(&dest)?;
            let kind = archive::sniff(&incoming)?;
            let Some(kind) = kind else {
                return Ok(Err(
                    "the upload is not a zip, tar or tar.gz archive".to_string()
                ));
            };
            match archive::extract(&incoming, kind, &dest, &limits) {
                Ok(x) => Ok(Ok(x)),
                // Writing to the data directory failed: the server's fault, not the archive's.
                Err(archive::ArchiveError::Io(e)) => {
                    tracing::error!(error = %e, %dataset_id, %upload_id, "writing extracted files failed");
                    Ok(Err(INTERNAL_FAILURE.to_string()))
                }
                Err(e) => Ok(Err(e.to_string())),
            }
        })
        .await??;
        let extracted = match extracted {
            Ok(x) => x,
            Err(reason) => {
                discard_archive(&dirs, upload.id, &files_dir);
                return finish_failed(db, upload, &reason).await;
            }
        };
        let mut planned = match layout::plan(extracted.files, target.classes.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                discard_archive(&dirs, upload.id, &files_dir);
                return finish_failed(db, upload, &e.0).await;
            }
        };
        for r in extracted.refused {
            planned.push(layout::Planned {
                path: r.rel,
                file: None,
                label: None,
                split: None,
                patient_id: None,
                claimed: false,
                verdict: Some(("rejected", r.code, r.detail)),
                label_problem: None,
            });
        }
        planned
    } else {
        let meta: VideoMeta = serde_json::from_value(upload.meta.clone()).context("upload meta")?;
        let path = files_dir.join("video");
        let bytes = std::fs::metadata(&path)?.len();
        let sha256 = upload.sha256.clone();
        let label_problem = match &target.classes {
            Some(c) if !c.contains(&meta.label) => Some((
                "unknown_label",
                format!(
                    "label `{}` is not one of the dataset's declared classes",
                    meta.label
                ),
            )),
            _ => None,
        };
        vec![layout::Planned {
            path: meta.filename,
            file: Some(ExtractedFile {
                rel: "video".into(),
                path,
                bytes,
                sha256,
            }),
            label: Some(meta.label),
            split: meta.split,
            patient_id: meta.patient_id,
            claimed: true,
            verdict: None,
            label_problem,
        }]
    };

    // 2. Rows, all visible at once with their count, so progress has a stable total. Paths are
    // the videos' key within the upload: a hostile archive (the same path twice, NUL bytes)
    // must come out as distinct, storable rows, not as a database error.
    layout::make_storable(&mut planned);
    let mut queue = VecDeque::new();
    {
        let mut tx = db.begin().await?;
        for p in &planned {
            let id = Uuid::new_v4();
            let (status, code, reason) = match &p.verdict {
                Some((s, c, d)) => (*s, Some(*c), Some(d.as_str())),
                None => ("pending", None, None),
            };
            sqlx::query(
                "insert into videos (id, dataset_id, tenant_id, upload_id, path, status, reason_code,
                     reason, label, split, split_given, patient_id, sha256, bytes)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind(id)
            .bind(upload.dataset_id)
            .bind(upload.tenant_id)
            .bind(upload.id)
            .bind(&p.path)
            .bind(status)
            .bind(code)
            .bind(reason)
            .bind(&p.label)
            .bind(p.split.map(Split::as_str))
            .bind(p.split.is_some())
            .bind(&p.patient_id)
            .bind(p.file.as_ref().map(|f| f.sha256.clone()))
            .bind(p.file.as_ref().map(|f| f.bytes as i64))
            .execute(&mut *tx)
            .await?;
            if p.verdict.is_none() {
                queue.push_back((id, p.clone()));
            }
        }
        let done = planned.len() - queue.len();
        sqlx::query(
            "update datasets set videos_total = videos_total + $2, videos_done = videos_done + $3
             where id = $1",
        )
        .bind(upload.dataset_id)
        .bind(planned.len() as i32)
        .bind(done as i32)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }

    // 3. Validate and cache, several at a time, each in its own media-worker child.
    let spec: CacheSpec = serde_json::from_value(target.cache_spec.clone()).unwrap_or_default();
    let workers = config.concurrency.clamp(1, queue.len().max(1));
    let spec = CacheSpec {
        threads: if workers > 1 { 1 } else { 0 },
        ..spec
    };
    let queue = Arc::new(Mutex::new(queue));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, db, spec) = (queue.clone(), db.clone(), spec.clone());
        let (exe, limits) = (config.media_worker_exe.clone(), config.video_limits.clone());
        let cache_dir = dirs.cache();
        let dataset_id = upload.dataset_id;
        tasks.spawn(async move {
            let mut worker = MediaWorker::new(&exe);
            let deadline = Duration::from_secs_f64(limits.max_decode_s + 30.0);
            loop {
                let Some((id, p)) = queue.lock().expect("queue lock").pop_front() else {
                    break;
                };
                let file = p.file.as_ref().expect("queued videos have a file");
                let job = Job {
                    src: file.path.clone(),
                    cache: cache_dir.join(format!("{id}.vtc")),
                    spec: spec.clone(),
                    limits: limits.clone(),
                };
                let outcome = worker.run(&job, deadline).await;
                record_outcome(&db, dataset_id, id, &p, &job.cache, outcome).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }

    // 4. Splits, content hash, final status.
    finalize(db, upload, &target).await?;
    if upload.kind == "archive" {
        let _ = std::fs::remove_file(dirs.incoming().join(upload.id.to_string()));
    }
    Ok(())
}

async fn record_outcome(
    db: &PgPool,
    dataset_id: Uuid,
    id: Uuid,
    p: &layout::Planned,
    cache: &Path,
    outcome: Result<crate::media::decode::VideoInfo, crate::media::decode::Rejection>,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    match outcome {
        Ok(info) => {
            let (status, code, reason) = match &p.label_problem {
                Some((c, d)) => ("rejected", Some(*c), Some(d.clone())),
                None => ("accepted", None, None),
            };
            sqlx::query(
                "update videos set status = $2, reason_code = $3, reason = $4, container = $5,
                     codec = $6, width = $7, height = $8, fps = $9, duration_s = $10, frames = $11,
                     cache_frames = $12, cache_width = $13, cache_height = $14, cache_fps = $15
                 where id = $1",
            )
            .bind(id)
            .bind(status)
            .bind(code)
            .bind(reason)
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
            .execute(&mut *tx)
            .await?;
            if status != "accepted" {
                let _ = std::fs::remove_file(cache);
            }
        }
        Err(r) => {
            if let Some(cause) = &r.log {
                // The tenant reads the rejection's plain detail; the cause is only logged.
                tracing::error!(%dataset_id, video_id = %id, code = %r.code, cause, "a video could not be processed");
            }
            // Something FFmpeg does not recognise at all is skipped, unless the upload said it
            // was a video (labels.csv, single-video upload) or its name says so.
            let status = if r.is_not_media() && !p.claimed && !has_video_extension(&p.path) {
                "skipped"
            } else {
                "rejected"
            };
            sqlx::query(
                "update videos set status = $2, reason_code = $3, reason = $4 where id = $1",
            )
            .bind(id)
            .bind(status)
            .bind(&r.code)
            .bind(&r.detail)
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query("update datasets set videos_done = videos_done + 1 where id = $1")
        .bind(dataset_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

fn has_video_extension(path: &str) -> bool {
    const EXT: &[&str] = &[
        "mp4", "m4v", "mov", "avi", "mkv", "webm", "mpg", "mpeg", "wmv", "flv", "ts", "mts",
        "m2ts", "3gp", "ogv", "dv", "mxf",
    ];
    path.rsplit_once('.')
        .is_some_and(|(_, e)| EXT.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Assign splits to new accepted videos, compute the content hash, set the final status.
async fn finalize(
    db: &PgPool,
    upload: &db::datasets::PendingUpload,
    target: &db::datasets::IngestTarget,
) -> anyhow::Result<()> {
    let spec: SplitSpec = serde_json::from_value(target.split.clone()).unwrap_or_default();
    let videos = db::datasets::dataset_videos(db, target.id).await?;
    let accepted: Vec<_> = videos.iter().filter(|v| v.status == "accepted").collect();
    let mut items: Vec<split::Item> = accepted
        .iter()
        .map(|v| split::Item {
            label: v.label.clone().unwrap_or_default(),
            patient: v.patient_id.clone(),
            split: v.split.as_deref().and_then(Split::parse),
        })
        .collect();
    split::assign(&mut items, &spec);

    let mut hasher = Sha256::new();
    let mut lines: Vec<String> = Vec::with_capacity(accepted.len());
    let mut tx = db.begin().await?;
    for (v, it) in accepted.iter().zip(&items) {
        let s = it.split.expect("assigned").as_str();
        if v.split.as_deref() != Some(s) {
            sqlx::query("update videos set split = $2 where id = $1")
                .bind(v.id)
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        lines.push(format!(
            "{} {} {}",
            v.sha256.as_deref().unwrap_or(""),
            v.label.as_deref().unwrap_or(""),
            s
        ));
    }
    lines.sort();
    for l in &lines {
        hasher.update(l.as_bytes());
        hasher.update(b"\n");
    }
    let rejected = videos.iter().filter(|v| v.status == "rejected").count();
    let skipped = videos.iter().filter(|v| v.status == "skipped").count();
    let summary = format!(
        "{} accepted, {rejected} rejected, {skipped} skipped",
        accepted.len()
    );
    let (status, reason) = if accepted.is_empty() {
        ("failed", format!("no usable videos ({summary})"))
    } else {
        ("ready", summary)
    };
    sqlx::query(
        "update datasets set status = $2, status_reason = $3, content_hash = $4 where id = $1",
    )
    .bind(target.id)
    .bind(status)
    .bind(reason)
    .bind((!accepted.is_empty()).then(|| hex::encode(hasher.finalize())))
    .execute(&mut *tx)
    .await?;
    sqlx::query("update uploads set status = 'done' where id = $1")
        .bind(upload.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// An archive refused whole: its bytes and whatever was extracted are removed, so that a bad
/// multi-gigabyte upload does not keep holding the disk.
fn discard_archive(dirs: &DatasetDirs, upload_id: Uuid, files_dir: &Path) {
    let _ = std::fs::remove_file(dirs.incoming().join(upload_id.to_string()));
    let _ = std::fs::remove_dir_all(files_dir);
}

/// The upload as a whole could not be used; keep what the dataset already had.
async fn finish_failed(
    db: &PgPool,
    upload: &db::datasets::PendingUpload,
    reason: &str,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("update uploads set status = 'failed', reason = $2 where id = $1")
        .bind(upload.id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "update datasets set
             status = case when exists (select 1 from videos v where v.dataset_id = $1
                                        and v.status = 'accepted') then 'ready' else 'failed' end,
             status_reason = $2
         where id = $1",
    )
    .bind(upload.dataset_id)
    .bind(format!("upload {} failed: {reason}", upload.id))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}
