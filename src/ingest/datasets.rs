//! What the API asks of datasets beyond reading rows: create one from a checked request and
//! receive uploads one at a time, handing each to ingest once its bytes are safely on disk.
//! Deletion is [`crate::retention`]'s.
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

use super::split::{Split, SplitSpec};
use super::{Ingest, VideoMeta};
use crate::db::{self, PgPool, datasets::Dataset, uploads::UploadKind};
use crate::media::decode::CacheSpec;

/// Why a dataset operation was refused. Each variant is one problem the API reports.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A request field is out of bounds.
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("no such dataset")]
    NotFound,
    #[error(transparent)]
    Import(#[from] super::import::ImportError),
    #[error("a dataset with this name already exists")]
    NameTaken,
    /// One upload per dataset at a time: progress and the content hash are per dataset.
    #[error("another upload to this dataset is being received or processed")]
    UploadInProgress,
    #[error(transparent)]
    Database(#[from] db::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn invalid(field: &'static str, detail: &str) -> DatasetError {
    DatasetError::Invalid {
        field,
        detail: detail.to_owned(),
    }
}

/// The body of a dataset creation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDataset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Optional closed set of labels.
    pub classes: Option<Vec<String>>,
    #[serde(default)]
    pub split: SplitSpec,
    #[serde(default)]
    pub cache: Option<CacheRequest>,
    /// How DICOM objects are labelled when nothing else labels them.
    #[serde(default)]
    pub dicom: Option<DicomOptions>,
    /// Delete each video's source once its training cache is written (DICOM objects' always
    /// are): burned-in text in an MP4's pixels then survives only where the cache keeps it.
    #[serde(default)]
    pub discard_sources: Option<bool>,
}

/// A dataset's DICOM options.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DicomOptions {
    /// The attribute (keyword or `gggg,eeee`) whose value labels an object that no folder or
    /// labels.csv row labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_attribute: Option<String>,
    /// Single-frame images of one series (same Series Instance UID) form one clip, ordered by
    /// Instance Number, then acquisition time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub series_as_clip: bool,
}

/// The training cache's size and rate, each defaulting to [`CacheSpec`]'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRequest {
    pub short_side: Option<u32>,
    pub fps: Option<f64>,
    /// What is done to DICOM objects' pixels before caching (crop, masks).
    pub dicom: Option<crate::media::dicom::PixelPolicy>,
}

/// Control characters (NUL above all, which PostgreSQL text cannot hold) have no place in names
/// and labels.
fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

impl NewDataset {
    /// The cache spec to store, once every field is within bounds.
    fn check(&self) -> Result<CacheSpec, DatasetError> {
        let name = self.name.trim();
        if name.is_empty() || self.name.chars().count() > 200 || has_control(&self.name) {
            return Err(invalid(
                "name",
                "1 to 200 characters, no control characters",
            ));
        }
        // PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database.
        if self.description.chars().count() > 10_000 || self.description.contains('\0') {
            return Err(invalid("description", "at most 10000 characters, no NUL"));
        }
        if let Some(classes) = &self.classes {
            let unique: HashSet<_> = classes.iter().collect();
            if classes.is_empty()
                || unique.len() != classes.len()
                || classes
                    .iter()
                    .any(|c| c.trim().is_empty() || c.chars().count() > 100 || has_control(c))
            {
                return Err(invalid(
                    "classes",
                    "a non-empty list of distinct, non-empty labels of at most 100 characters \
                     without control characters",
                ));
            }
        }
        if let Some(a) = self
            .dicom
            .as_ref()
            .and_then(|d| d.label_attribute.as_deref())
        {
            crate::media::dicom::label_tag(a).map_err(|e| DatasetError::Invalid {
                field: "dicom.label_attribute",
                detail: e,
            })?;
        }
        self.split.validate().map_err(|e| DatasetError::Invalid {
            field: "split",
            detail: e,
        })?;
        let mut cache = CacheSpec::default();
        if let Some(c) = &self.cache {
            if let Some(side) = c.short_side {
                if !(32..=1080).contains(&side) {
                    return Err(invalid("cache.short_side", "between 32 and 1080"));
                }
                cache.short_side = side;
            }
            if let Some(fps) = c.fps {
                if !(fps.is_finite() && (1.0..=120.0).contains(&fps)) {
                    return Err(invalid("cache.fps", "between 1 and 120"));
                }
                cache.fps = fps;
            }
            if let Some(d) = &c.dicom {
                let bad = |m: &crate::media::dicom::Rect| {
                    m.width == 0 || m.height == 0 || m.x > 65535 || m.y > 65535
                };
                if d.masks.len() > 64 || d.masks.iter().any(bad) {
                    return Err(invalid(
                        "cache.dicom.masks",
                        "at most 64 rectangles, each with a width and height of at least 1 \
                         and x, y at most 65535",
                    ));
                }
                cache.dicom = d.clone();
            }
        }
        Ok(cache)
    }
}

/// Check and store a new dataset; returns it as the API shows it.
pub async fn create(
    db: &PgPool,
    tenant_id: Uuid,
    req: &NewDataset,
) -> Result<Dataset, DatasetError> {
    let cache = req.check()?;
    let id = db::datasets::create(
        db,
        &db::datasets::NewDataset {
            tenant_id,
            name: req.name.trim(),
            description: &req.description,
            classes: req.classes.as_deref(),
            split: serde_json::to_value(req.split).expect("serialises"),
            cache_spec: cache.to_stored(),
            dicom: serde_json::to_value(req.dicom.as_ref().unwrap_or(&DicomOptions::default()))
                .expect("serialises"),
            discard_sources: req.discard_sources.unwrap_or(false),
        },
    )
    .await
    .map_err(|e| {
        if db::is_unique_violation(&e) {
            DatasetError::NameTaken
        } else {
            e.into()
        }
    })?;
    db::datasets::get(db, tenant_id, id)
        .await?
        .ok_or(DatasetError::NotFound)
}

