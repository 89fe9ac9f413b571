//! Fine-tuning without the service (`vidtune train`): a job spec — the hyperparameters a
//! `POST /v1/jobs` takes, a built-in base model, optional pretrained weights — run by the same
//! training loop against a training-cache folder, for air-gapped sites and for benchmarks on
//! machines that have neither PostgreSQL nor FFmpeg.
//!
//! The folder holds cache files (the format ingest writes, see `media::cache`) and a
//! `manifest.json` naming each file's label, patient and split:
//!
//! ```json
//! {"version": 1, "videos": [
//!   {"cache": "normal/p001_0.vtc", "label": "normal", "patient_id": "p001", "split": "train"},
//!   {"cache": "tachy/p002_0.vtc", "label": "tachycardia", "patient_id": "p002"}]}
//! ```
//!
//! Videos without a split are assigned one as ingest assigns them (stratified by label, grouped
//! by patient, seeded). [`write_synthetic_cache`] renders the synthetic echocardiography of
//! `crate::synth` straight into such a folder, without FFmpeg. What the attempt reports goes
//! out as JSON lines ([`JsonLines`]); checkpoints and the exported model are written under the
//! output folder, laid out as in a data directory (`jobs/<id>/checkpoints/…`, `models/<id>/`).
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::TrainError;
use super::hyper::Hyperparameters;
use super::run::{AttemptLog, Context, Control, Job, Outcome, Pretrained, Progress, TrainedModel};
use super::splits::{SplitName, SplitVideo, Splits};
use crate::backbone::{Arch, Base, Freeze};
use crate::datadir::DataDir;
use crate::evaluation::EpochRecord;
use crate::ingest::split::{self, SplitSpec};
use crate::media::cache::{CacheReader, CacheWriter};
use crate::synth::{Synth, SynthSpec};

/// The manifest's file name in a cache folder.
pub const MANIFEST: &str = "manifest.json";

/// The videos of a training-cache folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// 1.
    pub version: u32,
    pub videos: Vec<ManifestVideo>,
}

/// One cached video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestVideo {
    /// The cache file, relative to the manifest's folder.
    pub cache: String,
    pub label: String,
    /// Keeps a patient's videos in one split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    /// Assigned at training time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitName>,
}

