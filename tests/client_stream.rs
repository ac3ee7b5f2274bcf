//! Stream tasks against the stage: direct streams over the stage's raw listeners, and data
//! tasks whose delegate made the response a stream. The seed's repro (leak 1): a stream that
//! is offered 8 MB and cancelled before any read holds no more than its window (R6), made the
//! server block far below 8 MB, and leaves nothing behind (R4, R5). Every wait is bounded; no
//! assertion is about speed.

use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use leakproof::{
    Configuration, Delegate, Disposition, Error, Operation, Session, SessionState, StreamTask,
    TaskInfo, TaskKind, TaskState,
};
use leakproof_check::stage::{self, RawScript, Stage};

/// A read or write timeout long enough never to fire on loopback.
const OP: Duration = Duration::from_secs(5);
/// The default stream window (R6).
const WINDOW: u64 = 64 * 1024;
/// What the seed's server offers.
const OFFER: u64 = 8_000_000;
/// Far below the offer: what the server may have written once backpressure holds (the stream's
/// window, the kernel's buffers on both ends, the stage's small send buffer).
const FAR_BELOW: u64 = 1_500_000;

/// Hears `did_complete`, answers `BecomeStream` to every response, and keeps the streams it is
/// handed for the test to take.
#[derive(Default)]
struct Streamer {
    completed: Mutex<Vec<(TaskInfo, Result<(), Error>)>>,
    streams: Mutex<Vec<(TaskInfo, StreamTask)>>,
    invalid: Mutex<u32>,
}

impl Delegate for Streamer {
    fn did_receive_response(&self, _: &TaskInfo, _: &http::Response<()>) -> Disposition {
        Disposition::BecomeStream
    }

    fn did_become_stream(&self, task: &TaskInfo, stream: StreamTask) {
        self.streams.lock().unwrap().push((task.clone(), stream));
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        self.completed.lock().unwrap().push((task.clone(), result));
    }

    fn did_become_invalid(&self) {
        *self.invalid.lock().unwrap() += 1;
    }
}

impl Streamer {
    fn completed(&self) -> Vec<(TaskInfo, Result<(), Error>)> {
        self.completed.lock().unwrap().clone()
    }

    /// The stream the delegate was handed, once it is.
    async fn take_stream(&self) -> (TaskInfo, StreamTask) {
        eventually("did_become_stream", || {
            !self.streams.lock().unwrap().is_empty()
        })
        .await;
        self.streams.lock().unwrap().remove(0)
    }
}

/// A session whose delegate is a fresh [`Streamer`], and a `Weak` to check R3 with.
fn delegated(config: Configuration) -> (Session, Arc<Streamer>, Weak<Streamer>) {
    let delegate = Arc::new(Streamer::default());
    let weak = Arc::downgrade(&delegate);
    let session = Session::new(config, Some(delegate.clone()));
    (session, delegate, weak)
}

/// Read until `len` bytes arrived.
async fn read_exactly(stream: &StreamTask, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        match stream.read(1, len - got.len(), OP).await.unwrap() {
            Some(bytes) => got.extend_from_slice(&bytes),
            None => panic!("the stream ended after {} of {len} bytes", got.len()),
        }
    }
    got
}

