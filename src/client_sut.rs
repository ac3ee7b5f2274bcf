//! The real client as the system under test: `leakproof` sessions, each against a stage of
//! its own whose held exchanges play the model's server op by op (`/hold/t3` is task t3's
//! request). One tokio runtime per case. After each op the world waits, within a deadline,
//! until what it shows matches the model; what it shows comes from the witnesses wherever one
//! exists: the stage's open sockets, the download directory, a `Weak` to the delegate, and
//! the callbacks the delegate heard.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Error, Observer, Session, StreamTask, TaskInfo, Timeout, UploadBody,
    UrlCache,
};
use leakproof_model::{
    CACHE_ENTRIES, CACHED_BODY, Callback, CloseFrame, Disposition, Fault, MAX_REDIRECTS, Op,
    Outcome, Redirect, Refusal, ResourceId, Resources, Returned, SessionId, SessionKind, TaskId,
    TaskKind, Timer,
};

use crate::assertions::{SessionView, View};
use crate::engine_sut::{model_outcome, model_resources, model_session_state, model_task_state};
use crate::machine::System;
use crate::scenario::AnyTask;
use crate::stage::{Held, HeldRaw, HeldWs, Liveness, RawScript, Stage};
use crate::witness;

/// How long an op may take to settle before the world shows what it has.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a matching view must stay matching, to catch a callback right behind.
const GRACE: Duration = Duration::from_millis(3);
/// How long a server op waits for its request to arrive.
const ARRIVAL: Duration = Duration::from_secs(3);
/// Upload tasks send this many bytes.
const UPLOAD: usize = 1000;
/// A stream op never waits this long: the model's reads take what is there.
const STREAM_OP: Duration = Duration::from_secs(1);

/// Every session the sequence created, on one runtime.
pub struct ClientWorld {
    runtime: tokio::runtime::Runtime,
    sessions: BTreeMap<SessionId, Sim>,
    session_of: BTreeMap<TaskId, SessionId>,
}

impl std::fmt::Debug for ClientWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientWorld")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Default for ClientWorld {
    fn default() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Self {
            runtime,
            sessions: BTreeMap::new(),
            session_of: BTreeMap::new(),
        }
    }
}

/// What a session's delegate heard, in the model's words, and what it answers.
#[derive(Debug, Default)]
struct Ear {
    heard: Mutex<Vec<Callback>>,
    ids: Mutex<HashMap<leakproof::TaskId, TaskId>>,
    answers: Mutex<HashMap<leakproof::TaskId, Disposition>>,
    /// Streams the delegate was handed, kept while the user holds the data task (the model's
    /// convention), and the tasks the user let go of.
    streams: Mutex<HashMap<leakproof::TaskId, StreamTask>>,
    dropped: Mutex<HashSet<leakproof::TaskId>>,
    /// The delegate is slow: its callbacks other than did_receive_data wait here, once heard,
    /// until released.
    slow: Mutex<bool>,
    released: std::sync::Condvar,
    /// The delegate answers its next question later: it keeps the responder.
    defers: Mutex<bool>,
    /// The responders it kept, unanswered, with the answer each will give.
    responders: Mutex<HashMap<TaskId, Kept>>,
    /// What it answers to each task's redirects.
    redirects: Mutex<HashMap<leakproof::TaskId, Redirect>>,
}

/// A responder the delegate kept, and the answer it will give.
#[derive(Debug)]
enum Kept {
    Disposition(leakproof::Responder<leakproof::Disposition>),
    Redirect(
        leakproof::Responder<leakproof::Redirect>,
        Box<leakproof::Redirect>,
    ),
}

impl Ear {
    /// Stay in the callback while the delegate is slow.
    fn keep_up(&self) {
        let slow = self.slow.lock().unwrap();
        drop(self.released.wait_while(slow, |slow| *slow).unwrap());
    }

    fn pace(&self, slow: bool) {
        *self.slow.lock().unwrap() = slow;
        self.released.notify_all();
    }
}

#[derive(Debug)]
struct Listener {
    session: SessionId,
    ear: Arc<Ear>,
}

impl Listener {
    /// Record the callback as it comes in, then stay in it while the delegate is slow.
    fn hear(&self, task: &TaskInfo, callback: impl FnOnce(TaskId) -> Callback) {
        self.hear_only(task, callback);
        self.ear.keep_up();
    }

    /// Record the callback; did_receive_data returns at once, whatever the pace.
    fn hear_only(&self, task: &TaskInfo, callback: impl FnOnce(TaskId) -> Callback) {
        let id = self.ear.ids.lock().unwrap()[&task.id];
        self.ear.heard.lock().unwrap().push(callback(id));
    }
}

