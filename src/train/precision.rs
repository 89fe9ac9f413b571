//! The precision a job computes in. `auto` picks bf16 where the device runs it natively, where
//! its bf16 kernels are right and where it is faster. Before the first epoch, one batch of
//! random clips goes through the job's model forward and backward in fp32 and in bf16: the
//! convolutions whose bf16 weight gradient is far from fp32's run in fp32 (the rest stays in
//! bf16) and the check is repeated; then one training pass is timed in each precision. The job
//! says what it chose and why, and keeps the choice in its checkpoints.
//!
//! This is not hypothetical: libtorch 2.11's bf16 3D convolution computes wrong weight
//! gradients for some shapes on some CPUs (on an AVX512-BF16 Xeon, r3d_18's 256→256 layer3
//! convolutions come out 70–97 % off, or infinite, in PyTorch as in vidtune), so a model
//! trained there in bf16 learns nothing; and the same CPU runs 3D convolutions slower in bf16
//! than in fp32. bf16 noise itself stays well below the threshold (0.1–0.35 relative on the
//! same models, worst layer, train mode at batch 4).
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::evaluate::classification_loss;
use super::hyper::Precision;
use super::optim::Optimizer;
use crate::backbone::{VideoClassifier, amp};

/// Above this relative error (‖g_bf16 − g_fp32‖ / ‖g_fp32‖) of any trainable parameter's
/// gradient, the bf16 kernels are taken to be wrong.
pub const MAX_GRADIENT_ERROR: f64 = 0.5;

/// What a job computes in, and the sentence that says why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub bf16: bool,
    pub why: String,
    /// Set when bf16 was asked for explicitly but its kernels failed the check.
    pub warning: Option<String>,
    /// Convolutions (weight names) that run in fp32 under bf16.
    pub fp32_convolutions: Vec<String>,
}

/// The decision as a job's checkpoints keep it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decided {
    pub bf16: bool,
    pub why: String,
    #[serde(default)]
    pub fp32_convolutions: Vec<String>,
}

impl Choice {
    /// A choice with no warning and no convolution kept in fp32.
    fn plain(bf16: bool, why: String) -> Self {
        Self {
            bf16,
            why,
            warning: None,
            fp32_convolutions: Vec::new(),
        }
    }

    pub fn decided(&self) -> Decided {
        Decided {
            bf16: self.bf16,
            why: self.why.clone(),
            fp32_convolutions: self.fp32_convolutions.clone(),
        }
    }
}

/// The worst relative gradient error of bf16 against fp32, and the parameter it is on.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientCheck {
    pub parameter: String,
    pub error: f64,
    /// Every parameter over [`MAX_GRADIENT_ERROR`], with its error.
    pub failing: Vec<(String, f64)>,
    /// Seconds of a second fp32 and a second bf16 pass (after the first ones warmed up), when
    /// timed and no gradient failed; otherwise 0.
    pub fp32_s: f64,
    pub bf16_s: f64,
}

/// bf16 is used only when a training pass in bf16 takes at most this share of the fp32 pass's
/// time: some CPUs that report bf16 instructions run 3D convolutions slower in bf16.
pub const MAX_BF16_TIME_SHARE: f64 = 0.9;

/// Decide the precision of a job: its setting on `device`, checked on the model at the job's
/// clip `shape` (`[N, 3, T, H, W]`) when bf16 would be used. Under `auto` a decision kept in
/// `memo` by an earlier job is taken as it is, and a new one is kept there.
pub fn choose(
    precision: Precision,
    device: crate::device::Device,
    model: &mut VideoClassifier,
    vs: &VarStore,
    opt: &mut Optimizer,
    shape: [i64; 5],
    memo: Option<&Memo>,
) -> Choice {
    let (bf16, why) = precision.bf16_on(device);
    // A sandboxed backbone's gradients are computed in its own process, in fp32.
    if !bf16 || model.is_sandboxed() {
        return decide(precision, bf16, why, None);
    }
    let memo = memo.filter(|_| precision == Precision::Auto);
    if let Some(kept) = memo.and_then(|m| m.apply(model, vs)) {
        return kept;
    }
    let choice = check_and_choose(precision, bf16, why, device, model, vs, opt, shape);
    if let Some(memo) = memo {
        memo.store(&choice.decided());
    }
    choice
}

