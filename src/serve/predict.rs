//! One prediction: an uploaded video decoded in a media worker, cut into the clips the model
//! was evaluated with (multi-clip averaging must match evaluation) plus one clip per timeline
//! window, run through the model in pieces, and ranked.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tch::{Device, Tensor};
use uuid::Uuid;

use super::{InferError, ModelCache, ModelHandle, ModelMeta};
use crate::backbone::Preprocessing;
use crate::datadir::PartialFile;
use crate::media::cache::CacheReader;
use crate::media::decode::{Limits, Rejection};
use crate::media::worker::{Job, MediaPool};
use crate::train::data::{self, ClipSpec, Plan, RawClip};

/// Most timeline windows in one answer; a tiny stride over a long video stops here.
pub const MAX_WINDOWS: usize = 10_000;

/// What a prediction runs on, passed in by the caller (serving sits below the HTTP layer).
#[derive(Clone, Copy)]
pub struct Serving<'a> {
    pub models: &'a ModelCache,
    /// Decoders for uploads: FFmpeg runs in these children, never in the server.
    pub media: &'a MediaPool,
    pub video_limits: &'a Limits,
}

/// A caller's choices, already validated.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    /// Clips averaged for the whole-video answer.
    pub clips: u32,
    /// Classes in the answer, best first.
    pub top_k: usize,
    /// Per-window predictions, when asked for.
    pub timeline: Option<TimelineOptions>,
}

/// Timeline windows in seconds: windows of `window_s`, one every `stride_s`.
#[derive(Debug, Clone, Copy)]
pub struct TimelineOptions {
    pub window_s: f64,
    pub stride_s: f64,
}

/// The uploaded video, whole on disk.
#[derive(Debug, Clone)]
pub struct Upload {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

// The answer types below list their fields alphabetically: that is the order the API has
// always sent its keys in.

/// A model's answer for one video.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub clips: u32,
    pub input: Input,
    pub model_id: Uuid,
    /// The `top_k` classes, most probable first.
    pub predictions: Vec<Ranked>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<Window>>,
    pub timings_ms: Timings,
}

/// The video as received and decoded.
#[derive(Debug, Clone, Serialize)]
pub struct Input {
    pub bytes: u64,
    pub duration_s: f64,
    pub frames: u64,
    pub height: u32,
    pub sha256: String,
    pub width: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ranked {
    pub label: String,
    pub probability: f64,
}

/// Milliseconds since the request arrived: receiving, decoding, inference, and in all.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub decode: f64,
    pub inference: f64,
    pub total: f64,
    pub upload: f64,
}

/// One timeline window's prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub end_s: f64,
    pub label: String,
    pub probabilities: BTreeMap<String, f64>,
    pub start_s: f64,
}

/// Why a prediction has no answer.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("the model's queue is full")]
    Overloaded,
    #[error("the prediction did not run within the deadline")]
    Deadline,
    /// The media worker did not accept the video (or could not run: see
    /// [`Rejection::is_server_fault`]).
    #[error("the video was rejected: {}", .0.code)]
    Rejected(Rejection),
    /// The clips asked for would feed the model more than one request may (see
    /// [`input_pixels`]).
    #[error("the prediction needs {needed} input pixels ({clips} clips); the budget is {budget}")]
    BudgetExceeded {
        clips: usize,
        needed: u64,
        budget: u64,
    },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<InferError> for PredictError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Overloaded => Self::Overloaded,
            InferError::Deadline => Self::Deadline,
            InferError::Failed(e) => Self::Internal(e),
        }
    }
}