/// Finish and invalidate; check R3 and R4: invalidated, the delegate dropped, the ledger zero,
/// every socket closed as the stage sees it.
async fn teardown(session: Session, delegate: Arc<Streamer>, weak: Weak<Streamer>, stage: &Stage) {
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
async fn a_direct_stream_echoes_and_completes_when_both_halves_close() {
    let stage = Stage::start().await.unwrap();
    let echo = stage.listen_raw(RawScript::echo()).await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());

    let stream = session.stream_task("127.0.0.1", echo.port()).unwrap();
    assert_eq!(stream.state(), TaskState::Suspended);
    stream.resume();
    stream.write(b"hello, stream", OP).await.unwrap();
    assert_eq!(read_exactly(&stream, 13).await, b"hello, stream");
    stream.write(&b"twice"[..], OP).await.unwrap();
    assert_eq!(read_exactly(&stream, 5).await, b"twice");

    // Our end goes out; the echo sees it and closes; we read the end: both halves closed.
    stream.close_write();
    assert_eq!(stream.read(1, 100, OP).await.unwrap(), None);
    assert_eq!(stream.state(), TaskState::Completed);
    assert!(matches!(
        stream.read(1, 1, OP).await,
        Err(Error::Closed(_) | Error::ReadClosed)
    ));
    eventually("did_complete", || delegate.completed().len() == 1).await;
    let (info, result) = delegate.completed().remove(0);
    assert_eq!(info.kind, TaskKind::Stream);
    assert!(result.is_ok(), "{result:?}");
    assert!(stage.wait_until(|s| s.raw_closed() == 1, PATIENCE).await);
    assert_eq!(stage.raw_bytes_received(), 18);

    // The other order, on a held connection: close_read first, then close_write.
    let held_addr = stage.listen_raw(RawScript::hold("s")).await.unwrap();
    let second = session.stream_task("localhost", held_addr.port()).unwrap();
    second.resume();
    let held = stage.held_raw("s", PATIENCE).await.expect("connected");
    second.write(b"ping", OP).await.unwrap();
    assert!(held.wait_received(4, PATIENCE).await);
    held.send(10).await.unwrap();
    assert_eq!(read_exactly(&second, 10).await, stage::body(10));
    second.close_read();
    assert!(matches!(
        second.read(1, 1, OP).await,
        Err(Error::ReadClosed)
    ));
    assert_eq!(second.state(), TaskState::Running, "its write half is open");
    second.close_write();
    eventually("both halves closed", || {
        second.state() == TaskState::Completed
    })
    .await;
    let liveness = held.liveness();
    eventually("the stage sees the socket closed", || !liveness.is_open()).await;
    assert_eq!(held.received(), b"ping");
    drop(held);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn a_refused_stream_completes_with_the_typed_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed: nothing listens there now
    let (session, delegate, weak) = delegated(Configuration::default());
    let stream = session.stream_task("127.0.0.1", port).unwrap();
    stream.resume();
    let error = stream.read(1, 1, OP).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionRefused { .. }), "{error}");
    eventually("did_complete", || delegate.completed().len() == 1).await;
    assert!(matches!(
        delegate.completed()[0].1,
        Err(Error::ConnectionRefused { .. })
    ));
    let stage = Stage::start().await.unwrap();
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn a_read_that_times_out_fails_alone_and_the_stream_goes_on() {
    let stage = Stage::start().await.unwrap();
    let addr = stage.listen_raw(RawScript::hold("quiet")).await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let stream = session.stream_task("127.0.0.1", addr.port()).unwrap();
    stream.resume();
    let held = stage.held_raw("quiet", PATIENCE).await.expect("connected");

    let error = stream
        .read(1, 10, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::OpTimedOut(Operation::Read)),
        "{error}"
    );
    assert_eq!(stream.state(), TaskState::Running);
    held.send(7).await.unwrap();
    assert_eq!(read_exactly(&stream, 7).await, stage::body(7));
    // Ended by the peer: the end reads as None, and close_write completes it.
    held.end().await.unwrap();
    assert_eq!(stream.read(1, 10, OP).await.unwrap(), None);
    stream.close_write();
    eventually("completed", || stream.state() == TaskState::Completed).await;
    let liveness = held.liveness();
    eventually("closed", || !liveness.is_open()).await;
    drop(held);
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn async_read_and_write_adapters_copy_through_a_stream() {
    let stage = Stage::start().await.unwrap();
    let echo = stage.listen_raw(RawScript::echo()).await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let stream = session.stream_task("127.0.0.1", echo.port()).unwrap();
    stream.resume();

    // More than the window and the write buffer both ways: backpressure on each side.
    let sent = stage::body(300_000);
    let (mut reader, mut writer) = (&stream, &stream);
    let write = async {
        let mut source = &sent[..];
        let copied = tokio::io::copy(&mut source, &mut writer).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut writer)
            .await
            .unwrap();
        copied
    };
    let read = async {
        let mut sink = Vec::new();
        tokio::io::copy(&mut reader, &mut sink).await.unwrap();
        sink
    };
    let (copied, echoed) = bounded("the copies", async { tokio::join!(write, read) }).await;
    assert_eq!(copied, 300_000);
    assert_eq!(echoed, sent);
    assert_eq!(stream.state(), TaskState::Completed);
    let ledger = session.resources();
    assert!(ledger.peak_buffered_bytes <= WINDOW, "R6: {ledger:?}");
    assert!(stage.wait_until(|s| s.raw_closed() == 1, PATIENCE).await);

    // The chunk stream: everything the server offers, then the end.
    let offer = stage.listen_raw(RawScript::offer(100_000)).await.unwrap();
    let mut chunks = session.stream_task("127.0.0.1", offer.port()).unwrap();
    chunks.resume();
    let mut got = Vec::new();
    while let Some(chunk) = bounded("a chunk", chunks.next()).await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, stage::body(100_000));
    assert!(chunks.next().await.is_none(), "fused");
    chunks.close_write();
    eventually("completed", || chunks.state() == TaskState::Completed).await;
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn a_response_becomes_a_read_only_stream_read_through_its_window() {
    let stage = Stage::start().await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let request = http::Request::get(stage.url("/bytes/200000?chunk=4096"))
        .body(())
        .unwrap();
    let task = session.data_task(request).unwrap();
    task.resume();
    let (info, stream) = delegate.take_stream().await;
    assert_eq!(info.kind, TaskKind::Data, "the kind it was created as");
    assert_eq!(stream.id(), task.id());
    assert_eq!(task.state(), TaskState::Running);

    let error = stream.write(b"no", OP).await.unwrap_err();
    assert!(matches!(error, Error::WriteClosed), "{error}");
    let body = read_exactly(&stream, 200_000).await;
    assert_eq!(body, stage::body(200_000));
    assert_eq!(stream.read(1, 10, OP).await.unwrap(), None);
    eventually("completed", || task.state() == TaskState::Completed).await;
    eventually("did_complete", || delegate.completed().len() == 1).await;
    assert!(delegate.completed()[0].1.is_ok());
    let ledger = session.resources();
    assert!(ledger.peak_buffered_bytes <= WINDOW, "R6: {ledger:?}");
    assert_eq!(
        ledger.idle_connections, 0,
        "a stream's connection is never pooled"
    );
    assert!(stage.wait_all_closed(PATIENCE).await);
    drop((task, stream));
    teardown(session, delegate, weak, &stage).await;
}

