//! A job's charts as SVG: its training curves and a confusion matrix.
use uuid::Uuid;

use super::JobError;
use crate::db::{
    self,
    jobs::{EpochRow, Job},
};
use crate::evaluation::{Metric, Metrics};
use crate::plots::{Panel, Series, confusion_matrix, line_panels};
use crate::train::hyper::Hyperparameters;

/// Which chart, as `GET /v1/jobs/{id}/plots/{name}?split=&epoch=` asks for it.
pub struct PlotRequest<'a> {
    pub name: &'a str,
    pub split: Option<&'a str>,
    pub epoch: Option<i32>,
}

/// `training-curves`: loss and validation metrics per epoch, the best epoch marked.
/// `confusion-matrix`: the test evaluation of the final model by default (the latest
/// validation until there is one); `split=val&epoch=N` for an epoch's validation.
pub async fn plot(db: &sqlx::PgPool, job: &Job, req: &PlotRequest<'_>) -> Result<String, JobError> {
    let short = &job.id.to_string()[..8];
    let epochs = db::jobs::epochs(db, job.id).await?;
    match req.name {
        "training-curves" => {
            if req.split.is_some() || req.epoch.is_some() {
                return Err(JobError::invalid(
                    "split",
                    "training-curves takes no split or epoch",
                ));
            }
            if epochs.is_empty() {
                return Err(JobError::Conflict("no epoch has finished yet".into()));
            }
            let metric = serde_json::from_value::<Hyperparameters>(job.hyperparameters.clone())
                .map_or(Metric::BalancedAccuracy, |hp| hp.selection_metric);
            let title = format!("{} on job {short}", job.base_model);
            Ok(training_curves(&title, metric, &epochs))
        }
        "confusion-matrix" => {
            let (title, m) = confusion_source(db, job.id, short, &epochs, req).await?;
            let labels: Vec<String> = m.per_class.iter().map(|c| c.label.clone()).collect();
            Ok(confusion_matrix(&title, &labels, &m.confusion))
        }
        _ => Err(JobError::NotFound(
            "plot (training-curves or confusion-matrix)",
        )),
    }
}

/// The evaluation a confusion matrix shows, and its title.
async fn confusion_source(
    db: &sqlx::PgPool,
    job_id: Uuid,
    short: &str,
    epochs: &[EpochRow],
    req: &PlotRequest<'_>,
) -> Result<(String, Metrics), JobError> {
    let test = match req.split {
        None => req.epoch.is_none(),
        Some("test") => true,
        Some("val") => false,
        Some(_) => return Err(JobError::invalid("split", "test or val")),
    };
    let test_metrics = if test {
        db::models::test_metrics_of_job(db, job_id).await?
    } else {
        None
    };
    match test_metrics {
        Some(m) => Ok((format!("job {short}: test split, final model"), m)),
        None if test && req.split.is_some() => Err(JobError::Conflict(
            "the job has no test evaluation (yet, or its dataset has no test split)".into(),
        )),
        None => {
            let e = match req.epoch {
                Some(n) => epochs.iter().find(|e| e.epoch == n).ok_or_else(|| {
                    JobError::invalid("epoch", format!("no epoch {n} has finished"))
                })?,
                None => epochs
                    .last()
                    .ok_or_else(|| JobError::Conflict("no epoch has finished yet".into()))?,
            };
            Ok((
                format!("job {short}: validation split, epoch {}", e.epoch),
                e.val.0.clone(),
            ))
        }
    }
}

fn training_curves(title: &str, metric: Metric, epochs: &[EpochRow]) -> String {
    let series = |name: &'static str, f: &dyn Fn(&EpochRow) -> Option<f64>, dashed| Series {
        name,
        points: epochs
            .iter()
            .filter_map(|e| f(e).map(|v| (f64::from(e.epoch), v)))
            .collect(),
        dashed,
    };
    let val = |m: Metric| move |e: &EpochRow| e.val.get(m);
    let mut best: Option<(i32, f64)> = None;
    for e in epochs {
        if let Some(v) = e.val.get(metric)
            && metric.better(v, best.map(|b| b.1))
        {
            best = Some((e.epoch, v));
        }
    }
    let label = best.map(|(e, v)| format!("best: epoch {e}, {metric} {v:.3}"));
    line_panels(
        title,
        &[
            Panel {
                title: "loss",
                series: vec![
                    series("train", &|e| Some(e.train_loss), false),
                    series("validation", &val(Metric::Loss), false),
                ],
                y_range: None,
            },
            Panel {
                title: "validation metrics",
                series: vec![
                    series("accuracy", &val(Metric::Accuracy), false),
                    series("balanced accuracy", &val(Metric::BalancedAccuracy), false),
                    series("macro-F1", &val(Metric::MacroF1), false),
                    series("macro ROC-AUC", &val(Metric::MacroAuc), false),
                    series("train accuracy", &|e| Some(e.train_accuracy), true),
                ],
                y_range: Some((0.0, 1.0)),
            },
        ],
        best.zip(label.as_deref())
            .map(|((e, _), l)| (f64::from(e), l)),
    )
}
