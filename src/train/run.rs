//! The training loop of one job attempt, run in a `vidtune train-job` child process.
//!
//! Reproducibility: each epoch seeds libtorch and the clip planner from (seed, epoch), and every
//! random choice about data (order, clip position, crop, flip) is made on this thread, so a job
//! resumed from the checkpoint of epoch k produces the same epochs k+1… as an uninterrupted
//! run. Every database write names the attempt and is ignored if the attempt is stale.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use uuid::Uuid;

use super::data::{self, ClipSpec, Item, Loader, Plan};
use super::hyper::{Hyperparameters, Imbalance, Precision};
use super::metrics::{self, Metrics};
use super::optim::{Group, Optimizer};
use crate::backbone::{self, Arch, Base, Preprocessing, VideoClassifier, amp, export};
use crate::db;

/// How an attempt ended, short of an error.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Succeeded(Uuid),
    Canceled,
    /// The job was reclaimed by another attempt; this one stops without writing.
    FencedOut,
}

/// Errors are classified: the user's fault fails the job at once, the machine's is retried.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    User(String),
    #[error(transparent)]
    System(#[from] anyhow::Error),
}

impl From<sqlx::Error> for TrainError {
    fn from(e: sqlx::Error) -> Self {
        Self::System(e.into())
    }
}

fn user(msg: impl Into<String>) -> TrainError {
    TrainError::User(msg.into())
}

/// Tell the supervising worker that this attempt is alive: one line on stdout per batch. The
/// worker kills a child that stays silent past its stall timeout (a hang keeps no lease).
pub fn alive() {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"alive\n");
    let _ = out.flush();
}

/// What the attempt runs with.
pub struct Context {
    pub db: PgPool,
    pub rt: tokio::runtime::Runtime,
    pub job_id: Uuid,
    pub attempt: i32,
    pub data_dir: PathBuf,
    pub device: Device,
}

impl Context {
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn event(
        &self,
        kind: &str,
        level: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<(), TrainError> {
        self.block(db::jobs::event(
            &self.db,
            self.job_id,
            self.attempt,
            kind,
            level,
            message,
            data,
        ))?;
        Ok(())
    }
}

/// Loop state saved with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    /// Epochs completed.
    epochs_done: u32,
    step: i64,
    optimizer_step: i64,
    best_epoch: Option<u32>,
    best_value: Option<f64>,
    /// Early stopping: the best value of its metric and the epochs since it improved.
    es_best: Option<f64>,
    es_bad: u32,
}

/// Whether `new` improves on `old` for a selection metric (lower is better only for `loss`).
pub fn better(metric: &str, new: f64, old: Option<f64>) -> bool {
    match old {
        None => true,
        Some(old) if metric == "loss" => new < old,
        Some(old) => new > old,
    }
}

/// The dataset split into train / val / test items, and the class names.
struct Splits {
    classes: Vec<String>,
    train: Split,
    val: Split,
    test: Split,
}

/// The videos of one split and their cached frame sizes.
#[derive(Default, Clone)]
struct Split {
    items: Vec<Item>,
    hw: Vec<(i64, i64)>,
}

