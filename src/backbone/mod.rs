//! Backbones: torchvision-compatible video models in tch, pretrained weight import, the
//! preprocessing spec of each architecture, and the transfer-learning head and freezing controls.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

pub mod amp;
pub mod export;
pub mod heap;
pub mod image;
pub mod pth;
pub mod safetensors;
pub mod script_host;
pub mod video_resnet;
pub mod weights;

use image::{ResNet2d, Vgg16};
use video_resnet::{Variant, VideoResNet};

/// The built-in architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    R3d18,
    #[serde(rename = "mc3_18")]
    Mc318,
    #[serde(rename = "r2plus1d_18")]
    R2plus1d18,
    /// ResNet-18 on each frame, averaged over time.
    Resnet18,
    Resnet50,
    Vgg16,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::R3d18,
        Arch::Mc318,
        Arch::R2plus1d18,
        Arch::Resnet18,
        Arch::Resnet50,
        Arch::Vgg16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::R3d18 => "r3d_18",
            Arch::Mc318 => "mc3_18",
            Arch::R2plus1d18 => "r2plus1d_18",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet50 => "resnet50",
            Arch::Vgg16 => "vgg16",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }

    pub fn is_video(self) -> bool {
        matches!(self, Arch::R3d18 | Arch::Mc318 | Arch::R2plus1d18)
    }

    /// The official torchvision checkpoint: its file name carries the first hex digits of its
    /// SHA-256.
    pub fn official_weights(self) -> &'static str {
        match self {
            Arch::R3d18 => "https://download.pytorch.org/models/r3d_18-b3b3357e.pth",
            Arch::Mc318 => "https://download.pytorch.org/models/mc3_18-a90a0ba3.pth",
            Arch::R2plus1d18 => "https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth",
            Arch::Resnet18 => "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            Arch::Resnet50 => "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            Arch::Vgg16 => "https://download.pytorch.org/models/vgg16-397923af.pth",
        }
    }

    /// What the pretrained weights were trained on.
    pub fn pretrained_on(self) -> &'static str {
        if self.is_video() {
            "Kinetics-400"
        } else {
            "ImageNet-1k"
        }
    }

    pub fn feature_dim(self) -> i64 {
        match self {
            Arch::R3d18 | Arch::Mc318 | Arch::R2plus1d18 | Arch::Resnet18 => 512,
            Arch::Resnet50 => 2048,
            Arch::Vgg16 => Vgg16::FEATURE_DIM,
        }
    }

    /// Parameter-name prefixes of each freezable stage, input side first (`|` separates
    /// alternatives).
    pub fn stages(self) -> &'static [&'static str] {
        match self {
            Arch::R3d18 | Arch::Mc318 | Arch::R2plus1d18 => &VideoResNet::STAGES,
            Arch::Resnet18 | Arch::Resnet50 => &ResNet2d::STAGES,
            Arch::Vgg16 => &Vgg16::STAGES,
        }
    }

    /// How clips are sampled and normalised for this architecture (torchvision's constants).
    pub fn preprocessing(self) -> Preprocessing {
        if self.is_video() {
            Preprocessing {
                frames: 16,
                sampling: Sampling::Consecutive,
                resize: [128, 171],
                crop: 112,
                mean: [0.43216, 0.394666, 0.37645],
                std: [0.22803, 0.22145, 0.216989],
            }
        } else {
            Preprocessing {
                frames: 8,
                sampling: Sampling::Segments,
                resize: [256, 256],
                crop: 224,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            }
        }
    }
}

/// How frames of a clip are chosen from a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// `frames` consecutive frames at the cache rate (video models).
    Consecutive,
    /// One frame from each of `frames` equal segments of the video (TSN).
    Segments,
}

