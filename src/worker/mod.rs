//! Workers: device discovery, the claim loop with child-process supervision (`pool`), and the
//! `train-job` child's entry point with the attempt's database side (`attempt`).

pub mod attempt;
pub mod pool;

pub use crate::device::Device;

/// Entry point of `vidtune train-job`: run one attempt; exit 0 when the outcome is recorded
/// (succeeded, canceled, failed for a user error, or fenced out), non-zero for a machine fault
/// the worker should retry.
pub fn train_job_main(
    job: uuid::Uuid,
    attempt: i32,
    device: Device,
    database_url: &str,
    data_dir: std::path::PathBuf,
) -> std::process::ExitCode {
    use crate::train::run::{Context, run};
    let started = std::time::Instant::now();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let db = match rt.block_on(crate::db::connect(database_url, 2)) {
        Ok(db) => db,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "database unreachable");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Device::Cuda(_) = device {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    crate::backbone::heap::keep_freed_memory();
    crate::train::supervised();
    let ctx = Context {
        data_dir: crate::datadir::DataDir::new(data_dir),
        device: device.to_tch(),
        started,
    };
    let outcome = rt
        .block_on(attempt::load(&db, job, attempt, &ctx.data_dir))
        .and_then(|(input, provenance)| {
            let mut log = attempt::PgLog {
                db: &db,
                rt: &rt,
                job_id: job,
                attempt,
                provenance,
            };
            run(&ctx, input, &mut log)
        });
    if rt.block_on(attempt::conclude(&db, job, attempt, outcome)) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Parse `--devices`: `auto`, `cpu`, or a comma list like `cuda:0,cuda:1` (`cuda` = `cuda:0`).
/// `cuda_count` is the number of CUDA devices libtorch sees.
pub fn resolve_devices(spec: &str, cuda_count: usize) -> anyhow::Result<Vec<Device>> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("auto") {
        return Ok(if cuda_count == 0 {
            vec![Device::Cpu]
        } else {
            (0..cuda_count).map(Device::Cuda).collect()
        });
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let device = Device::parse(item)
            .ok_or_else(|| anyhow::anyhow!("unknown device `{item}` (use auto, cpu or cuda:N)"))?;
        if let Device::Cuda(i) = device
            && i >= cuda_count
        {
            anyhow::bail!(
                "device {device} requested but libtorch sees {cuda_count} CUDA device(s)"
            );
        }
        if out.contains(&device) {
            anyhow::bail!("device {device} listed twice");
        }
        out.push(device);
    }
    if out.is_empty() {
        anyhow::bail!("no device given");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_every_gpu_and_falls_back_to_cpu() {
        assert_eq!(resolve_devices("auto", 0).unwrap(), vec![Device::Cpu]);
        assert_eq!(
            resolve_devices("auto", 2).unwrap(),
            vec![Device::Cuda(0), Device::Cuda(1)]
        );
    }

    #[test]
    fn explicit_lists_are_checked_against_what_libtorch_sees() {
        assert_eq!(
            resolve_devices("cuda:1, cpu", 2).unwrap(),
            vec![Device::Cuda(1), Device::Cpu]
        );
        assert!(resolve_devices("cuda:0", 0).is_err());
        assert!(resolve_devices("tpu", 1).is_err());
        assert!(resolve_devices("cpu,cpu", 0).is_err());
        assert!(resolve_devices(" , ", 0).is_err());
    }
}
