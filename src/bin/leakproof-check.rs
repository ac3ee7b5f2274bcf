//! `leakproof-check`: check leakproof against its specification.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::run::{Options, check};

#[derive(Debug, Parser)]
#[command(version, about = "Check leakproof against its lifecycle specification")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run generated op sequences against the implementation, comparing every step with the
    /// model; on failure print the minimal sequence and exit non-zero.
    Check {
        /// How many sequences to run.
        #[arg(long, default_value_t = 20_000)]
        cases: u32,
        /// Seed of the generator; the same seed runs the same sequences.
        #[arg(long)]
        seed: Option<u64>,
        /// Longest sequence, in ops, before teardown.
        #[arg(long, default_value_t = 64)]
        max_ops: usize,
    },
}

fn main() -> ExitCode {
    let Command::Check {
        cases,
        seed,
        max_ops,
    } = Cli::parse().command;
    let report = check::<EngineWorld>(
        "engine",
        &Options {
            cases,
            seed,
            max_ops,
            regressions: None,
        },
    );
    print!("{report}");
    if report.failure.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
