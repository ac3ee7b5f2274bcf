//! Scenarios: one terminal path of one kind of task, run by the real client against the
//! stage, then checked with every witness: the trace (R1, R2), a `Weak` to the delegate (R3),
//! the stage's socket counts and the ledger (R4, R5), and the download directory (R5).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{
    Configuration, ConfigurationBuilder, DataTask, Delegate, Disposition, DownloadTask, Error,
    Observer, Session, SessionTask, StreamTask, TaskId, TaskInfo, TaskState, UploadBody,
    UploadTask, WebSocketTask,
};
use leakproof_model::rules::{check_trace, coalesce};
use leakproof_model::{Callback, Outcome, SessionId, Timer};
use tokio::sync::Notify;

use crate::engine_sut::model_outcome;
use crate::stage::Stage;
use crate::witness;

/// How long any wait of a scenario may take before it fails: real time, generous, bounded.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The kinds of task a scenario can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data,
    Download,
    Upload,
}

/// The terminal paths of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completion,
    CancelBeforeResume,
    /// Cancelled after the request went out, before any response.
    CancelWhileConnecting,
    CancelMidBody,
    SuspendThenCancel,
    InvalidateAndCancel,
    FinishTasksAndInvalidate,
    /// Every handle dropped, nothing invalidated: the seed's connection leak (R10).
    LastHandleDropped,
    ServerReset,
    Malformed,
    RequestTimeout,
    ResourceTimeout,
}

/// What the delegate heard, in the model's words, for the rules' checks.
#[derive(Debug, Default)]
pub struct Trace {
    heard: Mutex<Vec<Callback>>,
    /// Size of each file handed to did_finish_downloading, read during the call.
    downloaded: Mutex<Vec<u64>>,
    changed: Notify,
}

impl Trace {
    pub fn heard(&self) -> Vec<Callback> {
        self.heard.lock().unwrap().clone()
    }

    pub fn downloaded(&self) -> Vec<u64> {
        self.downloaded.lock().unwrap().clone()
    }

    fn push(&self, callback: Callback) {
        self.heard.lock().unwrap().push(callback);
        self.changed.notify_waiters();
    }

    /// Wait until what was heard satisfies `done`.
    pub async fn until(&self, done: impl Fn(&[Callback]) -> bool) -> bool {
        patiently(async {
            loop {
                let changed = self.changed.notified();
                if done(&self.heard()) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .is_some()
    }

    /// Body bytes heard for `task` so far.
    pub fn bytes(&self, task: TaskId) -> u64 {
        bytes_of(&self.heard(), task)
    }

    /// How `task` ended, if it has.
    pub fn outcome(&self, task: TaskId) -> Option<Outcome> {
        outcome_of(&self.heard(), task)
    }
}

/// Await `work` for at most [`PATIENCE`] of real time; panic, naming `what`, after that.
pub async fn bounded<F: std::future::Future>(what: &str, work: F) -> F::Output {
    patiently(work)
        .await
        .unwrap_or_else(|| panic!("{what}: still waiting after {PATIENCE:?}"))
}

/// Wait until `done` holds, checking every few milliseconds, at most [`PATIENCE`]; panic,
/// naming `what`, after that.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    bounded(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Await `work` for at most [`PATIENCE`] of real time. Not tokio's clock: under paused time it
/// would run out at once, while the delegate's thread is still delivering.
pub async fn patiently<F: std::future::Future>(work: F) -> Option<F::Output> {
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return Some(out),
            () = tokio::time::sleep(Duration::from_millis(2)) => {
                if std::time::Instant::now() >= deadline {
                    return None;
                }
            }
        }
    }
}

fn model_task(task: TaskId) -> leakproof_model::TaskId {
    leakproof_model::TaskId(task.0 as u32)
}

fn bytes_of(heard: &[Callback], task: TaskId) -> u64 {
    heard
        .iter()
        .map(|c| match c {
            Callback::ReceiveData { task: t, bytes } if *t == model_task(task) => *bytes,
            _ => 0,
        })
        .sum()
}

fn outcome_of(heard: &[Callback], task: TaskId) -> Option<Outcome> {
    heard.iter().find_map(|c| match c {
        Callback::Complete { task: t, outcome } if *t == model_task(task) => Some(*outcome),
        _ => None,
    })
}

/// A delegate that writes down everything it hears and answers `answer` to every response.
#[derive(Debug)]
pub struct Recorder {
    trace: Arc<Trace>,
    answer: Disposition,
}

impl Delegate for Recorder {
    fn did_receive_response(&self, task: &TaskInfo, _: &http::Response<()>) -> Disposition {
        self.trace.push(Callback::ReceiveResponse {
            task: model_task(task.id),
        });
        self.answer
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        self.trace.push(Callback::ReceiveData {
            task: model_task(task.id),
            bytes: data.len() as u64,
        });
    }

    fn did_become_download(&self, task: &TaskInfo) {
        self.trace.push(Callback::BecomeDownload {
            task: model_task(task.id),
        });
    }

