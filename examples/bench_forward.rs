//! CPU forward time per clip of each built-in architecture (eval mode, fp32, batch 1), as
//! `arch median_ms` lines. Used by `scripts/bench/forward`.
use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vidtune::backbone::{Arch, Freeze, HeadSpec, VideoClassifier};

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only: Vec<String> = std::env::args().skip(2).collect();
    tch::manual_seed(0);
    for arch in Arch::ALL {
        if !only.is_empty() && !only.iter().any(|a| a == arch.name()) {
            continue;
        }
        let vs = VarStore::new(Device::Cpu);
        let model = VideoClassifier::new(&vs.root(), arch, 400, &HeadSpec::default(), Freeze::Full)
            .unwrap();
        let p = arch.preprocessing();
        let x = Tensor::randn([1, 3, p.frames, p.crop, p.crop], (Kind::Float, Device::Cpu));
        let _guard = tch::no_grad_guard();
        let _ = model.forward_t(&x, false); // warm-up
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let _ = model.forward_t(&x, false);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("{} {:.1}", arch.name(), times[times.len() / 2]);
    }
}
