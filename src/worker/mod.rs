//! Workers: device discovery now; the job claim loop and child-process supervision build on it.
use std::fmt;

/// A device a job can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    pub fn to_tch(self) -> tch::Device {
        match self {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(i) => tch::Device::Cuda(i),
        }
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
        let device = match item {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            _ => {
                let idx = item
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!("unknown device `{item}` (use auto, cpu or cuda:N)")
                    })?;
                Device::Cuda(idx)
            }
        };
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