    fn did_finish_downloading(&self, task: &TaskInfo, location: &std::path::Path) {
        let size = std::fs::metadata(location).map_or(0, |m| m.len());
        self.trace.downloaded.lock().unwrap().push(size);
        self.trace.push(Callback::FinishDownloading {
            task: model_task(task.id),
        });
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        self.trace.push(Callback::Complete {
            task: model_task(task.id),
            outcome: model_outcome(&result),
        });
    }

    fn did_become_invalid(&self) {
        self.trace.push(Callback::BecomeInvalid {
            session: SessionId(0),
        });
    }
}

/// A task of any kind, for scenarios that do not care which.
#[derive(Debug)]
pub enum AnyTask {
    Data(DataTask),
    Download(DownloadTask),
    Upload(UploadTask),
    Stream(StreamTask),
    WebSocket(WebSocketTask),
}

impl AnyTask {
    /// The handle, whatever its kind.
    pub fn as_task(&self) -> &dyn SessionTask {
        match self {
            AnyTask::Data(t) => t,
            AnyTask::Download(t) => t,
            AnyTask::Upload(t) => t,
            AnyTask::Stream(t) => t,
            AnyTask::WebSocket(t) => t,
        }
    }

    pub fn id(&self) -> TaskId {
        self.as_task().id()
    }

    pub fn state(&self) -> TaskState {
        self.as_task().state()
    }

    pub fn resume(&self) {
        self.as_task().resume();
    }

    pub fn suspend(&self) {
        self.as_task().suspend();
    }

    pub fn cancel(&self) {
        self.as_task().cancel();
    }
}

/// A stage, a delegated session on it, and the witnesses.
#[derive(Debug)]
pub struct Scene {
    pub stage: Stage,
    pub session: Option<Session>,
    pub observer: Observer,
    pub trace: Arc<Trace>,
    pub delegate: Weak<Recorder>,
    pub downloads: tempfile::TempDir,
}

/// The request body of upload scenarios.
pub const UPLOAD: usize = 64 * 1024;

impl Scene {
    /// A scene whose delegate answers `Allow`, with `config` (its download directory is set
    /// to a fresh temp dir).
    pub async fn new(config: ConfigurationBuilder) -> Scene {
        Self::answering(config, Disposition::Allow).await
    }

    pub async fn answering(config: ConfigurationBuilder, answer: Disposition) -> Scene {
        let stage = Stage::start().await.expect("the stage starts");
        let downloads = tempfile::tempdir().expect("a temp dir");
        let config = config
            .download_dir(downloads.path())
            .build()
            .expect("a valid configuration");
        let trace = Arc::new(Trace::default());
        let recorder = Arc::new(Recorder {
            trace: trace.clone(),
            answer,
        });
        let delegate = Arc::downgrade(&recorder);
        let session = Session::new(config, Some(recorder));
        Scene {
            stage,
            observer: session.observer(),
            session: Some(session),
            trace,
            delegate,
            downloads,
        }
    }

    pub fn session(&self) -> &Session {
        self.session
            .as_ref()
            .expect("the scene still holds its session")
    }

    pub fn request(&self, method: &str, path: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(self.stage.url(path))
            .body(())
            .expect("a valid request")
    }

    /// A task of `kind` for the stage's `path`.
    pub fn task(&self, kind: Kind, path: &str) -> AnyTask {
        let session = self.session();
        match kind {
            Kind::Data => AnyTask::Data(session.data_task(self.request("GET", path)).unwrap()),
            Kind::Download => {
                AnyTask::Download(session.download_task(self.request("GET", path)).unwrap())
            }
            Kind::Upload => AnyTask::Upload(
                session
                    .upload_task(
                        self.request("POST", path),
                        UploadBody::Bytes(Bytes::from(vec![b'u'; UPLOAD])),
                    )
                    .unwrap(),
            ),
        }
    }

    /// Wait until the task has completed; its outcome.
    pub async fn outcome(&self, task: TaskId) -> Outcome {
        assert!(
            self.trace.until(|h| outcome_of(h, task).is_some()).await,
            "{task:?} did not complete; heard {:?}",
            self.trace.heard()
        );
        self.trace.outcome(task).unwrap()
    }

    /// Wait until the body has started to flow: the delegate heard bytes (data, upload) or
    /// the stage wrote them (download).
    pub async fn mid_body(&self, kind: Kind, task: TaskId, bytes: u64) {
        let flowing = match kind {
            Kind::Download => {
                self.stage
                    .wait_until(|s| s.body_bytes_written() >= bytes, PATIENCE)
                    .await
            }
            _ => self.trace.until(|h| bytes_of(h, task) >= bytes).await,
        };
        assert!(flowing, "no body flowed; heard {:?}", self.trace.heard());
    }

