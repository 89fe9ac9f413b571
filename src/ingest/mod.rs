//! Ingest: turn a received upload into labelled, validated, cached videos.
//!
//! Runs in the background after an upload is answered 202. Extraction and FFmpeg work happen off
//! the async executor (blocking threads and `media-worker` child processes); progress is written
//! to the dataset row as each video finishes. Uploads left unfinished by a restart are ingested
//! again from their stored bytes at the next start.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::datasets::{DatasetStatus, IngestTarget};
use crate::db::uploads::{PendingUpload, UploadKind, UploadStatus};
use crate::db::videos::{NewVideo, VideoStatus};
use crate::db::{self, PgPool};
use crate::media::archive::{self, ArchiveLimits, ExtractedFile};
use crate::media::decode::{CacheSpec, Limits, Rejection};
use crate::media::worker::{Job, MediaPool};
use crate::quota;

pub mod datasets;
pub mod export;
pub mod import;
pub mod labels;
pub mod layout;
pub mod report;
pub mod split;

pub use datasets::{DatasetError, Receiving, UploadContent};
pub use report::{Report, report};
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
    /// The PACS that imports and predictions by study reference fetch from, if any.
    pub pacs: Option<crate::pacs::PacsConfig>,
    /// Largest instance fetched from the PACS.
    pub max_instance_bytes: u64,
}

impl IngestConfig {
    pub fn new(media_worker_exe: PathBuf) -> Self {
        Self {
            media_worker_exe,
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            archive_limits: ArchiveLimits::default(),
            video_limits: Limits::default(),
            pacs: None,
            max_instance_bytes: 8 << 30,
        }
    }
}

/// Ingest as the server runs it: its settings and its decoders, one set for the process.
pub struct Ingest {
    pub config: IngestConfig,
    /// Every upload's videos decode here: at most `config.concurrency` at once (and as many
    /// `media-worker` children), however many uploads are being ingested.
    decoders: MediaPool,
    /// Storage quota of a tenant without its own: a video is cached only while it fits.
    tenant_quota_bytes: u64,
    /// The configured PACS's client.
    pub pacs: Option<Arc<crate::pacs::Pacs>>,
}

impl Ingest {
    pub fn new(config: IngestConfig, tenant_quota_bytes: u64) -> Self {
        let pacs = config
            .pacs
            .clone()
            .and_then(|c| match crate::pacs::Pacs::new(c) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    tracing::error!(error = %e, "the PACS client could not be set up");
                    None
                }
            });
        Self {
            decoders: MediaPool::new(&config.media_worker_exe, config.concurrency),
            config,
            tenant_quota_bytes,
            pacs,
        }
    }
}

/// What is left of a tenant's storage quota while one upload's videos are cached: each video's
/// cache may take at most that (checked from the probe, before decoding, like the per-video
/// cap), and an accepted one takes its bytes off. Videos decoded at once each see what was left
/// when they began.
struct QuotaRoom(std::sync::atomic::AtomicU64);

impl QuotaRoom {
    /// `limits` for the next video: the cache cap lowered to what remains.
    fn limits(&self, limits: &Limits) -> Limits {
        let room = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Limits {
            max_cache_bytes: limits.max_cache_bytes.min(room),
            ..limits.clone()
        }
    }

    fn take(&self, bytes: u64) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |r| Some(r.saturating_sub(bytes)),
        );
    }

    /// A cache refused for its size when the quota, not the per-video cap, was the bound.
    fn explain(&self, job: &Limits, configured: &Limits, r: Rejection) -> Rejection {
        if r.code == "cache_too_large" && job.max_cache_bytes < configured.max_cache_bytes {
            Rejection::new(
                "quota_exceeded",
                format!(
                    "the video's cache would not fit in what remains of the tenant's storage \
                     quota ({} bytes); delete datasets or models, or ask an operator for more",
                    job.max_cache_bytes
                ),
            )
        } else {
            r
        }
    }
}

pub use crate::datadir::DatasetDirs;

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
pub fn spawn(db: PgPool, data_dir: PathBuf, ingest: Arc<Ingest>, upload: PendingUpload) {
    tokio::spawn(async move {
        let dataset_id = upload.dataset_id;
        if let Err(e) = run(&db, &data_dir, &ingest, &upload).await {
            // The cause (database text, server paths) is for the log; the tenant reads a stable
            // reason that the upload id ties to this log line.
            tracing::error!(error.cause_chain = ?e, %dataset_id, upload_id = %upload.id, "ingest failed");
            let _ = finish_failed(&db, &upload, INTERNAL_FAILURE).await;
        }
    });
}

