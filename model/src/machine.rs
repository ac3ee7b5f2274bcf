//! The state machine: sessions and tasks, and the transition each op makes.
//!
//! Every op is atomic here: a step runs until nothing more can happen without a new op, the
//! way a client settles after an event. The transient states an implementation passes through
//! inside one step (a task's `Canceling` while its IO is torn down, a session's `Finishing`
//! when its last task completes in the same step) are named in the enums but only stay visible
//! between ops when something outside must still answer.

use std::collections::{BTreeMap, VecDeque};

use crate::alphabet::{
    CACHE_ENTRIES, Callback, CloseFrame, Disposition, Fault, MAX_REDIRECTS, Op, Outcome, Redirect,
    Refusal, ResourceId, Returned, Route, SessionId, SessionKind, TaskId, TaskKind, Timer,
};
use crate::resources::Resources;

/// A session's lifecycle.
///
/// `Active` -> `Finishing` (finish_tasks_and_invalidate, or the last handle dropped) ->
/// `Invalidated`; `Active|Finishing` -> `Cancelling` (invalidate_and_cancel) -> `Invalidated`.
/// A finishing or cancelling session is invalidated as soon as every task is `Completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    Active,
    Finishing,
    Cancelling,
    Invalidated,
}

/// A task's lifecycle.
///
/// `Suspended` (initial) <-> `Running`; `Suspended|Running` -> `Canceling` -> `Completed`;
/// `Running` -> `Completed`. Resume and suspend do not nest. Every op on a `Completed` task is a
/// no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    Suspended,
    Running,
    /// Cancelled, with teardown still under way. Data, download, upload and stream tasks tear
    /// down within the step; a websocket stays here during its close handshake, at most the
    /// close timeout (R11).
    Canceling,
    Completed,
}

/// How far the HTTP exchange has gone, as the client has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exchange {
    /// Never resumed: no connection, no request.
    NotStarted,
    /// Resumed, waiting for one of its host's connection slots (`per_host`): no connection
    /// and no request yet, but its timers run (R12).
    AwaitingConnection,
    /// The request is sent on a connection; the response head is awaited.
    AwaitingResponse,
    /// A redirect's head arrived; the delegate's answer to `will_perform_redirection` is
    /// awaited. The connection is held, nothing is read, the timers run.
    AwaitingRedirect,
    /// The delegate said follow while the task was suspended: the redirect's rest is read and
    /// the next request sent on its connection once the task runs again (R7).
    FollowingRedirect,
    /// The head arrived; the delegate's answer to `did_receive_response` is awaited (it is
    /// queued behind a slow delegate's callbacks, or the delegate is in it). Nothing is read
    /// meanwhile; the timers run.
    AwaitingDisposition,
    /// The delegate allowed the response; the body is being read.
    ReceivingBody,
    /// A stream is connected (or its response became it); a websocket's upgrade was accepted.
    Open,
    /// The task has completed.
    Done,
}

/// How far the exchange has gone, as the server has seen it. Environment ops are valid by the
/// server's view; a suspended client sees them only when it resumes (R7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerPhase {
    /// No request has arrived.
    NoRequest,
    /// The request arrived; no response head sent yet.
    RequestReceived,
    /// The head is sent; body bytes may follow. For a stream, the connection is accepted; for
    /// a websocket, the upgrade is: bytes or messages may follow.
    SendingBody,
    /// The server has ended or broken the exchange.
    Done,
}

/// What the server did that the client has not read yet, because the task was suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unread {
    Headers(Disposition),
    Redirect(Redirect),
    Bytes(u32),
    End {
        reusable: bool,
    },
    Fault(Fault),
    /// The answer to a websocket's upgrade request.
    Upgrade {
        accept: bool,
    },
    /// A websocket close frame.
    PeerClose(CloseFrame),
}

/// How the delegate keeps up with its callbacks (the environment's choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pace {
    /// Each callback returns at once.
    Prompt,
    /// The next callback other than `did_receive_data` will not return until released.
    Blocked,
    /// The delegate is in this callback and will not return until released; the session's
    /// other callbacks wait in its queue.
    Stuck(Callback),
}

/// A session of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    pub kind: SessionKind,
    pub state: SessionState,
    /// The user still holds a handle.
    pub handle: bool,
    /// Connections kept alive in the session's pool.
    pub idle_connections: u32,
    /// Its tasks, in creation order.
    pub tasks: Vec<TaskId>,
    /// At most this many connections for HTTP exchanges to its host, busy or pooled.
    pub per_host: Option<u32>,
    /// Resumed HTTP tasks waiting for a connection, first come first served.
    pub waiting: VecDeque<TaskId>,
    /// How the delegate keeps up.
    pub pace: Pace,
    /// `did_become_invalid` has returned: the delegate is dropped (R3).
    pub delegate_released: bool,
    /// Downloads handed to the delegate whose `did_finish_downloading` has not returned: their
    /// files exist until it does.
    pub handing_over: u32,
    /// The delegate answers its next question later, through a responder it keeps.
    pub defers: bool,
    /// The resources its response cache holds, least recently used first.
    pub cache: VecDeque<ResourceId>,
    /// Callbacks said and not yet delivered, in order (one session's are delivered serially).
    queue: VecDeque<Callback>,
}