/// The query parameters or form fields that come with a single video.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VideoFields {
    pub label: Option<String>,
    pub split: Option<String>,
    pub patient_id: Option<String>,
    pub filename: Option<String>,
}

impl VideoMeta {
    /// Check a single video's fields: a label is required, the rest is optional.
    pub fn parse(f: VideoFields) -> Result<VideoMeta, DatasetError> {
        let label = f.label.unwrap_or_default().trim().to_owned();
        if label.is_empty() || label.len() > 100 || has_control(&label) {
            return Err(invalid(
                "label",
                "a label of 1 to 100 characters, without control characters, is required",
            ));
        }
        let split = match f.split.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(Split::parse(s).ok_or_else(|| invalid("split", "train, val or test"))?),
        };
        let patient_id = f
            .patient_id
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty());
        if patient_id
            .as_ref()
            .is_some_and(|p| p.len() > 100 || has_control(p))
        {
            return Err(invalid(
                "patient_id",
                "at most 100 characters, no control characters",
            ));
        }
        // Only shown back to the tenant: keep it, minus what cannot be stored or displayed.
        let filename = f
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
}

/// What an upload brought.
pub enum UploadContent {
    /// An archive, stored at [`super::DatasetDirs::archive_body`].
    Archive,
    /// One video, stored at [`super::DatasetDirs::video_body`].
    Video(VideoMeta),
}

/// Holds the dataset's "receiving" flag while an upload's body arrives; puts the dataset back if
/// the upload is not accepted (also when the client disconnects and the request is dropped).
pub struct Receiving {
    db: PgPool,
    tenant_id: Uuid,
    dataset_id: Uuid,
    upload_id: Uuid,
    armed: bool,
}

impl Receiving {
    /// Take the dataset for one upload, or say why not.
    pub async fn claim(
        db: &PgPool,
        tenant_id: Uuid,
        dataset_id: Uuid,
    ) -> Result<Self, DatasetError> {
        match db::datasets::begin_receiving(db, tenant_id, dataset_id).await? {
            None => Err(DatasetError::NotFound),
            Some(false) => Err(DatasetError::UploadInProgress),
            Some(true) => Ok(Self {
                db: db.clone(),
                tenant_id,
                dataset_id,
                upload_id: Uuid::new_v4(),
                armed: true,
            }),
        }
    }

    /// The id the upload will have; its body is stored under it.
    pub fn upload_id(&self) -> Uuid {
        self.upload_id
    }

    /// The upload is refused: give the dataset back before the refusal is answered, so a client
    /// that retries at once finds it free (dropping a `Receiving` also gives it back, but later).
    pub async fn release(mut self) {
        self.armed = false;
        if let Err(e) = db::datasets::abort_receiving(&self.db, self.dataset_id).await {
            tracing::error!(error = %e, dataset_id = %self.dataset_id, "could not release a refused upload");
        }
    }

    /// An import from the PACS: recorded as an upload (its request is not stored), fetched and
    /// ingested in the background. Returns the upload id.
    pub async fn accept_import(
        mut self,
        data_dir: PathBuf,
        ingest: Arc<Ingest>,
        req: super::import::ImportRequest,
    ) -> Result<Uuid, DatasetError> {
        let upload = db::uploads::NewUpload {
            id: self.upload_id,
            dataset_id: self.dataset_id,
            tenant_id: self.tenant_id,
            kind: UploadKind::Import,
            bytes: 0,
            sha256: "",
            meta: serde_json::json!({}),
        };
        if let Err(e) = db::uploads::received(&self.db, &upload).await {
            self.release().await;
            return Err(e.into());
        }
        self.armed = false;
        super::spawn_import(
            self.db.clone(),
            data_dir,
            ingest,
            db::uploads::PendingUpload {
                id: upload.id,
                sha256: String::new(),
                dataset_id: upload.dataset_id,
                tenant_id: upload.tenant_id,
                kind: UploadKind::Import,
                meta: upload.meta,
            },
            req,
        );
        Ok(upload.id)
    }

    /// The body is whole on disk and its checksum verified: record the upload and start ingest.
    pub async fn accept(
        mut self,
        data_dir: PathBuf,
        ingest: Arc<Ingest>,
        content: UploadContent,
        bytes: u64,
        sha256: &str,
    ) -> Result<(), DatasetError> {
        let (kind, meta) = match content {
            UploadContent::Archive => (UploadKind::Archive, serde_json::json!({})),
            UploadContent::Video(meta) => (
                UploadKind::Video,
                serde_json::to_value(meta).expect("serialises"),
            ),
        };
        let upload = db::uploads::NewUpload {
            id: self.upload_id,
            dataset_id: self.dataset_id,
            tenant_id: self.tenant_id,
            kind,
            bytes,
            sha256,
            meta,
        };
        if let Err(e) = db::uploads::received(&self.db, &upload).await {
            self.release().await;
            return Err(e.into());
        }
        self.armed = false;
        super::spawn(
            self.db.clone(),
            data_dir,
            ingest,
            db::uploads::PendingUpload {
                id: upload.id,
                sha256: sha256.to_owned(),
                dataset_id: upload.dataset_id,
                tenant_id: upload.tenant_id,
                kind,
                meta: upload.meta,
            },
        );
        Ok(())
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
