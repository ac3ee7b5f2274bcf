//! Answers given later, through a `Responder`: the delegate's callback returns at once, the
//! session's other callbacks flow meanwhile (checked by their order, not by time), the task
//! waits reading nothing with its request timeout stopped, and a responder dropped, cancelled
//! or answered too late releases everything. The witnesses are the kernel's list of this
//! process's sockets to the stage (read while `did_complete` runs) and a `Weak` to the
//! delegate. Every wait is bounded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Disposition, Error, Observer, Redirect, Responder, Session,
    StreamTask, TaskId, TaskInfo, Timeout,
};
use leakproof_check::scenario::{bounded, eventually};
use leakproof_check::stage::{Peers, Stage, percent_encode};
use leakproof_check::witness::client_sockets_of;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    Redirect(TaskId),
    Response(TaskId, u16),
    Data(TaskId, usize),
    BecameDownload(TaskId),
    Downloaded(TaskId, u64),
    BecameStream(TaskId),
    /// The result, and this process's sockets to the stage as `did_complete` runs.
    Complete(TaskId, Result<(), String>, usize),
    Invalid,
}

/// A redirect's responder, kept with the request proposed.
type KeptRedirect = (Responder<Redirect>, http::Request<()>);

/// Answers at once, unless a task is marked to be answered later: then it keeps the
/// responder for the test to answer, drop or forget.
struct Later {
    heard: Mutex<Vec<Heard>>,
    later: Mutex<HashSet<TaskId>>,
    /// Dropped in the callback, unanswered.
    drop_at_once: Mutex<HashSet<TaskId>>,
    responders: Mutex<HashMap<TaskId, Responder<Disposition>>>,
    redirects: Mutex<HashMap<TaskId, KeptRedirect>>,
    streams: Mutex<Vec<StreamTask>>,
    peers: Peers,
    observer: OnceLock<Observer>,
}

impl Later {
    fn new(stage: &Stage) -> Arc<Later> {
        Arc::new(Later {
            heard: Mutex::default(),
            later: Mutex::default(),
            drop_at_once: Mutex::default(),
            responders: Mutex::default(),
            redirects: Mutex::default(),
            streams: Mutex::default(),
            peers: stage.peers(),
            observer: OnceLock::new(),
        })
    }

    fn session(self: &Arc<Self>) -> Session {
        let session = Session::new(Configuration::default(), Some(self.clone()));
        let _ = self.observer.set(session.observer());
        session
    }

    fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    fn push(&self, heard: Heard) {
        self.heard.lock().unwrap().push(heard);
    }

    fn of(&self, task: TaskId) -> Vec<Heard> {
        self.heard()
            .into_iter()
            .filter(|h| match h {
                Heard::Redirect(t)
                | Heard::Response(t, _)
                | Heard::Data(t, _)
                | Heard::BecameDownload(t)
                | Heard::Downloaded(t, _)
                | Heard::BecameStream(t)
                | Heard::Complete(t, ..) => *t == task,
                Heard::Invalid => false,
            })
            .collect()
    }

    fn completion(&self, task: TaskId) -> Option<(Result<(), String>, usize)> {
        self.heard().into_iter().find_map(|h| match h {
            Heard::Complete(t, result, sockets) if t == task => Some((result, sockets)),
            _ => None,
        })
    }

    async fn completed(&self, task: TaskId) -> (Result<(), String>, usize) {
        eventually("did_complete", || self.completion(task).is_some()).await;
        self.completion(task).unwrap()
    }

    /// The responder kept for `task`, once its response arrived.
    async fn responder(&self, task: TaskId) -> Responder<Disposition> {
        eventually("did_receive_response_with", || {
            self.responders.lock().unwrap().contains_key(&task)
        })
        .await;
        self.responders.lock().unwrap().remove(&task).unwrap()
    }
}

