//! Exhaustive small scope: every op sequence up to a depth, checked against the model's own
//! rules, then replayed: against the engine, over one delegated session and two tasks of any
//! kind to [`DEFAULT_DEPTH`]; against the real client on sockets, over one session of each
//! kind ([`Alphabet::every_kind`]) to depth 4. And a system that loses a callback is caught on
//! a short path. Deeper: `leakproof-check explore --depth N [--target ...]`.

use std::time::Instant;

use leakproof_check::assertions::View;
use leakproof_check::client_sut::ClientWorld;
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::explore::{Alphabet, DEFAULT_DEPTH, explore, replay};
use leakproof_check::machine::System;
use leakproof_model::Op;
use leakproof_model::rules::Rule;

#[test]
fn every_short_sequence_runs_on_the_engine_as_the_model_says() {
    let started = Instant::now();
    let exploration =
        explore(&Alphabet::default(), DEFAULT_DEPTH).unwrap_or_else(|bug| panic!("{bug}"));
    let explored = started.elapsed();
    let summary = replay::<EngineWorld>(&exploration)
        .unwrap_or_else(|(path, divergence)| panic!("{divergence}\n  path: {path:?}"));
    println!("{exploration}");
    println!(
        "explored in {explored:.2?}; replayed {} paths, {} ops, in {:.2?}",
        summary.paths,
        summary.ops,
        started.elapsed() - explored
    );
    assert_eq!(summary.paths, exploration.transitions + 1);
}

/// The engine, except that when one op makes a delegate hear several callbacks, the last is
/// lost: a did_become_invalid that follows the last did_complete, say.
#[derive(Debug, Default)]
struct LosesTheLastOfABurst(EngineWorld);

impl System for LosesTheLastOfABurst {
    fn apply(&mut self, op: &Op) -> View {
        let mut view = self.0.apply(op);
        if view.callbacks.len() > 1 {
            view.callbacks.pop();
        }
        view
    }
}

#[test]
fn a_system_that_loses_a_callback_is_caught_on_a_short_path() {
    let exploration = explore(&Alphabet::default(), 3).unwrap_or_else(|bug| panic!("{bug}"));

    let (path, divergence) =
        replay::<LosesTheLastOfABurst>(&exploration).expect_err("the lost callback is caught");

    println!("{divergence}\n  path: {path:?}");
    assert!(path.len() <= 3, "{path:?}");
    assert_eq!(divergence.violation.rule, Rule::R2);
}

/// The same search, shallower, against the real client: every transition of every session
/// kind and task kind to depth 4 (2484 paths, 16,307 ops, about a minute), each replayed on a
/// fresh runtime and stages, then torn down and checked with the witnesses.
#[test]
fn the_client_follows_every_short_sequence() {
    let started = Instant::now();
    let exploration = explore(&Alphabet::every_kind(), 4).unwrap_or_else(|bug| panic!("{bug}"));
    let summary = replay::<ClientWorld>(&exploration)
        .unwrap_or_else(|(path, divergence)| panic!("{divergence}\n  path: {path:?}"));
    println!(
        "client, {exploration}; replayed {} paths, {} ops, in {:.2?}",
        summary.paths,
        summary.ops,
        started.elapsed()
    );
}
