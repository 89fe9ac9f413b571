//! From a `models` record to what serving, export and batch predictions need: the parsed
//! specs, the backbone, the weights' path; and the classifier rebuilt from them.
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;
use sqlx::PgExecutor;
use tch::Device;
use tch::nn::VarStore;
use uuid::Uuid;

use crate::backbone::{Base, Freeze, HeadSpec, Preprocessing, VideoClassifier};
use crate::datadir::DataDir;
use crate::db;
use crate::media::decode::CacheSpec;
use crate::registry;

/// What serving needs to know about a model (from its `models` row).
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub id: Uuid,
    pub base: Base,
    pub classes: Vec<String>,
    pub head: HeadSpec,
    pub preprocessing: Preprocessing,
    pub decode: CacheSpec,
    pub eval_clips: u32,
    /// Every how many decoded frames a clip takes one, as in training.
    pub frame_stride: u32,
    pub weights: PathBuf,
}

/// The one hyperparameter serving repeats. A missing or malformed value means 1, as for
/// records written before it was stored.
#[derive(Deserialize, Default)]
struct Sampling {
    frame_stride: Option<u64>,
}

/// Why a model's record could not be turned into a [`ModelMeta`].
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Looking up its custom backbone failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The record is inconsistent (its backbone is gone, a spec does not parse): a server fault.
    #[error(transparent)]
    Record(#[from] anyhow::Error),
}

/// The model `m` of `tenant_id`, ready to load. A base that is not built in is the tenant's
/// TorchScript backbone of that name.
pub async fn model_meta(
    db: impl PgExecutor<'_>,
    data: &DataDir,
    tenant_id: Uuid,
    m: &db::models::Model,
) -> Result<ModelMeta, MetaError> {
    let base = registry::resolve(db, tenant_id, &m.base_model)
        .await?
        .ok_or_else(|| anyhow::anyhow!("base model {} is gone", m.base_model))?;
    Ok(from_record(m, base.base(data), data)?)
}

fn from_record(m: &db::models::Model, base: Base, data: &DataDir) -> anyhow::Result<ModelMeta> {
    let sampling: Sampling = serde_json::from_value(m.hyperparameters.clone()).unwrap_or_default();
    Ok(ModelMeta {
        id: m.id,
        base,
        classes: m.classes.clone(),
        head: serde_json::from_value(m.head.clone()).context("head spec")?,
        preprocessing: serde_json::from_value(m.preprocessing.clone()).context("preprocessing")?,
        // The dataset's cache spec when the model was made: decode as training read.
        decode: CacheSpec::from_stored(&m.decode).context("decode spec")?,
        eval_clips: m.eval_clips.max(1) as u32,
        frame_stride: sampling.frame_stride.unwrap_or(1).max(1) as u32,
        weights: data.resolve(&m.path).join("model.safetensors"),
    })
}

/// The trained classifier rebuilt from `meta` with its weights loaded on `device`: what the
/// inference threads run and what TorchScript export traces.
pub fn load_classifier(
    meta: &ModelMeta,
    device: Device,
) -> anyhow::Result<(VarStore, VideoClassifier)> {
    let mut vs = VarStore::new(device);
    let model = VideoClassifier::new(
        &vs.root(),
        meta.base.clone(),
        meta.classes.len() as i64,
        &meta.head,
        Freeze::Full,
    )?;
    vs.load(&meta.weights)
        .with_context(|| format!("loading {}", meta.weights.display()))?;
    Ok((vs, model))
}