impl Delegate for Later {
    fn did_receive_response_with(
        &self,
        task: &TaskInfo,
        response: &http::Response<()>,
        responder: Responder<Disposition>,
    ) {
        self.push(Heard::Response(task.id, response.status().as_u16()));
        if self.drop_at_once.lock().unwrap().contains(&task.id) {
            drop(responder);
        } else if self.later.lock().unwrap().contains(&task.id) {
            self.responders.lock().unwrap().insert(task.id, responder);
        } else {
            responder.answer(Disposition::Allow);
        }
    }

    fn will_perform_redirection_with(
        &self,
        task: &TaskInfo,
        _response: &http::Response<()>,
        request: http::Request<()>,
        responder: Responder<Redirect>,
    ) {
        self.push(Heard::Redirect(task.id));
        if self.later.lock().unwrap().contains(&task.id) {
            let kept = (responder, request);
            self.redirects.lock().unwrap().insert(task.id, kept);
        } else {
            responder.answer(Redirect::Follow(request));
        }
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        self.push(Heard::Data(task.id, data.len()));
    }

    fn did_become_download(&self, task: &TaskInfo) {
        self.push(Heard::BecameDownload(task.id));
    }

    fn did_finish_downloading(&self, task: &TaskInfo, location: &std::path::Path) {
        let len = std::fs::metadata(location).map_or(0, |m| m.len());
        self.push(Heard::Downloaded(task.id, len));
    }

    fn did_become_stream(&self, task: &TaskInfo, stream: StreamTask) {
        self.push(Heard::BecameStream(task.id));
        self.streams.lock().unwrap().push(stream);
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let sockets = client_sockets_of(&self.peers).unwrap();
        let result = result.map_err(|e| format!("{e:?}"));
        self.push(Heard::Complete(task.id, result, sockets));
    }

    fn did_become_invalid(&self) {
        self.push(Heard::Invalid);
    }
}

#[tokio::test]
async fn an_answer_given_later_lets_the_other_tasks_callbacks_through_meanwhile() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let session = delegate.session();
    let waiting = session.data_task(get(stage.url("/bytes/5"))).unwrap();
    let other = session.data_task(get(stage.url("/bytes/7"))).unwrap();
    let (a, b) = (waiting.id(), other.id());
    delegate.later.lock().unwrap().insert(a);
    waiting.resume();
    let responder = bounded("the response", delegate.responder(a)).await;
    // While `waiting`'s answer is pending, `other` runs to its end: its callbacks are
    // delivered, so the delivery is not held up by the pending answer.
    other.resume();
    let (result, _) = bounded("the other task", delegate.completed(b)).await;
    assert_eq!(result, Ok(()));
    // Pending: nothing read for the delegate, and only the resource timeout runs.
    let ledger = session.resources();
    assert_eq!((ledger.buffered_bytes, ledger.timers), (0, 1), "{ledger:?}");
    assert_eq!(ledger.open_connections, 1);
    responder.answer(Disposition::Allow);
    let (result, sockets) = bounded("the answered task", delegate.completed(a)).await;
    assert_eq!(result, Ok(()));
    assert_eq!(sockets, 2, "both connections pooled");
    let heard = delegate.heard();
    let b_done = heard
        .iter()
        .position(|h| matches!(h, Heard::Complete(t, ..) if *t == b))
        .unwrap();
    let a_data = heard
        .iter()
        .position(|h| matches!(h, Heard::Data(t, _) if *t == a))
        .unwrap();
    assert!(b_done < a_data, "{heard:?}");
    assert_eq!(
        delegate.of(a)[..2],
        [Heard::Response(a, 200), Heard::Data(a, 5)]
    );
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
}

