//! Checkpoints of an attempt: the weights, the optimizer's state and the loop's state after an
//! epoch, written under a part name and renamed into place, so a checkpoint is whole or absent.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::optim::Optimizer;

/// Loop state saved with every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopState {
    /// Epochs completed.
    pub epochs_done: u32,
    pub step: i64,
    pub optimizer_step: i64,
    pub best_epoch: Option<u32>,
    pub best_value: Option<f64>,
    /// Early stopping: the best value of its metric and the epochs since it improved.
    pub es_best: Option<f64>,
    pub es_bad: u32,
}

/// The directory of epoch `epoch`'s checkpoint under `root`.
pub fn epoch_dir(root: &Path, epoch: u32) -> PathBuf {
    root.join(format!("epoch-{epoch:04}"))
}

/// Save the state after `state.epochs_done` epochs under `root`; returns its directory.
/// `attempt` names the part directory, so two attempts never write into one.
pub fn save(
    root: &Path,
    attempt: i32,
    vs: &VarStore,
    opt: &Optimizer,
    state: &LoopState,
) -> anyhow::Result<PathBuf> {
    let dir = epoch_dir(root, state.epochs_done);
    let name = dir.file_name().expect("epoch dir has a name").to_owned();
    let part = root.join(format!("{}.part-{attempt}", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&part);
    std::fs::create_dir_all(&part)?;
    vs.save(part.join("model.safetensors"))
        .context("saving weights")?;
    let opt_state = opt.state_tensors();
    let named: Vec<(&str, &Tensor)> = opt_state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if named.is_empty() {
        let empty = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("opt.none", &empty)], part.join("optimizer.safetensors"))?;
    } else {
        Tensor::write_safetensors(&named, part.join("optimizer.safetensors"))?;
    }
    std::fs::write(part.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&part, &dir)?;
    Ok(dir)
}

/// Restore weights and optimizer from the checkpoint in `dir`; returns the loop state.
pub fn load(dir: &Path, vs: &mut VarStore, opt: &mut Optimizer) -> anyhow::Result<LoopState> {
    vs.load(dir.join("model.safetensors"))
        .context("loading the checkpoint's weights")?;
    let opt_state = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
        .context("loading optimizer state")?;
    let saved = std::fs::read(dir.join("state.json")).context("reading checkpoint state")?;
    let state: LoopState = serde_json::from_slice(&saved).context("checkpoint state")?;
    opt.load_state(state.optimizer_step, &opt_state);
    Ok(state)
}

/// Keep the newest `keep` checkpoints and the best one.
pub fn prune(root: &Path, keep: usize, best: Option<u32>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut epochs: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("epoch-")?.parse::<u32>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    epochs.sort();
    let cut = epochs.len().saturating_sub(keep);
    for (n, path) in &epochs[..cut] {
        if Some(*n) != best {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}
