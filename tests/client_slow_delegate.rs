//! A delegate slower than the network (R6 grows): a data task delivers its body to the
//! delegate through a bounded window, and stops reading the socket while the delegate is a
//! window behind; a task that completes meanwhile drops what its delegate has not been handed
//! (R5), so its `did_complete` is not stuck behind stale bytes.
//!
//! The delegate here waits on a gate the test opens, so "behind" is a state the test holds,
//! not a race it hopes to win. Every wait is bounded.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Error, Ledger, Session, TaskId, TaskInfo, TaskState, UploadBody,
};
use leakproof_check::scenario::{AnyTask, PATIENCE, bounded, eventually};
use leakproof_check::stage::{self, Stage};

/// What the server offers: far more than any window.
const OFFER: u64 = 64_000_000;
/// The default delegate window and read buffer.
const WINDOW: u64 = 64 * 1024;
const READ_BUFFER: u64 = 16 * 1024;

/// What the delegate heard, in order.
#[derive(Debug, Clone)]
enum Heard {
    Data(TaskId, usize),
    Complete(TaskId, Result<(), Error>),
    Invalid,
}

/// A delegate whose `did_receive_data` waits while its gate is shut (at most [`PATIENCE`], so
/// a bug fails rather than hangs). It checks every byte against the stage's body pattern.
#[derive(Debug, Default)]
struct Gated {
    shut: Mutex<bool>,
    turn: Condvar,
    /// Calls now waiting at the gate.
    waiting: AtomicU32,
    heard: Mutex<Vec<Heard>>,
    /// Body bytes heard so far, and whether they were all the stage's pattern in order.
    offset: Mutex<(u64, bool)>,
}

impl Gated {
    fn shut() -> Arc<Gated> {
        let gated = Gated {
            shut: Mutex::new(true),
            ..Gated::default()
        };
        gated.offset.lock().unwrap().1 = true;
        Arc::new(gated)
    }

    fn open(&self) {
        *self.shut.lock().unwrap() = false;
        self.turn.notify_all();
    }

    fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    fn bytes(&self) -> u64 {
        self.offset.lock().unwrap().0
    }

    fn in_order(&self) -> bool {
        self.offset.lock().unwrap().1
    }

    fn push(&self, heard: Heard) {
        self.heard.lock().unwrap().push(heard);
    }
}

impl Delegate for Gated {
    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        self.push(Heard::Data(task.id, data.len()));
        {
            let mut offset = self.offset.lock().unwrap();
            let skip = (offset.0 % 10) as usize;
            let expected = stage::body(skip + data.len());
            offset.1 &= expected[skip..] == data[..];
            offset.0 += data.len() as u64;
        }
        let deadline = Instant::now() + PATIENCE;
        let mut shut = self.shut.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *shut && Instant::now() < deadline {
            shut = self.turn.wait_timeout(shut, PATIENCE).unwrap().0;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        self.push(Heard::Complete(task.id, result));
    }

    fn did_become_invalid(&self) {
        self.push(Heard::Invalid);
    }
}

/// Waits until `value` has not changed for `quiet` (at most [`PATIENCE`]).
async fn settled(value: impl Fn() -> u64, quiet: Duration) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut last = value();
    loop {
        tokio::time::sleep(quiet).await;
        let now = value();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// A stage with small socket buffers, so that its count of bytes written shows backpressure
/// rather than the kernel's buffering (DESIGN.md's pitfall on loopback).
async fn small_buffered_stage() -> Stage {
    Stage::builder()
        .send_buffer(4096)
        .recv_buffer(4096)
        .start()
        .await
        .unwrap()
}

/// The kinds of task whose body goes to the delegate.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Data,
    Upload,
}

