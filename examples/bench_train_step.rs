//! B2: one training step (forward, cross-entropy, backward, SGD with momentum) of a built-in
//! video model, fp32 or bf16 autocast, on the CPU or a CUDA device; the same work as
//! scripts/bench/train_step_torch.py. Prints one JSON line.
//!     bench_train_step --arch r2plus1d_18 --precision bf16 --batch 4 --frames 16 --crop 112
//!                      --runs 5 [--device cuda] [--channels-last] [--freeze last_stages:1]
//! With `--freeze`, the frozen stages run without gradients and BatchNorm in eval mode, as in a
//! job with that freeze policy. `phases_ms` splits the median step into forward (with the loss),
//! backward and optimizer. `malloc` names the library that serves the process's `malloc` and
//! `keep_freed_memory` whether the heap policy took (both together: the shipped default is
//! `"glibc"` and `true`).
use std::ffi::CStr;
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

/// The allocator behind `malloc` as the dynamic linker resolved it (an LD_PRELOAD of jemalloc or
/// tcmalloc comes first): "glibc", "jemalloc", "tcmalloc", or the library's file name.
fn malloc_name() -> String {
    // SAFETY: dladdr only reads the loader's tables and fills the zeroed struct; the file name
    // it points to belongs to a loaded object and outlives this call.
    let file = unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let malloc: unsafe extern "C" fn(libc::size_t) -> *mut libc::c_void = libc::malloc;
        if libc::dladdr(malloc as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return "unknown".into();
        }
        CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned()
    };
    let base = file.rsplit('/').next().unwrap_or(&file);
    [
        ("libjemalloc", "jemalloc"),
        ("libtcmalloc", "tcmalloc"),
        ("libc.so", "glibc"),
    ]
    .iter()
    .find(|(mark, _)| base.starts_with(mark))
    .map_or_else(|| base.to_string(), |(_, name)| name.to_string())
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
    // As the training process does (`vidtune train-job`); VIDTUNE_KEEP_FREED_MEMORY=0 measures
    // the C library's defaults.
    let kept = vidtune::backbone::heap::keep_freed_memory();
    let freeze_arg = arg("--freeze", "full");
    let freeze = match freeze_arg.as_str() {
        "full" => Freeze::Full,
        "head_only" => Freeze::HeadOnly,
        f => Freeze::LastStages {
            stages: f
                .strip_prefix("last_stages:")
                .and_then(|n| n.parse().ok())
                .expect("--freeze full, head_only or last_stages:N"),
        },
    };
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let model = VideoClassifier::new(&vs.root(), arch, 3, &HeadSpec::default(), freeze).unwrap();
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
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
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
        sync();
        let forward = t.elapsed();
        loss.backward();
        sync();
        let backward = t.elapsed();
        opt.step(0.01).unwrap();
        sync();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let total = t.elapsed();
        [
            ms(total),
            ms(forward),
            ms(backward - forward),
            ms(total - backward),
        ]
    };
    let warmup = step(); // warm-up (and cuDNN's algorithm search)
    let mut phases: Vec<[f64; 4]> = (0..runs).map(|_| step()).collect();
    let steps: Vec<f64> = phases.iter().map(|p| p[0]).collect();
    phases.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let median = phases[phases.len() / 2];
    println!(
        "{{\"bench\": \"B2\", \"impl\": \"vidtune\", \"arch\": \"{}\", \"precision\": \"{precision}\", \"batch\": {batch}, \"frames\": {frames}, \"crop\": {crop}, \"device\": \"{}\", \"channels_last\": {channels_last}, \"malloc\": \"{}\", \"keep_freed_memory\": {kept}, \"freeze\": \"{freeze_arg}\", \"threads\": {}, \"warmup_ms\": {:.3}, \"median_ms\": {:.3}, \"phases_ms\": {{\"forward\": {:.3}, \"backward\": {:.3}, \"optimizer\": {:.3}}}, \"steps\": {:?}}}",
        arch.name(),
        if device.is_cuda() { "cuda" } else { "cpu" },
        malloc_name(),
        tch::get_num_threads(),
        warmup[0],
        median[0],
        median[1],
        median[2],
        median[3],
        steps
            .iter()
            .map(|t| (t * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
}
