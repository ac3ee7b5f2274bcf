//! The engine of one session: its task cells, its pool of idle connections, the two output
//! queues (actions for the driver, callbacks for the delegate) and the ledger. Plain data, no
//! locks, no IO, no clock: `crate::session` wraps it in the sync seam.
//!
//! Methods are grouped as quinn-proto groups its `Connection`: getters, the user's inputs, the
//! driver's inputs, the delivery's acknowledgements, then the internal transitions.

mod pipe;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Timeout};
use crate::{
    Action, Callback, ConnId, Disposition, Ledger, Proceed, Redirect, Release, Route, Start,
    TaskId, TaskKind, TimerId,
};
use pipe::{End, Pipe};
pub use pipe::{GOING_AWAY, NO_STATUS, close_code_allowed};

/// How a session is made: what it tells and whether it can be invalidated (the model's
/// `SessionKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// No delegate: nothing is queued for one, and every response is allowed.
    Plain,
    /// A delegate: callbacks are queued for it.
    Delegated,
    /// The process-wide shared session: no delegate, and it ignores invalidation (R9).
    Shared,
}

/// What the engine needs to know about its session. Durations are data: the engine never
/// reads a clock, it asks the driver to arm timers.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plain, delegated or shared; [`session`](crate::session) sets plain or delegated from
    /// whether it is given a delegate.
    pub kind: SessionKind,
    /// Idle time allowed between bytes (R12).
    pub request_timeout: Duration,
    /// Time allowed for a whole task (R12).
    pub resource_timeout: Duration,
    /// Where download tasks write their temp files.
    pub download_dir: PathBuf,
    /// A name unique in the process, used to name temp files.
    pub name: String,
    /// At most this many kept-alive connections per origin; more are closed, not pooled.
    pub max_idle_per_origin: usize,
    /// At most this many connections per origin, busy and idle together; a task that would
    /// need one more waits for one to be released.
    pub max_connections_per_origin: usize,
    /// The most a stream holds read ahead of its user (R6); its IO stops reading past it.
    pub read_ahead: usize,
    /// The most body bytes a delegated data or upload task queues for its delegate, the one in
    /// its hands included (R6); its IO stops reading past it (see
    /// [`Core::poll_body_room`](crate::Core::poll_body_room)).
    pub delegate_ahead: usize,
    /// The most a stream or websocket queues of what its user writes before writes wait.
    pub write_buffer: usize,
    /// How long our websocket close waits for the peer's (R11).
    pub close_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kind: SessionKind::Delegated,
            request_timeout: Duration::from_secs(60),
            resource_timeout: Duration::from_secs(7 * 24 * 3600),
            download_dir: std::env::temp_dir(),
            name: "leakproof".into(),
            max_idle_per_origin: usize::MAX,
            max_connections_per_origin: usize::MAX,
            read_ahead: 48 * 1024,
            delegate_ahead: 48 * 1024,
            write_buffer: 64 * 1024,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// A session's lifecycle (DESIGN.md, "Session states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    Active,
    Finishing,
    Cancelling,
    Invalidated,
}

/// A task's lifecycle (DESIGN.md, "Task states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    Suspended,
    Running,
    /// A websocket in its close handshake, at most the close timeout (R11); other tasks pass
    /// through it within one transition.
    Canceling,
    Completed,
}

/// How far a task's exchange has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    NotStarted,
    /// Running, but its origin is at its connection limit: it waits its turn.
    AwaitingConnection,
    AwaitingResponse,
    /// A redirect's head arrived; the delegate's answer (follow or refuse) is awaited. The IO
    /// holds the connection and reads nothing.
    AwaitingRedirect,
    /// The redirect is followed: the IO reads the redirect's body (to pool its connection),
    /// then hops ([`Engine::hop`]).
    FollowingRedirect,
    /// The head arrived; the delegate's disposition is awaited.
    AwaitingDisposition,
    ReceivingBody,
    /// A stream is connected, or a response became one; a websocket's upgrade was accepted.
    Open,
}

/// Who ends a task: its own IO (which then closes or pools its connection itself) or anyone
/// else (then the driver must abort the IO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndedBy {
    Io,
    Other,
}

/// One task's cell in the session's registry. It exists from creation to completion, then it
/// is removed: a completed task holds nothing (R5).
#[derive(Debug)]
struct Cell {
    kind: TaskKind,
    route: Route,
    origin: String,
    state: TaskState,
    /// The user's handles: one from creation, one more for a stream's delegate.
    handles: u32,
    exchange: Exchange,
    conn: Option<ConnId>,
    temp_file: Option<PathBuf>,
    /// The armed generation of each timer, by `Timeout as usize`.
    timers: [Option<u64>; 3],
    /// A stream's or websocket's bytes both ways.
    pipe: Option<Box<Pipe>>,
    /// A handler-routed task's start, until its handler takes it.
    start: Option<Start>,
    start_waker: Option<Waker>,
    /// Body bytes queued for the delegate, or in its hands, not yet acknowledged (R6).
    undelivered: u64,
    /// The IO waiting for the delegate to catch up ([`Engine::body_room`]).
    room_waker: Option<Waker>,
    /// The users waiting for the task's result ([`Engine::poll_result`]).
    result_wakers: Vec<Waker>,
    /// A redirect under way: asked of the delegate, or answered for the IO.
    redirect: Option<Box<Redirecting>>,
    /// The IO waiting for the redirect's answer ([`Engine::poll_redirect`]).
    redirect_waker: Option<Waker>,
    /// The delegate's answer (a disposition, a redirect's) comes later ([`Engine::defer`]):
    /// the request timeout does not run meanwhile.
    deferred: bool,
    /// Redirects followed. Once one is, the task's IO runs on through every hop: a new
    /// connection comes to it as to a handler's ([`Engine::poll_start`]), whatever its route.
    hops: u32,
}