impl Session {
    /// Body bytes queued for the delegate and not yet handed to it.
    pub fn queued_bytes(&self) -> u64 {
        self.queue
            .iter()
            .map(|c| match c {
                Callback::ReceiveData { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }

    /// Callbacks said and not yet delivered.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// A task of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Task {
    pub session: SessionId,
    /// The kind now: a data task that became a download is a download task.
    pub kind: TaskKind,
    /// A task object, or a convenience's future.
    pub route: Route,
    pub state: TaskState,
    /// The user still holds a handle (for a convenience: the future).
    pub handle: bool,
    pub exchange: Exchange,
    pub server: ServerPhase,
    /// The task holds a connection (from resume until completion).
    pub connection: bool,
    /// The task holds a temp file (download tasks, from the allowed response to completion).
    pub temp_file: bool,
    /// A stream's read-ahead queue: bytes read from the network, not yet by the user (R6).
    pub buffered: u64,
    /// A stream's read half is closed (`close_read`, or the end was read).
    pub read_closed: bool,
    /// A stream's write half is closed (`close_write`; a response's stream from the start).
    pub write_closed: bool,
    /// A stream has read the peer's end: once `buffered` is read, `read` sees the end.
    pub peer_ended: bool,
    /// A stream made from a data task's response: its bytes are an HTTP body still.
    pub from_response: bool,
    /// A websocket's received message, waiting for `receive`: one at most, so a silent
    /// receiver holds one message and the rest wait in the network.
    pub inbox: Option<u64>,
    /// Body bytes said to the delegate that it has not returned from: at most the window
    /// (the model's read-ahead) for a data or upload task of a delegated session (R6).
    pub undelivered: u64,
    /// The delegate's body window, for a task whose body goes to a delegate: a data or upload
    /// task of a delegated session (not a convenience); `None` for the others.
    pub window: Option<u64>,
    /// The delegate keeps the task's responder, unanswered (it may outlive the task).
    pub responder: bool,
    /// Redirects followed.
    pub hops: u32,
    /// A convenience's GET of a cacheable resource ([`Op::Fetch`]).
    pub fetch: Option<ResourceId>,
    /// The delegate's answer to the response head, applied when it returns.
    answer: Disposition,
    /// The delegate's answer to a redirect, applied when it returns.
    redirect: Redirect,
    unread: VecDeque<Unread>,
}

impl Task {
    /// Whether the task is still alive for its session (not `Completed`).
    pub fn is_live(&self) -> bool {
        self.state != TaskState::Completed
    }

    /// Whether the task's request and resource timers are armed: it is running and waiting
    /// on an HTTP response or body (R7, R12). A connected stream and an open websocket wait on
    /// their user, not on the server: no timer runs for them.
    pub fn timers_armed(&self) -> bool {
        self.state == TaskState::Running
            && match self.kind {
                TaskKind::Data | TaskKind::Download | TaskKind::Upload => matches!(
                    self.exchange,
                    Exchange::AwaitingConnection
                        | Exchange::AwaitingResponse
                        | Exchange::AwaitingRedirect
                        | Exchange::AwaitingDisposition
                        | Exchange::ReceivingBody
                ),
                TaskKind::WebSocket => self.exchange == Exchange::AwaitingResponse,
                TaskKind::Stream => false,
            }
    }

    /// Whether the task's delegate is a window behind: its IO reads nothing and waits on the
    /// delegate, not the network, so its request timer does not run (R6, R12).
    pub fn behind(&self) -> bool {
        self.is_live()
            && self.kind != TaskKind::Download
            && self.window.is_some_and(|w| self.undelivered >= w)
    }

    /// Whether the task waits for an answer its delegate's responder will give: the callback
    /// returned, the answer did not come with it. Its request timer stops meanwhile (R12).
    pub fn deferred(&self) -> bool {
        self.responder
            && matches!(
                self.exchange,
                Exchange::AwaitingDisposition | Exchange::AwaitingRedirect
            )
    }

    /// Whether `timer` is armed for the task.
    pub fn armed(&self, timer: Timer) -> bool {
        match timer {
            Timer::Request => self.timers_armed() && !self.behind() && !self.deferred(),
            Timer::Resource => self.timers_armed(),
            // R11: a websocket's close handshake is bounded.
            Timer::Close => self.closing(),
        }
    }

    /// How many timers are armed.
    pub fn armed_timers(&self) -> u32 {
        [Timer::Request, Timer::Resource, Timer::Close]
            .into_iter()
            .filter(|t| self.armed(*t))
            .count() as u32
    }

    /// Whether the server's bytes are HTTP now, so they can be malformed: a raw stream's are
    /// anything, and a websocket's frames are the websocket library's to check.
    pub fn speaks_http(&self) -> bool {
        match self.kind {
            TaskKind::Data | TaskKind::Download | TaskKind::Upload => true,
            TaskKind::Stream => self.from_response,
            TaskKind::WebSocket => false,
        }
    }

    /// Whether a stream or websocket reads its socket now, room in a stream's read-ahead aside:
    /// running (or closing), and nothing waiting in the network ahead of what comes next.
    pub fn reads_now(&self) -> bool {
        self.unread.is_empty()
            && match (self.kind, self.state) {
                (TaskKind::WebSocket, TaskState::Canceling) => true,
                (TaskKind::WebSocket, TaskState::Running) => self.inbox.is_none(),
                (TaskKind::Stream, TaskState::Running) => !self.read_closed,
                _ => false,
            }
    }

    /// A websocket in its close handshake (ours began it; the peer's close is awaited).
    pub fn closing(&self) -> bool {
        self.kind == TaskKind::WebSocket && self.state == TaskState::Canceling
    }

    /// Bytes the task holds for its user: a stream's queue, a websocket's message.
    pub fn held_bytes(&self) -> u64 {
        self.buffered + self.inbox.unwrap_or(0)
    }

    /// Bytes the server has sent that the client has not read yet (they sit in the network).
    pub fn unread_bytes(&self) -> u64 {
        self.unread
            .iter()
            .map(|u| match u {
                Unread::Bytes(n) => u64::from(*n),
                _ => 0,
            })
            .sum()
    }
}

/// What an op did: whether it was refused, and the callbacks the delegates hear, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub refused: Option<Refusal>,
    /// What a stream or websocket op returned, when it was not refused.
    pub returned: Option<Returned>,
    pub callbacks: Vec<Callback>,
    /// The conveniences whose future returned in this step, with what it returned. Several
    /// futures wake in no defined order, so compare them as a set.
    pub awaited: Vec<(TaskId, Outcome)>,
}

/// The read-ahead queue of a stream, in bytes, unless the model is made with another: the
/// client's default 64 KiB window less its default 16 KiB transport buffer (R6).
pub const DEFAULT_READ_AHEAD: u64 = 48 * 1024;

/// IO that lags behind the delivery of callbacks (see [`Model::linearizations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lagging {
    /// The task reads what already waits in the network.
    Read(TaskId),
    /// A fetch admitted to a connection (`reused`: a pooled one) is answered.
    Serve(TaskId, ResourceId, bool),
}

/// The whole specification state: every session and task a sequence has created.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Model {
    sessions: BTreeMap<SessionId, Session>,
    tasks: BTreeMap<TaskId, Task>,
    read_ahead: u64,
    /// Within one op, in its second outcome ([`Model::linearizations`]): the IO that a
    /// delegate's return or answer let run (a task reading what already arrived, a fetch
    /// admitted to a connection and answered), which runs only once the session's queued
    /// callbacks have been delivered. `None` between ops.
    lagging: Option<Vec<Lagging>>,
}

impl Default for Model {
    fn default() -> Self {
        Self::with_read_ahead(DEFAULT_READ_AHEAD)
    }
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// A model whose streams hold at most `bytes` read ahead (R6).
    ///
    /// # Panics
    /// If `bytes` is 0: a stream that can hold nothing can read nothing.
    pub fn with_read_ahead(bytes: u64) -> Self {
        assert!(
            bytes > 0,
            "a stream's read-ahead must hold at least one byte"
        );
        Self {
            sessions: BTreeMap::new(),
            tasks: BTreeMap::new(),
            read_ahead: bytes,
            lagging: None,
        }
    }

    /// The most a stream holds read ahead (R6).
    pub fn read_ahead(&self) -> u64 {
        self.read_ahead
    }

    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    pub fn sessions(&self) -> impl Iterator<Item = (SessionId, &Session)> {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    pub fn tasks(&self) -> impl Iterator<Item = (TaskId, &Task)> {
        self.tasks.iter().map(|(id, t)| (*id, t))
    }

    /// The id the next `CreateSession` should use.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.sessions.keys().next_back().map_or(0, |s| s.0 + 1))
    }

    /// The id the next `CreateTask` should use: one past the highest task created. A refused
    /// creation (R8) creates nothing, so its id is used again by the next one.
    pub fn next_task_id(&self) -> TaskId {
        TaskId(self.tasks.keys().next_back().map_or(0, |t| t.0 + 1))
    }

    /// The resources the session may hold now (R4, R5).
    pub fn resources(&self, id: SessionId) -> Resources {
        let Some(session) = self.sessions.get(&id) else {
            return Resources::default();
        };
        let tasks = || session.tasks.iter().map(|t| &self.tasks[t]);
        let count = |f: fn(&Task) -> bool| tasks().filter(|t| f(t)).count() as u32;
        Resources {
            open_connections: count(|t| t.connection),
            idle_connections: session.idle_connections,
            // What streams and websockets hold waits for their user (R6); the body bytes a data
            // task read wait in the session's queue while its delegate is slow.
            buffered_bytes: tasks().map(Task::held_bytes).sum::<u64>() + session.queued_bytes(),
            live_tasks: count(Task::is_live),
            timers: tasks().map(Task::armed_timers).sum(),
            temp_files: count(|t| t.temp_file) + session.handing_over,
            delegate_held: session.kind == SessionKind::Delegated && !session.delegate_released,
            cached_responses: session.cache.len() as u32,
        }
    }