impl Ear {
    /// What the delegate answers to the task's response head.
    fn answer(&self, task: leakproof::TaskId) -> leakproof::Disposition {
        let answer = self.answers.lock().unwrap().get(&task).copied();
        match answer.unwrap_or(Disposition::Allow) {
            Disposition::Allow => leakproof::Disposition::Allow,
            Disposition::Cancel => leakproof::Disposition::Cancel,
            Disposition::BecomeDownload => leakproof::Disposition::BecomeDownload,
            Disposition::BecomeStream => leakproof::Disposition::BecomeStream,
        }
    }
}

impl Delegate for Listener {
    fn did_receive_response_with(
        &self,
        task: &TaskInfo,
        _: &http::Response<()>,
        responder: leakproof::Responder<leakproof::Disposition>,
    ) {
        self.hear(task, |task| Callback::ReceiveResponse { task });
        if std::mem::take(&mut *self.ear.defers.lock().unwrap()) {
            let id = self.ear.ids.lock().unwrap()[&task.id];
            let kept = Kept::Disposition(responder);
            self.ear.responders.lock().unwrap().insert(id, kept);
        } else {
            responder.answer(self.ear.answer(task.id));
        }
    }

    fn will_perform_redirection_with(
        &self,
        task: &TaskInfo,
        _: &http::Response<()>,
        request: http::Request<()>,
        responder: leakproof::Responder<leakproof::Redirect>,
    ) {
        self.hear(task, |task| Callback::WillRedirect { task });
        let answer = self.ear.redirects.lock().unwrap().get(&task.id).copied();
        let answer = match answer.unwrap_or(Redirect::Follow) {
            Redirect::Follow => leakproof::Redirect::Follow(request),
            Redirect::Refuse => leakproof::Redirect::Refuse,
        };
        if std::mem::take(&mut *self.ear.defers.lock().unwrap()) {
            let id = self.ear.ids.lock().unwrap()[&task.id];
            let kept = Kept::Redirect(responder, Box::new(answer));
            self.ear.responders.lock().unwrap().insert(id, kept);
        } else {
            responder.answer(answer);
        }
    }

    fn did_become_stream(&self, task: &TaskInfo, stream: StreamTask) {
        self.hear(task, |task| Callback::BecomeStream { task });
        if !self.ear.dropped.lock().unwrap().contains(&task.id) {
            self.ear.streams.lock().unwrap().insert(task.id, stream);
        }
    }

    fn did_open(&self, task: &TaskInfo, _: Option<&str>) {
        self.hear(task, |task| Callback::Open { task });
    }

    fn did_close(&self, task: &TaskInfo, _: leakproof::CloseCode, _: &str) {
        self.hear(task, |task| Callback::Close { task });
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        let bytes = data.len() as u64;
        self.hear_only(task, |task| Callback::ReceiveData { task, bytes });
    }

    fn did_become_download(&self, task: &TaskInfo) {
        self.hear(task, |task| Callback::BecomeDownload { task });
    }

    fn did_finish_downloading(&self, task: &TaskInfo, _: &std::path::Path) {
        self.hear(task, |task| Callback::FinishDownloading { task });
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let outcome = model_outcome(&result);
        self.hear(task, |task| Callback::Complete { task, outcome });
    }

    fn did_become_invalid(&self) {
        let session = self.session;
        self.ear
            .heard
            .lock()
            .unwrap()
            .push(Callback::BecomeInvalid { session });
        self.ear.keep_up();
    }
}

/// One session, its stage and its download directory.
struct Sim {
    kind: SessionKind,
    session: Option<Session>,
    observer: Observer,
    stage: Stage,
    downloads: tempfile::TempDir,
    delegate: Option<Weak<Listener>>,
    ear: Arc<Ear>,
    /// How many of the heard callbacks earlier views reported.
    reported: usize,
    /// What conveniences' futures returned, as they returned, and how many earlier views
    /// reported.
    awaited: Arc<Mutex<Vec<(TaskId, Outcome)>>>,
    reported_awaited: usize,
    tasks: BTreeMap<TaskId, SimTask>,
}

struct SimTask {
    client: leakproof::TaskId,
    kind: TaskKind,
    handle: Option<AnyTask>,
    /// A convenience: its future, spawned after its first poll. Kept after it was dropped
    /// (aborted), to witness when the runtime has dropped it.
    future: Option<tokio::task::JoinHandle<()>>,
    /// The server's side of the exchange, once its request arrived.
    held: Option<Held>,
    /// The server's side of a raw stream, once it connected.
    raw: Option<HeldRaw>,
    /// The server's side of a websocket, once it accepted the upgrade.
    ws: Option<HeldWs>,
    /// The user shut the stream's write half: the stage sees that as a close (a read of 0)
    /// while the client still holds the socket for reading.
    write_shut: bool,
    /// Resumed at least once: a stream is connecting, or connected.
    resumed: bool,
    /// Whether the stage still has the exchange's connection open.
    socket: Option<Liveness>,
    /// Redirects the server sent: the next request arrives as `/hold/{task}.{hops}`.
    hops: u32,
    /// The server closed or broke the connection (a reset, an end and a close, garbage): the
    /// stage counts it closed (hyper's connection task drops a socket that sent garbage even
    /// for a suspended task) though the client still holds its dead end until it reads the
    /// failure (R7).
    server_closed: bool,
}