/// Start fetching and ingesting an import in the background.
pub fn spawn_import(
    db: PgPool,
    data_dir: PathBuf,
    ingest: Arc<Ingest>,
    upload: PendingUpload,
    req: import::ImportRequest,
) {
    tokio::spawn(async move {
        let dataset_id = upload.dataset_id;
        if let Err(e) = run_with(&db, &data_dir, &ingest, &upload, Some(&req)).await {
            tracing::error!(error.cause_chain = ?e, %dataset_id, upload_id = %upload.id, "import failed");
            let _ = finish_failed(&db, &upload, INTERNAL_FAILURE).await;
        }
    });
}

/// Resume uploads a previous process did not finish.
pub async fn resume(db: &PgPool, data_dir: &Path, ingest: &Arc<Ingest>) -> anyhow::Result<()> {
    let reset = db::datasets::reset_interrupted_receiving(db).await?;
    if reset > 0 {
        tracing::warn!(
            datasets = reset,
            "discarded uploads interrupted by a restart"
        );
    }
    for upload in db::uploads::pending(db).await? {
        if upload.kind == UploadKind::Import {
            // Its request was never stored (it may name a patient): it is started again.
            let dirs = DatasetDirs::new(data_dir, upload.dataset_id);
            let _ = std::fs::remove_dir_all(dirs.files(upload.id));
            let removed = db::videos::delete_for_upload(db, upload.id).await?;
            db::datasets::restart_processing(db, upload.dataset_id, removed).await?;
            finish_failed(
                db,
                &upload,
                "interrupted by a restart; start the import again",
            )
            .await?;
            continue;
        }
        tracing::info!(dataset_id = %upload.dataset_id, upload_id = %upload.id, "resuming ingest");
        // Start again from the stored bytes: forget what the interrupted run recorded.
        let removed = db::videos::delete_for_upload(db, upload.id).await?;
        db::datasets::restart_processing(db, upload.dataset_id, removed).await?;
        spawn(db.clone(), data_dir.to_path_buf(), ingest.clone(), upload);
    }
    Ok(())
}

async fn run(
    db: &PgPool,
    data_dir: &Path,
    ingest: &Arc<Ingest>,
    upload: &PendingUpload,
) -> anyhow::Result<()> {
    run_with(db, data_dir, ingest, upload, None).await
}

/// [`run`], for an import with its request.
async fn run_with(
    db: &PgPool,
    data_dir: &Path,
    ingest: &Arc<Ingest>,
    upload: &PendingUpload,
    import: Option<&import::ImportRequest>,
) -> anyhow::Result<()> {
    let target = db::datasets::ingest_target(db, upload.dataset_id)
        .await?
        .context("the dataset was deleted")?;
    let dirs = DatasetDirs::new(data_dir, upload.dataset_id);
    std::fs::create_dir_all(dirs.cache())?;
    let deid_key = deid_key(db, upload.tenant_id).await?;
    let keys = crate::media::dicom::Pseudonyms::from_hex(&deid_key)
        .context("the tenant's de-identification key")?;
    let mut label_attribute = target.label_attribute.clone();
    // 1. Files and their labels.
    let plan = match (upload.kind, import) {
        (UploadKind::Archive, _) => {
            match plan_archive(&ingest.config, upload, &target, &dirs).await? {
                Ok(plan) => plan,
                Err(reason) => return finish_failed(db, upload, &reason).await,
            }
        }
        (UploadKind::Video, _) => layout::Plan {
            files: plan_single(upload, &target, &dirs)?,
            by_uid: None,
        },
        (UploadKind::Import, Some(req)) => {
            if let Some(a) = &req.labels.attribute {
                label_attribute = Some(a.clone());
            }
            let classes = target.classes.as_deref();
            match import::plan_import(db, ingest, upload, classes, &dirs, req, &keys).await? {
                Ok(files) => layout::Plan {
                    files,
                    by_uid: None,
                },
                Err(reason) => {
                    let _ = std::fs::remove_dir_all(dirs.files(upload.id));
                    return finish_failed(db, upload, &reason).await;
                }
            }
        }
        (UploadKind::Import, None) => anyhow::bail!("an import without its request"),
    };
    // 2. Rows. 3. Validation and the training cache.
    let queue = register_videos(db, upload, plan.files).await?;
    let labeller = labels::Labeller::new(plan.by_uid, Some(&keys), target.classes.clone());
    let dicom = crate::media::dicom::DicomJob {
        deid_key: Some(deid_key),
        label_attribute,
        ..Default::default()
    };
    let labeller = Arc::new(labeller);
    let (queue, series) = if target.series_as_clip {
        group_series(db, ingest, upload, &target, &dirs, queue, &dicom).await?
    } else {
        (queue, HashMap::new())
    };
    let dicom = Dicom {
        job: dicom,
        labeller,
        series: Arc::new(series),
    };
    cache_videos(db, ingest, upload, &target, &dirs, queue, &dicom).await?;
    refuse_unmatched_rows(db, upload, &dicom.labeller).await?;
    // 4. Splits, content hash, final status.
    finalize(db, upload, &target).await?;
    if upload.kind == UploadKind::Import {
        let _ = std::fs::remove_dir_all(dirs.files(upload.id));
    }
    if upload.kind == UploadKind::Archive {
        let _ = std::fs::remove_file(dirs.archive_body(upload.id));
    }
    Ok(())
}

