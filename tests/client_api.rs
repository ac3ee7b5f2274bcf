//! The client in the async ecosystem, against the stage: a task's result awaited without a
//! delegate, and kept only while a handle to the task exists (R5, R10). Every wait is bounded;
//! no assertion is about speed.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use leakproof::{
    CloseCode, Configuration, Delegate, Disposition, Error, Message, Session, SessionTask,
    StreamTask, TaskId, TaskInfo, TaskState, UploadBody,
};
use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use leakproof_check::stage::{RawScript, Stage};

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

fn plain() -> Session {
    Session::new(Configuration::default(), None)
}

/// Records what `did_complete` got, per task.
#[derive(Default)]
struct Completions(Mutex<Vec<(TaskId, Result<(), Error>)>>);

impl Delegate for Completions {
    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        self.0.lock().unwrap().push((task.id, result));
    }
}

impl Completions {
    fn of(&self, task: TaskId) -> Option<Result<(), Error>> {
        let heard = self.0.lock().unwrap();
        heard
            .iter()
            .find(|(t, _)| *t == task)
            .map(|(_, r)| r.clone())
    }
}

#[tokio::test]
async fn each_kind_of_http_task_can_be_awaited_for_its_result_without_a_delegate() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let data = session.data_task(get(stage.url("/bytes/1000"))).unwrap();
    let download = session
        .download_task(get(stage.url("/bytes/70000")))
        .unwrap();
    let upload = session
        .upload_task(
            http::Request::post(stage.url("/bytes/10"))
                .body(())
                .unwrap(),
            UploadBody::Bytes(Bytes::from_static(b"leakproof")),
        )
        .unwrap();
    data.resume();
    download.resume();
    upload.resume();
    bounded("data", data.result()).await.unwrap();
    bounded("download", download.result()).await.unwrap();
    bounded("upload", upload.result()).await.unwrap();
    assert_eq!(data.state(), TaskState::Completed);
    // Asked again after completion: the same result, at once.
    bounded("data again", data.result()).await.unwrap();
    assert!(stage.request_body_bytes() >= 9);
}

/// Resume, then cancel, any kind of task, and await its result: only the trait is known here.
async fn resumed_then_cancelled<T: SessionTask>(task: &T) -> Result<(), Error> {
    task.resume();
    assert_eq!(task.state(), TaskState::Running, "{task:?}");
    task.cancel();
    bounded("result", task.result()).await
}

#[tokio::test]
async fn every_kind_of_task_handle_is_driven_through_the_one_trait() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let raw = stage.listen_raw(RawScript::echo()).await.unwrap();
    let stalled = |path: &str| get(stage.url(&format!("{path}?stall_headers=1")));
    let data = session.data_task(stalled("/bytes/10")).unwrap();
    let download = session.download_task(stalled("/bytes/20")).unwrap();
    let upload = session
        .upload_task(
            http::Request::post(stage.url("/bytes/30?stall_headers=1"))
                .body(())
                .unwrap(),
            UploadBody::Bytes(Bytes::from_static(b"leakproof")),
        )
        .unwrap();
    let stream = session.stream_task("127.0.0.1", raw.port()).unwrap();
    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    let tasks: [&dyn SessionTask; 5] = [&data, &download, &upload, &stream, &ws];

    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(!ids[..i].contains(id), "one id each: {ids:?}");
    }
    for task in tasks {
        assert_eq!(task.state(), TaskState::Suspended, "{task:?}");
        task.resume();
        task.suspend();
        assert_eq!(task.state(), TaskState::Suspended, "{task:?}");
    }
    // Through `dyn`: the polled result, pending while the task is suspended.
    let waited = tokio::time::timeout(
        Duration::from_millis(20),
        std::future::poll_fn(|cx| tasks[0].poll_result(cx)),
    )
    .await;
    assert!(waited.is_err(), "a suspended task has no result yet");

    // Through generics: each kind's `result()`.
    for result in [
        resumed_then_cancelled(&data).await,
        resumed_then_cancelled(&download).await,
        resumed_then_cancelled(&upload).await,
        resumed_then_cancelled(&stream).await,
        resumed_then_cancelled(&ws).await,
    ] {
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    }
    for task in tasks {
        assert_eq!(task.state(), TaskState::Completed, "{task:?}");
        let again = bounded("again", std::future::poll_fn(|cx| task.poll_result(cx))).await;
        assert!(matches!(again, Err(Error::Cancelled)), "{again:?}");
        // A no-op once completed.
        task.resume();
        assert_eq!(task.state(), TaskState::Completed, "{task:?}");
    }
    assert_eq!(session.resources().live_tasks, 0);
    session.invalidate_and_cancel();
    bounded("invalidated", session.invalidated()).await;
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "every socket is closed"
    );
}

