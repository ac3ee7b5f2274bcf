//! The engine against the specification: generated op sequences over several sessions and
//! tasks, compared op by op, then torn down and checked for a full release. Longer runs:
//! `cargo run --release -p leakproof-check -- check --cases N`.

use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::run::{Options, check};

#[test]
fn model_vs_engine() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    let report = check::<EngineWorld>(
        "engine",
        &Options {
            cases,
            regressions: Some("proptest-regressions/model_vs_engine.txt"),
            ..Options::default()
        },
    );
    println!("{report}");
    assert!(report.failure.is_none(), "{report}");
}
