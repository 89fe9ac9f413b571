//! The base-model registry: pretrained weights for the built-in architectures (imported from
//! torchvision-format files, no Python involved) and tenants' own TorchScript backbones.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tch::Tensor;

use crate::backbone::{self, Arch, Preprocessing};
use crate::db::{self, base_models::BaseWeights};

/// Why an import did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not usable for this architecture (the message names the key or problem).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ImportError {
    fn from(e: sqlx::Error) -> Self {
        Self::Other(e.into())
    }
}

/// Where imported weights live: `weights/<arch>/<sha256>.safetensors` under the data directory.
pub fn weights_path(arch: Arch, sha256: &str) -> PathBuf {
    Path::new("weights")
        .join(arch.name())
        .join(format!("{sha256}.safetensors"))
}

/// Validate `file` against `arch` and install its backbone tensors. Importing the same file
/// again returns the existing record.
pub async fn import_weights(
    db: &PgPool,
    data_dir: &Path,
    arch: Arch,
    file: &Path,
    source: &str,
) -> Result<BaseWeights, ImportError> {
    let (file, data_dir) = (file.to_path_buf(), data_dir.to_path_buf());
    let (sha256, rel, count) = tokio::task::spawn_blocking(move || -> Result<_, ImportError> {
        let sha256 = crate::ingest::sha256_file(&file).context("hashing the weights file")?;
        let tensors = backbone::read_backbone_weights(arch, &file)
            .map_err(|e| ImportError::Invalid(format!("{e:#}")))?;
        let rel = weights_path(arch, &sha256);
        let dest = data_dir.join(&rel);
        std::fs::create_dir_all(dest.parent().expect("has a parent"))
            .context("creating weights dir")?;
        let part = dest.with_extension("part");
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &part).context("writing weights")?;
        std::fs::rename(&part, &dest).context("installing weights")?;
        Ok((sha256, rel, tensors.len()))
    })
    .await
    .context("import task")??;
    let record = db::base_models::insert_weights(
        db,
        arch.name(),
        &sha256,
        source,
        &rel.to_string_lossy(),
        count as i32,
    )
    .await?;
    Ok(record)
}

/// The hex digits an official file name promises, e.g. `b3b3357e` in `r3d_18-b3b3357e.pth`.
pub fn promised_hash_prefix(file_name: &str) -> Option<&str> {
    let stem = file_name.rsplit_once('.').map_or(file_name, |(s, _)| s);
    let (_, hash) = stem.rsplit_once('-')?;
    (hash.len() >= 6 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
}

/// Download the official torchvision checkpoint (needs internet and `curl`), check the hash
/// prefix in its name, and import it.
pub async fn pull_weights(
    db: &PgPool,
    data_dir: &Path,
    arch: Arch,
) -> Result<BaseWeights, ImportError> {
    let url = arch.official_weights();
    let name = url.rsplit('/').next().expect("url has a file name");
    let dir = data_dir.join("weights").join("incoming");
    std::fs::create_dir_all(&dir).context("creating download dir")?;
    let dest = dir.join(name);
    let status = tokio::process::Command::new("curl")
        .args(["-fL", "--retry", "3", "--progress-bar", "-o"])
        .arg(&dest)
        .arg(url)
        .status()
        .await
        .context("running curl (is it installed?)")?;
    if !status.success() {
        let _ = std::fs::remove_file(&dest);
        return Err(anyhow::anyhow!("downloading {url} failed ({status})").into());
    }
    let sha = crate::ingest::sha256_file(&dest).context("hashing the download")?;
    let promised = promised_hash_prefix(name).expect("official names carry a hash");
    if !sha.starts_with(promised) {
        let _ = std::fs::remove_file(&dest);
        return Err(ImportError::Invalid(format!(
            "{name}: SHA-256 {sha} does not start with {promised}; the download is corrupt"
        )));
    }
    let result = import_weights(db, data_dir, arch, &dest, url).await;
    let _ = std::fs::remove_file(&dest);
    result
}

/// What a TorchScript backbone turned out to be when tried on a clip.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ScriptInspection {
    pub feature_dim: i64,
}

/// The child-process side of [`inspect_torchscript`]: load the module and run it on a zero clip
/// of the declared shape. Prints the result as JSON; errors go to stderr.
pub fn inspect_torchscript_here(
    path: &Path,
    frames: i64,
    crop: i64,
) -> anyhow::Result<ScriptInspection> {
    let module =
        tch::CModule::load(path).map_err(|e| anyhow::anyhow!("not a TorchScript module: {e}"))?;
    let x = Tensor::zeros(
        [2, 3, frames, crop, crop],
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let out = tch::no_grad(|| module.forward_ts(&[x])).map_err(|e| {
        anyhow::anyhow!("the module does not accept a [N, 3, T, H, W] float clip: {e}")
    })?;
    let size = out.size();
    if size.len() != 2 || size[0] != 2 || size[1] < 1 {
        anyhow::bail!("the module must return [N, D] features; for N = 2 it returned {size:?}");
    }
    Ok(ScriptInspection {
        feature_dim: size[1],
    })
}

/// Try an uploaded TorchScript module in a child process (a hostile or broken module can
/// crash libtorch; it must not take the server with it).
pub async fn inspect_torchscript(
    exe: &Path,
    path: &Path,
    prep: &Preprocessing,
) -> Result<ScriptInspection, ImportError> {
    let child = tokio::process::Command::new(exe)
        .arg("inspect-torchscript")
        .arg(path)
        .args([
            "--frames",
            &prep.frames.to_string(),
            "--crop",
            &prep.crop.to_string(),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .map_err(|_| {
            ImportError::Invalid("the module did not finish a forward pass within 120 s".into())
        })?
        .context("starting the inspection process")?;
    if out.status.success() {
        serde_json::from_slice(&out.stdout)
            .map_err(|e| ImportError::Other(anyhow::anyhow!("unreadable inspection result: {e}")))
    } else {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg
            .trim()
            .lines()
            .last()
            .unwrap_or("the module crashed libtorch")
            .to_owned();
        Err(ImportError::Invalid(
            msg.trim_start_matches("error: ").to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names_promise_a_hash_prefix() {
        assert_eq!(
            promised_hash_prefix("r2plus1d_18-91a641e6.pth"),
            Some("91a641e6")
        );
        assert_eq!(
            promised_hash_prefix("resnet50-11ad3fa6.pth"),
            Some("11ad3fa6")
        );
        assert_eq!(promised_hash_prefix("weights.pth"), None);
        for a in Arch::ALL {
            assert!(
                promised_hash_prefix(a.official_weights().rsplit('/').next().unwrap()).is_some()
            );
        }
    }
}
