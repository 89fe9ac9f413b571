//! The fuzz binaries link libtorch (through `vidtune`) but are not `vidtune`'s own targets, so
//! its build script's rpath does not reach them: record one here, so they run without
//! `LD_LIBRARY_PATH`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!(
            "cargo:rustc-link-arg=-Wl,-rpath,{}",
            std::path::Path::new(&lib).display()
        );
    }
}