/// Input spec, stored with every trained model and used identically by training, evaluation and
/// serving: frames are resized to `resize` (H, W; for `Segments` the short side to `resize[0]`),
/// cropped to `crop`², scaled to [0, 1] and normalised with `mean`/`std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub frames: i64,
    pub sampling: Sampling,
    pub resize: [i64; 2],
    pub crop: i64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Preprocessing {
    /// `[N, T, H, W, 3]` uint8 (as stored in the cache) → normalised `[N, 3, T, H, W]` float.
    pub fn normalise(&self, frames: &Tensor) -> Tensor {
        let device = frames.device();
        let mean = Tensor::from_slice(&self.mean)
            .to_kind(Kind::Float)
            .to_device(device)
            .view([1, 3, 1, 1, 1]);
        let std = Tensor::from_slice(&self.std)
            .to_kind(Kind::Float)
            .to_device(device)
            .view([1, 3, 1, 1, 1]);
        let x = frames.permute([0, 4, 1, 2, 3]).to_kind(Kind::Float) / 255.0;
        // Contiguous `[N, 3, T, H, W]`: the permuted view has channels-last-3d strides, which
        // elementwise ops keep and which would send every convolution down the (here slower)
        // channels-last path.
        ((x - mean) / std).contiguous()
    }
}

/// The classifier head put on the backbone's features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadSpec {
    /// One linear layer (`fc`), with dropout before it.
    Linear {
        #[serde(default)]
        dropout: f64,
    },
    /// Hidden layers with ReLU and dropout, then the output layer (e.g. `hidden: [256, 128]`).
    Mlp {
        hidden: Vec<i64>,
        #[serde(default = "default_mlp_dropout")]
        dropout: f64,
    },
}

fn default_mlp_dropout() -> f64 {
    0.5
}

impl Default for HeadSpec {
    fn default() -> Self {
        HeadSpec::Linear { dropout: 0.0 }
    }
}

/// Which parts of the backbone train.
///
/// Read through [`FreezeWire`]: serde's internally tagged enums let unit variants
/// (`head_only`, `full`) through with any other member, which a request must not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", try_from = "FreezeWire")]
pub enum Freeze {
    /// Only the head trains (a linear probe with a linear head).
    HeadOnly,
    /// The last `stages` stages and the head train.
    LastStages { stages: usize },
    /// Everything trains.
    Full,
}

/// `{policy}` or `{policy: last_stages, stages}`, and no other member.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeWire {
    policy: FreezePolicy,
    /// Kept as a value so that `"stages": null` counts as present.
    #[serde(default)]
    stages: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FreezePolicy {
    HeadOnly,
    LastStages,
    Full,
}

impl TryFrom<FreezeWire> for Freeze {
    type Error = String;

    fn try_from(w: FreezeWire) -> Result<Self, String> {
        match (w.policy, w.stages) {
            (FreezePolicy::HeadOnly, None) => Ok(Freeze::HeadOnly),
            (FreezePolicy::Full, None) => Ok(Freeze::Full),
            (FreezePolicy::LastStages, Some(v)) => serde_json::from_value(v)
                .map(|stages| Freeze::LastStages { stages })
                .map_err(|e| format!("stages: {e}")),
            (FreezePolicy::LastStages, None) => Err("missing field `stages`".into()),
            (_, Some(_)) => Err("unknown field `stages`: only `last_stages` takes it".into()),
        }
    }
}

impl Default for Freeze {
    fn default() -> Self {
        Freeze::LastStages { stages: 1 }
    }
}

#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "one per model")]
enum Net {
    Video(VideoResNet),
    Res2d(ResNet2d),
    Vgg(Vgg16),
    /// A user's TorchScript module, run in a sandboxed child (`script_host`); its parameters
    /// live in this var store.
    Script(std::cell::RefCell<script_host::Remote>),
}

/// What a classifier is built on.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    Builtin(Arch),
    /// A TorchScript module: `[N, 3, T, H, W]` float → `[N, feature_dim]`.
    TorchScript {
        path: std::path::PathBuf,
        feature_dim: i64,
    },
}

impl From<Arch> for Base {
    fn from(a: Arch) -> Self {
        Base::Builtin(a)
    }
}

impl Base {
    pub fn feature_dim(&self) -> i64 {
        match self {
            Base::Builtin(a) => a.feature_dim(),
            Base::TorchScript { feature_dim, .. } => *feature_dim,
        }
    }

