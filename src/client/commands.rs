//! The client commands: `datasets synth|upload|list`, `jobs create|watch|list`, `predict` and
//! `demo`. Progress goes to stderr (bars on a terminal); results go to stdout.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, ClientArgs};
use crate::synth::{self, SynthFormat, SynthSpec};

#[derive(Debug, clap::Subcommand)]
pub enum DatasetsCommand {
    /// Write a synthetic echocardiography-like dataset (H.264 MP4s and labels.csv with patient
    /// ids) to a folder, or to a zip when OUT ends in .zip.
    Synth(SynthArgs),
    /// Upload an archive (zip, tar, tar.gz) or a folder's zip to a dataset and wait for ingest.
    Upload(UploadArgs),
    /// List datasets.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output folder, or a .zip file.
    pub out: PathBuf,
    /// Heart-rate classes: 2 (normal, tachycardia), 3 (+ bradycardia), up to 8 rate bands.
    #[arg(long, default_value_t = 3)]
    pub classes: u32,
    /// Patients per class.
    #[arg(long, default_value_t = 8)]
    pub patients: u32,
    /// Clips per patient.
    #[arg(long, default_value_t = 2)]
    pub clips: u32,
    /// Seconds per clip.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Frame size, WIDTHxHEIGHT (even numbers).
    #[arg(long, default_value = "128x112", value_parser = parse_size)]
    pub size: (u32, u32),
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write MP4 videos or DICOM cine loops (with synthetic patient and study attributes).
    #[arg(long, value_enum, default_value_t = SynthFormat::Mp4)]
    pub format: SynthFormat,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT"))?;
    Ok((
        w.parse().map_err(|_| format!("bad width in `{s}`"))?,
        h.parse().map_err(|_| format!("bad height in `{s}`"))?,
    ))
}