/// Predict `video` with the model `meta`. `started` is when the request arrived: the timings
/// count from there, so `upload` is the time until this call.
pub async fn predict(
    serving: Serving<'_>,
    meta: &ModelMeta,
    video: &Upload,
    opts: &PredictOptions,
    started: Instant,
) -> Result<Prediction, PredictError> {
    let t_upload = started.elapsed();
    // Decoded frames at the training rate, in a media-worker child.
    let cache = video.path.with_extension("vtc");
    // The decoded copy goes however the prediction ends (also when the request is dropped).
    let _cache_guard = PartialFile::new(cache.clone());
    let job = Job {
        src: video.path.clone(),
        cache: cache.clone(),
        spec: meta.decode.clone(),
        limits: serving.video_limits.clone(),
        // A prediction records no DICOM identity: nothing keyed is needed.
        dicom: Default::default(),
    };
    let decode_deadline = Duration::from_secs_f64(serving.video_limits.max_decode_s + 30.0);
    let info = serving
        .media
        .run(&job, decode_deadline)
        .await
        .map_err(PredictError::Rejected)?;
    let t_decode = started.elapsed() - t_upload;

    let spec = clip_spec(meta);
    let (total, fps) = (info.cache_frames, info.cache_fps);
    let hw = (info.cache_height as i64, info.cache_width as i64);
    // The whole video's clips first, then one clip per timeline window.
    let mut plans = plan_clips(total, hw, &spec, opts.clips);
    let mut windows = Vec::new();
    if let Some(t) = opts.timeline {
        let (bounds, window_plans) = plan_timeline(total, fps, hw, &spec, t);
        windows = bounds;
        plans.extend(window_plans);
    }
    // Refused before the model is loaded or a clip read: the work is known from the plan.
    let needed = input_pixels(plans.len(), &spec);
    let budget = serving.models.config().max_input_pixels;
    if needed > budget {
        return Err(PredictError::BudgetExceeded {
            clips: plans.len(),
            needed,
            budget,
        });
    }
    let handle = serving.models.get(meta.clone()).await?;

    let t_infer_start = started.elapsed();
    let rows = infer_plans(serving.models, &handle, &cache, plans, spec).await?;
    let t_infer = started.elapsed() - t_infer_start;

    let (whole, per_window) = rows.split_at(opts.clips as usize);
    let predictions = rank(&meta.classes, &mean_probs(whole), opts.top_k);
    let timeline = opts.timeline.map(|_| {
        windows
            .iter()
            .zip(per_window)
            .map(|(&(start_s, end_s), row)| window(&meta.classes, start_s, end_s, row))
            .collect()
    });
    let stats = &serving.models.stats;
    stats.predictions.fetch_add(1, Ordering::Relaxed);
    stats
        .prediction_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Prediction {
        clips: opts.clips,
        input: Input {
            bytes: video.bytes,
            duration_s: info.duration_s,
            frames: info.frames,
            height: info.height,
            sha256: video.sha256.clone(),
            width: info.width,
        },
        model_id: meta.id,
        predictions,
        timeline,
        timings_ms: Timings {
            decode: ms(t_decode),
            inference: ms(t_infer),
            total: ms(started.elapsed()),
            upload: ms(t_upload),
        },
    })
}

/// A whole-video answer with every class's probability.
#[derive(Debug, Clone)]
pub struct Classification {
    /// The most probable class.
    pub label: String,
    pub probability: f64,
    /// Class name → probability.
    pub probabilities: BTreeMap<String, f64>,
}

/// Classify a video already decoded into a training cache (`frames` frames of `hw`), averaging
/// `clips` clips: the whole-video answer of [`predict`] without the upload, for batch
/// predictions over a dataset.
pub async fn classify(
    models: &ModelCache,
    handle: &ModelHandle,
    cache: &Path,
    frames: u32,
    hw: (i64, i64),
    clips: u32,
) -> Result<Classification, PredictError> {
    let meta = &handle.meta;
    let spec = clip_spec(meta);
    let plans = plan_clips(frames, hw, &spec, clips);
    let p = mean_probs(&infer_plans(models, handle, cache, plans, spec).await?);
    let best = best(&p);
    Ok(Classification {
        label: meta.classes[best].clone(),
        probability: p[best],
        probabilities: meta.classes.iter().cloned().zip(p).collect(),
    })
}

/// `clips` evaluation clips spread over a video of `total` frames of `hw`, as in evaluation.
pub fn plan_clips(total: u32, hw: (i64, i64), spec: &ClipSpec, clips: u32) -> Vec<Plan> {
    (0..clips)
        .map(|c| data::eval_plan(0, total, spec, hw, c, clips))
        .collect()
}

