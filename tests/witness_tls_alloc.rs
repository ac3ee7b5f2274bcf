//! The seeds' leak 4 (the session memory-leak post), the figure: cycles of a new session, one
//! https request to the stage over TLS, `finish_tasks_and_invalidate`, `invalidated()`. A
//! session's TLS state (its configuration and its resumption cache) must go with it: the heap
//! (a counting allocator, so this binary holds one test) comes back within 64 KiB of the
//! warmed-up baseline, and the process's file descriptors stay flat. `LEAKPROOF_TLS_CYCLES`
//! sets the number of measured cycles (300 by default; the README gives the figure for
//! 10,000 in release mode).

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::time::Duration;

use leakproof::{Configuration, Session};
use leakproof_check::scenario::patiently;
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;
use tls_ca::TestCa;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const DEFAULT_CYCLES: usize = 300;
/// Cycles before the baseline: what lives for the process warms up, and so does the stage's
/// own server-side session cache (rustls's default, 256 sessions, two per full handshake).
const WARM_UP: usize = 200;
const SLACK: usize = 64 * 1024;

/// One cycle; returns once everything of the session is released.
async fn cycle(stage: &Stage, ca: &TestCa) {
    let config = Configuration::builder()
        .add_root_certificate(ca.root())
        .build()
        .expect("a valid configuration");
    let session = Session::new(config, None);
    let tls = session.tls_config().expect("a live session's TLS state");
    let request = http::Request::get(stage.https_url("/bytes/1024"))
        .body(())
        .unwrap();
    let response = session.data(request).await.expect("the request succeeds");
    assert_eq!(response.body().len(), 1024);
    drop(response);
    session.finish_tasks_and_invalidate();
    assert!(
        patiently(session.invalidated()).await.is_some(),
        "not invalidated"
    );
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    assert!(
        tls.upgrade().is_none(),
        "the TLS state outlived invalidated()"
    );
}

/// The heap and the open file descriptors once the stage has seen every socket closed.
async fn settled(stage: &Stage, cycles: usize) -> (usize, usize) {
    assert!(
        stage
            .wait_until(
                |s| s.accepted() == cycles as u64 && s.open() == 0,
                Duration::from_secs(10)
            )
            .await,
        "R4: the stage saw {} of {} sockets closed",
        stage.closed(),
        stage.accepted()
    );
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (ALLOC.live_bytes(), fds)
}

#[test]
fn sessions_over_tls_return_the_heap_and_the_fds_to_their_baseline() {
    let cycles = std::env::var("LEAKPROOF_TLS_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CYCLES);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ca = TestCa::new("leakproof test CA");
        let stage = ca.stage().await;
        for _ in 0..WARM_UP {
            cycle(&stage, &ca).await;
        }
        let (baseline, fds_before) = settled(&stage, WARM_UP).await;
        for _ in 0..cycles {
            cycle(&stage, &ca).await;
        }
        let (after, fds_after) = settled(&stage, WARM_UP + cycles).await;
        let growth = after as isize - baseline as isize;
        println!(
            "tls soak: {cycles} cycles after {WARM_UP} to warm up; live heap {baseline} B at the \
             baseline, {after} B after (difference {growth} B, {:.2} B per cycle, allowed \
             {SLACK} B); open fds {fds_before} then {fds_after}; {} sockets accepted, {} closed",
            growth as f64 / cycles as f64,
            stage.accepted(),
            stage.closed()
        );
        assert!(
            after.abs_diff(baseline) <= SLACK,
            "the heap grew from {baseline} to {after} bytes over {cycles} sessions over TLS"
        );
        assert_eq!(fds_after, fds_before, "file descriptors left open");
    });
}
