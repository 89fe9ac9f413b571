//! How an upload's files become labelled videos: a `labels.csv` at the root (`path,label` and
//! optional `split,patient_id`), or folders per class (`<label>/<file>`, optionally under
//! `train|val|test/`). A single folder wrapping everything (as zip tools make) is looked through.
//! DICOM objects can instead be labelled by UID: a `labels.csv` keyed by `sop_instance_uid`,
//! `series_instance_uid` or `study_instance_uid` (matched once the objects are read; folders
//! then say nothing), or by an attribute the dataset names.
use std::collections::{HashMap, HashSet};

use super::split::Split;
use crate::db::videos::VideoStatus;
use crate::media::archive::ExtractedFile;

/// What ingest should do with one path of the upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Path as shown to the user (inside the upload, wrapper folder removed).
    pub path: String,
    pub file: Option<ExtractedFile>,
    pub label: Option<String>,
    pub split: Option<Split>,
    pub patient_id: Option<String>,
    /// Whether the upload claims this is a video (listed in labels.csv); decides between
    /// "rejected" and "skipped" when FFmpeg does not recognise it.
    pub claimed: bool,
    /// Known before probing: `(status, code, detail)` with status `rejected` or `skipped`.
    pub verdict: Option<(VideoStatus, &'static str, String)>,
    /// A label problem, reported only if the file turns out to be a video.
    pub label_problem: Option<(&'static str, String)>,
}

/// The plan of an upload: every file, and the UID-keyed labels.csv rows when there is one.
#[derive(Debug, Default)]
pub struct Plan {
    pub files: Vec<Planned>,
    pub by_uid: Option<UidLabels>,
}

/// Which UID a labels.csv is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidColumn {
    Sop,
    Series,
    Study,
}