impl System for ClientWorld {
    fn apply(&mut self, op: &Op) -> View {
        self.apply_until(op, &|_| false)
    }

    fn apply_until(&mut self, op: &Op, settled: &dyn Fn(&View) -> bool) -> View {
        let (refused, returned) = self.act(op);
        let deadline = Instant::now() + SETTLE;
        let view = loop {
            let view = self.view(refused, returned);
            if settled(&view) {
                std::thread::sleep(GRACE);
                let again = self.view(refused, returned);
                if settled(&again) {
                    break again;
                }
            }
            if Instant::now() >= deadline {
                break view;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        for sim in self.sessions.values_mut() {
            sim.reported = sim.ear.heard.lock().unwrap().len();
            sim.reported_awaited = sim.awaited.lock().unwrap().len();
        }
        view
    }
}

impl ClientWorld {
    /// Do what `op` says; whether the client refused it, and what it returned.
    fn act(&mut self, op: &Op) -> (Option<Refusal>, Option<Returned>) {
        let runtime = self.runtime.handle().clone();
        match *op {
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => {
                let sim = runtime.block_on(Sim::new(session, kind, per_host));
                self.sessions.insert(session, sim);
            }
            Op::FinishTasksAndInvalidate(s) => self.user_session(s).finish_tasks_and_invalidate(),
            Op::InvalidateAndCancel(s) => self.user_session(s).invalidate_and_cancel(),
            Op::DropSession(s) => self.sim(s).session = None,
            Op::IdleTimeoutPasses(s) => self.sim(s).observer.idle_time_passes(),
            Op::CreateTask {
                session,
                task,
                kind,
            } => {
                // A stream's server is a raw listener of its own, held under the task's name.
                let raw = (kind == TaskKind::Stream).then(|| {
                    let stage = &self.sim(session).stage;
                    runtime
                        .block_on(stage.listen_raw(RawScript::hold(task.to_string())))
                        .expect("a raw listener")
                });
                let _guard = runtime.enter();
                match self.sim(session).create_task(task, kind, raw) {
                    Ok(()) => {
                        self.session_of.insert(task, session);
                    }
                    Err(Error::SessionInvalidated) => {
                        return (Some(Refusal::SessionInvalidated), None);
                    }
                    Err(error) => panic!("R8: creating {task} failed: {error}"),
                }
            }
            Op::Await {
                session,
                task,
                kind,
            } => {
                let _guard = runtime.enter();
                let path = format!("/hold/{task}");
                if let Err(error) = self.sim(session).convenience(task, kind, &path, &runtime) {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: {task}'s first poll failed: {error}"
                    );
                    return (Some(Refusal::SessionInvalidated), None);
                }
                self.session_of.insert(task, session);
            }
            Op::Par(ref a, ref b) => return (self.par([a, b], &runtime), None),
            Op::DelegateBlocks(s) => self.sim(s).ear.pace(true),
            Op::DelegateReturns(s) => self.sim(s).ear.pace(false),
            Op::DelegateDefers(s) => *self.sim(s).ear.defers.lock().unwrap() = true,
            Op::Fetch {
                session,
                task,
                resource,
            } => {
                let _guard = runtime.enter();
                let path = cacheable(resource);
                let sim = self.sim(session);
                if let Err(error) = sim.convenience(task, TaskKind::Data, &path, &runtime) {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: {task}'s first poll failed: {error}"
                    );
                    return (Some(Refusal::SessionInvalidated), None);
                }
                self.session_of.insert(task, session);
            }
            Op::Reset(s) => {
                let session = self.user_session(s).clone();
                // The promise: once reset() returns, the idle connections are closed.
                let reset = async { tokio::time::timeout(ARRIVAL, session.reset()).await };
                runtime.block_on(reset).expect("reset() returns");
            }
            Op::Answer(t) | Op::DropResponder(t) => {
                let ear = self.sim(self.session_of[&t]).ear.clone();
                let kept = ear.responders.lock().unwrap().remove(&t);
                let kept = kept.unwrap_or_else(|| panic!("{t}: no responder kept"));
                // Dropped unanswered, unless the op answers.
                if let Op::Answer(_) = op {
                    match kept {
                        Kept::Disposition(responder) => {
                            let answer = ear.answer(responder.task());
                            responder.answer(answer);
                        }
                        Kept::Redirect(responder, answer) => responder.answer(*answer),
                    }
                }
            }
            Op::Resume(t) => {
                self.user_task(t).resume();
                self.task(t).resumed = true;
            }
            Op::Suspend(t) => self.user_task(t).suspend(),
            Op::Cancel(t) => self.user_task(t).cancel(),
            Op::DropTask(t) => {
                let s = self.session_of[&t];
                let sim = self.sim(s);
                let task = sim.tasks.get_mut(&t).expect("task");
                let client = task.client;
                let handle = task.handle.take();
                if let Some(future) = &task.future {
                    // Dropping a spawned future: the runtime drops it at its next turn.
                    future.abort();
                }
                sim.ear.dropped.lock().unwrap().insert(client);
                let stream = sim.ear.streams.lock().unwrap().remove(&client);
                drop((handle, stream));
            }
            Op::Read(t) => {
                let read =
                    self.with_stream(t, |s| runtime.block_on(s.read(0, usize::MAX, STREAM_OP)));
                match read {
                    Ok(Some(bytes)) => return (None, Some(Returned::Read(bytes.len() as u64))),
                    Ok(None) => return (None, Some(Returned::Eof)),
                    Err(error) => return (Some(refusal(&error)), None),
                }
            }
            Op::Write(t) => {
                let write =
                    self.with_stream(t, |s| runtime.block_on(s.write(b"leakproof", STREAM_OP)));
                if let Err(error) = write {
                    return (Some(refusal(&error)), None);
                }
            }
            Op::CloseRead(t) => self.with_stream(t, StreamTask::close_read),
            Op::CloseWrite(t) => {
                // The stage sees the write half's end as a close: take the connection first,
                // so the witness knows which socket that was.
                let entry = self.task(t);
                let connected = entry.resumed && entry.kind == TaskKind::Stream;
                let client = entry.client;
                let live = self.sim(self.session_of[&t]).observer.task_state(client)
                    != leakproof::TaskState::Completed;
                if connected && live && self.task(t).held.is_none() {
                    runtime.block_on(self.raw(t));
                }
                self.with_stream(t, StreamTask::close_write);
                self.task(t).write_shut = true;
            }
            Op::Receive(t) => match self.websocket(t).try_receive() {
                Ok(message) => {
                    let bytes = message.map(|m| m.len() as u64);
                    return (None, Some(Returned::Received(bytes)));
                }
                Err(error) => return (Some(refusal(&error)), None),
            },
            Op::CloseWith(t) => self
                .websocket(t)
                .cancel_with(1001, "going away")
                .expect("1001 may be sent"),
            Op::ServerAnswersUpgrade { task, accept } => {
                let upgraded = runtime.block_on(self.server(task, |held| async move {
                    if accept {
                        held.upgrade().await.map(|ws| (None, Some(ws)))
                    } else {
                        held.refuse_upgrade(403).await.map(|()| (None, None))
                    }
                }));
                self.task(task).ws = upgraded.flatten();
            }
            Op::PeerCloses { task, frame } => {
                // The frame's payload as the wire carries it: 1000, nothing, or 999.
                let payload: &[u8] = match frame {
                    CloseFrame::Code => &[0x03, 0xe8],
                    CloseFrame::NoCode => &[],
                    CloseFrame::InvalidCode => &[0x03, 0xe7],
                };
                if let Some(ws) = &self.task(task).ws {
                    let _ = runtime.block_on(ws.close_with_payload(payload));
                }
            }
            Op::TimePasses { task, timer } => {
                let client = self.task(task).client;
                let timeout = match timer {
                    Timer::Request => Timeout::Request,
                    Timer::Resource => Timeout::Resource,
                    Timer::Close => Timeout::Close,
                };
                self.sim(self.session_of[&task])
                    .observer
                    .time_passes(client, timeout);
            }
            Op::ServerHeaders { task, answer } => {
                let sim = self.sim(self.session_of[&task]);
                let client = sim.tasks[&task].client;
                sim.ear.answers.lock().unwrap().insert(client, answer);
                runtime.block_on(self.server(task, |held| async move {
                    held.head(200, true, None).await.map(|()| (Some(held), ()))
                }));
            }
            Op::ServerRedirects { task, answer } => {
                let sim = self.sim(self.session_of[&task]);
                let client = sim.tasks[&task].client;
                sim.ear.redirects.lock().unwrap().insert(client, answer);
                let next = format!("/hold/{}", hold_key(task, sim.tasks[&task].hops + 1));
                runtime.block_on(self.server(task, |held| async move {
                    held.redirect(307, &next).await.map(|()| (None, ()))
                }));
                self.task(task).hops += 1;
            }
            Op::ServerSends { task, bytes } => {
                let bytes = u64::from(bytes);
                let (kind, raw) = (self.task(task).kind, self.task(task).held.is_none());
                match kind {
                    TaskKind::Stream if raw => {
                        if let Some(raw) = runtime.block_on(self.raw(task)) {
                            let _ = runtime.block_on(raw.send(bytes));
                        }
                    }
                    TaskKind::WebSocket => {
                        if let Some(ws) = &self.task(task).ws {
                            let _ = runtime.block_on(ws.send_binary(bytes as usize));
                        }
                    }
                    _ => {
                        runtime.block_on(self.server(task, |held| async move {
                            let _ = held.send(bytes).await;
                            Ok((Some(held), ()))
                        }));
                    }
                }
            }
            Op::ServerEnds { task, reusable } => {
                if self.task(task).kind == TaskKind::Stream && self.task(task).held.is_none() {
                    if let Some(raw) = runtime.block_on(self.raw(task)) {
                        let _ = runtime.block_on(raw.end());
                    }
                } else {
                    self.task(task).server_closed |= !reusable;
                    runtime.block_on(self.server(task, |held| async move {
                        if reusable {
                            held.end().await?;
                        } else {
                            held.end_and_close().await?;
                        }
                        Ok((None, ()))
                    }));
                }
            }
            Op::ServerFails { task, fault } => {
                self.task(task).server_closed = true;
                let entry = self.task(task);
                if let Some(ws) = entry.ws.take() {
                    let _ = runtime.block_on(ws.reset());
                } else if entry.kind == TaskKind::Stream && entry.held.is_none() {
                    if runtime.block_on(self.raw(task)).is_some()
                        && let Some(raw) = self.task(task).raw.take()
                    {
                        let _ = runtime.block_on(raw.reset());
                    }
                } else {
                    runtime.block_on(self.server(task, |held| async move {
                        match fault {
                            Fault::Reset => held.reset().await?,
                            Fault::Malformed => held.malformed().await?,
                        }
                        Ok((None, ()))
                    }));
                }
            }
        }
        (None, None)
    }