    /// Freezable stages; a TorchScript module is one stage (`backbone`).
    pub fn stages(&self) -> &'static [&'static str] {
        match self {
            Base::Builtin(a) => a.stages(),
            Base::TorchScript { .. } => &["backbone"],
        }
    }
}

#[derive(Debug)]
enum Head {
    Linear(nn::Linear, f64),
    Mlp(Vec<nn::Linear>, f64),
}

/// Backbone + head: `[N, 3, T, H, W]` → logits `[N, classes]`.
#[derive(Debug)]
pub struct VideoClassifier {
    pub base: Base,
    net: Net,
    head: Head,
    /// Per stage: does it train? Frozen stages keep BatchNorm in eval mode.
    trainable: Vec<bool>,
}

impl VideoClassifier {
    /// Build the model under `root` of a var store. Parameter names equal torchvision's (the
    /// head is `fc`, or `head.0`, `head.1`, … for an MLP).
    pub fn new(
        root: &nn::Path,
        base: impl Into<Base>,
        classes: i64,
        head: &HeadSpec,
        freeze: Freeze,
    ) -> anyhow::Result<Self> {
        let base = base.into();
        let net = match &base {
            Base::Builtin(Arch::R3d18) => Net::Video(VideoResNet::new(root, Variant::R3d18)),
            Base::Builtin(Arch::Mc318) => Net::Video(VideoResNet::new(root, Variant::Mc3_18)),
            Base::Builtin(Arch::R2plus1d18) => {
                Net::Video(VideoResNet::new(root, Variant::R2Plus1d18))
            }
            Base::Builtin(Arch::Resnet18) => Net::Res2d(ResNet2d::resnet18(root)),
            Base::Builtin(Arch::Resnet50) => Net::Res2d(ResNet2d::resnet50(root)),
            Base::Builtin(Arch::Vgg16) => Net::Vgg(Vgg16::new(root)),
            Base::TorchScript { path, feature_dim } => Net::Script(std::cell::RefCell::new(
                script_host::Remote::load(path, &(root / "backbone"), *feature_dim)
                    .context("loading the TorchScript backbone")?,
            )),
        };
        let dim = base.feature_dim();
        let head = match head {
            HeadSpec::Linear { dropout } => Head::Linear(
                nn::linear(root / "fc", dim, classes, Default::default()),
                *dropout,
            ),
            HeadSpec::Mlp { hidden, dropout } => {
                let mut layers = Vec::new();
                let mut cin = dim;
                for (i, &h) in hidden.iter().chain(std::iter::once(&classes)).enumerate() {
                    layers.push(nn::linear(root / "head" / i, cin, h, Default::default()));
                    cin = h;
                }
                Head::Mlp(layers, *dropout)
            }
        };
        let n = base.stages().len();
        let first_trainable = match freeze {
            Freeze::HeadOnly => n,
            Freeze::LastStages { stages } => n.saturating_sub(stages),
            Freeze::Full => 0,
        };
        Ok(Self {
            base,
            net,
            head,
            trainable: (0..n).map(|i| i >= first_trainable).collect(),
        })
    }

    /// Dropout inside the backbone (VGG-16's fc6/fc7; torchvision uses 0.5). Other
    /// architectures have none.
    pub fn set_backbone_dropout(&mut self, p: f64) {
        if let Net::Vgg(v) = &mut self.net {
            v.dropout = p;
        }
    }

    /// Pooled backbone features `[N, D]`. Panics if a sandboxed TorchScript backbone fails;
    /// callers that must survive a hostile module use [`VideoClassifier::try_forward_t`].
    pub fn features(&self, x: &Tensor, train: bool) -> Tensor {
        self.try_features(x, train)
            .unwrap_or_else(|e| panic!("TorchScript backbone: {e:#}"))
    }