impl UidColumn {
    pub const ALL: [(UidColumn, &'static str); 3] = [
        (UidColumn::Sop, "sop_instance_uid"),
        (UidColumn::Series, "series_instance_uid"),
        (UidColumn::Study, "study_instance_uid"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .expect("listed")
            .1
    }
}

/// labels.csv rows keyed by a DICOM UID.
#[derive(Debug, Clone)]
pub struct UidLabels {
    pub column: UidColumn,
    pub rows: Vec<UidRow>,
}

#[derive(Debug, Clone)]
pub struct UidRow {
    pub line: usize,
    pub uid: String,
    pub label: String,
    pub split: Option<String>,
    pub patient_id: Option<String>,
}

/// Why `label` cannot label a video of a dataset with `classes`, if it cannot.
pub fn check_label(label: &str, classes: Option<&[String]>) -> Option<(&'static str, String)> {
    if label.is_empty() {
        Some(("missing_label", "no label given".into()))
    } else if label.len() > 100 {
        Some(("invalid_label", "labels are at most 100 characters".into()))
    } else if label.chars().any(char::is_control) {
        Some((
            "invalid_label",
            "labels may not contain control characters".into(),
        ))
    } else if classes.is_some_and(|c| !c.iter().any(|k| k == label)) {
        Some((
            "unknown_label",
            format!("label `{label}` is not one of the dataset's declared classes"),
        ))
    } else {
        None
    }
}

/// The upload cannot be interpreted at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

const LABELS_CSV: &str = "labels.csv";

/// Largest labels.csv read, in bytes: a row per video of an archive at its entry cap fits many
/// times over, and the parse stays within a bounded memory.
pub const MAX_LABELS_CSV_BYTES: u64 = 16 << 20;
/// Most rows of labels.csv: each row becomes a video row, listed file or not.
pub const MAX_LABELS_ROWS: usize = 100_000;

fn is_system_file(rel: &str) -> bool {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    rel.starts_with("__MACOSX/")
        || base.starts_with("._")
        || base == ".DS_Store"
        || base.eq_ignore_ascii_case("thumbs.db")
        || base.eq_ignore_ascii_case("desktop.ini")
}

/// Plan every extracted file (and every labels.csv row naming a missing file).
pub fn plan(files: Vec<ExtractedFile>, classes: Option<&[String]>) -> Result<Plan, LayoutError> {
    let mut out = Vec::new();
    let mut files: Vec<(String, ExtractedFile)> = files
        .into_iter()
        .filter_map(|f| {
            if is_system_file(&f.rel) {
                out.push(skipped(
                    f.rel.clone(),
                    Some(f),
                    "system_file",
                    "operating-system metadata",
                ));
                None
            } else {
                Some((normalise(&f.rel), f))
            }
        })
        .collect();
    strip_wrapper(&mut files);

    let label_ok = |label: &str| check_label(label, classes);

    if let Some(pos) = files
        .iter()
        .position(|(rel, _)| rel.eq_ignore_ascii_case(LABELS_CSV))
    {
        let (_, csv_file) = files.swap_remove(pos);
        let rows = match read_labels_csv(&csv_file.path)? {
            Labels::ByPath(rows) => rows,
            Labels::ByUid(by_uid) => {
                // Labelled once each object's UIDs are read; folders say nothing here.
                files.sort_by(|a, b| a.0.cmp(&b.0));
                for (rel, f) in files {
                    out.push(Planned {
                        path: rel,
                        file: Some(f),
                        label: None,
                        split: None,
                        patient_id: None,
                        claimed: false,
                        verdict: None,
                        label_problem: Some((
                            "missing_label",
                            format!(
                                "no labels.csv row names this file's {}",
                                by_uid.column.name()
                            ),
                        )),
                    });
                }
                return Ok(Plan {
                    files: out,
                    by_uid: Some(by_uid),
                });
            }
        };
        let mut by_path: HashMap<String, ExtractedFile> = files.into_iter().collect();
        let mut seen = HashSet::new();
        for row in rows {
            let path = normalise(&row.path);
            let mut p = Planned {
                path: path.clone(),
                file: by_path.remove(&path),
                label: Some(row.label.clone()),
                split: None,
                patient_id: row.patient_id.filter(|s| !s.is_empty()),
                claimed: true,
                verdict: None,
                label_problem: label_ok(&row.label),
            };
            match row
                .split
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                None => {}
                Some(s) => match Split::parse(s) {
                    Some(split) => p.split = Some(split),
                    None => {
                        p.label_problem = Some((
                            "invalid_split",
                            format!("split `{s}` is not train, val or test"),
                        ))
                    }
                },
            }
            if !seen.insert(path.clone()) {
                // Kept as its own entry (paths are unique per upload), named by its row.
                p.path = format!("{path} (labels.csv row {})", row.line);
                p.file = None;
                p.verdict = Some((
                    VideoStatus::Rejected,
                    "duplicate_row",
                    "labels.csv lists this path twice".into(),
                ));
            } else if p.file.is_none() {
                p.verdict = Some((
                    VideoStatus::Rejected,
                    "missing_file",
                    "listed in labels.csv but not in the upload".into(),
                ));
            }
            out.push(p);
        }
        let mut rest: Vec<_> = by_path.into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        for (rel, f) in rest {
            out.push(skipped(
                rel,
                Some(f),
                "not_listed",
                "not listed in labels.csv",
            ));
        }
        return Ok(Plan {
            files: out,
            by_uid: None,
        });
    }

    for (rel, f) in files {
        let parts: Vec<&str> = rel.split('/').collect();
        let (split, rest) = match parts.first().and_then(|s| Split::parse(s)) {
            Some(split) if parts.len() >= 3 => (Some(split), &parts[1..]),
            _ => (None, &parts[..]),
        };
        let (label, label_problem) = if rest.len() >= 2 {
            let label = rest[0].to_owned();
            let problem = label_ok(&label);
            (Some(label), problem)
        } else {
            (
                None,
                Some((
                    "missing_label",
                    "no label: put each video in a folder named after its class, or add labels.csv"
                        .to_string(),
                )),
            )
        };
        out.push(Planned {
            path: rel,
            file: Some(f),
            label,
            split,
            patient_id: None,
            claimed: false,
            verdict: None,
            label_problem,
        });
    }
    Ok(Plan {
        files: out,
        by_uid: None,
    })
}

/// Longest path shown for a video, in bytes; a longer one is cut at a character boundary. An
/// archive may name an entry with up to 64 KiB, which no index (nor reader) wants.
pub const MAX_SHOWN_PATH: usize = 1024;

/// Make every planned row storable and unique, whatever the upload held: PostgreSQL text cannot
/// hold NUL (replaced by U+FFFD), very long names are cut, and since videos are keyed by their
/// path within the upload, a path met again (an archive holding one name twice, a refused entry
/// named like an extracted one) is shown as `path (2)`, `path (3)`, … after the first.
pub fn make_storable(planned: &mut [Planned]) {
    let mut seen: HashSet<String> = HashSet::new();
    for p in planned.iter_mut() {
        for text in [Some(&mut p.path), p.label.as_mut(), p.patient_id.as_mut()]
            .into_iter()
            .flatten()
        {
            if text.contains('\0') {
                *text = text.replace('\0', "\u{FFFD}");
            }
        }
        if p.path.len() > MAX_SHOWN_PATH {
            let mut end = MAX_SHOWN_PATH - '…'.len_utf8();
            while !p.path.is_char_boundary(end) {
                end -= 1;
            }
            p.path.truncate(end);
            p.path.push('…');
        }
        if seen.contains(&p.path) {
            let base = std::mem::take(&mut p.path);
            p.path = (2..)
                .map(|n| format!("{base} ({n})"))
                .find(|c| !seen.contains(c))
                .expect("an unused suffix exists");
        }
        seen.insert(p.path.clone());
    }
}

fn skipped(path: String, file: Option<ExtractedFile>, code: &'static str, detail: &str) -> Planned {
    Planned {
        path,
        file,
        label: None,
        split: None,
        patient_id: None,
        claimed: false,
        verdict: Some((VideoStatus::Skipped, code, detail.to_owned())),
        label_problem: None,
    }
}

fn normalise(path: &str) -> String {
    path.trim()
        .replace('\\', "/")
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Remove a single top-level folder that wraps every file, if there is one.
fn strip_wrapper(files: &mut [(String, ExtractedFile)]) {
    let first = match files.first() {
        Some((rel, _)) => match rel.split_once('/') {
            Some((top, _)) => top.to_owned(),
            None => return,
        },
        None => return,
    };
    if Split::parse(&first).is_some() {
        return;
    }
    let prefix = format!("{first}/");
    let inner: Option<Vec<&str>> = files
        .iter()
        .map(|(rel, _)| rel.strip_prefix(&prefix))
        .collect();
    let Some(inner) = inner else { return };
    // A lone class folder is a layout, not a wrapper: only strip when something is left to
    // label by (a labels.csv or a further folder level).
    if inner
        .iter()
        .any(|r| r.contains('/') || r.eq_ignore_ascii_case(LABELS_CSV))
    {
        for (rel, _) in files.iter_mut() {
            *rel = rel[prefix.len()..].to_owned();
        }
    }
}

struct CsvRow {
    /// Line number in the file (the header is line 1).
    line: usize,
    path: String,
    label: String,
    split: Option<String>,
    patient_id: Option<String>,
}

enum Labels {
    ByPath(Vec<CsvRow>),
    ByUid(UidLabels),
}

fn read_labels_csv(path: &std::path::Path) -> Result<Labels, LayoutError> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| LayoutError(format!("labels.csv cannot be read: {e}")))?
        .len();
    if bytes > MAX_LABELS_CSV_BYTES {
        return Err(LayoutError(format!(
            "labels.csv is {bytes} bytes; the cap is {MAX_LABELS_CSV_BYTES} bytes"
        )));
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_path(path)
        .map_err(|e| LayoutError(format!("labels.csv cannot be read: {e}")))?;
    let headers = reader
        .headers()
        .map_err(|e| LayoutError(format!("labels.csv has no header row: {e}")))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim_start_matches('\u{feff}').eq_ignore_ascii_case(name))
    };
    let uid_col = UidColumn::ALL
        .iter()
        .find_map(|(c, name)| col(name).map(|i| (*c, i)));
    let key_col = col("path").or(uid_col.map(|(_, i)| i));
    let (Some(path_col), Some(label_col)) = (key_col, col("label")) else {
        return Err(LayoutError(format!(
            "labels.csv needs the columns `path` (or, for DICOM, `sop_instance_uid`, \
             `series_instance_uid` or `study_instance_uid`) and `label` (found: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        )));
    };
    let by_uid = col("path").is_none().then_some(uid_col).flatten();
    let (split_col, patient_col) = (col("split"), col("patient_id"));
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        if i == MAX_LABELS_ROWS {
            return Err(LayoutError(format!(
                "labels.csv has more than {MAX_LABELS_ROWS} rows"
            )));
        }
        let record = record.map_err(|e| LayoutError(format!("labels.csv row {}: {e}", i + 2)))?;
        let get = |c: Option<usize>| c.and_then(|c| record.get(c)).map(str::to_owned);
        rows.push(CsvRow {
            line: i + 2,
            path: get(Some(path_col)).unwrap_or_default(),
            label: get(Some(label_col)).unwrap_or_default(),
            split: get(split_col),
            patient_id: get(patient_col),
        });
    }
    Ok(match by_uid {
        None => Labels::ByPath(rows),
        Some((column, _)) => Labels::ByUid(UidLabels {
            column,
            rows: rows
                .into_iter()
                .map(|r| UidRow {
                    line: r.line,
                    uid: r.path,
                    label: r.label,
                    split: r.split,
                    patient_id: r.patient_id,
                })
                .collect(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(rel: &str) -> ExtractedFile {
        ExtractedFile {
            rel: rel.into(),
            path: rel.into(),
            bytes: 1,
            sha256: rel.into(),
        }
    }

    #[test]
    fn folders_give_labels_and_splits_and_a_wrapper_is_looked_through() {
        let planned = plan(
            vec![
                file("export/train/polyp/a.mp4"),
                file("export/val/normal/b.mp4"),
                file("export/README.txt"),
                file("__MACOSX/export/._a.mp4"),
            ],
            None,
        )
        .unwrap()
        .files;
        let get = |p: &str| {
            planned
                .iter()
                .find(|x| x.path == p)
                .unwrap_or_else(|| panic!("{p} not in {planned:?}"))
        };
        assert_eq!(get("train/polyp/a.mp4").label.as_deref(), Some("polyp"));
        assert_eq!(get("train/polyp/a.mp4").split, Some(Split::Train));
        assert_eq!(get("val/normal/b.mp4").split, Some(Split::Val));
        assert_eq!(
            get("README.txt").label_problem.as_ref().unwrap().0,
            "missing_label"
        );
        assert_eq!(
            planned
                .iter()
                .find(|x| x.path.starts_with("__MACOSX"))
                .unwrap()
                .verdict
                .as_ref()
                .unwrap()
                .0,
            VideoStatus::Skipped
        );
    }

    #[test]
    fn hostile_paths_become_distinct_storable_rows() {
        let mut planned = plan(vec![file("polyp/a.mp4"), file("polyp/a.mp4 (2)")], None)
            .unwrap()
            .files;
        // What extraction adds for a second `polyp/a.mp4` and for a name with a NUL byte.
        for path in ["polyp/a.mp4", "polyp/b\0.mp4", "x".repeat(5000).as_str()] {
            planned.push(skipped(path.into(), None, "duplicate_entry", "twice"));
        }
        planned[0].label = Some("po\0lyp".into());
        make_storable(&mut planned);
        let paths: Vec<&str> = planned.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            &paths[..4],
            [
                "polyp/a.mp4",
                "polyp/a.mp4 (2)",
                "polyp/a.mp4 (3)",
                "polyp/b\u{FFFD}.mp4"
            ]
        );
        assert!(paths[4].len() <= MAX_SHOWN_PATH && paths[4].ends_with('…'));
        assert_eq!(planned[0].label.as_deref(), Some("po\u{FFFD}lyp"));
        let unique: HashSet<_> = paths.iter().collect();
        assert_eq!(unique.len(), paths.len());
    }

    #[test]
    fn labels_csv_size_and_rows_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let csv = |name: &str, rows: usize, pad: usize| {
            let path = dir.path().join(name);
            let mut text = String::from("path,label\n");
            for i in 0..rows {
                text.push_str(&format!("v{i}.mp4,{}\n", "x".repeat(pad)));
            }
            std::fs::write(&path, text).unwrap();
            let mut f = file(LABELS_CSV);
            f.path = path;
            plan(vec![f], None)
        };
        assert_eq!(
            csv("ok.csv", MAX_LABELS_ROWS, 1).unwrap().files.len(),
            MAX_LABELS_ROWS
        );
        let e = csv("rows.csv", MAX_LABELS_ROWS + 1, 1).unwrap_err();
        assert!(e.0.contains("more than 100000 rows"), "{e}");
        let e = csv("big.csv", 1000, 17 << 10).unwrap_err();
        assert!(e.0.contains("the cap is 16777216 bytes"), "{e}");
    }

    #[test]
    fn declared_classes_reject_unknown_labels() {
        let classes = vec!["normal".to_string()];
        let planned = plan(
            vec![file("tachy/a.mp4"), file("normal/b.mp4")],
            Some(&classes),
        )
        .unwrap()
        .files;
        assert_eq!(
            planned[0].label_problem.as_ref().unwrap().0,
            "unknown_label"
        );
        assert!(planned[1].label_problem.is_none());
    }

    #[test]
    fn a_labels_csv_keyed_by_uid_leaves_files_to_be_matched_and_folders_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(
            &path,
            "study_instance_uid,label,split\n1.2.3,normal,test\n1.2.4,dilated,\n",
        )
        .unwrap();
        let mut csv = file(LABELS_CSV);
        csv.path = path;
        let plan = plan(
            vec![csv, file("DICOM/PAT1/IM1"), file("DICOM/PAT2/IM1")],
            None,
        )
        .unwrap();
        let by_uid = plan.by_uid.expect("keyed by UID");
        assert_eq!(by_uid.column, UidColumn::Study);
        assert_eq!(by_uid.rows.len(), 2);
        assert_eq!(by_uid.rows[0].uid, "1.2.3");
        assert_eq!(by_uid.rows[0].split.as_deref(), Some("test"));
        assert_eq!(plan.files.len(), 2);
        for p in &plan.files {
            // Not labelled by the folder `DICOM`: by the UID, once read.
            assert_eq!(p.label, None, "{p:?}");
            assert_eq!(p.label_problem.as_ref().unwrap().0, "missing_label");
        }
    }
}
