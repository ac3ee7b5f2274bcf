//! Attribution: each bug planted around the engine (`leakproof_check::planted`) is caught by
//! the conformance test, and the divergence names the rule the bug breaks, not a rule that
//! merely looks broken downstream of it.

use std::collections::BTreeSet;

use leakproof_check::assertions::View;
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::machine::System;
use leakproof_check::ops::{Found, Repro, broken_rule, parse, print, replay};
use leakproof_check::planted::{PLANTED, Planted, named};
use leakproof_check::run::{Options, check};
use leakproof_model::Op;
use leakproof_model::rules::Rule;

/// A short sequence that walks into each planted bug.
const SEQUENCES: &[(&str, &str)] = &[
    (
        "completes-twice",
        "session s0 delegated
         task t0 data in s0
         cancel t0",
    ),
    (
        // The cancelled task's handle is gone, so its did_complete is also what R10 owes it:
        // still, the first thing that went wrong is did_become_invalid coming first (R2).
        "invalid-before-cancelled-complete",
        "session s0 delegated
         task t0 data in s0
         resume t0
         drop t0
         invalidate and cancel s0",
    ),
    (
        "delegate-kept",
        "session s0 delegated
         finish tasks and invalidate s0",
    ),
    (
        "pool-kept-at-invalidation",
        "session s0 delegated
         task t0 data in s0
         resume t0
         server t0 head allow
         server t0 ends
         finish tasks and invalidate s0",
    ),
    (
        "abort-ignored",
        "session s0 plain
         task t0 data in s0
         resume t0
         cancel t0",
    ),
    (
        "temp-file-kept",
        "session s0 delegated
         task t0 download in s0
         resume t0
         server t0 head allow
         server t0 sends 512
         server t0 ends",
    ),
    (
        "stream-reads-past-window",
        "session s0 plain
         task t0 stream in s0
         resume t0
         server t0 sends 65536",
    ),
    (
        "suspend-ignored",
        "session s0 delegated
         task t0 data in s0
         resume t0
         suspend t0",
    ),
    (
        "creates-after-invalidation",
        "session s0 delegated
         finish tasks and invalidate s0
         task t0 data in s0",
    ),
    (
        // The running task is cancelled too, which looks like R1 broken: it is the shared
        // session's own obligation, to ignore invalidation, that failed.
        "shared-honours-invalidation",
        "session s0 shared
         task t0 data in s0
         resume t0
         invalidate and cancel s0",
    ),
    (
        // No did_become_invalid comes (R2's), because the session was never finished (R10's).
        "dropped-session-never-invalidates",
        "session s0 delegated
         drop session s0",
    ),
    (
        "dropped-suspended-task-kept",
        "session s0 delegated
         task t0 data in s0
         drop t0",
    ),
    (
        // One timer short looks like R7's: the timer missing is the close deadline (R11).
        "close-arms-no-deadline",
        "session s0 delegated
         task t0 websocket in s0
         resume t0
         server t0 upgrades
         close t0 going away",
    ),
    (
        "timeout-ignored",
        "session s0 delegated
         task t0 data in s0
         resume t0
         time t0 passes request timeout",
    ),
    (
        // One connection short looks like R5's: it is a task kept waiting for a slot (R12).
        "one-slot-short",
        "session s0 plain with 2 per host
         task t0 data in s0
         task t1 data in s0
         resume t0
         resume t1",
    ),
];

/// Replay the bug's sequence against the system that has it: the divergence must name the
/// bug's rule, at the sequence's last op.
fn names_its_rule(name: &str) {
    let bug: &Planted = named(name).unwrap_or_else(|| panic!("no planted bug {name}"));
    let text = SEQUENCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ops)| ops.lines().map(str::trim).collect::<Vec<_>>().join("\n"))
        .unwrap_or_else(|| panic!("no sequence for {name}"));
    let repro = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));

    let divergence = (bug.run)(&repro.ops).expect_err("the planted bug is caught");

    println!("{bug:?}\n{divergence}");
    assert_eq!(
        (divergence.violation.rule, divergence.step),
        (bug.rule, repro.ops.len()),
        "{divergence}"
    );
}

#[test]
fn every_rule_has_a_planted_bug_and_every_bug_a_sequence() {
    let rules: BTreeSet<Rule> = PLANTED.iter().map(|p| p.rule).collect();
    let sequences: BTreeSet<&str> = SEQUENCES.iter().map(|(n, _)| *n).collect();
    let planted: BTreeSet<&str> = PLANTED.iter().map(|p| p.name).collect();

    assert_eq!(rules, Rule::ALL.into_iter().collect());
    assert_eq!(sequences, planted);
}

#[test]
fn a_did_complete_said_twice_is_r1() {
    names_its_rule("completes-twice");
}

#[test]
fn did_become_invalid_before_the_cancelled_tasks_did_complete_is_r2() {
    names_its_rule("invalid-before-cancelled-complete");
}

#[test]
fn a_delegate_kept_after_did_become_invalid_is_r3() {
    names_its_rule("delegate-kept");
}

#[test]
fn a_pool_kept_open_at_invalidation_is_r4() {
    names_its_rule("pool-kept-at-invalidation");
}