#[tokio::test]
async fn a_failed_or_cancelled_task_resolves_with_its_error() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let reset = session
        .data_task(get(stage.url("/bytes/1000?reset_after=10")))
        .unwrap();
    reset.resume();
    let error = bounded("reset", reset.result()).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionReset), "{error}");

    let stalled = session
        .data_task(get(stage.url("/bytes/1000?stall_headers=1")))
        .unwrap();
    stalled.resume();
    let (result, ()) = tokio::join!(bounded("stalled", stalled.result()), async {
        assert!(stage.wait_until(|s| s.requests() >= 2, PATIENCE).await);
        stalled.cancel();
    });
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "the sockets are closed"
    );
}

#[tokio::test]
async fn the_result_is_the_one_did_complete_gets() {
    let stage = Stage::start().await.unwrap();
    let delegate = Arc::new(Completions::default());
    let session = Session::new(Configuration::default(), Some(delegate.clone()));
    let ok = session.data_task(get(stage.url("/bytes/100"))).unwrap();
    let failed = session
        .data_task(get(stage.url("/bytes/100?close_after=10")))
        .unwrap();
    ok.resume();
    failed.resume();
    bounded("ok", ok.result()).await.unwrap();
    let error = bounded("failed", failed.result()).await.unwrap_err();
    // did_complete is delivered on the delegate's thread, after the task completed.
    eventually("did_complete", || delegate.of(failed.id()).is_some()).await;
    assert!(delegate.of(ok.id()).unwrap().is_ok());
    let heard = delegate.of(failed.id()).unwrap().unwrap_err();
    assert_eq!(heard.to_string(), error.to_string());
}

#[tokio::test]
async fn two_waiters_on_one_task_both_wake_when_it_completes() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let task = session.data_task(get(stage.url("/hold/two"))).unwrap();
    task.resume();
    let held = stage.held("two", PATIENCE).await.expect("the request came");
    let (first, second, ()) = tokio::join!(
        bounded("first", task.result()),
        bounded("second", task.result()),
        async {
            // Both wait on a task that is still running.
            tokio::task::yield_now().await;
            assert_eq!(task.state(), TaskState::Running);
            held.head(200, false, Some(5)).await.unwrap();
            held.send(5).await.unwrap();
            held.end().await.unwrap();
        }
    );
    first.unwrap();
    second.unwrap();
}

#[tokio::test]
async fn awaiting_a_suspended_task_does_not_resume_it_and_dropping_it_still_cancels_it() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let task = session.data_task(get(stage.url("/bytes/10"))).unwrap();
    // Nothing resumes it: the wait can only end by the bound.
    let waited = tokio::time::timeout(Duration::from_millis(50), task.result()).await;
    assert!(
        waited.is_err(),
        "a suspended task has no result: {waited:?}"
    );
    assert_eq!(task.state(), TaskState::Suspended);
    drop(task);
    // R10: its handle gone, nothing could resume it: cancelled, nothing kept.
    assert_eq!(session.resources().live_tasks, 0);
    assert_eq!(session.kept_results(), 0);
    assert_eq!(stage.accepted(), 0, "the request was never sent");
}