    /// Let go of the session (and whatever task handles the caller dropped), then check every
    /// witness: the session is invalidated and holds nothing, the delegate heard a lawful trace
    /// and is gone, the stage saw every socket closed, the download directory is empty.
    pub async fn assert_released(mut self) {
        drop(self.session.take());
        let invalidated = patiently(self.observer.invalidated()).await;
        let heard = self.trace.heard();
        assert!(
            invalidated.is_some(),
            "R10: not invalidated; heard {heard:?}, holds {:?}",
            self.observer.resources()
        );
        check_trace(&heard, true).unwrap_or_else(|v| panic!("{v}; heard {heard:?}"));
        assert!(
            self.delegate.upgrade().is_none(),
            "R3: the delegate outlived did_become_invalid"
        );
        let held = self.observer.resources();
        assert!(held.is_zero(), "R4: the ledger says {held:?}");
        assert!(
            self.stage.wait_all_closed(PATIENCE).await,
            "R4: the stage still sees {} of {} sockets open",
            self.stage.open(),
            self.stage.accepted()
        );
        let left = witness::files_in(self.downloads.path()).expect("the download dir");
        assert!(left.is_empty(), "R5: temp files left behind: {left:?}");
    }
}

/// Paths that leave the body flowing for long enough to act mid-body.
const STALLS: &str = "/bytes/1000000?stall_after=4096";

/// Run one terminal path of one kind of task and check everything.
pub async fn ending(kind: Kind, ending: Ending) {
    let config = match ending {
        Ending::RequestTimeout => {
            Configuration::builder().request_timeout(Duration::from_millis(500))
        }
        Ending::ResourceTimeout => {
            Configuration::builder().resource_timeout(Duration::from_millis(500))
        }
        _ => Configuration::builder(),
    };
    let scene = Scene::new(config).await;
    let (path, expected) = match ending {
        Ending::Completion | Ending::FinishTasksAndInvalidate | Ending::LastHandleDropped => {
            ("/bytes/100000", Outcome::Success)
        }
        Ending::CancelBeforeResume
        | Ending::CancelMidBody
        | Ending::SuspendThenCancel
        | Ending::InvalidateAndCancel => (STALLS, Outcome::Cancelled),
        Ending::CancelWhileConnecting => ("/bytes/10?stall_headers=1", Outcome::Cancelled),
        Ending::ServerReset => ("/bytes/1000000?reset_after=4096", Outcome::Reset),
        Ending::Malformed => ("/bytes/10?malformed=status", Outcome::Malformed),
        Ending::RequestTimeout => (STALLS, Outcome::TimedOut(Timer::Request)),
        Ending::ResourceTimeout => (
            "/bytes/100000000?pace_ms=5&chunk=1024",
            Outcome::TimedOut(Timer::Resource),
        ),
    };
    let task = scene.task(kind, path);
    let id = task.id();
    match ending {
        Ending::CancelBeforeResume => task.cancel(),
        Ending::CancelWhileConnecting => {
            task.resume();
            assert!(
                scene
                    .stage
                    .wait_until(|s| s.requests() >= 1, PATIENCE)
                    .await
            );
            task.cancel();
        }
        Ending::CancelMidBody => {
            task.resume();
            scene.mid_body(kind, id, 4096).await;
            task.cancel();
        }
        Ending::SuspendThenCancel => {
            task.resume();
            scene.mid_body(kind, id, 4096).await;
            task.suspend();
            assert_eq!(task.state(), TaskState::Suspended);
            task.cancel();
        }
        Ending::InvalidateAndCancel => {
            task.resume();
            scene.mid_body(kind, id, 4096).await;
            scene.session().invalidate_and_cancel();
        }
        Ending::FinishTasksAndInvalidate => {
            task.resume();
            scene.session().finish_tasks_and_invalidate();
            assert!(
                scene
                    .session()
                    .data_task(scene.request("GET", "/bytes/1"))
                    .is_err()
            );
        }
        Ending::Completion
        | Ending::LastHandleDropped
        | Ending::ServerReset
        | Ending::Malformed
        | Ending::RequestTimeout
        | Ending::ResourceTimeout => task.resume(),
    }
    assert_eq!(scene.outcome(id).await, expected, "{kind:?} {ending:?}");
    assert_eq!(task.state(), TaskState::Completed);
    if expected == Outcome::Success {
        match kind {
            Kind::Download => assert_eq!(scene.trace.downloaded(), [100_000]),
            _ => assert_eq!(scene.trace.bytes(id), 100_000),
        }
        if kind == Kind::Upload {
            assert_eq!(scene.stage.request_body_bytes(), UPLOAD as u64);
        }
    }
    if ending == Ending::CancelBeforeResume {
        assert_eq!(
            scene.stage.accepted(),
            0,
            "a task never resumed connects nowhere"
        );
    }
    let heard = coalesce(&scene.trace.heard());
    assert!(
        heard
            .iter()
            .all(|c| c.task().is_none() || c.task() == Some(model_task(id))),
        "{heard:?}"
    );
    drop(task);
    if ending == Ending::LastHandleDropped {
        assert!(
            scene.stage.accepted() == 1 && scene.stage.open() == 1,
            "the connection is pooled until the session goes"
        );
    }
    scene.assert_released().await;
}
