//! Websocket tasks against the stage's `/ws/...` scripts: echo, the server's close, a refused
//! upgrade, TCP dropped without a close frame, pings that can never be answered, and the seed's
//! leak 2: a websocket cancelled with a close code in a session finished and invalidated, its
//! peer silent, must still complete within the close timeout and release everything (R11, R4,
//! R3). Every wait is bounded; the one bound on time is R11's, with generous slack.

use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leakproof::{
    CloseCode, Configuration, Delegate, Error, Message, Session, SessionState, TaskId, TaskInfo,
    TaskKind, TaskState, Timeout, WebSocketTask,
};
use leakproof_check::stage::{self, Stage, WsMessage};

/// What the delegate heard about one task.
#[derive(Debug, Clone)]
enum Heard {
    Open(Option<String>),
    Close(u16, String),
    Complete(Result<(), Error>),
}

#[derive(Default)]
struct Recorder {
    heard: Mutex<Vec<(TaskId, Heard)>>,
    invalid: Mutex<u32>,
}

impl Delegate for Recorder {
    fn did_open(&self, task: &TaskInfo, protocol: Option<&str>) {
        assert_eq!(task.kind, TaskKind::WebSocket);
        let protocol = protocol.map(str::to_owned);
        self.heard
            .lock()
            .unwrap()
            .push((task.id, Heard::Open(protocol)));
    }

    fn did_close(&self, task: &TaskInfo, code: CloseCode, reason: &str) {
        let heard = Heard::Close(code.get(), reason.to_owned());
        self.heard.lock().unwrap().push((task.id, heard));
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        self.heard
            .lock()
            .unwrap()
            .push((task.id, Heard::Complete(result)));
    }

    fn did_become_invalid(&self) {
        *self.invalid.lock().unwrap() += 1;
    }
}

impl Recorder {
    /// What was heard about `task`, in order.
    fn of(&self, task: TaskId) -> Vec<Heard> {
        let heard = self.heard.lock().unwrap();
        heard
            .iter()
            .filter(|(id, _)| *id == task)
            .map(|(_, heard)| heard.clone())
            .collect()
    }

    async fn opened(&self, task: TaskId) {
        eventually("did_open", || {
            self.of(task).iter().any(|h| matches!(h, Heard::Open(_)))
        })
        .await;
    }

    async fn completed(&self, task: TaskId) -> Vec<Heard> {
        eventually("did_complete", || {
            self.of(task)
                .iter()
                .any(|h| matches!(h, Heard::Complete(_)))
        })
        .await;
        self.of(task)
    }
}

fn delegated(config: Configuration) -> (Session, Arc<Recorder>, Weak<Recorder>) {
    let delegate = Arc::new(Recorder::default());
    let weak = Arc::downgrade(&delegate);
    let session = Session::new(config, Some(delegate.clone()));
    (session, delegate, weak)
}

/// Finish and invalidate; check R3 and R4 with the witnesses.
async fn teardown(session: Session, delegate: Arc<Recorder>, weak: Weak<Recorder>, stage: &Stage) {
    session.finish_tasks_and_invalidate();
    bounded("invalidation", session.invalidated()).await;
    assert_eq!(session.state(), SessionState::Invalidated);
    assert_eq!(*delegate.invalid.lock().unwrap(), 1, "R2");
    let ledger = session.resources();
    assert!(ledger.is_zero(), "R4: {ledger:?}");
    drop(delegate);
    assert!(weak.upgrade().is_none(), "R3: the delegate is dropped");
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R4: {} open",
        stage.open()
    );
}

