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

/// Whether a device runs bf16 natively, and why: what `precision: "auto"` decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bf16Support {
    pub native: bool,
    /// Said to the user, e.g. "this CPU has AVX512-BF16".
    pub why: String,
}

/// bf16 support of `device`: CUDA devices of compute capability 8.0 (Ampere) or newer, CPUs
/// with AMX or AVX512-BF16. Elsewhere bf16 is emulated and slower than fp32.
pub fn bf16_support(device: Device) -> Bf16Support {
    match device {
        Device::Cpu => cpu_bf16(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        Device::Cuda(i) => match cuda_capability(i) {
            Some((major, minor)) => Bf16Support {
                native: major >= 8,
                why: format!("cuda:{i} has compute capability {major}.{minor}"),
            },
            None => Bf16Support {
                native: false,
                why: format!("the compute capability of cuda:{i} could not be read"),
            },
        },
    }
}

/// bf16 support of a CPU from /proc/cpuinfo's text: with AMX or AVX512-BF16 oneDNN runs bf16
/// natively (a training step about twice as fast as fp32, see BENCHMARKS.md); without them it
/// emulates it.
pub fn cpu_bf16(cpuinfo: &str) -> Bf16Support {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let (native, why) = if flags.contains(&"amx_bf16") {
        (true, "this CPU has AMX")
    } else if flags.contains(&"avx512_bf16") {
        (true, "this CPU has AVX512-BF16")
    } else if cpuinfo.is_empty() {
        (false, "this CPU's features could not be read")
    } else {
        (false, "this CPU has neither AMX nor AVX512-BF16")
    };
    Bf16Support {
        native,
        why: why.to_owned(),
    }
}

/// (major, minor) compute capability of CUDA device `index`, read through the driver API
/// (libcuda, which every CUDA machine has), so no CUDA headers are needed at build time.
fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Attr = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
    const MAJOR: i32 = 75; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    const MINOR: i32 = 76;
    // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols have the driver API's C
    // signatures (cuInit, cuDeviceGet, cuDeviceGetAttribute), called with valid out-pointers.
    // The library stays loaded (libtorch's CUDA build has it open anyway).
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return None;
        }
        let sym = |name: &std::ffi::CStr| {
            let p = libc::dlsym(lib, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        let init: Init = std::mem::transmute(sym(c"cuInit")?);
        let get: Get = std::mem::transmute(sym(c"cuDeviceGet")?);
        let attr: Attr = std::mem::transmute(sym(c"cuDeviceGetAttribute")?);
        let ordinal = i32::try_from(index).ok()?;
        let (mut dev, mut major, mut minor) = (0, 0, 0);
        if init(0) != 0 || get(&mut dev, ordinal) != 0 {
            return None;
        }
        if attr(&mut major, MAJOR, dev) != 0 || attr(&mut minor, MINOR, dev) != 0 {
            return None;
        }
        Some((major, minor))
    }
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

    #[test]
    fn bf16_follows_the_cpu_flags() {
        let cpu = |flags: &str| format!("processor\t: 0\nflags\t\t: fpu sse2 {flags}\n");
        let amx = cpu_bf16(&cpu("avx512f amx_tile amx_bf16"));
        assert!(amx.native && amx.why.contains("AMX"), "{amx:?}");
        let avx = cpu_bf16(&cpu("avx512f avx512_bf16"));
        assert!(avx.native && avx.why.contains("AVX512-BF16"), "{avx:?}");
        assert!(!cpu_bf16(&cpu("avx512f avx512_vnni")).native);
        assert!(!cpu_bf16("").native);
    }
}