/// Phase 1 for an archive: extract it within its limits and plan each file (label, split,
/// patient, or why it is refused). `Err`: the reason the whole upload fails, the extracted
/// files already removed.
async fn plan_archive(
    config: &IngestConfig,
    upload: &PendingUpload,
    target: &IngestTarget,
    dirs: &DatasetDirs,
) -> anyhow::Result<Result<layout::Plan, String>> {
    let files_dir = dirs.files(upload.id);
    let incoming = dirs.archive_body(upload.id);
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
            // The text names only what the archive holds; the code is the stable part.
            Err(e) => Ok(Err(format!("{e} ({})", e.code()))),
        }
    })
    .await??;
    let extracted = match extracted {
        Ok(x) => x,
        Err(reason) => {
            discard_archive(dirs, upload.id, &files_dir);
            return Ok(Err(reason));
        }
    };
    let mut plan = match layout::plan(extracted.files, target.classes.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            discard_archive(dirs, upload.id, &files_dir);
            return Ok(Err(e.0));
        }
    };
    for r in extracted.refused {
        plan.files.push(layout::Planned {
            path: r.rel,
            file: None,
            label: None,
            split: None,
            patient_id: None,
            claimed: false,
            verdict: Some((VideoStatus::Rejected, r.code, r.detail)),
            label_problem: None,
        });
    }
    Ok(Ok(plan))
}

/// Phase 1 for a single video: its file as received, with the label it was sent with.
fn plan_single(
    upload: &PendingUpload,
    target: &IngestTarget,
    dirs: &DatasetDirs,
) -> anyhow::Result<Vec<layout::Planned>> {
    let meta: VideoMeta = serde_json::from_value(upload.meta.clone()).context("upload meta")?;
    let path = dirs.video_body(upload.id);
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
    Ok(vec![layout::Planned {
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
    }])
}

/// Phase 2: one row per planned file, all visible at once with their count, so progress has a
/// stable total. Returns the files still to validate, with their video ids.
async fn register_videos(
    db: &PgPool,
    upload: &PendingUpload,
    mut planned: Vec<layout::Planned>,
) -> anyhow::Result<VecDeque<(Uuid, layout::Planned)>> {
    // Paths are the videos' key within the upload: a hostile archive (the same path twice,
    // NUL bytes) must come out as distinct, storable rows, not as a database error.
    layout::make_storable(&mut planned);
    let mut queue = VecDeque::new();
    let mut tx = db.begin().await?;
    for p in &planned {
        let id = Uuid::new_v4();
        let (status, code, reason) = match &p.verdict {
            Some((s, c, d)) => (*s, Some(*c), Some(d.as_str())),
            None => (VideoStatus::Pending, None, None),
        };
        let new = NewVideo {
            id,
            dataset_id: upload.dataset_id,
            tenant_id: upload.tenant_id,
            upload_id: upload.id,
            path: &p.path,
            status,
            reason_code: code,
            reason,
            label: p.label.as_deref(),
            split: p.split,
            patient_id: p.patient_id.as_deref(),
            sha256: p.file.as_ref().map(|f| f.sha256.as_str()),
            bytes: p.file.as_ref().map(|f| f.bytes),
        };
        db::videos::insert(&mut *tx, &new).await?;
        if p.verdict.is_none() {
            queue.push_back((id, p.clone()));
        }
    }
    let done = planned.len() - queue.len();
    db::datasets::add_progress(&mut *tx, upload.dataset_id, planned.len(), done).await?;
    tx.commit().await?;
    if upload.kind == UploadKind::Archive {
        for p in planned.iter().filter(|p| p.verdict.is_some()) {
            discard_source(p);
        }
    }
    Ok(queue)
}

