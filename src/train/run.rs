//! The training loop of one job attempt, run in a `vidtune train-job` child process.
//!
//! The attempt is a sequence of phases — [`Attempt::prepare`], then per epoch
//! [`Attempt::train_epoch`], an evaluation and [`Attempt::end_epoch`], then [`Attempt::finish`]
//! — over a [`Job`] read before it starts; everything it reports goes through an
//! [`AttemptLog`], so the loop itself knows no database.
//!
//! Reproducibility: each epoch seeds libtorch and the clip planner from (seed, epoch), and every
//! random choice about data (order, clip position, crop, flip) is made on this thread, so a job
//! resumed from the checkpoint of epoch k produces the same epochs k+1… as an uninterrupted
//! run. Every write of the log names the attempt and is ignored if the attempt is stale.
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use uuid::Uuid;

use super::checkpoint::{self, LoopState};
use super::data::{self, ClipSpec, Item, Loader, Plan, RawClip};
use super::evaluate::{Clips, classification_loss, evaluate};
use super::hyper::{Hyperparameters, Imbalance};
use super::optim::{Group, Optimizer};
use super::precision;
use super::splits::{Split, Splits};
use super::{TrainError, alive};
use crate::backbone::{self, Base, HeadSpec, Preprocessing, VideoClassifier, export};
use crate::datadir::DataDir;
use crate::evaluation::{EpochRecord, Metrics};

/// How an attempt ended, short of an error.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Succeeded(Uuid),
    Canceled,
    /// The job was reclaimed by another attempt; this one stops without writing.
    FencedOut,
}

fn user(msg: impl Into<String>) -> TrainError {
    TrainError::User(msg.into())
}

/// Where and on what the attempt runs.
pub struct Context {
    pub data_dir: DataDir,
    pub device: Device,
    /// When the attempt began (before its inputs were read): `max_runtime_s` counts from here.
    pub started: Instant,
}

/// Everything an attempt reads from the database, read before it starts.
pub struct Job {
    pub id: Uuid,
    pub attempt: i32,
    /// The base model's name, as the exported model records it.
    pub base_model: String,
    pub hp: Hyperparameters,
    pub base: Base,
    /// The base model's input spec, before the job's `frames` and `crop`.
    pub prep: Preprocessing,
    /// Installed pretrained weights of a built-in architecture.
    pub pretrained: Option<Pretrained>,
    pub splits: Splits,
    /// The newest checkpoint of an earlier attempt, relative to the data directory.
    pub checkpoint: Option<String>,
}

/// A pretrained weights file.
pub struct Pretrained {
    pub path: PathBuf,
    pub sha256: String,
}

/// What the attempt should do after reporting progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    CancelRequested,
    /// The attempt is stale (the job was reclaimed or ended): stop without writing.
    FencedOut,
}

/// Progress within the running epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The running epoch, from 1.
    pub epoch: u32,
    pub step: i64,
    /// Share of the whole job done, 0 to 1.
    pub fraction: f64,
    pub eta_s: f64,
}

/// The trained model, its files already written under `path`.
#[derive(Debug, Clone, Copy)]
pub struct TrainedModel<'a> {
    pub id: Uuid,
    /// Relative to the data directory.
    pub path: &'a Path,
    pub classes: &'a [String],
    pub preprocessing: &'a Preprocessing,
    pub head: &'a HeadSpec,
    pub eval_clips: u32,
    pub val: &'a Metrics,
    pub test: Option<&'a Metrics>,
    /// Bytes of the model's files, counted against the tenant's storage quota.
    pub bytes: u64,
}

/// Where an attempt reports. Every write is fenced by the attempt: a stale attempt's writes
/// change nothing, and the methods that can tell say so.
pub trait AttemptLog {
    /// Progress of the running epoch; whether to go on.
    fn progress(&mut self, p: Progress) -> anyhow::Result<Control>;
    /// Loss and learning rate at a logged step (`epoch` from 0, as steps are recorded).
    fn step(&mut self, step: i64, epoch: u32, loss: f64, lr: f64) -> anyhow::Result<()>;
    /// A finished epoch's metrics; the records written (0 when a resumed attempt repeats it).
    fn epoch(&mut self, e: &EpochRecord) -> anyhow::Result<u64>;
    fn event(
        &mut self,
        kind: &str,
        level: &str,
        message: &str,
        data: serde_json::Value,
    ) -> anyhow::Result<()>;
    /// The newest checkpoint (relative to the data directory); `false` when fenced out.
    fn checkpoint(&mut self, path: &str) -> anyhow::Result<bool>;
    /// The bytes the job's checkpoints take now (after pruning), for the storage quota.
    fn checkpoint_bytes(&mut self, bytes: u64) -> anyhow::Result<()>;
    /// Record the model and end the job as succeeded, both or neither; `false` when fenced
    /// out (then nothing was recorded).
    fn finish(&mut self, model: &TrainedModel) -> anyhow::Result<bool>;
}

