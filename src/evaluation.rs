//! Classification metrics that clinicians ask for: accuracy, balanced accuracy, macro-F1,
//! per-class precision / recall (sensitivity) / specificity / F1, one-vs-rest ROC-AUC, and the
//! confusion matrix; and the metric a job selects its best epoch by.
//!
//! Plain data and arithmetic: the training loop computes these, the database stores them as
//! typed JSON, the API and the plots read them.
use serde::{Deserialize, Serialize};

/// Per-class figures. Stored as JSON: a figure missing from an older record reads as its
/// default rather than making the record unreadable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClassMetrics {
    pub label: String,
    pub support: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub precision: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub recall: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub specificity: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub f1: f64,
    /// One-vs-rest ROC-AUC; `None` when the class has no positive or no negative example.
    pub auc: Option<f64>,
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Metrics {
    pub samples: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub accuracy: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub balanced_accuracy: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub macro_f1: f64,
    /// Mean of the defined per-class AUCs.
    pub macro_auc: Option<f64>,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

/// JSON has no NaN: a diverged run's loss is stored as `null`, and reads back as NaN rather
/// than making its record unreadable.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One-vs-rest ROC-AUC by the rank statistic (ties count half).
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let pos = positive.iter().filter(|&&p| p).count();
    let neg = positive.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    let rank_sum: f64 = (0..scores.len())
        .filter(|&k| positive[k])
        .map(|k| ranks[k])
        .sum();
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// Compute metrics from per-sample class probabilities and true labels.
pub fn compute(labels: &[String], probs: &[Vec<f64>], truth: &[usize], loss: f64) -> Metrics {
    let k = labels.len();
    let n = truth.len();
    let mut confusion = vec![vec![0usize; k]; k];
    for (p, &t) in probs.iter().zip(truth) {
        let pred = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        confusion[t][pred] += 1;
    }
    let mut per_class = Vec::with_capacity(k);
    for c in 0..k {
        let tp = confusion[c][c];
        let support: usize = confusion[c].iter().sum();
        let predicted: usize = (0..k).map(|r| confusion[r][c]).sum();
        let fp = predicted - tp;
        let fn_ = support - tp;
        let tn = n - tp - fp - fn_;
        let precision = ratio(tp, predicted);
        let recall = ratio(tp, support);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        let scores: Vec<f64> = probs.iter().map(|p| p[c]).collect();
        let positive: Vec<bool> = truth.iter().map(|&t| t == c).collect();
        per_class.push(ClassMetrics {
            label: labels[c].clone(),
            support,
            precision,
            recall,
            specificity: ratio(tn, tn + fp),
            f1,
            auc: roc_auc(&scores, &positive),
        });
    }
    let present: Vec<&ClassMetrics> = per_class.iter().filter(|c| c.support > 0).collect();
    let mean = |f: &dyn Fn(&ClassMetrics) -> f64| {
        if present.is_empty() {
            0.0
        } else {
            present.iter().map(|c| f(c)).sum::<f64>() / present.len() as f64
        }
    };
    let aucs: Vec<f64> = per_class.iter().filter_map(|c| c.auc).collect();
    Metrics {
        samples: n,
        loss,
        accuracy: ratio((0..k).map(|c| confusion[c][c]).sum(), n),
        balanced_accuracy: mean(&|c| c.recall),
        macro_f1: mean(&|c| c.f1),
        macro_auc: (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64),
        per_class,
        confusion,
    }
}

impl Metrics {
    /// The value of a metric for model selection and early stopping (`None` for an AUC that
    /// is undefined, e.g. a class absent from the split).
    pub fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Accuracy => Some(self.accuracy),
            Metric::BalancedAccuracy => Some(self.balanced_accuracy),
            Metric::MacroF1 => Some(self.macro_f1),
            Metric::MacroAuc => self.macro_auc,
            Metric::Loss => Some(self.loss),
            Metric::Unknown => None,
        }
    }
}