    /// Two user ops of one session at once, from two threads released together; then the
    /// world's own account of what they did. The refusal, if one was refused.
    fn par(&mut self, ops: [&Op; 2], runtime: &tokio::runtime::Handle) -> Option<Refusal> {
        let s = crate::machine::session_of_op(ops[0], &self.session_of);
        // Made ready first: a stream's listener, the name the delegate will hear a new task
        // by (its callbacks may come before this thread learns it was created), and what the
        // user lets go of, to be dropped on its thread.
        let mut owned: Vec<Option<Box<dyn Send>>> = Vec::new();
        let mut raw = None;
        for op in ops {
            owned.push(match *op {
                Op::CreateTask { task, kind, .. } => {
                    if kind == TaskKind::Stream {
                        let stage = &self.sim(s).stage;
                        let listener =
                            runtime.block_on(stage.listen_raw(RawScript::hold(task.to_string())));
                        raw = Some(listener.expect("a raw listener"));
                    }
                    let sim = self.sim(s);
                    let next = leakproof::TaskId(sim.tasks.len() as u64);
                    sim.ear.ids.lock().unwrap().insert(next, task);
                    None
                }
                Op::DropSession(_) => Some(Box::new(self.sim(s).session.take())),
                Op::DropTask(t) => {
                    let sim = self.sim(s);
                    let task = sim.tasks.get_mut(&t).expect("task");
                    let client = task.client;
                    let handle = task.handle.take();
                    sim.ear.dropped.lock().unwrap().insert(client);
                    let stream = sim.ear.streams.lock().unwrap().remove(&client);
                    Some(Box::new((handle, stream)))
                }
                _ => None,
            });
        }
        let sim = &self.sessions[&s];
        type Made = Option<Result<AnyTask, Error>>;
        let jobs: Vec<Box<dyn FnOnce() -> Made + Send + '_>> = ops
            .into_iter()
            .zip(owned)
            .map(|(op, owned)| {
                Box::new(move || {
                    let _runtime = runtime.enter();
                    let user = || sim.session.as_ref().expect("the user holds the session");
                    let task = |t: &TaskId| sim.tasks[t].handle.as_ref().expect("held");
                    match *op {
                        Op::CreateTask { task, kind, .. } => {
                            return Some(sim.make_task(task, kind, raw));
                        }
                        Op::FinishTasksAndInvalidate(_) => user().finish_tasks_and_invalidate(),
                        Op::InvalidateAndCancel(_) => user().invalidate_and_cancel(),
                        Op::Resume(t) => task(&t).resume(),
                        Op::Suspend(t) => task(&t).suspend(),
                        Op::Cancel(t) => task(&t).cancel(),
                        Op::DropSession(_) | Op::DropTask(_) => drop(owned),
                        ref other => panic!("{other:?} does not run in parallel"),
                    }
                    None
                }) as Box<dyn FnOnce() -> Made + Send + '_>
            })
            .collect();
        let results = crate::machine::run_together(jobs);
        let mut refused = None;
        for (op, result) in ops.into_iter().zip(results) {
            match (op, result) {
                (Op::CreateTask { task, kind, .. }, Some(Ok(handle))) => {
                    self.session_of.insert(*task, s);
                    self.sim(s).adopt(*task, *kind, handle);
                }
                (Op::CreateTask { task, .. }, Some(Err(error))) => {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: creating {task} failed: {error}"
                    );
                    let sim = self.sim(s);
                    let next = leakproof::TaskId(sim.tasks.len() as u64);
                    sim.ear.ids.lock().unwrap().remove(&next);
                    refused = Some(Refusal::SessionInvalidated);
                }
                (Op::Resume(t), _) => self.task(*t).resumed = true,
                _ => {}
            }
        }
        refused
    }

    /// Do `f` with the user's handle on a stream task, or on the stream a data task became.
    fn with_stream<R>(&mut self, t: TaskId, f: impl FnOnce(&StreamTask) -> R) -> R {
        let s = self.session_of[&t];
        let sim = self.sim(s);
        let task = &sim.tasks[&t];
        match &task.handle {
            Some(AnyTask::Stream(stream)) => f(stream),
            _ => f(&sim.ear.streams.lock().unwrap()[&task.client]),
        }
    }

    fn websocket(&mut self, t: TaskId) -> &leakproof::WebSocketTask {
        match self.user_task(t) {
            AnyTask::WebSocket(ws) => ws,
            _ => panic!("{t} is not a websocket"),
        }
    }

    /// The server's side of a raw stream, waiting for it to connect the first time.
    async fn raw(&mut self, task: TaskId) -> Option<&HeldRaw> {
        let sim = self
            .sessions
            .get_mut(&self.session_of[&task])
            .expect("session");
        let entry = sim.tasks.get_mut(&task).expect("task");
        if entry.raw.is_none() {
            let raw = sim.stage.held_raw(&task.to_string(), ARRIVAL).await?;
            entry.socket = Some(raw.liveness());
            entry.raw = Some(raw);
        }
        entry.raw.as_ref()
    }

    /// Let the task's server side do `step` (which keeps the exchange, or ends it). A task the
    /// client has completed is left alone: nothing the server does can reach it any more.
    async fn server<F, Fut, T>(&mut self, task: TaskId, step: F) -> Option<T>
    where
        F: FnOnce(Held) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<(Option<Held>, T)>>,
    {
        let sim = self
            .sessions
            .get_mut(&self.session_of[&task])
            .expect("session");
        let entry = sim.tasks.get_mut(&task).expect("task");
        if sim.observer.task_state(entry.client) == leakproof::TaskState::Completed {
            return None;
        }
        let held = match entry.held.take() {
            Some(held) => held,
            None => match sim.stage.held(&hold_key(task, entry.hops), ARRIVAL).await {
                Some(held) => {
                    entry.socket = Some(held.liveness());
                    held
                }
                None => return None, // never arrived: the view will show the client's side
            },
        };
        let (kept, out) = step(held).await.ok()?;
        entry.held = kept;
        Some(out)
    }

    fn sim(&mut self, s: SessionId) -> &mut Sim {
        self.sessions.get_mut(&s).expect("session exists")
    }

    fn user_session(&mut self, s: SessionId) -> &Session {
        self.sim(s)
            .session
            .as_ref()
            .expect("the user holds the session")
    }

    fn task(&mut self, t: TaskId) -> &mut SimTask {
        let s = self.session_of[&t];
        self.sim(s).tasks.get_mut(&t).expect("task exists")
    }

    fn user_task(&mut self, t: TaskId) -> &AnyTask {
        self.task(t)
            .handle
            .as_ref()
            .expect("the user holds the task")
    }

    fn view(&self, refused: Option<Refusal>, returned: Option<Returned>) -> View {
        let mut view = View {
            refused,
            returned,
            ..View::default()
        };
        for (id, sim) in &self.sessions {
            let heard = sim.ear.heard.lock().unwrap().clone();
            view.callbacks.extend_from_slice(&heard[sim.reported..]);
            let awaited = sim.awaited.lock().unwrap();
            view.awaited
                .extend_from_slice(&awaited[sim.reported_awaited..]);
            for (t, task) in &sim.tasks {
                view.tasks
                    .insert(*t, model_task_state(sim.observer.task_state(task.client)));
            }
            view.sessions.insert(*id, sim.view(heard));
        }
        view
    }
}