#[test]
fn an_abort_the_driver_ignores_is_r5() {
    names_its_rule("abort-ignored");
}

#[test]
fn a_temp_file_kept_after_did_complete_is_r5() {
    names_its_rule("temp-file-kept");
}

#[test]
fn a_stream_that_reads_past_its_window_is_r6() {
    names_its_rule("stream-reads-past-window");
}

#[test]
fn a_suspend_that_does_nothing_is_r7() {
    names_its_rule("suspend-ignored");
}

#[test]
fn a_task_made_after_invalidation_began_is_r8() {
    names_its_rule("creates-after-invalidation");
}

#[test]
fn a_shared_session_that_honours_invalidation_is_r9() {
    names_its_rule("shared-honours-invalidation");
}

#[test]
fn a_dropped_session_that_never_invalidates_is_r10() {
    names_its_rule("dropped-session-never-invalidates");
}

#[test]
fn a_dropped_suspended_task_kept_is_r10() {
    names_its_rule("dropped-suspended-task-kept");
}

#[test]
fn a_websocket_close_with_no_deadline_is_r11() {
    names_its_rule("close-arms-no-deadline");
}

#[test]
fn a_timeout_that_never_fires_is_r12() {
    names_its_rule("timeout-ignored");
}

#[test]
fn a_task_kept_waiting_with_a_slot_to_be_had_is_r12() {
    names_its_rule("one-slot-short");
}

/// The engine, except that the system gives up with a panic that names no rule when a task
/// is cancelled, as a driver or a harness that meets what it did not expect.
#[derive(Debug, Default)]
struct GivesUpOnCancel(EngineWorld);

impl System for GivesUpOnCancel {
    fn apply(&mut self, op: &Op) -> View {
        if matches!(op, Op::Cancel(_)) {
            panic!("the driver gave up");
        }
        self.0.apply(op)
    }
}

/// The engine, except that the system's own assertion fails when the server sends bytes, with
/// the rule it checks in the middle of its message, as `assert_eq!` writes it.
#[derive(Debug, Default)]
struct AssertsOnBytes(EngineWorld);

impl System for AssertsOnBytes {
    fn apply(&mut self, op: &Op) -> View {
        let sent = match op {
            Op::ServerSends { bytes, .. } => *bytes,
            _ => 0,
        };
        assert_eq!(sent, 0, "R6: the window refused the room it offered");
        self.0.apply(op)
    }
}

#[test]
fn a_system_that_panics_diverges_with_the_rule_of_the_op_it_was_given() {
    let repro = parse("session s0 delegated\ntask t0 data in s0\nresume t0\ncancel t0")
        .expect("the repro parses");
    let options = Options {
        cases: 64,
        seed: Some(3),
        ..Options::default()
    };

    let verdict = replay::<GivesUpOnCancel>(&repro);
    let report = check::<GivesUpOnCancel>("a system that gives up on a cancel", &options);

    println!("{verdict}\n{report}");
    let Found::Divergence(divergence) = &verdict.found else {
        panic!("not a divergence: {verdict}");
    };
    assert_eq!((divergence.step, divergence.violation.rule), (4, Rule::R1));
    assert!(
        divergence.violation.detail.contains("the driver gave up"),
        "{divergence}"
    );
    let failure = report.failure.as_ref().expect("the checker finds it");
    assert_eq!(broken_rule(&failure.message), Some(Rule::R1), "{report}");
}

#[test]
fn a_system_whose_assertion_names_a_rule_diverges_with_that_rule() {
    let repro = parse("session s0 plain\ntask t0 stream in s0\nresume t0\nserver t0 sends 16")
        .expect("the repro parses");

    let verdict = replay::<AssertsOnBytes>(&repro);

    println!("{verdict}");
    let Found::Divergence(divergence) = &verdict.found else {
        panic!("not a divergence: {verdict}");
    };
    assert_eq!((divergence.step, divergence.violation.rule), (4, Rule::R6));
}

/// The checker's generated sequences find each planted bug, shrink it, and the minimal
/// sequence's divergence names the bug's rule; the repro it prints fails again, replayed.
#[test]
fn the_checker_finds_each_planted_bug_and_names_its_rule() {
    let options = Options {
        cases: 10_000,
        seed: Some(1),
        ..Options::default()
    };
    let mut misnamed = Vec::new();
    for bug in PLANTED {
        let report = (bug.check)(bug.name, &options);
        let failure = report
            .failure
            .as_ref()
            .unwrap_or_else(|| panic!("{bug:?} not found: {report}"));
        let named = broken_rule(&failure.message);
        println!(
            "{bug:?}\n  named {named:?} in {:.2?}, {} ops: {}",
            report.elapsed,
            failure.ops.len(),
            failure.message.lines().next().unwrap_or_default()
        );
        if named != Some(bug.rule) {
            misnamed.push(format!("{}: {}", bug.name, failure.message));
        }
        let repro = Repro::from_failure(failure);
        match (bug.run)(&repro.ops) {
            Err(again) if again.violation.rule == bug.rule => {}
            other => misnamed.push(format!(
                "{}: the repro printed does not fail again: {other:?}\n{}",
                bug.name,
                print(&repro)
            )),
        }
    }
    assert!(misnamed.is_empty(), "{}", misnamed.join("\n"));
}
