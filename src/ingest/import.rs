//! Studies pulled from the configured PACS into a dataset: QIDO-RS finds the instances (a query
//! or a list of study UIDs), WADO-RS fetches each as stored, and the objects then go through
//! ingest like an upload's files, with their labels from the request's mapping.
//!
//! The request (it may hold a Patient ID or study UIDs) is kept in memory only: an import that a
//! restart interrupts fails and is started again, and nothing of its query is stored or logged.
//! Videos are named by their keyed replacement UIDs, never by the PACS's own.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

use super::layout::{self, Planned};
use super::{DatasetDirs, Ingest, sha256_file};
use crate::db::videos::VideoStatus;
use crate::db::{self, PgPool};
use crate::media::archive::ExtractedFile;
use crate::media::dicom::Pseudonyms;
use crate::pacs::{InstanceRef, Pacs, QUERY_KEYS};

/// Most instances one import may fetch, whatever it asks.
pub const MAX_INSTANCES: usize = 10_000;

/// `POST /v1/datasets/{id}/imports`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// Study Instance UIDs to import.
    #[serde(default)]
    pub studies: Option<Vec<String>>,
    /// QIDO-RS match keys (see [`QUERY_KEYS`]) selecting the studies.
    #[serde(default)]
    pub query: Option<BTreeMap<String, String>>,
    pub labels: ImportLabels,
    /// Most instances fetched (default 1000); more matching is refused, not truncated.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
}

fn default_max_instances() -> usize {
    1000
}

/// Where each imported object's label comes from: exactly one of these.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportLabels {
    /// Study Instance UID → label.
    #[serde(default)]
    pub by_study: Option<BTreeMap<String, String>>,
    /// Series Instance UID → label.
    #[serde(default)]
    pub by_series: Option<BTreeMap<String, String>>,
    /// The value of this attribute (keyword or `gggg,eeee`).
    #[serde(default)]
    pub attribute: Option<String>,
    /// One label for everything imported.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("no PACS is configured on this server (VIDTUNE_PACS_URL)")]
    NoPacs,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> ImportError {
    ImportError::Invalid {
        field,
        detail: detail.into(),
    }
}

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl ImportRequest {
    /// Every field within bounds, or which is not.
    pub fn check(&self) -> Result<(), ImportError> {
        match (&self.studies, &self.query) {
            (Some(s), None) => {
                if s.is_empty() || s.len() > MAX_INSTANCES || !s.iter().all(|u| is_uid(u)) {
                    return Err(invalid(
                        "studies",
                        format!("1 to {MAX_INSTANCES} Study Instance UIDs (digits and dots)"),
                    ));
                }
            }
            (None, Some(q)) => {
                if q.is_empty() {
                    return Err(invalid("query", "at least one match key"));
                }
                for (k, v) in q {
                    if !QUERY_KEYS.contains(&k.as_str()) {
                        return Err(invalid(
                            "query",
                            format!("`{k}` is not one of {}", QUERY_KEYS.join(", ")),
                        ));
                    }
                    if v.is_empty() || v.len() > 64 || v.chars().any(char::is_control) {
                        return Err(invalid(
                            "query",
                            format!("`{k}`: 1 to 64 characters, no control characters"),
                        ));
                    }
                }
            }
            _ => return Err(invalid("studies", "give either `studies` or `query`")),
        }
        if !(1..=MAX_INSTANCES).contains(&self.max_instances) {
            return Err(invalid(
                "max_instances",
                format!("between 1 and {MAX_INSTANCES}"),
            ));
        }
        let l = &self.labels;
        let given = [
            l.by_study.is_some(),
            l.by_series.is_some(),
            l.attribute.is_some(),
            l.value.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                "labels",
                "exactly one of `by_study`, `by_series`, `attribute` or `value`",
            ));
        }
        for map in [&l.by_study, &l.by_series].into_iter().flatten() {
            if map.is_empty() || map.len() > MAX_INSTANCES || !map.keys().all(|u| is_uid(u)) {
                return Err(invalid(
                    "labels",
                    "a map of UIDs (digits and dots) to labels",
                ));
            }
        }
        if let Some(a) = &l.attribute {
            crate::media::dicom::label_tag(a).map_err(|e| invalid("labels.attribute", e))?;
        }
        Ok(())
    }

    /// The label an instance gets from the mapping (`None`: from its attribute, once read).
    fn label_for(&self, inst: &InstanceRef) -> Option<String> {
        let l = &self.labels;
        if let Some(m) = &l.by_study {
            return m.get(&inst.study).cloned().or(Some(String::new()));
        }
        if let Some(m) = &l.by_series {
            return m.get(&inst.series).cloned().or(Some(String::new()));
        }
        l.value.clone()
    }
}