/// Leak 1's seed, the direct stream: 8 MB offered, the stream cancelled before any read.
#[tokio::test]
async fn seed_a_direct_stream_offered_8_mb_and_cancelled_unread_holds_its_window_only() {
    let stage = Stage::builder()
        .send_buffer(8 * 1024)
        .start()
        .await
        .unwrap();
    let addr = stage.listen_raw(RawScript::offer(OFFER)).await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let stream = session.stream_task("127.0.0.1", addr.port()).unwrap();
    stream.resume();

    let read_ahead =
        (session.configuration().stream_window() - session.configuration().read_buffer()) as u64;
    eventually("the read-ahead fills", || {
        session.resources().buffered_bytes >= read_ahead
    })
    .await;
    // Let the server write all it can: with backpressure it blocks far below the offer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = stage.raw_bytes_written();
    assert!(written < FAR_BELOW, "R6: the server wrote {written} bytes");
    let ledger = session.resources();
    assert!(ledger.peak_buffered_bytes <= WINDOW, "R6: {ledger:?}");

    stream.cancel();
    assert_eq!(stream.state(), TaskState::Completed);
    assert!(matches!(stream.read(1, 1, OP).await, Err(Error::Cancelled)));
    assert_eq!(session.resources().buffered_bytes, 0, "R5");
    assert!(
        stage.wait_until(|s| s.raw_closed() == 1, PATIENCE).await,
        "R5: the socket closes at cancel"
    );
    eventually("did_complete", || delegate.completed().len() == 1).await;
    assert!(matches!(delegate.completed()[0].1, Err(Error::Cancelled)));
    drop(stream);
    teardown(session, delegate, weak, &stage).await;
}

