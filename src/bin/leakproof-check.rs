//! `leakproof-check`: check leakproof against its specification.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

use leakproof_check::client_sut::ClientWorld;
use leakproof_check::coverage;
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::explore::{self, Alphabet};
use leakproof_check::machine::System;
use leakproof_check::ops;
use leakproof_check::run::{Options, Report, check};

#[derive(Debug, Parser)]
#[command(version, about = "Check leakproof against its lifecycle specification")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// The real client, against loopback stages.
    Client,
    /// The sans-IO engine, against a simulated network.
    Engine,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run generated op sequences against the engine, then the real client, comparing every
    /// step with the model; print the report, or the minimal failing sequence, and exit
    /// non-zero on a failure.
    Check {
        /// Sequences run against the client; the engine, much faster, runs 20 times as many.
        #[arg(long, default_value_t = 500)]
        cases: u32,
        /// Seed of the generator; the same seed runs the same sequences.
        #[arg(long)]
        seed: Option<u64>,
        /// Longest sequence, in ops, before teardown.
        #[arg(long, default_value_t = 48)]
        max_ops: usize,
        /// Check only this target.
        #[arg(long)]
        target: Option<Target>,
    },
    /// Replay one `.ops` file and judge it against its `# expect:` line.
    Replay {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Target::Client)]
        target: Target,
    },
    /// Search every op sequence up to a depth over a small alphabet (one session of each
    /// kind, two tasks), and replay each transition against a target.
    Explore {
        #[arg(long, default_value_t = explore::DEFAULT_DEPTH)]
        depth: usize,
        #[arg(long, value_enum, default_value_t = Target::Engine)]
        target: Target,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check {
            cases,
            seed,
            max_ops,
            target,
        } => run_check(cases, seed, max_ops, target),
        Command::Replay { file, target } => match target {
            Target::Client => replay::<ClientWorld>(file),
            Target::Engine => replay::<EngineWorld>(file),
        },
        Command::Explore { depth, target } => match target {
            Target::Client => run_explore::<ClientWorld>(depth),
            Target::Engine => run_explore::<EngineWorld>(depth),
        },
    }
}

fn run_check(cases: u32, seed: Option<u64>, max_ops: usize, target: Option<Target>) -> ExitCode {
    let options = |cases| Options {
        cases,
        seed,
        max_ops,
        regressions: None,
    };
    let mut reports: Vec<Report> = Vec::new();
    if target != Some(Target::Client) {
        reports.push(check::<EngineWorld>("engine", &options(cases * 20)));
    }
    if target != Some(Target::Engine) && reports.iter().all(|r| r.failure.is_none()) {
        reports.push(check::<ClientWorld>("client", &options(cases)));
    }
    for report in &reports {
        print!("{report}");
    }
    let covered = coverage::snapshot();
    println!(
        "coverage: {} of {} transitions of the model applied ({} never; run `explore` for the rest)",
        covered.covered(),
        covered.universe.len(),
        covered.missed().len()
    );
    if reports.iter().any(|r| r.failure.is_some()) {
        ExitCode::FAILURE
    } else {
        println!("all rules held");
        ExitCode::SUCCESS
    }
}

fn replay<S: System>(file: PathBuf) -> ExitCode {
    match ops::replay_file::<S>(&file) {
        Ok(report) => {
            println!("{report}");
            if report.held() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn run_explore<S: System>(depth: usize) -> ExitCode {
    let started = Instant::now();
    let exploration = match explore::explore(&Alphabet::every_kind(), depth) {
        Ok(exploration) => exploration,
        Err(bug) => {
            println!("the specification breaks its own rules:\n{bug}");
            return ExitCode::FAILURE;
        }
    };
    println!("{exploration}");
    match explore::replay::<S>(&exploration) {
        Ok(summary) => {
            println!(
                "replayed {} paths ({} ops) in {:.2?}: all rules held",
                summary.paths,
                summary.ops,
                started.elapsed()
            );
            ExitCode::SUCCESS
        }
        Err((path, divergence)) => {
            let repro = ops::Repro {
                expect: ops::Expect::Pass,
                notes: vec![format!("{}", divergence.violation)],
                ops: ops::renumber(&path),
            };
            println!("{divergence}\n\n{}", ops::print(&repro));
            ExitCode::FAILURE
        }
    }
}
