//! Labels known only once a DICOM object is read: a labels.csv keyed by UID (matched through
//! the same keyed replacement the object's own UIDs get, so no original UID is kept), or the
//! value of an attribute the dataset names.
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::layout::{self, Planned, UidColumn, UidLabels, UidRow};
use super::split::Split;
use crate::media::dicom::{DicomFacts, Pseudonyms};

/// The label, split and patient a video ends with, or why its label is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub label: Option<String>,
    pub split: Option<Split>,
    pub patient_id: Option<String>,
    pub problem: Option<(&'static str, String)>,
}

/// Labels for an upload's DICOM objects.
pub struct Labeller {
    by_uid: Option<(UidColumn, HashMap<String, UidRow>)>,
    matched: Mutex<HashSet<String>>,
    classes: Option<Vec<String>>,
}

impl Labeller {
    /// `by_uid`: the upload's UID-keyed labels.csv, if it has one; `keys`: the tenant's keyed
    /// replacements, which the rows' UIDs go through.
    pub fn new(
        by_uid: Option<UidLabels>,
        keys: Option<&Pseudonyms>,
        classes: Option<Vec<String>>,
    ) -> Self {
        let by_uid = by_uid.zip(keys).map(|(l, k)| {
            let rows = l
                .rows
                .into_iter()
                .map(|r| (k.uid(r.uid.trim()), r))
                .collect();
            (l.column, rows)
        });
        Self {
            by_uid,
            matched: Mutex::default(),
            classes,
        }
    }

    /// What `p` ends with, now that its object is read (`facts`, when it is DICOM).
    pub fn resolve(&self, p: &Planned, facts: Option<&DicomFacts>) -> Resolved {
        let planned = Resolved {
            label: p.label.clone(),
            split: p.split,
            patient_id: p.patient_id.clone(),
            problem: p.label_problem.clone(),
        };
        let Some(facts) = facts else {
            return planned;
        };
        if p.label.is_some() {
            return planned;
        }
        if let Some((column, rows)) = &self.by_uid {
            let uid = match column {
                UidColumn::Sop => facts.sop_uid.as_deref(),
                UidColumn::Series => facts.series_uid.as_deref(),
                UidColumn::Study => facts.study_uid.as_deref(),
            };
            if let Some(row) = uid.and_then(|u| rows.get(u)) {
                self.matched
                    .lock()
                    .expect("labeller lock")
                    .insert(uid.expect("matched").to_owned());
                let split = row
                    .split
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty());
                let (split, split_problem) = match split {
                    None => (None, None),
                    Some(s) => match Split::parse(s) {
                        Some(sp) => (Some(sp), None),
                        None => (
                            None,
                            Some((
                                "invalid_split",
                                format!("split `{s}` is not train, val or test"),
                            )),
                        ),
                    },
                };
                return Resolved {
                    label: Some(row.label.clone()),
                    split,
                    patient_id: row.patient_id.clone().filter(|s| !s.is_empty()),
                    problem: layout::check_label(&row.label, self.classes.as_deref())
                        .or(split_problem),
                };
            }
            return planned;
        }
        if let Some(label) = &facts.label {
            return Resolved {
                label: Some(label.clone()),
                problem: layout::check_label(label, self.classes.as_deref()),
                ..planned
            };
        }
        planned
    }

    /// labels.csv rows that no object of the upload matched: `(line, column name)`.
    pub fn unmatched(&self) -> Vec<(usize, &'static str)> {
        let Some((column, rows)) = &self.by_uid else {
            return Vec::new();
        };
        let matched = self.matched.lock().expect("labeller lock");
        let mut out: Vec<_> = rows
            .iter()
            .filter(|(uid, _)| !matched.contains(*uid))
            .map(|(_, r)| (r.line, column.name()))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> Planned {
        Planned {
            path: "IM1".into(),
            file: None,
            label: None,
            split: None,
            patient_id: None,
            claimed: false,
            verdict: None,
            label_problem: Some(("missing_label", "none".into())),
        }
    }

    #[test]
    fn uid_rows_match_through_the_keyed_replacement_and_the_rest_are_reported() {
        let keys = Pseudonyms::from_hex("0a0b0c").unwrap();
        let rows = UidLabels {
            column: UidColumn::Study,
            rows: vec![
                UidRow {
                    line: 2,
                    uid: "1.2.3".into(),
                    label: "normal".into(),
                    split: Some("test".into()),
                    patient_id: None,
                },
                UidRow {
                    line: 3,
                    uid: "1.2.4".into(),
                    label: "dilated".into(),
                    split: None,
                    patient_id: None,
                },
            ],
        };
        let l = Labeller::new(Some(rows), Some(&keys), None);
        let facts = DicomFacts {
            study_uid: Some(keys.uid("1.2.3")),
            ..Default::default()
        };
        let r = l.resolve(&planned(), Some(&facts));
        assert_eq!(r.label.as_deref(), Some("normal"));
        assert_eq!(r.split, Some(Split::Test));
        assert_eq!(r.problem, None);
        assert_eq!(l.unmatched(), vec![(3, "study_instance_uid")]);
        // An object no row names keeps its missing label.
        let other = DicomFacts {
            study_uid: Some(keys.uid("9.9")),
            ..Default::default()
        };
        assert_eq!(
            l.resolve(&planned(), Some(&other)).problem.unwrap().0,
            "missing_label"
        );
    }

    #[test]
    fn an_attribute_labels_what_nothing_else_did_within_the_declared_classes() {
        let l = Labeller::new(None, None, Some(vec!["A4C".into()]));
        let facts = |v: &str| DicomFacts {
            label: Some(v.into()),
            ..Default::default()
        };
        let r = l.resolve(&planned(), Some(&facts("A4C")));
        assert_eq!((r.label.as_deref(), r.problem), (Some("A4C"), None));
        let r = l.resolve(&planned(), Some(&facts("PLAX")));
        assert_eq!(r.problem.unwrap().0, "unknown_label");
        // A folder's label wins.
        let mut p = planned();
        p.label = Some("A4C".into());
        p.label_problem = None;
        assert_eq!(
            l.resolve(&p, Some(&facts("PLAX"))).label.as_deref(),
            Some("A4C")
        );
    }
}
