//! bf16 automatic mixed precision, on the CPU as well as CUDA (through the libtorch shim; tch's
//! `autocast` is CUDA-fp16 only). Matmuls and convolutions run in bf16, reductions and losses
//! stay in fp32, exactly as `torch.autocast(dtype=torch.bfloat16)`.
use std::ffi::c_int;

use tch::Device;

unsafe extern "C" {
    fn vidtune_autocast_enter(cuda: c_int);
    fn vidtune_autocast_exit(cuda: c_int, was_enabled: c_int);
    fn vidtune_autocast_enabled(cuda: c_int) -> c_int;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

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
}
