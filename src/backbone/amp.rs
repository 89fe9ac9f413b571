//! bf16 automatic mixed precision, on the CPU as well as CUDA (through the libtorch shim; tch's
//! `autocast` is CUDA-fp16 only). Matmuls and convolutions run in bf16, reductions and losses
//! stay in fp32, exactly as `torch.autocast(dtype=torch.bfloat16)`. Also the CUDA memory
//! figures tch does not expose.
use std::ffi::c_int;

use tch::{Device, Tensor};

unsafe extern "C" {
    fn vidtune_autocast_enter(cuda: c_int);
    fn vidtune_autocast_exit(cuda: c_int, was_enabled: c_int);
    fn vidtune_autocast_enabled(cuda: c_int) -> c_int;
    fn vidtune_autocast_set(cuda: c_int, enabled: c_int) -> c_int;
    fn vidtune_inference_mode_enter() -> *mut std::ffi::c_void;
    fn vidtune_inference_mode_exit(guard: *mut std::ffi::c_void);
    fn vidtune_cuda_memory(
        device: c_int,
        allocated: *mut i64,
        reserved: *mut i64,
        free: *mut i64,
        total: *mut i64,
    ) -> c_int;
}

/// Memory of one CUDA device, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct CudaMemory {
    /// Held by this process's tensors.
    pub allocated: i64,
    /// Held by this process's caching allocator (allocated plus cached).
    pub reserved: i64,
    pub free: i64,
    pub total: i64,
}

/// Memory figures of CUDA device `device`, or `None` without CUDA.
pub fn cuda_memory(device: usize) -> Option<CudaMemory> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return None;
    }
    let mut m = CudaMemory {
        allocated: 0,
        reserved: 0,
        free: 0,
        total: 0,
    };
    // SAFETY: the pointers are to live locals; the shim catches libtorch errors.
    let rc = unsafe {
        vidtune_cuda_memory(
            device as c_int,
            &mut m.allocated,
            &mut m.reserved,
            &mut m.free,
            &mut m.total,
        )
    };
    (rc == 0).then_some(m)
}

/// bf16 autocast for `device` while the guard lives.
pub struct Autocast {
    cuda: c_int,
    was_enabled: c_int,
}

impl Autocast {
    pub fn enter(device: Device) -> Self {
        let cuda = c_int::from(device.is_cuda());
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        let was_enabled = unsafe { vidtune_autocast_enabled(cuda) };
        unsafe { vidtune_autocast_enter(cuda) };
        Self { cuda, was_enabled }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: pairs with the enter above on the same thread.
        unsafe { vidtune_autocast_exit(self.cuda, self.was_enabled) };
    }
}

/// A region of fp32 inside bf16 autocast (`torch.autocast(enabled=False)`): for the layers whose
/// bf16 kernels are wrong on this device (`train::precision`).
pub struct Fp32 {
    cuda: c_int,
    was_enabled: c_int,
}

impl Fp32 {
    pub fn enter(device: Device) -> Self {
        let cuda = c_int::from(device.is_cuda());
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        let was_enabled = unsafe { vidtune_autocast_set(cuda, 0) };
        Self { cuda, was_enabled }
    }
}

impl Drop for Fp32 {
    fn drop(&mut self) {
        // SAFETY: restores what enter found, on the same thread.
        unsafe { vidtune_autocast_set(self.cuda, self.was_enabled) };
    }
}

/// libtorch's inference mode on this thread while the guard lives (`torch.inference_mode()`):
/// no autograd graph, no version counters. Tensors made under it must not be used for training
/// afterwards.
pub struct InferenceMode {
    guard: *mut std::ffi::c_void,
}

impl InferenceMode {
    pub fn enter() -> Self {
        // SAFETY: allocates a c10::InferenceMode RAII guard for this thread; freed in drop on
        // the same thread (the type is neither Send nor Sync, as it holds a raw pointer).
        Self {
            guard: unsafe { vidtune_inference_mode_enter() },
        }
    }
}

impl Drop for InferenceMode {
    fn drop(&mut self) {
        // SAFETY: the pointer came from enter and is freed once.
        unsafe { vidtune_inference_mode_exit(self.guard) };
    }
}

/// `x` with channels-last-3d strides (`N, D, H, W, C` in memory): the same shape and values,
/// the layout oneDNN's 3D convolutions prefer. A permuted contiguous copy has exactly the strides
/// `torch.channels_last_3d` gives, so no libtorch call beyond tch's is needed.
pub fn channels_last_3d(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 4, 1])
        .contiguous()
        .permute([0, 4, 1, 2, 3])
}

/// Whether `x` is laid out channels-last-3d.
pub fn is_channels_last_3d(x: &Tensor) -> bool {
    let (st, sz) = (x.stride(), x.size());
    sz.len() == 5 && st[1] == 1 && st[4] == sz[1] && st[3] == sz[1] * sz[4]
}

/// Convert every 5-d variable of `vs` (the 3D convolution weights) to channels-last-3d in
/// place, keeping each variable (and its gradient tracking) the same tensor, as
/// `module.to(memory_format=torch.channels_last_3d)` does.
pub fn to_channels_last_3d(vs: &tch::nn::VarStore) {
    let _g = tch::no_grad_guard();
    for (_, mut t) in vs.variables() {
        if t.dim() == 5 {
            let cl = channels_last_3d(&t);
            t.set_data(&cl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn cuda_memory_is_none_without_cuda() {
        if !tch::Cuda::is_available() {
            assert!(cuda_memory(0).is_none());
        } else {
            let m = cuda_memory(0).expect("figures on a CUDA device");
            assert!(m.total > 0 && m.free <= m.total);
        }
    }

    #[test]
    fn convolutions_run_in_bf16_inside_and_fp32_outside() {
        let x = Tensor::randn([1, 3, 4, 16, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([8, 3, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = |x: &Tensor| x.conv3d(&w, None::<Tensor>, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1);
        let fp32 = conv(&x);
        let bf16 = {
            let _ac = Autocast::enter(Device::Cpu);
            conv(&x)
        };
        assert_eq!(fp32.kind(), Kind::Float);
        assert_eq!(bf16.kind(), Kind::BFloat16);
        assert_eq!(conv(&x).kind(), Kind::Float, "autocast ends with the guard");
        let rel =
            ((bf16.to_kind(Kind::Float) - &fp32).abs().max() / fp32.abs().max()).double_value(&[]);
        assert!(rel < 0.02, "bf16 result differs by {rel} (relative)");
    }

    #[test]
    fn channels_last_3d_keeps_values_and_has_ndhwc_strides() {
        let x = Tensor::randn([2, 3, 4, 5, 6], (tch::Kind::Float, Device::Cpu));
        let y = channels_last_3d(&x);
        assert!(!is_channels_last_3d(&x) && is_channels_last_3d(&y));
        assert_eq!(y.stride(), vec![360, 1, 90, 18, 3]);
        assert_eq!((&x - &y).abs().max().double_value(&[]), 0.0);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().var(
            "conv",
            &[8, 3, 3, 3, 3],
            tch::nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let before = w.copy();
        to_channels_last_3d(&vs);
        let w = vs.variables()["conv"].shallow_clone();
        assert!(is_channels_last_3d(&w) && w.requires_grad());
        assert_eq!((&w - &before).abs().max().double_value(&[]), 0.0);
    }
}
