//! `vidtune doctor`: what this installation can use, for troubleshooting and support tickets.
use std::ffi::CStr;
use std::fmt::Write as _;

/// The facts, one per line: libtorch, CUDA, FFmpeg, the sandbox for custom backbones, database,
/// and the records whose files are missing from `data_dir`.
pub async fn report(database_url: Option<&str>, data_dir: &std::path::Path) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vidtune       {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "libtorch      {}", env!("VIDTUNE_LIBTORCH_VERSION"));
    let _ = writeln!(out, "cpu threads   {}", tch::get_num_threads());
    let _ = writeln!(
        out,
        "cpu bf16      {}",
        cpu_bf16(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    );
    let cuda = tch::Cuda::is_available();
    let count = if cuda { tch::Cuda::device_count() } else { 0 };
    let _ = writeln!(
        out,
        "cuda          {}",
        if cuda {
            format!(
                "available, {count} device(s), cuDNN {}",
                tch::Cuda::cudnn_is_available()
            )
        } else {
            "not available".into()
        }
    );
    let devices = crate::worker::resolve_devices("auto", count as usize)
        .map(|d| {
            d.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let _ = writeln!(out, "devices       {devices}");
    for d in 0..count as usize {
        if let Some(m) = crate::backbone::amp::cuda_memory(d) {
            let gib = |b: i64| b as f64 / (1u64 << 30) as f64;
            let _ = writeln!(
                out,
                "  cuda:{d}      {:.1} GiB free of {:.1} GiB",
                gib(m.free),
                gib(m.total)
            );
        }
    }
    let _ = writeln!(out, "ffmpeg        {}", ffmpeg_version());
    let sandbox = match std::env::current_exe() {
        Ok(exe) => crate::sandbox::verify(&exe, &std::env::temp_dir())
            .unwrap_or_else(|e| format!("NOT AVAILABLE: {e:#}; custom backbones are refused unless VIDTUNE_ALLOW_UNCONFINED_BACKBONES=1")),
        Err(e) => format!("unknown ({e})"),
    };
    let _ = writeln!(out, "sandbox       {sandbox}");
    let mut pool = None;
    let db = match database_url {
        None => "not configured (set DATABASE_URL)".to_string(),
        Some(url) => match crate::db::connect(url, 1).await {
            Ok(p) => {
                let line = format!(
                    "reachable, PostgreSQL {}, {} of {} migrations applied",
                    crate::db::server_version(&p)
                        .await
                        .unwrap_or_else(|e| format!("? ({e})")),
                    crate::db::migrations_applied(&p).await.unwrap_or(0),
                    crate::db::MIGRATOR.iter().count()
                );
                pool = Some(p);
                line
            }
            Err(e) => format!("unreachable: {e:#}"),
        },
    };
    let _ = writeln!(out, "database      {db}");
    if let Some(pool) = pool {
        let data = crate::datadir::DataDir::new(data_dir);
        match crate::retention::missing_files(&pool, &data).await {
            Ok(missing) if missing.is_empty() => {
                let _ = writeln!(out, "data files    every record's files are present");
            }
            Ok(missing) => {
                let _ = writeln!(
                    out,
                    "data files    MISSING for {} record(s):",
                    missing.len()
                );
                for line in missing {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "data files    not checked: {e:#}");
            }
        }
    }
    out
}

fn ffmpeg_version() -> String {
    // SAFETY: av_version_info returns a pointer to a static NUL-terminated string.
    let info = unsafe { CStr::from_ptr(ffmpeg_next::ffi::av_version_info()) };
    let v = |n: u32| format!("{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
    format!(
        "{} (libavcodec {}, libavformat {}, libswscale {})",
        info.to_string_lossy(),
        v(ffmpeg_next::codec::version()),
        v(ffmpeg_next::format::version()),
        v(ffmpeg_next::software::scaling::version()),
    )
}

/// Whether `precision: bf16` pays on this CPU, from /proc/cpuinfo's flags: with AMX or
/// AVX512-BF16 oneDNN runs bf16 natively (a training step about twice as fast as fp32, see
/// BENCHMARKS.md); without them it emulates it, and bf16 is slower than fp32.
fn cpu_bf16(cpuinfo: &str) -> &'static str {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    if flags.contains(&"amx_bf16") {
        "native (AMX): precision bf16 trains faster than fp32"
    } else if flags.contains(&"avx512_bf16") {
        "native (AVX512-BF16): precision bf16 trains faster than fp32"
    } else if cpuinfo.is_empty() {
        "unknown"
    } else {
        "emulated: keep precision fp32 on the CPU"
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_bf16;

    #[test]
    fn bf16_advice_follows_the_cpu_flags() {
        let cpu = |flags: &str| format!("processor\t: 0\nflags\t\t: fpu sse2 {flags}\n");
        assert!(cpu_bf16(&cpu("avx512f amx_tile amx_bf16")).starts_with("native (AMX)"));
        assert!(cpu_bf16(&cpu("avx512f avx512_bf16")).starts_with("native (AVX512-BF16)"));
        assert!(cpu_bf16(&cpu("avx512f avx512_vnni")).starts_with("emulated"));
        assert_eq!(cpu_bf16(""), "unknown");
    }
}