fn load_splits(ctx: &Context, dataset_id: Uuid) -> Result<(Splits, Option<String>), TrainError> {
    let videos = ctx.block(db::datasets::dataset_videos(&ctx.db, dataset_id))?;
    let hash: Option<(Option<String>,)> = ctx.block(
        sqlx::query_as("select content_hash from datasets where id = $1")
            .bind(dataset_id)
            .fetch_optional(&ctx.db),
    )?;
    let accepted: Vec<_> = videos.iter().filter(|v| v.status == "accepted").collect();
    let classes: Vec<String> = accepted
        .iter()
        .filter(|v| v.split.as_deref() == Some("train"))
        .filter_map(|v| v.label.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if classes.len() < 2 {
        return Err(user(format!(
            "the training split has {} class(es); at least 2 are needed",
            classes.len()
        )));
    }
    let dirs = crate::ingest::DatasetDirs::new(&ctx.data_dir, dataset_id);
    let mut s = Splits {
        classes,
        train: Split::default(),
        val: Split::default(),
        test: Split::default(),
    };
    for v in accepted {
        let Some(label) = v
            .label
            .as_ref()
            .and_then(|l| s.classes.iter().position(|c| c == l))
        else {
            continue;
        };
        let item = Item {
            cache: dirs.cache_file(v.id),
            frames: v.cache_frames.unwrap_or(0).max(1) as u32,
            label,
        };
        let hw = (
            v.cache_height.unwrap_or(128) as i64,
            v.cache_width.unwrap_or(171) as i64,
        );
        let list = match v.split.as_deref() {
            Some("train") => &mut s.train,
            Some("val") => &mut s.val,
            Some("test") => &mut s.test,
            _ => continue,
        };
        list.items.push(item);
        list.hw.push(hw);
    }
    if s.val.items.is_empty() {
        return Err(user(
            "the dataset has no validation videos (give the val split a share)",
        ));
    }
    Ok((s, hash.and_then(|h| h.0)))
}

/// Run one attempt of a job to its end.
pub fn run(ctx: &Context) -> Result<Outcome, TrainError> {
    let started = Instant::now();
    let job = ctx
        .block(db::jobs::get_any(&ctx.db, ctx.job_id))?
        .context("the job no longer exists")?;
    let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())
        .map_err(|e| user(format!("invalid hyperparameters: {e}")))?;
    let (splits, dataset_hash) = load_splits(ctx, job.dataset_id)?;
    let classes = splits.classes.clone();

    // Base model and its input spec.
    let (base, mut prep, weights_sha) = match Arch::parse(&job.base_model) {
        Some(arch) => {
            let installed = ctx.block(db::base_models::latest_weights(&ctx.db))?;
            let w = installed.into_iter().find(|w| w.arch == arch.name());
            (Base::Builtin(arch), arch.preprocessing(), w)
        }
        None => {
            let b = ctx
                .block(db::base_models::get_custom_by_name(
                    &ctx.db,
                    job.tenant_id,
                    &job.base_model,
                ))?
                .ok_or_else(|| user(format!("base model `{}` no longer exists", job.base_model)))?;
            let prep: Preprocessing =
                serde_json::from_value(b.preprocessing.clone()).context("stored preprocessing")?;
            (
                Base::TorchScript {
                    path: ctx.data_dir.join(&b.path),
                    feature_dim: b.feature_dim as i64,
                },
                prep,
                None,
            )
        }
    };
    if let Some(f) = hp.frames {
        prep.frames = f as i64;
    }
    if let Some(c) = hp.crop {
        // Keep the base model's resize-to-crop ratio (128 → 112 for the video models).
        let scale = c as f64 / prep.crop as f64;
        prep.resize = prep.resize.map(|r| (r as f64 * scale).round() as i64);
        prep.crop = c as i64;
    }
    let spec = ClipSpec {
        frames: prep.frames as u32,
        stride: hp.frame_stride,
        sampling: prep.sampling,
        short_side: prep.resize[0].max(prep.crop),
        crop: prep.crop,
        crop_scale: hp.augmentation.crop_scale,
        flip: hp.augmentation.horizontal_flip,
    };

    tch::manual_seed(hp.seed as i64);
    let mut vs = VarStore::new(ctx.device);
    let model = VideoClassifier::new(
        &vs.root(),
        base.clone(),
        classes.len() as i64,
        &hp.head,
        hp.freeze,
    )
    .map_err(|e| user(format!("{e:#}")))?;
    match (&base, &weights_sha) {
        (Base::Builtin(arch), Some(w)) => {
            let tensors = Tensor::read_safetensors(ctx.data_dir.join(&w.path)).context("reading pretrained weights")?;
            backbone::load_into(&vs, &tensors)?;
            ctx.event("weights", "info", &format!("{} initialised from {} weights {}", arch.name(), arch.pretrained_on(), &w.sha256[..12]), json!({"sha256": w.sha256}))?;
        }
        (Base::Builtin(arch), None) => ctx.event(
            "weights",
            "warning",
            &format!("no pretrained weights are installed for {}; training from random initialisation (vidtune weights pull {})", arch.name(), arch.name()),
            json!({}),
        )?,
        _ => {}
    }
    let (backbone_params, head_params) = model.trainable_groups(&vs);
    let mut opt = Optimizer::new(
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
    );

    let ckpt_root = ctx
        .data_dir
        .join("jobs")
        .join(ctx.job_id.to_string())
        .join("checkpoints");
    let mut state = LoopState {
        epochs_done: 0,
        step: 0,
        optimizer_step: 0,
        best_epoch: None,
        best_value: None,
        es_best: None,
        es_bad: 0,
    };
    if let Some(path) = &job.checkpoint {
        let dir = ctx.data_dir.join(path);
        vs.load(dir.join("model.safetensors"))
            .context("loading the checkpoint's weights")?;
        let opt_state = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
            .context("loading optimizer state")?;
        let saved = std::fs::read(dir.join("state.json")).context("reading checkpoint state")?;
        state = serde_json::from_slice(&saved).context("checkpoint state")?;
        opt.load_state(state.optimizer_step, &opt_state);
        ctx.event(
            "resumed",
            "info",
            &format!(
                "resumed from the checkpoint after epoch {}",
                state.epochs_done
            ),
            json!({"epoch": state.epochs_done}),
        )?;
    }

    // Class weights for an imbalanced training set.
    let counts: Vec<f64> = (0..classes.len())
        .map(|c| splits.train.items.iter().filter(|i| i.label == c).count() as f64)
        .collect();
    let class_weights = (hp.class_imbalance == Imbalance::WeightedLoss).then(|| {
        let n = counts.iter().sum::<f64>();
        let w: Vec<f32> = counts
            .iter()
            .map(|&c| (n / (classes.len() as f64 * c.max(1.0))) as f32)
            .collect();
        Tensor::from_slice(&w).to_device(ctx.device)
    });

    let bf16 = hp.precision == Precision::Bf16;
    let train_items = Arc::new(splits.train.items.clone());
    let train_hw = &splits.train.hw;
    let batch = hp.batch_size as usize;
    let steps_per_epoch = train_items.len().div_ceil(batch);
    let mut last_poll = Instant::now();
    let mut epoch_times: Vec<f64> = Vec::new();

    for epoch in state.epochs_done..hp.epochs {
        let epoch_start = Instant::now();
        tch::manual_seed(
            (hp.seed as i64)
                .wrapping_mul(7919)
                .wrapping_add(epoch as i64),
        );
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(hp.seed.wrapping_mul(1_000_003) ^ (epoch as u64 + 1));
        let order: Vec<usize> = match hp.class_imbalance {
            Imbalance::BalancedSampler => {
                let by_class: Vec<Vec<usize>> = (0..classes.len())
                    .map(|c| {
                        (0..train_items.len())
                            .filter(|&i| train_items[i].label == c)
                            .collect()
                    })
                    .collect();
                let present: Vec<&Vec<usize>> = by_class.iter().filter(|v| !v.is_empty()).collect();
                (0..train_items.len())
                    .map(|_| {
                        let class = present[rand::RngExt::random_range(&mut rng, 0..present.len())];
                        class[rand::RngExt::random_range(&mut rng, 0..class.len())]
                    })
                    .collect()
            }
            _ => {
                let mut o: Vec<usize> = (0..train_items.len()).collect();
                o.shuffle(&mut rng);
                o
            }
        };
        let plans: Vec<Vec<Plan>> = order
            .chunks(batch)
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|&i| {
                        data::train_plan(&mut rng, i, train_items[i].frames, &spec, train_hw[i])
                    })
                    .collect()
            })
            .collect();
        let loader = Loader::start(
            train_items.clone(),
            plans.clone(),
            hp.loader_threads as usize,
            2,
        );

        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut wait = Duration::ZERO;
        let mut lr_now = 0.0;
        let mut waiting = Instant::now();
        for (b, raw) in loader.enumerate() {
            let raw =
                raw.map_err(|e| TrainError::System(e.context("reading the training cache")))?;
            wait += waiting.elapsed();
            let x = data::to_batch(&raw, &plans[b], &spec, &prep, ctx.device);
            let labels: Vec<i64> = plans[b]
                .iter()
                .map(|p| train_items[p.item].label as i64)
                .collect();
            let y = Tensor::from_slice(&labels).to_device(ctx.device);
            let (logits, loss) = {
                let _amp = bf16.then(|| amp::Autocast::enter(ctx.device));
                let logits = model
                    .try_forward_t(&x, true)
                    .map_err(|e| user(format!("the TorchScript backbone failed: {e:#}")))?;
                let loss =
                    classification_loss(&logits, &y, class_weights.as_ref(), hp.label_smoothing);
                (logits, loss)
            };
            (&loss / hp.grad_accumulation as f64).backward();
            model
                .finish_backward()
                .map_err(|e| user(format!("the TorchScript backbone failed: {e:#}")))?;
            let last = b + 1 == plans.len();
            if (b + 1) % hp.grad_accumulation as usize == 0 || last {
                if let Some(c) = hp.grad_clip {
                    opt.clip_grad_norm(c);
                }
                lr_now = hp.lr * hp.lr_factor(epoch as f64 + b as f64 / steps_per_epoch as f64);
                opt.step(lr_now)?;
                opt.zero_grad();
            }
            alive();
            let loss_v = loss.double_value(&[]);
            loss_sum += loss_v * labels.len() as f64;
            correct += i64::try_from(logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64))
                .unwrap_or(0) as usize;
            seen += labels.len();
            state.step += 1;
            if state.step % hp.log_every_steps as i64 == 0 {
                ctx.block(db::jobs::insert_step(
                    &ctx.db,
                    ctx.job_id,
                    ctx.attempt,
                    state.step,
                    epoch as i32,
                    loss_v,
                    lr_now,
                ))?;
            }
            if last_poll.elapsed() >= Duration::from_secs(1) || last {
                last_poll = Instant::now();
                let done = epoch as f64 + (b + 1) as f64 / plans.len() as f64;
                let per_epoch = epoch_times.last().copied().unwrap_or_else(|| {
                    epoch_start.elapsed().as_secs_f64() / ((b + 1) as f64 / plans.len() as f64)
                });
                let eta = per_epoch * (hp.epochs as f64 - done);
                match ctx.block(db::jobs::progress(
                    &ctx.db,
                    ctx.job_id,
                    ctx.attempt,
                    epoch as i32 + 1,
                    state.step,
                    done / hp.epochs as f64,
                    Some(eta),
                ))? {
                    None => return Ok(Outcome::FencedOut),
                    Some(true) => return Ok(Outcome::Canceled),
                    Some(false) => {}
                }
                if hp
                    .max_runtime_s
                    .is_some_and(|m| started.elapsed().as_secs() >= m)
                {
                    return Err(user(format!(
                        "stopped: max_runtime_s ({} s) reached",
                        hp.max_runtime_s.unwrap_or(0)
                    )));
                }
            }
            waiting = Instant::now();
        }
        state.optimizer_step = opt.step;

        let val = evaluate(
            &model,
            &splits.val,
            &spec,
            &prep,
            &classes,
            1,
            ctx.device,
            bf16,
        )?;
        let elapsed = epoch_start.elapsed().as_secs_f64();
        epoch_times.push(elapsed);
        let train_loss = loss_sum / seen.max(1) as f64;
        let train_acc = correct as f64 / seen.max(1) as f64;
        let inserted = ctx.block(db::jobs::insert_epoch(
            &ctx.db,
            ctx.job_id,
            ctx.attempt,
            epoch as i32 + 1,
            train_loss,
            train_acc,
            &serde_json::to_value(&val).expect("serialises"),
            lr_now,
            seen as f64 / elapsed,
            wait.as_secs_f64() / elapsed,
        ))?;
        ctx.event(
            "epoch",
            "info",
            &format!("epoch {}/{}: train loss {train_loss:.4}, val accuracy {:.3}, balanced {:.3}", epoch + 1, hp.epochs, val.accuracy, val.balanced_accuracy),
            json!({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val.loss, "val_accuracy": val.accuracy, "val_balanced_accuracy": val.balanced_accuracy, "val_macro_f1": val.macro_f1, "inserted": inserted}),
        )?;

        state.epochs_done = epoch + 1;
        let value = val.get(&hp.selection_metric).unwrap_or(val.accuracy);
        if better(&hp.selection_metric, value, state.best_value) {
            state.best_value = Some(value);
            state.best_epoch = Some(epoch + 1);
        }
        let mut stop = false;
        if let Some(es) = &hp.early_stopping {
            let v = val.get(&es.metric).unwrap_or(val.accuracy);
            if better(&es.metric, v, state.es_best) {
                state.es_best = Some(v);
                state.es_bad = 0;
            } else {
                state.es_bad += 1;
            }
            stop = state.es_bad >= es.patience;
        }
        let rel = save_checkpoint(ctx, &vs, &opt, &state, &ckpt_root)?;
        if !ctx.block(db::jobs::set_checkpoint(
            &ctx.db,
            ctx.job_id,
            ctx.attempt,
            &rel,
        ))? {
            return Ok(Outcome::FencedOut);
        }
        prune_checkpoints(&ckpt_root, hp.keep_checkpoints as usize, state.best_epoch);
        if stop {
            let es = hp
                .early_stopping
                .as_ref()
                .expect("stop implies early stopping");
            ctx.event(
                "early_stop",
                "info",
                &format!(
                    "no improvement of {} for {} epochs; stopping",
                    es.metric, es.patience
                ),
                json!({"epoch": epoch + 1}),
            )?;
            break;
        }
    }

    // The best epoch's weights, evaluated on the test split with multi-clip averaging.
    let best = state.best_epoch.unwrap_or(state.epochs_done);
    let best_dir = ckpt_root.join(format!("epoch-{best:04}"));
    if best != state.epochs_done && best_dir.exists() {
        vs.load(best_dir.join("model.safetensors"))
            .context("loading the best checkpoint")?;
    }
    let val = evaluate(
        &model,
        &splits.val,
        &spec,
        &prep,
        &classes,
        hp.eval_clips,
        ctx.device,
        bf16,
    )?;
    let test = if splits.test.items.is_empty() {
        ctx.event(
            "test",
            "warning",
            "the dataset has no test videos; the model has validation metrics only",
            json!({}),
        )?;
        None
    } else {
        let m = evaluate(
            &model,
            &splits.test,
            &spec,
            &prep,
            &classes,
            hp.eval_clips,
            ctx.device,
            bf16,
        )?;
        ctx.event("test", "info", &format!("test ({} clips per video): accuracy {:.3}, balanced {:.3}, macro-F1 {:.3}", hp.eval_clips, m.accuracy, m.balanced_accuracy, m.macro_f1), json!({"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "macro_f1": m.macro_f1}))?;
        Some(m)
    };

    // The model: files first, then the record and the final state in one fenced transaction.
    let model_id = Uuid::new_v4();
    let rel = Path::new("models").join(model_id.to_string());
    let meta = export::ExportMetadata::new(
        &job.base_model,
        classes.clone(),
        hp.head.clone(),
        prep.clone(),
        hp.eval_clips as i64,
    );
    export::write_safetensors(&vs, &meta, &ctx.data_dir.join(&rel))?;
    let committed = ctx.block(async {
        let mut tx = ctx.db.begin().await?;
        sqlx::query(
            "insert into models (id, tenant_id, job_id, dataset_id, dataset_hash, base_model,
                 base_weights_sha256, hyperparameters, classes, preprocessing, head, eval_clips,
                 val_metrics, test_metrics, vidtune_version, libtorch_version, path, decode)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                     (select cache_spec from datasets where id = $4))",
        )
        .bind(model_id)
        .bind(job.tenant_id)
        .bind(job.id)
        .bind(job.dataset_id)
        .bind(&dataset_hash)
        .bind(&job.base_model)
        .bind(weights_sha.as_ref().map(|w| w.sha256.clone()))
        .bind(&job.hyperparameters)
        .bind(&classes)
        .bind(serde_json::to_value(&prep).expect("serialises"))
        .bind(serde_json::to_value(&hp.head).expect("serialises"))
        .bind(hp.eval_clips as i32)
        .bind(serde_json::to_value(&val).expect("serialises"))
        .bind(
            test.as_ref()
                .map(|t| serde_json::to_value(t).expect("serialises")),
        )
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(env!("VIDTUNE_LIBTORCH_VERSION"))
        .bind(rel.to_string_lossy().as_ref())
        .execute(&mut *tx)
        .await?;
        if db::jobs::finish(
            &mut *tx,
            ctx.job_id,
            ctx.attempt,
            db::jobs::JobState::Succeeded,
            None,
            Some(model_id),
        )
        .await?
        {
            tx.commit().await?;
            Ok::<bool, sqlx::Error>(true)
        } else {
            Ok(false)
        }
    })?;
    if !committed {
        let _ = std::fs::remove_dir_all(ctx.data_dir.join(&rel));
        return Ok(Outcome::FencedOut);
    }
    Ok(Outcome::Succeeded(model_id))
}

