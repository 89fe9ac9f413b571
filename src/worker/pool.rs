//! The worker pool: one claim loop per device, each running one job at a time in a
//! `vidtune train-job` child process so a libtorch abort or segfault costs an attempt, never the
//! worker. The loop renews the job's lease while the child runs, kills a child whose attempt was
//! reclaimed, and classifies how the child ended.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use uuid::Uuid;

use super::Device;
use crate::db;

/// How workers run.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The vidtune binary (started as `train-job`).
    pub exe: PathBuf,
    pub database_url: String,
    pub data_dir: PathBuf,
    /// A claimed job is reclaimed by others when its lease lapses this long.
    pub lease: Duration,
    /// How often a running job's lease is renewed (well under `lease`).
    pub heartbeat: Duration,
    /// Polling fallback when no notification arrives.
    pub poll: Duration,
    /// Time a canceled child gets to stop by itself before it is killed.
    pub cancel_grace: Duration,
    /// A child that reports no progress (a training or evaluation batch, a checkpoint) for
    /// this long is hung: it is killed and the attempt fails as a system error, so a hung
    /// process does not keep its lease forever (`VIDTUNE_STALL_TIMEOUT_SECS`).
    pub stall: Duration,
}

impl PoolConfig {
    pub fn new(exe: PathBuf, database_url: String, data_dir: PathBuf) -> Self {
        Self {
            exe,
            database_url,
            data_dir,
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            poll: Duration::from_secs(5),
            cancel_grace: Duration::from_secs(30),
            stall: Duration::from_secs(
                std::env::var("VIDTUNE_STALL_TIMEOUT_SECS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1800),
            ),
        }
    }
}

/// Run one claim loop per device until `shutdown` turns true. Running jobs are stopped at
/// shutdown (their lease lapses and another worker resumes them from the last checkpoint).
pub async fn run(
    db: PgPool,
    cfg: Arc<PoolConfig>,
    devices: Vec<Device>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for device in devices {
        let (db, cfg, shutdown) = (db.clone(), cfg.clone(), shutdown.clone());
        tasks.spawn(async move { device_loop(db, cfg, device, shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

fn worker_id(device: Device) -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    format!("{}:{}:{device}", host.trim(), std::process::id())
}

async fn device_loop(
    db: PgPool,
    cfg: Arc<PoolConfig>,
    device: Device,
    mut shutdown: watch::Receiver<bool>,
) {
    let id = worker_id(device);
    let mut listener = db::jobs::listen_queue(&db).await;
    tracing::info!(worker = %id, "worker ready");
    // Stop when told to, or when whoever could tell us is gone.
    let stopping = |rx: &watch::Receiver<bool>| *rx.borrow() || rx.has_changed().is_err();
    while !stopping(&shutdown) {
        if let Err(e) = db::jobs::reap_expired(&db).await {
            tracing::warn!(error = %e, "reaping expired leases");
        }
        let claimed = db::jobs::claim(&db, &id, device, cfg.lease.as_secs_f64()).await;
        match claimed {
            Ok(Some((job, attempt))) => {
                tracing::info!(%job, attempt, device = %device, "claimed job");
                run_attempt(&db, &cfg, device, job, attempt, &mut shutdown).await;
            }
            Ok(None) => {
                // Wait for a NOTIFY, the polling interval, or shutdown.
                let notified = async {
                    match listener.as_mut() {
                        Some(l) => {
                            let _ = l.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = notified => {},
                    () = tokio::time::sleep(cfg.poll) => {},
                    _ = shutdown.changed() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a job failed; retrying");
                tokio::time::sleep(cfg.poll).await;
            }
        }
    }
    tracing::info!(worker = %id, "worker stopped");
}

async fn run_attempt(
    db: &PgPool,
    cfg: &PoolConfig,
    device: Device,
    job: Uuid,
    attempt: i32,
    shutdown: &mut watch::Receiver<bool>,
) {
    let _ = db::jobs::event_unfenced(
        db,
        job,
        attempt,
        "state",
        "info",
        &format!("running on {device} (attempt {attempt})"),
        serde_json::json!({"state": "running", "device": device.to_string(), "attempt": attempt}),
    )
    .await;
    let mut cmd = tokio::process::Command::new(&cfg.exe);
    cmd.arg("train-job").args([
        "--job",
        &job.to_string(),
        "--attempt",
        &attempt.to_string(),
        "--device",
        &device.to_string(),
    ]);
    // The child gets what it needs and nothing else: no inherited environment (the server's
    // may hold secrets), no inherited descriptors, and it dies with this process.
    crate::sandbox::contain(
        cmd.as_std_mut(),
        &[
            ("DATABASE_URL", cfg.database_url.as_ref()),
            ("VIDTUNE_DATA_DIR", cfg.data_dir.as_os_str()),
            ("VIDTUNE_LOG_FORMAT", "json".as_ref()),
        ],
        &crate::sandbox::Limits {
            open_files: Some(4096),
            ..Default::default()
        },
    );
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = db::jobs::retry_or_fail(
                db,
                job,
                attempt,
                &format!("cannot start the training process: {e}"),
            )
            .await;
            return;
        }
    };
    // Keep the tail of the child's log for the error message.
    let stderr = child.stderr.take().expect("piped stderr");
    let tail = Arc::new(std::sync::Mutex::new(VecDeque::<String>::new()));
    let tail_w = tail.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut t = tail_w.lock().expect("tail lock");
            if t.len() == 20 {
                t.pop_front();
            }
            t.push_back(line);
        }
    });

    // The child prints a line on stdout for every batch it finishes: the watchdog's food.
    let stdout = child.stdout.take().expect("piped stdout");
    let last_progress = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    let progress_w = last_progress.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            *progress_w.lock().expect("progress lock") = tokio::time::Instant::now();
        }
    });

