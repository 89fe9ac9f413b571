//! Serving: trained models kept loaded (LRU under a memory budget), each on its own inference
//! thread (tch tensors are not `Sync`), with dynamic batching of concurrent requests and a
//! bounded queue that answers "overloaded" instead of growing.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tch::{Device, Kind, Tensor};
use uuid::Uuid;

use crate::backbone::VideoClassifier;

mod batch;
mod export;
mod meta;
mod predict;

pub use batch::{BatchRunner, batch_videos};
pub use export::{ExportError, ExportFormat, export_safetensors, export_torchscript};
pub use meta::{MetaError, ModelMeta, load_classifier, model_meta};
pub use predict::{
    Classification, Input, MAX_WINDOWS, PredictError, PredictOptions, Prediction, Ranked, Serving,
    TimelineOptions, Timings, Upload, Window, classify, plan_clips, plan_timeline, predict,
};

/// Serving limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most clips run in one forward pass.
    pub max_batch_clips: i64,
    /// How long the first request of a batch waits for company.
    pub max_delay: Duration,
    /// Requests waiting per model; beyond this the answer is 503.
    pub queue: usize,
    /// Time a request may wait for its answer.
    pub deadline: Duration,
    /// Parameter bytes of the models kept loaded.
    pub memory_budget: u64,
    /// Predictions per second per API key (burst: twice that); 0 disables the limit.
    pub rate_per_s: f64,
    /// Pixels one prediction may feed its model (clips and timeline windows × frames × crop
    /// height × width); beyond it the prediction is refused before any clip is read.
    pub max_input_pixels: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_batch_clips: 16,
            max_delay: Duration::from_millis(10),
            queue: 64,
            deadline: Duration::from_secs(60),
            memory_budget: 4 << 30,
            rate_per_s: 20.0,
            max_input_pixels: 100_000_000,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct Stats {
    pub predictions: AtomicU64,
    pub batches: AtomicU64,
    pub batched_requests: AtomicU64,
    pub clips: AtomicU64,
    pub rejected_overloaded: AtomicU64,
    pub rejected_rate_limited: AtomicU64,
    pub models_loaded: AtomicU64,
    pub models_evicted: AtomicU64,
    /// Clips per forward pass.
    pub batch_clips: crate::metrics::Histogram,
    /// Seconds from request to answer, predictions that succeeded.
    pub prediction_seconds: crate::metrics::Histogram,
}

impl Stats {
    /// The serving families of `/metrics`: predictions, forward passes, rejections, latency and
    /// batch sizes.
    pub fn render(&self, e: &mut crate::metrics::Exposition) {
        use std::sync::atomic::Ordering::Relaxed;
        e.counter(
            "vidtune_predictions_total",
            "Predictions answered.",
            self.predictions.load(Relaxed),
        )
        .counter(
            "vidtune_inference_batches_total",
            "Forward passes run by the inference threads.",
            self.batches.load(Relaxed),
        )
        .counter(
            "vidtune_inference_batched_requests_total",
            "Requests that shared a forward pass with another request.",
            self.batched_requests.load(Relaxed),
        )
        .counter(
            "vidtune_inference_clips_total",
            "Clips run through models.",
            self.clips.load(Relaxed),
        );
        let rejected = "vidtune_predictions_rejected_total";
        e.family(rejected, "counter", "Predictions refused.")
            .sample(
                rejected,
                "reason=\"overloaded\"",
                self.rejected_overloaded.load(Relaxed),
            )
            .sample(
                rejected,
                "reason=\"rate_limited\"",
                self.rejected_rate_limited.load(Relaxed),
            )
            .histogram(
                "vidtune_prediction_duration_seconds",
                "Time from request to answer of successful predictions.",
                &self.prediction_seconds,
            )
            .histogram(
                "vidtune_inference_batch_clips",
                "Clips per forward pass.",
                &self.batch_clips,
            );
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            predictions: AtomicU64::default(),
            batches: AtomicU64::default(),
            batched_requests: AtomicU64::default(),
            clips: AtomicU64::default(),
            rejected_overloaded: AtomicU64::default(),
            rejected_rate_limited: AtomicU64::default(),
            models_loaded: AtomicU64::default(),
            models_evicted: AtomicU64::default(),
            batch_clips: crate::metrics::Histogram::new(crate::metrics::BATCH_BUCKETS),
            prediction_seconds: crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS),
        }
    }
}