/// Cross-entropy with optional class weights and label smoothing, averaged over the batch.
fn classification_loss(
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

/// Evaluate with `clips` clips per video, softmax averaged per video.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &VideoClassifier,
    split: &Split,
    spec: &ClipSpec,
    prep: &Preprocessing,
    classes: &[String],
    clips: u32,
    device: Device,
    bf16: bool,
) -> anyhow::Result<Metrics> {
    let _guard = tch::no_grad_guard();
    let hw = &split.hw;
    let items = Arc::new(split.items.clone());
    let plans: Vec<Plan> = (0..items.len())
        .flat_map(|i| (0..clips).map(move |c| (i, c)))
        .map(|(i, c)| data::eval_plan(i, items[i].frames, spec, hw[i], c, clips))
        .collect();
    let batches: Vec<Vec<Plan>> = plans.chunks(8).map(<[Plan]>::to_vec).collect();
    let loader = Loader::start(items.clone(), batches.clone(), 2, 2);
    let mut probs = vec![vec![0.0f64; classes.len()]; items.len()];
    let mut loss_sum = 0.0;
    for (b, raw) in loader.enumerate() {
        let raw = raw?;
        let x = data::to_batch(&raw, &batches[b], spec, prep, device);
        let logits = {
            let _amp = bf16.then(|| amp::Autocast::enter(device));
            model.try_forward_t(&x, false)?.to_kind(Kind::Float)
        };
        alive();
        let y = Tensor::from_slice(
            &batches[b]
                .iter()
                .map(|p| items[p.item].label as i64)
                .collect::<Vec<_>>(),
        )
        .to_device(device);
        loss_sum +=
            classification_loss(&logits, &y, None, 0.0).double_value(&[]) * batches[b].len() as f64;
        let p = logits.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(p)?;
        for (plan, row) in batches[b].iter().zip(rows) {
            for (acc, v) in probs[plan.item].iter_mut().zip(row) {
                *acc += v as f64 / clips as f64;
            }
        }
    }
    let truth: Vec<usize> = items.iter().map(|i| i.label).collect();
    Ok(metrics::compute(
        classes,
        &probs,
        &truth,
        loss_sum / plans.len().max(1) as f64,
    ))
}