#[tokio::test]
async fn a_websocket_echoes_messages_and_pings_then_closes_with_our_code() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    assert_eq!(ws.state(), TaskState::Suspended);
    // Sent before it opens: it waits for the open.
    bounded("send", ws.send(Message::Text("hello".into())))
        .await
        .unwrap();
    ws.resume();
    assert_eq!(
        bounded("receive", ws.receive()).await.unwrap(),
        Message::Text("hello".into())
    );
    let binary = Message::Binary(Bytes::from(stage::body(100_000)));
    bounded("send", ws.send(binary.clone())).await.unwrap();
    assert_eq!(bounded("receive", ws.receive()).await.unwrap(), binary);
    bounded("ping", ws.ping()).await.unwrap();
    assert_eq!(ws.try_receive().unwrap(), None);

    ws.cancel_with(1000, "done").unwrap();
    assert_eq!(ws.close_code(), Some(CloseCode::from(1000)));
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.as_slice(),
            [Heard::Open(None), Heard::Close(1000, reason), Heard::Complete(Ok(()))]
                if reason == "done"
        ),
        "{heard:?}"
    );
    assert_eq!(ws.state(), TaskState::Completed);
    assert!(matches!(ws.receive().await, Err(Error::Closed(_))));
    assert!(matches!(ws.ping().await, Err(Error::Closed(_))));
    assert_eq!(stage.ws_upgrades(), 1);
    assert_eq!(stage.ws_messages_received(), 2);
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert!(stage.wait_all_closed(PATIENCE).await);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn the_servers_close_is_recorded_with_its_code_and_reason() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let request = http::Request::get(stage.ws_url("/ws/close?after=1&code=4001&reason=bye%20now"))
        .header("x-test", "1")
        .body(())
        .unwrap();
    let ws = session.websocket_task(request, &["chat"]).unwrap();
    ws.resume();
    bounded("send", ws.send(Message::Text("one".into())))
        .await
        .unwrap();
    assert_eq!(
        bounded("receive", ws.receive()).await.unwrap(),
        Message::Text("one".into())
    );
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.as_slice(),
            [Heard::Open(None), Heard::Close(4001, reason), Heard::Complete(Ok(()))]
                if reason == "bye now"
        ),
        "{heard:?}"
    );
    assert_eq!(ws.close_code(), Some(CloseCode::from(4001)));
    assert_eq!(ws.close_reason().as_deref(), Some("bye now"));
    assert!(matches!(ws.receive().await, Err(Error::Closed(_))));
    // Our answer reached the server before the socket closed.
    assert!(
        stage
            .wait_until(|s| s.ws_close_frames_received() == 1, PATIENCE)
            .await
    );
    teardown(session, delegate, weak, &stage).await;
}

