//! The QA report: what is in a dataset and what a careful engineer would want to know before
//! training on it (small classes, classes missing from a split, short videos, duplicates, patients
//! in two splits).
//!
//! Fields are declared in alphabetical order: that is the order the API has always sent them in,
//! and `openapi.yaml` (`DatasetReport`) documents exactly this tree.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use uuid::Uuid;

use super::split::{Split, SplitSpec};
use crate::db::datasets::{Dataset, DatasetStatus};
use crate::db::videos::{Video, VideoStatus};

/// A video shorter than this many cached frames cannot fill one standard 16-frame clip.
const TYPICAL_CLIP_FRAMES: i32 = 16;
/// Fewer videos than this in a class makes its metrics unreliable.
const FEW_VIDEOS: usize = 10;

/// The report on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Accepted videos per class and split, by label.
    pub classes: Vec<ClassCounts>,
    /// Accepted videos per codec name (`unknown` when not probed).
    pub codecs: BTreeMap<String, usize>,
    pub content_hash: Option<String>,
    pub dataset_id: Uuid,
    /// Of the accepted videos; `None` when there are none.
    pub duration_s: Option<Summary>,
    pub fps: Option<Summary>,
    pub frames: Option<Summary>,
    pub rejected: Vec<FileReason>,
    /// Accepted videos per source resolution, smallest width first.
    pub resolutions: Vec<Resolution>,
    pub skipped: Vec<FileReason>,
    /// Accepted videos per split.
    pub splits: SplitCounts,
    pub status: DatasetStatus,
    pub totals: Totals,
    pub warnings: Vec<Warning>,
}

/// Videos per status; `videos` counts them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub accepted: usize,
    pub pending: usize,
    pub rejected: usize,
    pub skipped: usize,
    pub videos: usize,
}

/// One class's accepted videos.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    pub label: String,
    pub test: usize,
    pub total: usize,
    pub train: usize,
    pub val: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitCounts {
    pub test: usize,
    pub train: usize,
    pub val: usize,
}

/// Spread of one measure over the accepted videos.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub max: f64,
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolution {
    pub height: i32,
    pub videos: usize,
    pub width: i32,
}

/// A file that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileReason {
    pub code: Option<String>,
    pub id: Uuid,
    pub path: String,
    pub reason: Option<String>,
}

/// Something that would make training or its evaluation misleading; `code` names the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Warning {
    FewVideosInClass {
        detail: String,
        label: String,
    },
    ClassMissingFromSplit {
        detail: String,
        label: String,
        split: Split,
    },
    SingleClass {
        detail: &'static str,
    },
    ShortVideos {
        detail: String,
        paths: Vec<String>,
    },
    DuplicateContent {
        detail: &'static str,
        paths: Vec<String>,
        sha256: String,
    },
    DuplicateAcrossSplits {
        detail: &'static str,
        paths: Vec<String>,
        sha256: String,
    },
    PatientInTwoSplits {
        detail: &'static str,
        patient_id: String,
        splits: Vec<Split>,
    },
}

impl Warning {
    /// The stable code the API sends.
    pub fn code(&self) -> &'static str {
        match self {
            Warning::FewVideosInClass { .. } => "few_videos_in_class",
            Warning::ClassMissingFromSplit { .. } => "class_missing_from_split",
            Warning::SingleClass { .. } => "single_class",
            Warning::ShortVideos { .. } => "short_videos",
            Warning::DuplicateContent { .. } => "duplicate_content",
            Warning::DuplicateAcrossSplits { .. } => "duplicate_across_splits",
            Warning::PatientInTwoSplits { .. } => "patient_in_two_splits",
        }
    }
}

fn summary(mut values: Vec<f64>) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    let total = values.iter().sum::<f64>();
    Some(Summary {
        max: values[n - 1],
        mean: total / n as f64,
        median,
        min: values[0],
        total,
    })
}