/// Run one attempt of a job to its end.
pub fn run(ctx: &Context, job: Job, log: &mut dyn AttemptLog) -> Result<Outcome, TrainError> {
    let mut attempt = Attempt::prepare(ctx, job, log)?;
    for epoch in attempt.state.epochs_done..attempt.job.hp.epochs {
        let trained = match attempt.train_epoch(epoch)? {
            ControlFlow::Continue(t) => t,
            ControlFlow::Break(outcome) => return Ok(outcome),
        };
        let val = attempt.evaluate(&attempt.job.splits.val, 1)?;
        match attempt.end_epoch(epoch, &trained, &val)? {
            AfterEpoch::Next => {}
            AfterEpoch::EarlyStop => break,
            AfterEpoch::FencedOut => return Ok(Outcome::FencedOut),
        }
    }
    attempt.finish()
}

/// One attempt in progress: the model, its optimizer and the loop's state.
struct Attempt<'a> {
    ctx: &'a Context,
    log: &'a mut dyn AttemptLog,
    job: Job,
    /// The job's input spec: the base model's with the job's `frames` and `crop`.
    prep: Preprocessing,
    spec: ClipSpec,
    vs: VarStore,
    model: VideoClassifier,
    opt: Optimizer,
    state: LoopState,
    class_weights: Option<Tensor>,
    train_items: Arc<Vec<Item>>,
    ckpt_root: PathBuf,
    last_poll: Instant,
    /// Seconds per finished epoch of this attempt (for the ETA).
    epoch_times: Vec<f64>,
    /// Whether the model computes in bf16 (the job's `precision` on this device).
    bf16: bool,
    /// Whether checkpoints leave out the frozen stages: they hold the pretrained weights, which
    /// the attempt loads again before it resumes.
    lean_checkpoints: bool,
    /// The newest checkpoint, being written by another thread; recorded once it is whole.
    pending: Option<Pending>,
}

/// A checkpoint being written in the background.
struct Pending {
    epoch: u32,
    write: std::thread::JoinHandle<anyhow::Result<PathBuf>>,
}

/// What one epoch's training pass measured.
struct Trained {
    started: Instant,
    loss_sum: f64,
    correct: usize,
    /// The running sums of loss × clips and correct clips, kept on the device (read once an
    /// epoch, so a GPU is not made to wait for them after every step).
    loss_acc: Tensor,
    correct_acc: Tensor,
    seen: usize,
    /// Time spent waiting for the loader.
    wait: Duration,
    /// Seconds of the training pass (what follows until the epoch's end is evaluation).
    train_s: f64,
    lr: f64,
}

enum AfterEpoch {
    Next,
    EarlyStop,
    FencedOut,
}

/// The job's input spec: the base model's, with the job's `frames` and `crop`.
fn job_clips(hp: &Hyperparameters, base: &Preprocessing) -> (Preprocessing, ClipSpec) {
    let prep = hp.preprocessing(base);
    let spec = ClipSpec {
        crop_scale: hp.augmentation.crop_scale,
        flip: hp.augmentation.horizontal_flip,
        ..ClipSpec::new(&prep, hp.frame_stride)
    };
    (prep, spec)
}

impl<'a> Attempt<'a> {
    /// Build the model, load pretrained weights, resume from a checkpoint, weight the classes.
    fn prepare(
        ctx: &'a Context,
        job: Job,
        log: &'a mut dyn AttemptLog,
    ) -> Result<Self, TrainError> {
        let hp = &job.hp;
        let (prep, spec) = job_clips(hp, &job.prep);
        let device = crate::device::Device::from_tch(ctx.device)
            .ok_or_else(|| TrainError::System(anyhow::anyhow!("unsupported device")))?;
        tch::manual_seed(hp.seed as i64);
        let mut vs = VarStore::new(ctx.device);
        let mut model = VideoClassifier::new(
            &vs.root(),
            job.base.clone(),
            job.splits.classes.len() as i64,
            &hp.head,
            hp.freeze,
        )
        .map_err(|e| user(format!("{e:#}")))?;
        check_clip_size(&model, &job.prep, &prep, ctx.device)?;
        initialise(&vs, &job, log)?;
        let mut opt = optimizer(hp, &model, &vs);
        let mut state = LoopState::default();
        // Frozen stages keep the pretrained weights: a checkpoint need not repeat them. (From
        // a random initialisation they would depend on the device's generator.)
        let lean_checkpoints = job.pretrained.is_some();
        if let Some(path) = &job.checkpoint {
            let frozen = |name: &str| lean_checkpoints && model.is_frozen(name);
            state = checkpoint::load(&ctx.data_dir.resolve(path), &mut vs, &mut opt, frozen)?;
            log.event(
                "resumed",
                "info",
                &format!(
                    "resumed from the checkpoint after epoch {}",
                    state.epochs_done
                ),
                json!({"epoch": state.epochs_done}),
            )?;
        }
        // Decided once per job, by its first attempt, and kept in its checkpoints: a resumed
        // attempt computes as the epochs before it did (the check times passes, which vary).
        let decided = match state.precision.clone() {
            Some(d) => {
                if !model.set_fp32_convolutions(&vs, &d.fp32_convolutions) {
                    return Err(TrainError::System(anyhow::anyhow!(
                        "the checkpoint's fp32 convolutions are not in this model"
                    )));
                }
                d
            }
            None => {
                let clip = [
                    i64::from(hp.batch_size.min(4)),
                    3,
                    prep.frames,
                    prep.crop,
                    prep.crop,
                ];
                // Everything the check's answer depends on: the build and the device, the model
                // and its weights, what trains, and the clip.
                let identity = format!(
                    "{}; model {} (weights {}); freeze {:?}; head {:?}; clip {clip:?}",
                    precision::machine_identity(device),
                    job.base_model,
                    job.pretrained
                        .as_ref()
                        .map_or("random", |p| p.sha256.as_str()),
                    hp.freeze,
                    hp.head,
                );
                let memo = precision::Memo::new(&ctx.data_dir.precision_memos(), &identity);
                let choice = precision::choose(
                    hp.precision,
                    device,
                    &mut model,
                    &vs,
                    &mut opt,
                    clip,
                    Some(&memo),
                );
                if let Some(w) = &choice.warning {
                    log.event("precision", "warning", w, json!({}))?;
                }
                choice.decided()
            }
        };
        let (bf16, why) = (decided.bf16, decided.why.clone());
        state.precision = Some(decided);
        let class_weights = (hp.class_imbalance == Imbalance::WeightedLoss)
            .then(|| class_weights(&job.splits).to_device(ctx.device));
        let ckpt_root = ctx.data_dir.checkpoints(job.id);
        let startup_s = ctx.started.elapsed().as_secs_f64();
        log.event(
            "started",
            "info",
            &format!(
                "training on {device} in {} ({why}); ready after {startup_s:.2} s",
                if bf16 { "bf16" } else { "fp32" }
            ),
            json!({"device": device.to_string(), "precision": if bf16 { "bf16" } else { "fp32" }, "precision_reason": why, "startup_s": startup_s}),
        )?;
        Ok(Self {
            ctx,
            log,
            train_items: Arc::new(job.splits.train.items.clone()),
            job,
            prep,
            spec,
            vs,
            model,
            opt,
            state,
            class_weights,
            ckpt_root,
            last_poll: Instant::now(),
            epoch_times: Vec::new(),
            bf16,
            lean_checkpoints,
            pending: None,
        })
    }

