//! Video ResNets from "A Closer Look at Spatiotemporal Convolutions for Action Recognition"
//! (Tran et al., CVPR 2018): R3D-18 (full 3D convolutions), MC3-18 (3D in the stem and first
//! stage, 2D after) and R(2+1)D-18 (each 3D convolution factored into a spatial 1×3×3 and a
//! temporal 3×1×1 one). Parameter names equal torchvision's `state_dict` keys, so Kinetics-400
//! checkpoints load unchanged.
use tch::Tensor;

use super::relu_;
use tch::nn::{self, ModuleT};

/// Which convolution each stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// 3×3×3.
    Simple3d,
    /// 1×3×3 (no temporal extent).
    NoTemporal,
    /// 1×3×3 then 3×1×1 with BatchNorm and ReLU between.
    TwoPlusOne,
}

/// Variant of the video ResNet family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    R3d18,
    Mc3_18,
    R2Plus1d18,
}

impl Variant {
    fn stage_convs(self) -> [ConvKind; 4] {
        use ConvKind::*;
        match self {
            Variant::R3d18 => [Simple3d; 4],
            Variant::Mc3_18 => [Simple3d, NoTemporal, NoTemporal, NoTemporal],
            Variant::R2Plus1d18 => [TwoPlusOne; 4],
        }
    }
}

fn conv3d(p: nn::Path, cin: i64, cout: i64, k: [i64; 3], s: [i64; 3], pad: [i64; 3]) -> nn::Conv3D {
    let cfg = nn::ConvConfigND::<[i64; 3]> {
        stride: s,
        padding: pad,
        dilation: [1, 1, 1],
        groups: 1,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        bs_init: nn::Init::Const(0.),
        padding_mode: nn::PaddingMode::Zeros,
    };
    nn::conv(p, cin, cout, k, cfg)
}

/// Apply a convolution, in fp32 (autocast off, the input cast up) when its weight is one of
/// `fp32`: the layers whose bf16 kernels failed the precision check.
fn conv(x: &Tensor, c: &nn::Conv3D, fp32: &[Tensor]) -> Tensor {
    if fp32.iter().any(|w| w.data_ptr() == c.ws.data_ptr()) {
        let _fp32 = super::amp::Fp32::enter(x.device());
        x.to_kind(tch::Kind::Float).apply(c)
    } else {
        x.apply(c)
    }
}

fn bn3d(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm3d(p, c, Default::default())
}

/// One convolution of a block (`conv1.0` / `conv2.0` in torchvision).
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "built once per model")]
enum BlockConv {
    Single(nn::Conv3D),
    Factored {
        spatial: nn::Conv3D,
        bn: nn::BatchNorm,
        temporal: nn::Conv3D,
    },
}