    /// Whether `op` may be tried in this state: the ids it names exist, the user still holds
    /// the handle it needs, and the server is at a point where it can do it. An op that is
    /// allowed can still be refused by the lifecycle (R8) or be a no-op (a `Completed` task).
    pub fn allows(&self, op: &Op) -> bool {
        let task = |id: &TaskId| self.tasks.get(id);
        let user_task = |id: &TaskId| task(id).is_some_and(|t| t.handle);
        let user_session = |id: &SessionId| self.sessions.get(id).is_some_and(|s| s.handle);
        match op {
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => {
                !self.sessions.contains_key(session)
                    && *per_host != Some(0)
                    && (*kind != SessionKind::Shared
                        || self
                            .sessions
                            .values()
                            .all(|s| s.kind != SessionKind::Shared))
            }
            Op::FinishTasksAndInvalidate(s)
            | Op::InvalidateAndCancel(s)
            | Op::DropSession(s)
            | Op::Reset(s) => user_session(s),
            Op::Fetch {
                session,
                task,
                resource,
            } => {
                user_session(session)
                    && !self.tasks.contains_key(task)
                    && usize::from(resource.0) <= CACHE_ENTRIES
            }
            Op::CreateTask { session, task, .. } => {
                user_session(session) && !self.tasks.contains_key(task)
            }
            Op::Await {
                session,
                task,
                kind,
            } => user_session(session) && !self.tasks.contains_key(task) && is_http(*kind),
            // A future offers none of these: it is awaited or dropped.
            Op::Resume(t) | Op::Suspend(t) | Op::Cancel(t) => {
                user_task(t) && self.tasks[t].route == Route::Handle
            }
            Op::DropTask(t) => user_task(t),
            // A response's stream reaches its user through did_become_stream, once returned.
            Op::Read(t) | Op::Write(t) | Op::CloseRead(t) | Op::CloseWrite(t) => {
                user_task(t) && self.tasks[t].kind == TaskKind::Stream && !self.becoming_stream(*t)
            }
            Op::Receive(t) | Op::CloseWith(t) => {
                user_task(t) && self.tasks[t].kind == TaskKind::WebSocket
            }
            Op::ServerHeaders { task: t, .. } => task(t).is_some_and(|t| {
                t.server == ServerPhase::RequestReceived && t.kind != TaskKind::WebSocket
            }),
            Op::ServerRedirects { task: t, .. } => {
                task(t).is_some_and(|t| t.server == ServerPhase::RequestReceived && is_http(t.kind))
            }
            Op::ServerAnswersUpgrade { task: t, .. } => task(t).is_some_and(|t| {
                t.server == ServerPhase::RequestReceived && t.kind == TaskKind::WebSocket
            }),
            Op::ServerSends { task: t, bytes } => {
                *bytes > 0 && task(t).is_some_and(|t| t.server == ServerPhase::SendingBody)
            }
            Op::ServerEnds { task: t, .. } => task(t).is_some_and(|t| {
                t.server == ServerPhase::SendingBody && t.kind != TaskKind::WebSocket
            }),
            Op::PeerCloses { task: t, .. } => task(t).is_some_and(|t| {
                t.server == ServerPhase::SendingBody && t.kind == TaskKind::WebSocket
            }),
            Op::ServerFails { task: t, fault } => task(t).is_some_and(|t| {
                matches!(
                    t.server,
                    ServerPhase::RequestReceived | ServerPhase::SendingBody
                ) && (*fault == Fault::Reset || t.speaks_http())
                    // A stream or websocket stops reading when it holds enough (R6). A reset
                    // that reaches it then races the user's next write, and discards what is
                    // still in flight, which depends on kernel buffers the model does not know.
                    // The alphabet resets one only while it reads, so the reset is seen at once.
                    && (matches!(t.kind, TaskKind::Data | TaskKind::Download | TaskKind::Upload)
                        || (t.reads_now() && t.buffered < self.read_ahead))
            }),
            Op::TimePasses { task: t, timer } => task(t).is_some_and(|t| t.armed(*timer)),
            Op::IdleTimeoutPasses(s) => self.sessions.contains_key(s),
            Op::DelegateBlocks(s) => self.sessions.get(s).is_some_and(|s| {
                s.kind == SessionKind::Delegated && !s.delegate_released && s.pace == Pace::Prompt
            }),
            Op::DelegateReturns(s) => self.sessions.get(s).is_some_and(|s| s.pace != Pace::Prompt),
            Op::DelegateDefers(s) => self.sessions.get(s).is_some_and(|s| {
                s.kind == SessionKind::Delegated && !s.delegate_released && !s.defers
            }),
            Op::Answer(t) | Op::DropResponder(t) => task(t).is_some_and(|t| t.responder),
            Op::Par(a, b) => {
                let creates = |op: &Op| matches!(op, Op::CreateTask { .. });
                // A resume and a suspend of one task interleave with its IO's reading, window
                // by window, which no serial order of the two describes.
                let pausing = |op: &Op| matches!(op, Op::Resume(_) | Op::Suspend(_));
                let same_task = a.task().is_some() && a.task() == b.task();
                let after = |first: &Op, then: &Op| {
                    let mut model = self.clone();
                    model.apply(first);
                    model.allows(then)
                };
                // A convenience's future is not shared between threads: it is awaited.
                let object = |op: &Op| {
                    op.task()
                        .and_then(|t| self.tasks.get(&t))
                        .is_none_or(|t| t.route == Route::Handle)
                };
                a.may_run_in_parallel()
                    && b.may_run_in_parallel()
                    && object(a)
                    && object(b)
                    && !(creates(a) && creates(b))
                    && !(same_task && pausing(a) && pausing(b))
                    && self.session_of(a).is_some()
                    && self.session_of(a) == self.session_of(b)
                    && self.allows(a)
                    && self.allows(b)
                    && after(a, b)
                    && after(b, a)
                    && !self.serves_a_fetch(a)
                    && !self.serves_a_fetch(b)
                    && self.orders_tell_apart(a, b)
            }
        }
    }

    /// The session an op is about, if it names one or a task of one.
    pub fn session_of(&self, op: &Op) -> Option<SessionId> {
        match *op {
            Op::CreateSession { session, .. }
            | Op::CreateTask { session, .. }
            | Op::Await { session, .. }
            | Op::FinishTasksAndInvalidate(session)
            | Op::InvalidateAndCancel(session)
            | Op::DropSession(session)
            | Op::IdleTimeoutPasses(session) => Some(session),
            Op::Par(ref a, _) => self.session_of(a),
            _ => op
                .task()
                .and_then(|t| self.tasks.get(&t))
                .map(|t| t.session),
        }
    }

    /// Every outcome `op` may have from here, each as the model after it and its step: one,
    /// or for [`Op::Par`] the two serial orders (the first as written). A system's outcome
    /// must be one of them.
    ///
    /// A delegate's return ([`Op::DelegateReturns`]) or its late answer ([`Op::Answer`]) may
    /// have two: the IO it lets run (the task it lets read reading what already waits in the
    /// network; a fetch it lets into a connection slot being answered by the server) runs at
    /// once (as [`Model::apply`] has it), or only after the session's queued callbacks have
    /// been delivered and have taken effect. A client's IO runs beside its delivery of callbacks,
    /// so either may come first: the next callback (a cancel that frees a connection slot,
    /// a stream let go of) can act before the IO has read the end or the failure that had
    /// already arrived. Nothing is held longer either way; only which connection a waiting
    /// task gets, or which ending a task has, can differ.
    ///
    /// # Panics
    /// If `op` is not allowed.
    pub fn linearizations(&self, op: &Op) -> Vec<(Model, Step)> {
        let mut orders = Vec::new();
        match op {
            Op::Par(a, b) => {
                for (first, second) in [(a, b), (b, a)] {
                    let mut model = self.clone();
                    let step = model.apply_serially(first, second);
                    orders.push((model, step));
                }
            }
            _ => {
                let mut model = self.clone();
                let step = model.apply(op);
                orders.push((model, step));
                if matches!(op, Op::DelegateReturns(_) | Op::Answer(_)) {
                    let mut lagging = self.clone();
                    lagging.lagging = Some(Vec::new());
                    let step = lagging.apply(op);
                    if (&lagging, &step) != (&orders[0].0, &orders[0].1) {
                        orders.push((lagging, step));
                    }
                }
            }
        }
        orders
    }