/// [`choose`] once bf16 is a candidate: the gradient checks and the timed passes.
#[allow(clippy::too_many_arguments)]
fn check_and_choose(
    precision: Precision,
    bf16: bool,
    why: String,
    device: crate::device::Device,
    model: &mut VideoClassifier,
    vs: &VarStore,
    opt: &mut Optimizer,
    shape: [i64; 5],
) -> Choice {
    let first = gradient_check(model, vs, opt, shape, device.to_tch(), true);
    if first.failing.is_empty() {
        return decide(precision, bf16, why, Some(first));
    }
    // Only some convolutions fail: those run in fp32, the rest in bf16, if that passes.
    let names: Vec<String> = first.failing.iter().map(|(n, _)| n.clone()).collect();
    if model.set_fp32_convolutions(vs, &names) {
        let second = gradient_check(model, vs, opt, shape, device.to_tch(), true);
        if second.failing.is_empty() && (precision == Precision::Bf16 || faster(&second)) {
            let list: Vec<String> = first
                .failing
                .iter()
                .map(|(n, e)| format!("{n} {}", off(*e)))
                .collect();
            return Choice {
                bf16: true,
                why: format!(
                    "{why}; {} convolution(s) in fp32, whose bf16 weight gradients are wrong on \
                     this device ({}; a fault of this libtorch build's bf16 kernels), the rest \
                     within {:.0} % of fp32's; a training pass {:.2} s against {:.2} s in fp32",
                    names.len(),
                    list.join(", "),
                    second.error * 100.0,
                    second.bf16_s,
                    second.fp32_s
                ),
                warning: None,
                fp32_convolutions: names,
            };
        }
        model.set_fp32_convolutions(vs, &[]);
        if second.failing.is_empty() {
            return Choice::plain(
                false,
                format!(
                    "precision auto: fp32, because bf16 is not faster on this device with the {} \
                     convolution(s) whose bf16 weight gradients are wrong ({}) in fp32: a \
                     training pass {:.2} s against {:.2} s in fp32",
                    names.len(),
                    names.join(", "),
                    second.bf16_s,
                    second.fp32_s
                ),
            );
        }
    }
    decide(precision, bf16, why, Some(first))
}

/// Decisions of `auto` kept on this machine, one file per build, device, model and clip size.
/// The check costs a job seconds at start-up (six training passes) and gives the same answer
/// for the same kernels on the same device: a wrong bf16 gradient or a slower bf16 pass belongs
/// to the CPU or GPU, the libtorch build and the shapes, not to the job. A file that cannot be
/// read is ignored and one that cannot be written is left out: the next job checks again.
pub struct Memo {
    path: std::path::PathBuf,
}

impl Memo {
    /// The memo in `dir` for `identity`: every fact the decision depends on, as text.
    pub fn new(dir: &std::path::Path, identity: &str) -> Self {
        use sha2::{Digest, Sha256};
        let key = hex::encode(Sha256::digest(identity.as_bytes()));
        Self {
            path: dir.join(format!("{}.json", &key[..32])),
        }
    }

    /// The kept decision, applied to `model` (its fp32 convolutions set); `None` when there is
    /// none, or it names a convolution the model lacks.
    fn apply(&self, model: &mut VideoClassifier, vs: &VarStore) -> Option<Choice> {
        let kept = self.load()?;
        if !model.set_fp32_convolutions(vs, &kept.fp32_convolutions) {
            return None;
        }
        Some(Choice {
            bf16: kept.bf16,
            why: format!(
                "{} (checked by an earlier job on this machine with the same model and clip \
                 size; delete {} to check again)",
                kept.why,
                self.path.display()
            ),
            warning: None,
            fp32_convolutions: kept.fp32_convolutions,
        })
    }

    fn load(&self) -> Option<Decided> {
        // A few hundred bytes; anything larger is not one of these files.
        let bytes = std::fs::read(&self.path)
            .ok()
            .filter(|b| b.len() <= 64 * 1024)?;
        serde_json::from_slice(&bytes).ok()
    }

    fn store(&self, decided: &Decided) {
        let write = || -> std::io::Result<()> {
            let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)?;
            let part = self
                .path
                .with_extension(format!("part-{}", std::process::id()));
            std::fs::write(&part, serde_json::to_vec_pretty(decided)?)?;
            std::fs::rename(&part, &self.path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.path.display(), error = %e, "could not keep the precision decision");
        }
    }
}

