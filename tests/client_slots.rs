//! Per-host connection slots: `max_connections_per_host` bounds a host's HTTP exchanges (busy
//! and pooled connections). A websocket and a direct stream each hold a connection of their own
//! for life and take no slot, so a host with open websockets and streams still serves its
//! requests, and more websockets. Every wait is bounded.

use std::time::Duration;

use leakproof::{Configuration, Message, Session, TaskState};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::{RawScript, Stage};

const OP: Duration = Duration::from_secs(5);

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// F4: with one slot per host, three open websockets and two open streams to the host leave
/// that slot to the HTTP exchanges: a convenience, a delegate-less data task, and a fourth
/// websocket all go through at once.
#[tokio::test]
async fn open_websockets_and_streams_leave_the_hosts_http_slots_free() {
    let stage = Stage::start().await.unwrap();
    let echo = stage.listen_raw(RawScript::echo()).await.unwrap();
    let config = Configuration::builder()
        .max_connections_per_host(1)
        .request_timeout(OP)
        .build()
        .unwrap();
    let session = Session::new(config, None);

    let mut websockets = Vec::new();
    for i in 0..4 {
        let ws = session
            .websocket_task(stage.ws_url("/ws/echo"), &[])
            .unwrap();
        ws.resume();
        ws.send(Message::Text(format!("hello {i}"))).await.unwrap();
        let echoed = bounded("the echo", ws.receive()).await;
        assert_eq!(
            echoed.unwrap(),
            Message::Text(format!("hello {i}")),
            "websocket {i} opened and echoed"
        );
        websockets.push(ws);
    }
    let mut streams = Vec::new();
    for i in 0..2 {
        let stream = session.stream_task("127.0.0.1", echo.port()).unwrap();
        stream.resume();
        stream.write(b"ping", OP).await.unwrap();
        let read = bounded("the stream's echo", stream.read(4, 4, OP)).await;
        assert_eq!(read.unwrap().as_deref(), Some(&b"ping"[..]), "stream {i}");
        streams.push(stream);
    }

    let response = bounded("a request to a host whose websockets are open", async {
        session.data(get(stage.url("/bytes/100"))).await
    })
    .await
    .expect("the HTTP slot is free");
    assert_eq!(response.body().len(), 100);
    let task = session.data_task(get(stage.url("/bytes/10"))).unwrap();
    task.resume();
    leakproof_check::scenario::eventually("the data task completes", || {
        task.state() == TaskState::Completed
    })
    .await;

    for ws in &websockets {
        assert_eq!(ws.state(), TaskState::Running, "the websockets stay open");
    }
    drop((websockets, streams, task));
    session.invalidate_and_cancel();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(PATIENCE).await, "R4");
}
