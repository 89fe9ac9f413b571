//! The loss the loop minimises and the evaluation of a split with multi-clip averaging.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::TrainError;
use super::data::{self, ClipSpec, Loader, Plan};
use super::splits::Split;
use crate::backbone::{Preprocessing, VideoClassifier, amp};
use crate::evaluation::{self, Metrics};

/// Cross-entropy with optional class weights and label smoothing, averaged over the batch.
pub fn classification_loss(
    logits: &Tensor,
    y: &Tensor,
    weights: Option<&Tensor>,
    smoothing: f64,
) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    let nll = -logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let per = if smoothing > 0.0 {
        nll * (1.0 - smoothing) + (-logp.mean_dim(-1, false, Kind::Float)) * smoothing
    } else {
        nll
    };
    match weights {
        Some(w) => {
            let wi = w.index_select(0, y);
            (per * &wi).sum(Kind::Float) / wi.sum(Kind::Float)
        }
        None => per.mean(Kind::Float),
    }
}

/// How a model sees clips: the cut, the normalisation, the device and the precision.
pub struct Clips<'a> {
    pub spec: &'a ClipSpec,
    pub prep: &'a Preprocessing,
    pub device: Device,
    pub bf16: bool,
    /// Clips per forward pass.
    pub batch: usize,
}

/// Evaluate with `clips` clips per video, softmax averaged per video. A TorchScript backbone
/// that fails is the user's error, as in training; the cache or libtorch failing is the machine's.
pub fn evaluate(
    model: &VideoClassifier,
    split: &Split,
    how: &Clips,
    classes: &[String],
    clips: u32,
) -> Result<Metrics, TrainError> {
    // Inference mode: no gradients and none of autograd's bookkeeping.
    let _guard = amp::InferenceMode::enter();
    let hw = &split.hw;
    let items = Arc::new(split.items.clone());
    let plans: Vec<Plan> = (0..items.len())
        .flat_map(|i| (0..clips).map(move |c| (i, c)))
        .map(|(i, c)| data::eval_plan(i, items[i].frames, how.spec, hw[i], c, clips))
        .collect();
    let batches: Vec<Vec<Plan>> = plans
        .chunks(how.batch.max(1))
        .map(<[Plan]>::to_vec)
        .collect();
    let loader = Loader::start_for(how.device, items.clone(), batches.clone(), 2, 2);
    let mut probs = vec![vec![0.0f64; classes.len()]; items.len()];
    let mut loss_sum = 0.0;
    for (b, raw) in loader.enumerate() {
        let raw = raw.map_err(|e| TrainError::System(e.context("reading the training cache")))?;
        let x = data::to_batch(&raw, &batches[b], how.spec, how.prep, how.device);
        let logits = {
            let _amp = how.bf16.then(|| amp::Autocast::enter(how.device));
            model
                .try_forward_t(&x, false)
                .map_err(|e| TrainError::User(format!("the TorchScript backbone failed: {e:#}")))?
                .to_kind(Kind::Float)
        };
        super::alive();
        let y = Tensor::from_slice(
            &batches[b]
                .iter()
                .map(|p| items[p.item].label as i64)
                .collect::<Vec<_>>(),
        )
        .to_device(how.device);
        loss_sum +=
            classification_loss(&logits, &y, None, 0.0).double_value(&[]) * batches[b].len() as f64;
        let p = logits.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let rows: Vec<Vec<f32>> =
            Vec::<Vec<f32>>::try_from(p).map_err(|e| TrainError::System(e.into()))?;
        for (plan, row) in batches[b].iter().zip(rows) {
            for (acc, v) in probs[plan.item].iter_mut().zip(row) {
                *acc += v as f64 / clips as f64;
            }
        }
    }
    let truth: Vec<usize> = items.iter().map(|i| i.label).collect();
    Ok(evaluation::compute(
        classes,
        &probs,
        &truth,
        loss_sum / plans.len().max(1) as f64,
    ))
}
