//! Train/val/test assignment: stratified by label, grouped by patient so that no patient's
//! videos land in two splits, deterministic for a seed. Splits already given (by the upload, or
//! by an earlier ingest) are kept, and a patient's new videos follow the split the patient has.
use std::collections::{BTreeMap, HashMap};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// The split names live with the video rows that store them.
pub use crate::db::videos::Split;

/// Split ratios and seed, as stored on the dataset.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default = "d_train")]
    pub train: f64,
    #[serde(default = "d_eval")]
    pub val: f64,
    #[serde(default = "d_eval")]
    pub test: f64,
    #[serde(default)]
    pub seed: u64,
    /// What stays together in one split: the patient (the default) or, for DICOM objects, the
    /// study (several studies of one patient may then fall in different splits).
    #[serde(default, skip_serializing_if = "GroupBy::is_patient")]
    pub group_by: GroupBy,
}

/// The unit a split keeps whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Patient,
    Study,
}

impl GroupBy {
    fn is_patient(&self) -> bool {
        *self == GroupBy::Patient
    }
}

fn d_train() -> f64 {
    0.7
}
fn d_eval() -> f64 {
    0.15
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            train: d_train(),
            val: d_eval(),
            test: d_eval(),
            seed: 0,
            group_by: GroupBy::Patient,
        }
    }
}

impl SplitSpec {
    /// Ratios must be non-negative, with a positive train share, and sum to 1.
    pub fn validate(&self) -> Result<(), String> {
        let r = [self.train, self.val, self.test];
        if r.iter().any(|x| !x.is_finite() || *x < 0.0) || self.train <= 0.0 {
            return Err("ratios must be non-negative and train must be positive".into());
        }
        if ((r.iter().sum::<f64>()) - 1.0).abs() > 1e-6 {
            return Err("train + val + test must equal 1".into());
        }
        Ok(())
    }

    fn ratio(&self, s: Split) -> f64 {
        match s {
            Split::Train => self.train,
            Split::Val => self.val,
            Split::Test => self.test,
        }
    }
}

/// One accepted video for assignment.
#[derive(Debug, Clone)]
pub struct Item {
    pub label: String,
    /// Patient id when known; videos without one are their own group.
    pub patient: Option<String>,
    pub split: Option<Split>,
}

/// Fill in `split` for every item without one.
pub fn assign(items: &mut [Item], spec: &SplitSpec) {
    // Groups: one per patient, or one per lone video.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        let key = match &it.patient {
            Some(p) => format!("p:{p}"),
            None => format!("v:{i:010}"),
        };
        groups.entry(key).or_default().push(i);
    }

    // Per label: target counts, and what is already placed.
    let mut totals: HashMap<String, f64> = HashMap::new();
    let mut placed: HashMap<(String, Split), f64> = HashMap::new();
    for it in items.iter() {
        *totals.entry(it.label.clone()).or_default() += 1.0;
        if let Some(s) = it.split {
            *placed.entry((it.label.clone(), s)).or_default() += 1.0;
        }
    }

    // A patient with a split keeps it for new videos; the rest are bucketed by majority label.
    let mut buckets: BTreeMap<String, Vec<Vec<usize>>> = BTreeMap::new();
    for members in groups.into_values() {
        if let Some(s) = members.iter().find_map(|&i| items[i].split) {
            for &i in &members {
                if items[i].split.is_none() {
                    items[i].split = Some(s);
                    *placed.entry((items[i].label.clone(), s)).or_default() += 1.0;
                }
            }
            continue;
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for &i in &members {
            *counts.entry(items[i].label.as_str()).or_default() += 1;
        }
        let major = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(l, _)| l.to_string())
            .expect("non-empty group");
        buckets.entry(major).or_default().push(members);
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    for (label, mut bucket) in buckets {
        bucket.shuffle(&mut rng);
        let total = totals[&label];
        for members in bucket {
            // The split furthest below its target share of this label takes the group.
            let deficit = |s: Split| {
                spec.ratio(s) * total - placed.get(&(label.clone(), s)).copied().unwrap_or(0.0)
            };
            let best = Split::ALL
                .into_iter()
                .filter(|s| spec.ratio(*s) > 0.0)
                .max_by(|a, b| deficit(*a).total_cmp(&deficit(*b)).then(b.cmp(a)))
                .expect("train ratio is positive");
            for &i in &members {
                items[i].split = Some(best);
                *placed.entry((items[i].label.clone(), best)).or_default() += 1.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize, label: &str, patients: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Item {
                label: label.into(),
                patient: (patients > 0).then(|| format!("{label}-{}", i % patients)),
                split: None,
            })
            .collect()
    }

    #[test]
    fn stratified_ratios_per_class() {
        let mut v = items(100, "a", 0);
        v.extend(items(20, "b", 0));
        assign(&mut v, &SplitSpec::default());
        let count = |l: &str, s: Split| {
            v.iter()
                .filter(|x| x.label == l && x.split == Some(s))
                .count()
        };
        assert_eq!(
            (
                count("a", Split::Train),
                count("a", Split::Val),
                count("a", Split::Test)
            ),
            (70, 15, 15)
        );
        assert_eq!(
            (
                count("b", Split::Train),
                count("b", Split::Val),
                count("b", Split::Test)
            ),
            (14, 3, 3)
        );
    }

    #[test]
    fn a_patient_never_spans_two_splits_and_seed_is_deterministic() {
        let mut v = items(60, "a", 12);
        v.extend(items(30, "b", 10));
        let spec = SplitSpec {
            seed: 7,
            group_by: Default::default(),
            ..Default::default()
        };
        let mut w = v.clone();
        assign(&mut v, &spec);
        assign(&mut w, &spec);
        let mut by_patient: HashMap<String, Split> = HashMap::new();
        for it in &v {
            let s = it.split.unwrap();
            assert_eq!(
                *by_patient.entry(it.patient.clone().unwrap()).or_insert(s),
                s
            );
        }
        assert!(v.iter().zip(&w).all(|(a, b)| a.split == b.split));
        assert!(
            Split::ALL
                .iter()
                .all(|s| v.iter().any(|x| x.split == Some(*s)))
        );
    }

    #[test]
    fn given_splits_are_kept_and_pull_the_patients_other_videos() {
        let mut v = vec![
            Item {
                label: "a".into(),
                patient: Some("p1".into()),
                split: Some(Split::Test),
            },
            Item {
                label: "a".into(),
                patient: Some("p1".into()),
                split: None,
            },
        ];
        assign(&mut v, &SplitSpec::default());
        assert_eq!(v[1].split, Some(Split::Test));
    }

    #[test]
    fn ratios_are_validated() {
        assert!(
            SplitSpec {
                train: 0.5,
                val: 0.2,
                test: 0.2,
                seed: 0,
                group_by: Default::default(),
            }
            .validate()
            .is_err()
        );
        assert!(
            SplitSpec {
                train: 0.0,
                val: 0.5,
                test: 0.5,
                seed: 0,
                group_by: Default::default(),
            }
            .validate()
            .is_err()
        );
        assert!(SplitSpec::default().validate().is_ok());
    }
}