/// How a websocket ends when its peer's close frame carries `payload`.
enum Ends {
    /// `did_close(code, reason)`, then success.
    Closed(u16, &'static str),
    /// No `did_close`: a protocol error whose message has this in it.
    Violation(&'static str),
}

type Case = (&'static [u8], Ends, Option<Option<u16>>);

#[tokio::test]
async fn a_peer_close_with_an_invalid_code_is_a_protocol_error() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    // (the close frame's payload, how the websocket ends, the code of our answering close:
    // `None` for none, `Some(None)` for one without a code)
    let cases: [Case; 11] = [
        (&[0x03, 0xe7], Ends::Violation("999"), Some(Some(1002))),
        (&[0x03, 0xed], Ends::Violation("1005"), Some(Some(1002))),
        (
            &[0x03, 0xee, b'x'],
            Ends::Violation("1006"),
            Some(Some(1002)),
        ),
        (&[0x03, 0xf8], Ends::Violation("1016"), Some(Some(1002))),
        (&[0x13, 0x88], Ends::Violation("5000"), Some(Some(1002))),
        (&[0x03], Ends::Violation("1 byte"), None),
        (&[0x0f, 0xa0, 0xff, 0xfe], Ends::Violation("UTF-8"), None),
        // The contrast: codes a peer may send, none at all, and a peer that sends 1002 itself.
        (&[0x03, 0xe8], Ends::Closed(1000, ""), Some(Some(1000))),
        (
            &[0x0f, 0xa0, b'b', b'y', b'e'],
            Ends::Closed(4000, "bye"),
            Some(Some(4000)),
        ),
        (&[], Ends::Closed(1005, ""), Some(None)),
        (
            b"\x03\xeaProtocol violation",
            Ends::Closed(1002, "Protocol violation"),
            Some(Some(1002)),
        ),
    ];
    for (i, (payload, ends, answer)) in cases.into_iter().enumerate() {
        let key = format!("close{i}");
        let ws = session
            .websocket_task(stage.ws_url(&format!("/ws/hold/{key}")), &[])
            .unwrap();
        ws.resume();
        let mut held = bounded("held", stage.held_ws(&key, PATIENCE))
            .await
            .unwrap();
        delegate.opened(ws.id()).await;
        held.close_with_payload(payload).await.unwrap();
        let heard = delegate.completed(ws.id()).await;
        let case = format!("close payload {payload:02x?}: {heard:?}");
        match ends {
            Ends::Closed(code, reason) => {
                assert!(
                    matches!(
                        heard.as_slice(),
                        [Heard::Open(None), Heard::Close(c, r), Heard::Complete(Ok(()))]
                            if *c == code && r == reason
                    ),
                    "{case}"
                );
                assert_eq!(ws.close_code(), Some(CloseCode::from(code)), "{case}");
            }
            Ends::Violation(named) => {
                assert!(
                    matches!(
                        heard.as_slice(),
                        [Heard::Open(None), Heard::Complete(Err(Error::WebSocketProtocol(why)))]
                            if why.contains(named)
                    ),
                    "{case}"
                );
                assert_eq!(ws.close_code(), None, "{case}");
            }
        }
        // Our answer, if any, reached the peer; then the socket is closed.
        let answered = match held.expect_message(PATIENCE).await {
            Some(WsMessage::Close(frame)) => Some(frame.map(|f| u16::from(f.code))),
            None => None,
            Some(other) => panic!("{case}: the client sent {other:?}"),
        };
        assert_eq!(answered, answer, "{case}");
        assert!(
            stage
                .wait_until(|s| s.closed() == i as u64 + 1, PATIENCE)
                .await,
            "{case}: {} open",
            stage.open()
        );
        assert!(!held.liveness().is_open(), "{case}");
    }

    // The peer's answer to our close is held to the same rules.
    let ws = session
        .websocket_task(stage.ws_url("/hold/answer"), &[])
        .unwrap();
    ws.resume();
    let held = bounded("held", stage.held("answer", PATIENCE))
        .await
        .unwrap();
    let mut held = held.upgrade().await.unwrap();
    delegate.opened(ws.id()).await;
    ws.cancel_with(1000, "done").unwrap();
    let ours = held.expect_message(PATIENCE).await;
    assert!(matches!(ours, Some(WsMessage::Close(Some(_)))), "{ours:?}");
    held.close_with_payload(&[0x03, 0xe7]).await.unwrap();
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.as_slice(),
            [Heard::Open(None), Heard::Complete(Err(Error::WebSocketProtocol(why)))]
                if why.contains("999")
        ),
        "answering our close with 999: {heard:?}"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "{} open",
        stage.open()
    );
    drop(held);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn a_refused_upgrade_is_only_did_complete_with_the_status() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/refuse?status=403"), &[])
        .unwrap();
    ws.resume();
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.as_slice(),
            [Heard::Complete(Err(Error::NoUpgrade { status: 403 }))]
        ),
        "no did_open, no did_close: {heard:?}"
    );
    assert!(matches!(
        ws.receive().await,
        Err(Error::NoUpgrade { status: 403 })
    ));
    assert_eq!(stage.ws_upgrades(), 0);
    assert!(stage.wait_all_closed(PATIENCE).await, "R5: not pooled");
    teardown(session, delegate, weak, &stage).await;
}

