//! The stage's websocket endpoint against a real websocket client (tokio-tungstenite over a
//! loopback socket): each script, the held websocket's steps, an upgrade the test answers
//! (manual mode), and the counts.

use std::io;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use leakproof_check::stage::{HeldWs, Stage, WsMessage, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws = WebSocketStream<TcpStream>;

/// Every await that touches a socket is bounded by this.
const LIMIT: Duration = Duration::from_secs(5);
/// How long a peer that should answer is given before its silence counts.
const SILENCE: Duration = Duration::from_millis(300);

async fn bounded<F: Future>(fut: F) -> F::Output {
    timeout(LIMIT, fut)
        .await
        .expect("the socket did not answer within 5 s")
}

async fn open(stage: &Stage, path: &str) -> Result<Ws, WsError> {
    let tcp = bounded(TcpStream::connect(stage.addr())).await?;
    let (ws, response) = bounded(tokio_tungstenite::client_async(stage.ws_url(path), tcp)).await?;
    assert_eq!(response.status(), 101);
    Ok(ws)
}

async fn connect(stage: &Stage, path: &str) -> Ws {
    open(stage, path).await.expect("the upgrade failed")
}

/// The next message; panics on an error or the end.
async fn next(ws: &mut Ws) -> WsMessage {
    bounded(ws.next())
        .await
        .expect("the websocket ended")
        .expect("the websocket failed")
}

/// The next data message, skipping pongs.
async fn next_data(ws: &mut Ws) -> WsMessage {
    loop {
        match next(ws).await {
            WsMessage::Pong(_) => {}
            message => return message,
        }
    }
}

fn close_frame(message: &WsMessage) -> Option<(u16, String)> {
    match message {
        WsMessage::Close(Some(frame)) => Some((frame.code.into(), frame.reason.to_string())),
        _ => None,
    }
}

async fn all_closed(stage: &Stage) {
    assert!(
        stage.wait_all_closed(LIMIT).await,
        "{} of {} sockets still open",
        stage.open(),
        stage.accepted()
    );
}

#[tokio::test]
async fn echo_echoes_answers_pings_and_closes_after_the_close_handshake() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/echo").await;
    bounded(ws.send(WsMessage::text("hello"))).await.unwrap();
    assert_eq!(next_data(&mut ws).await, WsMessage::text("hello"));
    bounded(ws.send(WsMessage::binary(vec![1, 2, 3])))
        .await
        .unwrap();
    assert_eq!(next_data(&mut ws).await, WsMessage::binary(vec![1, 2, 3]));
    bounded(ws.send(WsMessage::Ping(b"p".to_vec().into())))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::Pong(b"p".to_vec().into()));

    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    bounded(ws.close(Some(bye))).await.unwrap();
    let reply = next(&mut ws).await;
    assert_eq!(close_frame(&reply), Some((1000, "bye".to_owned())));
    // The stage closes TCP after its close reply: the client's stream ends cleanly.
    assert!(bounded(ws.next()).await.is_none());
    all_closed(&stage).await;
    assert_eq!(stage.accepted(), 1);
    assert_eq!(stage.ws_upgrades(), 1);
    assert_eq!(stage.ws_messages_received(), 2);
    assert_eq!(stage.ws_close_frames_received(), 1);
}

#[tokio::test]
async fn close_sends_the_code_and_reason_and_waits_for_the_reply() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/close?after=1&code=4001&reason=going%20away").await;
    bounded(ws.send(WsMessage::text("one"))).await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::text("one"));
    let close = next(&mut ws).await;
    assert_eq!(close_frame(&close), Some((4001, "going away".to_owned())));
    // tungstenite replies on the next read, then the stage closes TCP.
    assert!(bounded(ws.next()).await.is_none());
    all_closed(&stage).await;
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert_eq!(stage.ws_messages_received(), 1);
}

#[tokio::test]
async fn close_gives_up_on_a_client_that_never_replies() {
    let stage = Stage::start().await.unwrap();
    // A client of raw bytes, which never answers the close frame.
    let (mut tcp, mut got) = raw_upgrade(&stage, "/ws/close?code=1001&wait_ms=100").await;
    // The stage waits a bounded time for the reply, then closes TCP anyway.
    bounded(tcp.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, [0x88, 2, 0x03, 0xe9]);
    all_closed(&stage).await;
    assert_eq!(stage.ws_close_frames_received(), 0);
}

