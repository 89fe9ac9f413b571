//! Fine-tuning: hyperparameters, the clip loader over the training cache, saveable optimizers,
//! metrics, checkpoints, and the training loop that a job's child process runs.
pub mod data;
pub mod hyper;
pub mod metrics;
pub mod optim;
pub mod run;

/// Keep freed memory in the heap for the next step instead of handing it back to the kernel.
///
/// A training step frees and reallocates the same large activations and gradients every time.
/// glibc's defaults serve the largest from fresh `mmap`s and trim the heap top after a free, so
/// every step page-faults its working set in again (about 60 000 faults a step for r3d_18 at
/// 8×56², roughly half of its backward pass on the 2-core reference machine). Raising both
/// thresholds keeps the process at its peak, which a training process reaches every step anyway.
/// Returns whether glibc took both settings (other C libraries: `false`, nothing changed).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts allocator parameters; called before the training starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, GIB) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, GIB) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
