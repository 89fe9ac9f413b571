//! 2D ImageNet backbones applied to every sampled frame, with the frame features averaged over
//! time (the TSN recipe, Wang et al., ECCV 2016): ResNet-18/50 (He et al., CVPR 2016, with
//! torchvision's stride-on-3×3 bottleneck) and VGG-16 (Simonyan & Zisserman, ICLR 2015).
//! Parameter names equal torchvision's `state_dict` keys.
use tch::Tensor;

use super::relu_;
use tch::nn;

fn conv2d(
    p: nn::Path,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    pad: i64,
    bias: bool,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: pad,
        bias,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

/// A residual block: 2 (basic) or 3 (bottleneck) convolution + BatchNorm pairs with ReLU
/// between them, plus the shortcut.
#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut out = x.shallow_clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            if i > 0 {
                out = relu_(out);
            }
            out = out.apply(conv).apply_t(bn, train);
        }
        let _ = match &self.downsample {
            Some((c, bn)) => out.g_add_(&x.apply(c).apply_t(bn, train)),
            None => out.g_add_(x),
        };
        relu_(out)
    }
}

/// ResNet-18 or ResNet-50 without `fc`: `[B, 3, H, W]` → `[B, 512 or 2048]`.
#[derive(Debug)]
pub struct ResNet2d {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<Block>>,
    pub feature_dim: i64,
}

impl ResNet2d {
    pub fn resnet18(p: &nn::Path) -> Self {
        Self::new(p, false, [2, 2, 2, 2])
    }

    pub fn resnet50(p: &nn::Path) -> Self {
        Self::new(p, true, [3, 4, 6, 3])
    }

    fn new(p: &nn::Path, bottleneck: bool, counts: [usize; 4]) -> Self {
        let expansion = if bottleneck { 4 } else { 1 };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (i, (&n, planes)) in counts.iter().zip([64i64, 128, 256, 512]).enumerate() {
            let lp = p / format!("layer{}", i + 1);
            let mut blocks = Vec::new();
            for b in 0..n {
                let bp = &lp / b;
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                let cout = planes * expansion;
                let downsample = (b == 0 && (stride != 1 || cin != cout)).then(|| {
                    (
                        conv2d(&bp / "downsample" / 0, cin, cout, 1, stride, 0, false),
                        nn::batch_norm2d(&bp / "downsample" / 1, cout, Default::default()),
                    )
                });
                let bn = |name: &str, c: i64| nn::batch_norm2d(&bp / name, c, Default::default());
                // torchvision's bottleneck puts the stride on the 3×3 convolution.
                let convs = if bottleneck {
                    vec![
                        (
                            conv2d(&bp / "conv1", cin, planes, 1, 1, 0, false),
                            bn("bn1", planes),
                        ),
                        (
                            conv2d(&bp / "conv2", planes, planes, 3, stride, 1, false),
                            bn("bn2", planes),
                        ),
                        (
                            conv2d(&bp / "conv3", planes, cout, 1, 1, 0, false),
                            bn("bn3", cout),
                        ),
                    ]
                } else {
                    vec![
                        (
                            conv2d(&bp / "conv1", cin, planes, 3, stride, 1, false),
                            bn("bn1", planes),
                        ),
                        (
                            conv2d(&bp / "conv2", planes, planes, 3, 1, 1, false),
                            bn("bn2", planes),
                        ),
                    ]
                };
                blocks.push(Block { convs, downsample });
                cin = cout;
            }
            layers.push(blocks);
        }
        Self {
            conv1: conv2d(p / "conv1", 3, 64, 7, 2, 3, false),
            bn1: nn::batch_norm2d(p / "bn1", 64, Default::default()),
            layers,
            feature_dim: 512 * expansion,
        }
    }

    /// Stage prefixes in order (`conv1` stands for the stem: conv1 + bn1).
    pub const STAGES: [&'static str; 5] = ["conv1|bn1", "layer1", "layer2", "layer3", "layer4"];

    pub fn features(&self, x: &Tensor, train: [bool; 5]) -> Tensor {
        let mut x = relu_(x.apply(&self.conv1).apply_t(&self.bn1, train[0])).max_pool2d(
            [3, 3],
            [2, 2],
            [1, 1],
            [1, 1],
            false,
        );
        for (i, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward_t(&x, train[i + 1]);
            }
        }
        x.mean_dim(&[2i64, 3][..], false, x.kind())
    }
}

/// VGG-16 without its last classifier layer: `[B, 3, H, W]` → `[B, 4096]` (fc7).
#[derive(Debug)]
pub struct Vgg16 {
    convs: Vec<(usize, nn::Conv2D)>,
    fc6: nn::Linear,
    fc7: nn::Linear,
    /// Dropout after fc6 and fc7 (torchvision: 0.5).
    pub dropout: f64,
}

/// torchvision's `features` indices of the convolutions; a max-pool follows 2, 5, 9, 12, 15
/// (counting convolutions from 1).
const VGG16_CONVS: [(usize, i64, i64); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];

impl Vgg16 {
    pub fn new(p: &nn::Path) -> Self {
        let f = p / "features";
        let convs = VGG16_CONVS
            .iter()
            .map(|&(i, cin, cout)| (i, conv2d(&f / i, cin, cout, 3, 1, 1, true)))
            .collect();
        let c = p / "classifier";
        Self {
            convs,
            fc6: nn::linear(&c / 0, 512 * 7 * 7, 4096, Default::default()),
            fc7: nn::linear(&c / 3, 4096, 4096, Default::default()),
            dropout: 0.5,
        }
    }

    pub const FEATURE_DIM: i64 = 4096;

    /// Five convolution blocks, then the fully connected fc6/fc7.
    pub const STAGES: [&'static str; 6] = [
        "features.0.|features.2.",
        "features.5.|features.7.",
        "features.10.|features.12.|features.14.",
        "features.17.|features.19.|features.21.",
        "features.24.|features.26.|features.28.",
        "classifier",
    ];

    pub fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (i, conv) in &self.convs {
            x = relu_(x.apply(conv));
            if matches!(i, 2 | 7 | 14 | 21 | 28) {
                x = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
        }
        let x = x.adaptive_avg_pool2d([7, 7]).flatten(1, -1);
        let x = relu_(x.apply(&self.fc6)).dropout(self.dropout, train);
        relu_(x.apply(&self.fc7)).dropout(self.dropout, train)
    }
}