/// Timeline windows over a video of `total` frames at `fps`: one clip per window, windows
/// starting every `stride_s` from 0 until one reaches the end (the last is cut at the end), at
/// most [`MAX_WINDOWS`]. Returns each window's bounds in seconds and its clip.
pub fn plan_timeline(
    total: u32,
    fps: f64,
    hw: (i64, i64),
    spec: &ClipSpec,
    t: TimelineOptions,
) -> (Vec<(f64, f64)>, Vec<Plan>) {
    let fps = fps.max(1e-6);
    let duration = total as f64 / fps;
    let (mut bounds, mut plans) = (Vec::new(), Vec::new());
    let mut start = 0.0;
    loop {
        let end = (start + t.window_s).min(duration);
        let first = (start * fps).floor() as u32;
        let last = ((end * fps).ceil() as u32).clamp(first + 1, total);
        let mut p = data::eval_plan(0, last - first, spec, hw, 0, 1);
        for i in &mut p.indices {
            *i += first;
        }
        bounds.push((start, end));
        plans.push(p);
        if end >= duration || bounds.len() >= MAX_WINDOWS {
            break;
        }
        start += t.stride_s;
    }
    (bounds, plans)
}

/// How clips are cut for a model: as in its evaluation (the frame stride as in training).
fn clip_spec(meta: &ModelMeta) -> ClipSpec {
    ClipSpec::new(&meta.preprocessing, meta.frame_stride)
}