#[tokio::test]
async fn a_completed_task_keeps_its_result_only_while_a_handle_exists() {
    const TASKS: usize = 200;
    let stage = Stage::start().await.unwrap();
    let shared = Session::shared();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| shared.data_task(get(stage.url("/bytes/10"))).unwrap())
        .collect();
    for task in &tasks {
        task.resume();
    }
    for task in &tasks {
        bounded("result", task.result()).await.unwrap();
    }
    // One small result each, for handles still held (other tests of this binary do not use
    // the shared session).
    assert_eq!(shared.kept_results(), TASKS);
    assert_eq!(shared.resources().live_tasks, 0);
    drop(tasks);
    assert_eq!(
        shared.kept_results(),
        0,
        "R5: nothing kept once handles are gone"
    );
}

#[tokio::test]
async fn a_stream_resolves_once_both_halves_are_closed_and_a_websocket_once_closed() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let addr = stage.listen_raw(RawScript::echo()).await.unwrap();
    let stream = session.stream_task("127.0.0.1", addr.port()).unwrap();
    stream.resume();
    bounded("write", stream.write(b"ping", PATIENCE))
        .await
        .unwrap();
    let echoed = bounded("read", stream.read(4, 4, PATIENCE)).await.unwrap();
    assert_eq!(echoed.as_deref(), Some(&b"ping"[..]));
    stream.close_write();
    stream.close_read();
    bounded("stream", stream.result()).await.unwrap();

    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let (result, ()) = tokio::join!(bounded("websocket", ws.result()), async {
        bounded("ping", ws.ping()).await.unwrap();
        ws.cancel_with(CloseCode::NORMAL, "done").unwrap();
    });
    result.unwrap();
    assert_eq!(ws.state(), TaskState::Completed);
}

#[tokio::test]
async fn a_close_code_no_close_frame_may_carry_is_refused_and_never_sent() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    bounded("ping", ws.ping()).await.unwrap();
    for code in [0, 999, 1004, 1005, 1006, 1014, 1015, 2999, 5000, u16::MAX] {
        let refused = ws.cancel_with(code, "not on the wire").unwrap_err();
        assert!(
            matches!(refused, Error::InvalidCloseCode(c) if c == code),
            "{code}: {refused}"
        );
        assert!(refused.to_string().contains(&code.to_string()), "{refused}");
        assert_eq!(ws.state(), TaskState::Running, "{code}: the close began");
        assert_eq!(ws.close_code(), None, "{code}");
    }
    // Still open both ways, and the stage saw no close frame.
    let message = Message::Text("still open".into());
    bounded("send", ws.send(message.clone())).await.unwrap();
    assert_eq!(bounded("receive", ws.receive()).await.unwrap(), message);
    assert_eq!(stage.ws_close_frames_received(), 0);
    // A code that may be sent closes it, as before.
    ws.cancel_with(CloseCode::from(4001), "done").unwrap();
    assert_eq!(ws.close_code(), Some(CloseCode::from(4001)));
    bounded("closed", ws.result()).await.unwrap();
    assert_eq!(stage.ws_close_frames_received(), 1);
}

// ---- the websocket as a Stream and a Sink ----

#[tokio::test]
async fn a_websocket_is_a_stream_of_messages_and_a_sink_whose_close_is_the_handshake() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let mut ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let one = Message::Text("one".into());
    bounded("sink send", SinkExt::send(&mut ws, one.clone()))
        .await
        .unwrap();
    assert_eq!(bounded("next", ws.next()).await.unwrap().unwrap(), one);
    let many: Vec<Message> = (0..3)
        .map(|i| Message::Binary(vec![i; 10].into()))
        .collect();
    let mut outgoing = futures_util::stream::iter(many.clone().into_iter().map(Ok));
    bounded("send_all", ws.send_all(&mut outgoing))
        .await
        .unwrap();
    for expected in &many {
        assert_eq!(
            &bounded("next", ws.next()).await.unwrap().unwrap(),
            expected
        );
    }
    // The sink's close is the close handshake with 1000, done when the peer answered.
    bounded("close", SinkExt::close(&mut ws)).await.unwrap();
    assert_eq!(ws.state(), TaskState::Completed);
    assert_eq!(ws.close_code(), Some(CloseCode::NORMAL));
    assert!(
        bounded("next", ws.next()).await.is_none(),
        "closed: no more"
    );
    assert_eq!(stage.ws_close_frames_received(), 1);
    assert_eq!(stage.ws_messages_received(), 4);
    bounded("result", ws.result()).await.unwrap();
    assert!(stage.wait_all_closed(PATIENCE).await);
}