#[tokio::test]
async fn drop_ends_tcp_without_a_close_frame() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/drop?after=1").await;
    bounded(ws.send(WsMessage::binary(vec![7; 10])))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::binary(vec![7; 10]));
    match bounded(ws.next()).await {
        Some(Err(WsError::Protocol(_) | WsError::Io(_))) | None => {}
        other => panic!("expected the stream to end without a close frame, got {other:?}"),
    }
    all_closed(&stage).await;
    assert_eq!(stage.ws_close_frames_received(), 0);
}

#[tokio::test]
async fn drop_with_reset_resets() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/drop?reset=1").await;
    match bounded(ws.next()).await {
        Some(Err(WsError::Io(e))) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected a reset, got {other:?}"),
    }
    all_closed(&stage).await;
}

#[tokio::test]
async fn silent_never_answers_a_close_and_leaves_tcp_to_the_client() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/silent").await;
    bounded(ws.send(WsMessage::text("anyone?"))).await.unwrap();
    bounded(ws.send(WsMessage::Ping(b"p".to_vec().into())))
        .await
        .unwrap();
    bounded(ws.close(None)).await.unwrap();
    // No pong, no echo, no close reply, no TCP close.
    assert!(timeout(SILENCE, ws.next()).await.is_err());
    assert!(
        stage
            .wait_until(|s| s.ws_close_frames_received() == 1, LIMIT)
            .await
    );
    assert_eq!(stage.ws_messages_received(), 1);
    assert_eq!(stage.open(), 1);
    // The client closes it.
    drop(ws);
    all_closed(&stage).await;
}

#[tokio::test]
async fn refuse_answers_without_upgrading() {
    let stage = Stage::start().await.unwrap();
    for (path, status) in [("/ws/refuse", 403), ("/ws/refuse?status=503", 503)] {
        match open(&stage, path).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), status);
                let body = response.body().as_deref().unwrap_or_default();
                assert!(!body.is_empty());
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
    all_closed(&stage).await;
    assert_eq!(stage.accepted(), 2);
    assert_eq!(stage.ws_upgrades(), 0);
}

#[tokio::test]
async fn send_sends_its_messages_then_echoes() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/send?count=3&size=100000").await;
    for _ in 0..3 {
        assert_eq!(next(&mut ws).await, WsMessage::binary(body(100_000)));
    }
    bounded(ws.send(WsMessage::text("back"))).await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::text("back"));
    bounded(ws.close(None)).await.unwrap();
    assert!(matches!(next(&mut ws).await, WsMessage::Close(_)));
    all_closed(&stage).await;
}

#[tokio::test]
async fn requests_that_are_not_upgrades_or_scripts_are_refused() {
    let stage = Stage::start().await.unwrap();
    match open(&stage, "/ws/nope").await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected a 404, got {:?}", other.map(|_| ())),
    }
    match open(&stage, "/ws/close?code=x").await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected a 400, got {:?}", other.map(|_| ())),
    }
    // A plain GET, no upgrade: 400, and the connection serves on.
    let mut tcp = bounded(TcpStream::connect(stage.addr())).await.unwrap();
    bounded(tcp.write_all(b"GET /ws/echo HTTP/1.1\r\nhost: stage\r\n\r\n"))
        .await
        .unwrap();
    let mut buf = vec![0; 1024];
    let n = bounded(tcp.read(&mut buf)).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 400"), "{:?}", &buf[..n]);
    drop(tcp);
    all_closed(&stage).await;
    assert_eq!(stage.ws_upgrades(), 0);
}

/// A masked client frame: FIN, `opcode`, `payload` (under 126 bytes).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// An upgrade request for `path` with RFC 6455's sample key.
fn upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nhost: stage\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes()
}

