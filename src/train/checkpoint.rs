//! Checkpoints of an attempt: the weights, the optimizer's state and the loop's state after an
//! epoch, written under a part name and durably renamed into place, so a checkpoint is whole or
//! absent, also after a crash.
//!
//! Each attempt writes only under its own `attempt-N/` folder, so a stale attempt that has not
//! yet noticed it was fenced out can never replace the files a newer attempt resumed from.
//! Another attempt's files are removed only by [`prune`], which the loop calls after its own
//! checkpoint was recorded (the fenced database write that proves it still holds the job).
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
    /// What the job computes in, as its first attempt decided (absent in older checkpoints).
    #[serde(default)]
    pub precision: Option<super::precision::Decided>,
}

/// The folder of attempt `attempt`'s checkpoints under a job's checkpoint `root`.
pub fn attempt_dir(root: &Path, attempt: i32) -> PathBuf {
    root.join(format!("attempt-{attempt}"))
}

/// The directory of epoch `epoch`'s checkpoint in an attempt's folder.
pub fn epoch_dir(attempt_dir: &Path, epoch: u32) -> PathBuf {
    attempt_dir.join(format!("epoch-{epoch:04}"))
}

/// The attempts that have a folder under `root`, with their folders.
fn attempts(root: &Path) -> Vec<(i32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(i32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("attempt-")?.parse::<i32>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest checkpoint of epoch `epoch` of any attempt under `root`.
pub fn find(root: &Path, epoch: u32) -> Option<PathBuf> {
    attempts(root)
        .into_iter()
        .rev()
        .map(|(_, dir)| epoch_dir(&dir, epoch))
        .find(|d| d.is_dir())
}

/// A checkpoint taken in memory at the end of an epoch: copies of the weights, the optimizer's
/// state and the loop's state, which another thread writes while training goes on (the
/// optimizer updates the live tensors in place, so the copies are what makes that safe).
pub struct Snapshot {
    weights: Vec<(String, Tensor)>,
    optimizer: Vec<(String, Tensor)>,
    state: LoopState,
}

impl Snapshot {
    /// Copy the state after `state.epochs_done` epochs. Variables for which `keep` is false
    /// are left out: frozen ones, which the attempt restores from the base weights.
    pub fn take(
        vs: &VarStore,
        opt: &Optimizer,
        state: &LoopState,
        keep: impl Fn(&str) -> bool,
    ) -> Self {
        let _g = tch::no_grad_guard();
        let mut weights: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, t)| (name, host_copy(&t)))
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        let optimizer = opt
            .state_tensors()
            .into_iter()
            .map(|(name, t)| (name, host_copy(&t)))
            .collect();
        Self {
            weights,
            optimizer,
            state: state.clone(),
        }
    }

    /// Bytes of tensor data held.
    pub fn bytes(&self) -> u64 {
        self.weights
            .iter()
            .chain(&self.optimizer)
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }

    /// Write it under `root`, in attempt `attempt`'s own folder, whole or not at all; returns
    /// its directory.
    pub fn write(self, root: &Path, attempt: i32) -> anyhow::Result<PathBuf> {
        let dir = epoch_dir(&attempt_dir(root, attempt), self.state.epochs_done);
        let part = dir.with_extension("part");
        let _ = std::fs::remove_dir_all(&part);
        std::fs::create_dir_all(&part)?;
        Tensor::write_safetensors(&self.weights, part.join("model.safetensors"))
            .context("saving weights")?;
        if self.optimizer.is_empty() {
            let empty = Tensor::zeros([1], (Kind::Float, Device::Cpu));
            Tensor::write_safetensors(&[("opt.none", &empty)], part.join("optimizer.safetensors"))?;
        } else {
            Tensor::write_safetensors(&self.optimizer, part.join("optimizer.safetensors"))?;
        }
        std::fs::write(
            part.join("state.json"),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        // Only this attempt writes in its folder: what is there is its own unrecorded leftover.
        let _ = std::fs::remove_dir_all(&dir);
        crate::datadir::durable_rename(&part, &dir).context("moving the checkpoint into place")?;
        Ok(dir)
    }
}

/// A copy of `t` in host memory that shares nothing with it.
fn host_copy(t: &Tensor) -> Tensor {
    let t = t.detach();
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

/// Save the state after `state.epochs_done` epochs under `root`, in attempt `attempt`'s own
/// folder, every variable included; returns its directory.
pub fn save(
    root: &Path,
    attempt: i32,
    vs: &VarStore,
    opt: &Optimizer,
    state: &LoopState,
) -> anyhow::Result<PathBuf> {
    Snapshot::take(vs, opt, state, |_| true).write(root, attempt)
}

/// Load a checkpoint's weights into `vs`. A checkpoint may leave out variables for which
/// `may_lack` is true (frozen ones, already holding the base weights); any other missing
/// variable is an error.
pub fn load_weights(
    dir: &Path,
    vs: &mut VarStore,
    may_lack: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let missing = vs
        .load_partial(dir.join("model.safetensors"))
        .context("loading the checkpoint's weights")?;
    let lacking: Vec<&String> = missing.iter().filter(|n| !may_lack(n)).collect();
    anyhow::ensure!(
        lacking.is_empty(),
        "the checkpoint in {} lacks {} trainable variable(s), e.g. {}",
        dir.display(),
        lacking.len(),
        lacking[0]
    );
    Ok(())
}

/// Restore weights and optimizer from the checkpoint in `dir`; returns the loop state.
pub fn load(
    dir: &Path,
    vs: &mut VarStore,
    opt: &mut Optimizer,
    may_lack: impl Fn(&str) -> bool,
) -> anyhow::Result<LoopState> {
    load_weights(dir, vs, may_lack)?;
    let opt_state = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
        .context("loading optimizer state")?;
    let saved = std::fs::read(dir.join("state.json")).context("reading checkpoint state")?;
    let state: LoopState = serde_json::from_slice(&saved).context("checkpoint state")?;
    opt.load_state(state.optimizer_step, &opt_state);
    Ok(state)
}

/// Keep attempt `attempt`'s newest `keep` checkpoints and the best one; of earlier attempts keep
/// only the best epoch. Call only after this attempt's newest checkpoint was recorded (the
/// fenced write): newer attempts' folders are never touched.
pub fn prune(root: &Path, attempt: i32, keep: usize, best: Option<u32>) {
    for (n, dir) in attempts(root) {
        if n < attempt {
            prune_attempt(&dir, 0, best);
            if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none()) {
                let _ = std::fs::remove_dir(&dir);
            }
        } else if n == attempt {
            prune_attempt(&dir, keep, best);
        }
    }
}

fn prune_attempt(dir: &Path, keep: usize, best: Option<u32>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
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
            let _ = crate::datadir::remove_durably(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(root: &Path, attempt: i32, epoch: u32) -> PathBuf {
        let d = epoch_dir(&attempt_dir(root, attempt), epoch);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state.json"), format!("{attempt}/{epoch}")).unwrap();
        d
    }

    #[test]
    fn attempts_keep_their_own_folders_and_pruning_never_touches_a_newer_attempt() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Attempt 1 saved epochs 1-3 (best 2); attempt 2 resumed after epoch 3 and saved 4.
        for e in 1..=3 {
            fake(root, 1, e);
        }
        fake(root, 2, 4);
        // A stale attempt 1 pruning (it cannot know it was fenced out) leaves attempt 2 alone.
        prune(root, 1, 1, Some(2));
        assert!(epoch_dir(&attempt_dir(root, 2), 4).is_dir());
        // Attempt 2, having recorded epoch 4, keeps its newest and the best of attempt 1.
        fake(root, 2, 5);
        prune(root, 2, 1, Some(2));
        let left: Vec<_> = walk(root);
        assert_eq!(left, ["attempt-1/epoch-0002", "attempt-2/epoch-0005"]);
        assert_eq!(find(root, 2), Some(epoch_dir(&attempt_dir(root, 1), 2)));
        assert_eq!(find(root, 5), Some(epoch_dir(&attempt_dir(root, 2), 5)));
        assert_eq!(find(root, 3), None);
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for (_, a) in attempts(root) {
            for e in std::fs::read_dir(&a).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    }
}