    /// Whether `op` alone admits a waiting fetch, which the server answers whole as it is
    /// admitted ([`Op::Fetch`]). Two ops at once where one does are not offered: in either
    /// serial order the answer comes between them, and its pooled connection is there for the
    /// second op's waiter; a system that runs both ops first need not have it.
    fn serves_a_fetch(&self, op: &Op) -> bool {
        let mut after = self.clone();
        after.apply(op);
        self.tasks.iter().any(|(t, task)| {
            task.fetch.is_some()
                && task.exchange == Exchange::AwaitingConnection
                && after.tasks[t].exchange != Exchange::AwaitingConnection
        })
    }

    /// Whether a system's outcome of `a` and `b` at once says which order they took: the two
    /// orders end in the same state, or they differ in what anyone can see (what the
    /// delegates hear, a refusal, a task's state, what a session holds). Two resumes racing for
    /// a host's last slot are neither: which task got it shows only later, so the pair is not
    /// offered.
    fn orders_tell_apart(&self, a: &Op, b: &Op) -> bool {
        let (mut one, mut other) = (self.clone(), self.clone());
        let (first, second) = (one.apply_serially(a, b), other.apply_serially(b, a));
        if one.clone().settled() == other.clone().settled() {
            return true;
        }
        let seen = |model: &Model| {
            let tasks: Vec<_> = model.tasks.values().map(|t| t.state).collect();
            let held: Vec<_> = model.sessions.keys().map(|s| model.resources(*s)).collect();
            (tasks, held)
        };
        first != second || seen(&one) != seen(&other)
    }

    /// The model less what no op can reach any more: a completed task's server side.
    fn settled(mut self) -> Model {
        for task in self.tasks.values_mut().filter(|t| !t.is_live()) {
            task.server = ServerPhase::Done;
            task.answer = Disposition::Allow;
        }
        self
    }

    /// `first` then `second`, as one step: their callbacks and results in that order, and the
    /// first refusal (only a creation is ever refused, and at most one is in a `Par`).
    fn apply_serially(&mut self, first: &Op, second: &Op) -> Step {
        let mut step = self.apply(first);
        let then = self.apply(second);
        step.refused = step.refused.or(then.refused);
        step.callbacks.extend(then.callbacks);
        step.awaited.extend(then.awaited);
        step
    }

    /// Apply `op`, which must be [`allowed`](Self::allows), and say what it did.
    ///
    /// # Panics
    /// If `op` is not allowed: a generator bug, not a lifecycle outcome.
    pub fn apply(&mut self, op: &Op) -> Step {
        assert!(self.allows(op), "op not allowed in this state: {op:?}");
        let mut out = Step::default();
        match *op {
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => {
                self.sessions.insert(
                    session,
                    Session {
                        kind,
                        state: SessionState::Active,
                        handle: true,
                        idle_connections: 0,
                        tasks: Vec::new(),
                        per_host,
                        waiting: VecDeque::new(),
                        pace: Pace::Prompt,
                        delegate_released: false,
                        handing_over: 0,
                        defers: false,
                        cache: VecDeque::new(),
                        queue: VecDeque::new(),
                    },
                );
            }
            Op::FinishTasksAndInvalidate(s) => self.finish_tasks_and_invalidate(s, &mut out),
            Op::InvalidateAndCancel(s) => self.invalidate_and_cancel(s, &mut out),
            Op::DropSession(s) => {
                self.session_mut(s).handle = false;
                // R10: dropping the last handle is finish_tasks_and_invalidate. Suspended tasks
                // without a handle were cancelled when their handle went. A running
                // convenience's future holds the session until it returns.
                if !self.futures_hold(s) {
                    self.finish_tasks_and_invalidate(s, &mut out);
                }
            }
            Op::CreateTask {
                session,
                task,
                kind,
            } => self.create_task(session, task, kind, Route::Handle, &mut out),
            Op::Await {
                session,
                task,
                kind,
            } => {
                self.create_task(session, task, kind, Route::Future, &mut out);
                if out.refused.is_none() {
                    // Its first poll resumes it.
                    self.resume(task, &mut out);
                }
            }
            Op::Fetch {
                session,
                task,
                resource,
            } => {
                self.create_task(session, task, TaskKind::Data, Route::Future, &mut out);
                if out.refused.is_none() {
                    self.task_mut(task).fetch = Some(resource);
                    self.resume(task, &mut out);
                }
            }
            Op::Reset(s) => {
                // Whatever the session's state: one invalidated and not yet released (its
                // delegate is in did_become_invalid) still has its cache, which goes now.
                let session = self.session_mut(s);
                session.cache.clear();
                session.idle_connections = 0;
            }
            Op::Resume(t) => self.resume(t, &mut out),
            Op::Suspend(t) => {
                let task = self.task_mut(t);
                if task.state == TaskState::Running {
                    task.state = TaskState::Suspended;
                    if task.exchange == Exchange::AwaitingConnection {
                        // It gives up its place; resuming queues it again.
                        task.exchange = Exchange::NotStarted;
                        let session = task.session;
                        self.session_mut(session).waiting.retain(|w| *w != t);
                    }
                }
            }
            Op::Cancel(t) => {
                if self.tasks[&t].is_live() {
                    self.complete(t, Outcome::Cancelled, &mut out);
                }
            }
            Op::DropTask(t) => self.drop_task(t, &mut out),
            Op::Read(t) => self.read_stream(t, &mut out),
            Op::Write(t) => {
                let task = &self.tasks[&t];
                if !task.is_live() {
                    out.refused = Some(Refusal::Closed);
                } else if task.write_closed {
                    out.refused = Some(Refusal::WriteClosed);
                }
            }
            Op::CloseRead(t) => {
                if self.tasks[&t].is_live() {
                    let task = self.task_mut(t);
                    task.read_closed = true;
                    task.buffered = 0;
                    self.finish_stream_if_closed(t, &mut out);
                }
            }
            Op::CloseWrite(t) => {
                if self.tasks[&t].is_live() {
                    self.task_mut(t).write_closed = true;
                    self.finish_stream_if_closed(t, &mut out);
                }
            }
            Op::Receive(t) => {
                let task = self.task_mut(t);
                if matches!(task.state, TaskState::Canceling | TaskState::Completed) {
                    out.refused = Some(Refusal::Closed);
                } else {
                    out.returned = Some(Returned::Received(task.inbox.take()));
                    self.pump(t, &mut out);
                }
            }
            Op::CloseWith(t) => self.close_websocket(t, &mut out),
            Op::ServerAnswersUpgrade { task, accept } => {
                self.task_mut(task).server = if accept {
                    ServerPhase::SendingBody
                } else {
                    ServerPhase::Done
                };
                self.network(task, Unread::Upgrade { accept }, &mut out);
            }
            Op::PeerCloses { task, frame } => {
                self.task_mut(task).server = ServerPhase::Done;
                self.network(task, Unread::PeerClose(frame), &mut out);
            }
            Op::ServerHeaders { task, answer } => {
                self.task_mut(task).server = ServerPhase::SendingBody;
                self.network(task, Unread::Headers(answer), &mut out);
            }
            Op::ServerRedirects { task, answer } => {
                // What the server sees next: the next hop's request (once the client sends
                // it), or nothing more, the redirect being the response or too many.
                let follows = !self.delegated(task) || answer == Redirect::Follow;
                let t = self.task_mut(task);
                t.server = if follows && t.hops < MAX_REDIRECTS {
                    ServerPhase::NoRequest
                } else {
                    ServerPhase::Done
                };
                self.network(task, Unread::Redirect(answer), &mut out);
            }
            Op::ServerSends { task, bytes } => self.network(task, Unread::Bytes(bytes), &mut out),
            Op::ServerEnds { task, reusable } => {
                self.task_mut(task).server = ServerPhase::Done;
                self.network(task, Unread::End { reusable }, &mut out);
            }
            Op::ServerFails { task, fault } => {
                self.task_mut(task).server = ServerPhase::Done;
                self.network(task, Unread::Fault(fault), &mut out);
            }
            Op::TimePasses { task, timer } => {
                self.complete(task, Outcome::TimedOut(timer), &mut out);
            }
            Op::IdleTimeoutPasses(s) => {
                self.session_mut(s).idle_connections = 0;
                // Their slots are free: waiting tasks take them.
                self.admit(s, &mut out);
            }
            Op::DelegateBlocks(s) => self.session_mut(s).pace = Pace::Blocked,
            Op::DelegateDefers(s) => self.session_mut(s).defers = true,
            Op::Answer(t) => {
                let waiting = self.tasks[&t].deferred() && self.tasks[&t].is_live();
                let task = self.task_mut(t);
                task.responder = false;
                if waiting {
                    self.answered(t, &mut out);
                }
            }
            Op::DropResponder(t) => {
                let waiting = self.tasks[&t].deferred() && self.tasks[&t].is_live();
                self.task_mut(t).responder = false;
                if waiting {
                    self.complete(t, Outcome::Cancelled, &mut out);
                }
            }
            Op::DelegateReturns(s) => {
                let pace = std::mem::replace(&mut self.session_mut(s).pace, Pace::Prompt);
                if let Pace::Stuck(callback) = pace {
                    self.returned(s, callback, &mut out);
                }
            }
            // As written; `linearizations` gives the other order too.
            Op::Par(ref a, ref b) => {
                out = self.apply_serially(a, b);
                return out;
            }
        }
        self.deliver(&mut out);
        // The IO that lagged behind the delivery reads now (see `linearizations`).
        if let Some(lagging) = self.lagging.take() {
            for io in lagging {
                match io {
                    Lagging::Read(t) => self.pump(t, &mut out),
                    Lagging::Serve(t, resource, reused) => {
                        if self.tasks[&t].is_live() {
                            self.serve(t, resource, reused, &mut out);
                        }
                    }
                }
            }
            self.deliver(&mut out);
        }
        out
    }

