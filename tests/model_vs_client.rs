//! The real client against the specification: generated op sequences over several sessions
//! and tasks, the server played by stages' held exchanges, compared op by op after the client
//! settles, then torn down and checked with the witnesses. Longer runs:
//! `cargo run --release -p leakproof-check -- check --cases N`.

use leakproof_check::client_sut::ClientWorld;
use leakproof_check::run::{Options, check};

#[test]
fn model_vs_client() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(48);
    let report = check::<ClientWorld>(
        "client",
        &Options {
            cases,
            max_ops: 32,
            regressions: Some("proptest-regressions/model_vs_client.txt"),
            ..Options::default()
        },
    );
    println!("{report}");
    assert!(report.failure.is_none(), "{report}");
}