/// Reads a response head off `tcp`; the bytes after it.
async fn read_head(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            return (head, got.split_off(end + 4));
        }
        let n = bounded(tcp.read_buf(&mut got)).await.unwrap();
        assert_ne!(n, 0, "the stage closed before a head: {got:?}");
    }
}

/// Upgrades with raw bytes, for a client that does what no websocket client would.
async fn raw_upgrade(stage: &Stage, path: &str) -> (TcpStream, Vec<u8>) {
    let mut tcp = bounded(TcpStream::connect(stage.addr())).await.unwrap();
    bounded(tcp.write_all(&upgrade_request(path)))
        .await
        .unwrap();
    let (head, rest) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's sample key and its answer.
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    (tcp, rest)
}

#[tokio::test]
async fn frames_sent_right_behind_the_upgrade_request_are_read() {
    let stage = Stage::start().await.unwrap();
    let mut tcp = bounded(TcpStream::connect(stage.addr())).await.unwrap();
    let mut request = upgrade_request("/ws/echo");
    request.extend(client_frame(0x1, b"early"));
    bounded(tcp.write_all(&request)).await.unwrap();
    let (head, mut got) = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let echo = [0x81, 5, b'e', b'a', b'r', b'l', b'y'];
    while got.len() < echo.len() {
        let n = bounded(tcp.read_buf(&mut got)).await.unwrap();
        assert_ne!(n, 0, "the stage closed early: {got:?}");
    }
    assert_eq!(got, echo);
    drop(tcp);
    all_closed(&stage).await;
    assert_eq!(stage.ws_messages_received(), 1);
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_is_cut_off() {
    let stage = Stage::start().await.unwrap();
    // An unmasked frame, which a server must not accept.
    let mut ws = connect(&stage, "/ws/echo").await;
    bounded(ws.get_mut().write_all(&[0x81, 2, b'h', b'i']))
        .await
        .unwrap();
    let mut rest = Vec::new();
    // The stage may say why in a close frame; either way it closes TCP.
    let _ = bounded(ws.get_mut().read_to_end(&mut rest)).await;
    // A frame far over the size limit: refused from its header, nothing buffered.
    let mut ws = connect(&stage, "/ws/echo").await;
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[0; 4]);
    bounded(ws.get_mut().write_all(&huge)).await.unwrap();
    let _ = bounded(ws.get_mut().read_to_end(&mut rest)).await;
    all_closed(&stage).await;
    assert_eq!(stage.accepted(), 2);
    assert_eq!(stage.ws_messages_received(), 0);
}

#[tokio::test]
async fn held_steps_drive_the_websocket() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/hold/a").await;
    let mut held = stage.held_ws("a", LIMIT).await.unwrap();
    assert_eq!(held.target(), "/ws/hold/a");
    let live = held.liveness();

    held.send_binary(12).await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::binary(body(12)));
    held.send_text("hi").await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::text("hi"));

    bounded(ws.send(WsMessage::text("one"))).await.unwrap();
    bounded(ws.send(WsMessage::binary(vec![2; 3])))
        .await
        .unwrap();
    assert_eq!(
        held.expect_message(LIMIT).await,
        Some(WsMessage::text("one"))
    );
    assert_eq!(
        held.expect_message(LIMIT).await,
        Some(WsMessage::binary(vec![2; 3]))
    );
    assert_eq!(held.expect_message(Duration::from_millis(50)).await, None);

    // The stage's close; the client's reply ends it, and the stage closes TCP.
    held.close(4002, "done").await.unwrap();
    let close = next(&mut ws).await;
    assert_eq!(close_frame(&close), Some((4002, "done".to_owned())));
    assert!(bounded(ws.next()).await.is_none());
    let reply = held.expect_message(LIMIT).await.unwrap();
    assert_eq!(close_frame(&reply), Some((4002, "done".to_owned())));
    all_closed(&stage).await;
    assert!(!live.is_open());
    // Nothing more, and the steps know the connection is gone.
    assert_eq!(held.expect_message(LIMIT).await, None);
    let err = held.send_text("late").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert_eq!(stage.ws_messages_received(), 2);
    assert_eq!(stage.ws_close_frames_received(), 1);
}