impl Sim {
    async fn new(id: SessionId, kind: SessionKind, per_host: Option<u32>) -> Sim {
        let stage = Stage::start().await.expect("a stage");
        let downloads = tempfile::tempdir().expect("a download dir");
        let config = Configuration::builder()
            .download_dir(downloads.path())
            .max_connections_per_host(per_host.map_or(usize::MAX, |l| l as usize))
            .max_idle_per_host(usize::MAX)
            .max_redirects(MAX_REDIRECTS)
            .url_cache(Some(suite_cache()))
            .build()
            .expect("a valid configuration");
        let ear = Arc::new(Ear::default());
        let mut builder = Session::builder().configuration(config);
        let mut delegate = None;
        match kind {
            SessionKind::Plain => {}
            SessionKind::Shared => builder = builder.ignore_invalidation(),
            SessionKind::Delegated => {
                let listener = Arc::new(Listener {
                    session: id,
                    ear: ear.clone(),
                });
                delegate = Some(Arc::downgrade(&listener));
                builder = builder.delegate(listener);
            }
        }
        let session = builder.build();
        Sim {
            kind,
            observer: session.observer(),
            session: Some(session),
            stage,
            downloads,
            delegate,
            ear,
            reported: 0,
            awaited: Arc::default(),
            reported_awaited: 0,
            tasks: BTreeMap::new(),
        }
    }

