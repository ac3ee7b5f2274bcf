//! The engine as the system under test: `leakproof-core` sessions driven by a simulated
//! network. The simulated driver carries out every action the engine asks for and keeps its
//! own account of connections, timers and files: that account, the delegate's `Weak` and the
//! bytes fed versus heard are the witnesses the engine's ledger is checked against.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use leakproof_core as core;
use leakproof_core::{
    Action, ConnId, Core, Delivered, Delivery, Intake, Message, Proceed, Release, Timeout, TimerId,
};
use leakproof_model::{
    CACHE_ENTRIES, CACHED_BODY, Callback, CloseFrame, Disposition, Fault, MAX_REDIRECTS, Op,
    Outcome, Redirect, Refusal, ResourceId, Resources, Returned, SessionId, SessionKind,
    SessionState, TaskId, TaskKind, TaskState, Timer,
};

use crate::assertions::{SessionView, View};
use crate::machine::System;

/// The whole world: every session the sequence created.
#[derive(Debug, Default)]
pub struct EngineWorld {
    sessions: BTreeMap<SessionId, Sim>,
    session_of: BTreeMap<TaskId, SessionId>,
    planting: Planting,
}

/// A bug put into the simulated world on purpose, to show that the checks catch it and name
/// its rule ([`crate::planted`]); the conformance checks run with none. It changes the world
/// around the engine, never the engine: a session's configuration, or the driver's work.
#[derive(Debug, Clone, Copy, Default)]
pub struct Planting {
    /// A change to every session's configuration, made before the session is.
    pub configure: Option<fn(&mut core::Config)>,
    /// Actions the driver takes from the engine and then forgets instead of carrying out.
    pub forgets: Option<fn(&Action) -> bool>,
}

/// The delegate: what it hears is recorded by the delivery closure; the test keeps a `Weak`.
#[derive(Debug)]
struct Delegate;

/// A callback the delegate is in and has not returned from.
#[derive(Debug)]
struct Stuck {
    receipt: core::Receipt,
    /// For did_receive_response and will_perform_redirection: the task asked, and the
    /// delegate's answer.
    answer: Option<(TaskId, core::Answer)>,
    stream: Option<(TaskId, core::TaskHandle)>,
}

#[derive(Debug)]
struct Sim {
    id: SessionId,
    /// The user's handle; a running convenience holds a clone too, as its future does.
    handle: Option<Arc<core::SessionHandle>>,
    core: Core,
    delivery: Delivery<Arc<Delegate>>,
    delivery_done: bool,
    /// The delegate is slow: it stays in its next callback other than did_receive_data.
    blocked: bool,
    /// The callback it is in, not returned from: its receipt, its answer, and a stream it
    /// was handed (kept on return if the user still holds the task).
    stuck: Option<Stuck>,
    /// The delegate answers its next question later: it keeps a responder.
    defers: bool,
    /// The tasks whose responder the delegate keeps, unanswered, with the answer it will give.
    responders: BTreeMap<TaskId, core::Answer>,
    /// The delegate was ever slow: bytes it was owed may have been dropped unheard (R5), so
    /// the buffered bytes take the ledger's word (the bytes fed and heard no longer tell).
    paced: bool,
    delegate: Option<Weak<Delegate>>,
    tasks: BTreeMap<TaskId, SimTask>,
    model_id: BTreeMap<core::TaskId, TaskId>,
    net: Network,
    heard: Vec<Callback>,
}

#[derive(Debug)]
struct SimTask {
    engine: core::TaskId,
    handle: Option<core::TaskHandle>,
    /// A response's stream: the handle the delegate got with did_become_stream. The suite's
    /// delegate keeps it while the user holds the task's handle, as the model says.
    stream: Option<core::TaskHandle>,
    /// What the delegate answers to this task's response head.
    answer: Disposition,
    /// What the delegate answers to this task's redirects.
    redirect: Redirect,
    /// A convenience: the future's clone of the session while it has not returned (or been
    /// dropped). Its handler is this simulation: it starts the exchange, keeps the clock,
    /// and takes the outcome.
    future: Option<Arc<core::SessionHandle>>,
    convenience: bool,
}

impl SimTask {
    /// The user's handle on the task, or on the stream it became.
    fn user(&self) -> &core::TaskHandle {
        self.stream
            .as_ref()
            .or(self.handle.as_ref())
            .expect("the user holds the task")
    }
}

/// The far side of every connection, and the driver's own account of what it holds.
#[derive(Debug, Default)]
struct Network {
    /// Exchanges that ended, by their own IO or by an abort: actions still addressed to them
    /// are moot (see `leakproof_core::Action`).
    ended: BTreeSet<core::TaskId>,
    /// Only a delegate hears body bytes; without one the engine must drop them.
    delegated: bool,
    exchanges: BTreeMap<core::TaskId, Exchange>,
    open: BTreeSet<ConnId>,
    idle: BTreeSet<ConnId>,
    /// Connections an IO closed itself on `Release::Close`: the abort the engine queued with
    /// that answer may find them closed already.
    closed_by_io: BTreeSet<ConnId>,
    timers: BTreeMap<(core::TaskId, Timeout), TimerId>,
    files: BTreeSet<PathBuf>,
    /// Body bytes handed to the engine for the delegate, and bytes the delegate heard.
    bytes_fed: u64,
    bytes_heard: u64,
    /// Per stream or websocket: bytes handed to the engine, and bytes the user took back or
    /// the task let go of (the driver's own account of what the pipe holds).
    piped: BTreeMap<core::TaskId, (u64, u64)>,
    kinds: BTreeMap<core::TaskId, core::TaskKind>,
    /// Conveniences' tasks, whose IO and clock are their future's: no delegate hears their
    /// bytes, and their timers are the future's, counted here from the first poll.
    handlers: BTreeSet<core::TaskId>,
    /// Each download's temp file.
    file_of: BTreeMap<core::TaskId, PathBuf>,
    /// Redirects each task's IO followed.
    hops: BTreeMap<core::TaskId, u32>,
    /// IOs between two hops: they wait for the engine to hand them their next connection
    /// ([`Core::poll_start`]).
    hopping: BTreeSet<core::TaskId>,
    /// Conveniences fetching a cacheable resource.
    fetches: BTreeMap<core::TaskId, ResourceId>,
    /// The session's response cache, the IO's as the client's is: the resources it holds,
    /// least recently used first.
    cache: VecDeque<ResourceId>,
    /// The planted bug's actions to forget ([`Planting::forgets`]): none in the checks.
    forgets: Option<fn(&Action) -> bool>,
}