/// A resumed task of `kind` offered [`OFFER`] chunked bytes.
fn offered(session: &Session, stage: &Stage, kind: Kind) -> AnyTask {
    let url = stage.url(&format!("/bytes/{OFFER}?chunked=1"));
    let task = match kind {
        Kind::Data => {
            let request = http::Request::get(url).body(()).unwrap();
            AnyTask::Data(session.data_task(request).unwrap())
        }
        Kind::Upload => {
            let request = http::Request::post(url).body(()).unwrap();
            let body = UploadBody::Bytes(Bytes::from_static(b"upload"));
            AnyTask::Upload(session.upload_task(request, body).unwrap())
        }
    };
    task.resume();
    task
}

/// A session whose delegate is shut at its gate, and a resumed task of `kind` offered
/// [`OFFER`] chunked bytes; returns once the delegate waits in its first `did_receive_data`
/// and the IO and the server have come to rest.
async fn behind(
    stage: &Stage,
    config: Configuration,
    kind: Kind,
) -> (Session, AnyTask, Arc<Gated>, Ledger, u64) {
    let gated = Gated::shut();
    let session = Session::new(config, Some(gated.clone()));
    let task = offered(&session, stage, kind);
    eventually("the delegate waits in did_receive_data", || {
        gated.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    let quiet = Duration::from_millis(100);
    settled(|| session.resources().buffered_bytes, quiet).await;
    let written = settled(|| stage.body_bytes_written(), quiet).await;
    let ledger = session.resources();
    (session, task, gated, ledger, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegate_a_window_behind_stops_the_socket_being_read_until_it_catches_up() {
    for kind in [Kind::Data, Kind::Upload] {
        window_behind(kind).await;
    }
}

async fn window_behind(kind: Kind) {
    let stage = small_buffered_stage().await;
    let config = Configuration::builder()
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (session, task, gated, ledger, written) = behind(&stage, config, kind).await;
    println!(
        "{kind:?}: a delegate shut at its gate, {OFFER} B offered: ledger {} B buffered (peak {} B), \
         {} callbacks pending, server wrote {written} B, task {:?}",
        ledger.buffered_bytes,
        ledger.peak_buffered_bytes,
        ledger.pending_callbacks,
        task.state()
    );
    assert_eq!(task.state(), TaskState::Running, "{:?}", gated.heard());
    assert!(
        ledger.peak_buffered_bytes <= WINDOW + READ_BUFFER,
        "R6: the delegate's queue went past its window: {ledger:?}"
    );
    assert!(
        written < OFFER / 64,
        "R6: the server wrote {written} B of {OFFER}: the body was drained, not held back"
    );
    // The request timeout is the network's idle time: while the IO waits for our own
    // delegate it is disarmed; the resource timeout runs on.
    assert_eq!(
        ledger.timers, 1,
        "only the resource timeout runs: {ledger:?}"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        task.state(),
        TaskState::Running,
        "R12: a slow delegate is not the network's idleness"
    );

    // The delegate catches up: reading resumes, bytes keep their order.
    gated.open();
    eventually("reading resumes", || gated.bytes() >= 16 * WINDOW).await;
    assert!(
        stage.body_bytes_written() > written,
        "the server writes again"
    );
    assert!(gated.in_order(), "the body reached the delegate in order");
    task.cancel();
    drop(task);
    session.finish_tasks_and_invalidate();
    bounded("R10: the session invalidates", session.invalidated()).await;
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R4: every socket closes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_while_its_delegate_is_behind_drops_what_it_was_not_handed() {
    cancelled_behind(Kind::Data, false).await;
    cancelled_behind(Kind::Upload, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_cancel_while_the_delegate_is_behind_drops_what_it_was_not_handed() {
    cancelled_behind(Kind::Data, true).await;
}

async fn cancelled_behind(kind: Kind, invalidate: bool) {
    let stage = small_buffered_stage().await;
    let (session, task, gated, before, _) = behind(&stage, Configuration::default(), kind).await;
    let id = task.id();
    let delegate: Weak<Gated> = Arc::downgrade(&gated);

    let cancelled = Instant::now();
    if invalidate {
        session.invalidate_and_cancel();
    } else {
        task.cancel();
    }
    assert_eq!(task.state(), TaskState::Completed);
    let at_cancel = session.resources();
    gated.open();
    bounded("did_complete reaches the delegate", async {
        while !gated
            .heard()
            .iter()
            .any(|h| matches!(h, Heard::Complete(..)))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let to_complete = cancelled.elapsed();
    let heard = gated.heard();
    let after_first = &heard[1..];
    let stale: usize = after_first
        .iter()
        .map(|h| match h {
            Heard::Data(t, n) if *t == id => *n,
            _ => 0,
        })
        .sum();
    println!(
        "{kind:?} (invalidate_and_cancel: {invalidate}): cancelled with {} B queued for the delegate ({} callbacks): at cancel {} B, {} \
         callbacks; {stale} B of stale did_receive_data after the one in progress; did_complete \
         {to_complete:.2?} after cancel",
        before.buffered_bytes,
        before.pending_callbacks,
        at_cancel.buffered_bytes,
        at_cancel.pending_callbacks,
    );
    assert_eq!(
        at_cancel.buffered_bytes, 0,
        "R5: a cancelled task's undelivered bytes go with it: {at_cancel:?}"
    );
    assert!(
        matches!(after_first.first(), Some(Heard::Complete(t, Err(Error::Cancelled))) if *t == id),
        "R5: the next callback after the one in progress is did_complete; heard {stale} B of \
         stale data"
    );

    drop(task);
    session.finish_tasks_and_invalidate();
    drop(gated);
    bounded("R10: invalidated() resolves", session.invalidated()).await;
    assert!(
        delegate.upgrade().is_none(),
        "R3: the delegate outlived did_become_invalid"
    );
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R4: every socket closes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_timed_out_while_its_delegate_is_behind_completes_at_once() {
    let stage = small_buffered_stage().await;
    let config = Configuration::builder()
        .resource_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gated = Gated::shut();
    let session = Session::new(config, Some(gated.clone()));
    let request = http::Request::get(stage.url(&format!("/bytes/{OFFER}?chunked=1")))
        .body(())
        .unwrap();
    let task = session.data_task(request).unwrap();
    task.resume();
    eventually("the resource timeout ends the task", || {
        task.state() == TaskState::Completed
    })
    .await;
    let at_end = session.resources();
    let stuck = gated.waiting.load(Ordering::SeqCst);
    gated.open();
    bounded("did_complete reaches the delegate", async {
        while !gated
            .heard()
            .iter()
            .any(|h| matches!(h, Heard::Complete(..)))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let heard = gated.heard();
    let data = heard
        .iter()
        .filter(|h| matches!(h, Heard::Data(..)))
        .count();
    println!(
        "timed out with the delegate at its gate ({stuck} waiting): ledger at completion \
         {at_end:?}; the delegate heard {data} did_receive_data in all"
    );
    assert_eq!(
        at_end.buffered_bytes, 0,
        "R5: a completed task holds no bytes: {at_end:?}"
    );
    assert_eq!(data, 1, "only the callback in progress was delivered");
    assert!(
        matches!(
            heard.last(),
            Some(Heard::Complete(t, Err(Error::TimedOut(leakproof::Timeout::Resource))))
                if *t == task.id()
        ),
        "{heard:?}"
    );
    drop(task);
    session.finish_tasks_and_invalidate();
    bounded("R10: invalidated() resolves", session.invalidated()).await;
    assert!(
        stage.wait_all_closed(PATIENCE).await,
        "R4: every socket closes"
    );
}

#[test]
fn a_delegate_window_no_larger_than_the_read_buffer_is_refused() {
    let error = Configuration::builder()
        .read_buffer(32 * 1024)
        .delegate_window(32 * 1024)
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfiguration(_)), "{error}");
    assert!(error.to_string().contains("delegate_window"), "{error}");
    let config = Configuration::default();
    assert_eq!(config.delegate_window() as u64, WINDOW);
    assert_eq!(config.read_buffer() as u64, READ_BUFFER);
}