impl Manifest {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(
            m.version == 1,
            "{}: version {} (this vidtune reads 1)",
            path.display(),
            m.version
        );
        for v in &m.videos {
            let inside = Path::new(&v.cache)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            anyhow::ensure!(
                inside && !v.cache.is_empty(),
                "{}: `{}` is not a path inside the folder",
                path.display(),
                v.cache
            );
        }
        Ok(m)
    }

    /// Write `dir/manifest.json` whole or not at all.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(MANIFEST);
        let part = path.with_extension("json.part");
        std::fs::write(&part, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", part.display()))?;
        crate::datadir::durable_rename(&part, &path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The dataset as a job trains on it: splits filled in by `spec` where the manifest gives
    /// none, frame counts and sizes from the cache files' headers.
    pub fn splits(&self, dir: &Path, spec: &SplitSpec) -> Result<Splits, TrainError> {
        let mut assigned: Vec<split::Item> = self
            .videos
            .iter()
            .map(|v| split::Item {
                label: v.label.clone(),
                patient: v.patient_id.clone(),
                split: v.split,
            })
            .collect();
        split::assign(&mut assigned, spec);
        let videos = self
            .videos
            .iter()
            .zip(assigned)
            .map(|(v, a)| {
                let cache = dir.join(&v.cache);
                let header = CacheReader::open(&cache)
                    .map_err(|e| {
                        TrainError::User(format!("the cache file {}: {e:#}", cache.display()))
                    })?
                    .header;
                Ok(SplitVideo {
                    split: a.split,
                    label: Some(v.label.clone()),
                    cache,
                    frames: header.frames.max(1),
                    hw: (i64::from(header.height), i64::from(header.width)),
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Splits::new(videos)
    }
}

/// Render the synthetic dataset `spec` describes into cache files under `dir`
/// (`<label>/<patient>_<clip>.vtc`, grey frames as RGB at the spec's size and rate, which stand
/// for what ingest would cache), then its manifest, without splits. Uses every core.
pub fn write_synthetic_cache(spec: &SynthSpec, dir: &Path) -> anyhow::Result<Manifest> {
    let synth = Synth::new(spec)?;
    let caches: Vec<String> = synth
        .videos
        .iter()
        .map(|v| {
            Path::new(&v.path)
                .with_extension("vtc")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for v in &synth.videos {
        let label_dir = dir.join(&v.label);
        std::fs::create_dir_all(&label_dir)
            .with_context(|| format!("creating {}", label_dir.display()))?;
    }
    synth.for_each_video(|i| {
        let path = dir.join(&caches[i]);
        let mut w = CacheWriter::create(&path, spec.height, spec.width, f64::from(spec.fps))?;
        let mut rgb = Vec::with_capacity(spec.width as usize * spec.height as usize * 3);
        synth.render(i, &mut |luma| {
            rgb.clear();
            rgb.extend(luma.iter().flat_map(|&l| [l, l, l]));
            w.push(&rgb)
        })?;
        w.finish()
            .map(drop)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    let manifest = Manifest {
        version: 1,
        videos: synth
            .videos
            .iter()
            .zip(caches)
            .map(|(v, cache)| ManifestVideo {
                cache,
                label: v.label.clone(),
                patient_id: Some(v.patient_id.clone()),
                split: None,
            })
            .collect(),
    };
    manifest.write(dir)?;
    Ok(manifest)
}

/// A job to run offline.
#[derive(Debug, Clone)]
pub struct OfflineJob {
    /// A built-in architecture (TorchScript backbones need the server's sandbox).
    pub base_model: String,
    /// As in `POST /v1/jobs`; defaults are filled in and the whole is checked.
    pub hyperparameters: Value,
    /// A torchvision-format checkpoint (.pth from `torch.save`, or .safetensors).
    pub pretrained: Option<PathBuf>,
    /// Splits of the videos the manifest gives none.
    pub split: SplitSpec,
    /// `cpu`, `cuda`, `cuda:N` or `auto`; `None`: the hyperparameter `device`.
    pub device: Option<String>,
}

/// The hyperparameters of a request, defaults filled in and checked, as a submission does.
pub fn hyperparameters(v: &Value, arch: Arch) -> Result<Hyperparameters, TrainError> {
    let v = if v.is_null() { json!({}) } else { v.clone() };
    let mut hp: Hyperparameters =
        serde_json::from_value(v).map_err(|e| TrainError::User(format!("hyperparameters: {e}")))?;
    hp.resolve_defaults();
    hp.validate()
        .map_err(|(field, msg)| TrainError::User(format!("hyperparameters.{field}: {msg}")))?;
    let stages = arch.stages().len();
    if let Freeze::LastStages { stages: k } = hp.freeze
        && (k == 0 || k > stages)
    {
        return Err(TrainError::User(format!(
            "hyperparameters.freeze.stages: between 1 and {stages} for {}",
            arch.name()
        )));
    }
    Ok(hp)
}

/// `auto` is the first CUDA device when libtorch sees one, else the CPU.
fn device(name: &str) -> Result<tch::Device, TrainError> {
    if name == "auto" {
        return Ok(if tch::Cuda::is_available() {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        });
    }
    crate::device::Device::parse(name)
        .map(crate::device::Device::to_tch)
        .ok_or_else(|| TrainError::User(format!("device `{name}`: auto, cpu, cuda or cuda:N")))
}

/// Run `job` on the cache folder `cache` to its end, writing under `out` and reporting to `log`.
pub fn train(
    job: &OfflineJob,
    cache: &Path,
    out: &Path,
    log: &mut dyn AttemptLog,
) -> Result<Outcome, TrainError> {
    let started = Instant::now();
    let arch = Arch::parse(&job.base_model).ok_or_else(|| {
        let names: Vec<_> = Arch::ALL.iter().map(|a| a.name()).collect();
        TrainError::User(format!(
            "base model `{}`: offline training takes a built-in architecture ({})",
            job.base_model,
            names.join(", ")
        ))
    })?;
    let hp = hyperparameters(&job.hyperparameters, arch)?;
    let device = device(job.device.as_deref().unwrap_or(&hp.device))?;
    job.split.validate().map_err(TrainError::User)?;
    let manifest = Manifest::read(cache).map_err(|e| TrainError::User(format!("{e:#}")))?;
    let splits = manifest.splits(cache, &job.split)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let data_dir = DataDir::new(out);
    let pretrained = job
        .pretrained
        .as_deref()
        .map(|file| install_weights(&data_dir, arch, file))
        .transpose()?;
    let id = Uuid::new_v4();
    // What ran, next to what it made.
    let job_dir = data_dir.resolve(DataDir::job_relative(id));
    std::fs::create_dir_all(&job_dir).context("creating the job's folder")?;
    let record = json!({
        "id": id, "base_model": arch.name(), "hyperparameters": hp, "cache": cache,
        "split": job.split, "device": device_name(device),
        "pretrained": pretrained.as_ref().map(|p| &p.sha256),
        "videos": {"train": splits.train.items.len(), "val": splits.val.items.len(), "test": splits.test.items.len()},
        "classes": splits.classes,
    });
    std::fs::write(
        job_dir.join("job.json"),
        serde_json::to_vec_pretty(&record).expect("serialises"),
    )
    .context("writing job.json")?;
    log.event(
        "job",
        "info",
        &format!(
            "job {id}: {} on {} ({} train, {} val, {} test videos)",
            arch.name(),
            device_name(device),
            splits.train.items.len(),
            splits.val.items.len(),
            splits.test.items.len()
        ),
        record,
    )?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    crate::backbone::heap::keep_freed_memory();
    let ctx = Context {
        data_dir,
        device,
        started,
    };
    let job = Job {
        id,
        attempt: 1,
        base_model: arch.name().to_string(),
        hp,
        base: Base::Builtin(arch),
        prep: arch.preprocessing(),
        pretrained,
        splits,
        checkpoint: None,
    };
    super::run::run(&ctx, job, log)
}

fn device_name(d: tch::Device) -> String {
    crate::device::Device::from_tch(d).map_or_else(|| format!("{d:?}"), |d| d.to_string())
}

/// A torchvision checkpoint converted and stored under `weights/<arch>/<sha256>.safetensors`.
fn install_weights(data: &DataDir, arch: Arch, file: &Path) -> Result<Pretrained, TrainError> {
    let sha256 =
        crate::ingest::sha256_file(file).with_context(|| format!("reading {}", file.display()))?;
    let tensors = crate::backbone::read_backbone_weights(arch, file)
        .map_err(|e| TrainError::User(format!("{}: {e:#}", file.display())))?;
    let dest = data.resolve(DataDir::weights_relative(arch.name(), &sha256));
    if !dest.exists() {
        std::fs::create_dir_all(dest.parent().expect("has a parent"))
            .context("creating the weights folder")?;
        let named: Vec<(&str, &tch::Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let part = dest.with_extension("part");
        tch::Tensor::write_safetensors(&named, &part).context("writing weights")?;
        crate::datadir::durable_rename(&part, &dest).context("installing weights")?;
    }
    Ok(Pretrained { path: dest, sha256 })
}

/// An [`AttemptLog`] that writes one JSON object per line, each with its `type` and `ts` (Unix
/// time in seconds): `progress`, `step`, `epoch`, `event`, `checkpoint`, `checkpoint_bytes` and
/// at the end `model`. It never cancels and is never fenced out.
pub struct JsonLines<W: Write> {
    out: W,
    /// The output folder, to print the model's absolute path.
    root: PathBuf,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W, root: &Path) -> Self {
        Self {
            out,
            root: root.to_path_buf(),
        }
    }

    fn line(&mut self, kind: &str, mut v: Value) -> anyhow::Result<()> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let obj = v.as_object_mut().expect("an object");
        obj.insert("type".into(), kind.into());
        obj.insert("ts".into(), json!((ts * 1000.0).round() / 1000.0));
        serde_json::to_writer(&mut self.out, &v)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

impl<W: Write> AttemptLog for JsonLines<W> {
    fn progress(&mut self, p: Progress) -> anyhow::Result<Control> {
        self.line(
            "progress",
            json!({"epoch": p.epoch, "step": p.step, "fraction": p.fraction, "eta_s": p.eta_s}),
        )?;
        Ok(Control::Continue)
    }

    fn step(&mut self, step: i64, epoch: u32, loss: f64, lr: f64) -> anyhow::Result<()> {
        self.line(
            "step",
            json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr}),
        )
    }

    fn epoch(&mut self, e: &EpochRecord) -> anyhow::Result<u64> {
        self.line(
            "epoch",
            json!({"epoch": e.epoch, "train_loss": e.train_loss, "train_accuracy": e.train_accuracy,
                   "val": e.val, "lr": e.lr, "clips_per_s": e.clips_per_s,
                   "data_wait_share": e.data_wait_share}),
        )?;
        Ok(1)
    }

    fn event(&mut self, kind: &str, level: &str, message: &str, data: Value) -> anyhow::Result<()> {
        self.line(
            "event",
            json!({"kind": kind, "level": level, "message": message, "data": data}),
        )
    }

    fn checkpoint(&mut self, path: &str) -> anyhow::Result<bool> {
        self.line("checkpoint", json!({"path": path}))?;
        Ok(true)
    }

    fn checkpoint_bytes(&mut self, bytes: u64) -> anyhow::Result<()> {
        self.line("checkpoint_bytes", json!({"bytes": bytes}))
    }

    fn finish(&mut self, m: &TrainedModel) -> anyhow::Result<bool> {
        let path = self.root.join(m.path);
        self.line(
            "model",
            json!({"id": m.id, "path": path, "classes": m.classes, "preprocessing": m.preprocessing,
                   "head": m.head, "eval_clips": m.eval_clips, "val": m.val, "test": m.test,
                   "bytes": m.bytes}),
        )?;
        Ok(true)
    }
}

/// `vidtune train`: fine-tune on a training-cache folder without the server or its database.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The training-cache folder (cache files and manifest.json).
    #[arg(long)]
    pub cache: PathBuf,
    /// Where checkpoints and the exported model go (`jobs/<id>/`, `models/<id>/`).
    #[arg(long)]
    pub out: PathBuf,
    /// Base model: a built-in architecture.
    #[arg(long, default_value = "r3d_18")]
    pub base_model: String,
    #[command(flatten)]
    pub hp: HyperparameterArgs,
    /// Pretrained weights of the base model (torchvision .pth or .safetensors).
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (default: the `device` hyperparameter).
    #[arg(long)]
    pub device: Option<String>,
    /// Train, val and test shares for videos the manifest gives no split, e.g. 0.7,0.15,0.15.
    #[arg(long, default_value = "0.7,0.15,0.15", value_parser = parse_split)]
    pub split: (f64, f64, f64),
    /// Seed of the split assignment.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// First render a synthetic echocardiography dataset into --cache (no FFmpeg needed),
    /// unless the folder already has a manifest.
    #[arg(long)]
    pub synthetic: bool,
    /// Synthetic: heart-rate classes (2 to 8).
    #[arg(long, default_value_t = 3)]
    pub synth_classes: u32,
    /// Synthetic: patients per class.
    #[arg(long, default_value_t = 8)]
    pub synth_patients: u32,
    /// Synthetic: clips per patient.
    #[arg(long, default_value_t = 2)]
    pub synth_clips: u32,
    /// Synthetic: seconds per clip.
    #[arg(long, default_value_t = 4.0)]
    pub synth_seconds: f64,
    /// Synthetic: frame size WIDTHxHEIGHT, as cached (ingest caches a short side of 128).
    #[arg(long, default_value = "170x128", value_parser = parse_size)]
    pub synth_size: (u32, u32),
    /// Synthetic: frames per second, as cached (ingest keeps at most 15).
    #[arg(long, default_value_t = 15)]
    pub synth_fps: u32,
    #[arg(long, default_value_t = 1)]
    pub synth_seed: u64,
}

fn parse_split(s: &str) -> Result<(f64, f64, f64), String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| "expected TRAIN,VAL,TEST shares, e.g. 0.7,0.15,0.15".to_string())?;
    match v[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err("expected three shares: TRAIN,VAL,TEST".into()),
    }
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| "expected WIDTHxHEIGHT".to_string())?;
    let n = |x: &str| x.trim().parse::<u32>().map_err(|e| e.to_string());
    Ok((n(w)?, n(h)?))
}

/// `--hyperparameters` and `--set`, as `vidtune train` and `vidtune jobs create` take them.
#[derive(Debug, Clone, clap::Args)]
pub struct HyperparameterArgs {
    /// Hyperparameters as JSON, or @file.json (the `hyperparameters` of `POST /v1/jobs`).
    #[arg(long)]
    pub hyperparameters: Option<String>,
    /// One hyperparameter, KEY=VALUE with a JSON value (dotted keys nest: freeze.policy=full);
    /// repeatable, applied after --hyperparameters.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl HyperparameterArgs {
    /// Both merged into one JSON object.
    pub fn merged(&self) -> anyhow::Result<Value> {
        merge_hyperparameters(self.hyperparameters.as_deref(), &self.set)
    }
}

/// Merge `--hyperparameters` (JSON, or @file.json) and `--set KEY=VALUE` into one JSON object.
pub fn merge_hyperparameters(base: Option<&str>, set: &[String]) -> anyhow::Result<Value> {
    let mut hp = match base {
        None => json!({}),
        Some(s) => {
            let text = match s.strip_prefix('@') {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
                }
                None => s.to_string(),
            };
            serde_json::from_str(&text).context("--hyperparameters is not JSON")?
        }
    };
    anyhow::ensure!(hp.is_object(), "--hyperparameters must be a JSON object");
    for kv in set {
        let (key, raw) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {kv}: expected KEY=VALUE"))?;
        // A bare word is a string: `--set optimizer=adamw`.
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let mut slot = &mut hp;
        for part in key.split('.') {
            if !slot.is_object() {
                *slot = json!({});
            }
            slot = slot
                .as_object_mut()
                .expect("made an object above")
                .entry(part)
                .or_insert(Value::Null);
        }
        *slot = value;
    }
    Ok(hp)
}

/// The `vidtune train` command: JSON lines on stdout, errors on stderr; exit 1 on failure (2
/// when the job itself was at fault).
pub fn main(args: TrainArgs) -> ExitCode {
    match main_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(TrainError::User(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(TrainError::System(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner(args: TrainArgs) -> Result<(), TrainError> {
    let hyperparameters = args
        .hp
        .merged()
        .map_err(|e| TrainError::User(format!("{e:#}")))?;
    let mut log = JsonLines::new(std::io::stdout().lock(), &args.out);
    if args.synthetic && !args.cache.join(MANIFEST).exists() {
        let spec = SynthSpec {
            classes: args.synth_classes,
            patients: args.synth_patients,
            clips: args.synth_clips,
            seconds: args.synth_seconds,
            width: args.synth_size.0,
            height: args.synth_size.1,
            fps: args.synth_fps,
            seed: args.synth_seed,
            format: Default::default(),
        };
        spec.validate()
            .map_err(|e| TrainError::User(format!("synthetic dataset: {e:#}")))?;
        std::fs::create_dir_all(&args.cache)
            .with_context(|| format!("creating {}", args.cache.display()))?;
        let t = Instant::now();
        let m = write_synthetic_cache(&spec, &args.cache)?;
        log.event(
            "synthetic",
            "info",
            &format!(
                "rendered {} synthetic videos into {} in {:.1} s",
                m.videos.len(),
                args.cache.display(),
                t.elapsed().as_secs_f64()
            ),
            json!({"videos": m.videos.len(), "seconds": t.elapsed().as_secs_f64()}),
        )?;
    }
    let job = OfflineJob {
        base_model: args.base_model,
        hyperparameters,
        pretrained: args.pretrained,
        split: SplitSpec {
            train: args.split.0,
            val: args.split.1,
            test: args.split.2,
            seed: args.split_seed,
            group_by: Default::default(),
        },
        device: args.device,
    };
    match train(&job, &args.cache, &args.out, &mut log)? {
        Outcome::Succeeded(_) => Ok(()),
        other => Err(TrainError::System(anyhow::anyhow!(
            "the attempt ended as {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_names_files_inside_its_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |cache: &str| {
            let m = json!({"version": 1, "videos": [{"cache": cache, "label": "a"}]});
            std::fs::write(dir.path().join(MANIFEST), m.to_string()).unwrap();
            Manifest::read(dir.path())
        };
        assert!(write("a/b.vtc").is_ok());
        assert!(write("../b.vtc").is_err());
        assert!(write("/etc/passwd").is_err());
    }

    #[test]
    fn a_synthetic_cache_is_split_by_patient() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            classes: 2,
            patients: 5,
            clips: 2,
            seconds: 1.0,
            width: 40,
            height: 32,
            fps: 8,
            seed: 2,
            format: Default::default(),
        };
        let m = write_synthetic_cache(&spec, dir.path()).unwrap();
        assert_eq!(m.videos.len(), 20);
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        let splits = m.splits(dir.path(), &SplitSpec::default()).unwrap();
        assert_eq!(splits.classes, ["normal", "tachycardia"]);
        assert_eq!(splits.train.hw[0], (32, 40));
        assert_eq!(splits.train.items[0].frames, 8);
        let n = splits.train.items.len() + splits.val.items.len() + splits.test.items.len();
        assert_eq!(n, 20);
        // A patient's two clips are in one split.
        let in_split = |s: &super::super::splits::Split, patient: &str| {
            s.items
                .iter()
                .filter(|i| i.cache.to_string_lossy().contains(patient))
                .count()
        };
        for v in &m.videos {
            let p = v.patient_id.as_deref().unwrap();
            let counts = [&splits.train, &splits.val, &splits.test].map(|s| in_split(s, p));
            assert!(counts.contains(&2), "{p}: {counts:?}");
        }
    }
}
