//! Coverage of the model's transitions by the suite: the generated runs against the engine
//! and the exhaustive small scope together must apply every (state class, op kind) pair the
//! model allows somewhere. `coverage::record` is process-wide, so this is the binary's only
//! test.

use leakproof_check::coverage;
use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::explore::replay;
use leakproof_check::run::{Options, check};

/// A fixed seed, so that what is covered does not change from run to run.
const SEED: u64 = 0x5eed;

#[test]
fn the_suite_applies_every_transition_of_the_model() {
    coverage::reset();

    // The same case count as tests/model_vs_engine.rs.
    let report = check::<EngineWorld>(
        "engine",
        &Options {
            cases: 256,
            seed: Some(SEED),
            ..Options::default()
        },
    );
    assert!(report.failure.is_none(), "{report}");
    // One shortest path to every pair of the universe: the generator alone reaches the
    // rarer pairs (a plain or shared session's, a stream's with its window full and its peer
    // ended) only after thousands of cases.
    for exploration in coverage::covering() {
        replay::<EngineWorld>(&exploration)
            .unwrap_or_else(|(path, divergence)| panic!("{divergence}\n  path: {path:?}"));
    }

    let coverage = coverage::snapshot();
    println!("{coverage}");
    let missed = coverage.missed().len();
    assert_eq!(missed, 0, "transitions never reached: listed above");
    // A pair outside the universe means the universe's search is too shallow or too narrow.
    let beyond = coverage.beyond_universe().len();
    assert_eq!(beyond, 0, "transitions outside the universe: listed above");
}
