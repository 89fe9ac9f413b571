//! Parity with PyTorch: the tch models load torchvision-format checkpoints and give the same
//! outputs as torchvision for the same input — in eval mode and in one training-mode forward
//! (BatchNorm batch statistics), and the gradients of that forward. This is
//! the evidence that imported Kinetics/ImageNet weights behave, and fine-tune, as they do in
//! PyTorch.
//!
//! Reference files come from `tests/fixtures/parity.py`, run with the PyTorch 2.11 venv that
//! `scripts/setup` installs.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use vidtune::backbone::{
    Arch, Freeze, HeadSpec, VideoClassifier, load_into, pth, read_backbone_weights,
};

const TOLERANCE: f64 = 1e-4;

#[path = "fixtures/models.rs"]
mod models;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| models::ensure(Path::new(env!("CARGO_TARGET_TMPDIR")).join("parity"), &[]))
}

fn io(arch: &str) -> HashMap<String, Tensor> {
    pth::read(&fixtures().join(format!("{arch}.io.pth")))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Load the checkpoint the way `vidtune weights import` does, plus the reference's `fc`.
fn model(arch: Arch) -> (VarStore, VideoClassifier) {
    let path = fixtures().join(format!("{}.pth", arch.name()));
    let vs = VarStore::new(Device::Cpu);
    let mut m =
        VideoClassifier::new(&vs.root(), arch, 7, &HeadSpec::default(), Freeze::Full).unwrap();
    // The reference turns VGG's dropout off so a training-mode forward is deterministic.
    m.set_backbone_dropout(0.0);
    let backbone = read_backbone_weights(arch, &path).unwrap();
    load_into(&vs, &backbone).unwrap();
    let fc: Vec<_> = pth::read(&path)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("fc."))
        .collect();
    assert_eq!(fc.len(), 2);
    load_into(&vs, &fc).unwrap();
    (vs, m)
}

fn check(arch: Arch, probe: Option<&str>) {
    let _guard = tch::no_grad_guard();
    let io = io(arch.name());
    let (vs, m) = model(arch);
    let x = &io["input"];
    let feats = m.features(x, false);
    let logits = m.forward_t(x, false);
    let d_feat = max_diff(&feats, &io["features"]);
    let d_eval = max_diff(&logits, &io["logits"]);
    let logits_train = m.forward_t(x, true);
    let d_train = max_diff(&logits_train, &io["logits_train"]);
    println!(
        "{:<12} max |Δ| features {d_feat:.2e}  logits(eval) {d_eval:.2e}  logits(train) {d_train:.2e}",
        arch.name()
    );
    assert!(
        d_feat < TOLERANCE,
        "{}: features differ by {d_feat}",
        arch.name()
    );
    assert!(
        d_eval < TOLERANCE,
        "{}: eval logits differ by {d_eval}",
        arch.name()
    );
    assert!(
        d_train < TOLERANCE,
        "{}: train logits differ by {d_train}",
        arch.name()
    );
    if let Some(name) = probe {
        let ours = &vs.variables()[name];
        let d = max_diff(ours, &io["probe_after_train"]);
        assert!(
            d < 1e-5,
            "{}: running stats after a training step differ by {d}",
            arch.name()
        );
    }
}

/// Gradients of sum(logits²) after a training-mode forward, against the reference's, for every
/// parameter it saved (`grad.<name>`), relative to the largest reference value.
fn check_gradients(arch: Arch) {
    let io = io(arch.name());
    let (vs, m) = model(arch);
    m.forward_t(&io["input"], true)
        .square()
        .sum(tch::Kind::Float)
        .backward();
    let vars = vs.variables();
    let mut compared = 0;
    for (key, want) in &io {
        let Some(name) = key.strip_prefix("grad.") else {
            continue;
        };
        let got = vars[name].grad();
        assert!(got.defined(), "{}: no gradient for {name}", arch.name());
        let scale = want.abs().max().double_value(&[]).max(1e-6);
        let d = max_diff(&got, want) / scale;
        assert!(
            d < 1e-3,
            "{}: gradient of {name} differs by {d} (relative)",
            arch.name()
        );
        compared += 1;
    }
    assert!(
        compared > 20,
        "{}: only {compared} gradients compared",
        arch.name()
    );
}

#[test]
fn gradients_match_torchvision() {
    for arch in Arch::ALL {
        check_gradients(arch);
    }
}

#[test]
fn r3d_18_matches_torchvision() {
    check(Arch::R3d18, Some("layer1.0.conv1.1.running_mean"));
}

#[test]
fn mc3_18_matches_torchvision() {
    check(Arch::Mc318, Some("layer2.0.conv1.1.running_mean"));
}

#[test]
fn r2plus1d_18_matches_torchvision_from_a_legacy_format_checkpoint() {
    check(Arch::R2plus1d18, Some("layer1.0.conv1.0.1.running_mean"));
}

#[test]
fn resnet18_tsn_matches_torchvision() {
    check(Arch::Resnet18, Some("layer1.0.bn1.running_mean"));
}

#[test]
fn resnet50_tsn_matches_torchvision() {
    check(Arch::Resnet50, Some("layer3.0.bn2.running_mean"));
}

#[test]
fn vgg16_tsn_matches_torchvision() {
    check(Arch::Vgg16, None);
}