    /// One pass over the training split; breaks with the outcome when the job was canceled
    /// or the attempt fenced out.
    fn train_epoch(&mut self, epoch: u32) -> Result<ControlFlow<Outcome, Trained>, TrainError> {
        let started = Instant::now();
        let plans = self.epoch_plans(epoch);
        let threads = self.job.hp.loader_threads as usize;
        let loader = Loader::start_for(
            self.ctx.device,
            self.train_items.clone(),
            plans.clone(),
            threads,
            2,
        );
        let device = self.ctx.device;
        let mut t = Trained {
            started,
            loss_sum: 0.0,
            correct: 0,
            loss_acc: Tensor::zeros([], (Kind::Double, device)),
            train_s: 0.0,
            correct_acc: Tensor::zeros([], (Kind::Int64, device)),
            seen: 0,
            wait: Duration::ZERO,
            lr: 0.0,
        };
        let mut waiting = Instant::now();
        for (b, raw) in loader.enumerate() {
            let raw =
                raw.map_err(|e| TrainError::System(e.context("reading the training cache")))?;
            t.wait += waiting.elapsed();
            self.train_batch(epoch, b, plans.len(), &raw, &plans[b], &mut t)?;
            if let ControlFlow::Break(outcome) = self.poll(epoch, b, plans.len(), started)? {
                return Ok(ControlFlow::Break(outcome));
            }
            waiting = Instant::now();
        }
        self.state.optimizer_step = self.opt.step;
        t.loss_sum = t.loss_acc.double_value(&[]);
        t.correct = t.correct_acc.int64_value(&[]) as usize;
        t.train_s = started.elapsed().as_secs_f64();
        Ok(ControlFlow::Continue(t))
    }

