//! https and wss against the stage speaking TLS, with a CA of the tests' own (rcgen): requests
//! and websockets over TLS, the pool keeping http and https apart, the default port, and the
//! handshake's failures as typed errors. Every wait is bounded; no assertion is about speed.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use bytes::Bytes;
use leakproof::{Configuration, Error, Message, Session};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::{self, Stage};
use tls_ca::TestCa;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// A stage speaking TLS with a certificate `ca` signed for 127.0.0.1.
async fn tls_stage(ca: &TestCa) -> Stage {
    let cert = ca.server();
    Stage::builder()
        .tls(cert.chain, cert.key)
        .start()
        .await
        .unwrap()
}

/// A session trusting `ca`.
fn trusting(ca: &TestCa) -> Session {
    let config = Configuration::builder()
        .add_root_certificate(ca.root())
        .build()
        .unwrap();
    Session::new(config, None)
}

/// Finish and invalidate; every connection the stage accepted is closed (R4).
async fn teardown(session: Session, stage: &Stage) {
    session.finish_tasks_and_invalidate();
    bounded("invalidation", session.invalidated()).await;
    let ledger = session.resources();
    assert!(ledger.is_zero(), "R4: {ledger:?}");
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R4: {} open",
        stage.open()
    );
}

#[tokio::test]
async fn an_https_request_is_answered_over_tls_and_its_connection_is_reused() {
    let ca = TestCa::new("leakproof test CA");
    let stage = tls_stage(&ca).await;
    let session = trusting(&ca);
    for _ in 0..3 {
        let response = bounded("data", session.data(get(stage.https_url("/bytes/100000"))))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body(), &Bytes::from(stage::body(100_000)));
    }
    assert_eq!(stage.requests(), 3);
    assert_eq!(stage.accepted(), 1, "one TLS connection, kept alive");
    teardown(session, &stage).await;
}

#[tokio::test]
async fn a_wss_websocket_echoes_over_tls() {
    let ca = TestCa::new("leakproof test CA");
    let stage = tls_stage(&ca).await;
    let session = trusting(&ca);
    let ws = session
        .websocket_task(stage.wss_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    for message in [
        Message::Text("hello".into()),
        Message::Binary(Bytes::from(stage::body(100_000))),
    ] {
        bounded("send", ws.send(message.clone())).await.unwrap();
        assert_eq!(bounded("receive", ws.receive()).await.unwrap(), message);
    }
    ws.cancel_with(1000, "done");
    assert_eq!(stage.ws_upgrades(), 1);
    teardown(session, &stage).await;
}

#[tokio::test]
async fn http_and_https_to_one_host_and_port_never_share_a_connection() {
    let ca = TestCa::new("leakproof test CA");
    let stage = tls_stage(&ca).await;
    let session = trusting(&ca);
    let response = bounded("https", session.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The https connection is idle in the pool; plain HTTP to the same port must not take it,
    // so it opens a connection of its own, which the TLS listener cannot answer.
    let plain = bounded("http", session.data(get(stage.url("/bytes/10")))).await;
    assert!(
        plain.is_err(),
        "plain HTTP was answered over TLS: {plain:?}"
    );
    assert_eq!(stage.accepted(), 2);
    assert_eq!(stage.requests(), 1);
    teardown(session, &stage).await;
}

#[tokio::test]
async fn https_without_a_port_goes_to_443() {
    let session = Session::new(Configuration::default(), None);
    let result = bounded("data", session.data(get("https://127.0.0.1/".into()))).await;
    // Nothing listens on 443 here: refused there.
    match result {
        Err(Error::ConnectionRefused { addr }) => assert_eq!(addr, "127.0.0.1:443"),
        other => panic!("expected a refused connection to 127.0.0.1:443: {other:?}"),
    }
}