#[test]
fn safetensors_and_pth_give_the_same_weights() {
    let a = read_backbone_weights(Arch::R3d18, &fixtures().join("r3d_18.pth")).unwrap();
    let b = read_backbone_weights(Arch::R3d18, &fixtures().join("r3d_18.safetensors")).unwrap();
    let b: HashMap<_, _> = b.into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(max_diff(t, &b[name]), 0.0, "{name}");
    }
}

#[test]
fn wrong_checkpoints_are_refused_with_the_key_named() {
    // r3d_18 weights offered as mc3_18: same names, different kernel shapes.
    let err = read_backbone_weights(Arch::Mc318, &fixtures().join("r3d_18.pth")).unwrap_err();
    assert!(
        format!("{err:#}").contains("shape mismatch for `layer2.0.conv1.0.weight`"),
        "{err:#}"
    );
    // ResNet-18 weights for R(2+1)D: keys it does not have.
    let err =
        read_backbone_weights(Arch::R2plus1d18, &fixtures().join("resnet18.pth")).unwrap_err();
    assert!(
        format!("{err:#}").contains("unexpected key `conv1.weight`"),
        "{err:#}"
    );
    // A checkpoint missing a tensor.
    let mut sd = pth::read(&fixtures().join("resnet18.pth")).unwrap();
    sd.retain(|(n, _)| n != "layer4.1.bn2.running_var");
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial.safetensors");
    let named: Vec<(&str, &Tensor)> = sd.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &partial).unwrap();
    let err = read_backbone_weights(Arch::Resnet18, &partial).unwrap_err();
    assert!(
        format!("{err:#}").contains("missing key `layer4.1.bn2.running_var`"),
        "{err:#}"
    );
    // Not a checkpoint at all.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"definitely not a checkpoint").unwrap();
    assert!(read_backbone_weights(Arch::Resnet18, &junk).is_err());
}

#[test]
fn a_sandboxed_torchscript_backbone_can_be_frozen_or_fine_tuned_with_exact_gradients() {
    use vidtune::backbone::{Base, script_host};
    script_host::configure(script_host::HostConfig {
        exe: env!("CARGO_BIN_EXE_vidtune").into(),
        ..Default::default()
    });
    let path = fixtures().join("tiny_backbone.pt");
    let base = Base::TorchScript {
        path: path.clone(),
        feature_dim: 16,
    };
    let x = Tensor::randn([2, 3, 4, 16, 16], (tch::Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 2]);

    let vs = VarStore::new(Device::Cpu);
    let frozen = VideoClassifier::new(
        &vs.root(),
        base.clone(),
        3,
        &HeadSpec::default(),
        Freeze::HeadOnly,
    )
    .unwrap();
    assert!(frozen.is_sandboxed());
    let (backbone, head) = frozen.trainable_groups(&vs);
    assert!(backbone.is_empty());
    assert_eq!(head.len(), 2);
    assert_eq!(frozen.forward_t(&x, true).size(), [2, 3]);

    // Fine-tuned: the gradients that come back from the sandbox equal those of the same
    // module run here (the test process is trusted; the server never does this).
    let vs = VarStore::new(Device::Cpu);
    let tuned =
        VideoClassifier::new(&vs.root(), base, 3, &HeadSpec::default(), Freeze::Full).unwrap();
    let (backbone, _) = tuned.trainable_groups(&vs);
    assert!(!backbone.is_empty(), "the module's parameters train");
    let mut local_vs = VarStore::new(Device::Cpu);
    let mut local = tch::TrainableCModule::load(&path, local_vs.root() / "backbone").unwrap();
    local_vs.copy(&vs).unwrap();
    local.set_train();
    let fc = vs.variables();
    let (w, b) = (&fc["fc.weight"], &fc["fc.bias"]);
    let expected_loss = local
        .forward_ts(&[&x])
        .unwrap()
        .linear(w, Some(b))
        .cross_entropy_for_logits(&y);
    expected_loss.backward();

    let before: Vec<Tensor> = backbone.iter().map(Tensor::copy).collect();
    let mut opt = tch::nn::OptimizerConfig::build(tch::nn::Sgd::default(), &vs, 0.1).unwrap();
    let loss = tuned.forward_t(&x, true).cross_entropy_for_logits(&y);
    assert!(
        (loss.double_value(&[]) - expected_loss.double_value(&[])).abs() < 1e-5,
        "same loss in the sandbox and here"
    );
    loss.backward();
    tuned.finish_backward().unwrap();
    let remote = vs.variables();
    let mut compared = 0;
    for (name, t) in local_vs.variables() {
        let g_local = t.grad();
        let g_remote = remote[&name].grad();
        assert!(g_remote.defined(), "{name} got no gradient");
        let diff = (&g_local - &g_remote).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
        compared += 1;
    }
    assert!(compared >= 2, "compared {compared} parameters");
    opt.step();
    assert!(
        backbone.iter().zip(&before).any(|(a, b)| !a.equal(b)),
        "a training step moved the backbone"
    );
    // The moved parameters reach the sandbox before the next forward.
    let after = tuned.forward_t(&x, false);
    let _ = local_vs.copy(&vs);
    local.set_eval();
    let here = tch::no_grad(|| local.forward_ts(&[&x]).unwrap().linear(w, Some(b)));
    let diff = (&after - &here).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "the sandbox runs stale parameters ({diff})");
}
