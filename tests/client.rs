//! The client's API against the stage: errors, conveniences, the pool, the delegate's
//! thread, suspension. Every wait is bounded; no assertion is about speed.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Disposition, Error, Session, SessionState, TaskInfo, TaskState,
    UploadBody,
};
use leakproof_check::scenario::{PATIENCE, Scene, patiently};
use leakproof_check::stage::{self, Stage};
use leakproof_model::Outcome;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

fn plain() -> Session {
    Session::new(Configuration::default(), None)
}

#[tokio::test]
async fn bad_urls_are_typed_errors_that_allocate_no_task() {
    let session = plain();
    for url in [
        "/relative",
        "ftp://example.com/x",
        "http://127.0.0.1:99999/",
    ] {
        let error = session.data_task(get(url.into())).unwrap_err();
        assert!(matches!(error, Error::InvalidUrl { .. }), "{url}: {error}");
        assert!(error.to_string().contains(url), "{error}");
    }
    assert_eq!(session.resources().live_tasks, 0);
}

#[tokio::test]
async fn a_refused_connection_is_a_typed_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed: nothing listens there now
    let session = plain();
    let error = session
        .data(get(format!("http://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ConnectionRefused { .. }), "{error}");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
}

#[tokio::test]
async fn invalid_configurations_are_refused_with_the_reason() {
    let error = Configuration::builder()
        .request_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("request_timeout"), "{error}");
    let error = Configuration::builder()
        .default_header("bad header", "x")
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfiguration(_)), "{error}");
}

#[tokio::test]
async fn no_task_once_invalidation_began() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    session.finish_tasks_and_invalidate();
    let refused = session.data_task(get(stage.url("/bytes/1")));
    assert!(matches!(refused, Err(Error::SessionInvalidated)));
    let refused = session.data(get(stage.url("/bytes/1"))).await;
    assert!(matches!(refused, Err(Error::SessionInvalidated)));
    assert_eq!(stage.accepted(), 0, "R8: nothing was attempted");
    assert_eq!(session.state(), SessionState::Invalidated);
}

#[tokio::test]
async fn data_download_and_upload_conveniences() {
    let stage = Stage::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Configuration::builder()
        .download_dir(dir.path())
        .build()
        .unwrap();
    let session = Session::new(config, None);

    let response = session.data(get(stage.url("/bytes/1000"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().as_ref(), stage::body(1000).as_slice());

    let response = session
        .download(get(stage.url("/bytes/5000")))
        .await
        .unwrap();
    let file = response.into_body();
    assert_eq!(std::fs::read(file.path()).unwrap(), stage::body(5000));
    let kept = dir.path().join("kept");
    file.persist(&kept).unwrap();
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 5000);
    std::fs::remove_file(kept).unwrap();

    let dropped = session.download(get(stage.url("/bytes/10"))).await.unwrap();
    drop(dropped);
    let request = http::Request::post(stage.url("/bytes/3")).body(()).unwrap();
    let response = session
        .upload(request, UploadBody::Bytes(Bytes::from(vec![7u8; 4321])))
        .await
        .unwrap();
    assert_eq!(response.body().len(), 3);
    assert_eq!(stage.request_body_bytes(), 4321);
    assert_eq!(
        stage.accepted(),
        1,
        "one kept-alive connection served all four"
    );

    session.finish_tasks_and_invalidate();
    assert!(patiently(session.invalidated()).await.is_some());
    assert!(stage.wait_all_closed(PATIENCE).await, "R4");
    assert!(
        leakproof_check::witness::empty_dir(dir.path()).unwrap(),
        "R5"
    );
}

#[tokio::test]
async fn an_upload_streams_from_a_file() {
    let stage = Stage::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::write(&source, vec![1u8; 300_000]).unwrap();
    let session = plain();
    let request = http::Request::put(stage.url("/bytes/2")).body(()).unwrap();
    let response = session
        .upload(request, UploadBody::File(source))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(stage.request_body_bytes(), 300_000);
    let missing = dir.path().join("missing");
    let request = http::Request::put(stage.url("/bytes/2")).body(()).unwrap();
    let error = session
        .upload(request, UploadBody::File(missing))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Io(_)), "{error}");
}

