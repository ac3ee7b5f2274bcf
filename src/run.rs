//! Running the conformance test for a number of cases from a seed, and the report.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::test_runner::{
    Config, FailurePersistence, FileFailurePersistence, RngAlgorithm, TestError, TestRng,
    TestRunner,
};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

use leakproof_model::Op;

use crate::machine::{Conformance, OPS_APPLIED, System};
use crate::reference::Reference;

/// How much to explore.
#[derive(Debug, Clone)]
pub struct Options {
    pub cases: u32,
    /// The same seed generates the same sequences; `None` picks one and reports it.
    pub seed: Option<u64>,
    /// The longest generated sequence, before teardown.
    pub max_ops: usize,
    /// A file of proptest regression seeds to replay first and to record failures in.
    pub regressions: Option<&'static str>,
    /// Show a progress bar on the terminal (it hides itself when stderr is not one).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cases: 256,
            seed: None,
            max_ops: 48,
            regressions: None,
            progress: false,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub cases: u32,
    /// Sequences actually run: `cases` when all held; on a failure, those up to it and the
    /// shrinker's.
    pub runs: u32,
    pub seed: u64,
    pub ops: u64,
    pub elapsed: Duration,
    pub failure: Option<Failure>,
    /// For a deterministic system: the digest of its cases' traces, and how many there were
    /// (see [`System::trace`]).
    pub traces: Option<(u64, u64)>,
}

/// The shrunk, minimal failing sequence and what broke.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    pub ops: Vec<Op>,
}

/// Check `S` against the model.
pub fn check<S: System>(target: &'static str, options: &Options) -> Report {
    let seed = options.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: options.cases,
        failure_persistence: options.regressions.map(|path| {
            Box::new(FileFailurePersistence::Direct(path)) as Box<dyn FailurePersistence>
        }),
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = Reference::sequential_strategy(1..=options.max_ops);

    // Shrinking panics many times on purpose; the report says what the last one was.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ops_before = OPS_APPLIED.load(Ordering::Relaxed);
    crate::machine::reset_traces();
    let started = Instant::now();
    let bar = options.progress.then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(options.cases));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>6} [{bar:40}] {pos}/{len} cases ({per_sec}, {eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(target);
        bar
    });
    let runs = std::sync::atomic::AtomicU32::new(0);
    // The ops of the last run that failed: the minimal one once shrinking is done. Reported
    // in place of the value the runner hands back, which is not always the sequence that
    // failed last (after a simplification that passed, a sequence's ops are not always put
    // back as they were: `resume t3` came back as `resume t1`).
    let last_failed: std::sync::Mutex<Option<Vec<Op>>> = std::sync::Mutex::new(None);
    let result = runner.run(&strategy, |(initial, ops, seen)| {
        runs.fetch_add(1, Ordering::Relaxed);
        let tried = ops.clone();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Conformance::<S>::test_sequential(config.clone(), initial, ops, seen);
        }));
        if let Err(panic) = run {
            *last_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(tried);
            std::panic::resume_unwind(panic);
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        Ok(())
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed();
    std::panic::set_hook(quiet);

    let failure = match result {
        Ok(()) => None,
        Err(TestError::Fail(reason, (_, ops, _))) => Some(Failure {
            message: reason.message().to_string(),
            ops: last_failed
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(ops),
        }),
        Err(TestError::Abort(reason)) => Some(Failure {
            message: format!("aborted: {}", reason.message()),
            ops: Vec::new(),
        }),
    };
    Report {
        target,
        cases: options.cases,
        runs: runs.into_inner(),
        seed,
        ops: OPS_APPLIED.load(Ordering::Relaxed) - ops_before,
        elapsed,
        failure,
        traces: crate::machine::traces(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(f, "model vs {}", self.target)?;
        if self.failure.is_some() {
            writeln!(
                f,
                "  cases   {} run of {}, shrinking included (seed {})",
                self.runs, self.cases, self.seed
            )?;
        } else {
            writeln!(f, "  cases   {} (seed {})", self.cases, self.seed)?;
        }
        writeln!(
            f,
            "  ops     {} (teardown included, shrinking too)",
            self.ops
        )?;
        writeln!(
            f,
            "  time    {:.2?} ({:.0} cases/s, {:.0} ops/s)",
            self.elapsed,
            f64::from(self.runs) / secs,
            self.ops as f64 / secs
        )?;
        if let Some((digest, runs)) = self.traces {
            writeln!(
                f,
                "  traces  {digest:016x} (digest of {runs} runs, shrinking included)"
            )?;
        }
        match &self.failure {
            None => writeln!(f, "  result  all rules held"),
            Some(failure) => {
                use crate::ops;
                writeln!(f, "  result  FAILED: {}", failure.message)?;
                if failure.ops.is_empty() {
                    return Ok(());
                }
                // Paste-ready: unindented, renumbered, expected to pass once fixed.
                let repro = ops::Repro::from_failure(failure);
                let name = ops::broken_rule(&failure.message)
                    .map_or("repro".into(), |rule| format!("repro_{rule}"));
                let count = match repro.ops.len() {
                    1 => "1 op".to_string(),
                    n => format!("{n} ops"),
                };
                writeln!(
                    f,
                    "\n--- the minimal sequence ({count}, renumbered), as a tests/repros/*.ops file ---"
                )?;
                write!(f, "{}", ops::print(&repro))?;
                writeln!(f, "\n--- the same, as a #[test] ---")?;
                write!(
                    f,
                    "{}",
                    ops::test_snippet_against(&name, &repro, self.target)
                )
            }
        }
    }
}
