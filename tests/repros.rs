//! The kept repros: every `tests/repros/*.ops` file replayed against the three tiers (the
//! engine, the simulated client, the client on sockets), each judged by its own `# expect:`
//! line; and a replay against a deliberately wrong system, to show a broken rule is caught and
//! named.

use std::path::{Path, PathBuf};

use leakproof_check::assertions::View;
use leakproof_check::client_sut::{ClientWorld, SimulatedWorld};
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::machine::System;
use leakproof_check::ops::{Expect, Found, Repro, broken_rule, parse, print, replay, replay_file};
use leakproof_check::run::{Options, check};
use leakproof_model::Op;
use leakproof_model::rules::Rule;

fn repro_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/repros");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "ops"))
        .collect();
    files.sort();
    files
}

/// Replay every file against `S`; fail naming each file that did not hold.
fn every_repro_file_holds_against<S: System>() {
    let files = repro_files();
    assert!(!files.is_empty(), "no tests/repros/*.ops files");
    let mut failed = Vec::new();
    for path in &files {
        let result = replay_file::<S>(path);
        let (held, said) = match &result {
            Ok(report) => (report.held(), report.to_string()),
            Err(error) => (false, error.to_string()),
        };
        println!("{said}");
        if !held {
            failed.push(said);
        }
    }
    println!(
        "{} of {} repro files held",
        files.len() - failed.len(),
        files.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn every_repro_file_holds_against_the_engine() {
    every_repro_file_holds_against::<EngineWorld>();
}

#[test]
fn every_repro_file_holds_against_the_client() {
    every_repro_file_holds_against::<ClientWorld>();
}

#[test]
fn every_repro_file_holds_against_the_simulated_client() {
    every_repro_file_holds_against::<SimulatedWorld>();
}

/// The engine, with a delegate that misses the first callback it should hear.
#[derive(Debug, Default)]
struct DeafToFirstCallback {
    engine: EngineWorld,
    missed: bool,
}

impl System for DeafToFirstCallback {
    fn apply(&mut self, op: &Op) -> View {
        let mut view = self.engine.apply(op);
        if !self.missed && !view.callbacks.is_empty() {
            view.callbacks.remove(0);
            self.missed = true;
        }
        view
    }
}

// The task's handle is dropped while it is suspended: the did_complete(cancelled) that R10
// requires at once is the first callback, and the wrong system misses it.
const DROPPED_SUSPENDED: &str = "\
# expect: fail R10
session s0 delegated
task t0 data in s0
drop t0
";

#[test]
fn a_missed_callback_is_reported_with_its_rule() {
    let repro = parse(DROPPED_SUSPENDED).expect("the repro parses");

    let verdict = replay::<DeafToFirstCallback>(&repro);

    println!("{verdict}");
    assert!(verdict.held(), "{verdict}");
    let Found::Divergence(divergence) = &verdict.found else {
        panic!("expected a divergence: {verdict}");
    };
    assert_eq!((divergence.step, divergence.violation.rule), (3, Rule::R10));
}

#[test]
fn a_wrong_expectation_does_not_hold() {
    let repro = parse(DROPPED_SUSPENDED).expect("the repro parses");
    let wrong_rule = parse(&DROPPED_SUSPENDED.replace("fail R10", "fail R5")).expect("parses");

    let against_the_engine = replay::<EngineWorld>(&repro);
    let with_the_wrong_rule = replay::<DeafToFirstCallback>(&wrong_rule);

    assert_eq!(repro.expect, Expect::Fail(Some(Rule::R10)));
    assert!(!against_the_engine.held(), "{against_the_engine}");
    assert!(!with_the_wrong_rule.held(), "{with_the_wrong_rule}");
}

/// The whole path a finding takes: the checker finds the wrong system out, its report prints
/// the repro, and the repro replays as the same divergence, yet holds against the engine.
#[test]
fn a_found_failure_replays_from_its_report() {
    let options = Options {
        cases: 32,
        seed: Some(1),
        ..Options::default()
    };
    let report = check::<DeafToFirstCallback>("a delegate deaf to its first callback", &options);
    let failure = report
        .failure
        .as_ref()
        .expect("the wrong system is found out");
    let repro = Repro::from_failure(failure);
    println!("{report}");

    let shown = report.to_string();
    let against_the_wrong_system = replay::<DeafToFirstCallback>(&repro);
    let against_the_engine = replay::<EngineWorld>(&repro);

    assert!(shown.contains(&print(&repro)), "{shown}");
    let Found::Divergence(divergence) = &against_the_wrong_system.found else {
        panic!("no divergence: {against_the_wrong_system}");
    };
    assert_eq!(
        Some(divergence.violation.rule),
        broken_rule(&failure.message)
    );
    assert!(
        repro.notes[0].contains(&format!(" at step {}", divergence.step)),
        "{:?} vs {divergence}",
        repro.notes
    );
    assert!(against_the_engine.held(), "{against_the_engine}");
}

#[test]
fn an_op_that_cannot_run_where_it_stands_is_reported() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("typo.ops");
    std::fs::write(
        &path,
        "session s0 delegated\ntask t0 data in s0\nresume t1\n",
    )
    .expect("written");

    let report = replay_file::<EngineWorld>(&path).expect("replayed");

    assert_eq!(report.skipped, [3]);
    assert!(report.verdict.held(), "{report}");
    assert!(!report.held(), "{report}");
    assert!(report.to_string().contains("ops [3] skipped"), "{report}");
}

#[test]
fn a_file_that_does_not_parse_is_named_with_its_line() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("bad.ops");
    std::fs::write(
        &path,
        "# expect: pass\nsession s0 delegated\nresume t0 now\n",
    )
    .expect("written");

    let error = replay_file::<EngineWorld>(&path).expect_err("does not parse");

    assert_eq!(
        error.to_string(),
        format!(
            "{}: line 3: \"resume t0 now\": expected \"resume TASK\"",
            path.display()
        )
    );
}