/// One exchange in flight on a connection.
#[derive(Debug)]
struct Exchange {
    conn: ConnId,
    paused: bool,
    phase: Phase,
    /// What the server sent that the driver has not read yet.
    unread: VecDeque<Sent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHead,
    /// A redirect's head was read; the engine says whether to follow it.
    AwaitingRedirect,
    /// Followed: the redirect's rest is read, and the hop made, once unpaused (R7).
    FollowingRedirect,
    AwaitingDisposition,
    ReadingBody {
        into_file: bool,
    },
    /// A connected stream, or a response's body read through a stream's window.
    Stream,
    AwaitingUpgrade,
    WebSocket,
}

#[derive(Debug, Clone, Copy)]
enum Sent {
    Head,
    /// A `307` to another resource of the server's, with no body, kept alive.
    Redirect,
    Bytes(u32),
    End {
        reusable: bool,
    },
    Fault(Fault),
    Upgrade {
        accept: bool,
    },
    PeerClose(CloseFrame),
}

impl System for EngineWorld {
    fn apply(&mut self, op: &Op) -> View {
        let mut refused = None;
        let mut returned = None;
        let touched = match *op {
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => {
                self.sessions
                    .insert(session, Sim::new(session, kind, per_host, self.planting));
                session
            }
            Op::FinishTasksAndInvalidate(s) => {
                self.user_session(s).finish_tasks_and_invalidate();
                s
            }
            Op::InvalidateAndCancel(s) => {
                self.user_session(s).invalidate_and_cancel();
                s
            }
            Op::DropSession(s) => {
                self.sim(s).handle = None;
                s
            }
            Op::IdleTimeoutPasses(s) => {
                self.sim(s).expire_idle();
                s
            }
            Op::CreateTask {
                session,
                task,
                kind,
            } => {
                let sim = self.sim(session);
                let handle = sim.handle.as_ref().expect("the user holds the session");
                let created = handle.create_task(engine_kind(kind), "stage", core::Route::Delegate);
                refused = self.adopt(session, task, kind, created);
                session
            }
            Op::Par(ref a, ref b) => {
                let s = crate::machine::session_of_op(a, &self.session_of);
                refused = self.par(s, [a, b]);
                s
            }
            Op::DelegateBlocks(s) => {
                let sim = self.sim(s);
                sim.blocked = true;
                sim.paced = true;
                s
            }
            Op::DelegateDefers(s) => {
                self.sim(s).defers = true;
                s
            }
            Op::Answer(t) | Op::DropResponder(t) => {
                let s = self.session_of[&t];
                let sim = self.sim(s);
                let kept = sim.responders.remove(&t);
                let answer = kept.unwrap_or_else(|| panic!("{t}: no responder kept"));
                let answer = match op {
                    Op::Answer(_) => answer,
                    _ => core::Answer::Cancel,
                };
                sim.core.answer(sim.tasks[&t].engine, answer);
                s
            }
            Op::DelegateReturns(s) => {
                let sim = self.sim(s);
                sim.blocked = false;
                if let Some(stuck) = sim.stuck.take() {
                    sim.returns(stuck);
                }
                s
            }
            Op::Reset(s) => {
                let sim = self.sim(s);
                sim.net.cache.clear();
                sim.expire_idle();
                s
            }
            Op::Fetch {
                session,
                task,
                resource,
            } => {
                refused = self.start_convenience(session, task, TaskKind::Data, Some(resource));
                session
            }
            Op::Await {
                session,
                task,
                kind,
            } => {
                refused = self.start_convenience(session, task, kind, None);
                session
            }
            Op::Resume(t) => self.user_task(t, core::TaskHandle::resume),
            Op::Suspend(t) => self.user_task(t, core::TaskHandle::suspend),
            Op::Cancel(t) => self.user_task(t, core::TaskHandle::cancel),
            Op::DropTask(t) => {
                let s = self.session_of[&t];
                let sim = self.sim(s);
                let task = sim.tasks.get_mut(&t).expect("task");
                if task.future.take().is_some() {
                    // Dropping the future cancels its task and forgets the outcome.
                    let engine = task.engine;
                    if let Some(handle) = &task.handle {
                        handle.cancel();
                    }
                    sim.core.take_outcome(engine);
                    sim.net.clock_stops(engine);
                }
                let task = sim.tasks.get_mut(&t).expect("task");
                let handles = (task.handle.take(), task.stream.take());
                drop(handles);
                s
            }
            Op::Read(t) => {
                let (s, task) = self.pipe_task(t);
                let (id, read) = (task.id(), task.poll_read(&mut noop(), 0, usize::MAX));
                match read {
                    Poll::Ready(Ok(Some(bytes))) => {
                        returned = Some(Returned::Read(bytes.len() as u64));
                        self.sim(s).net.took(id, bytes.len() as u64);
                    }
                    Poll::Ready(Ok(None)) => returned = Some(Returned::Eof),
                    Poll::Ready(Err(error)) => refused = Some(refusal(&error)),
                    Poll::Pending => panic!("a read of at least 0 bytes waited"),
                }
                s
            }
            Op::Write(t) => {
                let (s, task) = self.pipe_task(t);
                if let Poll::Ready(Err(error)) = task.poll_write(&mut noop(), b"leakproof") {
                    refused = Some(refusal(&error));
                }
                s
            }
            Op::CloseRead(t) => {
                let (s, task) = self.pipe_task(t);
                task.close_read();
                let id = task.id();
                self.sim(s).net.let_go(id);
                s
            }
            Op::CloseWrite(t) => {
                let (s, task) = self.pipe_task(t);
                task.close_write();
                s
            }
            Op::Receive(t) => {
                let (s, task) = self.pipe_task(t);
                let (id, received) = (task.id(), task.poll_receive(&mut noop()));
                match received {
                    Poll::Ready(Ok(message)) => {
                        returned = Some(Returned::Received(Some(message.len() as u64)));
                        self.sim(s).net.took(id, message.len() as u64);
                    }
                    Poll::Pending => returned = Some(Returned::Received(None)),
                    Poll::Ready(Err(error)) => refused = Some(refusal(&error)),
                }
                s
            }
            Op::CloseWith(t) => {
                let (s, task) = self.pipe_task(t);
                task.cancel_with(core::GOING_AWAY, "going away");
                s
            }
            Op::ServerHeaders { task, answer } => {
                let s = self.session_of[&task];
                self.sim(s).tasks.get_mut(&task).expect("task").answer = answer;
                self.server(task, Sent::Head)
            }
            Op::ServerRedirects { task, answer } => {
                let s = self.session_of[&task];
                self.sim(s).tasks.get_mut(&task).expect("task").redirect = answer;
                self.server(task, Sent::Redirect)
            }
            Op::ServerSends { task, bytes } => self.server(task, Sent::Bytes(bytes)),
            Op::ServerEnds { task, reusable } => self.server(task, Sent::End { reusable }),
            Op::ServerFails { task, fault } => self.server(task, Sent::Fault(fault)),
            Op::ServerAnswersUpgrade { task, accept } => {
                self.server(task, Sent::Upgrade { accept })
            }
            Op::PeerCloses { task, frame } => self.server(task, Sent::PeerClose(frame)),
            Op::TimePasses { task, timer } => {
                let s = self.session_of[&task];
                let sim = self.sim(s);
                let engine = sim.tasks[&task].engine;
                let timeout = match timer {
                    Timer::Request => Timeout::Request,
                    Timer::Resource => Timeout::Resource,
                    Timer::Close => Timeout::Close,
                };
                let armed = sim.net.timers.get(&(engine, timeout)).copied();
                // The close deadline is R11's; the request and resource timeouts are R12's.
                let rule = if timer == Timer::Close { "R11" } else { "R12" };
                let armed = armed.unwrap_or_else(|| panic!("{rule}: no {timer:?} timer armed"));
                if sim.net.handlers.contains(&engine) {
                    // The future's own clock ran out.
                    sim.core.handler_timed_out(engine, timeout);
                } else {
                    sim.core.timer_fired(armed);
                }
                s
            }
        };
        let (callbacks, awaited) = self.sim(touched).settle();
        let mut view = self.view(refused, callbacks);
        view.returned = returned;
        view.awaited = awaited;
        view
    }
}