#[tokio::test]
async fn the_request_timeout_stops_while_the_answer_is_pending_the_resource_timeout_does_not() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let session = delegate.session();
    let observer = session.observer();
    let task = session.data_task(get(stage.url("/bytes/5"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    let responder = bounded("the response", delegate.responder(id)).await;
    // Pending once the callback has returned unanswered: the request timer is disarmed then,
    // the resource timer runs on (the engine's unit tests check the request timer's return).
    eventually("the request timer disarmed", || {
        session.resources().timers == 1
    })
    .await;
    responder.answer(Disposition::Allow);
    let (result, _) = bounded("completed", delegate.completed(id)).await;
    assert_eq!(result, Ok(()));
    // A second task whose answer never comes: its resource timeout ends it.
    let task = session.data_task(get(stage.url("/bytes/5"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    let responder = bounded("the response", delegate.responder(id)).await;
    observer.time_passes(id, Timeout::Resource);
    let (result, sockets) = bounded("timed out", delegate.completed(id)).await;
    assert_eq!(
        result,
        Err(format!("{:?}", Error::TimedOut(Timeout::Resource)))
    );
    assert_eq!(
        sockets, 0,
        "its connection (the first task's, taken again) closed"
    );
    // Too late: nothing happens.
    responder.answer(Disposition::Allow);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert_eq!(delegate.of(id).len(), 2, "{:?}", delegate.of(id));
}

#[tokio::test]
async fn a_responder_dropped_unanswered_cancels_its_task_and_closes_its_connection() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let session = delegate.session();
    // Dropped later, by whoever held it.
    let task = session.data_task(get(stage.url("/bytes/100000"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    let responder = bounded("the response", delegate.responder(id)).await;
    drop(responder);
    let (result, sockets) = bounded("cancelled", delegate.completed(id)).await;
    assert_eq!(result, Err(format!("{:?}", Error::Cancelled)));
    assert_eq!(sockets, 0, "closed when did_complete runs");
    // Dropped in the callback itself.
    let task = session.data_task(get(stage.url("/bytes/100000"))).unwrap();
    let id = task.id();
    delegate.drop_at_once.lock().unwrap().insert(id);
    task.resume();
    let (result, sockets) = bounded("cancelled", delegate.completed(id)).await;
    assert_eq!(result, Err(format!("{:?}", Error::Cancelled)));
    assert_eq!(sockets, 0, "closed when did_complete runs");
    assert_eq!(session.resources().open_connections, 0);
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn cancel_while_the_answer_is_pending_completes_the_task_and_the_answer_is_a_no_op() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let session = delegate.session();
    let task = session.data_task(get(stage.url("/bytes/5"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    let responder = bounded("the response", delegate.responder(id)).await;
    task.cancel();
    let (result, sockets) = bounded("cancelled", delegate.completed(id)).await;
    assert_eq!(result, Err(format!("{:?}", Error::Cancelled)));
    assert_eq!(sockets, 0);
    responder.answer(Disposition::Allow);
    // Nothing about the task after its did_complete (R1): a later task's whole life is heard
    // after the answer, and still nothing came for this one.
    let next = session.data_task(get(stage.url("/bytes/3"))).unwrap();
    next.resume();
    let (result, _) = bounded("the next task", delegate.completed(next.id())).await;
    assert_eq!(result, Ok(()));
    let heard = delegate.of(id);
    assert!(
        matches!(heard[..], [Heard::Response(..), Heard::Complete(..)]),
        "{heard:?}"
    );
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
}

#[tokio::test]
async fn an_answer_after_invalidate_and_cancel_is_harmless() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let weak = Arc::downgrade(&delegate);
    let session = delegate.session();
    let task = session.data_task(get(stage.url("/bytes/5"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    let responder = bounded("the response", delegate.responder(id)).await;
    session.invalidate_and_cancel();
    bounded("invalidated", session.invalidated()).await;
    let heard = delegate.heard();
    drop(delegate);
    assert!(weak.upgrade().is_none(), "R3: the delegate was dropped");
    assert_eq!(heard.last(), Some(&Heard::Invalid));
    assert!(matches!(heard[heard.len() - 2], Heard::Complete(t, Err(_), 0) if t == id));
    // The session is gone; the answer finds nothing to do.
    responder.answer(Disposition::Allow);
    drop(task);
    drop(session);
    assert!(stage.wait_all_closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn become_stream_and_become_download_can_be_answered_later() {
    let stage = Stage::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let delegate = Later::new(&stage);
    let config = Configuration::builder()
        .download_dir(dir.path())
        .build()
        .unwrap();
    let session = Session::new(config, Some(delegate.clone()));
    let streamed = session.data_task(get(stage.url("/bytes/70000"))).unwrap();
    let downloaded = session.data_task(get(stage.url("/bytes/80000"))).unwrap();
    let (s, d) = (streamed.id(), downloaded.id());
    delegate.later.lock().unwrap().extend([s, d]);
    streamed.resume();
    downloaded.resume();
    let to_stream = bounded("a response", delegate.responder(s)).await;
    let to_download = bounded("a response", delegate.responder(d)).await;
    // Answered from other threads, in the opposite order.
    let answering = std::thread::spawn(move || {
        to_download.answer(Disposition::BecomeDownload);
        to_stream.answer(Disposition::BecomeStream);
    });
    answering.join().unwrap();
    let (result, _) = bounded("downloaded", delegate.completed(d)).await;
    assert_eq!(result, Ok(()));
    assert_eq!(
        delegate.of(d)[1..3],
        [Heard::BecameDownload(d), Heard::Downloaded(d, 80_000)]
    );
    eventually("did_become_stream", || {
        !delegate.streams.lock().unwrap().is_empty()
    })
    .await;
    let stream = delegate.streams.lock().unwrap().pop().unwrap();
    let mut read = 0;
    while let Some(bytes) = bounded("read", stream.read(1, 65536, Duration::from_secs(5)))
        .await
        .unwrap()
    {
        read += bytes.len();
    }
    assert_eq!(read, 70_000);
    drop(stream);
    let (result, _) = bounded("the stream", delegate.completed(s)).await;
    assert_eq!(result, Ok(()));
    drop((streamed, downloaded));
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[tokio::test]
async fn a_redirect_can_be_answered_later_and_a_dropped_one_cancels() {
    let stage = Stage::start().await.unwrap();
    let delegate = Later::new(&stage);
    let session = delegate.session();
    let url = |code| {
        stage.url(&format!(
            "/redirect/{code}?to={}",
            percent_encode("/bytes/5")
        ))
    };
    let task = session.data_task(get(url(302))).unwrap();
    let other = session.data_task(get(stage.url("/bytes/7"))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    eventually("will_perform_redirection_with", || {
        delegate.redirects.lock().unwrap().contains_key(&id)
    })
    .await;
    other.resume();
    let (result, _) = bounded("the other task", delegate.completed(other.id())).await;
    assert_eq!(result, Ok(()));
    delegate.later.lock().unwrap().remove(&id);
    let (responder, request) = delegate.redirects.lock().unwrap().remove(&id).unwrap();
    responder.answer(Redirect::Follow(request));
    let (result, _) = bounded("followed", delegate.completed(id)).await;
    assert_eq!(result, Ok(()));
    assert_eq!(
        delegate.of(id),
        [
            Heard::Redirect(id),
            Heard::Response(id, 200),
            Heard::Data(id, 5),
            delegate.of(id)[3].clone()
        ]
    );
    // A redirect's responder dropped unanswered cancels the task.
    let task = session.data_task(get(url(307))).unwrap();
    let id = task.id();
    delegate.later.lock().unwrap().insert(id);
    task.resume();
    eventually("will_perform_redirection_with", || {
        delegate.redirects.lock().unwrap().contains_key(&id)
    })
    .await;
    let kept = delegate.redirects.lock().unwrap().remove(&id).unwrap();
    drop(kept);
    let (result, sockets) = bounded("cancelled", delegate.completed(id)).await;
    assert_eq!(result, Err(format!("{:?}", Error::Cancelled)));
    assert_eq!(sockets, 1, "the other one pooled; its own closed");
    session.finish_tasks_and_invalidate();
    bounded("invalidated", session.invalidated()).await;
}