    /// Start a convenience as a user does: poll its future once here (it creates and starts
    /// its task, or is refused), then spawn it, holding a clone of the session as a spawned
    /// future must. What it returns is recorded as it returns; a finished download's file is
    /// dropped (so removed) first, and the future's clone of the session with it.
    fn convenience(
        &mut self,
        task: TaskId,
        kind: TaskKind,
        path: &str,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), Error> {
        use std::future::Future;
        let user = self.session.clone().expect("the user holds the session");
        let url = self.stage.url(path);
        let mut future = Box::pin(async move {
            let get = http::Request::get(url.clone()).body(()).unwrap();
            let result = match kind {
                TaskKind::Data => user.data(get).await.map(drop),
                TaskKind::Download => user.download(get).await.map(drop),
                TaskKind::Upload => {
                    let post = http::Request::post(url).body(()).unwrap();
                    let body = UploadBody::Bytes(Bytes::from(vec![b'u'; UPLOAD]));
                    user.upload(post, body).await.map(drop)
                }
                TaskKind::Stream | TaskKind::WebSocket => unreachable!("no {kind:?} convenience"),
            };
            drop(user);
            result
        });
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let first = future.as_mut().poll(&mut cx);
        if let std::task::Poll::Ready(Err(error)) = first {
            return Err(error);
        }
        // Task ids count from 0 in creation order; this one was created by that poll.
        let client = leakproof::TaskId(self.tasks.len() as u64);
        let returned = self.awaited.clone();
        let spawned = match first {
            // A fast server (and the cache) can answer within the first poll: the future is
            // gone as the poll returns (a finished task stands for it).
            std::task::Poll::Ready(result) => {
                returned
                    .lock()
                    .unwrap()
                    .push((task, model_outcome(&result)));
                Some(runtime.spawn(async {}))
            }
            std::task::Poll::Pending => {
                assert_eq!(
                    self.observer.task_state(client),
                    leakproof::TaskState::Running,
                    "{task}: a convenience runs from its first poll"
                );
                Some(runtime.spawn(async move {
                    let result = future.await;
                    returned
                        .lock()
                        .unwrap()
                        .push((task, model_outcome(&result)));
                }))
            }
        };
        self.ear.ids.lock().unwrap().insert(client, task);
        self.tasks.insert(
            task,
            SimTask {
                client,
                kind,
                handle: None,
                future: spawned,
                held: None,
                raw: None,
                ws: None,
                write_shut: false,
                resumed: true,
                socket: None,
                server_closed: false,
                hops: 0,
            },
        );
        Ok(())
    }

