//! The transport seam (`ConfigurationBuilder::transport`) against the stage: every connection
//! a session opens goes through the configuration's transport (pooled exchanges over http and
//! https, websockets over ws and wss, a stream task), TLS runs over the transport's stream,
//! each stream is closed when the session lets it go (the stage sees it closed), and a failed
//! connect is a typed error. Every wait is bounded; no assertion is about speed.

#[path = "support/tls_ca.rs"]
mod tls_ca;

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use leakproof::{Configuration, Endpoint, Error, Message, Session, Tcp, Transport};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::{self, RawScript, Stage};
use tls_ca::TestCa;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// TCP, through the seam (not the default's direct path), writing down every endpoint it
/// connects to.
#[derive(Debug, Clone, Default)]
struct Recording(Arc<Mutex<Vec<String>>>);

impl Recording {
    fn connects(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Transport for Recording {
    type Stream = tokio::net::TcpStream;

    async fn connect(&self, to: Endpoint<'_>) -> io::Result<Self::Stream> {
        self.0.lock().unwrap().push(to.to_string());
        Transport::connect(&Tcp, to).await
    }
}

/// A transport whose every connect fails with `kind`.
#[derive(Debug)]
struct Failing(io::ErrorKind);

impl Transport for Failing {
    type Stream = tokio::net::TcpStream;

    async fn connect(&self, _to: Endpoint<'_>) -> io::Result<Self::Stream> {
        Err(io::Error::new(self.0, "this transport connects nowhere"))
    }
}

#[tokio::test]
async fn every_connection_goes_through_the_transport_and_is_closed_with_the_session() {
    let ca = TestCa::new("leakproof test CA");
    let (plain, secure) = (Stage::start().await.unwrap(), ca.stage().await);
    let echo = plain.listen_raw(RawScript::echo()).await.unwrap();
    let transport = Recording::default();
    let config = Configuration::builder()
        .add_root_certificate(ca.root())
        .transport(transport.clone())
        .build()
        .unwrap();
    let session = Session::new(config, None);

    // Pooled exchanges, http then https: TLS runs over the transport's stream.
    for url in [plain.url("/bytes/1000"), secure.https_url("/bytes/1000")] {
        for _ in 0..2 {
            let response = bounded("data", session.data(get(url.clone())))
                .await
                .unwrap();
            assert_eq!(response.body(), &Bytes::from(stage::body(1000)));
        }
    }
    // Websockets, ws and wss.
    for url in [plain.ws_url("/ws/echo"), secure.wss_url("/ws/echo")] {
        let ws = session.websocket_task(url, &[]).unwrap();
        ws.resume();
        let hello = Message::Text("hello".into());
        bounded("send", ws.send(hello.clone())).await.unwrap();
        assert_eq!(bounded("receive", ws.receive()).await.unwrap(), hello);
        ws.cancel_with(1000, "done").unwrap();
        bounded("websocket's end", ws.result()).await.unwrap();
    }
    // A stream task.
    let stream = session.stream_task("127.0.0.1", echo.port()).unwrap();
    stream.resume();
    bounded("write", stream.write_all(b"ping")).await.unwrap();
    let read = bounded("read", stream.read_some(4, 4)).await.unwrap();
    assert_eq!(read.as_deref(), Some(&b"ping"[..]));
    stream.close_write();
    stream.close_read();
    bounded("stream's end", stream.result()).await.unwrap();

    // One connect per connection, each through the transport: kept-alive exchanges reused
    // theirs.
    let at = |stage: &Stage| format!("127.0.0.1:{}", stage.addr().port());
    let expected = [
        at(&plain),
        at(&secure),
        at(&plain),
        at(&secure),
        format!("127.0.0.1:{}", echo.port()),
    ];
    assert_eq!(transport.connects(), expected);
    // The stage counts its raw listeners' connections with its own.
    assert_eq!(plain.accepted() + secure.accepted(), 5);

    session.finish_tasks_and_invalidate();
    bounded("invalidation", session.invalidated()).await;
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    for stage in [&plain, &secure] {
        assert!(
            stage.wait_all_closed(PATIENCE).await,
            "R4: the stage still has {} open",
            stage.open()
        );
    }
    assert!(
        plain.wait_until(|s| s.raw_closed() == 1, PATIENCE).await,
        "R4: the stream's connection was not closed"
    );
}

#[tokio::test]
async fn a_transport_that_cannot_connect_fails_the_task_with_a_typed_error() {
    let refused = Configuration::builder()
        .transport(Failing(io::ErrorKind::ConnectionRefused))
        .build()
        .unwrap();
    let session = Session::new(refused, None);
    let result = bounded(
        "data",
        session.data(get("http://nowhere.test:8080/".into())),
    )
    .await;
    match result {
        Err(Error::ConnectionRefused { addr }) => assert_eq!(addr, "nowhere.test:8080"),
        other => panic!("expected a refused connection to nowhere.test:8080: {other:?}"),
    }

    let unreachable = Configuration::builder()
        .transport(Failing(io::ErrorKind::PermissionDenied))
        .build()
        .unwrap();
    let session = Session::new(unreachable, None);
    let result = bounded("data", session.data(get("https://nowhere.test/".into()))).await;
    match result {
        Err(Error::Io(error)) => assert_eq!(error.kind(), io::ErrorKind::PermissionDenied),
        other => panic!("expected the transport's io error: {other:?}"),
    }
    let stream = session.stream_task("nowhere.test", 7).unwrap();
    stream.resume();
    match bounded("stream's end", stream.result()).await {
        Err(Error::Io(error)) => assert_eq!(error.kind(), io::ErrorKind::PermissionDenied),
        other => panic!("expected the transport's io error: {other:?}"),
    }
}

#[test]
fn tcp_is_the_default_and_plugging_it_keeps_the_direct_path() {
    let shown = |config: &Configuration| format!("{config:?}");
    assert!(shown(&Configuration::default()).contains("transport: Tcp"));
    let tcp = Configuration::builder().transport(Tcp).build().unwrap();
    assert!(shown(&tcp).contains("transport: Tcp"));
    let other = Configuration::builder()
        .transport(Recording::default())
        .build()
        .unwrap();
    assert!(shown(&other).contains("transport: Recording"));
}