/// A redirect of a task, between its head and the IO taking the answer.
#[derive(Debug)]
enum Redirecting {
    /// The delegate has `WillRedirect`; kept for a refusal (the head becomes the response) and
    /// for the default answer (the request proposed).
    Asked {
        response: http::Response<()>,
        request: http::Request<()>,
    },
    /// For the IO to take.
    Answered(Redirect),
}

/// A completed task's result, kept while its user holds a handle (R5: nothing more, and
/// only that long).
#[derive(Debug)]
struct Kept {
    handles: u32,
    result: Result<(), Error>,
}

const TIMEOUTS: [Timeout; 3] = [Timeout::Request, Timeout::Resource, Timeout::Close];

#[derive(Debug)]
pub(crate) struct Engine {
    config: Config,
    state: SessionState,
    tasks: BTreeMap<TaskId, Cell>,
    next_task: u64,
    next_conn: u64,
    next_timer: u64,
    /// Kept-alive connections, most recently pooled last.
    idle: Vec<(String, ConnId)>,
    /// What the driver must do, in order.
    actions: VecDeque<Action>,
    /// Actions the driver has taken off the queue, and how many of those it has carried out:
    /// all it took before it asks for the next one (see [`Engine::carried_out`]).
    taken: u64,
    done: u64,
    /// The driver is gone (its runtime shut down): no action will be carried out any more, so
    /// no callback waits for one.
    driver_gone: bool,
    pub(crate) action_waker: Option<Waker>,
    /// What the delegate must hear, in order, each with the number of actions the driver must
    /// have carried out before it may be delivered (see [`Engine::say`]).
    callbacks: VecDeque<(Callback, u64)>,
    pub(crate) callback_waker: Option<Waker>,
    /// Waiting for the session to be released.
    pub(crate) release_wakers: Vec<Waker>,
    /// Bytes in `callbacks` not yet handed to the delegate.
    buffered: u64,
    /// Bytes pipes hold for their users.
    held: u64,
    peak_buffered: u64,
    /// How pipe tasks ended, kept while their user holds a handle.
    ends: BTreeMap<TaskId, End>,
    /// Completed downloads whose file is with the delegate until did_finish_downloading returns.
    handed_over: Vec<(TaskId, PathBuf)>,
    delegate_held: bool,
    /// How handler-routed tasks ended, kept until their handler takes it.
    outcomes: BTreeMap<TaskId, Result<(), Error>>,
    /// How completed tasks ended, kept while their user holds a handle, for
    /// [`Engine::poll_result`].
    results: BTreeMap<TaskId, Kept>,
    /// Tasks waiting for a connection, first come first served.
    waiting: VecDeque<TaskId>,
    /// Wakers to wake once the lock is released.
    pub(crate) wake_later: Vec<Waker>,
}

