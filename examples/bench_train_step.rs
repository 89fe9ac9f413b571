//! B2: one training step (forward, cross-entropy, backward, SGD with momentum) of a built-in
//! video model, fp32 or bf16 autocast, on the CPU or a CUDA device; the same work as
//! scripts/bench/train_step_torch.py. Prints one JSON line.
//!     bench_train_step --arch r2plus1d_18 --precision bf16 --batch 4 --frames 16 --crop 112
//!                      --runs 5 [--device cuda] [--channels-last]
use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vidtune::backbone::{Arch, Freeze, HeadSpec, VideoClassifier, amp};
use vidtune::train::hyper::OptimizerKind;
use vidtune::train::optim::{Group, Optimizer};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn main() {
    let arch = Arch::parse(&arg("--arch", "r2plus1d_18")).expect("a built-in architecture");
    let precision = arg("--precision", "fp32");
    let batch: i64 = arg("--batch", "4").parse().unwrap();
    let frames: i64 = arg("--frames", "16").parse().unwrap();
    let crop: i64 = arg("--crop", "112").parse().unwrap();
    let runs: usize = arg("--runs", "5").parse().unwrap();
    let device = match arg("--device", "cpu").as_str() {
        "cuda" => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let channels_last = flag("--channels-last");
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let model =
        VideoClassifier::new(&vs.root(), arch, 3, &HeadSpec::default(), Freeze::Full).unwrap();
    if channels_last {
        amp::to_channels_last_3d(&vs);
    }
    let (backbone, head) = model.trainable_groups(&vs);
    let mut opt = Optimizer::new(
        OptimizerKind::Sgd,
        vec![
            Group {
                params: backbone,
                lr_mult: 1.0,
            },
            Group {
                params: head,
                lr_mult: 1.0,
            },
        ],
        0.9,
        1e-4,
    );
    let mut x = Tensor::randn([batch, 3, frames, crop, crop], (Kind::Float, device));
    if channels_last {
        x = amp::channels_last_3d(&x);
    }
    let y = Tensor::randint(3, [batch], (Kind::Int64, device));
    let bf16 = precision == "bf16";
    let mut step = || {
        let t = Instant::now();
        opt.zero_grad();
        let loss = {
            let _amp = bf16.then(|| amp::Autocast::enter(device));
            model
                .forward_t(&x, true)
                .to_kind(Kind::Float)
                .cross_entropy_for_logits(&y)
        };
        loss.backward();
        opt.step(0.01);
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        t.elapsed().as_secs_f64() * 1e3
    };
    step(); // warm-up (and cuDNN's algorithm search)
    let mut times: Vec<f64> = (0..runs).map(|_| step()).collect();
    let steps = times.clone();
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"bench\": \"B2\", \"impl\": \"vidtune\", \"arch\": \"{}\", \"precision\": \"{precision}\", \"batch\": {batch}, \"frames\": {frames}, \"crop\": {crop}, \"device\": \"{}\", \"channels_last\": {channels_last}, \"threads\": {}, \"median_ms\": {:.3}, \"steps\": {:?}}}",
        arch.name(),
        if device.is_cuda() { "cuda" } else { "cpu" },
        tch::get_num_threads(),
        times[times.len() / 2],
        steps
            .iter()
            .map(|t| (t * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
}