impl BlockConv {
    fn new(p: nn::Path, kind: ConvKind, cin: i64, cout: i64, mid: i64, stride: i64) -> Self {
        match kind {
            ConvKind::Simple3d => {
                Self::Single(conv3d(p, cin, cout, [3, 3, 3], [stride; 3], [1, 1, 1]))
            }
            ConvKind::NoTemporal => Self::Single(conv3d(
                p,
                cin,
                cout,
                [1, 3, 3],
                [1, stride, stride],
                [0, 1, 1],
            )),
            ConvKind::TwoPlusOne => Self::Factored {
                spatial: conv3d(&p / 0, cin, mid, [1, 3, 3], [1, stride, stride], [0, 1, 1]),
                bn: bn3d(&p / 1, mid),
                temporal: conv3d(&p / 3, mid, cout, [3, 1, 1], [stride, 1, 1], [1, 0, 0]),
            },
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool, fp32: &[Tensor]) -> Tensor {
        match self {
            Self::Single(c) => conv(x, c, fp32),
            Self::Factored {
                spatial,
                bn,
                temporal,
            } => conv(
                &relu_(conv(x, spatial, fp32).apply_t(bn, train)),
                temporal,
                fp32,
            ),
        }
    }
}

#[derive(Debug)]
struct BasicBlock {
    conv1: BlockConv,
    bn1: nn::BatchNorm,
    conv2: BlockConv,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv3D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: nn::Path, kind: ConvKind, cin: i64, planes: i64, stride: i64) -> Self {
        // torchvision keeps the parameter count of a 3×3×3 convolution in the factored one.
        let mid = (cin * planes * 27) / (cin * 9 + 3 * planes);
        let downsample = (stride != 1 || cin != planes).then(|| {
            let ds_stride = match kind {
                ConvKind::NoTemporal => [1, stride, stride],
                _ => [stride; 3],
            };
            (
                conv3d(
                    &p / "downsample" / 0,
                    cin,
                    planes,
                    [1, 1, 1],
                    ds_stride,
                    [0, 0, 0],
                ),
                bn3d(&p / "downsample" / 1, planes),
            )
        });
        Self {
            conv1: BlockConv::new(&p / "conv1" / 0, kind, cin, planes, mid, stride),
            bn1: bn3d(&p / "conv1" / 1, planes),
            conv2: BlockConv::new(&p / "conv2" / 0, kind, planes, planes, mid, 1),
            bn2: bn3d(&p / "conv2" / 1, planes),
            downsample,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool, fp32: &[Tensor]) -> Tensor {
        let out = relu_(
            self.conv1
                .forward_t(x, train, fp32)
                .apply_t(&self.bn1, train),
        );
        let mut out = self
            .conv2
            .forward_t(&out, train, fp32)
            .apply_t(&self.bn2, train);
        let _ = match &self.downsample {
            Some((c, bn)) => out.g_add_(&conv(x, c, fp32).apply_t(bn, train)),
            None => out.g_add_(x),
        };
        relu_(out)
    }
}

#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "built once per model")]
enum Stem {
    /// Conv 3×7×7, stride 1×2×2.
    Basic(nn::Conv3D, nn::BatchNorm),
    /// Conv 1×7×7 to 45 channels, then 3×1×1 to 64.
    TwoPlusOne(nn::Conv3D, nn::BatchNorm, nn::Conv3D, nn::BatchNorm),
}

/// A video ResNet without its classifier: `[N, 3, T, H, W]` → `[N, 512]`.
#[derive(Debug)]
pub struct VideoResNet {
    stem: Stem,
    layers: Vec<Vec<BasicBlock>>,
    /// Weights of the convolutions that run in fp32 even under bf16 autocast.
    fp32: Vec<Tensor>,
}

impl VideoResNet {
    /// Build under `p` (the model root: children are `stem`, `layer1`…`layer4`).
    pub fn new(p: &nn::Path, variant: Variant) -> Self {
        let stem = match variant {
            Variant::R2Plus1d18 => Stem::TwoPlusOne(
                conv3d(p / "stem" / 0, 3, 45, [1, 7, 7], [1, 2, 2], [0, 3, 3]),
                bn3d(p / "stem" / 1, 45),
                conv3d(p / "stem" / 3, 45, 64, [3, 1, 1], [1, 1, 1], [1, 0, 0]),
                bn3d(p / "stem" / 4, 64),
            ),
            _ => Stem::Basic(
                conv3d(p / "stem" / 0, 3, 64, [3, 7, 7], [1, 2, 2], [1, 3, 3]),
                bn3d(p / "stem" / 1, 64),
            ),
        };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (i, (kind, planes)) in variant
            .stage_convs()
            .into_iter()
            .zip([64, 128, 256, 512])
            .enumerate()
        {
            let lp = p / format!("layer{}", i + 1);
            let stride = if i == 0 { 1 } else { 2 };
            let blocks = vec![
                BasicBlock::new(&lp / 0, kind, cin, planes, stride),
                BasicBlock::new(&lp / 1, kind, planes, planes, 1),
            ];
            cin = planes;
            layers.push(blocks);
        }
        Self {
            stem,
            layers,
            fp32: Vec::new(),
        }
    }

    pub const FEATURE_DIM: i64 = 512;

    /// Run the convolutions with these weights in fp32 under bf16 autocast.
    pub fn set_fp32_weights(&mut self, weights: Vec<Tensor>) {
        self.fp32 = weights;
    }

    /// Stage names in order, as parameter-name prefixes (for freezing).
    pub const STAGES: [&'static str; 5] = ["stem", "layer1", "layer2", "layer3", "layer4"];

    /// `train[i]` says whether stage i (see [`Self::STAGES`]) runs BatchNorm in training mode.
    pub fn features(&self, x: &Tensor, train: [bool; 5]) -> Tensor {
        let fp32 = &self.fp32[..];
        let mut x = match &self.stem {
            Stem::Basic(c, bn) => relu_(conv(x, c, fp32).apply_t(bn, train[0])),
            Stem::TwoPlusOne(c1, bn1, c2, bn2) => relu_(
                conv(&relu_(conv(x, c1, fp32).apply_t(bn1, train[0])), c2, fp32)
                    .apply_t(bn2, train[0]),
            ),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward_t(&x, train[i + 1], fp32);
            }
        }
        // Global average pool over T, H, W: [N, 512, t, h, w] → [N, 512].
        x.mean_dim(&[2i64, 3, 4][..], false, x.kind())
    }
}

impl ModuleT for VideoResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.features(x, [train; 5])
    }
}