    /// Hand queued callbacks to their delegates, in order, as far as each delegate keeps up:
    /// a slow one takes the next callback and stays in it (its `did_receive_data` aside, which
    /// returns). What a callback's return lets happen (the answer to a response head, room in
    /// a body window, a file removed) happens as it returns.
    fn deliver(&mut self, out: &mut Step) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for s in ids {
            loop {
                let session = self.session_mut(s);
                if matches!(session.pace, Pace::Stuck(_)) {
                    break;
                }
                let Some(callback) = session.queue.pop_front() else {
                    break;
                };
                out.callbacks.push(callback);
                if session.pace == Pace::Blocked
                    && !matches!(callback, Callback::ReceiveData { .. })
                {
                    session.pace = Pace::Stuck(callback);
                    break;
                }
                self.returned(s, callback, out);
            }
        }
    }

    /// The delegate returned from `callback`.
    fn returned(&mut self, s: SessionId, callback: Callback, out: &mut Step) {
        match callback {
            Callback::ReceiveResponse { task: t } | Callback::WillRedirect { task: t } => {
                if std::mem::take(&mut self.session_mut(s).defers) {
                    // It kept a responder: the answer comes with `Op::Answer`, or never.
                    self.task_mut(t).responder = true;
                    return;
                }
                let task = &self.tasks[&t];
                let asked = match callback {
                    Callback::WillRedirect { .. } => Exchange::AwaitingRedirect,
                    _ => Exchange::AwaitingDisposition,
                };
                if task.is_live() && task.exchange == asked {
                    self.answered(t, out);
                }
            }
            Callback::ReceiveData { task: t, bytes } => {
                let task = self.task_mut(t);
                task.undelivered = task.undelivered.saturating_sub(bytes);
                // Room in its window: the IO reads on.
                self.read_on(t, out);
            }
            Callback::FinishDownloading { .. } => self.session_mut(s).handing_over -= 1,
            Callback::BecomeStream { task: t } => {
                // The suite's delegates keep the stream's handle while the user holds the
                // task's; a stream nobody holds is cancelled.
                let task = &self.tasks[&t];
                if task.is_live() && !task.handle {
                    self.complete(t, Outcome::Cancelled, out);
                }
            }
            Callback::BecomeInvalid { .. } => {
                // R3: dropped right after it returns; the session is released with it (R4).
                let session = self.session_mut(s);
                session.delegate_released = true;
                session.cache.clear();
            }
            Callback::BecomeDownload { .. }
            | Callback::Open { .. }
            | Callback::Close { .. }
            | Callback::Complete { .. } => {}
        }
    }

    fn session_mut(&mut self, id: SessionId) -> &mut Session {
        self.sessions.get_mut(&id).expect("session exists")
    }

    fn task_mut(&mut self, id: TaskId) -> &mut Task {
        self.tasks.get_mut(&id).expect("task exists")
    }

    /// Create a `Suspended` task, or refuse it: R8, and nothing is allocated.
    fn create_task(
        &mut self,
        session: SessionId,
        task: TaskId,
        kind: TaskKind,
        route: Route,
        out: &mut Step,
    ) {
        if self.sessions[&session].state != SessionState::Active {
            out.refused = Some(Refusal::SessionInvalidated);
            return;
        }
        self.session_mut(session).tasks.push(task);
        self.tasks.insert(
            task,
            Task {
                session,
                kind,
                route,
                state: TaskState::Suspended,
                handle: true,
                exchange: Exchange::NotStarted,
                server: ServerPhase::NoRequest,
                connection: false,
                temp_file: false,
                buffered: 0,
                read_closed: false,
                write_closed: false,
                peer_ended: false,
                from_response: false,
                inbox: None,
                undelivered: 0,
                responder: false,
                hops: 0,
                fetch: None,
                redirect: Redirect::Follow,
                window: (route == Route::Handle
                    && self.sessions[&session].kind == SessionKind::Delegated
                    && matches!(kind, TaskKind::Data | TaskKind::Upload))
                .then_some(self.read_ahead),
                answer: Disposition::Allow,
                unread: VecDeque::new(),
            },
        );
    }

    /// Whether the task's callbacks go to a delegate: the session has one, and the task is
    /// not a convenience.
    fn delegated(&self, task: TaskId) -> bool {
        let t = &self.tasks[&task];
        t.route == Route::Handle && self.sessions[&t.session].kind == SessionKind::Delegated
    }

    /// Whether the task's `did_become_stream` is queued or the delegate is in it: the stream's
    /// handle is the delegate's until it returns.
    fn becoming_stream(&self, t: TaskId) -> bool {
        let session = &self.sessions[&self.tasks[&t].session];
        let becoming = Callback::BecomeStream { task: t };
        session.pace == Pace::Stuck(becoming) || session.queue.contains(&becoming)
    }

    /// Whether a running convenience's future still holds a clone of the session.
    fn futures_hold(&self, s: SessionId) -> bool {
        self.sessions[&s].tasks.iter().any(|t| {
            let task = &self.tasks[t];
            task.route == Route::Future && task.handle && task.is_live()
        })
    }

    /// Queue `callback` for the task's delegate, if it has one; [`Model::deliver`] hands it
    /// over.
    fn say(&mut self, task: TaskId, callback: Callback, _: &mut Step) {
        if self.delegated(task) {
            let session = self.tasks[&task].session;
            self.session_mut(session).queue.push_back(callback);
        }
    }

    fn resume(&mut self, t: TaskId, out: &mut Step) {
        if self.tasks[&t].state != TaskState::Suspended {
            return; // Running: resumes do not nest. Completed: no-op.
        }
        let session = self.tasks[&t].session;
        let task = self.task_mut(t);
        task.state = TaskState::Running;
        if task.exchange == Exchange::FollowingRedirect {
            self.follow(t);
        }
        let task = self.task_mut(t);
        if task.exchange == Exchange::NotStarted {
            match task.kind {
                TaskKind::Stream => {
                    // A raw TCP connection of its own, at once (no HTTP slot): open once
                    // connected, never pooled.
                    task.connection = true;
                    task.exchange = Exchange::Open;
                    task.server = ServerPhase::SendingBody;
                }
                TaskKind::WebSocket => {
                    // The upgrade takes a connection of its own at once (no HTTP slot); it
                    // never returns to the pool.
                    task.connection = true;
                    task.exchange = Exchange::AwaitingResponse;
                    task.server = ServerPhase::RequestReceived;
                }
                TaskKind::Data | TaskKind::Download | TaskKind::Upload => {
                    task.exchange = Exchange::AwaitingConnection;
                    self.session_mut(session).waiting.push_back(t);
                    self.admit(session, out);
                }
            }
        }
        // R7: what the server sent while the task was suspended is read now, in order.
        self.pump(t, out);
    }

    /// The HTTP connections to the session's host, busy and pooled: what `per_host` bounds.
    fn http_connections(&self, s: SessionId) -> u32 {
        let session = &self.sessions[&s];
        let busy = session
            .tasks
            .iter()
            .map(|t| &self.tasks[t])
            .filter(|t| t.connection && is_http(t.kind))
            .count() as u32;
        busy + session.idle_connections
    }

    /// Start the waiting tasks that can have a connection now, in order: a pooled one first
    /// (reused), else a new one while the host has a free slot.
    fn admit(&mut self, s: SessionId, out: &mut Step) {
        if self.sessions[&s].state == SessionState::Cancelling {
            // Every task is being cancelled in this step: none starts meanwhile (a fetch the
            // server would answer at once among them).
            return;
        }
        while let Some(&t) = self.sessions[&s].waiting.front() {
            let session = &self.sessions[&s];
            let reuse = session.idle_connections > 0;
            let free = session
                .per_host
                .is_none_or(|limit| self.http_connections(s) < limit);
            if !reuse && !free {
                return;
            }
            let session = self.session_mut(s);
            session.waiting.pop_front();
            if reuse {
                session.idle_connections -= 1;
            }
            let task = self.task_mut(t);
            task.connection = true;
            task.exchange = Exchange::AwaitingResponse;
            task.server = ServerPhase::RequestReceived;
            match (task.fetch, &mut self.lagging) {
                // Admitted as a delegate returns: the server's answer may come after the
                // session's next callbacks (see `linearizations`).
                (Some(resource), Some(lagging)) => {
                    lagging.push(Lagging::Serve(t, resource, reuse));
                }
                (Some(resource), None) => self.serve(t, resource, reuse, out),
                (None, _) => self.pump(t, out),
            }
        }
    }

    /// A fetch of `resource` has a connection (`reused`: a pooled one). The cache answers if
    /// it holds the resource, and the connection goes back unused: to the pool if it came
    /// from there, else it was never opened. Else the server answers whole at once: the
    /// connection is pooled and the response kept, the least recently used one evicted if the
    /// cache is full. Kept before the task completes.
    fn serve(&mut self, t: TaskId, resource: ResourceId, reused: bool, out: &mut Step) {
        let s = self.tasks[&t].session;
        let session = self.session_mut(s);
        let hit = session.cache.contains(&resource);
        session.cache.retain(|r| *r != resource);
        session.cache.push_back(resource);
        while session.cache.len() > CACHE_ENTRIES {
            session.cache.pop_front();
        }
        let task = self.task_mut(t);
        task.server = ServerPhase::Done;
        if hit {
            task.connection = false;
            if reused {
                self.session_mut(s).idle_connections += 1;
            }
            self.complete(t, Outcome::Success, out);
        } else {
            self.complete_success(t, true, out);
        }
    }

    /// The server did something: a running task reads it now, a suspended one later (R7), a
    /// completed one never.
    fn network(&mut self, t: TaskId, event: Unread, out: &mut Step) {
        if self.tasks[&t].is_live() {
            self.task_mut(t).unread.push_back(event);
            self.pump(t, out);
        }
    }

    /// Read what waits in the network, as far as the task reads now: a running data task
    /// reads everything; a stream fills its read-ahead queue and stops (R6); a websocket reads
    /// while it holds no message, and a closing one reads to find the peer's close, dropping
    /// messages (R11); a suspended task reads nothing (R7).
    fn pump(&mut self, t: TaskId, out: &mut Step) {
        loop {
            let task = &self.tasks[&t];
            let reading = match task.state {
                TaskState::Running => true,
                TaskState::Canceling => task.closing(),
                TaskState::Suspended | TaskState::Completed => false,
            };
            let Some(&event) = task.unread.front() else {
                return;
            };
            if !reading {
                return;
            }
            match task.kind {
                TaskKind::Data | TaskKind::Download | TaskKind::Upload => {
                    if matches!(
                        task.exchange,
                        Exchange::AwaitingDisposition | Exchange::AwaitingRedirect
                    ) {
                        return; // Nothing is read until the delegate answers.
                    }
                    if let (Unread::Bytes(n), Some(window)) = (event, task.window)
                        && task.kind != TaskKind::Download
                    {
                        // R6: what the delegate's window has room for; the rest waits in the
                        // network until it catches up.
                        let room = window - task.undelivered;
                        if room == 0 {
                            return;
                        }
                        let took = room.min(u64::from(n));
                        let task = self.task_mut(t);
                        match u32::try_from(u64::from(n) - took) {
                            Ok(0) | Err(_) => {
                                task.unread.pop_front();
                            }
                            Ok(rest) => task.unread[0] = Unread::Bytes(rest),
                        }
                        task.undelivered += took;
                        self.say(
                            t,
                            Callback::ReceiveData {
                                task: t,
                                bytes: took,
                            },
                            out,
                        );
                        continue;
                    }
                    self.task_mut(t).unread.pop_front();
                    self.read(t, event, out);
                }
                TaskKind::Stream => {
                    if task.read_closed {
                        return; // Nothing reads the socket any more.
                    }
                    let room = self.read_ahead - task.buffered;
                    if room == 0 {
                        // R6: backpressure. A full stream reads nothing, so the end or a
                        // reset behind the bytes is seen once the user makes room.
                        return;
                    }
                    let task = self.task_mut(t);
                    match event {
                        Unread::Bytes(n) => {
                            let took = room.min(u64::from(n));
                            task.buffered += took;
                            match u32::try_from(u64::from(n) - took) {
                                Ok(0) | Err(_) => {
                                    task.unread.pop_front();
                                }
                                Ok(rest) => task.unread[0] = Unread::Bytes(rest),
                            }
                        }
                        Unread::End { .. } => {
                            task.unread.pop_front();
                            task.peer_ended = true;
                        }
                        Unread::Fault(fault) => {
                            task.unread.pop_front();
                            self.complete(t, fault_outcome(fault), out);
                        }
                        Unread::Headers(_)
                        | Unread::Redirect(_)
                        | Unread::Upgrade { .. }
                        | Unread::PeerClose(_) => {
                            unreachable!("{t}: a stream gets no {event:?}")
                        }
                    }
                }
                TaskKind::WebSocket => {
                    let closing = task.closing();
                    if !closing && task.inbox.is_some() && !matches!(event, Unread::Upgrade { .. })
                    {
                        return; // The held message must be received first.
                    }
                    let task = self.task_mut(t);
                    task.unread.pop_front();
                    match event {
                        Unread::Upgrade { accept: true } => {
                            task.exchange = Exchange::Open;
                            self.say(t, Callback::Open { task: t }, out);
                        }
                        Unread::Upgrade { accept: false } => {
                            self.complete(t, Outcome::NoUpgrade, out);
                        }
                        // A closing websocket drops what still arrives (R11).
                        Unread::Bytes(_) if closing => {}
                        Unread::Bytes(n) => task.inbox = Some(u64::from(n)),
                        Unread::PeerClose(CloseFrame::Code | CloseFrame::NoCode) => {
                            // Ours answers theirs, or theirs answers ours: the handshake is
                            // done and the connection closes.
                            self.say(t, Callback::Close { task: t }, out);
                            self.complete(t, Outcome::Success, out);
                        }
                        // The peer broke the protocol: no did_close, whose code would be one
                        // the peer never sent; the connection closes.
                        Unread::PeerClose(CloseFrame::InvalidCode) => {
                            self.complete(t, Outcome::Malformed, out);
                        }
                        Unread::Fault(fault) => self.complete(t, fault_outcome(fault), out),
                        Unread::Headers(_) | Unread::Redirect(_) | Unread::End { .. } => {
                            unreachable!("{t}: a websocket gets no {event:?}")
                        }
                    }
                }
            }
        }
    }

    /// The delegate's answer to the question the task waits on takes effect, and the task
    /// reads on.
    fn answered(&mut self, t: TaskId, out: &mut Step) {
        let task = &self.tasks[&t];
        match task.exchange {
            Exchange::AwaitingDisposition => {
                let answer = task.answer;
                self.answer(t, answer, out);
            }
            Exchange::AwaitingRedirect => match task.redirect {
                Redirect::Follow => self.follow(t),
                Redirect::Refuse => self.refuse_redirect(t, out),
            },
            other => unreachable!("{t}: no question waits in {other:?}"),
        }
        self.read_on(t, out);
    }

    /// A delegate's return lets the task's IO read: at once, or once the session's queued
    /// callbacks are delivered (see `linearizations`).
    fn read_on(&mut self, t: TaskId, out: &mut Step) {
        match &mut self.lagging {
            Some(lagging) => lagging.push(Lagging::Read(t)),
            None => self.pump(t, out),
        }
    }

    /// Follow a redirect: its empty body is read, so its connection is kept alive, and the
    /// next request goes on it at once, ahead of any task waiting for one of the host's
    /// connections. A suspended task reads nothing (R7): it follows once resumed.
    fn follow(&mut self, t: TaskId) {
        let task = self.task_mut(t);
        if task.state != TaskState::Running {
            task.exchange = Exchange::FollowingRedirect;
            return;
        }
        task.hops += 1;
        task.exchange = Exchange::AwaitingResponse;
        task.server = ServerPhase::RequestReceived;
    }

    /// Refuse a redirect: it is the response, heard as one, and it is complete (no body).
    fn refuse_redirect(&mut self, t: TaskId, out: &mut Step) {
        self.say(t, Callback::ReceiveResponse { task: t }, out);
        let task = self.task_mut(t);
        task.exchange = Exchange::AwaitingDisposition;
        task.answer = Disposition::Allow;
        task.unread.push_front(Unread::End { reusable: true });
    }

    fn read(&mut self, t: TaskId, event: Unread, out: &mut Step) {
        match event {
            Unread::Redirect(answer) => {
                if self.tasks[&t].hops >= MAX_REDIRECTS {
                    self.complete(t, Outcome::TooManyRedirects, out);
                } else if self.delegated(t) {
                    self.say(t, Callback::WillRedirect { task: t }, out);
                    let task = self.task_mut(t);
                    task.exchange = Exchange::AwaitingRedirect;
                    task.redirect = answer;
                } else {
                    self.follow(t);
                }
            }
            Unread::Headers(answer) => {
                if self.delegated(t) {
                    // Its delegate answers when it returns from did_receive_response.
                    self.say(t, Callback::ReceiveResponse { task: t }, out);
                    let task = self.task_mut(t);
                    task.exchange = Exchange::AwaitingDisposition;
                    task.answer = answer;
                } else {
                    // Without a delegate (or for a convenience) every response is allowed.
                    self.answer(t, Disposition::Allow, out);
                }
            }
            Unread::Bytes(n) => {
                // A download's body goes to its temp file; the others' to the delegate.
                if self.tasks[&t].kind != TaskKind::Download {
                    self.say(
                        t,
                        Callback::ReceiveData {
                            task: t,
                            bytes: u64::from(n),
                        },
                        out,
                    );
                }
            }
            Unread::End { reusable } => self.complete_success(t, reusable, out),
            Unread::Fault(fault) => self.complete(t, fault_outcome(fault), out),
            Unread::Upgrade { .. } | Unread::PeerClose(_) => {
                unreachable!("{t}: an HTTP exchange gets no {event:?}")
            }
        }
    }

    /// The answer to the task's response head takes effect.
    fn answer(&mut self, t: TaskId, answer: Disposition, out: &mut Step) {
        {
            {
                let task = self.task_mut(t);
                match (answer, task.kind) {
                    (Disposition::Allow, kind) => {
                        task.exchange = Exchange::ReceivingBody;
                        task.temp_file = kind == TaskKind::Download;
                    }
                    (Disposition::BecomeDownload, TaskKind::Data) => {
                        task.kind = TaskKind::Download;
                        task.exchange = Exchange::ReceivingBody;
                        task.temp_file = true;
                        self.say(t, Callback::BecomeDownload { task: t }, out);
                    }
                    (Disposition::BecomeStream, TaskKind::Data) => {
                        // The body from its first unread byte is the stream's; a response
                        // cannot be written to.
                        task.kind = TaskKind::Stream;
                        task.exchange = Exchange::Open;
                        task.write_closed = true;
                        task.from_response = true;
                        self.say(t, Callback::BecomeStream { task: t }, out);
                        // Its connection is the stream's now, out of the host's HTTP slots.
                        let session = self.tasks[&t].session;
                        self.admit(session, out);
                    }
                    (Disposition::BecomeDownload | Disposition::BecomeStream, _) => {
                        self.complete(t, Outcome::InvalidDisposition, out);
                    }
                    (Disposition::Cancel, _) => self.complete(t, Outcome::Cancelled, out),
                }
            }
        }
    }

    /// `read(0, window, 0)` on a stream.
    fn read_stream(&mut self, t: TaskId, out: &mut Step) {
        let task = self.task_mut(t);
        if !task.is_live() {
            out.refused = Some(Refusal::Closed);
        } else if task.read_closed {
            out.refused = Some(Refusal::ReadClosed);
        } else if task.buffered > 0 {
            out.returned = Some(Returned::Read(std::mem::take(&mut task.buffered)));
            self.pump(t, out); // Room again: the stream reads on.
        } else if task.peer_ended {
            out.returned = Some(Returned::Eof);
            task.read_closed = true;
            self.finish_stream_if_closed(t, out);
        } else {
            out.returned = Some(Returned::Read(0));
        }
    }

    /// A stream with both halves closed is done; its connection closes (streams are never
    /// pooled).
    fn finish_stream_if_closed(&mut self, t: TaskId, out: &mut Step) {
        let task = &self.tasks[&t];
        if task.is_live() && task.read_closed && task.write_closed {
            self.complete(t, Outcome::Success, out);
        }
    }

    /// `cancel_with(code)`: an open websocket begins the close handshake (R11); one that is not
    /// open has nothing to close and is cancelled.
    fn close_websocket(&mut self, t: TaskId, out: &mut Step) {
        let task = self.task_mut(t);
        match (task.state, task.exchange) {
            (TaskState::Canceling | TaskState::Completed, _) => {}
            (TaskState::Running | TaskState::Suspended, Exchange::Open) => {
                task.state = TaskState::Canceling;
                task.inbox = None;
                self.pump(t, out); // A close already in the network answers ours.
            }
            (TaskState::Running | TaskState::Suspended, _) => {
                self.complete(t, Outcome::Cancelled, out);
            }
        }
    }

    /// The user lets go of the task: one that can never run again is cancelled (R10); so is a
    /// stream nobody can read; an open websocket nobody can use is closed.
    fn drop_task(&mut self, t: TaskId, out: &mut Step) {
        let task = self.task_mut(t);
        task.handle = false;
        if task.route == Route::Future {
            // Dropping the future cancels its task; nobody is there to hear the result.
            if task.is_live() {
                self.complete(t, Outcome::Cancelled, out);
            }
            return;
        }
        match (task.state, task.kind) {
            // A response's stream whose handle the delegate has not returned with yet, running
            // or suspended: it is cancelled then, if nobody holds the task (`Model::returned`).
            (TaskState::Running | TaskState::Suspended, TaskKind::Stream)
                if self.becoming_stream(t) => {}
            (TaskState::Suspended, _) | (TaskState::Running, TaskKind::Stream) => {
                self.complete(t, Outcome::Cancelled, out);
            }
            (TaskState::Running, TaskKind::WebSocket) => self.close_websocket(t, out),
            _ => {}
        }
    }

    fn complete_success(&mut self, t: TaskId, reusable: bool, out: &mut Step) {
        if self.tasks[&t].kind == TaskKind::Download && self.delegated(t) {
            // The file is the delegate's until did_finish_downloading returns.
            let session = self.tasks[&t].session;
            self.session_mut(session).handing_over += 1;
            self.say(t, Callback::FinishDownloading { task: t }, out);
        }
        // R5: a connection goes back to the pool only when the response was read whole and the
        // server keeps it alive.
        if reusable {
            let session = self.tasks[&t].session;
            self.task_mut(t).connection = false;
            self.session_mut(session).idle_connections += 1;
        }
        self.complete(t, Outcome::Success, out);
    }

    /// The one place a task completes (R1). It releases what the task holds (R5) and
    /// invalidates a finishing session whose last task this was (R2).
    fn complete(&mut self, t: TaskId, outcome: Outcome, out: &mut Step) {
        let task = self.task_mut(t);
        debug_assert!(task.is_live(), "R1: {t} completes twice");
        let waited = task.exchange == Exchange::AwaitingConnection;
        task.state = TaskState::Completed;
        task.exchange = Exchange::Done;
        task.connection = false; // closed, unless complete_success pooled it first
        task.temp_file = false;
        // R5: what it held for its user goes with it.
        task.buffered = 0;
        task.inbox = None;
        task.unread.clear();
        task.undelivered = 0;
        let session = task.session;
        let future = task.route == Route::Future;
        let awaited = future && task.handle;
        if matches!(outcome, Outcome::Cancelled | Outcome::TimedOut(_)) {
            // R5: a task cancelled or timed out drops the body its delegate was not handed:
            // its did_complete comes next. A network failure is the network's own ending:
            // the bytes read before it are delivered first, as they arrived.
            self.session_mut(session)
                .queue
                .retain(|c| !matches!(c, Callback::ReceiveData { task, .. } if *task == t));
        }
        if awaited {
            out.awaited.push((t, outcome));
        }
        if waited {
            self.session_mut(session).waiting.retain(|w| *w != t);
        }
        self.say(t, Callback::Complete { task: t, outcome }, out);
        // Its connection is closed or pooled: a waiting task takes the slot, or the connection.
        self.admit(session, out);
        // The future returned and dropped its clone of the session: the last one, if the user
        // let go of theirs (R10).
        if future && !self.sessions[&session].handle && !self.futures_hold(session) {
            self.finish_tasks_and_invalidate(session, out);
        }
        if matches!(
            self.sessions[&session].state,
            SessionState::Finishing | SessionState::Cancelling
        ) {
            self.invalidate_if_done(session, out);
        }
    }

    fn finish_tasks_and_invalidate(&mut self, s: SessionId, out: &mut Step) {
        let session = self.session_mut(s);
        // R9: the shared session ignores invalidation.
        if session.kind == SessionKind::Shared || session.state != SessionState::Active {
            return;
        }
        session.state = SessionState::Finishing;
        self.invalidate_if_done(s, out);
    }

    fn invalidate_and_cancel(&mut self, s: SessionId, out: &mut Step) {
        let session = self.session_mut(s);
        if session.kind == SessionKind::Shared
            || !matches!(
                session.state,
                SessionState::Active | SessionState::Finishing
            )
        {
            return;
        }
        session.state = SessionState::Cancelling;
        // R2: every cancelled task's did_complete comes before did_become_invalid.
        for t in self.sessions[&s].tasks.clone() {
            if self.tasks[&t].is_live() {
                self.complete(t, Outcome::Cancelled, out);
            }
        }
        self.invalidate_if_done(s, out);
    }

    fn invalidate_if_done(&mut self, s: SessionId, _: &mut Step) {
        let session = &self.sessions[&s];
        if session.state == SessionState::Invalidated
            || session.tasks.iter().any(|t| self.tasks[t].is_live())
        {
            return;
        }
        let session = self.session_mut(s);
        session.state = SessionState::Invalidated;
        // R4: the pool closes with the session. The cache goes when the session is released:
        // at once without a delegate, else once did_become_invalid has returned (see
        // `Model::returned`).
        session.idle_connections = 0;
        if session.kind != SessionKind::Delegated {
            session.cache.clear();
        }
        if session.kind == SessionKind::Delegated {
            session
                .queue
                .push_back(Callback::BecomeInvalid { session: s });
        }
        // R3: the delegate is released right after this callback returns; see
        // `Model::resources`, which stops counting it here.
    }
}

fn fault_outcome(fault: Fault) -> Outcome {
    match fault {
        Fault::Reset => Outcome::Reset,
        Fault::Malformed => Outcome::Malformed,
    }
}

/// Whether a task of `kind` is an HTTP exchange, whose connection takes one of its host's
/// slots; a stream or a websocket has one of its own.
fn is_http(kind: TaskKind) -> bool {
    matches!(kind, TaskKind::Data | TaskKind::Download | TaskKind::Upload)
}
