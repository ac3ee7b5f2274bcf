//! https and wss against the stage speaking TLS, with a CA of the tests' own (rcgen): requests
//! and websockets over TLS, the pool keeping http and https apart, the default port, and the
//! handshake's failures as typed errors. Every wait is bounded; no assertion is about speed.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::time::Duration;

use bytes::Bytes;
use leakproof::{Configuration, Error, Message, Session, Timeout, TlsFailure};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::{self, RawScript, Stage};
use tls_ca::TestCa;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
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
    let stage = ca.stage().await;
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
    let stage = ca.stage().await;
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
    ws.cancel_with(1000, "done").unwrap();
    assert_eq!(stage.ws_upgrades(), 1);
    teardown(session, &stage).await;
}

#[tokio::test]
async fn http_and_https_to_one_host_and_port_never_share_a_connection() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
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

/// The session's handshake with `stage` fails with `kind`, in a message naming the host, and
/// leaves no connection open.
async fn refused(session: &Session, stage: &Stage, kind: TlsFailure) -> String {
    let error = bounded("data", session.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap_err();
    match &error {
        Error::Tls {
            host, kind: seen, ..
        } => {
            assert_eq!((host.as_str(), *seen), ("127.0.0.1", kind), "{error}");
        }
        other => panic!("expected a TLS {kind:?} failure: {other}"),
    }
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} connections open after a failed handshake",
        stage.open()
    );
    assert_eq!(
        stage.requests(),
        0,
        "nothing is sent over an untrusted connection"
    );
    error.to_string()
}

#[tokio::test]
async fn a_server_signed_by_an_unknown_ca_is_an_unknown_issuer() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    // The default configuration trusts webpki-roots' roots only.
    let session = Session::new(Configuration::default(), None);
    let message = refused(&session, &stage, TlsFailure::UnknownIssuer).await;
    assert!(message.contains("add_root_certificate"), "{message}");
    // Another CA's root does not help either.
    let other = trusting(&TestCa::new("another CA"));
    refused(&other, &stage, TlsFailure::UnknownIssuer).await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_name_mismatch() {
    let ca = TestCa::new("leakproof test CA");
    let cert = ca.server_for(&["example.test"], None);
    let stage = Stage::builder()
        .tls(cert.chain, cert.key)
        .start()
        .await
        .unwrap();
    let message = refused(&trusting(&ca), &stage, TlsFailure::NameMismatch).await;
    assert!(message.contains("not valid for this host"), "{message}");
}

#[tokio::test]
async fn an_expired_certificate_is_expired() {
    let ca = TestCa::new("leakproof test CA");
    let cert = ca.server_for(&["127.0.0.1"], Some((2000, 2001)));
    let stage = Stage::builder()
        .tls(cert.chain, cert.key)
        .start()
        .await
        .unwrap();
    let message = refused(&trusting(&ca), &stage, TlsFailure::Expired).await;
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn https_to_a_server_that_speaks_plain_http_is_a_protocol_error() {
    let ca = TestCa::new("leakproof test CA");
    let stage = Stage::start().await.unwrap();
    let session = trusting(&ca);
    let url = format!("https://{}/bytes/10", stage.addr());
    let error = bounded("data", session.data(get(url))).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Tls {
                kind: TlsFailure::Protocol,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} open",
        stage.open()
    );
    teardown(session, &stage).await;
}

#[tokio::test]
async fn a_handshake_the_server_never_answers_times_out_with_the_request_timeout() {
    let stage = Stage::start().await.unwrap();
    // Accepts TCP and never says a word: the ClientHello goes unanswered.
    let addr = stage
        .listen_raw(RawScript::Hold("mute".into()))
        .await
        .unwrap();
    let ca = TestCa::new("leakproof test CA");
    let config = Configuration::builder()
        .add_root_certificate(ca.root())
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let error = bounded("data", session.data(get(format!("https://{addr}/"))))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::TimedOut(Timeout::Request)),
        "{error}"
    );
    teardown(session, &stage).await;
}

#[tokio::test]
async fn roots_are_checked_when_the_configuration_is_built() {
    let error = Configuration::builder()
        .add_root_certificate(b"not a certificate".to_vec())
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfiguration(why) if why.contains("root certificate 0")),
        "{error}"
    );
    let error = Configuration::builder()
        .webpki_roots(false)
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfiguration(why) if why.contains("no root certificates")),
        "{error}"
    );
}

#[tokio::test]
async fn without_webpki_roots_only_the_added_roots_are_trusted() {
    let ca = TestCa::new("leakproof test CA");
    let stage = ca.stage().await;
    let config = Configuration::builder()
        .webpki_roots(false)
        .add_root_certificate(ca.root())
        .build()
        .unwrap();
    assert!(!config.webpki_roots());
    assert_eq!(config.root_certificates().len(), 1);
    let session = Session::new(config, None);
    let response = bounded("data", session.data(get(stage.https_url("/bytes/10"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    teardown(session, &stage).await;
}