    fn create_task(
        &mut self,
        task: TaskId,
        kind: TaskKind,
        raw: Option<std::net::SocketAddr>,
    ) -> Result<(), Error> {
        let handle = self.make_task(task, kind, raw)?;
        self.adopt(task, kind, handle);
        Ok(())
    }

    /// Make a task object of `kind`, as `task`, against this session's stage.
    fn make_task(
        &self,
        task: TaskId,
        kind: TaskKind,
        raw: Option<std::net::SocketAddr>,
    ) -> Result<AnyTask, Error> {
        let session = self.session.as_ref().expect("the user holds the session");
        let url = self.stage.url(&format!("/hold/{task}"));
        let get = || http::Request::get(url.clone()).body(()).unwrap();
        let handle = match kind {
            TaskKind::Data => AnyTask::Data(session.data_task(get())?),
            TaskKind::Download => AnyTask::Download(session.download_task(get())?),
            TaskKind::Upload => AnyTask::Upload(session.upload_task(
                http::Request::post(url.clone()).body(()).unwrap(),
                UploadBody::Bytes(Bytes::from(vec![b'u'; UPLOAD])),
            )?),
            TaskKind::Stream => {
                let addr = raw.expect("a stream's listener");
                AnyTask::Stream(session.stream_task("127.0.0.1", addr.port())?)
            }
            TaskKind::WebSocket => {
                let url = self.stage.ws_url(&format!("/hold/{task}"));
                AnyTask::WebSocket(session.websocket_task(url.as_str(), &[])?)
            }
        };
        Ok(handle)
    }