/// Leak 1's seed as reported: a data task made a stream (`becomeStream`) over an 8 MB body,
/// cancelled before any read.
#[tokio::test]
async fn seed_a_response_made_a_stream_over_8_mb_and_cancelled_unread_holds_its_window_only() {
    let stage = Stage::builder()
        .send_buffer(8 * 1024)
        .start()
        .await
        .unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let url = stage.url(&format!("/bytes/{OFFER}"));
    let task = session
        .data_task(http::Request::get(url).body(()).unwrap())
        .unwrap();
    task.resume();
    let (_, stream) = delegate.take_stream().await;

    let read_ahead =
        (session.configuration().stream_window() - session.configuration().read_buffer()) as u64;
    eventually("the read-ahead fills", || {
        session.resources().buffered_bytes >= read_ahead
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = stage.body_bytes_written();
    println!(
        "seed stream (response made a stream, 8 MB body, cancelled unread): ledger peak {} B, \
         server wrote {written} B",
        session.resources().peak_buffered_bytes
    );
    assert!(written < FAR_BELOW, "R6: the server wrote {written} bytes");
    let ledger = session.resources();
    assert!(ledger.peak_buffered_bytes <= WINDOW, "R6: {ledger:?}");
    assert_eq!(ledger.open_connections, 1);

    stream.cancel();
    assert_eq!(task.state(), TaskState::Completed);
    assert_eq!(session.resources().buffered_bytes, 0, "R5");
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R5: the socket closes at cancel"
    );
    eventually("did_complete", || delegate.completed().len() == 1).await;
    assert!(matches!(delegate.completed()[0].1, Err(Error::Cancelled)));
    drop((task, stream));
    teardown(session, delegate, weak, &stage).await;
}

/// The other half of the seed: the session invalidated with the unread stream's handles gone.
#[tokio::test]
async fn seed_an_unread_stream_whose_handles_are_dropped_does_not_hold_the_session() {
    let stage = Stage::builder()
        .send_buffer(8 * 1024)
        .start()
        .await
        .unwrap();
    let addr = stage.listen_raw(RawScript::offer(OFFER)).await.unwrap();
    let (session, delegate, weak) = delegated(Configuration::default());
    let url = stage.url(&format!("/bytes/{OFFER}"));
    let task = session
        .data_task(http::Request::get(url).body(()).unwrap())
        .unwrap();
    task.resume();
    let (_, from_response) = delegate.take_stream().await;
    let direct = session.stream_task("127.0.0.1", addr.port()).unwrap();
    direct.resume();
    let read_ahead =
        (session.configuration().stream_window() - session.configuration().read_buffer()) as u64;
    eventually("both read-aheads fill", || {
        session.resources().buffered_bytes >= 2 * read_ahead
    })
    .await;

    // Nobody can read them any more: both are cancelled (R10), nothing is held.
    drop((task, from_response, direct));
    eventually("both completed", || delegate.completed().len() == 2).await;
    assert!(
        delegate
            .completed()
            .iter()
            .all(|(_, result)| matches!(result, Err(Error::Cancelled)))
    );
    teardown(session, delegate, weak, &stage).await;
}

#[tokio::test]
async fn the_stream_window_must_cover_the_read_buffer() {
    let error = Configuration::builder()
        .read_buffer(16 * 1024)
        .stream_window(16 * 1024)
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfiguration(_)), "{error}");
    assert!(error.to_string().contains("stream_window"), "{error}");
    let config = Configuration::builder()
        .stream_window(32 * 1024)
        .read_buffer(8 * 1024)
        .write_buffer(1024)
        .close_timeout(Duration::from_secs(1))
        .max_message_size(1 << 20)
        .build()
        .unwrap();
    assert_eq!(config.stream_window(), 32 * 1024);
    assert_eq!(config.read_buffer(), 8 * 1024);
    let defaults = Configuration::default();
    assert_eq!(
        (defaults.stream_window(), defaults.read_buffer()),
        (64 * 1024, 16 * 1024)
    );
    assert!(
        Configuration::builder()
            .close_timeout(Duration::ZERO)
            .build()
            .is_err()
    );
}