#[tokio::test]
async fn the_message_stream_ends_at_the_peers_close_and_yields_a_failure_once() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let mut closed = session
        .websocket_task(stage.ws_url("/ws/hold/closes"), &[])
        .unwrap();
    closed.resume();
    let held = stage.held_ws("closes", PATIENCE).await.unwrap();
    held.send_text("last words").await.unwrap();
    held.close(4001, "bye").await.unwrap();
    let first = bounded("next", closed.next()).await.unwrap().unwrap();
    assert_eq!(first, Message::Text("last words".into()));
    assert!(bounded("next", closed.next()).await.is_none());
    assert!(bounded("next again", closed.next()).await.is_none());
    bounded("result", closed.result()).await.unwrap();
    assert_eq!(closed.close_code(), Some(CloseCode::from(4001)));

    let mut dropped = session
        .websocket_task(stage.ws_url("/ws/hold/drops"), &[])
        .unwrap();
    dropped.resume();
    let held = stage.held_ws("drops", PATIENCE).await.unwrap();
    held.reset().await.unwrap();
    let failed = bounded("next", dropped.next()).await.unwrap();
    let error = failed.unwrap_err();
    assert!(!matches!(error, Error::Closed(_)), "{error}");
    assert!(bounded("next again", dropped.next()).await.is_none());
    let result = bounded("result", dropped.result()).await.unwrap_err();
    assert_eq!(result.to_string(), error.to_string());
}

#[tokio::test]
async fn split_halves_send_and_receive_concurrently_and_the_sinks_close_keeps_our_code() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let (mut sink, mut stream) = ws.split();
    let messages: Vec<Message> = (0..20).map(|i| Message::Text(format!("{i}"))).collect();
    let sent = messages.clone();
    let (sent, received) = tokio::join!(
        bounded("send", async move {
            for message in sent {
                sink.send(message).await?;
            }
            Ok::<_, Error>(sink)
        }),
        bounded("receive", async {
            let mut received = Vec::new();
            while received.len() < 20 {
                received.push(stream.next().await.unwrap().unwrap());
            }
            received
        })
    );
    assert_eq!(received, messages);
    let sink = sent.unwrap();
    let ws = sink.reunite(stream).unwrap();
    // A code of our own first: the sink's close keeps the handshake under way.
    ws.cancel_with(CloseCode::GOING_AWAY, "leaving").unwrap();
    let (mut sink, mut stream) = ws.split();
    bounded("close", sink.close()).await.unwrap();
    assert!(bounded("next", stream.next()).await.is_none());
    let ws = sink.reunite(stream).unwrap();
    assert_eq!(ws.close_code(), Some(CloseCode::GOING_AWAY));
}

