//! Fine-tuning: hyperparameters, the clip loader over the training cache, saveable optimizers,
//! evaluation, checkpoints, and the training loop that a job's child process runs.
pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod hyper;
pub mod optim;
pub mod run;
pub mod splits;
