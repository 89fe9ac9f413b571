//! The base-model registry: pretrained weights for the built-in architectures (imported from
//! torchvision-format files, no Python involved) and tenants' own TorchScript backbones.
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tch::Tensor;
use uuid::Uuid;

use crate::backbone::{self, Arch, Base, Preprocessing};
use crate::datadir::DataDir;
use crate::db::{
    self,
    base_models::{BaseWeights, CustomBackbone},
};

/// Why an import or a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not usable for this architecture (the message names the key or problem).
    #[error("{0}")]
    Invalid(String),
    /// A field of the registration is out of range (the field as the API names it).
    #[error("{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    /// The tenant already has a base model of this name.
    #[error("a base model with this name already exists")]
    NameTaken,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ImportError {
    fn from(e: sqlx::Error) -> Self {
        Self::Other(e.into())
    }
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
        let rel = DataDir::weights_relative(arch.name(), &sha256);
        let dest = data_dir.join(&rel);
        std::fs::create_dir_all(dest.parent().expect("has a parent"))
            .context("creating weights dir")?;
        let part = dest.with_extension("part");
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &part).context("writing weights")?;
        crate::datadir::durable_rename(&part, &dest).context("installing weights")?;
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

/// A base model by the name a job or model record uses: a built-in architecture or one of the
/// tenant's TorchScript backbones. The one place that tells the two apart.
#[derive(Debug, Clone)]
pub enum BaseModel {
    Builtin(Arch),
    Custom(CustomBackbone),
}

impl BaseModel {
    /// What to build: the architecture, or the backbone's module file under `data_dir`.
    pub fn base(&self, data_dir: &DataDir) -> Base {
        match self {
            BaseModel::Builtin(arch) => Base::Builtin(*arch),
            BaseModel::Custom(b) => Base::TorchScript {
                path: data_dir.resolve(&b.path),
                feature_dim: i64::from(b.feature_dim),
            },
        }
    }

    /// The input the base model was made for (frames, size, normalisation).
    pub fn preprocessing(&self) -> anyhow::Result<Preprocessing> {
        match self {
            BaseModel::Builtin(arch) => Ok(arch.preprocessing()),
            BaseModel::Custom(b) => serde_json::from_value(b.preprocessing.clone())
                .context("the backbone's stored preprocessing"),
        }
    }

    /// How many stages `freeze.stages` may count (a TorchScript backbone is one).
    pub fn stage_count(&self) -> usize {
        match self {
            BaseModel::Builtin(arch) => arch.stages().len(),
            BaseModel::Custom(_) => 1,
        }
    }
}

/// Resolve `name` for `tenant_id`; `None` when it names neither an architecture nor one of the
/// tenant's backbones.
pub async fn resolve(
    db: impl sqlx::PgExecutor<'_>,
    tenant_id: Uuid,
    name: &str,
) -> sqlx::Result<Option<BaseModel>> {
    match Arch::parse(name) {
        Some(arch) => Ok(Some(BaseModel::Builtin(arch))),
        None => Ok(db::base_models::get_custom_by_name(db, tenant_id, name)
            .await?
            .map(BaseModel::Custom)),
    }
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
    let dir = DataDir::new(data_dir).weights_incoming();
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

/// A TorchScript backbone as a tenant registers it; its module is already received.
pub struct NewBackbone<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: &'a str,
    pub description: &'a str,
    /// The input the module takes, as JSON; R(2+1)D-18's when absent.
    pub preprocessing: Option<&'a str>,
    /// Where the module was received, relative to the data directory
    /// ([`DataDir::backbone_relative`]).
    pub module: &'a Path,
    pub sha256: &'a str,
    /// The module's size, counted against the tenant's storage quota.
    pub bytes: u64,
}

/// Check a registration, try the module on a clip of its declared shape (in its sandbox) and
/// record it.
pub async fn register_backbone(
    db: &PgPool,
    data: &DataDir,
    b: &NewBackbone<'_>,
    inspect_timeout: Duration,
) -> Result<CustomBackbone, ImportError> {
    let name = b.name.trim();
    if name.is_empty() || b.name.chars().count() > 100 || Arch::parse(name).is_some() {
        return Err(ImportError::Field {
            field: "name",
            message: "1 to 100 characters, not the name of a built-in architecture".into(),
        });
    }
    let prep: Preprocessing = match b.preprocessing {
        None => Arch::R2plus1d18.preprocessing(),
        Some(text) => serde_json::from_str(text).map_err(|e| ImportError::Field {
            field: "preprocessing",
            message: format!("invalid preprocessing spec: {e}"),
        })?,
    };
    if !(1..=256).contains(&prep.frames) || !(16..=1024).contains(&prep.crop) {
        return Err(ImportError::Field {
            field: "preprocessing",
            message: "frames 1–256 and crop 16–1024".into(),
        });
    }
    let module = data.resolve(b.module);
    let inspected = inspect_torchscript(&module, &prep, inspect_timeout).await?;
    // The module was received (and flushed) at its final name: flush that name before the
    // record refers to it.
    tokio::task::spawn_blocking(move || crate::datadir::sync_in_place(&module))
        .await
        .context("flushing the module")?
        .context("flushing the module")?;
    let row = db::base_models::NewCustomBackbone {
        id: b.id,
        tenant_id: b.tenant_id,
        name,
        description: b.description,
        feature_dim: inspected.feature_dim as i32,
        preprocessing: serde_json::to_value(&prep).expect("serialises"),
        sha256: b.sha256,
        path: &b.module.to_string_lossy(),
        bytes: b.bytes as i64,
    };
    match db::base_models::insert_custom(db, &row).await {
        Ok(b) => Ok(b),
        Err(e) if db::is_unique_violation(&e) => Err(ImportError::NameTaken),
        Err(e) => Err(e.into()),
    }
}

/// What a TorchScript backbone turned out to be when tried on a clip.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ScriptInspection {
    pub feature_dim: i64,
}

/// Try an uploaded TorchScript module on a zero clip of the declared shape, in a sandboxed
/// script host (`backbone::script_host`): the module is code, and it must not run here.
/// `timeout` bounds the whole try; a module that loops or hangs is killed.
pub async fn inspect_torchscript(
    path: &Path,
    prep: &Preprocessing,
    timeout: Duration,
) -> Result<ScriptInspection, ImportError> {
    let (path, frames, crop) = (path.to_path_buf(), prep.frames, prep.crop);
    // The host is started from this blocking thread and dies with it at the latest (the
    // parent-death signal follows the thread): it is only needed for the duration of the call.
    let feature_dim = tokio::task::spawn_blocking(move || {
        backbone::script_host::inspect(&path, frames, crop, timeout)
    })
    .await
    .context("inspection task")?
    .map_err(|e| ImportError::Invalid(format!("{e:#}")))?;
    Ok(ScriptInspection { feature_dim })
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
