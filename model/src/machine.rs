//! The state machine: sessions and tasks, and the transition each op makes.
//!
//! Every op is atomic here: a step runs until nothing more can happen without a new op, the
//! way a client settles after an event. The transient states an implementation passes through
//! inside one step (a task's `Canceling` while its IO is torn down, a session's `Finishing`
//! when its last task completes in the same step) are named in the enums but only stay visible
//! between ops when something outside must still answer.

use std::collections::{BTreeMap, VecDeque};

use crate::alphabet::{
    Callback, Disposition, Fault, Op, Outcome, Refusal, SessionId, SessionKind, TaskId, TaskKind,
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
    /// Cancelled, with teardown still under way. Data, download and upload tasks tear down
    /// within the step; a websocket's close handshake will keep a task here (R11).
    Canceling,
    Completed,
}

/// How far the HTTP exchange has gone, as the client has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exchange {
    /// Never resumed: no connection, no request.
    NotStarted,
    /// The request is sent on a connection; the response head is awaited.
    AwaitingResponse,
    /// The delegate allowed the response; the body is being read.
    ReceivingBody,
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
    /// The head is sent; body bytes may follow.
    SendingBody,
    /// The server has ended or broken the exchange.
    Done,
}

/// What the server did that the client has not read yet, because the task was suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unread {
    Headers(Disposition),
    Bytes(u32),
    End { reusable: bool },
    Fault(Fault),
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
}

/// A task of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Task {
    pub session: SessionId,
    /// The kind now: a data task that became a download is a download task.
    pub kind: TaskKind,
    pub state: TaskState,
    /// The user still holds a handle.
    pub handle: bool,
    pub exchange: Exchange,
    pub server: ServerPhase,
    /// The task holds a connection (from resume until completion).
    pub connection: bool,
    /// The task holds a temp file (download tasks, from the allowed response to completion).
    pub temp_file: bool,
    unread: VecDeque<Unread>,
}

impl Task {
    /// Whether the task is still alive for its session (not `Completed`).
    pub fn is_live(&self) -> bool {
        self.state != TaskState::Completed
    }

