//! Fine-tuning hyperparameters: every field has a default from the torchvision / MMAction2
//! video recipes, unknown fields are refused, and [`Hyperparameters::validate`] names the field
//! at fault.
use serde::{Deserialize, Serialize};

pub use crate::evaluation::Metric;

use crate::backbone::{Freeze, HeadSpec, Preprocessing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Cosine,
    Step,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 where the device runs it natively ([`crate::device::bf16_support`]), else fp32.
    Auto,
    Fp32,
    Bf16,
}

impl Precision {
    /// Whether a job with this setting computes in bf16 on `device`, and why (for its log).
    pub fn bf16_on(self, device: crate::device::Device) -> (bool, String) {
        match self {
            Precision::Fp32 => (false, "precision fp32 was asked for".into()),
            Precision::Bf16 => (true, "precision bf16 was asked for".into()),
            Precision::Auto => {
                let s = crate::device::bf16_support(device);
                let how = if s.native { "bf16" } else { "fp32" };
                (s.native, format!("precision auto: {how}, {}", s.why))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Imbalance {
    None,
    /// Cross-entropy weighted by inverse class frequency.
    WeightedLoss,
    /// Each batch drawn with equal class probability.
    BalancedSampler,
}

/// Spatial augmentation at training time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augmentation {
    /// Random crop scale range (fraction of the resized frame area); `[1, 1]` is a plain random crop.
    #[serde(default = "d_scale")]
    pub crop_scale: [f64; 2],
    /// Mirror clips left-right with probability 0.5. Off by default: mirroring is wrong for
    /// some anatomical views (e.g. apical four-chamber echo).
    #[serde(default)]
    pub horizontal_flip: bool,
}

fn d_scale() -> [f64; 2] {
    [1.0, 1.0]
}

impl Default for Augmentation {
    fn default() -> Self {
        Self {
            crop_scale: d_scale(),
            horizontal_flip: false,
        }
    }
}

/// Stop when the validation metric has not improved for `patience` epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    #[serde(default = "d_metric")]
    pub metric: Metric,
    pub patience: u32,
}

fn d_metric() -> Metric {
    Metric::BalancedAccuracy
}

macro_rules! defaults {
    ($($name:ident: $t:ty = $v:expr;)*) => { $(fn $name() -> $t { $v })* };
}
defaults! {
    d_epochs: u32 = 10;
    d_batch: u32 = 8;
    d_lr: f64 = 0.01;
    d_opt: OptimizerKind = OptimizerKind::Sgd;
    d_momentum: f64 = 0.9;
    d_wd: f64 = 1e-4;
    d_sched: ScheduleKind = ScheduleKind::Cosine;
    d_step_size: u32 = 10;
    d_gamma: f64 = 0.1;
    d_backbone_mult: f64 = 0.1;
    d_stride: u32 = 1;
    d_eval_clips: u32 = 5;
    d_imbalance: Imbalance = Imbalance::None;
    d_accum: u32 = 1;
    d_precision: Precision = Precision::Auto;
    d_device: String = "auto".into();
    d_workers: u32 = 2;
    d_keep: u32 = 2;
    d_log_every: u32 = 10;
}

/// What a fine-tuning job does. Omitted fields take the defaults shown in openapi.yaml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    #[serde(default = "d_epochs")]
    pub epochs: u32,
    #[serde(default = "d_batch")]
    pub batch_size: u32,
    /// Learning rate of the head; the backbone gets `lr × backbone_lr_mult`.
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_opt")]
    pub optimizer: OptimizerKind,
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_sched")]
    pub schedule: ScheduleKind,
    /// Epochs of linear warm-up. Omitted: 1, or 0 for a one-epoch job (a default never
    /// contradicts another field); [`Hyperparameters::resolve_defaults`] writes the value in.
    #[serde(default)]
    pub warmup_epochs: Option<u32>,
    /// For `step`: decay by `gamma` every `step_size` epochs.
    #[serde(default = "d_step_size")]
    pub step_size: u32,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub freeze: Freeze,
    #[serde(default = "d_backbone_mult")]
    pub backbone_lr_mult: f64,
    #[serde(default)]
    pub head: HeadSpec,
    /// Frames per clip (default: the base model's).
    pub frames: Option<u32>,
    /// Take every `frame_stride`-th cached frame.
    #[serde(default = "d_stride")]
    pub frame_stride: u32,
    /// Spatial crop size (default: the base model's).
    pub crop: Option<u32>,
    #[serde(default)]
    pub augmentation: Augmentation,
    #[serde(default = "d_imbalance")]
    pub class_imbalance: Imbalance,
    #[serde(default)]
    pub label_smoothing: f64,
    pub early_stopping: Option<EarlyStopping>,
    /// Metric choosing the best checkpoint.
    #[serde(default = "d_metric")]
    pub selection_metric: Metric,
    #[serde(default = "d_accum")]
    pub grad_accumulation: u32,
    /// Clip the gradient norm to this value.
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_precision")]
    pub precision: Precision,
    /// `auto`, `cpu` or `cuda` / `cuda:N`.
    #[serde(default = "d_device")]
    pub device: String,
    /// Stop (and fail) after this many seconds.
    pub max_runtime_s: Option<u64>,
    /// Clips averaged per video in the final test evaluation (and by default at serving).
    #[serde(default = "d_eval_clips")]
    pub eval_clips: u32,
    /// Background threads preparing batches.
    #[serde(default = "d_workers")]
    pub loader_threads: u32,
    /// Checkpoints kept (the newest N, plus the best).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: u32,
    /// Record loss and learning rate every N steps.
    #[serde(default = "d_log_every")]
    pub log_every_steps: u32,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        let mut hp: Self = serde_json::from_str("{}").expect("every field has a default");
        hp.resolve_defaults();
        hp
    }
}

