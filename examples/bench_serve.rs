//! Serving throughput with and without dynamic batching: `concurrency` clients each sending
//! single-clip requests to one r3d_18 model (fp32) for `secs` seconds.
//!     cargo run --release --example bench_serve -- [concurrency] [secs] [frames] [crop]
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vidtune::backbone::{Arch, Base, Freeze, HeadSpec, VideoClassifier};
use vidtune::media::decode::CacheSpec;
use vidtune::serve::{ModelCache, ModelMeta, ServeConfig};

async fn run(
    batching: bool,
    concurrency: usize,
    secs: u64,
    weights: &std::path::Path,
    clip: (i64, i64),
) -> (f64, f64, f64) {
    let cfg = ServeConfig {
        max_batch_clips: if batching { 8 } else { 1 },
        max_delay: if batching {
            Duration::from_millis(10)
        } else {
            Duration::ZERO
        },
        queue: 256,
        rate_per_s: 0.0,
        ..Default::default()
    };
    let cache = Arc::new(ModelCache::new(cfg));
    let meta = ModelMeta {
        id: uuid::Uuid::new_v4(),
        base: Base::Builtin(Arch::R3d18),
        classes: vec!["a".into(), "b".into()],
        head: HeadSpec::default(),
        preprocessing: Arch::R3d18.preprocessing(),
        decode: CacheSpec::default(),
        eval_clips: 1,
        frame_stride: 1,
        weights: weights.to_path_buf(),
    };
    let handle = cache.get(meta).await.unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (h, c, d) = (handle.clone(), cache.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let x = Tensor::randn([1, 3, clip.0, clip.1, clip.1], (Kind::Float, Device::Cpu));
                let t = Instant::now();
                let _probs = h
                    .infer(x, Duration::from_secs(120), &c.stats)
                    .await
                    .unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                d.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut lat: Vec<f64> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    (
        done.load(Ordering::Relaxed) as f64 / elapsed,
        p(0.5),
        p(0.99),
    )
}

#[tokio::main]
async fn main() {
    let concurrency: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let secs: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let arg = |i: usize, d: i64| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (frames, crop) = (arg(3, 16), arg(4, 112));
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let _m = VideoClassifier::new(
        &vs.root(),
        Arch::R3d18,
        2,
        &HeadSpec::default(),
        Freeze::Full,
    )
    .unwrap();
    vs.save(&weights).unwrap();
    println!(
        "concurrency {concurrency}, {secs} s each, r3d_18 {frames}x{crop}x{crop} fp32 on {} CPU threads",
        tch::get_num_threads()
    );
    for batching in [false, true] {
        let (rps, p50, p99) = run(batching, concurrency, secs, &weights, (frames, crop)).await;
        println!(
            "batching {:<5} {rps:6.2} clips/s   p50 {p50:8.1} ms   p99 {p99:8.1} ms",
            batching
        );
    }
}
