//! Model downloads, built once in the model's directory and kept there: the safetensors
//! weights with their metadata as a tar, or a TorchScript trace for use without vidtune.
use std::path::{Path, PathBuf};

use anyhow::Context;
use tch::{Device, Kind, Tensor};
use uuid::Uuid;

use super::ModelMeta;
use super::meta::load_classifier;
use crate::backbone::{Base, export};

/// A download format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A tar of `model.safetensors` and `model.json` (the default).
    Safetensors,
    /// Traced; input a normalised `[N, 3, T, H, W]` clip, output logits.
    TorchScript,
}

impl ExportFormat {
    /// The format named in a request; `None` names the default.
    pub fn parse(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("safetensors") {
            "safetensors" => Some(Self::Safetensors),
            "torchscript" => Some(Self::TorchScript),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Safetensors => "application/x-tar",
            Self::TorchScript => "application/octet-stream",
        }
    }

    /// The name a download of model `id` is saved under.
    pub fn file_name(self, id: Uuid) -> String {
        match self {
            Self::Safetensors => format!("model-{id}.tar"),
            Self::TorchScript => format!("model-{id}.ts.pt"),
        }
    }
}

/// Why a model cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A custom backbone runs only in its sandbox; tracing would run it in the server.
    #[error("models on a custom TorchScript backbone export as safetensors only")]
    CustomBackbone,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The tar of the model in `dir` (written on first use, complete or not at all).
pub async fn export_safetensors(dir: &Path) -> anyhow::Result<PathBuf> {
    let tar = dir.join("export.tar");
    if !tar.exists() {
        let d = dir.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let part = d.join("export.tar.part");
            let mut b = tar::Builder::new(std::fs::File::create(&part)?);
            b.append_path_with_name(d.join("model.safetensors"), "model.safetensors")?;
            b.append_path_with_name(d.join("model.json"), "model.json")?;
            drop(b.into_inner()?);
            crate::datadir::durable_rename(&part, &d.join("export.tar"))?;
            Ok(())
        })
        .await??;
    }
    Ok(tar)
}

/// The TorchScript trace of the model `meta` stored in `dir` (traced on first use).
pub async fn export_torchscript(meta: &ModelMeta, dir: &Path) -> Result<PathBuf, ExportError> {
    let ts = dir.join("model.ts.pt");
    if !ts.exists() {
        if matches!(meta.base, Base::TorchScript { .. }) {
            return Err(ExportError::CustomBackbone);
        }
        let (meta, out) = (meta.clone(), ts.clone());
        tokio::task::spawn_blocking(move || trace(&meta, &out))
            .await
            .context("tracing")??;
    }
    Ok(ts)
}

fn trace(meta: &ModelMeta, out: &Path) -> anyhow::Result<()> {
    let (vs, model) = load_classifier(meta, Device::Cpu)?;
    let p = &meta.preprocessing;
    let example = Tensor::zeros([1, 3, p.frames, p.crop, p.crop], (Kind::Float, Device::Cpu));
    let part = out.with_extension("part");
    export::write_torchscript(&vs, &model, &example, &part)?;
    crate::datadir::durable_rename(&part, out)?;
    Ok(())
}