/// R7: a websocket suspended while its upgrade is answered hears nothing, and holds its
/// connection, until it is resumed (found by the model-vs-client suite).
#[tokio::test]
async fn a_suspended_websocket_hears_of_a_refused_upgrade_once_resumed() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/refuse?status=503"), &[])
        .unwrap();
    ws.resume();
    ws.suspend();
    assert!(stage.wait_until(|s| s.requests() == 1, PATIENCE).await);
    // The refusal is written; give it time to arrive, then check nothing was made of it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ws.state(), TaskState::Suspended);
    assert!(
        delegate.of(ws.id()).is_empty(),
        "R7: nothing heard while suspended"
    );
    assert_eq!(stage.open(), 1, "the connection is held meanwhile");
    assert_eq!(session.resources().open_connections, 1);

    ws.resume();
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.as_slice(),
            [Heard::Complete(Err(Error::NoUpgrade { status: 503 }))]
        ),
        "{heard:?}"
    );
    assert!(stage.wait_all_closed(PATIENCE).await);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn tcp_dropped_without_a_close_frame_is_an_error() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    for (script, echoed) in [("/ws/drop", 0), ("/ws/drop?after=1&reset=1", 1)] {
        let ws = session.websocket_task(stage.ws_url(script), &[]).unwrap();
        ws.resume();
        bounded("send", ws.send(Message::Text("x".into())))
            .await
            .unwrap();
        // A message nobody takes stops the reading (one at a time): take the echo, and the
        // reset behind it is read.
        for _ in 0..echoed {
            let echo = bounded("receive", ws.receive()).await.unwrap();
            assert_eq!(echo, Message::Text("x".into()));
        }
        let heard = delegate.completed(ws.id()).await;
        assert!(
            matches!(
                heard.as_slice(),
                [
                    Heard::Open(None),
                    Heard::Complete(Err(Error::ConnectionReset))
                ]
            ),
            "{script}: {heard:?}"
        );
        assert_eq!(ws.close_code(), None);
    }
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn the_servers_ping_is_answered_while_the_client_sends_nothing() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/hold/pinged"), &[])
        .unwrap();
    ws.resume();
    let mut held = stage.held_ws("pinged", PATIENCE).await.expect("upgraded");
    delegate.opened(ws.id()).await;
    for payload in [&b"one"[..], b"two"] {
        held.ping(payload).await.unwrap();
        // Nothing of the client's own goes out to carry the pong along.
        let got = held.expect_message(PATIENCE).await;
        assert!(
            matches!(&got, Some(WsMessage::Pong(p)) if p.as_ref() == payload),
            "{got:?}"
        );
    }
    assert_eq!(ws.state(), TaskState::Running);
    ws.cancel();
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn a_ping_outstanding_when_the_server_goes_fails_and_never_hangs() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/hold/ping"), &[])
        .unwrap();
    ws.resume();
    let mut held = stage.held_ws("ping", PATIENCE).await.expect("upgraded");
    delegate.opened(ws.id()).await;
    held.silent().await.unwrap(); // no pong will ever come
    let (pinged, ()) = bounded("the ping", async {
        tokio::join!(ws.ping(), async move {
            let got = held.expect_message(PATIENCE).await;
            assert!(matches!(got, Some(WsMessage::Ping(_))), "{got:?}");
            held.drop_tcp().await.unwrap();
        })
    })
    .await;
    assert!(matches!(pinged, Err(Error::ConnectionReset)), "{pinged:?}");
    let heard = delegate.completed(ws.id()).await;
    assert!(
        matches!(
            heard.last(),
            Some(Heard::Complete(Err(Error::ConnectionReset)))
        ),
        "{heard:?}"
    );
    teardown(session, delegate, weak, &stage).await;
}

