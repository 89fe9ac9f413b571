//! B1: decode planned clips (written by scripts/bench/decode_torchcodec.py --write-plan) with
//! vidtune's clip decoder, resized to uint8 RGB; one JSON line like the reference's.
//!     bench_decode PLAN.json FRAMES HEIGHTxWIDTH THREADS RUNS
use std::time::Instant;

use vidtune::media::clips::decode_clips;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&a[1])?)?;
    let frames: usize = a[2].parse()?;
    let (h, w) = a[3].split_once('x').expect("HxW");
    let (h, w): (u32, u32) = (h.parse()?, w.parse()?);
    let threads: usize = a[4].parse()?;
    let runs: usize = a[5].parse()?;
    let videos: Vec<(String, Vec<u64>)> = plan
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            let starts = v["starts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_u64().unwrap());
            (v["video"].as_str().unwrap().to_string(), starts.collect())
        })
        .collect();
    let clips: usize = videos.iter().map(|v| v.1.len()).sum();
    let run = || -> anyhow::Result<f64> {
        let t = Instant::now();
        for (path, starts) in &videos {
            let out = decode_clips(path.as_ref(), starts, frames, (w, h), threads)?;
            assert_eq!(out.len(), starts.len());
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    run()?; // warm-up, as the reference
    let mut times = (0..runs)
        .map(|_| run())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let all = times.clone();
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"bench": "B1", "impl": "vidtune", "videos": videos.len(), "clips": clips,
            "frames": frames, "size": [h, w], "threads": threads, "median_ms_total": med,
            "clips_per_s": clips as f64 / (med / 1e3), "runs": all})
    );
    Ok(())
}
