//! Exporting a classifier so other runtimes can use it: `model.safetensors` (every variable,
//! named as in torchvision plus the head) and `model.json` (classes, base model, head,
//! preprocessing, evaluation clips).
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;

use super::{HeadSpec, Preprocessing};

/// What a consumer needs to use the exported weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportMetadata {
    pub format: String,
    /// Built-in architecture name, or the TorchScript backbone's name.
    pub base_model: String,
    pub classes: Vec<String>,
    pub head: HeadSpec,
    pub preprocessing: Preprocessing,
    /// Clips averaged per video at evaluation (and by default at serving).
    pub eval_clips: i64,
    pub vidtune_version: String,
    pub libtorch_version: String,
}

impl ExportMetadata {
    pub fn new(
        base_model: &str,
        classes: Vec<String>,
        head: HeadSpec,
        preprocessing: Preprocessing,
        eval_clips: i64,
    ) -> Self {
        Self {
            format: "vidtune-classifier-v1".into(),
            base_model: base_model.into(),
            classes,
            head,
            preprocessing,
            eval_clips,
            vidtune_version: env!("CARGO_PKG_VERSION").into(),
            libtorch_version: env!("VIDTUNE_LIBTORCH_VERSION").into(),
        }
    }
}

/// Write `model.safetensors` (every variable of the var store, BatchNorm statistics included)
/// and `model.json` into `dir`.
pub fn write_safetensors(vs: &VarStore, meta: &ExportMetadata, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let named: Vec<(&str, Tensor)> = vars
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors"))
        .context("writing model.safetensors")?;
    std::fs::write(dir.join("model.json"), serde_json::to_vec_pretty(meta)?)
        .context("writing model.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{Arch, Freeze, VideoClassifier};
    use tch::{Device, Kind};

    #[test]
    fn safetensors_export_reloads_to_the_same_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadSpec::Mlp {
            hidden: vec![32],
            dropout: 0.5,
        };
        let vs = VarStore::new(Device::Cpu);
        let model = VideoClassifier::new(&vs.root(), Arch::R3d18, 3, &head, Freeze::Full).unwrap();
        let x = Tensor::randn([2, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
        let expected = tch::no_grad(|| model.forward_t(&x, false));

        let meta = ExportMetadata::new(
            "r3d_18",
            vec!["a".into(), "b".into(), "c".into()],
            head.clone(),
            Arch::R3d18.preprocessing(),
            5,
        );
        write_safetensors(&vs, &meta, dir.path()).unwrap();
        let back: ExportMetadata =
            serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
        assert_eq!(back, meta);
        let mut vs2 = VarStore::new(Device::Cpu);
        let model2 =
            VideoClassifier::new(&vs2.root(), Arch::R3d18, 3, &head, Freeze::Full).unwrap();
        vs2.load(dir.path().join("model.safetensors")).unwrap();
        let got = tch::no_grad(|| model2.forward_t(&x, false));
        assert!(got.allclose(&expected, 1e-6, 1e-6, false));
    }
}