impl Hyperparameters {
    /// Fill in the defaults that depend on other fields, so that what is stored states every
    /// value: `warmup_epochs` is 1 when omitted, 0 for a one-epoch job (warm-up must end before
    /// the last epoch).
    pub fn resolve_defaults(&mut self) {
        if self.warmup_epochs.is_none() {
            self.warmup_epochs = Some(if self.epochs > 1 { 1 } else { 0 });
        }
    }

    /// Warm-up epochs (the default when not resolved yet).
    pub fn warmup(&self) -> u32 {
        self.warmup_epochs
            .unwrap_or(if self.epochs > 1 { 1 } else { 0 })
    }

    /// The base model's input as this job asks for it: `frames` and `crop` override the base
    /// model's, and the resize keeps its ratio to the crop (128 → 112 for the video models).
    pub fn preprocessing(&self, base: &Preprocessing) -> Preprocessing {
        let mut prep = base.clone();
        if let Some(f) = self.frames {
            prep.frames = f as i64;
        }
        if let Some(c) = self.crop {
            let scale = c as f64 / prep.crop as f64;
            prep.resize = prep.resize.map(|r| (r as f64 * scale).round() as i64);
            prep.crop = c as i64;
        }
        prep
    }

    /// Check ranges; `Err((field, message))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        fn check(ok: bool, field: &'static str, msg: &str) -> Result<(), (&'static str, String)> {
            if ok {
                Ok(())
            } else {
                Err((field, msg.to_string()))
            }
        }
        check(
            (1..=1000).contains(&self.epochs),
            "epochs",
            "between 1 and 1000",
        )?;
        check(
            (1..=512).contains(&self.batch_size),
            "batch_size",
            "between 1 and 512",
        )?;
        check(
            self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0,
            "lr",
            "a positive number up to 10",
        )?;
        check((0.0..1.0).contains(&self.momentum), "momentum", "in [0, 1)")?;
        check(
            self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay),
            "weight_decay",
            "in [0, 1]",
        )?;
        check(
            self.warmup() < self.epochs || self.warmup() == 0,
            "warmup_epochs",
            "fewer than epochs",
        )?;
        check(self.step_size >= 1, "step_size", "at least 1")?;
        check(
            (0.0..=1.0).contains(&self.gamma) && self.gamma > 0.0,
            "gamma",
            "in (0, 1]",
        )?;
        check(
            (0.0..=10.0).contains(&self.backbone_lr_mult),
            "backbone_lr_mult",
            "in [0, 10]",
        )?;
        check(
            self.frames.is_none_or(|f| (1..=256).contains(&f)),
            "frames",
            "between 1 and 256",
        )?;
        check(
            (1..=16).contains(&self.frame_stride),
            "frame_stride",
            "between 1 and 16",
        )?;
        check(
            self.crop.is_none_or(|c| (16..=1024).contains(&c)),
            "crop",
            "between 16 and 1024",
        )?;
        let [lo, hi] = self.augmentation.crop_scale;
        check(
            lo > 0.0 && lo <= hi && hi <= 1.0,
            "augmentation.crop_scale",
            "0 < min <= max <= 1",
        )?;
        check(
            (0.0..0.5).contains(&self.label_smoothing),
            "label_smoothing",
            "in [0, 0.5)",
        )?;
        check(
            self.selection_metric != Metric::Unknown,
            "selection_metric",
            "accuracy, balanced_accuracy, macro_f1, macro_auc or loss",
        )?;
        if let Some(es) = &self.early_stopping {
            check(
                es.metric != Metric::Unknown,
                "early_stopping.metric",
                "accuracy, balanced_accuracy, macro_f1, macro_auc or loss",
            )?;
            check(es.patience >= 1, "early_stopping.patience", "at least 1")?;
        }
        check(
            (1..=64).contains(&self.grad_accumulation),
            "grad_accumulation",
            "between 1 and 64",
        )?;
        check(
            self.grad_clip.is_none_or(|c| c > 0.0 && c.is_finite()),
            "grad_clip",
            "a positive number",
        )?;
        let device_ok = crate::device::DeviceRequest::parse(&self.device).is_some();
        check(device_ok, "device", "auto, cpu, cuda or cuda:N")?;
        check(
            self.max_runtime_s.is_none_or(|s| s >= 1),
            "max_runtime_s",
            "at least 1",
        )?;
        check(
            (1..=32).contains(&self.eval_clips),
            "eval_clips",
            "between 1 and 32",
        )?;
        check(
            (1..=16).contains(&self.loader_threads),
            "loader_threads",
            "between 1 and 16",
        )?;
        check(
            (1..=100).contains(&self.keep_checkpoints),
            "keep_checkpoints",
            "between 1 and 100",
        )?;
        check(self.log_every_steps >= 1, "log_every_steps", "at least 1")?;
        match &self.head {
            HeadSpec::Linear { dropout } | HeadSpec::Mlp { dropout, .. } => {
                check((0.0..1.0).contains(dropout), "head.dropout", "in [0, 1)")?
            }
        }
        if let HeadSpec::Mlp { hidden, .. } = &self.head {
            check(
                !hidden.is_empty() && hidden.iter().all(|h| (1..=16384).contains(h)),
                "head.hidden",
                "1 to 16384 units per layer",
            )?;
        }
        Ok(())
    }

    /// Learning-rate factor for `epoch` (fractional: epoch + step / steps_per_epoch).
    pub fn lr_factor(&self, epoch: f64) -> f64 {
        let warm = self.warmup() as f64;
        if warm > 0.0 && epoch < warm {
            return (epoch + 1e-9).min(warm) / warm;
        }
        match self.schedule {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Step => self
                .gamma
                .powi((epoch / self.step_size as f64).floor() as i32),
            ScheduleKind::Cosine => {
                let span = (self.epochs as f64 - warm).max(1.0);
                let t = ((epoch - warm) / span).clamp(0.0, 1.0);
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_refused() {
        Hyperparameters::default().validate().unwrap();
        let err = serde_json::from_str::<Hyperparameters>(r#"{"epochz": 3}"#).unwrap_err();
        assert!(err.to_string().contains("epochz"));
        let h: Hyperparameters = serde_json::from_str(r#"{"lr": -1}"#).unwrap();
        assert_eq!(h.validate().unwrap_err().0, "lr");
        let h: Hyperparameters = serde_json::from_str(r#"{"device": "tpu"}"#).unwrap();
        assert_eq!(h.validate().unwrap_err().0, "device");
    }

    #[test]
    fn warmup_default_never_contradicts_epochs() {
        let mut one: Hyperparameters = serde_json::from_str(r#"{"epochs": 1}"#).unwrap();
        one.validate().unwrap();
        one.resolve_defaults();
        assert_eq!(one.warmup_epochs, Some(0));
        assert_eq!(Hyperparameters::default().warmup_epochs, Some(1));
        let explicit: Hyperparameters =
            serde_json::from_str(r#"{"epochs": 1, "warmup_epochs": 1}"#).unwrap();
        assert_eq!(explicit.validate().unwrap_err().0, "warmup_epochs");
    }

    #[test]
    fn metrics_are_stored_by_name_and_unknown_ones_refused_by_field() {
        let h: Hyperparameters = serde_json::from_str(
            r#"{"selection_metric": "loss", "early_stopping": {"patience": 2}}"#,
        )
        .unwrap();
        assert_eq!(h.selection_metric, Metric::Loss);
        let es = h.early_stopping.as_ref().unwrap();
        assert_eq!(es.metric, Metric::BalancedAccuracy);
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["selection_metric"], "loss");
        assert_eq!(v["early_stopping"]["metric"], "balanced_accuracy");
        let h: Hyperparameters = serde_json::from_str(r#"{"selection_metric": "f1"}"#).unwrap();
        assert_eq!(
            h.validate().unwrap_err(),
            (
                "selection_metric",
                "accuracy, balanced_accuracy, macro_f1, macro_auc or loss".to_owned()
            )
        );
        let h: Hyperparameters =
            serde_json::from_str(r#"{"early_stopping": {"metric": "auc", "patience": 1}}"#)
                .unwrap();
        assert_eq!(h.validate().unwrap_err().0, "early_stopping.metric");
    }

    #[test]
    fn lower_is_better_only_for_loss() {
        assert!(Metric::Loss.better(0.4, Some(0.5)));
        assert!(!Metric::Loss.better(0.6, Some(0.5)));
        assert!(Metric::MacroF1.better(0.6, Some(0.5)));
        assert!(!Metric::Accuracy.better(0.5, Some(0.5)));
        assert!(Metric::Accuracy.better(0.0, None));
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let h: Hyperparameters =
            serde_json::from_str(r#"{"epochs": 10, "warmup_epochs": 2}"#).unwrap();
        assert!((h.lr_factor(1.0) - 0.5).abs() < 1e-9);
        assert!((h.lr_factor(2.0) - 1.0).abs() < 1e-9);
        assert!(h.lr_factor(6.0) < 0.6 && h.lr_factor(6.0) > 0.4);
        assert!(h.lr_factor(10.0) < 1e-9);
        let s: Hyperparameters = serde_json::from_str(
            r#"{"schedule": "step", "step_size": 3, "gamma": 0.5, "warmup_epochs": 0}"#,
        )
        .unwrap();
        assert_eq!(s.lr_factor(0.0), 1.0);
        assert_eq!(s.lr_factor(3.5), 0.5);
        assert_eq!(s.lr_factor(6.0), 0.25);
    }
}