    /// The epoch's clips: order (shuffled or class-balanced), positions and crops, batched.
    fn epoch_plans(&self, epoch: u32) -> Vec<Vec<Plan>> {
        let hp = &self.job.hp;
        tch::manual_seed(
            (hp.seed as i64)
                .wrapping_mul(7919)
                .wrapping_add(epoch as i64),
        );
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(hp.seed.wrapping_mul(1_000_003) ^ (epoch as u64 + 1));
        let items = &self.train_items;
        let order: Vec<usize> = match hp.class_imbalance {
            Imbalance::BalancedSampler => {
                let by_class: Vec<Vec<usize>> = (0..self.job.splits.classes.len())
                    .map(|c| (0..items.len()).filter(|&i| items[i].label == c).collect())
                    .collect();
                let present: Vec<&Vec<usize>> = by_class.iter().filter(|v| !v.is_empty()).collect();
                (0..items.len())
                    .map(|_| {
                        let class = present[rand::RngExt::random_range(&mut rng, 0..present.len())];
                        class[rand::RngExt::random_range(&mut rng, 0..class.len())]
                    })
                    .collect()
            }
            _ => {
                let mut o: Vec<usize> = (0..items.len()).collect();
                o.shuffle(&mut rng);
                o
            }
        };
        let hw = &self.job.splits.train.hw;
        order
            .chunks(hp.batch_size as usize)
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|&i| data::train_plan(&mut rng, i, items[i].frames, &self.spec, hw[i]))
                    .collect()
            })
            .collect()
    }

    /// Forward, backward and (every `grad_accumulation` batches, and at the end) an optimizer
    /// step; logs the loss every `log_every_steps`.
    fn train_batch(
        &mut self,
        epoch: u32,
        b: usize,
        batches: usize,
        raw: &[RawClip],
        plans: &[Plan],
        t: &mut Trained,
    ) -> Result<(), TrainError> {
        let hp = &self.job.hp;
        let device = self.ctx.device;
        let x = data::to_batch(raw, plans, &self.spec, &self.prep, device);
        let labels: Vec<i64> = plans
            .iter()
            .map(|p| self.train_items[p.item].label as i64)
            .collect();
        let y = Tensor::from_slice(&labels).to_device(device);
        let backbone_failed =
            |e: anyhow::Error| user(format!("the TorchScript backbone failed: {e:#}"));
        let (logits, loss) = {
            let _amp = self.bf16.then(|| backbone::amp::Autocast::enter(device));
            let logits = self
                .model
                .try_forward_t(&x, true)
                .map_err(backbone_failed)?;
            let weights = self.class_weights.as_ref();
            let loss = classification_loss(&logits, &y, weights, hp.label_smoothing);
            (logits, loss)
        };
        (&loss / hp.grad_accumulation as f64).backward();
        self.model.finish_backward().map_err(backbone_failed)?;
        if (b + 1).is_multiple_of(hp.grad_accumulation as usize) || b + 1 == batches {
            if let Some(c) = hp.grad_clip {
                self.opt.clip_grad_norm(c);
            }
            let steps_per_epoch = self.train_items.len().div_ceil(hp.batch_size as usize);
            t.lr = hp.lr * hp.lr_factor(epoch as f64 + b as f64 / steps_per_epoch as f64);
            self.opt.step(t.lr)?;
            self.opt.zero_grad();
        }
        alive();
        let n = labels.len();
        t.loss_acc = &t.loss_acc + loss.detach().to_kind(Kind::Double) * n as f64;
        t.correct_acc = &t.correct_acc + logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
        t.seen += n;
        self.state.step += 1;
        if self.state.step % hp.log_every_steps as i64 == 0 {
            self.log
                .step(self.state.step, epoch, loss.double_value(&[]), t.lr)?;
        }
        Ok(())
    }

    /// At most once a second (and after the epoch's last batch): report progress and the ETA,
    /// learn whether to go on, and enforce `max_runtime_s`.
    fn poll(
        &mut self,
        epoch: u32,
        b: usize,
        batches: usize,
        started: Instant,
    ) -> Result<ControlFlow<Outcome>, TrainError> {
        if self.last_poll.elapsed() < Duration::from_secs(1) && b + 1 != batches {
            return Ok(ControlFlow::Continue(()));
        }
        self.last_poll = Instant::now();
        if !self.settle_checkpoint(false)? {
            return Ok(ControlFlow::Break(Outcome::FencedOut));
        }
        let hp = &self.job.hp;
        let share = (b + 1) as f64 / batches as f64;
        let done = epoch as f64 + share;
        let per_epoch = self
            .epoch_times
            .last()
            .copied()
            .unwrap_or_else(|| started.elapsed().as_secs_f64() / share);
        let progress = Progress {
            epoch: epoch + 1,
            step: self.state.step,
            fraction: done / hp.epochs as f64,
            eta_s: per_epoch * (hp.epochs as f64 - done),
        };
        match self.log.progress(progress)? {
            Control::FencedOut => return Ok(ControlFlow::Break(Outcome::FencedOut)),
            Control::CancelRequested => return Ok(ControlFlow::Break(Outcome::Canceled)),
            Control::Continue => {}
        }
        if let Some(max) = hp.max_runtime_s
            && self.ctx.started.elapsed().as_secs() >= max
        {
            return Err(user(format!("stopped: max_runtime_s ({max} s) reached")));
        }
        Ok(ControlFlow::Continue(()))
    }

    /// `clips` clips per video of `split`, averaged.
    fn evaluate(&self, split: &Split, clips: u32) -> Result<Metrics, TrainError> {
        let how = Clips {
            spec: &self.spec,
            prep: &self.prep,
            device: self.ctx.device,
            bf16: self.bf16,
            batch: eval_batch(self.job.hp.batch_size),
        };
        evaluate(&self.model, split, &how, &self.job.splits.classes, clips)
    }

    /// Record the epoch, track the best epoch and early stopping, and start writing its
    /// checkpoint (recorded, and older ones pruned, once it is whole).
    fn end_epoch(
        &mut self,
        epoch: u32,
        t: &Trained,
        val: &Metrics,
    ) -> Result<AfterEpoch, TrainError> {
        let elapsed = t.started.elapsed().as_secs_f64();
        let eval_s = elapsed - t.train_s;
        self.epoch_times.push(elapsed);
        // The previous epoch's checkpoint is recorded first (in order, one write at a time), and
        // an attempt fenced out meanwhile records nothing more.
        let ckpt_started = Instant::now();
        if !self.settle_checkpoint(true)? {
            return Ok(AfterEpoch::FencedOut);
        }
        let train_loss = t.loss_sum / t.seen.max(1) as f64;
        let train_acc = t.correct as f64 / t.seen.max(1) as f64;
        let inserted = self.log.epoch(&EpochRecord {
            epoch: epoch + 1,
            train_loss,
            train_accuracy: train_acc,
            val,
            lr: t.lr,
            clips_per_s: t.seen as f64 / elapsed,
            data_wait_share: t.wait.as_secs_f64() / elapsed,
        })?;

        let hp = &self.job.hp;
        let state = &mut self.state;
        state.epochs_done = epoch + 1;
        let value = val.get(hp.selection_metric).unwrap_or(val.accuracy);
        if hp.selection_metric.better(value, state.best_value) {
            state.best_value = Some(value);
            state.best_epoch = Some(epoch + 1);
        }
        let mut stop = None;
        if let Some(es) = &hp.early_stopping {
            let v = val.get(es.metric).unwrap_or(val.accuracy);
            if es.metric.better(v, state.es_best) {
                state.es_best = Some(v);
                state.es_bad = 0;
            } else {
                state.es_bad += 1;
            }
            stop = (state.es_bad >= es.patience).then_some(es);
        }
        let (lean, model) = (self.lean_checkpoints, &self.model);
        let snapshot = checkpoint::Snapshot::take(&self.vs, &self.opt, state, |name| {
            !(lean && model.is_frozen(name))
        });
        let snapshot_mb = snapshot.bytes() as f64 / 1e6;
        let (root, attempt) = (self.ckpt_root.clone(), self.job.attempt);
        self.pending = Some(Pending {
            epoch: epoch + 1,
            write: std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || snapshot.write(&root, attempt))
                .context("starting the checkpoint writer")?,
        });
        let checkpoint_s = ckpt_started.elapsed().as_secs_f64();
        self.log.event(
            "epoch",
            "info",
            &format!("epoch {}/{}: train loss {train_loss:.4}, val accuracy {:.3}, balanced {:.3}", epoch + 1, hp.epochs, val.accuracy, val.balanced_accuracy),
            json!({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val.loss, "val_accuracy": val.accuracy, "val_balanced_accuracy": val.balanced_accuracy, "val_macro_f1": val.macro_f1, "inserted": inserted,
                   "train_s": t.train_s, "data_wait_s": t.wait.as_secs_f64(), "eval_s": eval_s, "checkpoint_s": checkpoint_s, "checkpoint_mb": snapshot_mb}),
        )?;
        let Some(es) = stop else {
            return Ok(AfterEpoch::Next);
        };
        self.log.event(
            "early_stop",
            "info",
            &format!(
                "no improvement of {} for {} epochs; stopping",
                es.metric, es.patience
            ),
            json!({"epoch": epoch + 1}),
        )?;
        Ok(AfterEpoch::EarlyStop)
    }

    /// Record the checkpoint being written in the background once it is whole (waiting for
    /// it when `wait`), then prune older ones; `false` when the attempt was fenced out.
    fn settle_checkpoint(&mut self, wait: bool) -> Result<bool, TrainError> {
        let Some(pending) = self.pending.take_if(|p| wait || p.write.is_finished()) else {
            return Ok(true);
        };
        let dir = pending
            .write
            .join()
            .map_err(|_| anyhow::anyhow!("the checkpoint writer panicked"))?
            .with_context(|| format!("writing the checkpoint of epoch {}", pending.epoch))?;
        if !self.log.checkpoint(&self.ctx.data_dir.relative(&dir))? {
            // Never recorded, and in this attempt's own folder: nobody resumes from it.
            let _ = crate::datadir::remove_durably(&dir);
            return Ok(false);
        }
        // The checkpoint was recorded under this attempt's fence: only now may older attempts'
        // files go.
        checkpoint::prune(
            &self.ckpt_root,
            self.job.attempt,
            self.job.hp.keep_checkpoints as usize,
            self.state.best_epoch,
        );
        self.log
            .checkpoint_bytes(crate::datadir::dir_bytes(&self.ckpt_root))?;
        Ok(true)
    }

    /// The best epoch's weights, evaluated on the test split with multi-clip averaging and
    /// exported; the model is recorded only after its files are complete.
    fn finish(mut self) -> Result<Outcome, TrainError> {
        if !self.settle_checkpoint(true)? {
            return Ok(Outcome::FencedOut);
        }
        let hp = &self.job.hp;
        let best = self.state.best_epoch.unwrap_or(self.state.epochs_done);
        let best_dir = checkpoint::find(&self.ckpt_root, best);
        if let Some(best_dir) = best_dir.filter(|_| best != self.state.epochs_done) {
            let (lean, model) = (self.lean_checkpoints, &self.model);
            checkpoint::load_weights(&best_dir, &mut self.vs, |name| {
                lean && model.is_frozen(name)
            })
            .context("loading the best checkpoint")?;
        }
        let val = self.evaluate(&self.job.splits.val, hp.eval_clips)?;
        let test = if self.job.splits.test.items.is_empty() {
            self.log.event(
                "test",
                "warning",
                "the dataset has no test videos; the model has validation metrics only",
                json!({}),
            )?;
            None
        } else {
            let m = self.evaluate(&self.job.splits.test, hp.eval_clips)?;
            self.log.event("test", "info", &format!("test ({} clips per video): accuracy {:.3}, balanced {:.3}, macro-F1 {:.3}", hp.eval_clips, m.accuracy, m.balanced_accuracy, m.macro_f1), json!({"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "macro_f1": m.macro_f1}))?;
            Some(m)
        };

        let id = Uuid::new_v4();
        let rel = DataDir::model_relative(id);
        let classes = &self.job.splits.classes;
        let meta = export::ExportMetadata::new(
            &self.job.base_model,
            classes.clone(),
            hp.head.clone(),
            self.prep.clone(),
            hp.eval_clips as i64,
        );
        // Written aside, durably moved into place, and only then recorded.
        let dir = self.ctx.data_dir.resolve(&rel);
        let part = dir.with_extension("part");
        let _ = std::fs::remove_dir_all(&part);
        export::write_safetensors(&self.vs, &meta, &part)?;
        crate::datadir::durable_rename(&part, &dir).context("moving the model into place")?;
        let committed = self.log.finish(&TrainedModel {
            id,
            path: &rel,
            classes,
            preprocessing: &self.prep,
            head: &hp.head,
            eval_clips: hp.eval_clips,
            val: &val,
            test: test.as_ref(),
            bytes: crate::datadir::dir_bytes(&dir),
        })?;
        if !committed {
            let _ = crate::datadir::remove_durably(&dir);
            return Ok(Outcome::FencedOut);
        }
        Ok(Outcome::Succeeded(id))
    }
}

impl Drop for Attempt<'_> {
    /// An attempt that ends early (canceled, fenced out, failed) still lets its checkpoint
    /// writer finish, so no half-written folder is left behind.
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            let _ = p.write.join();
        }
    }
}