/// Phase 3: validate and cache the queued videos, several at a time on the process's decoders
/// (each a media-worker child), recording each outcome as it comes.
async fn cache_videos(
    db: &PgPool,
    ingest: &Arc<Ingest>,
    upload: &PendingUpload,
    target: &IngestTarget,
    dirs: &DatasetDirs,
    queue: VecDeque<(Uuid, layout::Planned)>,
    dicom: &Dicom,
) -> anyhow::Result<()> {
    // The dataset's spec or nothing: a default here would cache at another size than the one
    // its models record and serving decodes at.
    let spec = CacheSpec::from_stored(&target.cache_spec).context("the dataset's cache spec")?;
    let config = &ingest.config;
    let workers = config.concurrency.clamp(1, queue.len().max(1));
    let spec = CacheSpec {
        threads: if workers > 1 { 1 } else { 0 },
        ..spec
    };
    let queue = Arc::new(Mutex::new(queue));
    let room = quota::usage(db, ingest.tenant_quota_bytes, upload.tenant_id)
        .await
        .context("the tenant's storage quota")?
        .remaining_bytes;
    let room = Arc::new(QuotaRoom(room.into()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, db, spec, room) = (queue.clone(), db.clone(), spec.clone(), room.clone());
        let (job_dicom, labeller) = (dicom.job.clone(), dicom.labeller.clone());
        let series = dicom.series.clone();
        let (ingest, limits) = (ingest.clone(), config.video_limits.clone());
        let cache_dir = dirs.cache();
        let dataset_id = upload.dataset_id;
        // Files ingest extracted or fetched itself (not a tenant's single upload).
        let from_archive = upload.kind != UploadKind::Video;
        let discard_sources = target.discard_sources;
        tasks.spawn(async move {
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
                    limits: room.limits(&limits),
                    dicom: crate::media::dicom::DicomJob {
                        series: series.get(&id).cloned().unwrap_or_default(),
                        ..job_dicom.clone()
                    },
                };
                // Waits for one of the process's decoders.
                let outcome = ingest.decoders.run(&job, deadline).await;
                // A DICOM object's own bytes carry the identifiers its cache does not: they go
                // once it is cached, however it came.
                let dicom = outcome.as_ref().is_ok_and(|i| i.dicom.is_some());
                let outcome = match outcome {
                    Ok(info) => {
                        room.take(info.cache_bytes());
                        Ok(info)
                    }
                    Err(r) => Err(room.explain(&job.limits, &limits, r)),
                };
                let accepted =
                    record_outcome(&db, dataset_id, id, &p, &job.cache, outcome, &labeller).await?;
                if (from_archive && !accepted) || dicom || discard_sources {
                    discard_source(&p);
                }
                for member in series.get(&id).into_iter().flatten() {
                    let _ = std::fs::remove_file(member);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
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
    labeller: &labels::Labeller,
) -> anyhow::Result<bool> {
    let mut tx = db.begin().await?;
    let accepted = match outcome {
        Ok(info) => {
            let r = labeller.resolve(p, info.dicom.as_deref());
            let (status, code, reason) = match &r.problem {
                Some((c, d)) => (VideoStatus::Rejected, Some(*c), Some(d.as_str())),
                None => (VideoStatus::Accepted, None, None),
            };
            let verdict = db::videos::Probed {
                status,
                reason_code: code,
                reason,
                label: r.label.as_deref(),
                split: r.split,
                patient_id: r.patient_id.as_deref(),
            };
            db::videos::record_probed(&mut *tx, id, &verdict, &info).await?;
            if status != VideoStatus::Accepted {
                let _ = std::fs::remove_file(cache);
            }
            status == VideoStatus::Accepted
        }
        Err(r) => {
            if let Some(cause) = &r.log {
                // The tenant reads the rejection's plain detail; the cause is only logged.
                tracing::error!(%dataset_id, video_id = %id, code = %r.code, cause, "a video could not be processed");
            }
            // Something FFmpeg does not recognise at all is skipped, unless the upload said it
            // was a video (labels.csv, single-video upload) or its name says so.
            let status = if r.is_not_media() && !p.claimed && !has_video_extension(&p.path) {
                VideoStatus::Skipped
            } else {
                VideoStatus::Rejected
            };
            db::videos::record_refused(&mut *tx, id, status, &r.code, &r.detail).await?;
            false
        }
    };
    db::datasets::video_done(&mut *tx, dataset_id).await?;
    tx.commit().await?;
    Ok(accepted)
}

/// What cache_videos needs for DICOM objects: the worker's job, the labels learnt from the
/// objects, and the series folded into their first image.
struct Dicom {
    job: crate::media::dicom::DicomJob,
    labeller: Arc<labels::Labeller>,
    /// Video id of a series' first image → the files of its other images.
    series: Arc<HashMap<Uuid, Vec<PathBuf>>>,
}

/// Single-frame DICOM images of one series become one clip: each queued DICOM file's header
/// is read by a decoder (never here), images are grouped by their (keyed) series, and every
/// image but the first of a group of two or more leaves the queue as a skipped row that names
/// the clip it went into.
async fn group_series(
    db: &PgPool,
    ingest: &Arc<Ingest>,
    upload: &PendingUpload,
    target: &IngestTarget,
    dirs: &DatasetDirs,
    queue: VecDeque<(Uuid, layout::Planned)>,
    dicom: &crate::media::dicom::DicomJob,
) -> anyhow::Result<(
    VecDeque<(Uuid, layout::Planned)>,
    HashMap<Uuid, Vec<PathBuf>>,
)> {
    let spec = CacheSpec::from_stored(&target.cache_spec).context("the dataset's cache spec")?;
    let limits = ingest.config.video_limits.clone();
    let deadline = Duration::from_secs_f64(limits.max_decode_s + 30.0);
    let mut groups: std::collections::BTreeMap<String, Vec<(Uuid, layout::Planned)>> =
        Default::default();
    let mut rest = VecDeque::new();
    for (id, p) in queue {
        let file = p.file.as_ref().expect("queued videos have a file");
        if !crate::media::dicom::is_dicom(&file.path) {
            rest.push_back((id, p));
            continue;
        }
        let job = Job {
            src: file.path.clone(),
            cache: dirs.cache().join(format!("{id}.probe")),
            spec: spec.clone(),
            limits: limits.clone(),
            dicom: crate::media::dicom::DicomJob {
                probe: true,
                ..dicom.clone()
            },
        };
        let series = match ingest.decoders.run(&job, deadline).await {
            Ok(info) if info.frames == 1 => info.dicom.and_then(|d| d.series_uid),
            _ => None,
        };
        match series {
            Some(s) => groups.entry(s).or_default().push((id, p)),
            None => rest.push_back((id, p)),
        }
    }
    let mut members = HashMap::new();
    for (_, mut images) in groups {
        images.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        let (first_id, first) = images.remove(0);
        if !images.is_empty() {
            let mut tx = db.begin().await?;
            for (id, _) in &images {
                let reason = format!("one image of the series cached as `{}`", first.path);
                db::videos::record_refused(
                    &mut *tx,
                    *id,
                    VideoStatus::Skipped,
                    "series_member",
                    &reason,
                )
                .await?;
                db::datasets::video_done(&mut *tx, upload.dataset_id).await?;
            }
            tx.commit().await?;
            let files = images
                .into_iter()
                .filter_map(|(_, p)| p.file.map(|f| f.path))
                .collect();
            members.insert(first_id, files);
        }
        rest.push_back((first_id, first));
    }
    Ok((rest, members))
}

/// labels.csv rows keyed by a UID that no object of the upload has: each a refused row, so
/// the report shows it as a listed file that was missing.
async fn refuse_unmatched_rows(
    db: &PgPool,
    upload: &PendingUpload,
    labeller: &labels::Labeller,
) -> anyhow::Result<()> {
    let unmatched = labeller.unmatched();
    if unmatched.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    for (line, column) in &unmatched {
        let path = format!("labels.csv row {line}");
        let reason = format!("no object in the upload has the {column} this row names");
        let new = NewVideo {
            id: Uuid::new_v4(),
            dataset_id: upload.dataset_id,
            tenant_id: upload.tenant_id,
            upload_id: upload.id,
            path: &path,
            status: VideoStatus::Rejected,
            reason_code: Some("missing_file"),
            reason: Some(&reason),
            label: None,
            split: None,
            patient_id: None,
            sha256: None,
            bytes: None,
        };
        db::videos::insert(&mut *tx, &new).await?;
    }
    db::datasets::add_progress(
        &mut *tx,
        upload.dataset_id,
        unmatched.len(),
        unmatched.len(),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The tenant's de-identification key, hex (made on first use).
pub async fn deid_key(db: &PgPool, tenant_id: Uuid) -> anyhow::Result<String> {
    let fresh: [u8; 32] = rand::random();
    let key = db::tenants::deid_key(db, tenant_id, &fresh)
        .await?
        .context("the tenant does not exist")?;
    Ok(hex::encode(key))
}

/// An extracted file that is not an accepted video: nothing reads it again (training reads
/// caches, and a restarted ingest extracts the stored archive anew), so it does not keep
/// holding the disk.
fn discard_source(p: &layout::Planned) {
    if let Some(f) = &p.file {
        let _ = std::fs::remove_file(&f.path);
    }
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
    upload: &PendingUpload,
    target: &IngestTarget,
) -> anyhow::Result<()> {
    let spec: SplitSpec = serde_json::from_value(target.split.clone()).unwrap_or_default();
    let videos = db::datasets::dataset_videos(db, target.id).await?;
    let accepted: Vec<_> = videos
        .iter()
        .filter(|v| v.status == VideoStatus::Accepted)
        .collect();
    let study = |v: &db::videos::Video| -> Option<String> {
        let uid = v.dicom.as_ref()?.get("study_uid")?.as_str()?;
        Some(format!("study {uid}"))
    };
    let mut items: Vec<split::Item> = accepted
        .iter()
        .map(|v| split::Item {
            label: v.label.clone().unwrap_or_default(),
            patient: match spec.group_by {
                split::GroupBy::Patient => v.patient_id.clone(),
                split::GroupBy::Study => study(v).or_else(|| v.patient_id.clone()),
            },
            split: v.split,
        })
        .collect();
    split::assign(&mut items, &spec);

    let mut hasher = Sha256::new();
    let mut lines: Vec<String> = Vec::with_capacity(accepted.len());
    let mut tx = db.begin().await?;
    for (v, it) in accepted.iter().zip(&items) {
        let s = it.split.expect("assigned");
        if v.split != Some(s) {
            db::videos::set_split(&mut *tx, v.id, s).await?;
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
    let count = |status| videos.iter().filter(|v| v.status == status).count();
    let (rejected, skipped) = (count(VideoStatus::Rejected), count(VideoStatus::Skipped));
    let summary = format!(
        "{} accepted, {rejected} rejected, {skipped} skipped",
        accepted.len()
    );
    let (status, reason) = if accepted.is_empty() {
        (
            DatasetStatus::Failed,
            format!("no usable videos ({summary})"),
        )
    } else {
        (DatasetStatus::Ready, summary)
    };
    let hash = (!accepted.is_empty()).then(|| hex::encode(hasher.finalize()));
    db::datasets::finish_ingest(&mut *tx, target.id, status, &reason, hash.as_deref()).await?;
    db::uploads::finish(&mut *tx, upload.id, UploadStatus::Done, None).await?;
    tx.commit().await?;
    Ok(())
}

/// An archive refused whole: its bytes and whatever was extracted are removed, so that a bad
/// multi-gigabyte upload does not keep holding the disk.
fn discard_archive(dirs: &DatasetDirs, upload_id: Uuid, files_dir: &Path) {
    let _ = std::fs::remove_file(dirs.archive_body(upload_id));
    let _ = std::fs::remove_dir_all(files_dir);
}

/// The upload as a whole could not be used; keep what the dataset already had.
async fn finish_failed(db: &PgPool, upload: &PendingUpload, reason: &str) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    db::uploads::finish(&mut *tx, upload.id, UploadStatus::Failed, Some(reason)).await?;
    let detail = format!("upload {} failed: {reason}", upload.id);
    db::datasets::upload_failed(&mut *tx, upload.dataset_id, &detail).await?;
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