fn save_checkpoint(
    ctx: &Context,
    vs: &VarStore,
    opt: &Optimizer,
    state: &LoopState,
    root: &Path,
) -> anyhow::Result<String> {
    let name = format!("epoch-{:04}", state.epochs_done);
    let dir = root.join(&name);
    let part = root.join(format!("{name}.part-{}", ctx.attempt));
    let _ = std::fs::remove_dir_all(&part);
    std::fs::create_dir_all(&part)?;
    vs.save(part.join("model.safetensors"))
        .context("saving weights")?;
    let opt_state = opt.state_tensors();
    let named: Vec<(&str, &Tensor)> = opt_state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if named.is_empty() {
        let empty = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("opt.none", &empty)], part.join("optimizer.safetensors"))?;
    } else {
        Tensor::write_safetensors(&named, part.join("optimizer.safetensors"))?;
    }
    std::fs::write(part.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&part, &dir)?;
    Ok(dir
        .strip_prefix(&ctx.data_dir)
        .unwrap_or(&dir)
        .to_string_lossy()
        .into_owned())
}

/// Keep the newest `keep` checkpoints and the best one.
fn prune_checkpoints(root: &Path, keep: usize, best: Option<u32>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut epochs: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("epoch-")?.parse::<u32>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    epochs.sort();
    let cut = epochs.len().saturating_sub(keep);
    for (n, path) in &epochs[..cut] {
        if Some(*n) != best {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}
