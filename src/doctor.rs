//! `vidtune doctor`: what this installation can use, for troubleshooting and support tickets.
use std::ffi::CStr;
use std::fmt::Write as _;

use crate::device::Device;

/// The facts, one per line: libtorch, CUDA, FFmpeg, the sandbox for custom backbones, database,
/// and the records whose files are missing from `data_dir`.
pub async fn report(database_url: Option<&str>, data_dir: &std::path::Path) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "vidtune       {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "libtorch      {}", env!("VIDTUNE_LIBTORCH_VERSION"));
    let _ = writeln!(out, "cpu threads   {}", tch::get_num_threads());
    let _ = writeln!(out, "cpu bf16      {}", bf16_line(Device::Cpu));
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
                "  cuda:{d}      {:.1} GiB free of {:.1} GiB; bf16 {}",
                gib(m.free),
                gib(m.total),
                bf16_line(Device::Cuda(d))
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

/// What `precision: "auto"` chooses on `device`, and why.
fn bf16_line(device: Device) -> String {
    let s = crate::device::bf16_support(device);
    if s.native {
        format!(
            "native ({}): precision auto tries bf16 and keeps it where a job's gradients check \
             out and its step is faster",
            s.why
        )
    } else {
        format!("emulated ({}): precision auto trains in fp32", s.why)
    }
}