#[tokio::test]
async fn a_held_websocket_answers_the_clients_close_by_default() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/hold/b").await;
    let mut held = stage.held_ws("b", LIMIT).await.unwrap();
    let bye = CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    };
    bounded(ws.close(Some(bye))).await.unwrap();
    let reply = next(&mut ws).await;
    assert_eq!(close_frame(&reply), Some((1001, "leaving".to_owned())));
    assert!(bounded(ws.next()).await.is_none());
    let got = held.expect_message(LIMIT).await.unwrap();
    assert_eq!(close_frame(&got), Some((1001, "leaving".to_owned())));
    all_closed(&stage).await;
    assert!(!held.liveness().is_open());
}

#[tokio::test]
async fn a_silenced_held_websocket_answers_nothing() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/hold/c").await;
    let mut held = stage.held_ws("c", LIMIT).await.unwrap();
    held.silent().await.unwrap();
    let err = held.send_text("no").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    bounded(ws.send(WsMessage::Ping(b"p".to_vec().into())))
        .await
        .unwrap();
    bounded(ws.close(None)).await.unwrap();
    assert!(timeout(SILENCE, ws.next()).await.is_err());
    // Still read, still queued.
    assert!(held.expect_message(LIMIT).await.unwrap().is_ping());
    assert!(held.expect_message(LIMIT).await.unwrap().is_close());
    assert_eq!(stage.open(), 1);
    assert!(held.liveness().is_open());
    drop(ws);
    all_closed(&stage).await;
    assert!(!held.liveness().is_open());
}

#[tokio::test]
async fn a_held_websocket_sends_any_close_payload_as_it_is() {
    let stage = Stage::start().await.unwrap();
    for (i, payload) in [
        &[0x03, 0xe7][..],         // 999: not a close code
        &[0x03, 0xed],             // 1005 on the wire: reserved
        &[0x03, 0xee, b'x'],       // 1006: reserved
        &[0x03],                   // a single byte
        &[0x0f, 0xa0, 0xff, 0xfe], // 4000, a reason that is not UTF-8
        &[],                       // no code
    ]
    .into_iter()
    .enumerate()
    {
        // A client of raw bytes: nothing of tungstenite's checks stands between.
        let (mut tcp, mut got) = raw_upgrade(&stage, "/ws/hold/raw").await;
        let held = stage.held_ws("raw", LIMIT).await.unwrap();
        held.close_with_payload(payload).await.unwrap();
        let mut frame = vec![0x88, payload.len() as u8];
        frame.extend_from_slice(payload);
        while got.len() < frame.len() {
            let n = bounded(tcp.read_buf(&mut got)).await.unwrap();
            assert_ne!(n, 0, "the stage closed early: {got:?}");
        }
        assert_eq!(got, frame);
        drop(tcp);
        // The client's end of TCP ends the held websocket.
        assert!(
            stage
                .wait_until(|s| s.closed() == i as u64 + 1, LIMIT)
                .await
        );
        assert!(!held.liveness().is_open());
    }
    let long = [0x03; 126];
    let (tcp, _) = raw_upgrade(&stage, "/ws/hold/long").await;
    let held = stage.held_ws("long", LIMIT).await.unwrap();
    let err = held.close_with_payload(&long).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    drop(tcp);
    all_closed(&stage).await;
}

#[tokio::test]
async fn held_drop_tcp_and_reset_return_once_the_close_is_counted() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/hold/d").await;
    let held = stage.held_ws("d", LIMIT).await.unwrap();
    let live = held.liveness();
    held.drop_tcp().await.unwrap();
    assert_eq!(stage.closed(), 1);
    assert!(!live.is_open());
    match bounded(ws.next()).await {
        Some(Err(_)) | None => {}
        other => panic!("expected the end without a close frame, got {other:?}"),
    }

    let mut ws = connect(&stage, "/ws/hold/d").await;
    let held = stage.held_ws("d", LIMIT).await.unwrap();
    held.reset().await.unwrap();
    assert_eq!(stage.closed(), 2);
    match bounded(ws.next()).await {
        Some(Err(WsError::Io(e))) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected a reset, got {other:?}"),
    }
    assert_eq!(stage.open(), 0);
}

