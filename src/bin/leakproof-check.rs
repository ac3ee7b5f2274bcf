//! `leakproof-check`: check leakproof against its specification.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use leakproof_check::client_sut::{ClientWorld, SimulatedWorld};
use leakproof_check::coverage;
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::explore::{self, Alphabet, Exploration};
use leakproof_check::heap::WorldAllocator;
use leakproof_check::machine::System;
use leakproof_check::ops;
use leakproof_check::planted;
use leakproof_check::run::{Options, Report, check};

/// The heap witness of the model runs (see `leakproof_check::heap`).
#[global_allocator]
static HEAP: WorldAllocator = WorldAllocator;

#[derive(Debug, Parser)]
#[command(version, about = "Check leakproof against its lifecycle specification")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What to check: the three tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// The sans-IO engine, against a simulated network.
    Engine,
    /// The real client, in a simulation: one thread, a paused clock, an in-memory network,
    /// settled by quiescence and checked at the moment of each promise. Deterministic.
    Simulated,
    /// The real client on real sockets, against loopback stages (the kernel's behaviour).
    #[value(alias = "client")]
    Sockets,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run generated op sequences against the engine, then the real client, comparing every
    /// step with the model, then the exhaustive small scope; print the report, or the minimal
    /// failing sequence, and exit non-zero on a failure.
    Check(Check),
    /// Replay one `.ops` file and judge it against its `# expect:` line.
    Replay {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Target::Simulated)]
        target: Target,
    },
    /// Search every op sequence up to a depth over a small alphabet (one session of each
    /// kind, two tasks of each kind the target supports), and replay each transition against
    /// a target.
    Explore {
        #[arg(long, default_value_t = explore::EVERY_KIND_DEPTH)]
        depth: usize,
        #[arg(long, value_enum, default_value_t = Target::Engine)]
        target: Target,
    },
}

/// Print to stdout, quietly giving up if it is closed (piped into `head`, say).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check(args) => run_check(args),
        Command::Replay { file, target } => match target {
            Target::Sockets => replay::<ClientWorld>(file),
            Target::Simulated => replay::<SimulatedWorld>(file),
            Target::Engine => replay::<EngineWorld>(file),
        },
        Command::Explore { depth, target } => {
            let (held, said) = match target {
                Target::Sockets => run_explore::<ClientWorld>(depth),
                Target::Simulated => run_explore::<SimulatedWorld>(depth),
                Target::Engine => run_explore::<EngineWorld>(depth),
            };
            say!("{said}");
            exit(held)
        }
    }
}

#[derive(Debug, Args)]
struct Check {
    /// Sequences run against the simulated client; the engine runs 5 times as many.
    #[arg(long, default_value_t = 2000)]
    cases: u32,
    /// Sequences run against the client on real sockets.
    #[arg(long, default_value_t = 100)]
    socket_cases: u32,
    /// Seed of the generator; the same seed runs the same sequences.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest generated sequence, in ops, before teardown.
    #[arg(long, default_value_t = 48)]
    max_ops: usize,
    /// Depth of the exhaustive search replayed against the engine (0: none).
    #[arg(long, default_value_t = explore::EVERY_KIND_DEPTH)]
    depth: usize,
    /// Check only this target.
    #[arg(long)]
    target: Option<Target>,
    /// Print the whole coverage table, not only its summary.
    #[arg(long)]
    coverage: bool,
    /// Print one JSON object instead of the report, for machines.
    #[arg(long)]
    json: bool,
    /// Check the engine with a bug planted in it instead (`--plant list` names them): see the
    /// checker find it, shrink it, and name the rule it breaks.
    #[arg(long, value_name = "NAME")]
    plant: Option<String>,
}

fn run_check(args: Check) -> ExitCode {
    if let Some(name) = &args.plant {
        return run_planted(name, &args);
    }
    let options = |cases| Options {
        cases,
        seed: args.seed,
        max_ops: args.max_ops,
        regressions: None,
        progress: !args.json,
    };
    let mut reports: Vec<Report> = Vec::new();
    let runs = |target| args.target.is_none_or(|only| only == target);
    let held = |reports: &[Report]| reports.iter().all(|r| r.failure.is_none());
    if runs(Target::Engine) {
        reports.push(check::<EngineWorld>("engine", &options(args.cases * 5)));
    }
    if runs(Target::Simulated) && held(&reports) {
        reports.push(check::<SimulatedWorld>("simulated", &options(args.cases)));
    }
    if runs(Target::Sockets) && held(&reports) {
        reports.push(check::<ClientWorld>("sockets", &options(args.socket_cases)));
    }
    let explored =
        (args.depth > 0 && held(&reports)).then(|| run_explore::<EngineWorld>(args.depth));
    let covered = coverage::snapshot();
    let all_held = held(&reports) && explored.as_ref().is_none_or(|(held, _)| *held);

    if args.json {
        let json = json!({
            "generated": reports.iter().map(report_json).collect::<Vec<_>>(),
            "exhaustive": explored.as_ref().map(|(held, said)| json!({"held": held, "report": said})),
            "coverage": {
                "covered": covered.covered(),
                "transitions": covered.universe.len(),
                "never": covered.missed().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            },
            "held": all_held,
        });
        say!("{json:#}");
        return exit(all_held);
    }
    for report in &reports {
        say!("{report}");
    }
    if let Some((_, said)) = &explored {
        say!("exhaustive small scope against the engine\n{said}");
    }
    if args.coverage {
        say!("{covered}");
    }
    say!(
        "coverage: {} of {} transitions of the model applied ({} never{})",
        covered.covered(),
        covered.universe.len(),
        covered.missed().len(),
        if args.coverage {
            ""
        } else {
            "; --coverage lists them"
        }
    );
    if all_held {
        say!("all rules held");
    }
    exit(all_held)
}