/// The studies the request names or its query finds, and their instances (at most
/// `max_instances`).
async fn instances(pacs: &Pacs, req: &ImportRequest) -> Result<Vec<InstanceRef>, String> {
    let studies = match (&req.studies, &req.query) {
        (Some(s), _) => s.clone(),
        (None, Some(q)) => {
            let q: Vec<(String, String)> = q.clone().into_iter().collect();
            pacs.studies(&q, MAX_INSTANCES)
                .await
                .map_err(|e| e.to_string())?
        }
        (None, None) => Vec::new(),
    };
    if studies.is_empty() {
        return Err("no study on the PACS matches the import".into());
    }
    let mut out = Vec::new();
    for st in &studies {
        out.extend(pacs.instances(st).await.map_err(|e| e.to_string())?);
        if out.len() > req.max_instances {
            return Err(format!(
                "the import matches more than its {} instances; narrow it or raise \
                 `max_instances`",
                req.max_instances
            ));
        }
    }
    if out.is_empty() {
        return Err("the matching studies hold no instances".into());
    }
    Ok(out)
}

/// Phase 1 of an import: find and fetch the instances into the upload's files folder, each a
/// planned file with its label; an instance that cannot be fetched is a refused row. `Err`:
/// the import fails as a whole (nothing to fetch, the PACS unreachable at the search).
pub(super) async fn plan_import(
    db: &PgPool,
    ingest: &Ingest,
    upload: &crate::db::uploads::PendingUpload,
    classes: Option<&[String]>,
    dirs: &DatasetDirs,
    req: &ImportRequest,
    keys: &Pseudonyms,
) -> anyhow::Result<Result<Vec<Planned>, String>> {
    let Some(pacs) = ingest.pacs.as_ref() else {
        return Ok(Err("no PACS is configured on this server".into()));
    };
    let found = match instances(pacs, req).await {
        Ok(f) => f,
        Err(reason) => return Ok(Err(reason)),
    };
    let dest = dirs.files(upload.id);
    std::fs::create_dir_all(&dest)?;
    // The fetch is held to the archive's total cap and to what the tenant's quota leaves.
    let room = crate::quota::usage(db, ingest.tenant_quota_bytes, upload.tenant_id)
        .await?
        .remaining_bytes;
    let mut left = ingest.config.archive_limits.max_total_bytes.min(room);
    let mut planned = Vec::with_capacity(found.len());
    let mut fetched_bytes = 0u64;
    for (i, inst) in found.iter().enumerate() {
        // Named by the tenant's replacement UIDs: the PACS's own never reach a row.
        let path = format!(
            "pacs/{}/{}/{}",
            keys.uid(&inst.study),
            keys.uid(&inst.series),
            keys.uid(&inst.sop)
        );
        let file = dest.join(format!("{i}.dcm"));
        let cap = ingest.config.max_instance_bytes.min(left);
        let label = req.label_for(inst);
        let label_problem = match &label {
            Some(l) if l.is_empty() => Some((
                "missing_label",
                "the import's label mapping names neither this study nor this series".into(),
            )),
            Some(l) => layout::check_label(l, classes),
            None => Some((
                "missing_label",
                "the object has no value for the label attribute".into(),
            )),
        };
        let mut p = Planned {
            path,
            file: None,
            label: label.filter(|l| !l.is_empty()),
            split: None,
            patient_id: None,
            claimed: true,
            verdict: None,
            label_problem,
        };
        match pacs.retrieve(inst, &file, cap).await {
            Ok(bytes) => {
                left = left.saturating_sub(bytes);
                fetched_bytes += bytes;
                let sha256 = sha256_file(&file)?;
                p.file = Some(ExtractedFile {
                    rel: format!("{i}.dcm"),
                    path: file,
                    bytes,
                    sha256,
                });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&file);
                if let crate::pacs::PacsError::Io(e) = &e {
                    anyhow::bail!("writing a fetched instance failed: {e}");
                }
                let detail = match e {
                    crate::pacs::PacsError::TooLarge(c) if c < ingest.config.max_instance_bytes => {
                        "the import reached its byte cap (the archive cap, or what the tenant's \
                         storage quota leaves) before this instance"
                            .to_string()
                    }
                    e => e.to_string(),
                };
                p.verdict = Some((VideoStatus::Rejected, "fetch_failed", detail));
            }
        }
        planned.push(p);
    }
    db::uploads::set_bytes(db, upload.id, fetched_bytes).await?;
    Ok(Ok(planned))
}

/// Start an import: the request checked, the dataset taken for it, the fetch and ingest in the
/// background. Returns the upload id its progress is reported under.
pub async fn start(
    db: &PgPool,
    data_dir: &Path,
    ingest: &Arc<Ingest>,
    tenant_id: Uuid,
    dataset_id: Uuid,
    req: ImportRequest,
) -> Result<Uuid, super::DatasetError> {
    if ingest.pacs.is_none() {
        return Err(super::DatasetError::Import(ImportError::NoPacs));
    }
    req.check().map_err(super::DatasetError::Import)?;
    let receiving = super::Receiving::claim(db, tenant_id, dataset_id).await?;
    receiving
        .accept_import(data_dir.to_path_buf(), ingest.clone(), req)
        .await
}