struct InferRequest {
    input: Tensor,
    reply: tokio::sync::oneshot::Sender<anyhow::Result<Tensor>>,
}

/// A loaded model: send clips, get class probabilities.
pub struct ModelHandle {
    pub meta: ModelMeta,
    tx: SyncSender<InferRequest>,
    bytes: u64,
}

/// Why a request was not run.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("the model's queue is full")]
    Overloaded,
    #[error("no answer within the deadline")]
    Deadline,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl ModelHandle {
    /// Class probabilities `[N, classes]` for the clips `input` (`[N, 3, T, H, W]`).
    pub async fn infer(
        &self,
        input: Tensor,
        deadline: Duration,
        stats: &Stats,
    ) -> Result<Tensor, InferError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        match self.tx.try_send(InferRequest { input, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                stats.rejected_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(InferError::Overloaded);
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(anyhow::anyhow!("the inference thread stopped").into());
            }
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(_)) => Err(anyhow::anyhow!("the inference thread dropped the request").into()),
            Err(_) => Err(InferError::Deadline),
        }
    }
}

/// Loaded models, least recently used evicted first when over the memory budget.
pub struct ModelCache {
    cfg: ServeConfig,
    device: Device,
    pub stats: Arc<Stats>,
    loaded: Mutex<HashMap<Uuid, (Arc<ModelHandle>, Instant)>>,
    /// Held while a model loads, so concurrent first requests load it once.
    loading: tokio::sync::Mutex<()>,
}

impl ModelCache {
    pub fn new(cfg: ServeConfig) -> Self {
        let device = if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        Self {
            cfg,
            device,
            stats: Arc::default(),
            loaded: Mutex::default(),
            loading: tokio::sync::Mutex::default(),
        }
    }

    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    /// Drop a model (deleted).
    pub fn evict(&self, id: Uuid) {
        self.loaded.lock().expect("cache lock").remove(&id);
    }

    fn cached(&self, id: Uuid) -> Option<Arc<ModelHandle>> {
        let mut loaded = self.loaded.lock().expect("cache lock");
        let (h, used) = loaded.get_mut(&id)?;
        *used = Instant::now();
        Some(h.clone())
    }

