//! `vidtune` command line: see `vidtune --help`.
fn main() -> std::process::ExitCode {
    vidtune::cli::main()
}