impl Engine {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            delegate_held: config.kind == SessionKind::Delegated,
            config,
            state: SessionState::Active,
            tasks: BTreeMap::new(),
            next_task: 0,
            next_conn: 0,
            next_timer: 0,
            idle: Vec::new(),
            actions: VecDeque::new(),
            taken: 0,
            done: 0,
            driver_gone: false,
            action_waker: None,
            callbacks: VecDeque::new(),
            callback_waker: None,
            release_wakers: Vec::new(),
            buffered: 0,
            held: 0,
            peak_buffered: 0,
            ends: BTreeMap::new(),
            handed_over: Vec::new(),
            outcomes: BTreeMap::new(),
            results: BTreeMap::new(),
            waiting: VecDeque::new(),
            wake_later: Vec::new(),
        }
    }

    // ---- getters ----

    pub(crate) fn state(&self) -> SessionState {
        self.state
    }

    pub(crate) fn task_state(&self, task: TaskId) -> TaskState {
        self.tasks
            .get(&task)
            .map_or(TaskState::Completed, |cell| cell.state)
    }

    pub(crate) fn ledger(&self) -> Ledger {
        let count = |f: fn(&Cell) -> bool| self.tasks.values().filter(|c| f(c)).count() as u32;
        Ledger {
            open_connections: count(|c| c.conn.is_some()),
            idle_connections: self.idle.len() as u32,
            buffered_bytes: self.buffered + self.held,
            peak_buffered_bytes: self.peak_buffered,
            live_tasks: self.tasks.len() as u32,
            timers: self
                .tasks
                .values()
                .map(|c| c.timers.iter().flatten().count() as u32)
                .sum(),
            temp_files: count(|c| c.temp_file.is_some()) + self.handed_over.len() as u32,
            outgoing_bytes: self
                .tasks
                .values()
                .filter_map(|c| c.pipe.as_deref())
                .map(Pipe::unsent)
                .sum(),
            delegate_held: self.delegate_held,
            pending_actions: (self.actions.len() as u64 + self.taken - self.done) as u32,
            pending_callbacks: self.callbacks.len() as u32,
            tls_sessions: 0, // the client's to fill in
            cached_bytes: 0, // the client's too
            cached_responses: 0,
        }
    }

    /// Invalidated, every callback delivered, the delegate dropped and nothing left for the
    /// driver: the session's background work may end (R4).
    pub(crate) fn is_released(&self) -> bool {
        self.state == SessionState::Invalidated
            && self.callbacks.is_empty()
            && self.actions.is_empty()
            && (self.done == self.taken || self.driver_gone)
            && !self.delegate_held
            && self.handed_over.is_empty()
    }

    pub(crate) fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Whether the delivery can hand a callback over now.
    pub(crate) fn has_callbacks(&self) -> bool {
        self.callbacks
            .front()
            .is_some_and(|(_, barrier)| self.carried_out_up_to(*barrier))
    }

    pub(crate) fn next_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front()?;
        self.taken += 1;
        Some(action)
    }

    /// The driver asks for its next action, so it has carried out every one it took: it
    /// carries them out one at a time, in order.
    pub(crate) fn carried_out(&mut self) {
        self.done = self.taken;
    }

    /// The driver is gone: nothing it took or will take is carried out by it.
    pub(crate) fn driver_gone(&mut self) {
        self.driver_gone = true;
    }

    fn carried_out_up_to(&self, actions: u64) -> bool {
        self.done >= actions || self.driver_gone
    }

    /// Queue `callback` for the delegate. A promise that something is released
    /// (`did_complete`: R5; `did_become_invalid`: R4) waits until the driver has carried out
    /// every action queued before it (the abort that closes the task's socket, the removal of
    /// its file, the pool's closes), so that it is true when the delegate hears it, not soon
    /// after.
    pub(crate) fn say(&mut self, callback: Callback) {
        let barrier = match callback {
            Callback::Complete { .. } | Callback::BecomeInvalid => {
                self.taken + self.actions.len() as u64
            }
            _ => 0,
        };
        self.callbacks.push_back((callback, barrier));
    }

    pub(crate) fn next_callback(&mut self) -> Option<Callback> {
        if !self.has_callbacks() {
            return None;
        }
        let (callback, _) = self.callbacks.pop_front()?;
        if let Callback::ReceiveData { data, .. } = &callback {
            self.buffered -= data.len() as u64;
        }
        Some(callback)
    }

    // ---- the user's inputs ----

    pub(crate) fn create_task(
        &mut self,
        kind: TaskKind,
        origin: &str,
        route: Route,
    ) -> Result<TaskId, Error> {
        // R8: refused before anything is allocated.
        if self.state != SessionState::Active {
            return Err(Error::SessionInvalidated);
        }
        let id = TaskId(self.next_task);
        self.next_task += 1;
        self.tasks.insert(
            id,
            Cell {
                kind,
                route,
                origin: origin.to_owned(),
                state: TaskState::Suspended,
                handles: 1,
                exchange: Exchange::NotStarted,
                conn: None,
                temp_file: None,
                timers: [None; 3],
                pipe: matches!(kind, TaskKind::Stream | TaskKind::WebSocket).then(Pipe::new),
                start: None,
                start_waker: None,
                undelivered: 0,
                room_waker: None,
                result_wakers: Vec::new(),
                redirect: None,
                redirect_waker: None,
                deferred: false,
                hops: 0,
            },
        );
        Ok(id)
    }

    /// Resume. A start the task gets now is its IO's: the driver's (`Action::Start`) or, for
    /// an IO between redirect hops, the one that IO waits for in [`Engine::poll_start`].
    pub(crate) fn resume(&mut self, task: TaskId) {
        self.resume_only(task);
    }

    /// Resume; for a handler-routed task that starts now, return where: the handler runs
    /// the exchange itself (if it must wait for a connection, see [`Engine::poll_start`]).
    pub(crate) fn resume_and_start(&mut self, task: TaskId) -> Option<Start> {
        self.resume_only(task);
        self.tasks.get_mut(&task).and_then(|cell| cell.start.take())
    }

    fn resume_only(&mut self, task: TaskId) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return; // Completed: a no-op.
        };
        if cell.state != TaskState::Suspended {
            return; // Resumes do not nest.
        }
        cell.state = TaskState::Running;
        // A connected stream and an open websocket wait on their user: no timer for them.
        let timed = match cell.kind {
            TaskKind::Stream => false,
            TaskKind::WebSocket => cell.exchange != Exchange::Open,
            TaskKind::Data | TaskKind::Download | TaskKind::Upload => true,
        };
        if cell.exchange == Exchange::NotStarted {
            if cell.hops > 0 {
                // Suspended between two hops: its IO is paused, waiting for its connection.
                self.actions.push_back(Action::Unpause { task });
            }
            self.begin(task);
        } else {
            self.actions.push_back(Action::Unpause { task });
            self.wake_io(task);
        }
        if timed {
            // The request timeout is the network's idle time: not armed while the IO waits
            // for the delegate (R12); it is when the delegate catches up, or answers.
            if !self.behind(task) && !self.tasks[&task].deferred {
                self.arm(task, Timeout::Request);
            }
            self.arm(task, Timeout::Resource);
        }
    }

    /// Give the task a connection: a kept-alive one to its origin, else a new one within the
    /// origin's limit, else a place in the queue. A stream or a websocket takes a new
    /// connection of its own at once: it never gives it back, so it is outside the pool and
    /// its per-origin limit, which bound HTTP exchanges (a host with open websockets still
    /// serves requests).
    fn begin(&mut self, task: TaskId) {
        let origin = self.tasks[&task].origin.clone();
        let own = !is_http(self.tasks[&task].kind);
        let pooled = self
            .idle
            .iter()
            .rposition(|(o, _)| *o == origin)
            .filter(|_| !own);
        let (conn, reused) = match pooled {
            Some(i) => (self.idle.remove(i).1, true),
            None if own
                || self.connections_to(&origin) < self.config.max_connections_per_origin =>
            {
                self.next_conn += 1;
                (ConnId(self.next_conn), false)
            }
            None => {
                self.tasks.get_mut(&task).expect("live task").exchange =
                    Exchange::AwaitingConnection;
                self.waiting.push_back(task);
                return;
            }
        };
        let cell = self.tasks.get_mut(&task).expect("live task");
        cell.conn = Some(conn);
        // A stream is open once its IO connects; the IO may queue writes before then.
        cell.exchange = if cell.kind == TaskKind::Stream {
            Exchange::Open
        } else {
            Exchange::AwaitingResponse
        };
        match cell.route {
            // A hop's IO is running already: it waits for its connection as a handler does.
            Route::Delegate if cell.hops == 0 => {
                self.actions.push_back(Action::Start { task, conn, reused });
            }
            Route::Delegate | Route::Handler => {
                cell.start = Some(Start { conn, reused });
                self.wake_later.extend(cell.start_waker.take());
            }
        }
    }

    /// The pool's connections to `origin`, busy and idle: its HTTP exchanges'.
    fn connections_to(&self, origin: &str) -> usize {
        let busy = self
            .tasks
            .values()
            .filter(|c| c.conn.is_some() && c.origin == origin && is_http(c.kind))
            .count();
        busy + self.idle.iter().filter(|(o, _)| o == origin).count()
    }

    /// A connection to `origin` was released (pooled or closed): start whoever waits for one.
    fn admit(&mut self, origin: &str) {
        while let Some(i) = self
            .waiting
            .iter()
            .position(|t| self.tasks[t].origin == origin)
        {
            let has_idle = self.idle.iter().any(|(o, _)| o == origin);
            if !has_idle && self.connections_to(origin) >= self.config.max_connections_per_origin {
                return;
            }
            let task = self.waiting.remove(i).expect("found");
            self.begin(task);
        }
    }

    /// Where a handler-routed task starts, once it has a connection; `None` if it completed
    /// first.
    pub(crate) fn poll_start(&mut self, task: TaskId, waker: &Waker) -> Poll<Option<Start>> {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Poll::Ready(None);
        };
        match cell.start.take() {
            Some(start) => Poll::Ready(Some(start)),
            None => {
                cell.start_waker = Some(waker.clone());
                Poll::Pending
            }
        }
    }

    pub(crate) fn suspend(&mut self, task: TaskId) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.state != TaskState::Running {
            return;
        }
        cell.state = TaskState::Suspended;
        if cell.exchange == Exchange::AwaitingConnection {
            // It gives up its place; resuming queues it again.
            cell.exchange = Exchange::NotStarted;
            self.waiting.retain(|t| *t != task);
        } else {
            // R7: a suspended task reads nothing and no timer runs for it.
            self.actions.push_back(Action::Pause { task });
        }
        self.disarm_all(task);
    }

    pub(crate) fn cancel(&mut self, task: TaskId) {
        if self.tasks.contains_key(&task) {
            self.complete(task, Err(Error::Cancelled), EndedBy::Other);
        }
    }

    /// How a handler-routed task ended, once.
    pub(crate) fn take_outcome(&mut self, task: TaskId) -> Option<Result<(), Error>> {
        self.outcomes.remove(&task)
    }

    /// The task's result once it is completed, as `did_complete` gets it; meanwhile `waker`
    /// is woken when it completes. Every waiter is woken, not only the last one.
    pub(crate) fn poll_result(&mut self, task: TaskId, waker: &Waker) -> Poll<Result<(), Error>> {
        if let Some(cell) = self.tasks.get_mut(&task) {
            if !cell.result_wakers.iter().any(|w| w.will_wake(waker)) {
                cell.result_wakers.push(waker.clone());
            }
            return Poll::Pending;
        }
        // A handle exists (the caller holds one), so its result is kept.
        Poll::Ready(
            self.results
                .get(&task)
                .map_or(Err(Error::Cancelled), |kept| kept.result.clone()),
        )
    }

    /// How many completed tasks the engine keeps something of (a result, a stream's end, a
    /// handler's outcome) for handles still held: none once every handle to a completed task
    /// is gone (R5).
    pub(crate) fn kept(&self) -> usize {
        let kept: std::collections::BTreeSet<&TaskId> = (self.results.keys())
            .chain(self.ends.keys())
            .chain(self.outcomes.keys())
            .collect();
        kept.len()
    }

    pub(crate) fn task_handle_dropped(&mut self, task: TaskId) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            self.outcomes.remove(&task);
            self.ends.remove(&task);
            if let Some(kept) = self.results.get_mut(&task) {
                kept.handles -= 1;
                if kept.handles == 0 {
                    self.results.remove(&task);
                }
            }
            return;
        };
        cell.handles -= 1;
        if cell.handles > 0 {
            return;
        }
        self.outcomes.remove(&task);
        match (cell.state, cell.kind) {
            // Nothing can resume it any more: waiting would hold the session open (R10).
            // Nor can anything read a stream any more.
            (TaskState::Suspended, _) | (TaskState::Running, TaskKind::Stream) => {
                self.complete(task, Err(Error::Cancelled), EndedBy::Other);
            }
            // Nor use a websocket: it says goodbye, within the close timeout (R11).
            (TaskState::Running, TaskKind::WebSocket) => {
                self.cancel_with(task, GOING_AWAY, String::new());
            }
            _ => {}
        }
    }

    pub(crate) fn finish_tasks_and_invalidate(&mut self) {
        // R9: the shared session ignores invalidation.
        if self.config.kind == SessionKind::Shared || self.state != SessionState::Active {
            return;
        }
        self.state = SessionState::Finishing;
        self.invalidate_if_done();
    }

    pub(crate) fn invalidate_and_cancel(&mut self) {
        if self.config.kind == SessionKind::Shared
            || !matches!(self.state, SessionState::Active | SessionState::Finishing)
        {
            return;
        }
        self.state = SessionState::Cancelling;
        // R2: each cancelled task's did_complete is queued before did_become_invalid.
        let live: Vec<TaskId> = self.tasks.keys().copied().collect();
        for task in live {
            self.complete(task, Err(Error::Cancelled), EndedBy::Other);
        }
        self.invalidate_if_done();
    }

    /// R10: the last handle dropped is finish_tasks_and_invalidate. Suspended tasks whose
    /// handle is gone were cancelled when it went.
    pub(crate) fn session_handle_dropped(&mut self) {
        self.finish_tasks_and_invalidate();
    }

    // ---- the driver's inputs ----

    pub(crate) fn response(&mut self, task: TaskId, response: http::Response<()>) -> Proceed {
        let delegated = self.config.kind == SessionKind::Delegated;
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Proceed::Stop;
        };
        if cell.exchange != Exchange::AwaitingResponse {
            return Proceed::Stop;
        }
        cell.exchange = Exchange::AwaitingDisposition;
        let asks_delegate = delegated && cell.route == Route::Delegate;
        self.rearm(task, Timeout::Request);
        if asks_delegate {
            self.say(Callback::ReceiveResponse { task, response });
            Proceed::Wait
        } else {
            // Nobody else decides: allowed at once, and the IO is told so directly.
            Proceed::Read {
                into: self.receive_body(task),
            }
        }
    }

    /// A redirect's head arrived, and `request` would follow it. The delegate decides, if the
    /// task has one; else it is followed. Either way the IO learns the answer from
    /// [`Engine::poll_redirect`].
    pub(crate) fn redirect(
        &mut self,
        task: TaskId,
        response: http::Response<()>,
        request: http::Request<()>,
    ) {
        let delegated = self.config.kind == SessionKind::Delegated;
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != Exchange::AwaitingResponse {
            return;
        }
        if delegated && cell.route == Route::Delegate {
            cell.exchange = Exchange::AwaitingRedirect;
            cell.redirect = Some(Box::new(Redirecting::Asked {
                response: response.clone(),
                request: request.clone(),
            }));
            self.say(Callback::WillRedirect {
                task,
                response,
                request: Box::new(request),
            });
        } else {
            cell.exchange = Exchange::FollowingRedirect;
            cell.redirect = Some(Box::new(Redirecting::Answered(Redirect::Follow(request))));
        }
        self.rearm(task, Timeout::Request);
    }

    /// The answer to the task's redirect, once there is one; `None` once the task is over.
    pub(crate) fn poll_redirect(&mut self, task: TaskId, waker: &Waker) -> Poll<Option<Redirect>> {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Poll::Ready(None);
        };
        match cell.redirect.take().map(|r| *r) {
            Some(Redirecting::Answered(answer)) => Poll::Ready(Some(answer)),
            asked => {
                cell.redirect = asked.map(Box::new);
                cell.redirect_waker = Some(waker.clone());
                Poll::Pending
            }
        }
    }

    /// The followed redirect's exchange is over: its connection is pooled (`reusable`: its
    /// body was read whole and the server keeps it alive) or closed, as the answer says, and
    /// the task begins again for `origin`, with a connection of that origin's (pooled, new, or
    /// awaited in the queue: [`Engine::poll_start`]). The resource timeout runs on; the
    /// request timeout starts again.
    pub(crate) fn hop(&mut self, task: TaskId, origin: &str, reusable: bool) -> Release {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Release::Close;
        };
        if cell.exchange != Exchange::FollowingRedirect {
            return Release::Close;
        }
        let left = std::mem::replace(&mut cell.origin, origin.to_owned());
        cell.hops += 1;
        let pooled_there = self.idle.iter().filter(|(o, _)| *o == left).count();
        let room = pooled_there < self.config.max_idle_per_origin;
        let cell = self.tasks.get_mut(&task).expect("live task");
        let release = match cell.conn.take() {
            Some(conn) if reusable && room => {
                self.idle.push((left.clone(), conn));
                Release::Pool
            }
            _ => Release::Close,
        };
        cell.exchange = Exchange::NotStarted;
        if cell.state == TaskState::Running {
            self.begin(task);
            self.rearm(task, Timeout::Request);
        }
        // The connection it left is free (pooled or closed): whoever waits for one there. A
        // running task's next request, to the same origin, took it first; a suspended one
        // begins again once resumed (R7).
        self.admit(&left);
        release
    }

    pub(crate) fn body_data(&mut self, task: TaskId, data: Bytes) {
        let Some(cell) = self.tasks.get(&task) else {
            return; // Completed: the bytes are dropped with the IO.
        };
        if cell.exchange != Exchange::ReceivingBody {
            return;
        }
        let to_delegate = self.to_delegate(cell);
        // A chunk read just before a suspend took effect is still delivered: it was read.
        if to_delegate && !data.is_empty() {
            let len = data.len() as u64;
            let was_behind = self.behind(task);
            self.buffered += len;
            self.peak_buffered = self.peak_buffered.max(self.buffered + self.held);
            self.tasks.get_mut(&task).expect("live task").undelivered += len;
            self.say(Callback::ReceiveData { task, data });
            if !was_behind && self.behind(task) {
                // The IO waits for the delegate now, not for the network (R12).
                self.disarm(task, Timeout::Request);
                return;
            }
        }
        self.rearm(task, Timeout::Request);
    }

    /// How many body bytes the task's IO may read and report now (R6): what the delegate's
    /// window has room for, for a delegated data or upload task; no limit for a download, a
    /// handler-routed task or a session without a delegate. `Pending` while the delegate is a
    /// window behind: the IO stops reading the socket and is woken when it catches up.
    /// `None` once the task no longer reads a body.
    pub(crate) fn body_room(&mut self, task: TaskId, waker: Option<&Waker>) -> Poll<Option<usize>> {
        let limit = self.delegate_limit();
        let Some(cell) = self.tasks.get(&task) else {
            return Poll::Ready(None);
        };
        if cell.exchange != Exchange::ReceivingBody {
            return Poll::Ready(None);
        }
        if !self.to_delegate(cell) {
            return Poll::Ready(Some(usize::MAX));
        }
        let cell = self.tasks.get_mut(&task).expect("live task");
        match limit.saturating_sub(cell.undelivered) {
            0 => {
                if let Some(waker) = waker {
                    cell.room_waker = Some(waker.clone());
                }
                Poll::Pending
            }
            room => Poll::Ready(Some(usize::try_from(room).unwrap_or(usize::MAX))),
        }
    }

    pub(crate) fn body_end(&mut self, task: TaskId, reusable: bool) -> Release {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Release::Close;
        };
        if cell.exchange != Exchange::ReceivingBody {
            return Release::Close;
        }
        // R5: pooled only when read whole and kept alive by the server.
        let pooled_here = self.idle.iter().filter(|(o, _)| *o == cell.origin).count();
        let room = pooled_here < self.config.max_idle_per_origin;
        match (reusable && room, cell.conn.take()) {
            (true, Some(conn)) => {
                self.idle.push((cell.origin.clone(), conn));
                self.complete(task, Ok(()), EndedBy::Io);
                Release::Pool
            }
            (_, None) => {
                // Answered without a connection (`connection_unused`): the IO is done, with
                // nothing to pool or close, so nothing is left to abort.
                self.complete(task, Ok(()), EndedBy::Io);
                Release::Close
            }
            (_, conn) => {
                // Closed with the task. The IO parked it and closes it on this answer, but the
                // driver's abort closes it first: a promise that waits for the driver (its
                // did_complete, the session's release) finds it closed (R5).
                cell.conn = conn;
                self.complete(task, Ok(()), EndedBy::Other);
                Release::Close
            }
        }
    }

    pub(crate) fn connection_unused(&mut self, task: TaskId, reused: bool) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != Exchange::AwaitingResponse || !is_http(cell.kind) {
            return;
        }
        let Some(conn) = cell.conn.take() else {
            return;
        };
        let origin = cell.origin.clone();
        if reused {
            self.idle.push((origin.clone(), conn));
        }
        self.admit(&origin);
    }

    pub(crate) fn failed(&mut self, task: TaskId, error: Error) {
        if self.tasks.contains_key(&task) {
            self.complete(task, Err(error), EndedBy::Io);
        }
    }

    pub(crate) fn timer_fired(&mut self, timer: TimerId) {
        let Some(cell) = self.tasks.get(&timer.task) else {
            return;
        };
        // A timer disarmed or re-armed after it fired is stale: ignore it.
        if cell.timers[timer.timeout as usize] == Some(timer.generation) {
            self.complete(
                timer.task,
                Err(Error::TimedOut(timer.timeout)),
                EndedBy::Other,
            );
        }
    }

    /// A handler-routed task's handler saw `timeout` run out on its own clock.
    pub(crate) fn handler_timed_out(&mut self, task: TaskId, timeout: Timeout) {
        let armed = self
            .tasks
            .get(&task)
            .and_then(|c| c.timers[timeout as usize]);
        if let Some(generation) = armed {
            self.timer_fired(TimerId {
                task,
                timeout,
                generation,
            });
        }
    }

    /// The driver closed an idle connection whose idle timeout passed (R9).
    pub(crate) fn idle_expired(&mut self, conn: ConnId) {
        if let Some(i) = self.idle.iter().position(|(_, c)| *c == conn) {
            let (origin, _) = self.idle.remove(i);
            self.admit(&origin);
        }
    }

    // ---- the delivery's acknowledgements ----

    /// The delegate's answer to did_receive_response.
    pub(crate) fn answer(&mut self, task: TaskId, disposition: Disposition) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != Exchange::AwaitingDisposition {
            return;
        }
        self.answered(task);
        let cell = self.tasks.get_mut(&task).expect("live task");
        match (disposition, cell.kind) {
            (Disposition::Allow, _) => self.read_body(task),
            (Disposition::BecomeDownload, TaskKind::Data) => {
                cell.kind = TaskKind::Download;
                self.say(Callback::BecomeDownload { task });
                self.read_body(task);
            }
            (Disposition::BecomeStream, TaskKind::Data) => self.become_stream(task),
            (Disposition::BecomeDownload | Disposition::BecomeStream, kind) => {
                let error = Error::InvalidDisposition { disposition, kind };
                self.complete(task, Err(error), EndedBy::Other);
            }
            (Disposition::Cancel, _) => self.complete(task, Err(Error::Cancelled), EndedBy::Other),
        }
    }

    /// The delegate's answer to `WillRedirect`; `None` is the default, to follow the request
    /// proposed. A refusal makes the redirect the response: `ReceiveResponse` with it.
    pub(crate) fn redirect_answer(&mut self, task: TaskId, answer: Option<Redirect>) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != Exchange::AwaitingRedirect {
            return;
        }
        self.answered(task);
        let cell = self.tasks.get_mut(&task).expect("live task");
        let Some(Redirecting::Asked { response, request }) = cell.redirect.take().map(|r| *r)
        else {
            return;
        };
        let answer = answer.unwrap_or(Redirect::Follow(request));
        match answer {
            Redirect::Follow(_) => cell.exchange = Exchange::FollowingRedirect,
            Redirect::Refuse => {
                cell.exchange = Exchange::AwaitingDisposition;
                self.say(Callback::ReceiveResponse { task, response });
            }
        }
        let cell = self.tasks.get_mut(&task).expect("live task");
        cell.redirect = Some(Box::new(Redirecting::Answered(answer)));
        self.wake_later.extend(cell.redirect_waker.take());
    }

    /// The delegate's callback returned without its answer, which comes later (the delivery
    /// goes on with the session's other callbacks). The task reads nothing meanwhile, as
    /// before any answer; its request timeout, the network's idle time, stops until the
    /// answer (R12); the resource timeout runs on. A no-op if the answer came first (it may
    /// come from another thread before the callback returns), or the task is over.
    pub(crate) fn defer(&mut self, task: TaskId, redirect: bool) {
        let asked = if redirect {
            Exchange::AwaitingRedirect
        } else {
            Exchange::AwaitingDisposition
        };
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != asked || cell.deferred {
            return;
        }
        cell.deferred = true;
        self.disarm(task, Timeout::Request);
    }

    /// There will be no answer (its responder was dropped): a task still waiting for one is
    /// cancelled; otherwise a no-op.
    pub(crate) fn unanswered(&mut self, task: TaskId) {
        let waiting = self.tasks.get(&task).is_some_and(|cell| {
            matches!(
                cell.exchange,
                Exchange::AwaitingDisposition | Exchange::AwaitingRedirect
            )
        });
        if waiting {
            self.complete(task, Err(Error::Cancelled), EndedBy::Other);
        }
    }

    /// An answer came: a deferred task's request timeout runs again, unless it is suspended.
    fn answered(&mut self, task: TaskId) {
        let cell = self.tasks.get_mut(&task).expect("live task");
        if std::mem::take(&mut cell.deferred) && cell.state == TaskState::Running {
            self.arm(task, Timeout::Request);
        }
    }

    /// did_receive_data returned with `len` bytes of the task's body: the delegate's window
    /// has that much more room, and an IO waiting for it reads on (R6).
    pub(crate) fn data_delivered(&mut self, task: TaskId, len: u64) {
        let was_behind = self.behind(task);
        let Some(cell) = self.tasks.get_mut(&task) else {
            return; // Completed: its window went with it.
        };
        cell.undelivered = cell.undelivered.saturating_sub(len);
        if was_behind && !self.behind(task) {
            let cell = self.tasks.get_mut(&task).expect("live task");
            self.wake_later.extend(cell.room_waker.take());
            // Reading resumes: the network's idle time counts again (R12), unless suspended.
            if cell.state == TaskState::Running {
                self.arm(task, Timeout::Request);
            }
        }
    }

    /// did_finish_downloading returned: the file is removed unless the delegate moved it. The
    /// task's did_complete, queued behind it with the task's other releases, now waits for the
    /// removal too (R5 holds when it is heard), and so does did_become_invalid (R4).
    pub(crate) fn file_handed_over(&mut self, task: TaskId) {
        if let Some(i) = self.handed_over.iter().position(|(t, _)| *t == task) {
            let (task, path) = self.handed_over.remove(i);
            self.actions
                .push_back(Action::RemoveTempFile { task, path });
            let removed = self.taken + self.actions.len() as u64;
            for (callback, barrier) in &mut self.callbacks {
                if matches!(*callback, Callback::Complete { task: t, .. } if t == task)
                    || matches!(callback, Callback::BecomeInvalid)
                {
                    *barrier = (*barrier).max(removed);
                }
            }
        }
    }

    /// R3: the delegate is dropped (after did_become_invalid, or with the delivery).
    pub(crate) fn delegate_released(&mut self) {
        self.delegate_held = false;
        self.buffered = 0;
        // Nothing will be delivered any more: no IO waits for it.
        let behind: Vec<(TaskId, u64)> = self
            .tasks
            .iter()
            .filter(|(_, c)| c.undelivered > 0)
            .map(|(t, c)| (*t, c.undelivered))
            .collect();
        for (task, undelivered) in behind {
            self.data_delivered(task, undelivered);
        }
        for (callback, _) in std::mem::take(&mut self.callbacks) {
            // The stream's handle the delegate will never get.
            if let Callback::BecomeStream { task, .. } = callback {
                self.task_handle_dropped(task);
            }
        }
        for (task, path) in std::mem::take(&mut self.handed_over) {
            self.actions
                .push_back(Action::RemoveTempFile { task, path });
        }
    }

    // ---- transitions ----

    /// The delegate allowed the body: tell the driver.
    fn read_body(&mut self, task: TaskId) {
        let into = self.receive_body(task);
        self.actions.push_back(Action::ReadBody { task, into });
    }

    /// The body may be read; a download's goes into the returned file.
    fn receive_body(&mut self, task: TaskId) -> Option<PathBuf> {
        let cell = self.tasks.get_mut(&task).expect("live task");
        cell.exchange = Exchange::ReceivingBody;
        let into = (cell.kind == TaskKind::Download).then(|| {
            self.config
                .download_dir
                .join(format!("{}-{}.download", self.config.name, task.0))
        });
        cell.temp_file.clone_from(&into);
        into
    }

    fn arm(&mut self, task: TaskId, timeout: Timeout) {
        let cell = self.tasks.get_mut(&task).expect("live task");
        self.next_timer += 1;
        cell.timers[timeout as usize] = Some(self.next_timer);
        let after = match timeout {
            Timeout::Request => self.config.request_timeout,
            Timeout::Resource => self.config.resource_timeout,
            Timeout::Close => self.config.close_timeout,
        };
        let timer = TimerId {
            task,
            timeout,
            generation: self.next_timer,
        };
        // A handler keeps its task's clock itself (see `Route::Handler`): the driver is not
        // woken for it on every byte.
        if cell.route == Route::Delegate {
            self.actions.push_back(Action::ArmTimer { timer, after });
        }
    }

    /// Stop one timer, if armed.
    fn disarm(&mut self, task: TaskId, timeout: Timeout) {
        let cell = self.tasks.get_mut(&task).expect("live task");
        if let Some(generation) = cell.timers[timeout as usize].take()
            && cell.route == Route::Delegate
        {
            let timer = TimerId {
                task,
                timeout,
                generation,
            };
            self.actions.push_back(Action::DisarmTimer { timer });
        }
    }

    /// Whether the task's body goes to the delegate as `ReceiveData` callbacks, through its
    /// window (R6).
    fn to_delegate(&self, cell: &Cell) -> bool {
        cell.kind != TaskKind::Download
            && cell.route == Route::Delegate
            && self.config.kind == SessionKind::Delegated
            && self.delegate_held
    }

    /// The delegate's window, at least one byte.
    fn delegate_limit(&self) -> u64 {
        self.config.delegate_ahead.max(1) as u64
    }

    /// The task's delegate is a window behind: its IO waits (R6).
    fn behind(&self, task: TaskId) -> bool {
        self.tasks
            .get(&task)
            .is_some_and(|c| c.undelivered >= self.delegate_limit())
    }

    /// Restart an armed timer (the request timeout restarts with every byte).
    fn rearm(&mut self, task: TaskId, timeout: Timeout) {
        if self.tasks[&task].timers[timeout as usize].is_some() {
            self.arm(task, timeout);
        }
    }

    fn disarm_all(&mut self, task: TaskId) {
        for timeout in TIMEOUTS {
            self.disarm(task, timeout);
        }
    }

    /// The one way a task completes (R1): its cell goes, with everything it held (R5).
    fn complete(&mut self, task: TaskId, result: Result<(), Error>, ended_by: EndedBy) {
        self.disarm_all(task);
        let mut cell = self.tasks.remove(&task).expect("live task");
        self.wake_later.extend(cell.room_waker.take());
        self.wake_later.append(&mut cell.result_wakers);
        if cell.handles > 0 {
            let kept = Kept {
                handles: cell.handles,
                result: result.clone(),
            };
            self.results.insert(task, kept);
        }
        if result.is_err() && ended_by == EndedBy::Other && cell.undelivered > 0 {
            // R5: a task cancelled, timed out or invalidated drops the body its delegate was
            // not handed yet: its did_complete comes next (R1: nothing about it after). A
            // network failure is the network's own ending: the bytes read before it (at most
            // one window, R6) are delivered first, as they arrived.
            self.drop_undelivered(task);
        }
        if let Some(mut pipe) = cell.pipe.take() {
            // R5: what it held goes with it; whoever waits on it finds it completed.
            self.held -= pipe.held();
            self.wake_later.extend(pipe.wakers());
            if cell.handles > 0 {
                let end = End::new(result.clone(), pipe.close.take(), cell.kind);
                self.ends.insert(task, end);
            }
        }
        // A start handed to a handler (or to an IO between redirect hops) and not taken yet:
        // nobody opened its new connection, and a pooled one never left the pool's hands, so it
        // goes back to the idle list. A handler that never took its start has no IO to abort;
        // an IO between hops does, and holds no connection.
        let untaken = cell.start.is_some();
        if let Some(start) = cell.start
            && start.reused
        {
            self.idle.push((cell.origin.clone(), start.conn));
        }
        let started = cell.hops > 0
            || (!matches!(
                cell.exchange,
                Exchange::NotStarted | Exchange::AwaitingConnection
            ) && !untaken);
        if cell.exchange == Exchange::AwaitingConnection {
            self.waiting.retain(|t| *t != task);
        }
        self.wake_later.extend(cell.start_waker);
        self.wake_later.extend(cell.redirect_waker);
        // The IO that ended the task closes its own connection (or pooled it in body_end);
        // any other ending must abort the IO, which closes the connection it holds. A
        // delegate task that never started is aborted too: the driver drops the job it would
        // have started (a resumed task waiting for a slot holds its request and body there).
        if ended_by == EndedBy::Other && (started || cell.route == Route::Delegate) {
            self.actions.push_back(Action::Abort {
                task,
                conn: if untaken { None } else { cell.conn },
            });
        }
        let handler = cell.route == Route::Handler;
        if let Some(path) = cell.temp_file {
            if result.is_ok() && handler {
                // The handler owns the finished file now (its guard removes it).
            } else if result.is_ok() && self.config.kind == SessionKind::Delegated {
                self.say(Callback::FinishDownloading {
                    task,
                    location: path.clone(),
                });
                self.handed_over.push((task, path));
            } else {
                self.actions
                    .push_back(Action::RemoveTempFile { task, path });
            }
        }
        if cell.conn.is_some() || ended_by == EndedBy::Io {
            // Its connection is closed (or was pooled by body_end): someone may be waiting.
            self.admit(&cell.origin);
        }
        if handler {
            // Kept for the handler while it can still ask; nobody else will.
            if cell.handles > 0 {
                self.outcomes.insert(task, result);
            }
        } else if self.config.kind == SessionKind::Delegated {
            self.say(Callback::Complete { task, result });
        }
        if matches!(
            self.state,
            SessionState::Finishing | SessionState::Cancelling
        ) {
            self.invalidate_if_done();
        }
    }

    /// Take the task's queued `ReceiveData` callbacks out of the queue.
    fn drop_undelivered(&mut self, task: TaskId) {
        let mut dropped = 0;
        self.callbacks.retain(|(callback, _)| match callback {
            Callback::ReceiveData { task: t, data } if *t == task => {
                dropped += data.len() as u64;
                false
            }
            _ => true,
        });
        self.buffered -= dropped;
    }

    fn invalidate_if_done(&mut self) {
        if self.state == SessionState::Invalidated || !self.tasks.is_empty() {
            return;
        }
        self.state = SessionState::Invalidated;
        // R4: the pool closes with the session.
        for (_, conn) in std::mem::take(&mut self.idle) {
            self.actions.push_back(Action::Close { conn });
        }
        if self.config.kind == SessionKind::Delegated {
            // R2: after every did_complete already queued; R3 follows its delivery.
            self.say(Callback::BecomeInvalid);
        }
    }
}

/// Whether a task of `kind` is an HTTP exchange, whose connection comes from the pool and goes
/// back to it; a stream or a websocket has one of its own.
fn is_http(kind: TaskKind) -> bool {
    matches!(kind, TaskKind::Data | TaskKind::Download | TaskKind::Upload)
}
