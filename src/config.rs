//! Command-line flags. Every flag has a `VIDTUNE_*` environment fallback (the database URL uses
//! the conventional `DATABASE_URL`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
        /// Allow the key to manage tenants and keys.
        #[arg(long)]
        admin: bool,
        /// A label to tell keys apart.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Exit 0 when the key is valid and not revoked; print its tenant.
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
}

/// What the HTTP application needs, independent of how it was configured.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub request_timeout: Duration,
    pub max_json_bytes: usize,
}

impl Settings {
    /// Settings for tests and embedding: port 0 on loopback, the given data directory.
    pub fn ephemeral(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            request_timeout: Duration::from_secs(60),
            max_json_bytes: 1 << 20,
        }
    }
}

impl From<&ServeArgs> for Settings {
    fn from(a: &ServeArgs) -> Self {
        Self {
            listen: a.listen,
            data_dir: a.data_dir.clone(),
            request_timeout: Duration::from_secs(a.request_timeout_secs),
            max_json_bytes: a.max_json_bytes,
        }
    }
}