#[tokio::test]
async fn dropping_a_convenience_future_cancels_its_task_and_closes_its_socket() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let request = get(stage.url("/bytes/1000000?stall_after=4096"));
    let fetch = session.data(request);
    let raced = tokio::time::timeout(Duration::from_millis(200), fetch).await;
    assert!(
        raced.is_err(),
        "the server stalls, so the future was still pending"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R5: the abandoned socket is closed"
    );
    assert_eq!(session.resources().live_tasks, 0);
    assert_eq!(session.resources().idle_connections, 0, "R5: not pooled");
}

#[tokio::test]
async fn a_host_at_its_limit_queues_tasks_on_its_connections() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .max_connections_per_host(2)
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let mut fetches = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let session = session.clone();
        let request = get(stage.url("/bytes/100?header_delay_ms=20"));
        fetches.spawn(async move { session.data(request).await });
    }
    while let Some(fetched) = fetches.join_next().await {
        assert_eq!(fetched.unwrap().unwrap().body().len(), 100);
    }
    assert_eq!(stage.requests(), 6);
    assert_eq!(stage.accepted(), 2, "never more than two connections");
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .idle_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    session.data(get(stage.url("/bytes/10"))).await.unwrap();
    assert_eq!(session.resources().idle_connections, 1);
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "the idle connection expired"
    );
    assert_eq!(session.resources().idle_connections, 0);
    session.data(get(stage.url("/bytes/10"))).await.unwrap();
    assert_eq!(stage.accepted(), 2, "a new connection after expiry");
}

#[tokio::test]
async fn the_shared_session_ignores_invalidation() {
    let stage = Stage::start().await.unwrap();
    let shared = Session::shared();
    shared.invalidate_and_cancel();
    shared.finish_tasks_and_invalidate();
    assert_eq!(shared.state(), SessionState::Active, "R9");
    let response = shared.data(get(stage.url("/bytes/42"))).await.unwrap();
    assert_eq!(response.body().len(), 42);
}

#[tokio::test]
async fn a_suspended_task_reads_nothing_so_the_server_blocks() {
    let stage = Stage::builder().send_buffer(4096).start().await.unwrap();
    let scene_trace = Scene::new(Configuration::builder()).await;
    let task = scene_trace
        .session()
        .data_task(get(stage.url("/bytes/50000000")))
        .unwrap();
    task.resume();
    assert!(
        stage
            .wait_until(|s| s.body_bytes_written() > 100_000, PATIENCE)
            .await
    );
    task.suspend();
    // Once the client's and the kernel's buffers are full the server's writes block.
    let mut written = stage.body_bytes_written();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stage.body_bytes_written();
        if now == written {
            break;
        }
        written = now;
    }
    assert!(
        written < 10_000_000,
        "R7: the server wrote {written} bytes to a suspended task"
    );
    assert_eq!(task.state(), TaskState::Suspended);
    assert_eq!(scene_trace.session().resources().timers, 0, "R7: no timers");
    task.cancel();
    drop(task);
    assert!(stage.wait_all_closed(PATIENCE).await);
    scene_trace.assert_released().await;
}

