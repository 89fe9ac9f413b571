//! `vidtune train` without FFmpeg, for machines that have libtorch (a PyTorch install) but
//! neither FFmpeg nor a Rust toolchain, such as a borrowed GPU machine: the same library entry
//! point (`vidtune::train::offline`), linked like the other benchmark examples, so that the
//! binary needs no libav*. Typically with --synthetic, which renders its own training cache:
//!     train_offline --synthetic --cache /tmp/cache --out /tmp/out --base-model r2plus1d_18 \
//!                   --device cuda --set epochs=3 --set batch_size=32 --set precision=bf16
use clap::Parser;

/// Fine-tune offline on a training-cache folder; JSON lines on stdout.
#[derive(Parser)]
#[command(name = "train_offline")]
struct Cli {
    #[command(flatten)]
    args: vidtune::train::offline::TrainArgs,
}

fn main() -> std::process::ExitCode {
    vidtune::train::offline::main(Cli::parse().args)
}