/// This machine and build as part of a memo's identity: the executable (its size and
/// modification time, so a rebuilt or upgraded vidtune, and with it perhaps another libtorch,
/// checks again) and the device (a CPU's model name and flags, a GPU's compute capability).
pub fn machine_identity(device: crate::device::Device) -> String {
    let exe = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| format!("{} bytes, modified {:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    let hardware = match device {
        crate::device::Device::Cpu => {
            let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let line = |key: &str| {
                info.lines()
                    .find(|l| l.starts_with(key))
                    .unwrap_or_default()
                    .to_owned()
            };
            format!("{}; {}", line("model name"), line("flags"))
        }
        crate::device::Device::Cuda(_) => crate::device::bf16_support(device).why,
    };
    format!(
        "vidtune {} ({exe}); {device}: {hardware}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether the timed bf16 pass beat the fp32 pass by enough.
fn faster(c: &GradientCheck) -> bool {
    c.bf16_s <= MAX_BF16_TIME_SHARE * c.fp32_s
}

/// "96 %", or "infinitely".
fn off(error: f64) -> String {
    if error.is_finite() {
        format!("{:.0} % off", error * 100.0)
    } else {
        "infinitely off".into()
    }
}

/// The choice, from the setting's answer on this device and the gradient check if one ran.
pub fn decide(
    precision: Precision,
    bf16: bool,
    why: String,
    check: Option<GradientCheck>,
) -> Choice {
    let Some(check) = check.filter(|_| bf16) else {
        return Choice::plain(bf16, why);
    };
    if check.error <= MAX_GRADIENT_ERROR {
        let times = format!(
            "a training pass {:.2} s against {:.2} s in fp32",
            check.bf16_s, check.fp32_s
        );
        if precision == Precision::Auto && !faster(&check) {
            return Choice::plain(
                false,
                format!(
                    "precision auto: fp32, because bf16 is not faster on this device ({times})"
                ),
            );
        }
        return Choice::plain(
            true,
            format!(
                "{why}; bf16 gradients within {:.0} % of fp32's; {times}",
                check.error * 100.0
            ),
        );
    }
    let fault = format!(
        "the bf16 gradient of {} is {} fp32's on this device (a fault of this libtorch \
         build's bf16 kernels)",
        check.parameter,
        off(check.error)
    );
    match precision {
        Precision::Bf16 => Choice {
            bf16: true,
            why: format!("{why}; {fault}"),
            warning: Some(format!(
                "{fault}: this job may not learn; precision auto or fp32 would train in fp32"
            )),
            fp32_convolutions: Vec::new(),
        },
        Precision::Auto | Precision::Fp32 => {
            Choice::plain(false, format!("precision auto: fp32, because {fault}"))
        }
    }
}

/// One seeded batch of random clips, forward and backward in train mode, in fp32 and then in
/// bf16 autocast (then, when `timed` and no gradient is wrong, once more each, timed); the
/// trainable weight of a
/// convolution or linear layer whose gradients differ most. The model is left as it was:
/// BatchNorm statistics restored, gradients cleared.
pub fn gradient_check(
    model: &VideoClassifier,
    vs: &VarStore,
    opt: &mut Optimizer,
    shape: [i64; 5],
    device: Device,
    timed: bool,
) -> GradientCheck {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let saved: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
        vars.iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| (t.shallow_clone(), t.copy()))
            .collect()
    });
    // The weights of convolutions and linear layers: what bf16 kernels compute. (Biases and
    // BatchNorm parameters are sums whose fp32 value can be near zero, where a relative error
    // says nothing.)
    let trainable: Vec<&(String, Tensor)> = vars
        .iter()
        .filter(|(_, t)| t.requires_grad() && t.dim() >= 2)
        .collect();
    // Drawn on the CPU, so the check sees the same clips on every device.
    let x = Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device);
    let y = Tensor::arange(shape[0], (Kind::Int64, device)).remainder(2);
    let grads = |bf16: bool, opt: &mut Optimizer| -> Vec<Option<Tensor>> {
        opt.zero_grad();
        let loss = {
            let _amp = bf16.then(|| amp::Autocast::enter(device));
            let logits = model.forward_t(&x, true);
            classification_loss(&logits, &y, None, 0.0)
        };
        loss.backward();
        trainable
            .iter()
            .map(|(_, t)| {
                let g = t.grad();
                g.defined().then(|| g.detach().to_kind(Kind::Float).copy())
            })
            .collect()
    };
    let fp32 = grads(false, opt);
    let bf16 = grads(true, opt);
    let mut worst = GradientCheck {
        parameter: String::new(),
        error: 0.0,
        failing: Vec::new(),
        fp32_s: 0.0,
        bf16_s: 0.0,
    };
    for ((name, _), (a, b)) in trainable.iter().zip(fp32.iter().zip(&bf16)) {
        let (Some(a), Some(b)) = (a, b) else {
            continue;
        };
        let reference = a.norm().double_value(&[]);
        if reference == 0.0 {
            continue;
        }
        let error = (b - a).norm().double_value(&[]) / reference;
        let error = if error.is_nan() { f64::INFINITY } else { error };
        if error > MAX_GRADIENT_ERROR {
            worst.failing.push((name.clone(), error));
        }
        if error > worst.error {
            worst.parameter = name.clone();
            worst.error = error;
        }
    }
    // Wrong gradients decide without the times.
    if timed && worst.failing.is_empty() {
        // A GPU runs the pass after the call returns: wait for it before reading the clock.
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        sync();
        let started = std::time::Instant::now();
        drop(grads(false, opt));
        sync();
        worst.fp32_s = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        drop(grads(true, opt));
        sync();
        worst.bf16_s = started.elapsed().as_secs_f64();
    }
    opt.zero_grad();
    tch::no_grad(|| {
        for (live, copy) in &saved {
            live.shallow_clone().copy_(copy);
        }
    });
    worst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{Arch, Freeze, HeadSpec};

    /// An r3d_18 with a 2-class head on the CPU.
    fn r3d18(freeze: Freeze) -> (VarStore, VideoClassifier) {
        let vs = VarStore::new(Device::Cpu);
        let model =
            VideoClassifier::new(&vs.root(), Arch::R3d18, 2, &HeadSpec::default(), freeze).unwrap();
        (vs, model)
    }

    /// A copy of every variable of `vs`, by name.
    fn copies(vs: &VarStore) -> Vec<(String, Tensor)> {
        vs.variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect()
    }

    fn check(error: f64) -> Option<GradientCheck> {
        Some(GradientCheck {
            parameter: "layer3.1.conv1.0.weight".into(),
            error,
            failing: Vec::new(),
            fp32_s: 1.0,
            bf16_s: 0.5,
        })
    }

    #[test]
    fn auto_falls_back_to_fp32_when_bf16_gradients_are_wrong() {
        let ok = decide(
            Precision::Auto,
            true,
            "precision auto: bf16, x".into(),
            check(0.2),
        );
        assert!(ok.bf16 && ok.warning.is_none(), "{ok:?}");
        assert!(ok.why.contains("within 20 %"), "{}", ok.why);
        let bad = decide(
            Precision::Auto,
            true,
            "precision auto: bf16, x".into(),
            check(0.97),
        );
        assert!(!bad.bf16, "{bad:?}");
        assert!(
            bad.why.contains("layer3.1.conv1.0.weight is 97 % off"),
            "{}",
            bad.why
        );
        let inf = decide(Precision::Auto, true, "a".into(), check(f64::INFINITY));
        // Right but slower: auto stays in fp32; asked for, bf16 it is.
        let slow = |p| {
            let mut c = check(0.2).unwrap();
            c.bf16_s = 1.2;
            decide(p, true, "w".into(), Some(c))
        };
        let auto_slow = slow(Precision::Auto);
        assert!(
            !auto_slow.bf16 && auto_slow.why.contains("not faster"),
            "{auto_slow:?}"
        );
        assert!(slow(Precision::Bf16).bf16);
        assert!(!inf.bf16 && inf.why.contains("infinitely"), "{inf:?}");
        // Asked for explicitly, bf16 stays, with a warning.
        let asked = decide(
            Precision::Bf16,
            true,
            "precision bf16 was asked for".into(),
            check(0.97),
        );
        assert!(asked.bf16 && asked.warning.is_some(), "{asked:?}");
        // fp32 (or auto on a device without native bf16) needs no check.
        let fp32 = decide(
            Precision::Auto,
            false,
            "precision auto: fp32, z".into(),
            None,
        );
        assert_eq!(
            (fp32.bf16, fp32.why.as_str()),
            (false, "precision auto: fp32, z")
        );
    }

    #[test]
    fn a_kept_decision_is_taken_for_the_same_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let (vs, mut model) = r3d18(Freeze::Full);
        let memo = Memo::new(dir.path(), "machine A; r3d_18; clip [4, 3, 8, 64, 64]");
        assert!(memo.apply(&mut model, &vs).is_none(), "nothing kept yet");
        let conv = "layer3.0.conv1.0.weight";
        assert!(
            vs.variables().contains_key(conv),
            "{:?}",
            vs.variables().keys()
        );
        memo.store(&Decided {
            bf16: true,
            why: "precision auto: bf16, checked".into(),
            fp32_convolutions: vec![conv.into()],
        });
        let kept = memo.apply(&mut model, &vs).expect("kept");
        assert!(kept.bf16 && kept.fp32_convolutions == [conv], "{kept:?}");
        assert!(
            kept.why
                .starts_with("precision auto: bf16, checked (checked by an earlier job"),
            "{}",
            kept.why
        );
        // Another machine, model or clip size has a memo of its own.
        let other = Memo::new(dir.path(), "machine A; r3d_18; clip [4, 3, 16, 112, 112]");
        assert!(other.apply(&mut model, &vs).is_none());
        // A decision naming a convolution this model lacks, or a damaged file, is not taken.
        other.store(&Decided {
            bf16: true,
            why: "w".into(),
            fp32_convolutions: vec!["layer9.0.conv1.0.weight".into()],
        });
        assert!(other.apply(&mut model, &vs).is_none());
        std::fs::write(&memo.path, b"{not json").unwrap();
        assert!(memo.apply(&mut model, &vs).is_none());
    }

    #[test]
    fn the_gradient_check_leaves_the_model_as_it_was() {
        tch::manual_seed(5);
        let (vs, model) = r3d18(Freeze::HeadOnly);
        let hp = crate::train::hyper::Hyperparameters::default();
        assert!(model.trainable_groups(&vs).0.is_empty());
        let mut opt = crate::train::run::optimizer(&hp, &model, &vs);
        let before = copies(&vs);
        let c = gradient_check(&model, &vs, &mut opt, [2, 3, 4, 32, 32], Device::Cpu, true);
        assert!(c.fp32_s > 0.0 && c.bf16_s > 0.0, "{c:?}");
        // Only the head trains: its bf16 gradient is close to fp32's.
        assert!(c.parameter.starts_with("fc."), "{c:?}");
        assert!(c.error.is_finite() && c.error < MAX_GRADIENT_ERROR, "{c:?}");
        let after = vs.variables();
        for (name, t) in before {
            assert!(after[&name].equal(&t), "{name} changed");
            assert!(!after[&name].grad().defined(), "{name} kept a gradient");
        }

        // With layer4 training, its BatchNorm runs in train mode during the check and moves its
        // running statistics: they are put back.
        let (vs, model) = r3d18(Freeze::LastStages { stages: 1 });
        let mut opt = crate::train::run::optimizer(&hp, &model, &vs);
        let before = copies(&vs);
        gradient_check(&model, &vs, &mut opt, [2, 3, 4, 32, 32], Device::Cpu, false);
        let after = vs.variables();
        for (name, t) in before {
            assert!(after[&name].equal(&t), "{name} changed");
        }
    }

    #[test]
    fn named_convolutions_can_be_kept_in_fp32() {
        let (vs, mut model) = r3d18(Freeze::Full);
        let x = Tensor::randn([1, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
        let bf16 = |m: &VideoClassifier| {
            let _amp = amp::Autocast::enter(Device::Cpu);
            m.features(&x, false).to_kind(Kind::Float)
        };
        let all_bf16 = bf16(&model);
        let names: Vec<String> = vs
            .variables()
            .into_keys()
            .filter(|n| n.ends_with(".weight") && vs.variables()[n].dim() == 5)
            .collect();
        assert!(model.set_fp32_convolutions(&vs, &names));
        // Every convolution in fp32: the features are fp32's.
        let fp32 = tch::no_grad(|| model.features(&x, false));
        let mixed = bf16(&model);
        let gap = |a: &Tensor| (a - &fp32).abs().max().double_value(&[]);
        assert!(
            gap(&mixed) < gap(&all_bf16),
            "{} vs {}",
            gap(&mixed),
            gap(&all_bf16)
        );
        assert!(!model.set_fp32_convolutions(&vs, &["no.such.weight".into()]));
        assert!(!model.set_fp32_convolutions(&vs, &["layer1.0.conv1.1.bias".into()]));
    }
}