impl SynthArgs {
    fn spec(&self) -> SynthSpec {
        SynthSpec {
            classes: self.classes,
            patients: self.patients,
            clips: self.clips,
            seconds: self.seconds,
            width: self.size.0,
            height: self.size.1,
            fps: self.fps,
            seed: self.seed,
            format: self.format,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The archive to upload.
    pub file: PathBuf,
    /// Add to this dataset instead of creating one.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Name of the new dataset (default: the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the upload is accepted, without waiting for ingest.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Queue a fine-tuning job.
    Create(JobCreateArgs),
    /// Follow a job to its end with a progress bar; exits non-zero unless it succeeds.
    Watch {
        job: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs.
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct JobCreateArgs {
    /// The (ready) dataset to fine-tune on.
    #[arg(long)]
    pub dataset: String,
    /// Base model (see GET /v1/base-models).
    #[arg(long, default_value = "r3d_18")]
    pub base_model: String,
    #[command(flatten)]
    pub hp: crate::train::offline::HyperparameterArgs,
    /// Makes retries of this command create the job once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job until it ends.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// The model (GET /v1/models).
    pub model: String,
    /// Videos to classify.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print the JSON answers instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for the generated videos and the downloaded plots.
    #[arg(long, default_value = "vidtune-demo")]
    pub workdir: PathBuf,
    /// Patients per class in the training dataset (two clips each).
    #[arg(long, default_value_t = 24)]
    pub patients: u32,
    #[arg(long, default_value_t = 10)]
    pub epochs: u32,
    #[arg(long, default_value = "r3d_18")]
    pub base_model: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

/// Print a line above any progress bar (and also when bars are hidden, as in a pipe).
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    bar.suspend(|| println!("{}", line.as_ref()));
}

pub async fn datasets(command: DatasetsCommand) -> anyhow::Result<()> {
    match command {
        DatasetsCommand::Synth(args) => {
            let spec = args.spec();
            let bar = ProgressBar::new_spinner().with_message(format!(
                "writing {} videos to {}",
                spec.classes * spec.patients * spec.clips,
                args.out.display()
            ));
            bar.enable_steady_tick(Duration::from_millis(120));
            let out = args.out.clone();
            let videos = tokio::task::spawn_blocking(move || synth::write(&spec, &out)).await??;
            bar.finish_and_clear();
            let mut per_class = std::collections::BTreeMap::<&str, usize>::new();
            for v in &videos {
                *per_class.entry(&v.label).or_default() += 1;
            }
            let classes: Vec<String> = per_class.iter().map(|(l, n)| format!("{l} {n}")).collect();
            println!(
                "wrote {} videos ({}) to {}",
                videos.len(),
                classes.join(", "),
                args.out.display()
            );
        }
        DatasetsCommand::Upload(args) => {
            let client = Client::new(&args.client)?;
            let dataset = match args.dataset {
                Some(id) => id,
                None => {
                    let name = args.name.clone().unwrap_or_else(|| {
                        args.file
                            .file_stem()
                            .map_or("dataset".into(), |s| s.to_string_lossy().into_owned())
                    });
                    let d: Value = client
                        .post("/v1/datasets", &json!({ "name": name }))
                        .await?;
                    let id = str_field(&d, "id")?;
                    println!("created dataset {id} ({name})");
                    id
                }
            };
            upload(&client, &dataset, &args.file, !args.no_wait).await?;
        }
        DatasetsCommand::List { client } => {
            let client = Client::new(&client)?;
            let list: Value = client.get("/v1/datasets").await?;
            println!("{:<36}  {:<10}  {:>7}  name", "id", "status", "videos");
            for d in list["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<10}  {:>7}  {}",
                    d["id"].as_str().unwrap_or_default(),
                    d["status"].as_str().unwrap_or_default(),
                    d["videos_total"],
                    d["name"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn str_field(v: &Value, key: &str) -> anyhow::Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the server's answer has no `{key}`: {v}"))
}

/// Upload an archive with a byte progress bar, then (if `wait`) follow ingest with a video
/// progress bar and print the report's totals. Returns the dataset after ingest.
pub async fn upload(
    client: &Client,
    dataset: &str,
    file: &Path,
    wait: bool,
) -> anyhow::Result<Value> {
    let bar = ProgressBar::new(0).with_style(style(
        "upload  [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ));
    let resp = client
        .upload_file(
            client.request(Method::POST, &format!("/v1/datasets/{dataset}/uploads")),
            file,
            &bar,
        )
        .await?;
    bar.finish_and_clear();
    let accepted: Value = resp.json().await?;
    println!(
        "uploaded {} ({} bytes, sha256 {})",
        file.display(),
        accepted["bytes"],
        accepted["sha256"].as_str().unwrap_or_default()
    );
    if !wait {
        return Ok(accepted);
    }
    let bar = ProgressBar::new(0)
        .with_style(style("ingest  [{bar:32}] {pos}/{len} videos decoded {msg}"));
    let ds = loop {
        let ds: Value = client.get(&format!("/v1/datasets/{dataset}")).await?;
        bar.set_length(ds["videos_total"].as_u64().unwrap_or(0));
        bar.set_position(ds["videos_done"].as_u64().unwrap_or(0));
        match ds["status"].as_str() {
            Some("ready") => break ds,
            Some("failed") => {
                bar.abandon();
                anyhow::bail!(
                    "ingest failed: {}",
                    ds["status_reason"].as_str().unwrap_or("no reason given")
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    bar.finish_and_clear();
    let report: Value = client
        .get(&format!("/v1/datasets/{dataset}/report"))
        .await?;
    let t = &report["totals"];
    println!(
        "dataset {dataset} ready: {} videos accepted, {} rejected, {} skipped",
        t["accepted"], t["rejected"], t["skipped"]
    );
    for c in report["classes"].as_array().into_iter().flatten() {
        println!(
            "  {:<14} train {:>4}  val {:>4}  test {:>4}",
            c["label"].as_str().unwrap_or_default(),
            c["train"],
            c["val"],
            c["test"]
        );
    }
    for r in report["rejected"].as_array().into_iter().flatten() {
        println!(
            "  rejected {}: {}",
            r["path"].as_str().unwrap_or_default(),
            r["reason"].as_str().unwrap_or_default()
        );
    }
    Ok(ds)
}

pub async fn jobs(command: JobsCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        JobsCommand::Create(args) => {
            let client = Client::new(&args.client)?;
            let body = json!({
                "dataset_id": args.dataset,
                "base_model": args.base_model,
                "hyperparameters": args.hp.merged()?,
            });
            let mut rb = client.request(Method::POST, "/v1/jobs").json(&body);
            if let Some(k) = &args.idempotency_key {
                rb = rb.header("idempotency-key", k);
            }
            let job: Value = client.send(rb).await?.json().await?;
            let id = str_field(&job, "id")?;
            println!("queued job {id}");
            if args.watch {
                return Ok(exit_for(&watch(&client, &id).await?));
            }
        }
        JobsCommand::Watch { job, client } => {
            let client = Client::new(&client)?;
            return Ok(exit_for(&watch(&client, &job).await?));
        }
        JobsCommand::List { state, client } => {
            let client = Client::new(&client)?;
            let path = match &state {
                Some(s) => format!("/v1/jobs?state={s}"),
                None => "/v1/jobs".into(),
            };
            let list: Value = client.get(&path).await?;
            println!(
                "{:<36}  {:<10}  {:<12}  {:>7}  {:<36}  created",
                "id", "state", "base model", "epoch", "model"
            );
            for j in list["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<10}  {:<12}  {:>3}/{:<3}  {:<36}  {}",
                    j["id"].as_str().unwrap_or_default(),
                    j["state"].as_str().unwrap_or_default(),
                    j["base_model"].as_str().unwrap_or_default(),
                    j["epoch"],
                    j["epochs"],
                    j["model_id"].as_str().unwrap_or("-"),
                    j["created_at"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn exit_for(job: &Value) -> std::process::ExitCode {
    if job["state"] == "succeeded" {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Follow a job to its end: a progress bar fed by the job's progress and ETA, and one line per
/// event (state changes, epochs, warnings, the test evaluation). Returns the final job.
pub async fn watch(client: &Client, job: &str) -> anyhow::Result<Value> {
    let path = format!("/v1/jobs/{job}");
    let first: Value = client.get(&path).await?;
    let bar = ProgressBar::new(1000).with_style(style(
        "{spinner} [{bar:32}] {percent:>3}% {msg}  ({elapsed})",
    ));
    bar.enable_steady_tick(Duration::from_millis(200));
    let events = client.follow_events(job, |kind, e| {
        let message = e["message"].as_str().unwrap_or_default();
        let level = e["level"].as_str().unwrap_or("info");
        if matches!(level, "warning" | "error") {
            say(&bar, format!("{level}: {message}"));
        } else {
            say(&bar, format!("{kind:>8}  {message}"));
        }
    });
    let poll = async {
        loop {
            if let Ok(j) = client.get::<Value>(&path).await {
                bar.set_position((j["progress"].as_f64().unwrap_or(0.0) * 1000.0) as u64);
                let mut msg = format!("epoch {}/{}", j["epoch"], j["epochs"]);
                if let Some(m) = j["latest_metrics"].as_object() {
                    msg.push_str(&format!(
                        " · loss {:.3} · val acc {:.3}",
                        m.get("train_loss")
                            .and_then(Value::as_f64)
                            .unwrap_or(f64::NAN),
                        m.get("val_accuracy")
                            .and_then(Value::as_f64)
                            .unwrap_or(f64::NAN)
                    ));
                }
                if let Some(s) = j["eta_s"].as_f64().filter(|_| j["state"] == "running") {
                    msg.push_str(&format!(" · ETA {}", eta(s)));
                }
                bar.set_message(msg);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    if first["state"] == "queued" || first["state"] == "running" {
        tokio::select! {
            r = events => r?,
            () = poll => {}
        }
    } else {
        events.await?;
    }
    bar.finish_and_clear();
    let last: Value = client.get(&path).await?;
    match last["state"].as_str() {
        Some("succeeded") => println!(
            "job {job} succeeded: model {}",
            last["model_id"].as_str().unwrap_or("-")
        ),
        Some(state) => println!(
            "job {job} {state}{}",
            last["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        None => {}
    }
    Ok(last)
}

pub async fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    for file in &args.files {
        let answer = predict_file(&client, &args.model, file).await?;
        if args.json {
            println!("{answer}");
        } else {
            println!("{}  {}", file.display(), top(&answer));
        }
    }
    Ok(())
}

async fn predict_file(client: &Client, model: &str, file: &Path) -> anyhow::Result<Value> {
    let body = tokio::fs::read(file)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let rb = client
        .request(Method::POST, &format!("/v1/models/{model}/predict"))
        .header(reqwest::header::CONTENT_TYPE, super::content_type(file))
        .body(body);
    Ok(client.send(rb).await?.json().await?)
}

/// `label 0.93 (other 0.05, third 0.02)` from a prediction.
fn top(answer: &Value) -> String {
    let preds: Vec<(String, f64)> = answer["predictions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["label"].as_str().unwrap_or("?").to_string(),
                p["probability"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    match preds.split_first() {
        None => "no prediction".into(),
        Some(((l, p), rest)) => {
            let others: Vec<String> = rest.iter().map(|(l, p)| format!("{l} {p:.2}")).collect();
            format!("{l} {p:.2} ({})", others.join(", "))
        }
    }
}

/// The whole loop on synthetic echocardiography: generate, upload, fine-tune, watch, evaluate,
/// predict held-out patients, fetch the plots.
pub async fn demo(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    let client = Client::new(&args.client)?;
    let me: Value = client.get("/v1/me").await?;
    println!(
        "vidtune at {} (tenant {})",
        client.base(),
        me["tenant"]["name"].as_str().unwrap_or("?")
    );
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating {}", args.workdir.display()))?;

    // Training data, and held-out patients the model never sees.
    let train_spec = SynthSpec {
        patients: args.patients,
        ..SynthSpec::default()
    };
    let held_spec = SynthSpec {
        patients: 2,
        clips: 1,
        seed: 1000 + train_spec.seed,
        ..SynthSpec::default()
    };
    let zip = args.workdir.join("echo-train.zip");
    let held_dir = args.workdir.join("held-out");
    let classes = synth::rate_classes(train_spec.classes);
    println!(
        "1/5 generating {} echo-like cine loops ({} patients × {} classes × {} clips, {:.0} s each): {}",
        train_spec.classes * train_spec.patients * train_spec.clips,
        train_spec.patients,
        train_spec.classes,
        train_spec.clips,
        train_spec.seconds,
        classes
            .iter()
            .map(|c| format!("{} {:.0}–{:.0} bpm", c.label, c.bpm.0, c.bpm.1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (zip2, held2) = (zip.clone(), held_dir.clone());
    let (_, held) = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&held2);
        anyhow::Ok((
            synth::write(&train_spec, &zip2)?,
            synth::write(&held_spec, &held2)?,
        ))
    })
    .await??;

    println!("2/5 uploading and decoding");
    let ds: Value = client
        .post(
            "/v1/datasets",
            &json!({
                "name": format!("demo-echo-{}", &uuid::Uuid::new_v4().to_string()[..8]),
                "description": "synthetic echocardiography-like cine loops (vidtune demo)",
                "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1},
                "cache": {"short_side": 40},
            }),
        )
        .await?;
    let dataset = str_field(&ds, "id")?;
    upload(&client, &dataset, &zip, true).await?;

    println!(
        "3/5 fine-tuning {} for {} epochs (live: GET {}/v1/jobs/<id>/events)",
        args.base_model,
        args.epochs,
        client.base()
    );
    let job: Value = client
        .post(
            "/v1/jobs",
            &json!({
                "dataset_id": dataset,
                "base_model": args.base_model,
                "hyperparameters": demo_hyperparameters(args.epochs),
            }),
        )
        .await?;
    let job_id = str_field(&job, "id")?;
    println!("      job {job_id}");
    let done = watch(&client, &job_id).await?;
    if done["state"] != "succeeded" {
        return Ok(std::process::ExitCode::FAILURE);
    }
    let model = str_field(&done, "model_id")?;

    println!("4/5 test split (patients held out by the dataset's split)");
    let m: Value = client.get(&format!("/v1/models/{model}")).await?;
    let test = &m["test_metrics"];
    if test.is_object() {
        println!(
            "      accuracy {:.3}, balanced accuracy {:.3}, macro-F1 {:.3} (chance {:.3})",
            test["accuracy"].as_f64().unwrap_or(f64::NAN),
            test["balanced_accuracy"].as_f64().unwrap_or(f64::NAN),
            test["macro_f1"].as_f64().unwrap_or(f64::NAN),
            1.0 / classes.len() as f64
        );
        for c in test["per_class"].as_array().into_iter().flatten() {
            println!(
                "      {:<12} sensitivity {:.2}  specificity {:.2}  ({} videos)",
                c["label"].as_str().unwrap_or_default(),
                c["recall"].as_f64().unwrap_or(f64::NAN),
                c["specificity"].as_f64().unwrap_or(f64::NAN),
                c["support"]
            );
        }
    }

    println!("5/5 predicting {} new patients' videos", held.len());
    let mut right = 0;
    for v in &held {
        let answer = predict_file(&client, &model, &held_dir.join(&v.path)).await?;
        let predicted = answer["predictions"][0]["label"].as_str().unwrap_or("?");
        let ok = predicted == v.label;
        right += usize::from(ok);
        println!(
            "      {} {:<28} truth {:<12} ({:>5.1} bpm)  predicted {}",
            if ok { "✓" } else { "✗" },
            v.path,
            v.label,
            v.bpm,
            top(&answer)
        );
    }
    println!("      {right} of {} correct", held.len());

    for name in ["training-curves", "confusion-matrix"] {
        let svg = client
            .send(client.request(Method::GET, &format!("/v1/jobs/{job_id}/plots/{name}")))
            .await?
            .bytes()
            .await?;
        let out = args.workdir.join(format!("{name}.svg"));
        std::fs::write(&out, &svg).with_context(|| format!("writing {}", out.display()))?;
        println!(
            "plot: {} ({}/v1/jobs/{job_id}/plots/{name})",
            out.display(),
            client.base()
        );
    }
    println!("model {model}: try `vidtune predict {model} <video.mp4>`");
    Ok(std::process::ExitCode::SUCCESS)
}

/// A recipe that learns the synthetic heart rates from scratch on a laptop CPU in minutes:
/// small frames (the cache keeps a 40-pixel short side) and 16 consecutive frames at 15 fps.
pub fn demo_hyperparameters(epochs: u32) -> Value {
    json!({
        "epochs": epochs,
        "batch_size": 4,
        "optimizer": "adamw",
        "lr": 0.0005,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "frames": 16,
        "frame_stride": 1,
        "crop": 36,
        "freeze": {"policy": "full"},
        "backbone_lr_mult": 1.0,
        "eval_clips": 3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::offline::merge_hyperparameters as hyperparameters;

    #[test]
    fn set_nests_dotted_keys_and_parses_json_values() {
        let hp = hyperparameters(
            Some(r#"{"epochs":3,"freeze":{"policy":"last_stages"}}"#),
            &[
                "freeze.stages=2".into(),
                "optimizer=adamw".into(),
                "lr=0.01".into(),
                "augmentation.horizontal_flip=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            hp,
            json!({"epochs":3,"freeze":{"policy":"last_stages","stages":2},"optimizer":"adamw",
                   "lr":0.01,"augmentation":{"horizontal_flip":true}})
        );
        assert!(hyperparameters(None, &["novalue".into()]).is_err());
        assert!(hyperparameters(Some("[1]"), &[]).is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("128x96"), Ok((128, 96)));
        assert!(parse_size("128").is_err());
    }
}
