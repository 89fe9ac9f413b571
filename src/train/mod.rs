//! Fine-tuning: hyperparameters, the clip loader over the training cache, saveable optimizers,
//! evaluation, checkpoints, and the training loop that a job's child process runs.
pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod hyper;
pub mod optim;
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

/// Tell the supervising worker that this attempt is alive: one line on stdout per batch. The
/// worker kills a child that stays silent past its stall timeout (a hang keeps no lease).
pub fn alive() {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"alive\n");
    let _ = out.flush();
}