#[tokio::test]
async fn the_sink_refuses_a_message_too_large_and_the_websocket_goes_on() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .max_message_size(1024)
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let mut ws = session
        .websocket_task(stage.ws_url("/ws/echo"), &[])
        .unwrap();
    ws.resume();
    let large = Message::Binary(vec![0; 2048].into());
    let refused = bounded("send", SinkExt::send(&mut ws, large)).await;
    assert!(
        matches!(refused, Err(Error::WebSocketProtocol(_))),
        "{refused:?}"
    );
    let small = Message::Text("small".into());
    bounded("send", SinkExt::send(&mut ws, small.clone()))
        .await
        .unwrap();
    assert_eq!(bounded("next", ws.next()).await.unwrap().unwrap(), small);
    // Closing a websocket that is already over reports how it ended.
    ws.cancel();
    let closed = bounded("close", SinkExt::close(&mut ws)).await;
    assert!(matches!(closed, Err(Error::Cancelled)), "{closed:?}");
    assert!(bounded("next", ws.next()).await.unwrap().is_err());
}

// ---- stream reads and writes without a timeout of their own ----

#[tokio::test]
async fn untimed_stream_reads_and_writes_compose_with_tokio_timeout() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let addr = stage.listen_raw(RawScript::hold("untimed")).await.unwrap();
    let stream = session.stream_task("127.0.0.1", addr.port()).unwrap();
    stream.resume();
    let held = stage.held_raw("untimed", PATIENCE).await.unwrap();
    // Nothing was sent: the caller's own bound ends the wait, and the task goes on.
    let waited = tokio::time::timeout(Duration::from_millis(50), stream.read_some(1, 64)).await;
    assert!(waited.is_err(), "nothing to read: {waited:?}");
    assert_eq!(stream.state(), TaskState::Running);
    held.send(9).await.unwrap();
    let read = bounded("read_some", stream.read_some(9, 9)).await.unwrap();
    assert_eq!(read.as_deref(), Some(&leakproof_check::stage::body(9)[..]));

    bounded("write_all", stream.write_all(b"hello"))
        .await
        .unwrap();
    bounded("flushed", stream.flushed()).await.unwrap();
    assert!(held.wait_received(5, PATIENCE).await);
    assert_eq!(held.received(), b"hello");

    held.end().await.unwrap();
    assert_eq!(bounded("end", stream.read_some(1, 64)).await.unwrap(), None);
    stream.close_write();
    bounded("result", stream.result()).await.unwrap();
    let over = bounded("read_some", stream.read_some(1, 64)).await;
    assert!(over.is_err(), "{over:?}");
    assert!(stage.wait_all_closed(PATIENCE).await);
}

/// Turns every response into a stream and keeps the stream's handle.
#[derive(Default)]
struct Streams(Mutex<Option<StreamTask>>);

impl Delegate for Streams {
    fn did_receive_response(&self, _: &TaskInfo, _: &http::Response<()>) -> Disposition {
        Disposition::BecomeStream
    }

    fn did_become_stream(&self, _: &TaskInfo, stream: StreamTask) {
        *self.0.lock().unwrap() = Some(stream);
    }
}

#[tokio::test]
async fn a_result_two_handles_share_is_kept_until_the_last_one_goes() {
    let stage = Stage::start().await.unwrap();
    let delegate = Arc::new(Streams::default());
    let session = Session::new(Configuration::default(), Some(delegate.clone()));
    let task = session.data_task(get(stage.url("/bytes/100"))).unwrap();
    task.resume();
    eventually("did_become_stream", || delegate.0.lock().unwrap().is_some()).await;
    let stream = delegate.0.lock().unwrap().take().unwrap();
    let mut read = 0;
    while let Some(bytes) = bounded("read", stream.read_some(1, 64)).await.unwrap() {
        read += bytes.len();
    }
    assert_eq!(read, 100);
    // The end read, and a response's stream has no write half: completed, both handles see it.
    bounded("the data task's result", task.result())
        .await
        .unwrap();
    bounded("the stream's result", stream.result())
        .await
        .unwrap();
    assert_eq!(session.kept_results(), 1);
    drop(task);
    assert_eq!(
        session.kept_results(),
        1,
        "the stream's handle still holds it"
    );
    bounded("the stream's result", stream.result())
        .await
        .unwrap();
    drop(stream);
    assert_eq!(session.kept_results(), 0);
    assert!(stage.wait_all_closed(PATIENCE).await);
}