#[tokio::test]
async fn dropping_a_held_websocket_closes_tcp_and_a_client_close_is_seen() {
    let stage = Stage::start().await.unwrap();
    let mut ws = connect(&stage, "/ws/hold/e").await;
    drop(stage.held_ws("e", LIMIT).await.unwrap());
    match bounded(ws.next()).await {
        Some(Err(_)) | None => {}
        other => panic!("expected the end, got {other:?}"),
    }
    all_closed(&stage).await;

    // The client drops TCP: the held websocket sees it, and its steps fail.
    let ws = connect(&stage, "/ws/hold/e").await;
    let held = stage.held_ws("e", LIMIT).await.unwrap();
    drop(ws);
    all_closed(&stage).await;
    assert!(!held.liveness().is_open());
    let err = held.send_binary(1).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert_eq!(stage.accepted(), 2);
}

// A websocket upgrade request to `/hold/KEY`, answered by the test: `Held::upgrade` (a held
// websocket in manual mode) or `Held::refuse_upgrade`.

/// A websocket client's handshake over a fresh socket, run aside while the test answers it.
fn handshake(
    stage: &Stage,
    request: impl IntoClientRequest + Unpin + Send + 'static,
) -> JoinHandle<Result<(Ws, Response), WsError>> {
    let addr = stage.addr();
    tokio::spawn(async move {
        let tcp = bounded(TcpStream::connect(addr)).await?;
        bounded(tokio_tungstenite::client_async(request, tcp)).await
    })
}

/// A client upgraded on `/hold/{key}` by the test, and the held websocket, in manual mode.
async fn upgraded(stage: &Stage, key: &str) -> (Ws, HeldWs) {
    let client = handshake(stage, stage.ws_url(&format!("/hold/{key}")));
    let held = stage.held(key, LIMIT).await.expect("no upgrade request");
    assert!(held.is_websocket_upgrade());
    let held = held.upgrade().await.expect("the upgrade");
    assert!(held.is_manual());
    let (ws, response) = bounded(client).await.unwrap().expect("the handshake");
    assert_eq!(response.status(), 101);
    (ws, held)
}

#[tokio::test]
async fn an_upgraded_held_request_is_a_manual_websocket() {
    let stage = Stage::start().await.unwrap();
    let (mut ws, mut held) = upgraded(&stage, "m").await;
    assert_eq!(held.target(), "/hold/m");
    assert_eq!(stage.ws_upgrades(), 1);

    held.send_binary(100).await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::binary(body(100)));
    held.send_text("hi").await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::text("hi"));
    // Nothing is echoed: what the client sends is the test's to read.
    bounded(ws.send(WsMessage::binary(vec![9; 4])))
        .await
        .unwrap();
    assert_eq!(
        held.expect_message(LIMIT).await,
        Some(WsMessage::binary(vec![9; 4]))
    );
    // Pings are still answered.
    bounded(ws.send(WsMessage::Ping(b"p".to_vec().into())))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::Pong(b"p".to_vec().into()));
    assert!(held.expect_message(LIMIT).await.unwrap().is_ping());
    assert!(timeout(SILENCE, ws.next()).await.is_err());

    drop(ws);
    all_closed(&stage).await;
    assert!(!held.liveness().is_open());
    let err = held.send_binary(1).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    assert_eq!((stage.accepted(), stage.closed()), (1, 1));
    assert_eq!(stage.ws_messages_received(), 1);
    assert_eq!(stage.ws_close_frames_received(), 0);
    assert_eq!(held.closes_received(), 0);
}