/// Clips per evaluation forward pass: twice the training batch, as evaluation keeps no
/// activations for a backward pass.
fn eval_batch(train_batch: u32) -> usize {
    (2 * train_batch as usize).clamp(8, 64)
}

/// A custom backbone was inspected at the clip size it was registered with; one whose output
/// depends on that size does not fit a job that changes `frames` or `crop`. One zero clip
/// through it first makes that the user's error, naming the hyperparameters.
fn check_clip_size(
    model: &VideoClassifier,
    registered: &Preprocessing,
    job: &Preprocessing,
    device: Device,
) -> Result<(), TrainError> {
    if !model.is_sandboxed() || (registered.frames, registered.crop) == (job.frames, job.crop) {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let clip = Tensor::zeros(
        [2, 3, job.frames, job.crop, job.crop],
        (Kind::Float, device),
    );
    model.try_forward_t(&clip, false).map(drop).map_err(|e| {
        user(format!(
            "the TorchScript backbone does not fit this job's clips of {} frames at {}×{} (it \
             was registered with {} frames at {}×{}); choose hyperparameters.frames and \
             hyperparameters.crop it accepts: {e:#}",
            job.frames, job.crop, job.crop, registered.frames, registered.crop, registered.crop
        ))
    })
}

/// Pretrained weights into a built-in architecture, or say that it starts from random ones.
fn initialise(vs: &VarStore, job: &Job, log: &mut dyn AttemptLog) -> Result<(), TrainError> {
    let Base::Builtin(arch) = &job.base else {
        return Ok(());
    };
    match &job.pretrained {
        Some(w) => {
            let tensors =
                Tensor::read_safetensors(&w.path).context("reading pretrained weights")?;
            backbone::load_into(vs, &tensors)?;
            log.event("weights", "info", &format!("{} initialised from {} weights {}", arch.name(), arch.pretrained_on(), &w.sha256[..12]), json!({"sha256": w.sha256}))?;
        }
        None => log.event(
            "weights",
            "warning",
            &format!("no pretrained weights are installed for {}; training from random initialisation (vidtune weights pull {})", arch.name(), arch.name()),
            json!({}),
        )?,
    }
    Ok(())
}

/// The backbone's trainable parameters at `lr × backbone_lr_mult`, the head's at `lr`.
pub(super) fn optimizer(hp: &Hyperparameters, model: &VideoClassifier, vs: &VarStore) -> Optimizer {
    let (backbone_params, head_params) = model.trainable_groups(vs);
    Optimizer::new(
        hp.optimizer,
        vec![
            Group {
                params: backbone_params,
                lr_mult: hp.backbone_lr_mult,
            },
            Group {
                params: head_params,
                lr_mult: 1.0,
            },
        ],
        hp.momentum,
        hp.weight_decay,
    )
}

/// Inverse class frequencies of the training split, for an imbalanced training set.
fn class_weights(splits: &Splits) -> Tensor {
    let k = splits.classes.len();
    let counts: Vec<f64> = (0..k)
        .map(|c| splits.train.items.iter().filter(|i| i.label == c).count() as f64)
        .collect();
    let n = counts.iter().sum::<f64>();
    let w: Vec<f32> = counts
        .iter()
        .map(|&c| (n / (k as f64 * c.max(1.0))) as f32)
        .collect();
    Tensor::from_slice(&w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::Arch;
    use crate::media::cache::CacheWriter;
    use crate::train::splits::SplitVideo;

    /// What an attempt reported, kept in memory; `fence_at_checkpoint` plays a job reclaimed
    /// by another attempt.
    #[derive(Default)]
    struct Memory {
        fence_at_checkpoint: bool,
        steps: Vec<(i64, u32)>,
        epochs: Vec<(u32, f64, f64, Metrics)>,
        events: Vec<(String, String)>,
        checkpoints: Vec<String>,
        checkpoint_bytes: u64,
        models: Vec<(Uuid, PathBuf, Vec<String>)>,
        model_bytes: u64,
    }

    impl AttemptLog for Memory {
        fn progress(&mut self, _: Progress) -> anyhow::Result<Control> {
            Ok(Control::Continue)
        }
        fn step(&mut self, step: i64, epoch: u32, _: f64, _: f64) -> anyhow::Result<()> {
            self.steps.push((step, epoch));
            Ok(())
        }
        fn epoch(&mut self, e: &EpochRecord) -> anyhow::Result<u64> {
            let m = e.val.clone();
            self.epochs
                .push((e.epoch, e.train_loss, e.train_accuracy, m));
            Ok(1)
        }
        fn event(
            &mut self,
            kind: &str,
            _: &str,
            msg: &str,
            _: serde_json::Value,
        ) -> anyhow::Result<()> {
            self.events.push((kind.to_owned(), msg.to_owned()));
            Ok(())
        }
        fn checkpoint(&mut self, path: &str) -> anyhow::Result<bool> {
            self.checkpoints.push(path.to_owned());
            Ok(!self.fence_at_checkpoint)
        }
        fn checkpoint_bytes(&mut self, bytes: u64) -> anyhow::Result<()> {
            self.checkpoint_bytes = bytes;
            Ok(())
        }
        fn finish(&mut self, m: &TrainedModel) -> anyhow::Result<bool> {
            self.models
                .push((m.id, m.path.to_path_buf(), m.classes.to_vec()));
            self.model_bytes = m.bytes;
            Ok(true)
        }
    }

    /// A cached video of 8 frames, 40 × 40: class 0 bright on the left, class 1 on the right.
    fn video(dir: &Path, name: &str, class: usize, seed: u8) -> PathBuf {
        let path = dir.join(format!("{name}.vtc"));
        let mut w = CacheWriter::create(&path, 40, 40, 10.0).unwrap();
        for f in 0..8u8 {
            let frame: Vec<u8> = (0..40 * 40)
                .flat_map(|p| {
                    let left = p % 40 < 20;
                    let lit = left == (class == 0);
                    let v = if lit { 200 } else { 40 } + (f * 3 + seed * 5) % 30;
                    [v, v / 2, 255 - v]
                })
                .collect();
            w.push(&frame).unwrap();
        }
        w.finish().unwrap();
        path
    }

    /// Two classes: 2 training videos each, 1 validation and 1 test video each.
    fn splits(dir: &Path) -> Splits {
        let mut videos = Vec::new();
        use crate::train::splits::SplitName;
        for (split, n) in [
            (SplitName::Train, 2),
            (SplitName::Val, 1),
            (SplitName::Test, 1),
        ] {
            for class in 0..2 {
                for i in 0..n {
                    let name = format!("{}-{class}-{i}", split.as_str());
                    videos.push(SplitVideo {
                        split: Some(split),
                        label: Some(["left", "right"][class].to_owned()),
                        cache: video(dir, &name, class, i as u8 + class as u8),
                        frames: 8,
                        hw: (40, 40),
                    });
                }
            }
        }
        Splits::new(videos).unwrap()
    }

    fn job(id: Uuid, attempt: i32, splits: Splits, checkpoint: Option<String>) -> Job {
        let hp: Hyperparameters = serde_json::from_value(json!({
            "epochs": 2, "batch_size": 2, "frames": 4, "crop": 32, "warmup_epochs": 0,
            "eval_clips": 1, "loader_threads": 1, "log_every_steps": 1, "lr": 0.05, "seed": 3
        }))
        .unwrap();
        hp.validate().unwrap();
        Job {
            id,
            attempt,
            base_model: "r3d_18".into(),
            hp,
            base: Base::Builtin(Arch::R3d18),
            prep: Arch::R3d18.preprocessing(),
            pretrained: None,
            splits,
            checkpoint,
        }
    }

    fn context(data_dir: &Path) -> Context {
        Context {
            data_dir: DataDir::new(data_dir),
            device: Device::Cpu,
            started: Instant::now(),
        }
    }

    #[test]
    fn an_attempt_trains_checkpoints_exports_and_resumes_to_the_same_epochs() {
        let data = tempfile::tempdir().unwrap();
        let ctx = context(data.path());
        let splits = splits(data.path());
        let id = Uuid::new_v4();
        let mut log = Memory::default();
        let outcome = run(&ctx, job(id, 1, splits.clone(), None), &mut log).unwrap();

        let Outcome::Succeeded(model) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(log.epochs.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
        // 4 training clips in batches of 2: 2 steps an epoch, each logged.
        assert_eq!(log.steps, [(1, 0), (2, 0), (3, 1), (4, 1)]);
        let ckpt = |e: u32| format!("jobs/{id}/checkpoints/attempt-1/epoch-{e:04}");
        assert_eq!(log.checkpoints, [ckpt(1), ckpt(2)]);
        assert!(data.path().join(ckpt(1)).join("state.json").exists());
        // What the checkpoints and the model take on disk is reported for the storage quota.
        let on_disk = |rel: &Path| crate::datadir::dir_bytes(&data.path().join(rel));
        assert_eq!(
            log.checkpoint_bytes,
            on_disk(Path::new(&format!("jobs/{id}/checkpoints")))
        );
        assert!(log.checkpoint_bytes > 0);
        assert_eq!(log.models.len(), 1);
        let (mid, path, classes) = &log.models[0];
        assert_eq!(log.model_bytes, on_disk(path));
        assert!(log.model_bytes > 0);
        assert_eq!(*mid, model);
        assert_eq!(classes, &["left", "right"]);
        assert_eq!(path, &Path::new("models").join(model.to_string()));
        let exported: Vec<_> = std::fs::read_dir(data.path().join(path))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!exported.is_empty());
        let kinds: Vec<&str> = log.events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(kinds, ["weights", "started", "epoch", "epoch", "test"]);

        // A second attempt from the checkpoint after epoch 1 trains the same epoch 2.
        let mut resumed = Memory::default();
        let outcome = run(&ctx, job(id, 2, splits, Some(ckpt(1))), &mut resumed).unwrap();
        assert!(matches!(outcome, Outcome::Succeeded(_)), "{outcome:?}");
        assert_eq!(
            resumed.events[1].1,
            "resumed from the checkpoint after epoch 1"
        );
        assert_eq!(resumed.epochs.len(), 1);
        // The second attempt wrote in its own folder, never over the first attempt's files.
        assert_eq!(
            resumed.checkpoints,
            [format!("jobs/{id}/checkpoints/attempt-2/epoch-0002")]
        );
        let (a, b) = (&log.epochs[1], &resumed.epochs[0]);
        assert_eq!(b.0, 2);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-5;
        assert!(close(a.1, b.1), "train loss {} vs resumed {}", a.1, b.1);
        assert!(close(a.2, b.2), "train accuracy {} vs resumed {}", a.2, b.2);
        assert!(
            close(a.3.loss, b.3.loss),
            "val loss {} vs {}",
            a.3.loss,
            b.3.loss
        );
        assert_eq!(a.3.confusion, b.3.confusion);
        assert_eq!(resumed.steps, [(3, 1), (4, 1)]);
    }

    #[test]
    fn checkpoints_over_pretrained_weights_leave_out_the_frozen_stages_and_resume_the_same() {
        let data = tempfile::tempdir().unwrap();
        let ctx = context(data.path());
        let splits = splits(data.path());
        // Installed weights: a seeded r3d_18 backbone (no head), as an import leaves them.
        tch::manual_seed(11);
        let base = VarStore::new(Device::Cpu);
        let _m = VideoClassifier::new(
            &base.root(),
            Arch::R3d18,
            400,
            &backbone::HeadSpec::default(),
            backbone::Freeze::Full,
        )
        .unwrap();
        let weights = data.path().join("r3d_18.safetensors");
        let named: Vec<(String, Tensor)> = base
            .variables()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("fc."))
            .collect();
        Tensor::write_safetensors(&named, &weights).unwrap();
        let id = Uuid::new_v4();
        let with_weights = |attempt, checkpoint| Job {
            pretrained: Some(Pretrained {
                path: weights.clone(),
                sha256: "ab".repeat(32),
            }),
            ..job(id, attempt, splits.clone(), checkpoint)
        };
        let mut log = Memory::default();
        let outcome = run(&ctx, with_weights(1, None), &mut log).unwrap();
        assert!(matches!(outcome, Outcome::Succeeded(_)), "{outcome:?}");
        // The default recipe trains layer4 and the head: only they are in a checkpoint.
        let first = data.path().join(&log.checkpoints[0]);
        let saved = Tensor::read_safetensors(first.join("model.safetensors")).unwrap();
        let prefixes: std::collections::BTreeSet<&str> = saved
            .iter()
            .map(|(n, _)| n.split('.').next().unwrap())
            .collect();
        assert_eq!(prefixes, ["fc", "layer4"].into());

        // Resumed after epoch 1: the frozen stages come from the weights again, and epoch 2
        // trains exactly as it did.
        let mut resumed = Memory::default();
        let ckpt = log.checkpoints[0].clone();
        let outcome = run(&ctx, with_weights(2, Some(ckpt)), &mut resumed).unwrap();
        assert!(matches!(outcome, Outcome::Succeeded(_)), "{outcome:?}");
        let (a, b) = (&log.epochs[1], &resumed.epochs[0]);
        assert_eq!((a.0, b.0), (2, 2));
        assert!(
            (a.1 - b.1).abs() < 1e-5,
            "train loss {} vs resumed {}",
            a.1,
            b.1
        );
        assert!((a.3.loss - b.3.loss).abs() < 1e-5);

        // A checkpoint that lacks a trainable variable is refused, not half loaded.
        let mut vs = VarStore::new(Device::Cpu);
        let _m = VideoClassifier::new(
            &vs.root(),
            Arch::R3d18,
            2,
            &backbone::HeadSpec::default(),
            backbone::Freeze::Full,
        )
        .unwrap();
        let err = checkpoint::load_weights(&first, &mut vs, |n| n.starts_with("stem."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lacks"), "{err}");
    }

    #[test]
    fn a_fenced_out_attempt_stops_at_its_checkpoint_and_records_no_model() {
        let data = tempfile::tempdir().unwrap();
        let ctx = context(data.path());
        let mut log = Memory {
            fence_at_checkpoint: true,
            ..Memory::default()
        };
        let outcome = run(
            &ctx,
            job(Uuid::new_v4(), 1, splits(data.path()), None),
            &mut log,
        );
        assert_eq!(outcome.unwrap(), Outcome::FencedOut);
        assert_eq!(log.epochs.len(), 1);
        assert_eq!(log.checkpoints.len(), 1);
        assert!(log.models.is_empty());
        assert!(!data.path().join("models").exists());
        // The checkpoint it could not record is not left behind.
        assert!(!data.path().join(&log.checkpoints[0]).exists());
    }
}