/// A validation metric that selects the best checkpoint or drives early stopping.
///
/// Any string deserializes (an unknown one as [`Metric::Unknown`]) so that
/// [`Hyperparameters::validate`] reports it under the field's own name, as the API always has,
/// rather than as a parse error of the whole object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "&'static str")]
pub enum Metric {
    Accuracy,
    BalancedAccuracy,
    MacroF1,
    MacroAuc,
    Loss,
    /// A name that is none of the above; refused by `validate`.
    Unknown,
}

impl Metric {
    /// The metric of a name, as stored in a job's hyperparameters.
    pub fn named(name: &str) -> Self {
        match name {
            "accuracy" => Self::Accuracy,
            "balanced_accuracy" => Self::BalancedAccuracy,
            "macro_f1" => Self::MacroF1,
            "macro_auc" => Self::MacroAuc,
            "loss" => Self::Loss,
            _ => Self::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Accuracy => "accuracy",
            Self::BalancedAccuracy => "balanced_accuracy",
            Self::MacroF1 => "macro_f1",
            Self::MacroAuc => "macro_auc",
            Self::Loss => "loss",
            Self::Unknown => "unknown",
        }
    }

    /// Whether `new` improves on `old` (lower is better only for `loss`).
    pub fn better(self, new: f64, old: Option<f64>) -> bool {
        match old {
            None => true,
            Some(old) if self == Self::Loss => new < old,
            Some(old) => new > old,
        }
    }
}

impl From<String> for Metric {
    fn from(name: String) -> Self {
        Self::named(&name)
    }
}

impl From<Metric> for &'static str {
    fn from(m: Metric) -> Self {
        m.name()
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One finished epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochRecord<'a> {
    /// From 1.
    pub epoch: u32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val: &'a Metrics,
    /// The learning rate of the epoch's last optimizer step.
    pub lr: f64,
    pub clips_per_s: f64,
    pub data_wait_share: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_missing_figures_still_reads() {
        // Records written before a figure existed (or hand-made ones) must not make a model or
        // a job unreadable.
        let m: Metrics = serde_json::from_str("{}").unwrap();
        assert_eq!(m, Metrics::default());
        let m: Metrics =
            serde_json::from_str(r#"{"accuracy": 0.5, "per_class": [{"label": "a"}]}"#).unwrap();
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.per_class[0].label, "a");
        assert_eq!(m.macro_auc, None);
    }

    #[test]
    fn a_diverged_runs_nan_loss_survives_the_round_trip() {
        let m = Metrics {
            loss: f64::NAN,
            ..Metrics::default()
        };
        let stored = serde_json::to_string(&m).unwrap();
        let back: Metrics = serde_json::from_str(&stored).unwrap();
        assert!(back.loss.is_nan(), "{stored}");
    }

    #[test]
    fn auc_matches_hand_computation() {
        assert_eq!(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(roc_auc(&[0.5, 0.6], &[true, true]), None);
    }

    #[test]
    fn per_class_and_macro_figures() {
        let labels = vec!["normal".to_string(), "polyp".to_string()];
        // truth: 3 normal, 1 polyp; one normal predicted as polyp.
        let probs = vec![
            vec![0.9, 0.1],
            vec![0.8, 0.2],
            vec![0.4, 0.6],
            vec![0.3, 0.7],
        ];
        let m = compute(&labels, &probs, &[0, 0, 0, 1], 0.5);
        assert_eq!(m.confusion, vec![vec![2, 1], vec![0, 1]]);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        let polyp = &m.per_class[1];
        assert!((polyp.precision - 0.5).abs() < 1e-12);
        assert!((polyp.recall - 1.0).abs() < 1e-12);
        assert!((polyp.specificity - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.balanced_accuracy - (2.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(polyp.auc, Some(1.0));
        assert_eq!(m.get(Metric::Accuracy), Some(0.75));
    }
}