    /// The loaded model, loading it (on its own thread) if needed.
    pub async fn get(&self, meta: ModelMeta) -> anyhow::Result<Arc<ModelHandle>> {
        if let Some(h) = self.cached(meta.id) {
            return Ok(h);
        }
        let _loading = self.loading.lock().await;
        if let Some(h) = self.cached(meta.id) {
            return Ok(h); // loaded by a request that got here first
        }
        let handle =
            Arc::new(spawn_model(meta, self.device, self.cfg.clone(), self.stats.clone()).await?);
        let mut loaded = self.loaded.lock().expect("cache lock");
        loaded.insert(handle.meta.id, (handle.clone(), Instant::now()));
        self.stats.models_loaded.fetch_add(1, Ordering::Relaxed);
        // Evict the least recently used until the rest fit (the new one always stays).
        while loaded.values().map(|(h, _)| h.bytes).sum::<u64>() > self.cfg.memory_budget
            && loaded.len() > 1
        {
            let oldest = loaded
                .iter()
                .filter(|(id, _)| **id != handle.meta.id)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    loaded.remove(&id);
                    self.stats.models_evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        Ok(handle)
    }

    pub fn loaded_count(&self) -> usize {
        self.loaded.lock().expect("cache lock").len()
    }
}

/// Start the inference thread of a model and wait until its weights are loaded.
async fn spawn_model(
    meta: ModelMeta,
    device: Device,
    cfg: ServeConfig,
    stats: Arc<Stats>,
) -> anyhow::Result<ModelHandle> {
    let (tx, rx) = sync_channel::<InferRequest>(cfg.queue);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<u64>>();
    let thread_meta = meta.clone();
    std::thread::Builder::new()
        .name(format!("infer-{}", &meta.id.to_string()[..8]))
        .spawn(move || match load_classifier(&thread_meta, device) {
            Ok((mut vs, model)) => {
                vs.freeze();
                let bytes = vs
                    .variables()
                    .values()
                    .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                    .sum();
                let _ = ready_tx.send(Ok(bytes));
                serve_loop(&model, &rx, device, &cfg, &stats);
                drop(vs);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .context("starting an inference thread")?;
    let bytes = ready_rx
        .await
        .context("the inference thread died while loading")??;
    Ok(ModelHandle { meta, tx, bytes })
}

/// Collect requests for up to `max_delay` (or `max_batch_clips` clips), run them as one batch,
/// and answer each with its rows.
fn serve_loop(
    model: &VideoClassifier,
    rx: &Receiver<InferRequest>,
    device: Device,
    cfg: &ServeConfig,
    stats: &Stats,
) {
    let _guard = tch::no_grad_guard();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut clips = batch[0].input.size()[0];
        let until = Instant::now() + cfg.max_delay;
        while clips < cfg.max_batch_clips {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(r) => {
                    clips += r.input.size()[0];
                    batch.push(r);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let sizes: Vec<i64> = batch.iter().map(|r| r.input.size()[0]).collect();
        let inputs: Vec<Tensor> = batch.iter().map(|r| r.input.shallow_clone()).collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let x = Tensor::cat(&inputs, 0).to_device(device);
            model
                .try_forward_t(&x, false)
                .map(|logits| logits.softmax(-1, Kind::Float).to_device(Device::Cpu))
        }));
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.clips.fetch_add(clips as u64, Ordering::Relaxed);
        stats.batch_clips.observe(clips as f64);
        if batch.len() > 1 {
            stats
                .batched_requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(probs)) => {
                let parts = probs.split_with_sizes(&sizes, 0);
                for (r, p) in batch.into_iter().zip(parts) {
                    let _ = r.reply.send(Ok(p));
                }
            }
            // A sandboxed backbone that failed (timed out, crashed, refused by the sandbox).
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "custom backbone failed");
                for r in batch {
                    let _ = r
                        .reply
                        .send(Err(anyhow::anyhow!("the model's custom backbone failed")));
                }
            }
            Err(_) => {
                for r in batch {
                    let _ = r.reply.send(Err(anyhow::anyhow!("inference failed")));
                }
            }
        }
    }
}

/// A per-key token bucket.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<Uuid, (f64, Instant)>>,
}

impl RateLimiter {
    /// `Ok` if the key may make a request now, else the seconds to wait.
    pub fn check(&self, key: Uuid, rate: f64) -> Result<(), f64> {
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = (rate * 2.0).max(1.0);
        let mut b = self.buckets.lock().expect("limiter lock");
        let now = Instant::now();
        let (tokens, last) = b.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - *tokens) / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_allow_a_burst_then_one_request_per_interval() {
        let limiter = RateLimiter::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        // 2 per second: a burst of 4, then refused with the wait in seconds.
        for _ in 0..4 {
            assert!(limiter.check(a, 2.0).is_ok());
        }
        let wait = limiter.check(a, 2.0).unwrap_err();
        assert!(wait > 0.0 && wait <= 0.5, "{wait}");
        // Keys are limited separately, and 0 means unlimited.
        assert!(limiter.check(b, 2.0).is_ok());
        for _ in 0..100 {
            assert!(limiter.check(a, 0.0).is_ok());
        }
    }
}