    fn try_features(&self, x: &Tensor, train: bool) -> anyhow::Result<Tensor> {
        let stage = |i: usize| train && self.trainable[i];
        Ok(match &self.net {
            Net::Video(m) => m.features(x, std::array::from_fn(stage)),
            Net::Res2d(m) => per_frame(x, |f| m.features(f, std::array::from_fn(stage))),
            Net::Vgg(m) => per_frame(x, |f| m.features(f, stage(5))),
            // Train mode only when the backbone trains; then the sandbox keeps the graph for
            // `finish_backward`.
            Net::Script(m) => m.borrow_mut().features(x, stage(0), stage(0))?,
        })
    }

    /// Complete a `backward` through a sandboxed TorchScript backbone: its parameters get
    /// their gradients. Call after every `loss.backward()`; built-in backbones need nothing.
    pub fn finish_backward(&self) -> anyhow::Result<()> {
        match &self.net {
            Net::Script(m) => m.borrow_mut().finish_backward(),
            _ => Ok(()),
        }
    }

    /// Logits `[N, classes]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let f = self.features(x, train);
        self.head_forward(f, train)
    }

    /// Logits `[N, classes]`, with a sandboxed backbone's failure as an error (serving and
    /// evaluation: a hostile module must not abort the caller).
    pub fn try_forward_t(&self, x: &Tensor, train: bool) -> anyhow::Result<Tensor> {
        let f = self.try_features(x, train)?;
        Ok(self.head_forward(f, train))
    }

    /// Run the convolutions named by these weight variables (of `vs`) in fp32 under bf16
    /// autocast; `false` when the backbone cannot (only the video ResNets can).
    pub fn set_fp32_convolutions(&mut self, vs: &nn::VarStore, names: &[String]) -> bool {
        let Net::Video(m) = &mut self.net else {
            return names.is_empty();
        };
        let vars = vs.variables();
        let weights: Option<Vec<Tensor>> = names
            .iter()
            .map(|n| vars.get(n).map(Tensor::shallow_clone))
            .collect();
        match weights {
            Some(w) if names.iter().all(|n| n.ends_with(".weight")) => {
                m.set_fp32_weights(w);
                true
            }
            _ => false,
        }
    }

    /// Whether the backbone is a user's TorchScript module (run in a sandbox).
    pub fn is_sandboxed(&self) -> bool {
        matches!(self.net, Net::Script(_))
    }

    fn head_forward(&self, f: Tensor, train: bool) -> Tensor {
        match &self.head {
            Head::Linear(l, p) => f.dropout(*p, train).apply(l),
            Head::Mlp(layers, p) => {
                let mut x = f;
                for (i, l) in layers.iter().enumerate() {
                    if i > 0 {
                        x = x.relu().dropout(*p, train);
                    }
                    x = x.apply(l);
                }
                x
            }
        }
    }

    /// Whether a parameter belongs to a frozen stage.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.base
            .stages()
            .iter()
            .zip(&self.trainable)
            .any(|(prefixes, &t)| !t && prefixes.split('|').any(|p| stage_match(name, p)))
    }

    /// Apply the freeze policy to the var store: frozen parameters stop receiving gradients.
    /// Returns (backbone trainables, head trainables) for parameter groups with separate
    /// learning rates.
    pub fn trainable_groups(&self, vs: &nn::VarStore) -> (Vec<Tensor>, Vec<Tensor>) {
        let mut backbone = Vec::new();
        let mut head = Vec::new();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut t) in vars {
            if name.starts_with("fc.") || name.starts_with("head.") {
                head.push(t);
            } else if self.is_frozen(&name)
                || name.contains("running_")
                || name.ends_with("num_batches_tracked")
            {
                let _ = t.requires_grad_(false);
            } else {
                backbone.push(t);
            }
        }
        (backbone, head)
    }
}

fn stage_match(name: &str, prefix: &str) -> bool {
    if prefix.ends_with('.') {
        name.starts_with(prefix)
    } else {
        name == prefix || name.starts_with(&format!("{prefix}."))
    }
}

