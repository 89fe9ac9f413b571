//! The process heap policy for libtorch workloads.

/// Keep freed memory in the heap for the next step instead of handing it back to the kernel.
///
/// A training step, or a serving forward pass, frees and reallocates the same large activations
/// and gradients every time. glibc's defaults serve the largest from fresh `mmap`s and trim the
/// heap top after a free, so every step page-faults its working set in again: about 60 000
/// faults a step for r3d_18 at 8×56², two thirds of its backward pass on the 2-core benchmark
/// machine (BENCHMARKS.md), and a quarter of a 5-clip prediction (B4). Raising both thresholds
/// keeps the process at its peak, which it reaches on every step or request anyway; the peak
/// itself is 35–45 % higher (a training step at 16×112²). Called at the start of
/// `vidtune train-job` and `vidtune serve`; `VIDTUNE_KEEP_FREED_MEMORY=0` keeps glibc's
/// defaults. Returns whether glibc took both settings (`false`: nothing changed).
pub fn keep_freed_memory() -> bool {
    let opted_out = std::env::var("VIDTUNE_KEEP_FREED_MEMORY")
        .is_ok_and(|v| matches!(v.trim(), "0" | "false" | "off"));
    let kept = !opted_out && raise_thresholds();
    tracing::debug!(kept, opted_out, "heap policy: keep freed memory");
    kept
}

fn raise_thresholds() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts the allocator's parameters, under its own lock.
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

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the zeroed struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u.ru_minflt
        }
    }

    /// Allocate 48 MiB, write every page, free it. (Above glibc's largest dynamic mmap threshold,
    /// 32 MiB, and within the 64 MiB a test thread's arena can grow to at once.)
    fn touch() {
        let mut v = vec![0u8; 48 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
    }

    #[test]
    fn a_freed_large_buffer_comes_back_without_page_faults() {
        assert!(
            super::keep_freed_memory(),
            "thresholds not set (glibc refused, or VIDTUNE_KEEP_FREED_MEMORY=0)"
        );
        touch();
        let before = minor_faults();
        touch();
        let faults = minor_faults() - before;
        // 48 MiB is 12 288 pages; with glibc's defaults every one faults again.
        assert!(faults < 1000, "{faults} page faults reallocating 48 MiB");
    }
}
