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
    /// What de-identification did to the DICOM objects; `None` when the dataset has none.
    pub deidentification: Option<Deidentification>,
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

/// De-identification of the dataset's DICOM objects (accepted ones: a refused object left
/// nothing behind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deidentification {
    /// Accepted videos whose Burned In Annotation (0028,0301) is `YES`.
    pub burned_in_annotation: Vec<String>,
    pub dicom_videos: usize,
    /// Videos whose identifying attributes of this name were present (none is kept).
    pub removed: BTreeMap<String, usize>,
    /// Videos whose identifier of this name was replaced by a keyed value.
    pub replaced: BTreeMap<String, usize>,
    /// Per video: what was removed, replaced and masked.
    pub videos: Vec<DeidentifiedVideo>,
}

/// One DICOM video's de-identification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeidentifiedVideo {
    pub burned_in_annotation: Option<String>,
    pub cropped: bool,
    pub id: Uuid,
    /// Rectangles blacked out, in source pixels.
    pub masked: Vec<crate::media::dicom::Rect>,
    pub path: String,
    pub private_attributes_removed: u32,
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
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
    /// DICOM objects that declare burned-in text and were not masked.
    BurnedInAnnotation {
        detail: String,
        paths: Vec<String>,
    },
    /// DICOM objects without frame timing: their frames were taken at the cache rate.
    FrameRateAssumed {
        detail: String,
        paths: Vec<String>,
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
            Warning::BurnedInAnnotation { .. } => "burned_in_annotation",
            Warning::FrameRateAssumed { .. } => "frame_rate_assumed",
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
    let deidentification = deidentification(&accepted, &mut warnings);

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
        deidentification,
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

/// The de-identification section and its warnings, from the accepted DICOM videos' facts.
fn deidentification(accepted: &[&Video], warnings: &mut Vec<Warning>) -> Option<Deidentification> {
    let dicom: Vec<(&Video, crate::media::dicom::DicomFacts)> = accepted
        .iter()
        .filter_map(|v| Some((*v, serde_json::from_value(v.dicom.clone()?).ok()?)))
        .collect();
    if dicom.is_empty() {
        return None;
    }
    let mut removed: BTreeMap<String, usize> = BTreeMap::new();
    let mut replaced: BTreeMap<String, usize> = BTreeMap::new();
    let mut burned = Vec::new();
    let mut unmasked_burned = Vec::new();
    let mut assumed = Vec::new();
    let mut videos = Vec::new();
    for (v, f) in &dicom {
        for k in &f.removed {
            *removed.entry(k.clone()).or_default() += 1;
        }
        for k in &f.replaced {
            *replaced.entry(k.clone()).or_default() += 1;
        }
        if f.burned_in_annotation.as_deref() == Some("YES") {
            burned.push(v.path.clone());
            if f.masked.is_empty() && !f.cropped {
                unmasked_burned.push(v.path.clone());
            }
        }
        if f.frame_rate_source == "assumed" {
            assumed.push(v.path.clone());
        }
        videos.push(DeidentifiedVideo {
            burned_in_annotation: f.burned_in_annotation.clone(),
            cropped: f.cropped,
            id: v.id,
            masked: f.masked.clone(),
            path: v.path.clone(),
            private_attributes_removed: f.private_attributes,
            removed: f.removed.clone(),
            replaced: f.replaced.clone(),
        });
    }
    if !unmasked_burned.is_empty() {
        warnings.push(Warning::BurnedInAnnotation {
            detail: format!(
                "{} DICOM videos declare burned-in annotation (text in the pixels, possibly \
                 names or dates) and nothing was masked; set `cache.dicom.masks` or \
                 `mask_outside_region` and upload them again",
                unmasked_burned.len()
            ),
            paths: unmasked_burned,
        });
    }
    if !assumed.is_empty() {
        warnings.push(Warning::FrameRateAssumed {
            detail: format!(
                "{} DICOM videos carry no frame timing (Frame Time, Cine Rate, Frame Time \
                 Vector); their frames were taken as if at the cache rate",
                assumed.len()
            ),
            paths: assumed,
        });
    }
    Some(Deidentification {
        burned_in_annotation: burned,
        dicom_videos: dicom.len(),
        removed,
        replaced,
        videos,
    })
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use time::OffsetDateTime;

    use super::*;

    fn dataset() -> Dataset {
        Dataset {
            id: Uuid::from_u128(1),
            tenant_id: Uuid::from_u128(2),
            name: "endoscopy".into(),
            description: String::new(),
            status: DatasetStatus::Ready,
            status_reason: None,
            classes: None,
            split: serde_json::to_value(SplitSpec::default()).unwrap(),
            cache_spec: json!({"short_side": 128, "fps": 15.0}),
            dicom: json!({}),
            discard_sources: false,
            videos_total: 0,
            videos_done: 0,
            videos_accepted: 0,
            videos_rejected: 0,
            videos_skipped: 0,
            content_hash: Some("c0ffee".into()),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn refused(n: u128, path: &str, status: VideoStatus, code: &str) -> Video {
        Video {
            id: Uuid::from_u128(n),
            upload_id: Uuid::from_u128(99),
            path: path.into(),
            status,
            reason_code: Some(code.into()),
            reason: Some(format!("{code} detail")),
            label: None,
            split: None,
            patient_id: None,
            sha256: None,
            bytes: None,
            container: None,
            codec: None,
            width: None,
            height: None,
            fps: None,
            duration_s: None,
            frames: None,
            cache_frames: None,
            cache_width: None,
            cache_height: None,
            cache_fps: None,
            dicom: None,
        }
    }

    /// An accepted video of `frames` frames at `fps`, cached at 15 fps.
    #[expect(clippy::too_many_arguments, reason = "one row of a test table")]
    fn accepted(
        n: u128,
        label: &str,
        split: Split,
        patient: Option<&str>,
        sha: &str,
        (width, height): (i32, i32),
        fps: f64,
        frames: i64,
    ) -> Video {
        let duration = frames as f64 / fps;
        Video {
            status: VideoStatus::Accepted,
            reason_code: None,
            reason: None,
            label: Some(label.into()),
            split: Some(split),
            patient_id: patient.map(Into::into),
            sha256: Some(sha.into()),
            codec: (width != 640).then(|| "h264".into()),
            width: Some(width),
            height: Some(height),
            fps: Some(fps),
            duration_s: Some(duration),
            frames: Some(frames),
            cache_frames: Some((duration * 15.0).round() as i32),
            ..refused(n, &format!("{label}/{n}.mp4"), VideoStatus::Accepted, "")
        }
    }

    fn videos() -> Vec<Video> {
        use Split::{Test, Train, Val};
        vec![
            accepted(10, "polyp", Train, Some("p1"), "aa", (320, 240), 30.0, 60),
            // Patient p1 again, in val: leakage.
            accepted(11, "polyp", Val, Some("p1"), "bb", (320, 240), 30.0, 30),
            // Same bytes as video 10, in another split.
            accepted(12, "normal", Test, Some("p2"), "aa", (320, 240), 30.0, 90),
            // Two identical videos in the same split. Videos 11, 13 and 14 are shorter than a
            // 16-frame clip at the cache's 15 fps.
            accepted(13, "normal", Train, None, "dd", (640, 480), 15.0, 10),
            accepted(14, "normal", Train, None, "dd", (640, 480), 15.0, 10),
            refused(20, "normal/broken.mp4", VideoStatus::Rejected, "corrupt"),
            refused(21, "a/../x.mp4", VideoStatus::Rejected, "unsafe_path"),
            refused(22, "notes.txt", VideoStatus::Skipped, "not_media"),
            refused(23, "late.mp4", VideoStatus::Pending, ""),
        ]
    }

    #[test]
    fn report_counts_classes_splits_and_statuses() {
        let r = report(&dataset(), &videos());
        assert_eq!(
            r.totals,
            Totals {
                accepted: 5,
                pending: 1,
                rejected: 2,
                skipped: 1,
                videos: 9,
            }
        );
        let class = |label: &str, train, val, test| ClassCounts {
            label: label.into(),
            test,
            total: train + val + test,
            train,
            val,
        };
        assert_eq!(
            r.classes,
            [class("normal", 2, 0, 1), class("polyp", 1, 1, 0)]
        );
        assert_eq!(
            r.splits,
            SplitCounts {
                test: 1,
                train: 3,
                val: 1,
            }
        );
        let ids = |list: &[FileReason]| list.iter().map(|f| f.id.as_u128()).collect::<Vec<_>>();
        assert_eq!(ids(&r.rejected), [20, 21]);
        assert_eq!(r.rejected[0].code.as_deref(), Some("corrupt"));
        assert_eq!(ids(&r.skipped), [22]);
        assert_eq!(
            r.resolutions,
            [
                Resolution {
                    height: 240,
                    videos: 3,
                    width: 320,
                },
                Resolution {
                    height: 480,
                    videos: 2,
                    width: 640,
                },
            ]
        );
        assert_eq!(
            r.codecs,
            BTreeMap::from([("h264".into(), 3), ("unknown".into(), 2)])
        );
        // Durations 2, 1, 3, 2/3, 2/3 s: median is the middle one of the sorted five.
        let d = r.duration_s.unwrap();
        assert_eq!((d.min, d.median, d.max), (2.0 / 3.0, 1.0, 3.0));
        assert!((d.total - (6.0 + 4.0 / 3.0)).abs() < 1e-9);
        assert!((d.mean - d.total / 5.0).abs() < 1e-12);
        // Frames 60, 30, 90, 10, 10: an odd count, so the median is a value.
        let f = r.frames.unwrap();
        assert_eq!((f.min, f.median, f.max, f.total), (10.0, 30.0, 90.0, 200.0));
        assert_eq!(f.mean, 40.0);
        assert_eq!(
            (r.status, r.dataset_id),
            (DatasetStatus::Ready, Uuid::from_u128(1))
        );
    }

    #[test]
    fn report_warns_about_small_classes_gaps_short_videos_duplicates_and_leaks() {
        let r = report(&dataset(), &videos());
        let codes: Vec<_> = r.warnings.iter().map(Warning::code).collect();
        assert_eq!(
            codes,
            [
                "few_videos_in_class",
                "class_missing_from_split", // normal: no val
                "few_videos_in_class",
                "class_missing_from_split", // polyp: no test
                "short_videos",
                "duplicate_across_splits", // aa
                "duplicate_content",       // dd
                "patient_in_two_splits",
            ]
        );
        let w = serde_json::to_value(&r.warnings).unwrap();
        assert_eq!(w[1]["split"], "val");
        assert_eq!(w[3]["label"], "polyp");
        assert_eq!(w[3]["split"], "test");
        assert_eq!(
            w[4]["paths"],
            json!(["polyp/11.mp4", "normal/13.mp4", "normal/14.mp4"])
        );
        assert_eq!(w[5]["paths"], json!(["polyp/10.mp4", "normal/12.mp4"]));
        assert_eq!(w[7]["patient_id"], "p1");
        assert_eq!(w[7]["splits"], json!(["train", "val"]));

        // One class, its splits all present, no duplicates, no shared patient.
        let mut one: Vec<_> = videos()[..2].to_vec();
        one[1].patient_id = None;
        let spec = SplitSpec {
            train: 0.5,
            val: 0.5,
            test: 0.0,
            seed: 0,
            group_by: Default::default(),
        };
        let d = Dataset {
            split: serde_json::to_value(spec).unwrap(),
            ..dataset()
        };
        let codes: Vec<_> = report(&d, &one)
            .warnings
            .iter()
            .map(Warning::code)
            .collect();
        assert_eq!(
            codes,
            ["few_videos_in_class", "single_class", "short_videos"]
        );
    }

    /// Object keys at every level in sorted order: the bytes the API has always sent (its report
    /// was a `serde_json::Value`, whose objects sort their keys).
    #[test]
    fn report_serialises_with_sorted_keys_and_nulls_for_empty_summaries() {
        let mut vs = videos();
        let text = serde_json::to_string(&report(&dataset(), &vs)).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(text, value.to_string());
        assert_eq!(value["warnings"][0]["code"], "few_videos_in_class");
        assert_eq!(value["status"], "ready");

        vs.retain(|v| v.status != VideoStatus::Accepted);
        let value = serde_json::to_value(report(&dataset(), &vs)).unwrap();
        for key in ["duration_s", "fps", "frames"] {
            assert_eq!(value[key], Value::Null, "{key}");
        }
        assert_eq!(value["warnings"], json!([]));
    }
}