/// ReLU in place on a fresh convolution, BatchNorm or linear output, as torchvision's
/// `ReLU(inplace=True)`: no extra activation-sized tensor. Safe under autograd because those
/// layers' backward needs their input, not their output; residual sums are formed in place on
/// the BatchNorm output for the same reason.
fn relu_(mut x: Tensor) -> Tensor {
    let _ = x.relu_();
    x
}

/// Apply a 2D network to every frame of `[N, 3, T, H, W]` and average the features over time.
fn per_frame(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let (n, c, t, h, w) = x.size5().expect("[N, 3, T, H, W] input");
    let frames = x.permute([0, 2, 1, 3, 4]).reshape([n * t, c, h, w]);
    let feats = f(&frames);
    feats.view([n, t, -1]).mean_dim(1, false, feats.kind())
}

impl ModuleT for VideoClassifier {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        VideoClassifier::forward_t(self, xs, train)
    }
}

/// The backbone parameter names and shapes an architecture expects (head excluded).
pub fn expected_backbone(arch: Arch) -> Vec<(String, Vec<i64>)> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = VideoClassifier::new(&vs.root(), arch, 2, &HeadSpec::default(), Freeze::Full)
        .expect("built-in architectures always build");
    let mut out: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("fc."))
        .map(|(n, t)| (n, t.size()))
        .collect();
    out.sort();
    out
}

/// Read weights (`.pth`/`.pt` from torch.save, or `.safetensors`) and check them against the
/// architecture: every backbone tensor present with the right shape. Extra tensors the
/// architecture has no use for (the original classifier, `num_batches_tracked`) are dropped;
/// anything else unexpected is an error that names the key. Names and shapes are checked from
/// the file's structure before any tensor data is read (see [`weights`]); errors describe the
/// file, never its path.
pub fn read_backbone_weights(
    arch: Arch,
    path: &std::path::Path,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut file = weights::WeightsFile::open(path)?;
    let expected = expected_backbone(arch);
    let wanted: HashMap<&str, &Vec<i64>> = expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    // The original classifier (and a vidtune head) are replaced for the new classes.
    let classifier: &[&str] = match arch {
        Arch::Vgg16 => &["classifier.6.", "fc.", "head."],
        _ => &["fc.", "head."],
    };
    let unused = |name: &str| {
        name.ends_with("num_batches_tracked") || classifier.iter().any(|p| name.starts_with(p))
    };
    let mut seen = HashSet::new();
    for t in file.tensors() {
        let name = &t.name;
        if unused(name) {
            continue;
        }
        match wanted.get(name.as_str()) {
            None => bail!(
                "unexpected key `{name}`: {} has no such parameter",
                arch.name()
            ),
            Some(shape) if **shape != t.shape => bail!(
                "shape mismatch for `{name}`: the file has {:?}, {} expects {:?}",
                t.shape,
                arch.name(),
                shape
            ),
            Some(_) => {
                seen.insert(name.as_str());
            }
        }
    }
    if let Some((missing, _)) = expected.iter().find(|(n, _)| !seen.contains(n.as_str())) {
        bail!(
            "missing key `{missing}`: the file lacks a parameter {} needs",
            arch.name()
        );
    }
    Ok(file
        .read(|t| !unused(&t.name))?
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(Kind::Float)))
        .collect())
}