#[tokio::test]
async fn in_manual_mode_the_clients_close_waits_for_the_tests_answer() {
    let stage = Stage::start().await.unwrap();
    let (mut ws, mut held) = upgraded(&stage, "c").await;
    let live = held.liveness();
    let bye = CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    };
    bounded(ws.close(Some(bye))).await.unwrap();
    // No close reply, no TCP close.
    assert!(
        timeout(Duration::from_millis(200), ws.next())
            .await
            .is_err()
    );
    let got = held.expect_message(LIMIT).await.unwrap();
    assert_eq!(close_frame(&got), Some((1001, "leaving".to_owned())));
    assert_eq!(held.closes_received(), 1);
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert!(live.is_open());
    assert_eq!(stage.open(), 1);

    // The peer may still send before it answers.
    held.send_binary(5).await.unwrap();
    assert_eq!(next(&mut ws).await, WsMessage::binary(body(5)));

    // The answer: the client gets the close frame, and closes TCP itself.
    let client = tokio::spawn(async move {
        let reply = next(&mut ws).await;
        drop(ws);
        reply
    });
    held.close(1000, "").await.unwrap();
    // `close` returns once the client's TCP close is counted.
    assert!(!live.is_open());
    assert_eq!(stage.closed(), 1);
    let reply = bounded(client).await.unwrap();
    assert_eq!(close_frame(&reply), Some((1000, String::new())));
    all_closed(&stage).await;
    assert_eq!(stage.accepted(), 1);
    assert_eq!(stage.ws_upgrades(), 1);
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert_eq!(held.closes_received(), 1);
    assert_eq!(held.expect_message(LIMIT).await, None);
}

#[tokio::test]
async fn in_manual_mode_the_stage_may_close_first() {
    let stage = Stage::start().await.unwrap();
    let (mut ws, mut held) = upgraded(&stage, "f").await;
    let client = tokio::spawn(async move {
        let close = next(&mut ws).await;
        // tungstenite queued its reply: send it, then close TCP.
        bounded(ws.flush()).await.unwrap();
        drop(ws);
        close
    });
    held.close(4000, "bye").await.unwrap();
    assert!(!held.liveness().is_open());
    let close = bounded(client).await.unwrap();
    assert_eq!(close_frame(&close), Some((4000, "bye".to_owned())));
    let reply = held.expect_message(LIMIT).await.unwrap();
    assert_eq!(close_frame(&reply), Some((4000, "bye".to_owned())));
    assert_eq!(held.closes_received(), 1);
    all_closed(&stage).await;
    assert_eq!(stage.ws_close_frames_received(), 1);
    let err = held.close(1000, "").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotConnected);
}

#[tokio::test]
async fn a_manual_websocket_is_dropped_or_reset_by_the_test_only() {
    let stage = Stage::start().await.unwrap();
    let (mut ws, held) = upgraded(&stage, "d").await;
    held.drop_tcp().await.unwrap();
    assert_eq!(stage.closed(), 1);
    match bounded(ws.next()).await {
        Some(Err(_)) | None => {}
        other => panic!("expected the end without a close frame, got {other:?}"),
    }

    let (mut ws, held) = upgraded(&stage, "d").await;
    held.reset().await.unwrap();
    match bounded(ws.next()).await {
        Some(Err(WsError::Io(e))) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected a reset, got {other:?}"),
    }
    all_closed(&stage).await;
    assert_eq!((stage.accepted(), stage.closed()), (2, 2));
    assert_eq!(stage.ws_upgrades(), 2);
}

#[tokio::test]
async fn refuse_upgrade_answers_a_plain_status() {
    let stage = Stage::start().await.unwrap();
    let client = handshake(&stage, stage.ws_url("/hold/r"));
    let held = stage.held("r", LIMIT).await.unwrap();
    let live = held.liveness();
    held.refuse_upgrade(403).await.unwrap();
    match bounded(client).await.unwrap() {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 403);
            assert!(!response.body().as_deref().unwrap_or_default().is_empty());
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // The client gave up on the socket: the close is its own.
    all_closed(&stage).await;
    assert!(!live.is_open());
    assert_eq!(stage.accepted(), 1);
    assert_eq!(stage.ws_upgrades(), 0);

    // Only a status that is a complete answer.
    let client = handshake(&stage, stage.ws_url("/hold/r"));
    let held = stage.held("r", LIMIT).await.unwrap();
    let err = held.refuse_upgrade(101).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(bounded(client).await.unwrap().is_err());
    all_closed(&stage).await;
}

