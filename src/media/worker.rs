//! FFmpeg runs in a child process (`vidtune media-worker`), one video at a time, so a decoder
//! crash or hang on a hostile file costs that one file, never the API server.
//!
//! Protocol: one JSON [`Job`] per line on the child's stdin, one JSON [`Reply`] per line on its
//! stdout. A child that dies or overruns the deadline is killed and replaced for the next file.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::decode::{CacheSpec, Limits, Rejection, VideoInfo, ingest_any};

/// One video to validate and cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub src: PathBuf,
    pub cache: PathBuf,
    pub spec: CacheSpec,
    pub limits: Limits,
    /// For DICOM objects: the tenant's key for keyed identifiers, a label attribute.
    #[serde(default)]
    pub dicom: super::dicom::DicomJob,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Accepted(VideoInfo),
    Rejected(Rejection),
}

/// The child's main loop: answer jobs until stdin closes.
pub fn serve_stdio() -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let job: Job = serde_json::from_str(&line?)?;
        let reply = match ingest_any(&job.src, &job.cache, &job.spec, &job.limits, &job.dicom) {
            Ok(info) => Reply::Accepted(info),
            Err(r) => Reply::Rejected(r),
        };
        serde_json::to_writer(&mut stdout, &reply)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// Address-space limit of a media worker (`VIDTUNE_MEDIA_MEMORY_MIB`, default 8192). About
/// 3 GiB of it is the binary's own mappings (libtorch with its CUDA libraries, before any
/// allocation); the rest is enough for FFmpeg on a 4K stream with frame threads, not for a
/// decompression bomb.
fn media_memory_bytes() -> u64 {
    std::env::var("VIDTUNE_MEDIA_MEMORY_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(8192)
        << 20
}

/// A supervised `vidtune media-worker` child, started on first use.
pub struct MediaWorker {
    exe: PathBuf,
    running: Option<Running>,
}

impl MediaWorker {
    /// `exe` is the vidtune binary (the server's own executable).
    pub fn new(exe: &Path) -> Self {
        Self {
            exe: exe.to_path_buf(),
            running: None,
        }
    }

    fn spawn(&self) -> std::io::Result<Running> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("media-worker");
        // FFmpeg parses hostile bytes here: a cleared environment, bounded memory and
        // descriptors, no core dumps, and death with the server.
        crate::sandbox::contain(
            cmd.as_std_mut(),
            &[],
            &crate::sandbox::Limits {
                memory_bytes: Some(media_memory_bytes()),
                open_files: Some(256),
                ..Default::default()
            },
        );
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Ok(Running {
            child,
            stdin,
            stdout,
        })
    }

    /// Validate and cache one video within `deadline`.
    pub async fn run(&mut self, job: &Job, deadline: Duration) -> Result<VideoInfo, Rejection> {
        if self.running.is_none() {
            self.running = Some(self.spawn().map_err(|e| {
                Rejection::server(
                    "internal",
                    "the server could not start its decoder",
                    format!("cannot start the media worker {}: {e}", self.exe.display()),
                )
            })?);
        }
        let running = self.running.as_mut().expect("started above");
        let mut line = serde_json::to_vec(job).expect("job serialises");
        line.push(b'\n');
        let exchange = async {
            running.stdin.write_all(&line).await?;
            running.stdin.flush().await?;
            running.stdout.next_line().await
        };
        let outcome = tokio::time::timeout(deadline, exchange).await;
        let reply = match outcome {
            Ok(Ok(Some(text))) => serde_json::from_str::<Reply>(&text).map_err(|e| {
                Rejection::server(
                    "internal",
                    "the server could not read its decoder's answer",
                    format!("unreadable media worker reply: {e}"),
                )
            }),
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = self.stop().await;
                Err(Rejection::new(
                    "decoder_crashed",
                    format!("the decoder crashed on this file ({status})"),
                ))
            }
            Err(_) => {
                self.stop().await;
                Err(Rejection::new(
                    "decode_timeout",
                    format!("decoding took longer than {} s", deadline.as_secs()),
                ))
            }
        };
        // Whatever the child left behind for a failed file is not a cache.
        match reply {
            Ok(Reply::Accepted(info)) => Ok(info),
            Ok(Reply::Rejected(r)) | Err(r) => {
                let _ = std::fs::remove_file(&job.cache);
                let _ = std::fs::remove_file(job.cache.with_extension("part"));
                Err(r)
            }
        }
    }

    /// Kill the child (if any); describes how it ended.
    async fn stop(&mut self) -> String {
        match self.running.take() {
            Some(mut r) => {
                let _ = r.child.start_kill();
                match r.child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                }
            }
            None => "not running".into(),
        }
    }
}

/// A few long-lived media workers shared by request handlers (prediction uploads).
pub struct MediaPool {
    exe: PathBuf,
    idle: std::sync::Mutex<Vec<MediaWorker>>,
    permits: tokio::sync::Semaphore,
}

impl MediaPool {
    pub fn new(exe: &Path, size: usize) -> Self {
        Self {
            exe: exe.to_path_buf(),
            idle: std::sync::Mutex::default(),
            permits: tokio::sync::Semaphore::new(size.max(1)),
        }
    }

    /// Validate and cache one video on a pooled child (at most `size` at once).
    pub async fn run(&self, job: &Job, deadline: Duration) -> Result<VideoInfo, Rejection> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut worker = self
            .idle
            .lock()
            .expect("pool lock")
            .pop()
            .unwrap_or_else(|| MediaWorker::new(&self.exe));
        let result = worker.run(job, deadline).await;
        self.idle.lock().expect("pool lock").push(worker);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("fake-vidtune");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn job(dir: &Path) -> Job {
        Job {
            src: dir.join("in.mp4"),
            cache: dir.join("out.vtc"),
            spec: CacheSpec::default(),
            limits: Limits::default(),
            dicom: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_crashing_decoder_costs_one_file_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // Dies on the first job, as a decoder hitting a segfault would.
        let exe = script(dir.path(), "read line; kill -SEGV $$");
        let mut w = MediaWorker::new(&exe);
        let r = w
            .run(&job(dir.path()), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(r.code, "decoder_crashed", "{r:?}");
        // The next file gets a fresh child.
        let r = w
            .run(&job(dir.path()), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(r.code, "decoder_crashed");
    }

    #[tokio::test]
    async fn a_hanging_decoder_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let exe = script(dir.path(), "read line; sleep 60");
        let mut w = MediaWorker::new(&exe);
        let started = std::time::Instant::now();
        let r = w
            .run(&job(dir.path()), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(r.code, "decode_timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
