//! The seeds' leak 4 (the session memory-leak post): a session's TLS state (its client
//! configuration and its resumption cache) is its own, bounded by `tls_session_cache`,
//! counted in the ledger, and dropped once `invalidated()` resolves, so that a session per
//! request does not grow memory without bound. The witness is a `Weak` to the configuration
//! (which holds the cache), and the stage's count of resumed handshakes shows the cache is
//! used. Every wait is bounded.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use leakproof::{Configuration, Session};
use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use tls_ca::TestCa;

/// Runs of the release case: it races the release against the connections' ends.
const RUNS: usize = 20;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

fn config(ca: &TestCa) -> leakproof::ConfigurationBuilder {
    Configuration::builder().add_root_certificate(ca.root())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_state_is_dropped_once_invalidated_resolves() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    for run in 0..RUNS {
        let session = Session::new(config(&ca).build().unwrap(), None);
        let weak = session
            .tls_config()
            .expect("a live session has its TLS state");
        // Tickets come in after the handshake, with the response: a connection kept alive
        // in the pool, one cut mid-body, and a websocket, all over TLS.
        let response = bounded("data", session.data(get(stage.https_url("/bytes/1000"))))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let stalled = session
            .data_task(get(stage.https_url("/bytes/1000000?stall_after=4096")))
            .unwrap();
        stalled.resume();
        let ws = session
            .websocket_task(stage.wss_url("/ws/echo"), &[])
            .unwrap();
        ws.resume();
        eventually("tickets cached", || session.resources().tls_sessions > 0).await;
        if run % 2 == 0 {
            session.invalidate_and_cancel();
        } else {
            stalled.cancel();
            ws.cancel_with(1000, "done").unwrap();
            session.finish_tasks_and_invalidate();
        }
        bounded("invalidated", session.invalidated()).await;
        assert!(
            weak.upgrade().is_none(),
            "run {run}: the TLS configuration and its cache outlived invalidated()"
        );
        assert!(session.tls_config().is_none());
        let ledger = session.resources();
        assert_eq!(ledger.tls_sessions, 0, "run {run}: {ledger:?}");
        assert!(ledger.is_zero(), "run {run}: {ledger:?}");
    }
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} open",
        stage.open()
    );
}

#[tokio::test]
async fn dropping_the_last_session_handle_drops_its_tls_state_too() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let session = Session::new(config(&ca).build().unwrap(), None);
    let weak = session.tls_config().unwrap();
    let observer = session.observer();
    bounded("data", session.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap();
    drop(session); // R10: finishes the tasks and invalidates
    bounded("invalidated", observer.invalidated()).await;
    assert!(
        weak.upgrade().is_none(),
        "the TLS state outlived the session"
    );
    assert_eq!(observer.resources().tls_sessions, 0);
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} open",
        stage.open()
    );
}

#[tokio::test]
async fn the_resumption_cache_is_used_and_holds_at_most_tls_session_cache_sessions() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    // No connection kept alive: every request makes a handshake.
    let config = config(&ca)
        .max_idle_per_host(0)
        .tls_session_cache(3)
        .build()
        .unwrap();
    assert_eq!(config.tls_session_cache(), 3);
    let session = Session::new(config, None);
    let mut most = 0;
    for _ in 0..12 {
        bounded("data", session.data(get(stage.https_url("/bytes/10"))))
            .await
            .unwrap();
        most = most.max(session.resources().tls_sessions);
    }
    assert_eq!(most, 3, "the cache fills to its bound and no further");
    assert_eq!(stage.accepted(), 12);
    assert_eq!(
        stage.tls_resumptions(),
        11,
        "each handshake after the first resumed a cached session"
    );
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert_eq!(session.resources().tls_sessions, 0);
}

#[tokio::test]
async fn a_zero_tls_session_cache_caches_nothing_and_never_resumes() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let config = config(&ca)
        .max_idle_per_host(0)
        .tls_session_cache(0)
        .build()
        .unwrap();
    let session = Session::new(config, None);
    for _ in 0..4 {
        bounded("data", session.data(get(stage.https_url("/bytes/10"))))
            .await
            .unwrap();
        assert_eq!(session.resources().tls_sessions, 0);
    }
    assert_eq!(stage.tls_resumptions(), 0);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
}

#[tokio::test]
async fn sessions_do_not_share_their_tls_state() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let first = Session::new(config(&ca).max_idle_per_host(0).build().unwrap(), None);
    bounded("data", first.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap();
    assert!(first.resources().tls_sessions > 0);
    // A new session has none of the first one's tickets: its handshake is a full one.
    let second = Session::new(config(&ca).max_idle_per_host(0).build().unwrap(), None);
    assert_eq!(second.resources().tls_sessions, 0);
    bounded("data", second.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap();
    assert_eq!(stage.tls_resumptions(), 0);
    for session in [first, second] {
        session.finish_tasks_and_invalidate();
        bounded("invalidated", session.invalidated()).await;
    }
}