#[tokio::test]
async fn upgrade_on_a_request_that_is_no_upgrade_is_invalid_input() {
    let stage = Stage::start().await.unwrap();
    let mut tcp = bounded(TcpStream::connect(stage.addr())).await.unwrap();
    bounded(tcp.write_all(b"GET /hold/p HTTP/1.1\r\nhost: stage\r\n\r\n"))
        .await
        .unwrap();
    let held = stage.held("p", LIMIT).await.unwrap();
    assert!(!held.is_websocket_upgrade());
    let err = held.upgrade().await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not a websocket upgrade"), "{err}");
    // The handle is gone: the connection is closed without a byte.
    let mut got = Vec::new();
    bounded(tcp.read_to_end(&mut got)).await.unwrap();
    assert!(got.is_empty(), "{got:?}");
    all_closed(&stage).await;
    assert_eq!(stage.ws_upgrades(), 0);
}

#[tokio::test]
async fn a_held_upgrade_request_can_still_be_answered_as_plain_http() {
    let stage = Stage::start().await.unwrap();
    // A reset before the upgrade's answer.
    let client = handshake(&stage, stage.ws_url("/hold/h"));
    stage.held("h", LIMIT).await.unwrap().reset().await.unwrap();
    assert!(bounded(client).await.unwrap().is_err());
    // A plain head: then it is too late to upgrade.
    let client = handshake(&stage, stage.ws_url("/hold/h"));
    let held = stage.held("h", LIMIT).await.unwrap();
    held.head(503, false, Some(0)).await.unwrap();
    let err = held.upgrade().await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    match bounded(client).await.unwrap() {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected the 503, got {:?}", other.map(|_| ())),
    }
    all_closed(&stage).await;
    assert_eq!((stage.accepted(), stage.ws_upgrades()), (2, 0));
}

#[tokio::test]
async fn upgrade_echoes_the_first_offered_protocol() {
    let stage = Stage::start().await.unwrap();
    let mut request = stage.ws_url("/hold/s").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
    let client = handshake(&stage, request);
    let held = stage.held("s", LIMIT).await.unwrap();
    let _held = held.upgrade().await.unwrap();
    let (ws, response) = bounded(client).await.unwrap().expect("the handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    drop(ws);
    all_closed(&stage).await;
}

#[tokio::test]
async fn a_manual_websocket_reads_frames_sent_behind_the_request_and_withholds_their_close() {
    let stage = Stage::start().await.unwrap();
    // A raw client: a message and a close right behind its upgrade request, then more bytes.
    let mut tcp = bounded(TcpStream::connect(stage.addr())).await.unwrap();
    let mut request = upgrade_request("/hold/w");
    request.extend(client_frame(0x1, b"early"));
    let mut close = vec![0x0f, 0xa0];
    close.extend_from_slice(b"done");
    request.extend(client_frame(0x8, &close));
    request.extend(client_frame(0x1, b"late"));
    bounded(tcp.write_all(&request)).await.unwrap();
    let mut held = stage
        .held("w", LIMIT)
        .await
        .unwrap()
        .upgrade()
        .await
        .unwrap();
    let (head, got) = read_head(&mut tcp).await;
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    assert!(got.is_empty());
    assert_eq!(
        held.expect_message(LIMIT).await,
        Some(WsMessage::text("early"))
    );
    let got = held.expect_message(LIMIT).await.unwrap();
    assert_eq!(close_frame(&got), Some((4000, "done".to_owned())));
    // Nothing after the close frame counts, and nothing is answered.
    assert_eq!(held.expect_message(SILENCE).await, None);
    let mut buf = [0; 16];
    assert!(timeout(SILENCE, tcp.read(&mut buf)).await.is_err());
    // The answer; the client reads it and closes TCP.
    let client = tokio::spawn(async move {
        let mut got = vec![0; 6];
        bounded(tcp.read_exact(&mut got)).await.unwrap();
        got
    });
    held.close(1000, "ok").await.unwrap();
    assert_eq!(
        bounded(client).await.unwrap(),
        [0x88, 4, 0x03, 0xe8, b'o', b'k']
    );
    assert!(!held.liveness().is_open());
    all_closed(&stage).await;
    assert_eq!(stage.ws_messages_received(), 1);
    assert_eq!(stage.ws_close_frames_received(), 1);
}
