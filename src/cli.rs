//! Command dispatch for the `vidtune` binary.
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::app::{Application, shutdown_signal};
use crate::backbone::Arch;
use crate::config::{Cli, Command, KeysCommand, Settings, WeightsCommand};
use crate::{auth, client, db, doctor, telemetry, worker};

/// Parse arguments, run the command, map errors to exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::MediaWorker = cli.command {
        // No runtime, no logging to stderr: the parent speaks JSON lines with this process.
        return match crate::media::worker::serve_stdio() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if let Command::ScriptHost = cli.command {
        // stdout carries the protocol; stderr is the parent's log.
        return match crate::backbone::script_host::host_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::SandboxProbe { read, write } = &cli.command {
        return match crate::sandbox::probe_main(read, write) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    telemetry::init(cli.log_format);
    if let Command::Train(args) = cli.command {
        // No runtime: the training loop is synchronous, and stdout carries its JSON lines.
        return crate::train::offline::main(args);
    }
    if let Command::TrainJob {
        job,
        attempt,
        device,
        data_dir,
        database_url,
    } = &cli.command
    {
        let Some(device) = worker::Device::parse(device) else {
            eprintln!("error: unknown device {device}");
            return ExitCode::FAILURE;
        };
        return worker::train_job_main(*job, *attempt, device, database_url, data_dir.clone());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => {
            crate::backbone::heap::keep_freed_memory();
            let pool = db::connect(&args.db.database_url, args.db.db_max_connections).await?;
            db::migrate(&pool).await?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let workers = if args.workers > 0 {
                // The workers' own connections (queue listener, claims, heartbeats), so that
                // training can never take the API's pool, nor the API the workers'.
                let worker_db = db::connect(&args.db.database_url, args.workers as u32 + 2).await?;
                let devices = local_devices(args.workers);
                let cfg = worker::pool::PoolConfig::new(
                    std::env::current_exe()?,
                    args.db.database_url.clone(),
                    args.data_dir.clone(),
                );
                Some(tokio::spawn(worker::pool::run(
                    worker_db,
                    std::sync::Arc::new(cfg),
                    devices,
                    stop_rx,
                )))
            } else {
                None
            };
            let app = Application::build(Settings::from_args(&args)?, pool).await?;
            app.run_until(shutdown_signal()).await?;
            let _ = stop_tx.send(true);
            if let Some(w) = workers {
                let _ = w.await;
            }
        }
        Command::Worker(args) => {
            let cuda = if tch::Cuda::is_available() {
                tch::Cuda::device_count() as usize
            } else {
                0
            };
            let devices = worker::resolve_devices(&args.devices, cuda)?;
            let pool = db::connect(&args.db.database_url, args.db.db_max_connections).await?;
            db::migrate(&pool).await?;
            let names: Vec<String> = devices.iter().map(ToString::to_string).collect();
            tracing::info!(devices = %names.join(","), data_dir = %args.data_dir.display(), "worker starting");
            let cfg = worker::pool::PoolConfig::new(
                std::env::current_exe()?,
                args.db.database_url.clone(),
                args.data_dir.clone(),
            );
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let pool_task = tokio::spawn(worker::pool::run(
                pool,
                std::sync::Arc::new(cfg),
                devices,
                stop_rx,
            ));
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            let _ = pool_task.await;
        }
        Command::Migrate(args) => {
            let pool = db::connect(&args.database_url, 2).await?;
            db::migrate(&pool).await?;
            println!("migrations applied ({} known)", db::MIGRATOR.iter().count());
        }
        Command::Keys { command } => return keys(command).await,
        Command::Doctor(args) => print!(
            "{}",
            doctor::report(args.database_url.as_deref(), &args.data_dir).await
        ),
        Command::Weights { command } => weights(command).await?,
        Command::Datasets { command } => client::commands::datasets(command).await?,
        Command::Jobs { command } => return client::commands::jobs(command).await,
        Command::ExportCache {
            dataset,
            out,
            data_dir,
            db: dbargs,
        } => {
            let pool = db::connect(&dbargs.database_url, 2).await?;
            let data = crate::datadir::DataDir::new(data_dir);
            let m = crate::ingest::export::export_cache(&pool, &data, dataset, &out).await?;
            println!(
                "exported {} videos of dataset {dataset} to {} (vidtune train --cache {})",
                m.videos.len(),
                out.display(),
                out.display()
            );
        }
        Command::Predict(args) => client::commands::predict(args).await?,
        Command::Demo(args) => return client::commands::demo(args).await,
        Command::MediaWorker
        | Command::ScriptHost
        | Command::SandboxProbe { .. }
        | Command::TrainJob { .. }
        | Command::Train(_) => {
            unreachable!("handled before the runtime starts")
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create {
            tenant,
            admin,
            operator,
            name,
            db: dbargs,
        } => {
            // Operator keys exist only through this command: whoever runs it already holds the
            // host and the database URL, which is as much as an operator key grants.
            let role = auth::Role::from_flags(admin, operator);
            let pool = db::connect(&dbargs.database_url, 2).await?;
            db::migrate(&pool).await?;
            let mut tx = pool.begin().await?;
            let t = db::tenants::ensure_tenant(&mut *tx, &tenant)
                .await
                .with_context(|| {
                    format!("creating tenant `{tenant}` (lowercase letters, digits, _ . -)")
                })?;
            let minted = auth::mint();
            let key = db::tenants::insert_key(
                &mut *tx,
                t.id,
                &name,
                &minted.prefix,
                &minted.digest,
                role,
            )
            .await?;
            tx.commit().await?;
            println!(
                "created {} key {} for tenant {} ({}); it is shown only once:",
                role.name(),
                key.id,
                t.name,
                t.id
            );
            println!("{}", minted.secret);
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Check { key, db: dbargs } => {
            let pool = db::connect(&dbargs.database_url, 1).await?;
            match db::tenants::authenticate(&pool, &auth::digest(&key)).await? {
                Some(owner) if !owner.revoked => {
                    println!(
                        "valid {} key of tenant {}",
                        owner.role().name(),
                        owner.tenant_name
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(_) => {
                    println!("revoked");
                    Ok(ExitCode::FAILURE)
                }
                None => {
                    println!("unknown key");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn parse_arch(name: &str) -> anyhow::Result<Arch> {
    Arch::parse(name).ok_or_else(|| {
        let names: Vec<_> = Arch::ALL.iter().map(|a| a.name()).collect();
        anyhow::anyhow!(
            "unknown architecture `{name}` (one of: {})",
            names.join(", ")
        )
    })
}

async fn weights(command: WeightsCommand) -> anyhow::Result<()> {
    match command {
        WeightsCommand::Import {
            arch,
            file,
            data_dir,
            db: dbargs,
        } => {
            let arch = parse_arch(&arch)?;
            let pool = db::connect(&dbargs.database_url, 2).await?;
            db::migrate(&pool).await?;
            let source = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let w = crate::registry::import_weights(&pool, &data_dir, arch, &file, &source).await?;
            println!(
                "imported {} weights: {} tensors, sha256 {}",
                w.arch, w.tensors, w.sha256
            );
        }
        WeightsCommand::Pull {
            arch,
            data_dir,
            db: dbargs,
        } => {
            let arch = parse_arch(&arch)?;
            let pool = db::connect(&dbargs.database_url, 2).await?;
            db::migrate(&pool).await?;
            let w = crate::registry::pull_weights(&pool, &data_dir, arch).await?;
            println!(
                "installed {} weights ({}): sha256 {}",
                w.arch,
                arch.pretrained_on(),
                w.sha256
            );
        }
        WeightsCommand::List { db: dbargs } => {
            let pool = db::connect(&dbargs.database_url, 2).await?;
            let installed = db::base_models::latest_weights(&pool).await?;
            for arch in Arch::ALL {
                let w = installed.iter().find(|w| w.arch == arch.name());
                println!(
                    "{:<12} {:<13} {}",
                    arch.name(),
                    arch.pretrained_on(),
                    w.map_or("not installed".to_string(), |w| format!(
                        "installed, sha256 {}",
                        &w.sha256[..16]
                    ))
                );
            }
        }
    }
    Ok(())
}

/// Devices for `serve --workers N`: the GPUs first, then the CPU for the rest.
fn local_devices(n: usize) -> Vec<worker::Device> {
    let cuda = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    let mut out: Vec<worker::Device> = (0..cuda.min(n)).map(worker::Device::Cuda).collect();
    while out.len() < n {
        out.push(worker::Device::Cpu);
    }
    out
}