/// Read the clips `plans` from a decoded video and preprocess them, on a blocking thread:
/// `[N, 3, T, H, W]` on the CPU.
async fn read_clips(
    cache: PathBuf,
    plans: Vec<Plan>,
    spec: ClipSpec,
    prep: Preprocessing,
) -> anyhow::Result<Tensor> {
    tokio::task::spawn_blocking(move || {
        let mut reader = CacheReader::open(&cache)?;
        let (h, w) = (reader.header.height as i64, reader.header.width as i64);
        let raw: Vec<RawClip> = plans
            .iter()
            .map(|p| {
                let mut data = Vec::new();
                reader.read_frames(&p.indices, &mut data)?;
                Ok(RawClip {
                    data,
                    frames: p.indices.len() as i64,
                    height: h,
                    width: w,
                    pinned: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(data::to_batch(&raw, &plans, &spec, &prep, Device::Cpu))
    })
    .await?
}

/// Pixels `clips` clips of `spec` feed a model (frames × crop²): the measure of a prediction's
/// work and of its input's memory (12 bytes a pixel as three `f32` channels).
pub fn input_pixels(clips: usize, spec: &ClipSpec) -> u64 {
    let crop = spec.crop.max(1) as u64;
    (clips as u64)
        .saturating_mul(spec.frames.max(1) as u64)
        .saturating_mul(crop * crop)
}

/// Class probabilities, one row per clip of `plans`, read from the decoded video `cache`. The
/// clips are read, preprocessed and run through the model a model-sized chunk at a time (the
/// next chunk read while the model runs this one), so a long timeline holds two chunks of input
/// in memory, not the whole video's, and other requests can be batched in between.
async fn infer_plans(
    models: &ModelCache,
    handle: &ModelHandle,
    cache: &Path,
    plans: Vec<Plan>,
    spec: ClipSpec,
) -> Result<Vec<Vec<f32>>, PredictError> {
    let cfg = models.config();
    let prep = &handle.meta.preprocessing;
    let read = |part: Option<&[Plan]>| {
        let job = part.map(|p| (cache.to_owned(), p.to_vec(), spec.clone(), prep.clone()));
        async move {
            match job {
                Some((cache, plans, spec, prep)) => {
                    read_clips(cache, plans, spec, prep).await.map(Some)
                }
                None => Ok(None),
            }
        }
    };
    let mut chunks = plans.chunks(cfg.max_batch_clips.max(1) as usize);
    let mut rows = Vec::with_capacity(plans.len());
    let mut input = read(chunks.next()).await?;
    while let Some(current) = input {
        let (probs, next) = tokio::join!(
            handle.infer(current, cfg.deadline, &models.stats),
            read(chunks.next())
        );
        rows.extend(Vec::<Vec<f32>>::try_from(&probs?).map_err(anyhow::Error::from)?);
        input = next?;
    }
    Ok(rows)
}

/// Average class probabilities of `[N, classes]` rows.
fn mean_probs(rows: &[Vec<f32>]) -> Vec<f64> {
    let k = rows.first().map_or(0, Vec::len);
    let mut out = vec![0f64; k];
    for row in rows {
        for (a, v) in out.iter_mut().zip(row) {
            *a += *v as f64 / rows.len() as f64;
        }
    }
    out
}

/// The `top_k` most probable classes, best first (ties: the earlier class).
fn rank(classes: &[String], p: &[f64], top_k: usize) -> Vec<Ranked> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.into_iter()
        .take(top_k)
        .map(|i| Ranked {
            label: classes[i].clone(),
            probability: p[i],
        })
        .collect()
}

/// The most probable class's index (ties: the later class).
fn best(p: &[f64]) -> usize {
    (0..p.len())
        .max_by(|&a, &b| p[a].total_cmp(&p[b]))
        .unwrap_or(0)
}

fn window(classes: &[String], start_s: f64, end_s: f64, row: &[f32]) -> Window {
    let p: Vec<f64> = row.iter().map(|v| *v as f64).collect();
    Window {
        end_s,
        label: classes[best(&p)].clone(),
        probabilities: classes.iter().cloned().zip(p).collect(),
        start_s,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::Sampling;

    fn spec() -> ClipSpec {
        ClipSpec {
            frames: 4,
            stride: 2,
            sampling: Sampling::Consecutive,
            short_side: 64,
            crop: 56,
            crop_scale: [1.0, 1.0],
            flip: false,
        }
    }

    const HW: (i64, i64) = (64, 85);

    #[test]
    fn timeline_windows_cover_the_video_one_stride_apart_each_clip_inside_its_window() {
        let (total, fps) = (75, 15.0);
        let duration = total as f64 / fps;
        let t = TimelineOptions {
            window_s: 1.0,
            stride_s: 0.4,
        };
        let (bounds, plans) = plan_timeline(total, fps, HW, &spec(), t);
        assert_eq!(bounds.len(), plans.len());
        let expected = ((duration - t.window_s) / t.stride_s).ceil() as usize + 1;
        assert_eq!(bounds.len(), expected, "{bounds:?}");
        assert_eq!(bounds[0].0, 0.0);
        assert!(
            (bounds.last().unwrap().1 - duration).abs() < 1e-9,
            "{bounds:?}"
        );
        for w in bounds.windows(2) {
            assert!((w[1].0 - w[0].0 - t.stride_s).abs() < 1e-9, "stride: {w:?}");
            assert!(w[1].0 <= w[0].1, "no gap: {w:?}");
        }
        for (&(start, end), p) in bounds.iter().zip(&plans) {
            assert!(end - start <= t.window_s + 1e-9);
            assert_eq!(p.indices.len(), 4);
            let (first, last) = ((start * fps).floor() as u32, (end * fps).ceil() as u32);
            assert!(
                p.indices.iter().all(|&i| i >= first && i < last.min(total)),
                "clip {:?} outside window {start}..{end} s",
                p.indices
            );
        }
        // Windows later in the video take later frames.
        assert!(plans.last().unwrap().indices[0] > plans[0].indices[0]);
    }

    #[test]
    fn a_window_longer_than_the_video_is_one_window_over_all_of_it() {
        let t = TimelineOptions {
            window_s: 10.0,
            stride_s: 5.0,
        };
        let (bounds, plans) = plan_timeline(30, 15.0, HW, &spec(), t);
        assert_eq!(bounds, [(0.0, 2.0)]);
        assert!(plans[0].indices.iter().all(|&i| i < 30));
    }

    #[test]
    fn timeline_windows_are_capped() {
        // An hour at 15 fps with 0.1 s steps would be 36,000 windows.
        let t = TimelineOptions {
            window_s: 0.1,
            stride_s: 0.1,
        };
        let total = 3600 * 15;
        let (bounds, plans) = plan_timeline(total, 15.0, HW, &spec(), t);
        assert_eq!(bounds.len(), MAX_WINDOWS);
        assert_eq!(plans.len(), MAX_WINDOWS);
        assert!(bounds.last().unwrap().1 < total as f64 / 15.0);
    }

    #[test]
    fn whole_video_clips_spread_from_start_to_end() {
        let total = 90;
        let plans = plan_clips(total, HW, &spec(), 3);
        assert_eq!(plans.len(), 3);
        let starts: Vec<u32> = plans.iter().map(|p| p.indices[0]).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
        assert_eq!(starts[0], 0);
        assert_eq!(*plans[2].indices.last().unwrap(), total - 1);
        for p in &plans {
            assert!(
                p.indices.windows(2).all(|w| w[1] - w[0] == 2),
                "frame stride"
            );
        }
    }
}
