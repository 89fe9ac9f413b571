//! `vidtune train`: a job spec trained on a training-cache folder without the server or a
//! database, here on a tiny synthetic cache on the CPU.
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vidtune::backbone::export::ExportMetadata;
use vidtune::backbone::{Arch, Base, Freeze, VideoClassifier};
use vidtune::ingest::split::SplitSpec;
use vidtune::synth::SynthSpec;
use vidtune::train::offline::{self, JsonLines, OfflineJob};
use vidtune::train::run::Outcome;

/// 2 classes × 6 patients × 1 clip of 1 s at 8 fps, 40 × 32.
fn tiny() -> SynthSpec {
    SynthSpec {
        classes: 2,
        patients: 6,
        clips: 1,
        seconds: 1.0,
        width: 40,
        height: 32,
        fps: 8,
        seed: 4,
        format: Default::default(),
    }
}

fn hyperparameters() -> Value {
    json!({"epochs": 1, "batch_size": 4, "frames": 4, "crop": 32, "warmup_epochs": 0,
           "eval_clips": 1, "loader_threads": 2, "log_every_steps": 1, "device": "cpu"})
}

fn lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The exported model rebuilt from its files, and its logits for one clip.
fn load_and_run(dir: &Path) -> Tensor {
    let meta: ExportMetadata =
        serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta.base_model, "r3d_18");
    let mut vs = VarStore::new(Device::Cpu);
    let model = VideoClassifier::new(
        &vs.root(),
        Base::Builtin(Arch::R3d18),
        meta.classes.len() as i64,
        &meta.head,
        Freeze::Full,
    )
    .unwrap();
    vs.load(dir.join("model.safetensors")).unwrap();
    let clip = Tensor::zeros([1, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
    tch::no_grad(|| model.forward_t(&clip, false))
}

#[test]
fn a_synthetic_cache_trains_for_an_epoch_into_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, out) = (dir.path().join("cache"), dir.path().join("out"));
    std::fs::create_dir_all(&cache).unwrap();
    let manifest = offline::write_synthetic_cache(&tiny(), &cache).unwrap();
    assert_eq!(manifest.videos.len(), 12);
    let job = OfflineJob {
        base_model: "r3d_18".into(),
        hyperparameters: hyperparameters(),
        pretrained: None,
        split: SplitSpec {
            train: 0.5,
            val: 0.25,
            test: 0.25,
            seed: 0,
            group_by: Default::default(),
        },
        device: None,
    };
    let mut printed = Vec::new();
    let outcome = offline::train(&job, &cache, &out, &mut JsonLines::new(&mut printed, &out));
    let Ok(Outcome::Succeeded(id)) = outcome else {
        panic!("{outcome:?}\n{}", String::from_utf8_lossy(&printed));
    };
    let lines = lines(&printed);
    let of = |t: &str| lines.iter().filter(|l| l["type"] == t).collect::<Vec<_>>();
    assert_eq!(of("epoch").len(), 1);
    assert!(of("epoch")[0]["clips_per_s"].as_f64().unwrap() > 0.0);
    assert!(!of("step").is_empty());
    assert_eq!(of("checkpoint").len(), 1);
    let model = of("model");
    assert_eq!(model.len(), 1);
    assert_eq!(model[0]["id"], json!(id));
    assert_eq!(model[0]["classes"], json!(["normal", "tachycardia"]));
    let model_dir = out.join("models").join(id.to_string());
    assert_eq!(model[0]["path"], json!(model_dir));
    assert!(lines.iter().all(|l| l["ts"].as_f64().is_some()));
    // What ran is kept next to what it made.
    let job_dirs: Vec<_> = std::fs::read_dir(out.join("jobs")).unwrap().collect();
    assert_eq!(job_dirs.len(), 1);
    let record: Value = serde_json::from_slice(
        &std::fs::read(job_dirs[0].as_ref().unwrap().path().join("job.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["hyperparameters"]["epochs"], 1);
    assert_eq!(load_and_run(&model_dir).size(), [1, 2]);
}

#[test]
fn the_command_renders_a_synthetic_cache_and_trains_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, out) = (dir.path().join("cache"), dir.path().join("out"));
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vidtune"))
            .args([
                "train",
                "--synthetic",
                "--synth-classes",
                "2",
                "--synth-patients",
                "6",
            ])
            .args([
                "--synth-clips",
                "1",
                "--synth-seconds",
                "1",
                "--synth-size",
                "40x32",
            ])
            .args([
                "--synth-fps",
                "8",
                "--base-model",
                "r3d_18",
                "--split",
                "0.5,0.25,0.25",
            ])
            .args(["--hyperparameters", &hyperparameters().to_string()])
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let done = run(&["--set", "lr=0.02"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let lines = lines(&done.stdout);
    assert_eq!(lines[0]["type"], "event");
    assert_eq!(lines[0]["kind"], "synthetic");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "model");
    assert!(
        Path::new(last["path"].as_str().unwrap())
            .join("model.safetensors")
            .exists()
    );
    assert!(cache.join("manifest.json").exists());

    // A job the submission would refuse is refused here, as the user's error (exit 2).
    let refused = run(&["--set", "epochs=0"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("hyperparameters.epochs"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
