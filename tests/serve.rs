//! The serving engine on its own: dynamic batching and the bounded queue, with a real model on
//! its inference thread.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use uuid::Uuid;
use vidtune::backbone::{Arch, Base, Freeze, HeadSpec, VideoClassifier};
use vidtune::media::decode::CacheSpec;
use vidtune::serve::{InferError, ModelCache, ModelMeta, ServeConfig};

fn model_meta(dir: &std::path::Path) -> ModelMeta {
    let vs = VarStore::new(Device::Cpu);
    let _m = VideoClassifier::new(
        &vs.root(),
        Arch::R3d18,
        2,
        &HeadSpec::default(),
        Freeze::Full,
    )
    .unwrap();
    let weights = dir.join("model.safetensors");
    vs.save(&weights).unwrap();
    let mut preprocessing = Arch::R3d18.preprocessing();
    preprocessing.frames = 4;
    preprocessing.crop = 32;
    ModelMeta {
        id: Uuid::new_v4(),
        base: Base::Builtin(Arch::R3d18),
        classes: vec!["a".into(), "b".into()],
        head: HeadSpec::default(),
        preprocessing,
        decode: CacheSpec::default(),
        eval_clips: 1,
        frame_stride: 1,
        weights,
    }
}

fn clips(n: i64, side: i64) -> Tensor {
    Tensor::randn([n, 3, 4, side, side], (Kind::Float, Device::Cpu))
}

#[tokio::test]
async fn concurrent_requests_share_one_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ModelCache::new(ServeConfig {
        max_delay: Duration::from_millis(500),
        max_batch_clips: 64,
        ..Default::default()
    }));
    let handle = cache.get(model_meta(dir.path())).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (h, c) = (handle.clone(), cache.clone());
        tasks.push(tokio::spawn(async move {
            h.infer(clips(1, 32), Duration::from_secs(30), &c.stats)
                .await
        }));
    }
    for t in tasks {
        let p = t.await.unwrap().unwrap();
        assert_eq!(p.size(), [1, 2]);
        let sum = p.sum(Kind::Float).double_value(&[]);
        assert!((sum - 1.0).abs() < 1e-5, "probabilities sum to 1");
    }
    assert_eq!(
        cache.stats.batches.load(Ordering::Relaxed),
        1,
        "one forward pass for four requests"
    );
    assert_eq!(cache.stats.batched_requests.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_full_queue_answers_overloaded_and_the_accepted_request_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    // Room for one waiting request.
    let cache = Arc::new(ModelCache::new(ServeConfig {
        queue: 1,
        max_delay: Duration::ZERO,
        max_batch_clips: 1,
        ..Default::default()
    }));
    let handle = cache.get(model_meta(dir.path())).await.unwrap();
    let infer = |n: i64, side: i64| {
        let (h, c) = (handle.clone(), cache.clone());
        tokio::spawn(async move {
            h.infer(clips(n, side), Duration::from_secs(120), &c.stats)
                .await
        })
    };
    let computing = infer(48, 112); // takes seconds
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = infer(1, 32); // fills the one place in the queue
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = handle
        .infer(clips(1, 32), Duration::from_secs(5), &cache.stats)
        .await;
    assert!(
        matches!(refused, Err(InferError::Overloaded)),
        "{refused:?}"
    );
    assert_eq!(cache.stats.rejected_overloaded.load(Ordering::Relaxed), 1);
    assert_eq!(computing.await.unwrap().unwrap().size(), [48, 2]);
    assert_eq!(waiting.await.unwrap().unwrap().size(), [1, 2]);
    // With the queue drained, requests run again.
    assert!(
        handle
            .infer(clips(1, 32), Duration::from_secs(30), &cache.stats)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn concurrent_first_requests_load_a_model_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ModelCache::new(ServeConfig::default()));
    let meta = model_meta(dir.path());
    let loads: Vec<_> = (0..4)
        .map(|_| {
            let (c, m) = (cache.clone(), meta.clone());
            tokio::spawn(async move { c.get(m).await.unwrap() })
        })
        .collect();
    for l in loads {
        l.await.unwrap();
    }
    assert_eq!(cache.stats.models_loaded.load(Ordering::Relaxed), 1);
    assert_eq!(cache.loaded_count(), 1);
}

#[tokio::test]
async fn least_recently_used_models_are_evicted_over_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _ = dir;
    // r3d_18 has ~33 M parameters (~130 MB): a 200 MB budget holds one.
    let cache = ModelCache::new(ServeConfig {
        memory_budget: 200 << 20,
        ..Default::default()
    });
    cache.get(model_meta(a.path())).await.unwrap();
    assert_eq!(cache.loaded_count(), 1);
    cache.get(model_meta(b.path())).await.unwrap();
    assert_eq!(cache.loaded_count(), 1);
    assert_eq!(cache.stats.models_evicted.load(Ordering::Relaxed), 1);
}