    let mut beat = tokio::time::interval(cfg.heartbeat);
    beat.tick().await;
    let mut cancel_seen: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = beat.tick() => {
                let quiet = last_progress.lock().expect("progress lock").elapsed();
                if quiet > cfg.stall {
                    let _ = child.kill().await;
                    let msg = format!(
                        "the training process made no progress for {} s and was stopped",
                        quiet.as_secs()
                    );
                    tracing::warn!(%job, attempt, error = %msg, "attempt stalled");
                    retry_or_fail(db, job, attempt, &msg).await;
                    return;
                }
                match db::jobs::heartbeat(db, job, attempt, cfg.lease.as_secs_f64()).await {
                    Ok(None) => {
                        tracing::warn!(%job, attempt, "attempt was reclaimed; stopping its process");
                        let _ = child.kill().await;
                        return;
                    }
                    Ok(Some(true)) => {
                        let since = *cancel_seen.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > cfg.cancel_grace {
                            let _ = child.kill().await;
                            let _ = db::jobs::finish(db, job, attempt, db::jobs::JobState::Canceled, None, None).await;
                            let _ = db::jobs::event_unfenced(db, job, attempt, "state", "info", "canceled", serde_json::json!({"state": "canceled"})).await;
                            return;
                        }
                    }
                    Ok(Some(false)) => {}
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            changed = shutdown.changed() => {
                if changed.is_ok() && !*shutdown.borrow() {
                    continue;
                }
                // The lease lapses and the job is resumed elsewhere from its last checkpoint.
                let _ = child.kill().await;
                return;
            }
        }
    };
    match status {
        Ok(s) if s.success() => {}
        other => {
            let last = tail
                .lock()
                .expect("tail lock")
                .iter()
                .rev()
                .find_map(|l| error_line(l));
            let how = match &other {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            let msg = match last {
                Some(m) if m.to_lowercase().contains("out of memory") => {
                    format!("out of memory on {device}: {m}")
                }
                Some(m) => format!("the training process failed ({how}): {m}"),
                None => format!("the training process crashed ({how})"),
            };
            tracing::warn!(%job, attempt, error = %msg, "attempt failed");
            retry_or_fail(db, job, attempt, &msg).await;
        }
    }
}

/// A machine fault ended the attempt: back to the queue (or failed when none are left), with
/// the reason as a job event.
async fn retry_or_fail(db: &PgPool, job: Uuid, attempt: i32, msg: &str) {
    if let Ok(true) = db::jobs::retry_or_fail(db, job, attempt, msg).await {
        let _ = db::jobs::event_unfenced(
            db,
            job,
            attempt,
            "state",
            "warning",
            msg,
            serde_json::json!({"state": "retry_or_fail"}),
        )
        .await;
    }
}

/// The message of a JSON log line at error level, or a plain `error:` line.
fn error_line(line: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if v["level"] == "ERROR" {
            return v["fields"]["message"]
                .as_str()
                .map(|m| match v["fields"]["error"].as_str() {
                    Some(e) => format!("{m}: {e}"),
                    None => m.to_owned(),
                });
        }
        return None;
    }
    line.strip_prefix("error: ").map(str::to_owned)
}