/// Copy named tensors into the matching variables of a var store.
pub fn load_into(vs: &nn::VarStore, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let mut vars = vs.variables();
    tch::no_grad(|| {
        for (name, t) in tensors {
            let var = vars
                .get_mut(name)
                .with_context(|| format!("the model has no parameter `{name}`"))?;
            var.copy_(&t.to_device(var.device()).to_kind(var.kind()));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_clips_are_contiguous_ncthw_with_kinetics_statistics() {
        let p = Arch::R3d18.preprocessing();
        let frames = Tensor::full([2, 4, 6, 8, 3], 128, (Kind::Uint8, Device::Cpu));
        let x = p.normalise(&frames);
        assert_eq!(x.size(), [2, 3, 4, 6, 8]);
        // Not the channels-last strides of the permuted input: convolutions take the
        // contiguous path.
        assert!(x.is_contiguous());
        let want = (128.0 / 255.0 - p.mean[0]) / p.std[0];
        assert!((x.double_value(&[0, 0, 0, 0, 0]) - want).abs() < 1e-6);
    }

    fn build(arch: Arch, head: HeadSpec, freeze: Freeze) -> (nn::VarStore, VideoClassifier) {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = VideoClassifier::new(&vs.root(), arch, 3, &head, freeze).unwrap();
        (vs, m)
    }

    fn trainable_names(vs: &nn::VarStore) -> Vec<String> {
        let mut v: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn head_only_trains_just_the_head() {
        let (vs, m) = build(Arch::R3d18, HeadSpec::default(), Freeze::HeadOnly);
        let (backbone, head) = m.trainable_groups(&vs);
        assert!(backbone.is_empty());
        assert_eq!(head.len(), 2);
        assert_eq!(trainable_names(&vs), ["fc.bias", "fc.weight"]);
    }

    #[test]
    fn last_stages_trains_the_top_of_the_backbone() {
        let (vs, m) = build(
            Arch::R2plus1d18,
            HeadSpec::default(),
            Freeze::LastStages { stages: 1 },
        );
        let (backbone, _) = m.trainable_groups(&vs);
        let names = trainable_names(&vs);
        assert!(!backbone.is_empty());
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("layer4.") || n.starts_with("fc.")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.starts_with("layer4.")));

        let (vs, m) = build(
            Arch::Vgg16,
            HeadSpec::default(),
            Freeze::LastStages { stages: 2 },
        );
        m.trainable_groups(&vs);
        let names = trainable_names(&vs);
        assert!(names.contains(&"features.28.weight".to_string()));
        assert!(names.contains(&"classifier.0.weight".to_string()));
        assert!(!names.contains(&"features.21.weight".to_string()));
    }

    #[test]
    fn frozen_batchnorm_keeps_its_statistics_in_a_training_forward() {
        let (vs, m) = build(
            Arch::Resnet18,
            HeadSpec::default(),
            Freeze::LastStages { stages: 1 },
        );
        m.trainable_groups(&vs);
        let before = |name: &str| vs.variables()[name].copy();
        let frozen = before("layer1.0.bn1.running_mean");
        let trained = before("layer4.0.bn1.running_mean");
        let x = Tensor::randn([2, 3, 2, 32, 32], (Kind::Float, Device::Cpu));
        let _ = m.forward_t(&x, true);
        let vars = vs.variables();
        assert!(
            vars["layer1.0.bn1.running_mean"].equal(&frozen),
            "frozen BN updated its stats"
        );
        assert!(
            !vars["layer4.0.bn1.running_mean"].equal(&trained),
            "trainable BN did not update"
        );
    }

    #[test]
    fn mlp_head_has_the_requested_layers() {
        let head = HeadSpec::Mlp {
            hidden: vec![256, 128],
            dropout: 0.5,
        };
        let (vs, m) = build(Arch::Mc318, head, Freeze::Full);
        let vars = vs.variables();
        assert_eq!(vars["head.0.weight"].size(), [256, 512]);
        assert_eq!(vars["head.1.weight"].size(), [128, 256]);
        assert_eq!(vars["head.2.weight"].size(), [3, 128]);
        let x = Tensor::randn([2, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(m.forward_t(&x, false).size(), [2, 3]);
        let (_, head) = m.trainable_groups(&vs);
        assert_eq!(head.len(), 6);
    }

    #[test]
    fn specs_follow_torchvision() {
        let v = Arch::R2plus1d18.preprocessing();
        assert_eq!((v.frames, v.crop, v.resize), (16, 112, [128, 171]));
        assert_eq!(v.mean, [0.43216, 0.394666, 0.37645]);
        let i = Arch::Resnet50.preprocessing();
        assert_eq!((i.crop, i.mean), (224, [0.485, 0.456, 0.406]));
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()), Some(a));
            let file = a.official_weights().rsplit('/').next().unwrap();
            assert!(file.starts_with(a.name()), "{file}");
        }
    }
}
