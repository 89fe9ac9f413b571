//! Compute devices: the one place that reads and writes their names (`cpu`, `cuda`, `cuda:N`,
//! and for a job's request, `auto`).
use std::fmt;

/// A device a worker owns and a job runs on.
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
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(0)),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(Device::Cuda),
        }
    }

    pub fn to_tch(self) -> tch::Device {
        match self {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(i) => tch::Device::Cuda(i),
        }
    }

    /// libtorch's CPU and CUDA devices; anything else (MPS, Vulkan) is not one of ours.
    pub fn from_tch(d: tch::Device) -> Option<Device> {
        match d {
            tch::Device::Cpu => Some(Device::Cpu),
            tch::Device::Cuda(i) => Some(Device::Cuda(i)),
            _ => None,
        }
    }
}

/// Where a job asks to run (the `device` hyperparameter), kept in the queue as `device_pref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Whatever worker claims it first.
    Auto,
    /// A CPU worker.
    Cpu,
    /// Any GPU worker (`cuda`).
    AnyGpu,
    /// The worker of this GPU only (`cuda:N`).
    Gpu(usize),
}

impl DeviceRequest {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Option<DeviceRequest> {
        match s {
            "auto" => Some(DeviceRequest::Auto),
            "cpu" => Some(DeviceRequest::Cpu),
            "cuda" => Some(DeviceRequest::AnyGpu),
            _ => s
                .strip_prefix("cuda:")?
                .parse()
                .ok()
                .map(DeviceRequest::Gpu),
        }
    }

    /// Whether a worker on `device` may claim a job with this request.
    pub fn admits(self, device: Device) -> bool {
        match (self, device) {
            (DeviceRequest::Auto, _) | (DeviceRequest::Cpu, Device::Cpu) => true,
            (DeviceRequest::AnyGpu, Device::Cuda(_)) => true,
            (DeviceRequest::Gpu(i), Device::Cuda(j)) => i == j,
            _ => false,
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::AnyGpu => f.write_str("cuda"),
            DeviceRequest::Gpu(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The `device_pref` values a worker on `device` claims: the same set [`DeviceRequest::admits`]
/// accepts, spelled as stored.
pub fn claimable_prefs(device: Device) -> Vec<String> {
    let mut prefs = vec![DeviceRequest::Auto.to_string()];
    match device {
        Device::Cpu => prefs.push(DeviceRequest::Cpu.to_string()),
        Device::Cuda(i) => {
            prefs.push(DeviceRequest::AnyGpu.to_string());
            prefs.push(DeviceRequest::Gpu(i).to_string());
        }
    }
    prefs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(Device::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Device::parse("cuda"), Some(Device::Cuda(0)));
        for s in ["auto", "cpu", "cuda", "cuda:2"] {
            assert_eq!(DeviceRequest::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "gpu", "cuda:", "cuda:x", "tpu", "CPU"] {
            assert_eq!(DeviceRequest::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_numbered_gpu_is_claimed_only_by_its_worker() {
        let req = DeviceRequest::parse("cuda:1").unwrap();
        assert!(req.admits(Device::Cuda(1)));
        assert!(!req.admits(Device::Cuda(0)));
        assert!(!req.admits(Device::Cpu));
        assert!(DeviceRequest::AnyGpu.admits(Device::Cuda(0)));
        assert!(!DeviceRequest::Cpu.admits(Device::Cuda(0)));
        // What the queue matches on agrees with `admits`.
        for device in [Device::Cpu, Device::Cuda(0), Device::Cuda(1)] {
            for req in ["auto", "cpu", "cuda", "cuda:0", "cuda:1"] {
                let r = DeviceRequest::parse(req).unwrap();
                assert_eq!(
                    claimable_prefs(device).contains(&req.to_string()),
                    r.admits(device),
                    "{req} on {device}"
                );
            }
        }
    }
}