/// A context whose waker does nothing: the simulation polls again after every input.
fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// The model's refusal for an error a stream or websocket op returned.
fn refusal(error: &core::Error) -> Refusal {
    match error {
        core::Error::ReadClosed => Refusal::ReadClosed,
        core::Error::WriteClosed => Refusal::WriteClosed,
        _ => Refusal::Closed,
    }
}

/// What one of two user ops at once does on its thread.
enum Job<'a> {
    Create(&'a core::SessionHandle, core::TaskKind),
    Task(&'a core::TaskHandle, fn(&core::TaskHandle)),
    Session(&'a core::SessionHandle, fn(&core::SessionHandle)),
    /// Drop what the user let go of: a session's handle, or a task's.
    Drop(Box<dyn Send>),
}

impl Job<'_> {
    fn run(self) -> Option<Result<core::TaskHandle, core::Error>> {
        match self {
            Job::Create(session, kind) => {
                Some(session.create_task(kind, "stage", core::Route::Delegate))
            }
            Job::Task(task, op) => {
                op(task);
                None
            }
            Job::Session(session, op) => {
                op(session);
                None
            }
            Job::Drop(held) => {
                drop(held);
                None
            }
        }
    }
}

impl EngineWorld {
    /// A world with a bug planted in it.
    pub fn planted(planting: Planting) -> Self {
        Self {
            planting,
            ..Self::default()
        }
    }

    /// What the world shows now, with no op applied: what a system that ignored an op shows.
    pub fn look(&self) -> View {
        self.view(None, Vec::new())
    }

    /// Two user ops of session `s` at once, from two threads released together; then the
    /// world's own account of what they did. The refusal, if one was refused.
    fn par(&mut self, s: SessionId, ops: [&Op; 2]) -> Option<Refusal> {
        // What the user lets go of leaves the world first, to be dropped on its thread.
        let mut owned: Vec<Option<Box<dyn Send>>> = Vec::new();
        for op in ops {
            let sim = self.sim(s);
            owned.push(match *op {
                Op::DropSession(_) => Some(Box::new(sim.handle.take())),
                Op::DropTask(t) => {
                    let task = sim.tasks.get_mut(&t).expect("task");
                    Some(Box::new((task.handle.take(), task.stream.take())))
                }
                _ => None,
            });
        }
        let sim = &self.sessions[&s];
        let jobs = ops.into_iter().zip(owned).map(|(op, owned)| match *op {
            Op::CreateTask { kind, .. } => {
                let handle = sim.handle.as_deref().expect("the user holds the session");
                Job::Create(handle, engine_kind(kind))
            }
            Op::FinishTasksAndInvalidate(_) | Op::InvalidateAndCancel(_) => {
                let handle = sim.handle.as_deref().expect("the user holds the session");
                let op: fn(&core::SessionHandle) = match *op {
                    Op::FinishTasksAndInvalidate(_) => {
                        core::SessionHandle::finish_tasks_and_invalidate
                    }
                    _ => core::SessionHandle::invalidate_and_cancel,
                };
                Job::Session(handle, op)
            }
            Op::Resume(t) | Op::Suspend(t) | Op::Cancel(t) => {
                let op: fn(&core::TaskHandle) = match *op {
                    Op::Resume(_) => core::TaskHandle::resume,
                    Op::Suspend(_) => core::TaskHandle::suspend,
                    _ => core::TaskHandle::cancel,
                };
                Job::Task(sim.tasks[&t].user(), op)
            }
            Op::DropSession(_) | Op::DropTask(_) => Job::Drop(owned.expect("taken above")),
            ref other => panic!("{other:?} does not run in parallel"),
        });
        let jobs: Vec<Job> = jobs.collect();
        let jobs = jobs
            .into_iter()
            .map(|job| Box::new(move || job.run()) as Box<dyn FnOnce() -> _ + Send>)
            .collect();
        let results = crate::machine::run_together(jobs);
        let mut refused = None;
        for (op, result) in ops.into_iter().zip(results) {
            if let (Op::CreateTask { task, kind, .. }, Some(created)) = (op, result) {
                refused = refused.or(self.adopt(s, *task, *kind, created));
            }
        }
        refused
    }

    /// The world's account of a task object `create_task` made, or its refusal.
    fn adopt(
        &mut self,
        session: SessionId,
        task: TaskId,
        kind: TaskKind,
        created: Result<core::TaskHandle, core::Error>,
    ) -> Option<Refusal> {
        let sim = self.sim(session);
        match created {
            Ok(handle) => {
                sim.model_id.insert(handle.id(), task);
                sim.net.kinds.insert(handle.id(), engine_kind(kind));
                sim.tasks.insert(
                    task,
                    SimTask {
                        engine: handle.id(),
                        handle: Some(handle),
                        stream: None,
                        answer: Disposition::Allow,
                        redirect: Redirect::Follow,
                        future: None,
                        convenience: false,
                    },
                );
                self.session_of.insert(task, session);
                None
            }
            Err(core::Error::SessionInvalidated) => Some(Refusal::SessionInvalidated),
            Err(other) => panic!("R8: create_task failed with {other}"),
        }
    }

    fn sim(&mut self, s: SessionId) -> &mut Sim {
        self.sessions.get_mut(&s).expect("session exists")
    }

    fn user_session(&mut self, s: SessionId) -> &core::SessionHandle {
        self.sim(s)
            .handle
            .as_ref()
            .expect("the user holds the session")
    }

    fn user_task(&mut self, t: TaskId, op: fn(&core::TaskHandle)) -> SessionId {
        let s = self.session_of[&t];
        op(self.sim(s).tasks[&t].user());
        s
    }

    /// The session of a stream or websocket task, and the user's handle on it.
    fn pipe_task(&mut self, t: TaskId) -> (SessionId, &core::TaskHandle) {
        let s = self.session_of[&t];
        (s, self.sessions[&s].tasks[&t].user())
    }

    /// The server does something on the task's connection.
    /// A convenience's first poll (`session.data(..)` and the like, or a fetch of
    /// `resource`): its task starts, or is refused (R8). Its handler is this simulation.
    fn start_convenience(
        &mut self,
        session: SessionId,
        task: TaskId,
        kind: TaskKind,
        resource: Option<ResourceId>,
    ) -> Option<Refusal> {
        let sim = self.sim(session);
        let user = sim.handle.clone().expect("the user holds the session");
        let handle = match user.create_task(engine_kind(kind), "stage", core::Route::Handler) {
            Ok(handle) => handle,
            Err(core::Error::SessionInvalidated) => return Some(Refusal::SessionInvalidated),
            Err(other) => panic!("R8: a convenience failed with {other}"),
        };
        let id = handle.id();
        sim.model_id.insert(id, task);
        sim.net.kinds.insert(id, engine_kind(kind));
        sim.net.handlers.insert(id);
        if let Some(resource) = resource {
            sim.net.fetches.insert(id, resource);
        }
        // The future's clock runs from its first poll: both timeouts.
        for timeout in [Timeout::Request, Timeout::Resource] {
            let timer = TimerId {
                task: id,
                timeout,
                generation: 0,
            };
            sim.net.timers.insert((id, timeout), timer);
        }
        let start = handle.resume_inline();
        sim.tasks.insert(
            task,
            SimTask {
                engine: id,
                handle: Some(handle),
                stream: None,
                answer: Disposition::Allow,
                redirect: Redirect::Follow,
                future: Some(user),
                convenience: true,
            },
        );
        if let Some(start) = start {
            sim.net.start_handler(&sim.core, id, start);
        }
        self.session_of.insert(task, session);
        None
    }

    fn server(&mut self, task: TaskId, sent: Sent) -> SessionId {
        let s = self.session_of[&task];
        let sim = self.sim(s);
        let engine = sim.tasks[&task].engine;
        // Sent to a connection that is gone: nobody reads it.
        if let Some(exchange) = sim.net.exchanges.get_mut(&engine) {
            exchange.unread.push_back(sent);
            sim.net.read(&sim.core, engine);
        }
        s
    }

    fn view(&self, refused: Option<Refusal>, callbacks: Vec<Callback>) -> View {
        let mut view = View {
            refused,
            callbacks,
            ..View::default()
        };
        for (id, sim) in &self.sessions {
            for (t, task) in &sim.tasks {
                let state = match task.stream.as_ref().or(task.handle.as_ref()) {
                    Some(handle) => handle.state(),
                    None => sim.core.task_state(task.engine),
                };
                view.tasks.insert(*t, model_task_state(state));
            }
            view.sessions.insert(*id, sim.view());
        }
        view
    }
}

impl Sim {
    fn new(id: SessionId, kind: SessionKind, per_host: Option<u32>, planting: Planting) -> Self {
        let mut config = core::Config {
            kind: engine_session_kind(kind),
            max_connections_per_origin: per_host.map_or(usize::MAX, |l| l as usize),
            name: format!("engine-check-{id}"),
            ..core::Config::default()
        };
        if let Some(configure) = planting.configure {
            configure(&mut config);
        }
        let delegate = (kind == SessionKind::Delegated).then(|| Arc::new(Delegate));
        let weak = delegate.as_ref().map(Arc::downgrade);
        let (handle, core, delivery) = core::session(config, delegate);
        Sim {
            id,
            handle: Some(Arc::new(handle)),
            core,
            delivery,
            delivery_done: false,
            blocked: false,
            stuck: None,
            defers: false,
            responders: BTreeMap::new(),
            paced: false,
            delegate: weak,
            tasks: BTreeMap::new(),
            model_id: BTreeMap::new(),
            net: Network {
                delegated: kind == SessionKind::Delegated,
                forgets: planting.forgets,
                ..Network::default()
            },
            heard: Vec::new(),
        }
    }

    /// Every idle connection's idle time runs out.
    fn expire_idle(&mut self) {
        for conn in std::mem::take(&mut self.net.idle) {
            self.core.idle_expired(conn);
        }
    }

    /// Carry out actions, deliver callbacks and run the conveniences' futures until nothing
    /// moves; return what the delegate heard and what the futures returned.
    fn settle(&mut self) -> (Vec<Callback>, Vec<(TaskId, Outcome)>) {
        let before = self.heard.len();
        let mut awaited = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(action) = self.core.try_action() {
                self.net.carry_out(&self.core, action);
                progressed = true;
            }
            progressed |= self.net.pump(&self.core);
            progressed |= self.poll_futures(&mut awaited);
            // One callback a round: what its return lets the IO do happens before the next
            // callback, as the model has it (the actions and the reads first).
            let taken = if self.delivery_done || self.stuck.is_some() {
                Ok(None)
            } else {
                self.delivery.begin()
            };
            match taken {
                Err(_) => {
                    self.delivery_done = true;
                    progressed = true;
                }
                Ok(None) => {}
                Ok(Some((callback, receipt))) => {
                    progressed = true;
                    if let core::Callback::ReceiveData { data, .. } = &callback {
                        self.net.bytes_heard += data.len() as u64;
                    }
                    let data = matches!(callback, core::Callback::ReceiveData { .. });
                    self.heard
                        .push(model_callback(&callback, &self.model_id, self.id));
                    let (answer, stream) = match callback {
                        core::Callback::ReceiveResponse { task, .. } => {
                            let task = self.model_id[&task];
                            let answer = engine_disposition(self.tasks[&task].answer);
                            (Some((task, core::Answer::Disposition(answer))), None)
                        }
                        core::Callback::WillRedirect { task, request, .. } => {
                            let task = self.model_id[&task];
                            let answer = match self.tasks[&task].redirect {
                                Redirect::Follow => core::Redirect::Follow(*request),
                                Redirect::Refuse => core::Redirect::Refuse,
                            };
                            (Some((task, core::Answer::Redirect(answer))), None)
                        }
                        core::Callback::BecomeStream { task, stream } => {
                            (None, stream.map(|s| (self.model_id[&task], s)))
                        }
                        _ => (None, None),
                    };
                    let stuck = Stuck {
                        receipt,
                        answer,
                        stream,
                    };
                    if self.blocked && !data {
                        self.stuck = Some(stuck);
                    } else {
                        self.returns(stuck);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        // R4: the cache goes once the session is released, as the client's does.
        if self.core.is_released() {
            self.net.cache.clear();
        }
        (self.heard[before..].to_vec(), awaited)
    }

    /// The delegate returns from a callback: a stream it was handed is kept while the user
    /// holds the task (dropped, and so cancelled, if not), and the engine hears of it.
    fn returns(&mut self, stuck: Stuck) {
        if let Some((task, stream)) = stuck.stream {
            let task = self.tasks.get_mut(&task).expect("task");
            if task.handle.is_some() {
                task.stream = Some(stream);
            }
        }
        let answer = match stuck.answer {
            Some((task, answer)) if std::mem::take(&mut self.defers) => {
                // The `_with` callback returned, its responder kept.
                self.responders.insert(task, answer);
                core::Answer::Later
            }
            Some((_, answer)) => answer,
            None => core::Answer::Default,
        };
        if self.delivery.finish(stuck.receipt, answer) == Delivered::Done {
            self.delivery_done = true;
        }
    }

    /// Poll the conveniences' futures: one waiting for a connection slot starts when it gets
    /// one; one whose task completed returns its outcome, lets go of its handle and its clone
    /// of the session, and hands a finished download's file to its caller, who drops it.
    fn poll_futures(&mut self, awaited: &mut Vec<(TaskId, Outcome)>) -> bool {
        let mut moved = false;
        for (id, task) in &mut self.tasks {
            if task.future.is_none() {
                continue;
            }
            let engine = task.engine;
            let started =
                self.net.exchanges.contains_key(&engine) || self.net.ended.contains(&engine);
            if !started && let Poll::Ready(Some(start)) = self.core.poll_start(engine, &mut noop())
            {
                self.net.start_handler(&self.core, engine, start);
                moved = true;
            }
            if self.core.task_state(engine) != core::TaskState::Completed {
                continue;
            }
            let outcome = self
                .core
                .take_outcome(engine)
                .unwrap_or_else(|| panic!("R1: {id}'s future found no outcome"));
            if outcome.is_ok()
                && let Some(path) = self.net.file_of.get(&engine)
            {
                self.net.files.remove(path);
            }
            self.net.clock_stops(engine);
            awaited.push((*id, model_outcome(&outcome)));
            task.future = None;
            task.handle = None;
            moved = true;
        }
        moved
    }

    fn view(&self) -> SessionView {
        let ledger = self.core.ledger();
        let delegated = self.delegate.is_some();
        let delegate_alive = self
            .delegate
            .as_ref()
            .is_some_and(|w| w.upgrade().is_some());
        let net = &self.net;
        let completed: BTreeSet<TaskId> = self
            .heard
            .iter()
            .filter_map(|c| match c {
                Callback::Complete { task, .. } => Some(*task),
                _ => None,
            })
            .collect();
        SessionView {
            state: model_session_state(self.core.state()),
            // The engine knows no cache: the IO's is counted, as the client counts its own.
            ledger: Resources {
                cached_responses: net.cache.len() as u32,
                ..model_resources(&ledger)
            },
            pending: ledger.pending_actions + ledger.pending_callbacks,
            witness: Resources {
                open_connections: net.open.len() as u32,
                idle_connections: net.idle.len() as u32,
                // Without a delegate nothing is ever heard, so bytes and completions can only
                // be witnessed for delegated sessions; the others take the ledger's word.
                buffered_bytes: if delegated && !self.paced {
                    net.bytes_fed - net.bytes_heard + net.held_by_pipes(&self.core)
                } else {
                    ledger.buffered_bytes
                },
                // Completions are witnessed by what the delegate heard, while it keeps up.
                live_tasks: if delegated && self.stuck.is_none() {
                    // A convenience is live while its future waits; no delegate hears it.
                    self.tasks
                        .iter()
                        .filter(|(id, t)| {
                            if t.convenience {
                                t.future.is_some()
                            } else {
                                !completed.contains(id)
                            }
                        })
                        .count() as u32
                } else {
                    ledger.live_tasks
                },
                timers: net.timers.len() as u32,
                temp_files: net.files.len() as u32,
                delegate_held: delegate_alive,
                cached_responses: net.cache.len() as u32,
            },
            heard: self.heard.clone(),
        }
    }
}

impl Network {
    /// A convenience's future starts its exchange where the engine says: its handler is its
    /// own IO, so no `Start` action comes for it.
    fn start_handler(&mut self, core: &Core, task: core::TaskId, start: core::Start) {
        let (conn, reused) = (start.conn, start.reused);
        self.carry_out(core, Action::Start { task, conn, reused });
        if let Some(&resource) = self.fetches.get(&task) {
            self.serve(core, task, resource, conn, reused);
        }
    }

    /// A fetch has its connection. A hit answers from the cache and gives the connection back
    /// unused (to the pool if it came from there); a miss is answered whole by the server,
    /// and kept, the least recently used response evicted if the cache is full.
    fn serve(
        &mut self,
        core: &Core,
        task: core::TaskId,
        resource: ResourceId,
        conn: ConnId,
        reused: bool,
    ) {
        let hit = self.cache.contains(&resource);
        self.cache.retain(|r| *r != resource);
        self.cache.push_back(resource);
        while self.cache.len() > CACHE_ENTRIES {
            self.cache.pop_front();
        }
        if !hit {
            let exchange = self.exchanges.get_mut(&task).expect("started");
            let body = CACHED_BODY as u32;
            exchange
                .unread
                .extend([Sent::Head, Sent::Bytes(body), Sent::End { reusable: true }]);
            return self.read(core, task);
        }
        core.connection_unused(task, reused);
        self.exchanges.remove(&task);
        self.open.remove(&conn);
        if reused {
            self.idle.insert(conn);
        }
        match core.response(task, http::Response::new(())) {
            Proceed::Read { .. } => {}
            other => panic!("a fetch's response from the cache: {other:?}"),
        }
        core.body_data(task, Bytes::from(vec![0u8; CACHED_BODY as usize]));
        assert_eq!(
            core.body_end(task, false),
            Release::Close,
            "nothing to pool"
        );
        self.end(task);
    }

    /// The IO closed its connection on a failure. If the engine had completed the task
    /// already (a cancel crossed the failure), the abort it queued will find it closed.
    fn io_closed(&mut self, core: &Core, task: core::TaskId, conn: ConnId) {
        self.open.remove(&conn);
        if core.task_state(task) == core::TaskState::Completed {
            self.closed_by_io.insert(conn);
        }
    }

    /// A convenience's clock stops: its future returned or was dropped.
    fn clock_stops(&mut self, task: core::TaskId) {
        self.timers.retain(|(t, _), _| *t != task);
    }

    /// Do what the engine asks, checking that each request makes sense for what the driver
    /// holds. A nonsensical action is a bug in the engine: panic with the rule it breaks.
    fn carry_out(&mut self, core: &Core, action: Action) {
        if self.forgets.is_some_and(|forgets| forgets(&action)) {
            return;
        }
        match action {
            Action::Start { task, conn, reused } => {
                if reused {
                    assert!(
                        self.idle.remove(&conn),
                        "R5: reused {conn:?}, which is not idle"
                    );
                }
                assert!(self.open.insert(conn), "R5: {conn:?} started twice");
                let phase = match self.kinds[&task] {
                    core::TaskKind::Stream => Phase::Stream,
                    core::TaskKind::WebSocket => Phase::AwaitingUpgrade,
                    _ => Phase::AwaitingHead,
                };
                assert!(
                    !reused || phase == Phase::AwaitingHead,
                    "R5: a {:?} task took a pooled connection",
                    self.kinds[&task]
                );
                let exchange = Exchange {
                    conn,
                    paused: false,
                    phase,
                    unread: VecDeque::new(),
                };
                assert!(
                    self.exchanges.insert(task, exchange).is_none() && !self.ended.contains(&task),
                    "R1: {task:?} started twice"
                );
            }
            Action::Pause { task } => {
                if let Some(exchange) = self.exchanges.get_mut(&task) {
                    exchange.paused = true;
                }
            }
            Action::Unpause { task } => {
                if let Some(exchange) = self.exchanges.get_mut(&task) {
                    exchange.paused = false;
                }
                self.read(core, task);
            }
            Action::ReadBody { task, into } => {
                if !self.exchanges.contains_key(&task) {
                    assert!(
                        self.ended.contains(&task),
                        "R1: ReadBody for {task:?}, never started"
                    );
                    return;
                }
                self.read_body(task, into);
                self.read(core, task);
            }
            Action::ReadStream { task } => {
                let Some(exchange) = self.exchanges.get_mut(&task) else {
                    assert!(self.ended.contains(&task), "R1: ReadStream for {task:?}");
                    return;
                };
                assert_eq!(
                    exchange.phase,
                    Phase::AwaitingDisposition,
                    "a stream made twice"
                );
                exchange.phase = Phase::Stream;
                self.read(core, task);
            }
            Action::Abort { task, conn } => {
                self.end(task);
                if let Some(conn) = conn {
                    // Held by the IO, or parked by it for body_end.
                    let held = self.open.remove(&conn)
                        || self.idle.remove(&conn)
                        || self.closed_by_io.remove(&conn);
                    assert!(held, "R5: aborted {task:?} on {conn:?}, which is not held");
                }
            }
            Action::Close { conn } => {
                assert!(
                    self.idle.remove(&conn),
                    "R4: closed {conn:?}, which is not idle"
                );
            }
            Action::ArmTimer { timer, .. } => {
                self.timers.insert((timer.task, timer.timeout), timer);
            }
            Action::DisarmTimer { timer } => {
                let key = (timer.task, timer.timeout);
                if self.timers.get(&key) == Some(&timer) {
                    self.timers.remove(&key);
                }
            }
            Action::RemoveTempFile { path, .. } => {
                // Missing is fine: the IO may have ended before it made the file.
                self.files.remove(&path);
            }
        }
    }

    /// The body may be read now: the delegate allowed it, or nobody had to.
    fn read_body(&mut self, task: core::TaskId, into: Option<PathBuf>) {
        let exchange = self.exchanges.get_mut(&task).expect("a live exchange");
        assert_eq!(
            exchange.phase,
            Phase::AwaitingDisposition,
            "the body allowed twice"
        );
        exchange.phase = Phase::ReadingBody {
            into_file: into.is_some(),
        };
        if let Some(path) = into {
            self.file_of.insert(task, path.clone());
            assert!(self.files.insert(path), "R5: a temp file made twice");
        }
    }

    fn end(&mut self, task: core::TaskId) {
        self.exchanges.remove(&task);
        self.ended.insert(task);
    }

    /// The engine's answer to the task's redirect, once it has one. Followed: see
    /// [`Network::follow`]. Refused: the redirect is the response, its disposition is
    /// awaited, then its empty body is read. False while no answer is due.
    fn redirect_answered(&mut self, core: &Core, task: core::TaskId) -> bool {
        match core.poll_redirect(task, &mut noop()) {
            Poll::Pending | Poll::Ready(None) => false,
            Poll::Ready(Some(core::Redirect::Follow(_))) => {
                let exchange = self.exchanges.get_mut(&task).expect("a live exchange");
                exchange.phase = Phase::FollowingRedirect;
                true
            }
            Poll::Ready(Some(core::Redirect::Refuse)) => {
                let exchange = self.exchanges.get_mut(&task).expect("a live exchange");
                exchange.phase = Phase::AwaitingDisposition;
                exchange.unread.push_front(Sent::End { reusable: true });
                true
            }
        }
    }

    /// Follow: the redirect's empty body is read, its connection parked, then pooled or
    /// closed as [`Core::hop`] says, and the IO waits for its next connection.
    fn follow(&mut self, core: &Core, task: core::TaskId) {
        let exchange = self.exchanges.remove(&task).expect("a live exchange");
        let conn = exchange.conn;
        self.io_closed(core, task, conn);
        self.idle.insert(conn);
        if core.hop(task, "stage", true) == Release::Close {
            self.idle.remove(&conn);
            self.closed_by_io.insert(conn);
        }
        self.hopping.insert(task);
    }

    /// IOs between hops take the connection the engine hands them; one whose task ended
    /// meanwhile ends. True if any moved.
    fn hop_on(&mut self, core: &Core) -> bool {
        let mut moved = false;
        for task in self.hopping.clone() {
            match core.poll_start(task, &mut noop()) {
                Poll::Pending => {}
                Poll::Ready(Some(start)) => {
                    self.hopping.remove(&task);
                    self.start_handler(core, task, start);
                    moved = true;
                }
                Poll::Ready(None) => {
                    self.hopping.remove(&task);
                    self.ended.insert(task);
                    moved = true;
                }
            }
        }
        moved
    }

    /// Read what the server sent, as far as the exchange can go without the engine.
    fn read(&mut self, core: &Core, task: core::TaskId) {
        loop {
            let Some(exchange) = self.exchanges.get_mut(&task) else {
                return;
            };
            match (exchange.phase, exchange.paused) {
                (Phase::AwaitingRedirect, _) => {
                    if self.redirect_answered(core, task) {
                        continue;
                    }
                    return;
                }
                (Phase::FollowingRedirect, false) => return self.follow(core, task),
                (Phase::FollowingRedirect, true) => return,
                _ => {}
            }
            let Some(&sent) = exchange.unread.front() else {
                return;
            };
            if exchange.paused {
                return; // R7: a paused exchange reads nothing.
            }
            let conn = exchange.conn;
            match (sent, exchange.phase) {
                (Sent::Redirect, Phase::AwaitingHead) => {
                    exchange.unread.pop_front();
                    let hops = self.hops.entry(task).or_default();
                    if *hops >= MAX_REDIRECTS {
                        // The IO's chain fails it, as the client's does.
                        self.end(task);
                        self.io_closed(core, task, conn);
                        let limit = MAX_REDIRECTS;
                        core.failed(task, core::Error::TooManyRedirects { limit });
                        return;
                    }
                    *hops += 1;
                    let next = format!("/hold/next-{hops}");
                    exchange.phase = Phase::AwaitingRedirect;
                    let response = http::Response::builder()
                        .status(http::StatusCode::TEMPORARY_REDIRECT)
                        .header(http::header::LOCATION, &next)
                        .body(())
                        .expect("a redirect");
                    let request = http::Request::get(next).body(()).expect("a request");
                    core.redirect(task, response, request);
                }
                (Sent::Head, Phase::AwaitingHead) => {
                    exchange.unread.pop_front();
                    exchange.phase = Phase::AwaitingDisposition;
                    match core.response(task, http::Response::new(())) {
                        Proceed::Read { into } => self.read_body(task, into),
                        Proceed::Wait => {}
                        Proceed::Stop => self.end(task),
                    }
                }
                (Sent::Bytes(n), Phase::ReadingBody { into_file }) => {
                    // R6: no more than the delegate's window has room for; the rest waits in
                    // the network until the delegate catches up.
                    let room = core.try_body_room(task).unwrap_or(usize::MAX);
                    if room == 0 {
                        return;
                    }
                    let n = match u32::try_from(room) {
                        Ok(room) if room < n => {
                            exchange.unread[0] = Sent::Bytes(n - room);
                            room
                        }
                        _ => {
                            exchange.unread.pop_front();
                            n
                        }
                    };
                    // Bytes for a task already completed (an action that crossed a cancel) are
                    // dropped with its IO: the engine takes none.
                    let live = core.task_state(task) != core::TaskState::Completed;
                    if !into_file && self.delegated && !self.handlers.contains(&task) && live {
                        self.bytes_fed += u64::from(n);
                    }
                    core.body_data(task, Bytes::from(vec![0u8; n as usize]));
                }
                (Sent::End { reusable }, Phase::ReadingBody { .. }) => {
                    self.end(task);
                    // Park the connection before asking, as Core::body_end requires.
                    self.io_closed(core, task, conn);
                    self.idle.insert(conn);
                    if core.body_end(task, reusable) == Release::Close {
                        self.idle.remove(&conn);
                        self.closed_by_io.insert(conn);
                    }
                }
                (sent, Phase::Stream) => {
                    // R6: the IO reads only what the window has room for.
                    let Some(Intake::Read(room)) = core.try_intake(task) else {
                        return;
                    };
                    match sent {
                        Sent::Bytes(n) => {
                            let took = room.min(n as usize);
                            assert_eq!(
                                core.stream_data(task, &vec![0; took]),
                                took,
                                "R6: the window refused the room it offered"
                            );
                            self.piped.entry(task).or_default().0 += took as u64;
                            let rest = n - took as u32;
                            if rest == 0 {
                                exchange.unread.pop_front();
                            } else {
                                exchange.unread[0] = Sent::Bytes(rest);
                            }
                        }
                        Sent::End { .. } => {
                            exchange.unread.pop_front();
                            core.stream_end(task);
                        }
                        Sent::Fault(fault) => {
                            self.end(task);
                            self.io_closed(core, task, conn);
                            core.failed(task, fault_error(fault));
                        }
                        other => panic!("a stream got {other:?}"),
                    }
                }
                (Sent::Upgrade { accept }, Phase::AwaitingUpgrade) => {
                    exchange.unread.pop_front();
                    if accept {
                        exchange.phase = Phase::WebSocket;
                        core.ws_opened(task, None);
                    } else {
                        self.end(task);
                        self.io_closed(core, task, conn);
                        core.failed(task, core::Error::NoUpgrade { status: 403 });
                    }
                }
                (sent, Phase::WebSocket) => {
                    // One message at a time; a closing websocket reads to find the close.
                    let Some(intake) = core.try_intake(task) else {
                        return;
                    };
                    exchange.unread.pop_front();
                    match sent {
                        Sent::Bytes(n) => {
                            if intake != Intake::Discard {
                                self.piped.entry(task).or_default().0 += u64::from(n);
                            }
                            let message = Message::Binary(Bytes::from(vec![0; n as usize]));
                            core.ws_message(task, message);
                        }
                        // The code as the IO read it off the wire; the engine judges it.
                        Sent::PeerClose(frame) => {
                            let code = match frame {
                                CloseFrame::Code => Some(1000),
                                CloseFrame::NoCode => None,
                                CloseFrame::InvalidCode => Some(999),
                            };
                            core.ws_peer_closed(task, code, String::new());
                        }
                        Sent::Fault(fault) => {
                            self.end(task);
                            self.io_closed(core, task, conn);
                            let error = match fault {
                                Fault::Reset => core::Error::ConnectionReset,
                                Fault::Malformed => {
                                    core::Error::WebSocketProtocol("bad frame".into())
                                }
                            };
                            core.failed(task, error);
                        }
                        other => panic!("a websocket got {other:?}"),
                    }
                }
                // Between the head and ReadBody the IO reads nothing: it waits for the delegate.
                (
                    Sent::Fault(fault),
                    Phase::AwaitingHead | Phase::AwaitingUpgrade | Phase::ReadingBody { .. },
                ) => {
                    self.end(task);
                    self.io_closed(core, task, conn);
                    core.failed(task, fault_error(fault));
                }
                // Waiting on the engine: the delegate's disposition.
                _ => return,
            }
        }
    }

    /// The IOs of streams and websockets write what their users queued, and read again where
    /// the user made room. True if anything moved.
    fn pump(&mut self, core: &Core) -> bool {
        let mut moved = self.hop_on(core);
        let live: Vec<core::TaskId> = self.exchanges.keys().copied().collect();
        for task in live {
            while core.try_outgoing(task).is_some() {
                core.sent(task);
                moved = true;
            }
            let before = self.exchanges.get(&task).map(|e| e.unread.len());
            let fed = self.piped.get(&task).map(|p| p.0);
            let body_fed = self.bytes_fed;
            self.read(core, task);
            moved |= before != self.exchanges.get(&task).map(|e| e.unread.len())
                || fed != self.piped.get(&task).map(|p| p.0)
                || body_fed != self.bytes_fed;
        }
        moved
    }

    /// The user took `bytes` back from a pipe.
    fn took(&mut self, task: core::TaskId, bytes: u64) {
        self.piped.entry(task).or_default().1 += bytes;
    }

    /// The pipe let go of everything it held (`close_read`).
    fn let_go(&mut self, task: core::TaskId) {
        let piped = self.piped.entry(task).or_default();
        piped.1 = piped.0;
    }

    /// What the driver handed to pipes that their users have not taken, for pipes still
    /// reading: a stream whose read half is closed, a closing websocket and a completed task
    /// have let go of theirs.
    fn held_by_pipes(&self, core: &Core) -> u64 {
        self.piped
            .iter()
            .filter(|(task, _)| {
                !matches!(
                    core.task_state(**task),
                    core::TaskState::Completed | core::TaskState::Canceling
                )
            })
            .map(|(_, (fed, took))| fed - took)
            .sum()
    }
}

fn fault_error(fault: Fault) -> core::Error {
    match fault {
        Fault::Reset => core::Error::ConnectionReset,
        Fault::Malformed => core::Error::MalformedResponse("bad status line".into()),
    }
}

fn engine_kind(kind: TaskKind) -> core::TaskKind {
    match kind {
        TaskKind::Data => core::TaskKind::Data,
        TaskKind::Download => core::TaskKind::Download,
        TaskKind::Upload => core::TaskKind::Upload,
        TaskKind::Stream => core::TaskKind::Stream,
        TaskKind::WebSocket => core::TaskKind::WebSocket,
    }
}

fn engine_disposition(answer: Disposition) -> core::Disposition {
    match answer {
        Disposition::Allow => core::Disposition::Allow,
        Disposition::Cancel => core::Disposition::Cancel,
        Disposition::BecomeDownload => core::Disposition::BecomeDownload,
        Disposition::BecomeStream => core::Disposition::BecomeStream,
    }
}

/// The ledger's account in the model's words.
pub fn model_resources(ledger: &core::Ledger) -> Resources {
    Resources {
        open_connections: ledger.open_connections,
        idle_connections: ledger.idle_connections,
        buffered_bytes: ledger.buffered_bytes,
        live_tasks: ledger.live_tasks,
        timers: ledger.timers,
        temp_files: ledger.temp_files,
        delegate_held: ledger.delegate_held,
        cached_responses: ledger.cached_responses,
    }
}

/// The model's name for an engine (or client) task state.
pub fn model_task_state(state: core::TaskState) -> TaskState {
    match state {
        core::TaskState::Suspended => TaskState::Suspended,
        core::TaskState::Running => TaskState::Running,
        core::TaskState::Canceling => TaskState::Canceling,
        core::TaskState::Completed => TaskState::Completed,
    }
}

/// The engine's name for a model session kind.
pub fn engine_session_kind(kind: SessionKind) -> core::SessionKind {
    match kind {
        SessionKind::Plain => core::SessionKind::Plain,
        SessionKind::Delegated => core::SessionKind::Delegated,
        SessionKind::Shared => core::SessionKind::Shared,
    }
}

/// The model's name for an engine (or client) session state.
pub fn model_session_state(state: core::SessionState) -> SessionState {
    match state {
        core::SessionState::Active => SessionState::Active,
        core::SessionState::Finishing => SessionState::Finishing,
        core::SessionState::Cancelling => SessionState::Cancelling,
        core::SessionState::Invalidated => SessionState::Invalidated,
    }
}

/// The model's outcome for an engine result.
pub fn model_outcome(result: &Result<(), core::Error>) -> Outcome {
    match result {
        Ok(()) => Outcome::Success,
        Err(core::Error::Cancelled) => Outcome::Cancelled,
        Err(core::Error::TimedOut(Timeout::Request)) => Outcome::TimedOut(Timer::Request),
        Err(core::Error::TimedOut(Timeout::Resource)) => Outcome::TimedOut(Timer::Resource),
        Err(core::Error::TimedOut(Timeout::Close)) => Outcome::TimedOut(Timer::Close),
        Err(core::Error::MalformedResponse(_) | core::Error::WebSocketProtocol(_)) => {
            Outcome::Malformed
        }
        Err(core::Error::InvalidDisposition { .. }) => Outcome::InvalidDisposition,
        Err(core::Error::NoUpgrade { .. }) => Outcome::NoUpgrade,
        Err(core::Error::TooManyRedirects { .. }) => Outcome::TooManyRedirects,
        Err(_) => Outcome::Reset,
    }
}

fn model_callback(
    callback: &core::Callback,
    model_id: &BTreeMap<core::TaskId, TaskId>,
    session: SessionId,
) -> Callback {
    let id = |t: &core::TaskId| model_id[t];
    match callback {
        core::Callback::ReceiveResponse { task, .. } => {
            Callback::ReceiveResponse { task: id(task) }
        }
        core::Callback::WillRedirect { task, .. } => Callback::WillRedirect { task: id(task) },
        core::Callback::ReceiveData { task, data } => Callback::ReceiveData {
            task: id(task),
            bytes: data.len() as u64,
        },
        core::Callback::BecomeDownload { task } => Callback::BecomeDownload { task: id(task) },
        core::Callback::FinishDownloading { task, .. } => {
            Callback::FinishDownloading { task: id(task) }
        }
        core::Callback::BecomeStream { task, .. } => Callback::BecomeStream { task: id(task) },
        core::Callback::Open { task, .. } => Callback::Open { task: id(task) },
        core::Callback::Close { task, .. } => Callback::Close { task: id(task) },
        core::Callback::Complete { task, result } => Callback::Complete {
            task: id(task),
            outcome: model_outcome(result),
        },
        core::Callback::BecomeInvalid => Callback::BecomeInvalid { session },
    }
}
