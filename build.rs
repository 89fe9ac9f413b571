//! Link libtorch so the binary finds it and its CUDA part on its own.
//!
//! `torch-sys` already links `torch`, `torch_cpu`, `c10` and (when present) `torch_cuda`, but the
//! default `--as-needed` linker mode drops `libtorch_cuda.so` because no symbol of it is referenced
//! directly: CUDA would then be silently unavailable. We switch to `--no-as-needed` before naming
//! the libraries again, and record an rpath to the libtorch directory so `target/*/vidtune` runs
//! without `LD_LIBRARY_PATH`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/shim/shim.cpp");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    // Exported by torch-sys (`links = "tch"`) to its direct dependents.
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!(
        "cargo:rustc-env=VIDTUNE_LIBTORCH_VERSION={}",
        libtorch_version(&lib).unwrap_or_else(|| "unknown".into())
    );
    compile_shim(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in ["torch_cuda", "torch_cpu", "torch", "c10_cuda", "c10"] {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// The version of the libtorch we link: `torch/version.py` of a PyTorch wheel, or the
/// `build-version` file of a libtorch archive.
fn libtorch_version(lib: &std::path::Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        return text
            .lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim().trim_matches(['\'', '"']).to_string());
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string())
}

/// Compile `src/shim/shim.cpp` against the same libtorch headers.
fn compile_shim(lib: &std::path::Path) {
    let root = lib.parent().expect("libtorch lib dir has a parent");
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // PyTorch wheels and libtorch 2.11 use the C++11 ABI.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/shim/shim.cpp")
        .compile("vidtune_shim");
}