/// A delegate that blocks in its first `did_receive_data` until the test lets it go.
struct Blocking {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Delegate for Blocking {
    fn did_receive_data(&self, _: &TaskInfo, _: &Bytes) {
        if let Some(entered) = self.entered.lock().unwrap().take() {
            entered.send(()).unwrap();
            let _ = self.release.lock().unwrap().recv();
        }
    }
}

#[tokio::test]
async fn a_blocked_delegate_does_not_stall_other_sessions() {
    let stage = Stage::start().await.unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let blocking = Arc::new(Blocking {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
    });
    let slow = Session::new(Configuration::default(), Some(blocking));
    let task = slow.data_task(get(stage.url("/bytes/100000"))).unwrap();
    task.resume();
    let blocked = tokio::task::spawn_blocking(move || entered.recv_timeout(PATIENCE));
    assert!(
        blocked.await.unwrap().is_ok(),
        "the delegate is inside its callback"
    );
    // Meanwhile another session's IO, on the same runtime, is unaffected.
    let other = plain();
    let response = patiently(other.data(get(stage.url("/bytes/1000"))))
        .await
        .expect("served while the other session's delegate is blocked");
    assert_eq!(response.unwrap().body().len(), 1000);
    release.send(()).unwrap();
    drop(task);
    slow.finish_tasks_and_invalidate();
    assert!(patiently(slow.invalidated()).await.is_some());
}

#[tokio::test]
async fn dispositions_cancel_or_turn_a_data_task_into_a_download() {
    for (answer, expected) in [
        (Disposition::Cancel, Outcome::Cancelled),
        (Disposition::BecomeDownload, Outcome::Success),
    ] {
        let scene = Scene::answering(Configuration::builder(), answer).await;
        let task = scene
            .session()
            .data_task(scene.request("GET", "/bytes/7000"))
            .unwrap();
        task.resume();
        assert_eq!(scene.outcome(task.id()).await, expected, "{answer:?}");
        if answer == Disposition::BecomeDownload {
            assert_eq!(scene.trace.downloaded(), [7000]);
        }
        drop(task);
        scene.assert_released().await;
    }
}

#[tokio::test]
async fn an_idle_connection_the_server_closes_leaves_the_pool_at_once() {
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let fetch = tokio::spawn({
        let session = session.clone();
        let request = get(stage.url("/hold/quiet"));
        async move { session.data(request).await }
    });
    let held = stage
        .held("quiet", PATIENCE)
        .await
        .expect("the request arrives");
    held.head(200, false, Some(5)).await.unwrap();
    held.send(5).await.unwrap();
    // Nothing in the head said the connection would close: the client pools it.
    held.end_and_close().await.unwrap();
    assert_eq!(fetch.await.unwrap().unwrap().body().len(), 5);
    let observer = session.observer();
    let gone = patiently(async {
        while observer.resources().idle_connections > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "the ledger still counts the dead connection as idle"
    );
    let response = session.data(get(stage.url("/bytes/3"))).await.unwrap();
    assert_eq!(
        response.body().len(),
        3,
        "a new connection serves the next request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_convenience_times_out_on_its_own_clock() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .request_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let stalled = session.data(get(stage.url("/bytes/100000?stall_after=10")));
    let error = stalled.await.unwrap_err();
    assert!(
        matches!(error, Error::TimedOut(leakproof::Timeout::Request)),
        "{error}"
    );

    let config = Configuration::builder()
        .resource_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let endless = session.data(get(
        stage.url("/bytes/100000000?pace_ms=5&chunk=1024&chunked=1")
    ));
    let error = endless.await.unwrap_err();
    assert!(
        matches!(error, Error::TimedOut(leakproof::Timeout::Resource)),
        "{error}"
    );
    let held = session.resources();
    assert_eq!(
        (held.live_tasks, held.timers),
        (0, 0),
        "R12 releases as R5: {held:?}"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R5: the timed-out sockets are closed"
    );
}

/// D1: a port that is not a port is the user's error, found before anything connects; it must
/// not fall back to the scheme's default port and send the request (its path, its headers) to
/// whatever listens there.
#[tokio::test]
async fn a_port_out_of_range_is_an_invalid_url_and_nothing_connects() {
    let session = plain();
    for url in [
        "http://127.0.0.1:99999/secret",
        "http://127.0.0.1:65536/",
        "http://localhost:123456789012/",
        "http://[::1]:99999/",
        "http://127.0.0.1:0/",
    ] {
        let error = session.data_task(get(url.into())).unwrap_err();
        assert!(matches!(error, Error::InvalidUrl { .. }), "{url}: {error}");
        assert!(error.to_string().contains("port"), "{url}: {error}");
        let error = session.data(get(url.into())).await.unwrap_err();
        assert!(matches!(error, Error::InvalidUrl { .. }), "{url}: {error}");
    }
    for url in ["ws://127.0.0.1:99999/chat", "http://127.0.0.1:70000/chat"] {
        let error = session.websocket_task(url, &[]).unwrap_err();
        assert!(matches!(error, Error::InvalidUrl { .. }), "{url}: {error}");
    }
    // An empty port is the scheme's default, as RFC 3986 has it.
    let task = session.data_task(get("http://127.0.0.1:/".into())).unwrap();
    task.cancel();
    assert_eq!(session.resources().live_tasks, 0);
    assert_eq!(session.resources().open_connections, 0);
}

/// Holds the host's one connection slot: a task whose exchange is open (the server stalls) and
/// which is then suspended, so it keeps its connection and no timer (R7).
async fn hold_the_only_slot(session: &Session, stage: &Stage) -> leakproof::DataTask {
    let holder = session
        .data_task(get(stage.url("/bytes/100000?stall_after=10")))
        .unwrap();
    holder.resume();
    for _ in 0..500 {
        if stage.accepted() == 1 && session.resources().open_connections == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    holder.suspend();
    assert_eq!(session.resources().open_connections, 1, "the slot is held");
    holder
}

/// F1: a convenience's timeouts run from its first poll, while it waits for a connection slot
/// too (R12), as a delegate task's do. In simulated time, so "on schedule" is exact.
#[tokio::test(start_paused = true)]
async fn a_queued_convenience_times_out_on_schedule() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .max_connections_per_host(1)
        .request_timeout(Duration::from_secs(2))
        .resource_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let holder = hold_the_only_slot(&session, &stage).await;

    // Queued for good: the request timeout (idle time) runs out first, at 2 s.
    let started = tokio::time::Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        session.data(get(stage.url("/bytes/10"))),
    )
    .await
    .expect("a queued convenience is bounded by its timeouts");
    let error = waited.unwrap_err();
    assert!(
        matches!(error, Error::TimedOut(leakproof::Timeout::Request)),
        "{error}"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2100),
        "timed out at {elapsed:?}, not at the request timeout (2 s)"
    );
    assert_eq!(session.resources().live_tasks, 1, "only the holder is left");
    holder.cancel();
}

/// F1, the slot freed mid-wait: the resource timeout still counts from the first poll, not
/// from when the exchange got its connection.
#[tokio::test(start_paused = true)]
async fn a_convenience_that_waited_for_a_slot_keeps_its_resource_deadline() {
    let stage = Stage::start().await.unwrap();
    let config = Configuration::builder()
        .max_connections_per_host(1)
        .request_timeout(Duration::from_secs(10))
        .resource_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let session = Session::new(config, None);
    let holder = hold_the_only_slot(&session, &stage).await;

    let started = tokio::time::Instant::now();
    let fetch = {
        let session = session.clone();
        // Answered 2 s after it is sent: at 3.5 s if it got the slot at 1.5 s.
        let request = get(stage.url("/bytes/10?header_delay_ms=2000"));
        tokio::spawn(async move { session.data(request).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    holder.cancel();
    let fetched = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("bounded")
        .unwrap();
    let elapsed = started.elapsed();
    let error = fetched.expect_err("the resource timeout (3 s) runs out before the answer (3.5 s)");
    assert!(
        matches!(error, Error::TimedOut(leakproof::Timeout::Resource)),
        "{error}"
    );
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(3100),
        "timed out at {elapsed:?}, not at the resource timeout (3 s)"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R5: the timed-out exchange's socket is closed"
    );
}

/// F3: a convenience collects its body in memory, so the configuration bounds it
/// (`max_body_size`, 16 MiB by default): past it the task fails with a typed error, holds
/// nothing, and its connection, not read whole, is closed (R5). Known up front (a
/// `Content-Length`) or found on the way (chunked), and for an upload's response too.
#[tokio::test]
async fn a_convenience_body_over_max_body_size_is_a_typed_error() {
    const DEFAULT_MAX: usize = 16 * 1024 * 1024;
    let stage = Stage::start().await.unwrap();
    let session = plain();
    let over = DEFAULT_MAX + 1;
    for path in [format!("/bytes/{over}"), format!("/bytes/{over}?chunked=1")] {
        let fetched = session.data(get(stage.url(&path))).await;
        let error = fetched.map(|r| r.body().len()).unwrap_err();
        assert!(
            error.to_string().contains("max_body_size"),
            "{path}: {error}"
        );
    }
    let request = http::Request::post(stage.url(&format!("/bytes/{over}?chunked=1")))
        .body(())
        .unwrap();
    let uploaded = session
        .upload(request, UploadBody::Bytes(Bytes::from_static(b"up")))
        .await;
    let error = uploaded.map(|r| r.body().len()).unwrap_err();
    assert!(
        error.to_string().contains("max_body_size"),
        "upload: {error}"
    );
    let held = session.resources();
    assert_eq!(
        (held.live_tasks, held.buffered_bytes, held.idle_connections),
        (0, 0, 0),
        "R5: {held:?}"
    );
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R5: a body not read whole closes its connection"
    );

    let exactly = session
        .data(get(stage.url(&format!("/bytes/{DEFAULT_MAX}?chunked=1"))))
        .await
        .unwrap();
    assert_eq!(exactly.body().len(), DEFAULT_MAX, "the bound is inclusive");
}