    /// Keep a task object the user made, and its name for the delegate.
    fn adopt(&mut self, task: TaskId, kind: TaskKind, handle: AnyTask) {
        let client = handle.id();
        self.ear.ids.lock().unwrap().insert(client, task);
        self.tasks.insert(
            task,
            SimTask {
                client,
                kind,
                handle: Some(handle),
                future: None,
                held: None,
                raw: None,
                ws: None,
                write_shut: false,
                resumed: false,
                socket: None,
                server_closed: false,
                hops: 0,
            },
        );
    }

    fn view(&self, heard: Vec<Callback>) -> SessionView {
        let ledger = self.observer.resources();
        let delegated = self.kind == SessionKind::Delegated;
        let completed = heard
            .iter()
            .filter(|c| matches!(c, Callback::Complete { .. }))
            .count();
        // A convenience is live until its future is gone: returned, or dropped by the runtime
        // after an abort. No delegate hears it.
        let conveniences = self.tasks.values().filter(|t| t.future.is_some());
        let (futures, futures_live) = conveniences.fold((0, 0), |(n, live), t| {
            let finished = t.future.as_ref().is_some_and(|f| f.is_finished());
            (n + 1, live + usize::from(!finished))
        });
        let files = witness::files_in(self.downloads.path()).map_or(u32::MAX, |f| f.len() as u32);
        // A connection the server broke is dead at once, and may be closed at once (hyper drops
        // a socket that sent garbage); the client holds its dead end until the task reads the
        // failure (R7), so a closed socket still counts for a live task.
        let closed_by_server_but_held = self
            .tasks
            .values()
            .filter(|t| {
                (t.server_closed || t.write_shut)
                    && t.socket.as_ref().is_some_and(|s| !s.is_open())
                    && self.observer.task_state(t.client) != leakproof::TaskState::Completed
            })
            .count();
        let sockets = (self.stage.open() as usize + closed_by_server_but_held) as u32;
        SessionView {
            state: model_session_state(self.observer.state()),
            ledger: model_resources(&ledger),
            pending: ledger.pending_actions + ledger.pending_callbacks,
            witness: Resources {
                // The stage sees sockets, busy or idle alike: the ledger splits them.
                open_connections: sockets.saturating_sub(ledger.idle_connections),
                idle_connections: ledger.idle_connections.min(sockets),
                buffered_bytes: ledger.buffered_bytes,
                // Completions are witnessed by what the delegate heard, while it keeps up.
                live_tasks: if delegated && !*self.ear.slow.lock().unwrap() {
                    (self.tasks.len() - futures - completed + futures_live) as u32
                } else {
                    ledger.live_tasks
                },
                timers: ledger.timers,
                temp_files: files,
                delegate_held: self
                    .delegate
                    .as_ref()
                    .is_some_and(|w| w.upgrade().is_some()),
                // The ledger's word: the stage's request count shows only that a hit sent
                // nothing (the connection counts above).
                cached_responses: ledger.cached_responses,
            },
            heard,
        }
    }
}

/// The model's refusal for an error a stream or websocket op returned.
fn refusal(error: &Error) -> Refusal {
    match error {
        Error::ReadClosed => Refusal::ReadClosed,
        Error::WriteClosed => Refusal::WriteClosed,
        _ => Refusal::Closed,
    }
}

/// The stage's key for a task's request: `t3` first, `t3.1` after one redirect, and so on.
fn hold_key(task: TaskId, hops: u32) -> String {
    match hops {
        0 => task.to_string(),
        hops => format!("{task}.{hops}"),
    }
}

/// The stage's cacheable resource `resource`: [`CACHED_BODY`] bytes, `max-age` 60 s (and one
/// more second per resource, which tells their URLs apart).
fn cacheable(resource: ResourceId) -> String {
    format!(
        "/bytes/{CACHED_BODY}?max_age={}",
        60 + u32::from(resource.0)
    )
}

/// The suite's sessions' response cache: room for [`CACHE_ENTRIES`] cacheable responses
/// (each [`CACHED_BODY`] bytes and a few hundred of headers), not one more.
fn suite_cache() -> UrlCache {
    let room = (CACHE_ENTRIES as u64 + 1) * CACHED_BODY;
    UrlCache::memory(room as usize).max_entry(2 * CACHED_BODY as usize)
}