/// The report on dataset `d` holding `videos` (all of them, every status).
pub fn report(d: &Dataset, videos: &[Video]) -> Report {
    let accepted: Vec<&Video> = videos
        .iter()
        .filter(|v| v.status == VideoStatus::Accepted)
        .collect();
    let spec: SplitSpec = serde_json::from_value(d.split.clone()).unwrap_or_default();
    let mut warnings = Vec::new();
    let classes = class_counts(&accepted, &spec, &mut warnings);
    warnings.extend(short_videos(&accepted));
    warnings.extend(duplicates(&accepted));
    warnings.extend(patients_in_two_splits(&accepted));

    let mut resolutions: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    let mut codecs: BTreeMap<String, usize> = BTreeMap::new();
    for v in &accepted {
        *resolutions
            .entry((v.width.unwrap_or(0), v.height.unwrap_or(0)))
            .or_default() += 1;
        *codecs
            .entry(v.codec.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
    }
    let with_status = |status| videos.iter().filter(move |v| v.status == status);
    let listed = |status| {
        with_status(status)
            .map(|v| FileReason {
                code: v.reason_code.clone(),
                id: v.id,
                path: v.path.clone(),
                reason: v.reason.clone(),
            })
            .collect()
    };
    let in_split = |s| accepted.iter().filter(|v| v.split == Some(s)).count();
    Report {
        classes,
        codecs,
        content_hash: d.content_hash.clone(),
        dataset_id: d.id,
        duration_s: summary(accepted.iter().filter_map(|v| v.duration_s).collect()),
        fps: summary(accepted.iter().filter_map(|v| v.fps).collect()),
        frames: summary(
            accepted
                .iter()
                .filter_map(|v| v.frames.map(|f| f as f64))
                .collect(),
        ),
        rejected: listed(VideoStatus::Rejected),
        resolutions: resolutions
            .into_iter()
            .map(|((width, height), videos)| Resolution {
                height,
                videos,
                width,
            })
            .collect(),
        skipped: listed(VideoStatus::Skipped),
        splits: SplitCounts {
            test: in_split(Split::Test),
            train: in_split(Split::Train),
            val: in_split(Split::Val),
        },
        status: d.status,
        totals: Totals {
            accepted: accepted.len(),
            pending: with_status(VideoStatus::Pending).count(),
            rejected: with_status(VideoStatus::Rejected).count(),
            skipped: with_status(VideoStatus::Skipped).count(),
            videos: videos.len(),
        },
        warnings,
    }
}

/// Per class (by label) and split, with the warnings about small classes, classes absent from an
/// evaluation split that has a share, and a lone class.
fn class_counts(
    accepted: &[&Video],
    spec: &SplitSpec,
    warnings: &mut Vec<Warning>,
) -> Vec<ClassCounts> {
    // `None`: no split assigned yet (counted in the total only).
    let mut classes: BTreeMap<&str, BTreeMap<Option<Split>, usize>> = BTreeMap::new();
    for v in accepted {
        let label = v.label.as_deref().unwrap_or("");
        *classes
            .entry(label)
            .or_default()
            .entry(v.split)
            .or_default() += 1;
    }
    let rows = classes
        .iter()
        .map(|(&label, by_split)| {
            let n = |s| by_split.get(&Some(s)).copied().unwrap_or(0);
            let total: usize = by_split.values().sum();
            if total < FEW_VIDEOS {
                warnings.push(Warning::FewVideosInClass {
                    detail: format!(
                        "class `{label}` has {total} videos; at least {FEW_VIDEOS} are advisable"
                    ),
                    label: label.to_owned(),
                });
            }
            for (split, ratio) in [(Split::Val, spec.val), (Split::Test, spec.test)] {
                if ratio > 0.0 && n(split) == 0 {
                    warnings.push(Warning::ClassMissingFromSplit {
                        detail: format!("class `{label}` has no video in the {split} split"),
                        label: label.to_owned(),
                        split,
                    });
                }
            }
            ClassCounts {
                label: label.to_owned(),
                test: n(Split::Test),
                total,
                train: n(Split::Train),
                val: n(Split::Val),
            }
        })
        .collect();
    if classes.len() == 1 {
        warnings.push(Warning::SingleClass {
            detail: "only one class: a classifier needs at least two",
        });
    }
    rows
}

fn short_videos(accepted: &[&Video]) -> Option<Warning> {
    let paths: Vec<String> = accepted
        .iter()
        .filter(|v| v.cache_frames.unwrap_or(0) < TYPICAL_CLIP_FRAMES)
        .map(|v| v.path.clone())
        .collect();
    (!paths.is_empty()).then(|| Warning::ShortVideos {
        detail: format!(
            "{} videos are shorter than a {TYPICAL_CLIP_FRAMES}-frame clip at the cache rate; \
             clips from them repeat frames",
            paths.len()
        ),
        paths,
    })
}

/// Identical content, by SHA-256, in hash order; worse when the copies sit in different splits.
fn duplicates(accepted: &[&Video]) -> Vec<Warning> {
    let mut by_hash: HashMap<&str, Vec<&Video>> = HashMap::new();
    for v in accepted {
        if let Some(h) = v.sha256.as_deref() {
            by_hash.entry(h).or_default().push(v);
        }
    }
    let mut dups: Vec<_> = by_hash.into_iter().filter(|(_, vs)| vs.len() > 1).collect();
    dups.sort_by(|a, b| a.0.cmp(b.0));
    dups.into_iter()
        .map(|(hash, vs)| {
            let splits: BTreeSet<Split> = vs.iter().filter_map(|v| v.split).collect();
            let paths = vs.iter().map(|v| v.path.clone()).collect();
            let sha256 = hash.to_owned();
            if splits.len() > 1 {
                Warning::DuplicateAcrossSplits {
                    detail: "identical videos in different splits: evaluation would measure \
                             memory, not skill",
                    paths,
                    sha256,
                }
            } else {
                Warning::DuplicateContent {
                    detail: "identical videos appear more than once",
                    paths,
                    sha256,
                }
            }
        })
        .collect()
}

/// Patients (by id) whose videos are in more than one split, in id order.
fn patients_in_two_splits(accepted: &[&Video]) -> Vec<Warning> {
    let mut patients: BTreeMap<&str, BTreeSet<Split>> = BTreeMap::new();
    for v in accepted {
        if let (Some(p), Some(s)) = (v.patient_id.as_deref(), v.split) {
            patients.entry(p).or_default().insert(s);
        }
    }
    patients
        .into_iter()
        .filter(|(_, splits)| splits.len() > 1)
        .map(|(patient, splits)| Warning::PatientInTwoSplits {
            detail: "one patient's videos are in more than one split (leakage between training \
                     and evaluation)",
            patient_id: patient.to_owned(),
            // Sorted by name, as the report has always listed them.
            splits: sort_by_name(splits),
        })
        .collect()
}

fn sort_by_name(splits: BTreeSet<Split>) -> Vec<Split> {
    let mut v: Vec<Split> = splits.into_iter().collect();
    v.sort_by_key(|s| s.as_str());
    v
}
