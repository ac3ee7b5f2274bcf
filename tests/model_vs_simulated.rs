//! The real client in a simulation against the specification: one current-thread runtime with
//! a paused clock runs the client, its delegates' callbacks and the stages over an in-memory
//! network; after each op the world runs until nothing can make progress and is compared with
//! the model at once, and each promise is checked at its moment (`client_sut`'s docs). Being
//! fast and exact, this tier runs many more cases than the one on real sockets. Longer runs:
//! `cargo run --release -p leakproof-check -- check --target simulated --cases N`.

use std::path::Path;

use leakproof_check::client_sut::SimulatedWorld;
use leakproof_check::heap::WorldAllocator;
use leakproof_check::machine::{System, run_sequence};
use leakproof_check::ops::{parse, replay_file};
use leakproof_check::run::{Options, check};

/// The heap witness: each case's world, once dropped, must leave the heap as it found it
/// (within `heap::WORLD_BOUND`), or the case fails.
#[global_allocator]
static HEAP: WorldAllocator = WorldAllocator;

/// The seed `cargo test` runs: the same cases on every run, so that CI is repeatable; the
/// checker (`leakproof-check check`) draws a new seed each time and explores further.
const SEED: u64 = 0x5eed_1eaf;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

#[test]
fn model_vs_simulated() {
    let report = check::<SimulatedWorld>(
        "simulated",
        &Options {
            cases: cases(1000),
            seed: Some(SEED),
            max_ops: 32,
            regressions: Some("proptest-regressions/model_vs_simulated.txt"),
            ..Options::default()
        },
    );
    println!("{report}");
    assert!(report.failure.is_none(), "{report}");
}

/// The same seed runs the same cases the same way: the digests of two runs' traces (the
/// stages' logs, the callbacks heard, the futures' returns, the simulated time) are equal.
#[test]
fn the_same_seed_gives_the_same_traces() {
    let options = Options {
        cases: cases(40),
        seed: Some(0x1eaf),
        max_ops: 32,
        ..Options::default()
    };
    let first = check::<SimulatedWorld>("simulated", &options);
    let second = check::<SimulatedWorld>("simulated", &options);
    assert!(first.failure.is_none(), "{first}");
    let (digest, runs) = first.traces.expect("the simulated world traces its runs");
    assert_eq!(u64::from(options.cases), runs, "one trace a case");
    assert_eq!(first.traces, second.traces, "{first}\n{second}");
    println!("{} runs, digest {digest:016x}, twice", runs);
}

/// One long sequence, every op of the alphabet, run twice: the same trace, byte for byte.
#[test]
fn a_sequence_with_every_op_runs_the_same_twice() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/repros/every-op.ops");
    let repro = parse(&std::fs::read_to_string(path).unwrap()).expect("the repro parses");
    let trace = || {
        let mut world = SimulatedWorld::default();
        for op in &repro.ops {
            world.apply(op);
        }
        world.trace().expect("the simulated world traces its runs")
    };
    let (first, second) = (trace(), trace());
    assert_eq!(first, second);
    assert!(first.lines().count() > 10, "{first}");
    // And the sequence holds, against the model.
    run_sequence::<SimulatedWorld>(&repro.ops).unwrap_or_else(|d| panic!("{d}"));
}

/// Divergences found and not fixed yet (`tests/known/*.ops`), each with the rule it breaks:
/// the simulated client still fails each as its `# expect:` line says. Once one is fixed, it
/// fails this test, and moves to `tests/repros/` expecting a pass.
#[test]
fn known_divergences_still_fail_as_written() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/known");
    // None known: git keeps no empty directory.
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut files: Vec<_> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "ops"))
        .collect();
    files.sort();
    for path in files {
        let report = replay_file::<SimulatedWorld>(&path).unwrap_or_else(|e| panic!("{e}"));
        println!("{report}");
        assert!(report.held(), "{report}");
    }
}