/// Leak 2's seed: cancel with a close code, finish and invalidate, and the peer never answers.
#[tokio::test]
async fn cancel_with_against_a_silent_peer_invalidates_within_the_close_timeout() {
    let close_timeout = Duration::from_millis(300);
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .close_timeout(close_timeout)
        .build()
        .unwrap();
    let (session, delegate, weak) = delegated(config);
    let ws = session
        .websocket_task(stage.ws_url("/ws/silent"), &[])
        .unwrap();
    ws.resume();
    delegate.opened(ws.id()).await;

    ws.cancel_with(1001, "going away").unwrap();
    assert_eq!(ws.state(), TaskState::Canceling);
    assert!(matches!(ws.receive().await, Err(Error::Closed(_))));
    session.finish_tasks_and_invalidate();
    let began = Instant::now();
    bounded("R11: invalidation", session.invalidated()).await;
    let took = began.elapsed();
    println!(
        "seed websocket (cancel_with 1001, finish_tasks_and_invalidate, silent peer): \
         Invalidated {took:.2?} after finish_tasks_and_invalidate, close timeout {close_timeout:?}"
    );
    // R11: bounded by the close timeout. The slack is generous (slow machines); the default
    // close timeout (5 s) would still fail this.
    assert!(
        took < close_timeout + Duration::from_millis(2500),
        "R11: invalidated after {took:?}"
    );
    let heard = delegate.of(ws.id());
    assert!(
        matches!(
            heard.as_slice(),
            [
                Heard::Open(None),
                Heard::Complete(Err(Error::TimedOut(Timeout::Close)))
            ]
        ),
        "{heard:?}"
    );
    assert_eq!(ws.close_code(), Some(CloseCode::from(1001)));
    assert_eq!(ws.close_reason().as_deref(), Some("going away"));
    assert_eq!(
        stage.ws_close_frames_received(),
        1,
        "our close frame went out"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R11: the connection is closed"
    );
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn dropping_an_open_websocket_closes_it_going_away() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let ws = session
        .websocket_task(stage.ws_url("/ws/hold/bye"), &[])
        .unwrap();
    ws.resume();
    let mut held = stage.held_ws("bye", PATIENCE).await.expect("upgraded");
    delegate.opened(ws.id()).await;
    let id = ws.id();
    drop(ws);
    let got = held.expect_message(PATIENCE).await;
    match got {
        Some(WsMessage::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame with 1001: {other:?}"),
    }
    let heard = delegate.completed(id).await;
    assert!(
        matches!(
            heard.as_slice(),
            [
                Heard::Open(None),
                Heard::Close(1001, _),
                Heard::Complete(Ok(()))
            ]
        ),
        "{heard:?}"
    );
    let liveness = held.liveness();
    eventually("closed", || !liveness.is_open()).await;
    drop(held);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn messages_are_received_one_at_a_time_and_bounded_in_size() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .max_message_size(1024)
        .build()
        .unwrap();
    let (session, delegate, weak) = delegated(config);

    // Two messages offered; try_receive does not wait.
    let ws = session
        .websocket_task(stage.ws_url("/ws/send?count=2&size=10"), &[])
        .unwrap();
    assert_eq!(ws.try_receive().unwrap(), None, "suspended: nothing yet");
    ws.resume();
    let ten = Message::Binary(Bytes::from(stage::body(10)));
    let first = bounded("try_receive", async {
        loop {
            if let Some(message) = ws.try_receive().unwrap() {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(first, ten);
    assert_eq!(bounded("receive", ws.receive()).await.unwrap(), ten);
    let ledger = session.resources();
    assert!(
        ledger.peak_buffered_bytes <= 20,
        "one message at a time: {ledger:?}"
    );

    // Too large to send: refused, the websocket goes on.
    let large = Message::Binary(Bytes::from(vec![0u8; 2048]));
    let error = ws.send(large).await.unwrap_err();
    assert!(matches!(error, Error::WebSocketProtocol(_)), "{error}");
    bounded("send", ws.send(Message::Text("small".into())))
        .await
        .unwrap();
    assert_eq!(
        bounded("receive", ws.receive()).await.unwrap(),
        Message::Text("small".into())
    );
    ws.cancel();
    assert_eq!(ws.state(), TaskState::Completed);

    // Too large to receive: the websocket fails with a typed error.
    let large = session
        .websocket_task(stage.ws_url("/ws/send?count=1&size=4096"), &[])
        .unwrap();
    large.resume();
    let heard = delegate.completed(large.id()).await;
    assert!(
        matches!(
            heard.last(),
            Some(Heard::Complete(Err(Error::WebSocketProtocol(_))))
        ),
        "{heard:?}"
    );
    drop((ws, large));
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn bad_websocket_urls_and_late_tasks_are_refused() {
    let (session, delegate, weak) = delegated(Configuration::default());
    for url in ["ftp://example.com/", "/relative"] {
        let error = session.websocket_task(url, &[]).unwrap_err();
        assert!(matches!(error, Error::InvalidUrl { .. }), "{url}: {error}");
    }
    let post = http::Request::post("ws://127.0.0.1:1/").body(()).unwrap();
    assert!(session.websocket_task(post, &[]).is_err());
    let error = session
        .websocket_task("ws://127.0.0.1:1/", &["not a token"])
        .unwrap_err();
    assert!(matches!(error, Error::WebSocketProtocol(_)), "{error}");
    assert_eq!(session.resources().live_tasks, 0);

    session.finish_tasks_and_invalidate();
    // R8: nothing is created once invalidation has begun.
    assert!(matches!(
        session.websocket_task("ws://127.0.0.1:1/", &[]),
        Err(Error::SessionInvalidated)
    ));
    assert!(matches!(
        session.stream_task("127.0.0.1", 1),
        Err(Error::SessionInvalidated)
    ));
    let stage = Stage::start().await.unwrap();
    teardown(session, delegate, weak, &stage).await;
}

/// `WebSocketTask` is `Send` and `Sync`: a websocket can be shared between tasks.
#[allow(dead_code)]
fn websocket_tasks_are_send_and_sync(ws: WebSocketTask) -> impl Send + Sync {
    ws
}
