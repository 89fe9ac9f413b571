//! Command-line flags. Every flag has a `VIDTUNE_*` environment fallback (the database URL uses
//! the conventional `DATABASE_URL`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ingest::IngestConfig;

/// vidtune: fine-tune pretrained video models on your own medical videos and serve them.
#[derive(Debug, Parser)]
#[command(name = "vidtune", version, about, propagate_version = true)]
pub struct Cli {
    /// Log output: human-readable (`pretty`) or one JSON object per line (`json`).
    #[arg(long, env = "VIDTUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and, with --workers, a local worker pool).
    Serve(ServeArgs),
    /// Run a worker that executes queued fine-tuning jobs on the given devices.
    Worker(WorkerArgs),
    /// Apply the database migrations and exit.
    Migrate(DbArgs),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print libtorch, CUDA, FFmpeg and database facts for troubleshooting.
    Doctor(DoctorArgs),
    /// Install pretrained weights for the built-in architectures.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Datasets: write a synthetic one, upload an archive, list (client of the REST API).
    Datasets {
        #[command(subcommand)]
        command: crate::client::commands::DatasetsCommand,
    },
    /// Fine-tuning jobs: create, watch with a progress bar, list (client of the REST API).
    Jobs {
        #[command(subcommand)]
        command: crate::client::commands::JobsCommand,
    },
    /// Fine-tune offline on a training-cache folder (its manifest.json names label, patient and
    /// split of each cache file), without the server or a database: JSON lines on stdout,
    /// checkpoints and the exported model under --out. --synthetic renders synthetic
    /// echocardiography into the folder first, without FFmpeg.
    Train(crate::train::offline::TrainArgs),
    /// Copy a dataset's training cache out of the data directory (hard links where possible)
    /// with the manifest.json `vidtune train` reads: labels, patients and splits as the dataset
    /// has them. Runs on the host, with the database.
    ExportCache {
        /// The dataset's id.
        #[arg(long)]
        dataset: uuid::Uuid,
        /// The folder to write (a `vidtune train --cache`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Classify videos with a fine-tuned model (client of the REST API).
    Predict(crate::client::commands::PredictArgs),
    /// The whole loop on a running server: generate synthetic echocardiography, upload it,
    /// fine-tune, watch it learn, and predict held-out patients.
    Demo(crate::client::commands::DemoArgs),
    /// Internal: run one attempt of a fine-tuning job (started by a worker).
    #[command(hide = true)]
    TrainJob {
        #[arg(long)]
        job: uuid::Uuid,
        #[arg(long)]
        attempt: i32,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Internal: decode videos for the server, isolated in a child process (JSON lines on stdio).
    #[command(hide = true)]
    MediaWorker,
    /// Internal: run a user's TorchScript backbone in a sandbox (framed tensors on stdio).
    #[command(hide = true)]
    ScriptHost,
    /// Internal: lock down as a script host does, then try what the sandbox must refuse
    /// (read `read`, write `write`, TCP, start a process, fork); prints JSON.
    #[command(hide = true)]
    SandboxProbe { read: PathBuf, write: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Import a torchvision-format checkpoint (.pth/.pt from torch.save, or .safetensors).
    Import {
        /// Architecture: r3d_18, mc3_18, r2plus1d_18, resnet18, resnet50, vgg16.
        arch: String,
        /// The checkpoint file, e.g. r2plus1d_18-91a641e6.pth.
        file: PathBuf,
        /// Directory shared with the API server.
        #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Download the official torchvision checkpoint (needs internet and curl), check the hash
    /// prefix in its file name, and import it.
    Pull {
        arch: String,
        #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List the architectures and their installed weights.
    List {
        #[command(flatten)]
        db: DbArgs,
    },
}

/// Connection to PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://vidtune@127.0.0.1:5432/vidtune.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Largest number of pooled database connections.
    #[arg(long, env = "VIDTUNE_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "VIDTUNE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for uploaded datasets, caches, checkpoints and models.
    #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Number of in-process workers (0: jobs wait for a separate `vidtune worker`).
    #[arg(long, env = "VIDTUNE_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Seconds a request may take before it is answered 408 (uploads stream past this).
    #[arg(long, env = "VIDTUNE_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// Largest JSON request body in bytes.
    #[arg(long, env = "VIDTUNE_MAX_JSON_BYTES", default_value_t = 1 << 20)]
    pub max_json_bytes: usize,
    /// Largest dataset archive upload in bytes.
    #[arg(long, env = "VIDTUNE_MAX_UPLOAD_BYTES", default_value_t = 50 << 30)]
    pub max_upload_bytes: u64,
    /// Largest single-video upload in bytes.
    #[arg(long, env = "VIDTUNE_MAX_VIDEO_BYTES", default_value_t = 8 << 30)]
    pub max_video_bytes: u64,
    /// Videos decoded at once during ingest, across all uploads (default: the number of CPU
    /// cores).
    #[arg(long, env = "VIDTUNE_INGEST_CONCURRENCY")]
    pub ingest_concurrency: Option<usize>,
    /// Longest accepted video, in seconds.
    #[arg(long, env = "VIDTUNE_MAX_VIDEO_SECONDS", default_value_t = 4.0 * 3600.0)]
    pub max_video_seconds: f64,
    /// Largest accepted frame, in pixels (width × height).
    #[arg(long, env = "VIDTUNE_MAX_VIDEO_PIXELS", default_value_t = 4096 * 2304)]
    pub max_video_pixels: u64,
    /// Most clips run through a model in one batch.
    #[arg(long, env = "VIDTUNE_MAX_BATCH_CLIPS", default_value_t = 16)]
    pub max_batch_clips: i64,
    /// How long a prediction waits for others to batch with, in milliseconds.
    #[arg(long, env = "VIDTUNE_MAX_BATCH_DELAY_MS", default_value_t = 10)]
    pub max_batch_delay_ms: u64,
    /// Predictions waiting per model before new ones are answered 503.
    #[arg(long, env = "VIDTUNE_PREDICT_QUEUE", default_value_t = 64)]
    pub predict_queue: usize,
    /// Time a prediction may wait for the model, in seconds.
    #[arg(long, env = "VIDTUNE_PREDICT_DEADLINE_SECS", default_value_t = 60)]
    pub predict_deadline_secs: u64,
    /// Memory for loaded models (parameters), in MiB; least recently used models are evicted.
    #[arg(long, env = "VIDTUNE_MODEL_MEMORY_MIB", default_value_t = 4096)]
    pub model_memory_mib: u64,
    /// Predictions per second per API key (0: unlimited).
    #[arg(long, env = "VIDTUNE_PREDICT_RATE", default_value_t = 20.0)]
    pub predict_rate: f64,
    /// Largest training cache of one video, in bytes (refused from the probe, before decoding).
    #[arg(long, env = "VIDTUNE_MAX_CACHE_BYTES", default_value_t = 32 << 30)]
    pub max_cache_bytes: u64,
    /// Largest ratio of a video frame's long side to its short side.
    #[arg(long, env = "VIDTUNE_MAX_ASPECT_RATIO", default_value_t = 4.0)]
    pub max_aspect_ratio: f64,
    /// Most bytes one archive may extract to, as a multiple of its own size (at least 16 MiB).
    #[arg(long, env = "VIDTUNE_ARCHIVE_MAX_EXPANSION", default_value_t = 20.0)]
    pub archive_max_expansion: f64,
    /// Most bytes one archive may extract to, whatever its size (default: 4 × the upload cap).
    #[arg(long, env = "VIDTUNE_ARCHIVE_MAX_EXTRACTED_BYTES")]
    pub archive_max_extracted_bytes: Option<u64>,
    /// Most entries (files, folders, links) in one archive.
    #[arg(long, env = "VIDTUNE_ARCHIVE_MAX_ENTRIES", default_value_t = 100_000)]
    pub archive_max_entries: usize,
    /// Pixels one prediction may feed its model, in millions: whole-video clips plus timeline
    /// windows, times frames × crop height × width (100: 500 clips of 16×112², or a timeline of
    /// 8,000 windows of 4×56²). Beyond it the answer is 422 `prediction_budget_exceeded`.
    #[arg(long, env = "VIDTUNE_PREDICT_MAX_MPIXELS", default_value_t = 100)]
    pub predict_max_mpixels: u64,
    /// Event streams (`job_events`) one API key may hold open at once; one more is 429.
    #[arg(long, env = "VIDTUNE_MAX_STREAMS_PER_KEY", default_value_t = 4)]
    pub max_streams_per_key: usize,
    /// Time allowed to decode one video at ingest, in seconds.
    #[arg(long, env = "VIDTUNE_DECODE_TIMEOUT_SECS", default_value_t = 600.0)]
    pub decode_timeout_secs: f64,
    /// A second address that serves only `/metrics`, without a key (for a Prometheus inside the
    /// cluster; keep it off public networks). On the API address `/metrics` needs an operator key.
    #[arg(long, env = "VIDTUNE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Let tenant keys register TorchScript backbones (`base_model_create`). A backbone is code
    /// that runs on the server, so by default only operator keys may. The variable takes
    /// true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "VIDTUNE_TENANT_BACKBONES", value_parser = clap::builder::BoolishValueParser::new())]
    pub tenant_backbones: bool,
    /// Longest a custom TorchScript backbone may take to load and run once on a zero clip
    /// when it is registered (its sandbox is killed then).
    #[arg(long, env = "VIDTUNE_SANDBOX_INSPECT_SECS", default_value_t = 120)]
    pub sandbox_inspect_secs: u64,
    /// Storage quota of a tenant without one of its own, in bytes (uploads, caches,
    /// checkpoints, models and backbones together; operators set a tenant's own quota).
    #[arg(long, env = "VIDTUNE_TENANT_QUOTA_BYTES", default_value_t = 1 << 40)]
    pub tenant_quota_bytes: u64,
    /// At start-up, files under the data directory that no record refers to are removed once
    /// they are this old (younger ones may be a write about to be recorded by another host).
    #[arg(long, env = "VIDTUNE_ORPHAN_GRACE_SECS", default_value_t = 3600)]
    pub orphan_grace_secs: u64,
    /// DICOMweb root of the PACS that dataset imports and predictions by study reference fetch
    /// from (e.g. https://pacs.example/dicom-web); none: both are refused.
    #[arg(long, env = "VIDTUNE_PACS_URL")]
    pub pacs_url: Option<String>,
    /// User for the PACS's HTTP basic authentication.
    #[arg(long, env = "VIDTUNE_PACS_USER")]
    pub pacs_user: Option<String>,
    /// File holding the PACS password (a mounted secret; preferred over VIDTUNE_PACS_PASSWORD).
    #[arg(long, env = "VIDTUNE_PACS_PASSWORD_FILE")]
    pub pacs_password_file: Option<PathBuf>,
    /// The PACS password itself (from the environment; never a command-line flag in practice).
    #[arg(long, env = "VIDTUNE_PACS_PASSWORD", hide_env_values = true)]
    pub pacs_password: Option<String>,
    /// Time for one PACS request (a search, or one instance's transfer).
    #[arg(long, env = "VIDTUNE_PACS_TIMEOUT_SECS", default_value_t = 300)]
    pub pacs_timeout_secs: u64,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Devices to run jobs on: `auto` (every CUDA device, else the CPU), `cpu`, or a list such as
    /// `cuda:0,cuda:1`.
    #[arg(long, env = "VIDTUNE_DEVICES", default_value = "auto")]
    pub devices: String,
    /// Directory shared with the API server.
    #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key (and the tenant, if new). The key is printed once, alone on the last line.
    Create {
        /// Tenant name (lowercase letters, digits, `_`, `.`, `-`).
        #[arg(long)]
        tenant: String,
        /// Allow the key to manage its own tenant's keys and read its audit trail.
        #[arg(long)]
        admin: bool,
        /// Make an operator key: also manages every tenant, pretrained weights, TorchScript
        /// backbones and `/metrics` (implies --admin). Only this command can make one.
        #[arg(long)]
        operator: bool,
        /// A label to tell keys apart.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Exit 0 when the key is valid and not revoked; print its role and tenant.
    Check {
        /// The API key.
        key: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// PostgreSQL URL to check (optional).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Data directory whose files the database records are checked against.
    #[arg(long, env = "VIDTUNE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

/// What the HTTP application needs, independent of how it was configured.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub request_timeout: Duration,
    pub max_json_bytes: usize,
    pub max_upload_bytes: u64,
    pub max_video_bytes: u64,
    pub ingest: IngestConfig,
    pub serve: crate::serve::ServeConfig,
    /// Where `/metrics` is served without a key, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Whether tenant (non-operator) keys may register TorchScript backbones.
    pub tenant_backbones: bool,
    /// Time a custom backbone gets to load and run once when it is registered, and when a job
    /// asks it for another clip size.
    pub inspect_timeout: Duration,
    /// Storage quota of a tenant without one of its own.
    pub tenant_quota_bytes: u64,
    /// Age after which a file no record refers to is removed at start-up.
    pub orphan_grace: Duration,
    /// Event streams one API key may hold open at once.
    pub max_streams_per_key: usize,
}

impl Settings {
    /// Settings for tests and embedding: port 0 on loopback, the given data directory, and
    /// `media_worker_exe` (the vidtune binary) for ingest's decoder processes.
    pub fn ephemeral(data_dir: PathBuf, media_worker_exe: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            request_timeout: Duration::from_secs(60),
            max_json_bytes: 1 << 20,
            max_upload_bytes: 50 << 30,
            max_video_bytes: 8 << 30,
            ingest: IngestConfig::new(media_worker_exe),
            serve: crate::serve::ServeConfig::default(),
            metrics_listen: None,
            tenant_backbones: false,
            inspect_timeout: Duration::from_secs(120),
            tenant_quota_bytes: 1 << 40,
            orphan_grace: Duration::from_secs(3600),
            max_streams_per_key: 4,
        }
    }

    pub fn from_args(a: &ServeArgs) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut ingest = IngestConfig::new(exe);
        if let Some(n) = a.ingest_concurrency {
            ingest.concurrency = n.max(1);
        }
        ingest.video_limits.max_duration_s = a.max_video_seconds;
        ingest.video_limits.max_pixels = a.max_video_pixels;
        ingest.video_limits.max_decode_s = a.decode_timeout_secs;
        ingest.video_limits.max_cache_bytes = a.max_cache_bytes;
        ingest.video_limits.max_aspect_ratio = a.max_aspect_ratio;
        ingest.archive_limits.max_total_bytes = a
            .archive_max_extracted_bytes
            .unwrap_or(a.max_upload_bytes.saturating_mul(4));
        ingest.archive_limits.max_expansion = a.archive_max_expansion;
        ingest.archive_limits.max_entries = a.archive_max_entries;
        ingest.max_instance_bytes = a.max_video_bytes;
        if let Some(url) = &a.pacs_url {
            let password = match &a.pacs_password_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| {
                            anyhow::anyhow!("the PACS password file {}: {e}", f.display())
                        })?
                        .trim()
                        .to_owned(),
                ),
                None => a.pacs_password.clone(),
            };
            ingest.pacs = Some(crate::pacs::PacsConfig {
                url: url.clone(),
                user: a.pacs_user.clone(),
                password,
                timeout: Duration::from_secs(a.pacs_timeout_secs.max(1)),
            });
        }
        Ok(Self {
            listen: a.listen,
            data_dir: a.data_dir.clone(),
            request_timeout: Duration::from_secs(a.request_timeout_secs),
            max_json_bytes: a.max_json_bytes,
            max_upload_bytes: a.max_upload_bytes,
            max_video_bytes: a.max_video_bytes,
            ingest,
            serve: crate::serve::ServeConfig {
                max_batch_clips: a.max_batch_clips,
                max_delay: Duration::from_millis(a.max_batch_delay_ms),
                queue: a.predict_queue,
                deadline: Duration::from_secs(a.predict_deadline_secs),
                memory_budget: a.model_memory_mib << 20,
                rate_per_s: a.predict_rate,
                max_input_pixels: a.predict_max_mpixels.saturating_mul(1_000_000),
            },
            metrics_listen: a.metrics_listen,
            tenant_backbones: a.tenant_backbones,
            inspect_timeout: Duration::from_secs(a.sandbox_inspect_secs),
            tenant_quota_bytes: a.tenant_quota_bytes,
            orphan_grace: Duration::from_secs(a.orphan_grace_secs),
            max_streams_per_key: a.max_streams_per_key.max(1),
        })
    }
}
