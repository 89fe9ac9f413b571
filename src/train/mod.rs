//! Fine-tuning: hyperparameters, the clip loader over the training cache, saveable optimizers,
//! evaluation, checkpoints, and the training loop that a job's child process runs (and that
//! `vidtune train` runs offline).
pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod hyper;
pub mod offline;
pub mod optim;
pub mod precision;
pub mod run;
pub mod splits;

/// Errors are classified: the user's fault fails the job at once, the machine's is retried.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    User(String),
    #[error(transparent)]
    System(#[from] anyhow::Error),
}

/// Whether this process is a supervised `train-job` child, whose stdout its worker reads.
static SUPERVISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Make [`alive`] speak: called by the `train-job` entry point. Elsewhere (tests, tools) the
/// training code runs silently.
pub fn supervised() {
    SUPERVISED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Tell the supervising worker that this attempt is alive: one line on stdout per batch. The
/// worker kills a child that stays silent past its stall timeout (a hang keeps no lease).
pub fn alive() {
    use std::io::Write;
    if !SUPERVISED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"alive\n");
    let _ = out.flush();
}