/// Check the engine with the planted bug `name`: it must be found, and named by its rule.
fn run_planted(name: &str, args: &Check) -> ExitCode {
    let Some(bug) = planted::named(name) else {
        if name != "list" {
            say!("no planted bug {name:?}; there are:");
        }
        for bug in planted::PLANTED {
            say!("  {:<36} {:<4} {}", bug.name, bug.rule, bug.what);
        }
        return exit(name == "list");
    };
    let options = Options {
        cases: args.cases * 20,
        seed: args.seed,
        max_ops: args.max_ops,
        regressions: None,
        progress: !args.json,
    };
    let report = (bug.check)(bug.name, &options);
    let named = report
        .failure
        .as_ref()
        .and_then(|failure| ops::broken_rule(&failure.message));
    let length = report
        .failure
        .as_ref()
        .map(|failure| ops::Repro::from_failure(failure).ops.len());
    let caught = named == Some(bug.rule);
    if args.json {
        let mut json = report_json(&report);
        json["planted"] = json!({"name": bug.name, "rule": bug.rule.to_string(), "what": bug.what});
        json["named"] = json!(named.map(|rule| rule.to_string()));
        json["repro_ops"] = json!(length);
        say!("{json:#}");
    } else {
        say!("{report}");
        say!("planted: {} ({}): {}", bug.name, bug.rule, bug.what);
        match (named, length) {
            (Some(rule), Some(length)) => say!(
                "found and shrunk to {length} op{} in {:.2?}, named {rule}{}",
                if length == 1 { "" } else { "s" },
                report.elapsed,
                if caught {
                    ""
                } else {
                    ": NOT the planted bug's rule"
                }
            ),
            _ => say!("NOT found in {} cases", report.cases),
        }
    }
    exit(caught)
}

fn report_json(report: &Report) -> Value {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    json!({
        "target": report.target,
        "cases": report.cases,
        "runs": report.runs,
        "seed": report.seed,
        "ops": report.ops,
        "seconds": report.elapsed.as_secs_f64(),
        "cases_per_second": f64::from(report.runs) / secs,
        "traces": report.traces.map(|(digest, runs)| json!({"digest": format!("{digest:016x}"), "runs": runs})),
        "failure": report.failure.as_ref().map(|failure| {
            let repro = ops::Repro::from_failure(failure);
            json!({"message": failure.message, "repro": ops::print(&repro)})
        }),
    })
}

fn exit(held: bool) -> ExitCode {
    if held {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn replay<S: System>(file: PathBuf) -> ExitCode {
    match ops::replay_file::<S>(&file) {
        Ok(report) => {
            say!("{report}");
            exit(report.held())
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr().lock(), "{error}");
            ExitCode::FAILURE
        }
    }
}

/// Explore [`Alphabet::every_kind`] to `depth` and replay against `S`; whether every rule
/// held, and what to say.
fn run_explore<S: System>(depth: usize) -> (bool, String) {
    let started = Instant::now();
    let alphabet = Alphabet::every_kind();
    let exploration: Exploration = match explore::explore(&alphabet, depth) {
        Ok(exploration) => exploration,
        Err(bug) => {
            return (
                false,
                format!("the specification breaks its own rules:\n{bug}"),
            );
        }
    };
    match explore::replay::<S>(&exploration) {
        Ok(summary) => (
            true,
            format!(
                "{exploration}\nreplayed {} paths ({} ops) in {:.2?}: all rules held",
                summary.paths,
                summary.ops,
                started.elapsed()
            ),
        ),
        Err((path, divergence)) => {
            let repro = ops::Repro {
                expect: ops::Expect::Pass,
                notes: vec![divergence.violation.to_string()],
                ops: ops::renumber(&path),
            };
            (
                false,
                format!("{exploration}\n{divergence}\n\n{}", ops::print(&repro)),
            )
        }
    }
}
