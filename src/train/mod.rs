//! Fine-tuning: hyperparameters, the clip loader over the training cache, saveable optimizers,
//! metrics, checkpoints, and the training loop that a job's child process runs.
pub mod data;
pub mod hyper;
pub mod metrics;
pub mod optim;
pub mod run;