    /// Whether the task's two timers are armed: it is running and waiting on the network (R7,
    /// R12).
    pub fn timers_armed(&self) -> bool {
        self.state == TaskState::Running
            && matches!(
                self.exchange,
                Exchange::AwaitingResponse | Exchange::ReceivingBody
            )
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
    pub callbacks: Vec<Callback>,
}

/// The whole specification state: every session and task a sequence has created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Model {
    sessions: BTreeMap<SessionId, Session>,
    tasks: BTreeMap<TaskId, Task>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
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
            // Between ops every read byte has been delivered or written out; stream tasks'
            // read-ahead windows will add to this.
            buffered_bytes: 0,
            live_tasks: count(Task::is_live),
            timers: 2 * count(Task::timers_armed),
            temp_files: count(|t| t.temp_file),
            delegate_held: session.kind == SessionKind::Delegated
                && session.state != SessionState::Invalidated,
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
            Op::CreateSession { session, kind } => {
                !self.sessions.contains_key(session)
                    && (*kind != SessionKind::Shared
                        || self
                            .sessions
                            .values()
                            .all(|s| s.kind != SessionKind::Shared))
            }
            Op::FinishTasksAndInvalidate(s) | Op::InvalidateAndCancel(s) | Op::DropSession(s) => {
                user_session(s)
            }
            Op::CreateTask { session, task, .. } => {
                user_session(session) && !self.tasks.contains_key(task)
            }
            Op::Resume(t) | Op::Suspend(t) | Op::Cancel(t) | Op::DropTask(t) => user_task(t),
            Op::ServerHeaders { task: t, .. } => {
                task(t).is_some_and(|t| t.server == ServerPhase::RequestReceived)
            }
            Op::ServerSends { task: t, bytes } => {
                *bytes > 0 && task(t).is_some_and(|t| t.server == ServerPhase::SendingBody)
            }
            Op::ServerEnds { task: t, .. } => {
                task(t).is_some_and(|t| t.server == ServerPhase::SendingBody)
            }
            Op::ServerFails { task: t, .. } => task(t).is_some_and(|t| {
                matches!(
                    t.server,
                    ServerPhase::RequestReceived | ServerPhase::SendingBody
                )
            }),
            Op::TimePasses { task: t, .. } => task(t).is_some_and(Task::timers_armed),
            Op::IdleTimeoutPasses(s) => self.sessions.contains_key(s),
        }
    }

    /// Apply `op`, which must be [`allowed`](Self::allows), and say what it did.
    ///
    /// # Panics
    /// If `op` is not allowed: a generator bug, not a lifecycle outcome.
    pub fn apply(&mut self, op: &Op) -> Step {
        assert!(self.allows(op), "op not allowed in this state: {op:?}");
        let mut out = Step::default();
        match *op {
            Op::CreateSession { session, kind } => {
                self.sessions.insert(
                    session,
                    Session {
                        kind,
                        state: SessionState::Active,
                        handle: true,
                        idle_connections: 0,
                        tasks: Vec::new(),
                    },
                );
            }
            Op::FinishTasksAndInvalidate(s) => self.finish_tasks_and_invalidate(s, &mut out),
            Op::InvalidateAndCancel(s) => self.invalidate_and_cancel(s, &mut out),
            Op::DropSession(s) => {
                self.session_mut(s).handle = false;
                // R10: dropping the last handle is finish_tasks_and_invalidate. Suspended tasks
                // without a handle were cancelled when their handle went.
                self.finish_tasks_and_invalidate(s, &mut out);
            }
            Op::CreateTask {
                session,
                task,
                kind,
            } => {
                // R8: refused, and nothing is allocated.
                if self.sessions[&session].state != SessionState::Active {
                    out.refused = Some(Refusal::SessionInvalidated);
                } else {
                    self.session_mut(session).tasks.push(task);
                    self.tasks.insert(
                        task,
                        Task {
                            session,
                            kind,
                            state: TaskState::Suspended,
                            handle: true,
                            exchange: Exchange::NotStarted,
                            server: ServerPhase::NoRequest,
                            connection: false,
                            temp_file: false,
                            unread: VecDeque::new(),
                        },
                    );
                }
            }
            Op::Resume(t) => self.resume(t, &mut out),
            Op::Suspend(t) => {
                let task = self.task_mut(t);
                if task.state == TaskState::Running {
                    task.state = TaskState::Suspended;
                }
            }
            Op::Cancel(t) => {
                if self.tasks[&t].is_live() {
                    self.complete(t, Outcome::Cancelled, &mut out);
                }
            }
            Op::DropTask(t) => {
                let task = self.task_mut(t);
                task.handle = false;
                if task.state == TaskState::Suspended {
                    // Nothing can resume it any more (R10).
                    self.complete(t, Outcome::Cancelled, &mut out);
                }
            }
            Op::ServerHeaders { task, answer } => {
                self.task_mut(task).server = ServerPhase::SendingBody;
                self.network(task, Unread::Headers(answer), &mut out);
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
            Op::IdleTimeoutPasses(s) => self.session_mut(s).idle_connections = 0,
        }
        out
    }

    fn session_mut(&mut self, id: SessionId) -> &mut Session {
        self.sessions.get_mut(&id).expect("session exists")
    }

    fn task_mut(&mut self, id: TaskId) -> &mut Task {
        self.tasks.get_mut(&id).expect("task exists")
    }

    fn delegated(&self, task: TaskId) -> bool {
        self.sessions[&self.tasks[&task].session].kind == SessionKind::Delegated
    }

    fn say(&self, task: TaskId, callback: Callback, out: &mut Step) {
        if self.delegated(task) {
            out.callbacks.push(callback);
        }
    }

    fn resume(&mut self, t: TaskId, out: &mut Step) {
        if self.tasks[&t].state != TaskState::Suspended {
            return; // Running: resumes do not nest. Completed: no-op.
        }
        let session = self.tasks[&t].session;
        let task = self.task_mut(t);
        task.state = TaskState::Running;
        if task.exchange == Exchange::NotStarted {
            task.exchange = Exchange::AwaitingResponse;
            task.server = ServerPhase::RequestReceived;
            task.connection = true;
            // A kept-alive connection is reused before a new one is opened.
            let pool = &mut self.session_mut(session).idle_connections;
            *pool = pool.saturating_sub(1);
        }
        // R7: what the server sent while the task was suspended is read now, in order.
        while self.tasks[&t].state == TaskState::Running {
            let Some(unread) = self.task_mut(t).unread.pop_front() else {
                break;
            };
            self.read(t, unread, out);
        }
    }

    /// The server did something: a running task reads it now, a suspended one later (R7), a
    /// completed one never.
    fn network(&mut self, t: TaskId, event: Unread, out: &mut Step) {
        match self.tasks[&t].state {
            TaskState::Running => self.read(t, event, out),
            TaskState::Suspended => self.task_mut(t).unread.push_back(event),
            TaskState::Canceling | TaskState::Completed => {}
        }
    }

    fn read(&mut self, t: TaskId, event: Unread, out: &mut Step) {
        match event {
            Unread::Headers(answer) => {
                self.say(t, Callback::ReceiveResponse { task: t }, out);
                // A session without a delegate allows every response.
                let answer = if self.delegated(t) {
                    answer
                } else {
                    Disposition::Allow
                };
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
                    (Disposition::BecomeDownload, _) => {
                        self.complete(t, Outcome::InvalidDisposition, out);
                    }
                    (Disposition::Cancel, _) => self.complete(t, Outcome::Cancelled, out),
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
            Unread::Fault(Fault::Reset) => self.complete(t, Outcome::Reset, out),
            Unread::Fault(Fault::Malformed) => self.complete(t, Outcome::Malformed, out),
        }
    }

    fn complete_success(&mut self, t: TaskId, reusable: bool, out: &mut Step) {
        if self.tasks[&t].kind == TaskKind::Download {
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
        task.state = TaskState::Completed;
        task.exchange = Exchange::Done;
        task.connection = false; // closed, unless complete_success pooled it first
        task.temp_file = false;
        task.unread.clear();
        let session = task.session;
        self.say(t, Callback::Complete { task: t, outcome }, out);
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

    fn invalidate_if_done(&mut self, s: SessionId, out: &mut Step) {
        let session = &self.sessions[&s];
        if session.state == SessionState::Invalidated
            || session.tasks.iter().any(|t| self.tasks[t].is_live())
        {
            return;
        }
        let session = self.session_mut(s);
        session.state = SessionState::Invalidated;
        // R4: the pool closes with the session.
        session.idle_connections = 0;
        if session.kind == SessionKind::Delegated {
            out.callbacks.push(Callback::BecomeInvalid { session: s });
        }
        // R3: the delegate is released right after this callback returns; see
        // `Model::resources`, which stops counting it here.
    }
}
