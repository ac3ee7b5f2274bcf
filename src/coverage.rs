//! Coverage of the model's transitions: which (state class, op kind) pairs the suite has
//! driven a system through, against the universe of pairs the model allows in some reachable
//! state.
//!
//! A [`Class`] abstracts the model around an op to what decides the op's transition; an
//! [`OpKind`] is the op without its ids and byte counts. [`record`] counts every pair applied
//! to a system, process-wide, so a test that reads [`snapshot`] must be alone in its binary.
//! [`covering`] finds one shortest path to every pair of the [`universe`]: replayed against a
//! system, a few thousand paths apply every transition of the model.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

use leakproof_model::{
    CACHE_ENTRIES, CloseFrame, Disposition, Exchange, Fault, Model, Op, Redirect, Route,
    ServerPhase, SessionKind, SessionState, Task, TaskKind, TaskState, Timer,
};

use crate::explore::{Alphabet, Exploration, explore_where, search};

/// The model-only searches whose pairs are the universe, each as deep as the classes it is
/// there for need:
///
/// - [`Alphabet::every_kind`] with one task and no connection limit, to depth 11. A class
///   describes one session and at most one of its tasks, so one task reaches all but a few.
/// - [`Alphabet::every_kind`] (one connection per host), two tasks, to depth 5: `CreateTask`
///   beside a live task, and a second HTTP task waiting for the host's one slot.
/// - The same with a delegated session only, to depth 8: ops on a completed task of a session
///   that another, live task keeps finishing ([`Class::Completed`] does not tell session kinds
///   apart).
/// - Data tasks only, every kind of session, to depth 7: a task waiting for its host's slot
///   while its session finishes, and its timers firing then.
/// - Conveniences only ([`Op::Await`]), to depth 7: each op on a future, waiting for the
///   host's slot or not, in each session state.
/// - Download and upload tasks beside a data convenience, to depth 6: a task object waiting
///   behind a future, which takes one op less to reach than behind another task object.
/// - A delegated session whose delegate may be slow, to depth 7: each op while the delegate is
///   in a callback, or while callbacks (a response's answer among them) wait behind it; and
///   one HTTP task with it, to depth 9: a response's answer waiting while the server ends,
///   the task is suspended and its session finishes.
///
/// - Fetches of cacheable resources and resets ([`Alphabet::fetches`]), four tasks, to depth
///   6: hits, misses and evictions, in each session state.
/// - Redirects ([`Alphabet::redirects`]), one task of each HTTP kind or one convenience, every
///   kind of session, to one past the limit; answered later or behind a slow delegate, one
///   task of each HTTP kind; and two data tasks, where a responder outlives its task in a
///   session the other keeps finishing.
///
/// Together, measured on 2026-12-02: 3634 pairs, in about 30 s of a debug build
/// (`tests/coverage.rs` checks that the suite applies every one, and none beyond them).
pub fn universe_scopes() -> Vec<(Alphabet, usize)> {
    let every = Alphabet::every_kind();
    vec![
        (
            Alphabet {
                tasks: 1,
                // One task never waits for a slot.
                per_host: vec![None],
                ..every.clone()
            },
            11,
        ),
        (every.clone(), 5),
        (
            Alphabet {
                session_kinds: vec![SessionKind::Delegated],
                ..every.clone()
            },
            8,
        ),
        // A data task waiting for its host's one slot while its session finishes, of every
        // kind of session: two tasks resumed, then the session and the clock, seven ops in.
        (
            Alphabet {
                task_kinds: vec![TaskKind::Data],
                ..every.clone()
            },
            7,
        ),
        // Conveniences, of every kind of session: the second waits for the first's slot, and
        // each op on a future in each state its exchange and its session can be in.
        (
            Alphabet {
                task_kinds: Vec::new(),
                conveniences: vec![TaskKind::Data, TaskKind::Download, TaskKind::Upload],
                ..every.clone()
            },
            7,
        ),
        // A task object of each HTTP kind waiting behind a convenience: four ops in, where
        // behind another task object it is five.
        (
            Alphabet {
                task_kinds: vec![TaskKind::Download, TaskKind::Upload],
                conveniences: vec![TaskKind::Data],
                ..every.clone()
            },
            6,
        ),
        // A slow delegate: each op while it is in a callback, or queued behind one.
        (
            Alphabet {
                session_kinds: vec![SessionKind::Delegated],
                pace: true,
                ..every.clone()
            },
            PACE_DEPTH,
        ),
        // One HTTP task, deeper: a task whose answer waits behind the delegate while its
        // server ends, it is suspended and its session finishes.
        (
            Alphabet {
                session_kinds: vec![SessionKind::Delegated],
                task_kinds: vec![TaskKind::Data, TaskKind::Download, TaskKind::Upload],
                tasks: 1,
                pace: true,
                ..every.clone()
            },
            PACE_DEPTH + 2,
        ),
        // Fetches of cacheable resources and resets, of every kind of session: a hit, a miss,
        // a miss that evicts, with a pooled connection or a new one, or waiting for the
        // host's one slot.
        (
            Alphabet {
                task_kinds: vec![TaskKind::Data],
                fetches: true,
                tasks: 4,
                ..every.clone()
            },
            FETCH_DEPTH,
        ),
        // Redirects, of every kind of session and of task, a convenience's too, to one past
        // the limit.
        (
            Alphabet {
                task_kinds: vec![TaskKind::Data, TaskKind::Download, TaskKind::Upload],
                conveniences: vec![TaskKind::Data, TaskKind::Download, TaskKind::Upload],
                tasks: 1,
                redirects: true,
                ..every.clone()
            },
            REDIRECT_DEPTH,
        ),
        // A redirect to a completed task of each HTTP kind, in a session another task keeps
        // finishing: a no-op.
        (
            Alphabet {
                task_kinds: vec![TaskKind::Download, TaskKind::Upload],
                redirects: true,
                ..every.clone()
            },
            7,
        ),
        // Redirects answered later, or behind a slow delegate: each op while the answer is
        // awaited, or given while the task was suspended.
        (
            Alphabet {
                session_kinds: vec![SessionKind::Delegated],
                task_kinds: vec![TaskKind::Data, TaskKind::Download, TaskKind::Upload],
                tasks: 1,
                redirects: true,
                pace: true,
                ..every.clone()
            },
            PACE_DEPTH + 2,
        ),
        // A responder that outlives its task, in a session another task keeps finishing.
        (
            Alphabet {
                session_kinds: vec![SessionKind::Delegated],
                task_kinds: vec![TaskKind::Data],
                redirects: true,
                pace: true,
                ..every
            },
            PACE_DEPTH + 2,
        ),
    ]
}

/// How deep the fetches' scope goes: three fetches fill the cache, a fourth evicts.
const FETCH_DEPTH: usize = 6;

/// How deep the redirects' scope goes: a task resumed, then redirected one past the limit.
const REDIRECT_DEPTH: usize = 8;

/// How deep the slow delegate's scope goes.
const PACE_DEPTH: usize = 7;

/// The model around an op: what decides the op's transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Before `CreateSession`: the session does not exist yet.
    NoSession,
    /// A session op, or `CreateTask` (whose task does not exist yet, and whose fate is the
    /// session's: created, or refused (R8)).
    Session {
        state: SessionState,
        kind: SessionKind,
        live_tasks: bool,
    },
    /// An op on a live task, by the user or the environment, and the task's session.
    Task {
        kind: TaskKind,
        /// A task object, or a convenience's future.
        route: Route,
        state: TaskState,
        exchange: Exchange,
        server: ServerPhase,
        session: SessionState,
        session_kind: SessionKind,
        held: Held,
    },
    /// An op on a completed task: a no-op, or refused (`Closed`), whatever the op and
    /// whatever the task held or the server could still send (R1). What is left to tell apart
    /// is the task's kind and its session's state: the op must stay a no-op in an invalidated
    /// session too.
    Completed {
        kind: TaskKind,
        session: SessionState,
    },
}

/// What a stream or a websocket holds, as far as it decides the op's transition: what a read
/// or a receive returns, whether what the server sends is read (R6, R11), and what a completion
/// releases (R5). Each op sees only the facts it depends on, so the classes do not multiply by
/// facts that change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Held {
    /// Nothing that decides the op: a data, download or upload task (what it reads goes on to
    /// the delegate or the file at once), or an op that looks at nothing a task holds
    /// (`suspend`, a timeout).
    Nothing,
    /// A stream's facts; `None` where the op does not depend on one.
    Stream {
        window: Option<Window>,
        /// The peer's end has been read: once the window is empty, `read` sees it.
        peer_ended: Option<bool>,
        read_closed: Option<bool>,
        write_closed: Option<bool>,
    },
    /// A websocket: whether a message waits for `receive` (and holds back the next).
    WebSocket { message: bool },
}

/// How full a stream's read-ahead window is (R6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Empty,
    Partial,
    Full,
}

impl Held {
    /// What `task` holds, as far as `op` depends on it, in a model whose stream window is
    /// `read_ahead` bytes.
    pub fn of(task: &Task, op: &Op, read_ahead: u64) -> Self {
        match task.kind {
            TaskKind::Data | TaskKind::Download | TaskKind::Upload => Held::Nothing,
            _ if matches!(op, Op::Suspend(_) | Op::TimePasses { .. }) => Held::Nothing,
            TaskKind::Stream => {
                // window: what is taken or released, and whether the socket is read (R6);
                // peer_ended: whether a read sees the end; read_closed: whether the socket is
                // read at all; write_closed: whether a write is refused, and whether closing
                // the read half completes the stream.
                let (window, peer_ended, read_closed, write_closed) = match op {
                    Op::Read(_) => (true, true, true, true),
                    Op::Write(_) => (false, false, false, true),
                    Op::CloseRead(_) => (true, false, false, true),
                    Op::CloseWrite(_) => (false, false, true, false),
                    Op::Cancel(_) | Op::DropTask(_) => (true, false, false, false),
                    // Resume, and what the server sends: read now, or left in the network.
                    _ => (true, false, true, false),
                };
                let full = match task.buffered {
                    0 => Window::Empty,
                    n if n >= read_ahead => Window::Full,
                    _ => Window::Partial,
                };
                Held::Stream {
                    window: window.then_some(full),
                    peer_ended: peer_ended.then_some(task.peer_ended),
                    read_closed: read_closed.then_some(task.read_closed),
                    write_closed: write_closed.then_some(task.write_closed),
                }
            }
            TaskKind::WebSocket => Held::WebSocket {
                message: task.inbox.is_some(),
            },
        }
    }

    /// The sort key: the facts in order, an absent one first.
    fn key(&self) -> [u8; 5] {
        let fact = |fact: Option<bool>| fact.map_or(0, |on| 1 + u8::from(on));
        match *self {
            Held::Nothing => [0; 5],
            Held::Stream {
                window,
                peer_ended,
                read_closed,
                write_closed,
            } => [
                1,
                window.map_or(0, |w| 1 + w as u8),
                fact(peer_ended),
                fact(read_closed),
                fact(write_closed),
            ],
            Held::WebSocket { message } => [2, message.into(), 0, 0, 0],
        }
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Held::Nothing => Ok(()),
            Held::Stream {
                window,
                peer_ended,
                read_closed,
                write_closed,
            } => {
                if let Some(window) = window {
                    write!(f, ", window {}", name(window).to_lowercase())?;
                }
                for (fact, yes, no) in [
                    (peer_ended, "peer ended", "peer not ended"),
                    (read_closed, "read closed", "read open"),
                    (write_closed, "write closed", "write open"),
                ] {
                    if let Some(on) = fact {
                        write!(f, ", {}", if on { yes } else { no })?;
                    }
                }
                Ok(())
            }
            Held::WebSocket { message } => {
                f.write_str(if message { ", message" } else { ", no message" })
            }
        }
    }
}

/// An op without its ids and byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    CreateSession(SessionKind),
    FinishTasksAndInvalidate,
    InvalidateAndCancel,
    DropSession,
    CreateTask(TaskKind),
    Await(TaskKind),
    /// A fetch of a cacheable resource: whether the cache holds it, and whether it is full
    /// (a miss then evicts). [`OpKind::of`] says `Fetch(false, false)`; [`Pair::of`] looks.
    Fetch {
        hit: bool,
        full: bool,
    },
    Reset,
    Resume,
    Suspend,
    Cancel,
    DropTask,
    Read,
    Write,
    CloseRead,
    CloseWrite,
    Receive,
    CloseWith,
    ServerHeaders(Disposition),
    ServerRedirects(Redirect),
    ServerSends,
    ServerEnds {
        reusable: bool,
    },
    ServerFails(Fault),
    ServerAnswersUpgrade {
        accept: bool,
    },
    PeerCloses(CloseFrame),
    TimePasses(Timer),
    IdleTimeoutPasses,
    DelegateBlocks,
    DelegateReturns,
    DelegateDefers,
    Answer,
    DropResponder,
}

/// A transition of the model, abstracted: an op kind in a state class. Ordered by op first,
/// so a table groups by op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pair {
    pub op: OpKind,
    pub class: Class,
}

impl Class {
    /// The class of `before` around `op`, which `before` allows.
    pub fn of(before: &Model, op: &Op) -> Self {
        let session_class = |id| {
            let session = before.session(id).expect("an allowed op's session exists");
            Class::Session {
                state: session.state,
                kind: session.kind,
                live_tasks: session
                    .tasks
                    .iter()
                    .any(|t| before.task(*t).is_some_and(|t| t.is_live())),
            }
        };
        match *op {
            // Recorded as its two ops (see `record`); alone, it is its first op's.
            Op::Par(ref first, _) => Class::of(before, first),
            Op::CreateSession { .. } => Class::NoSession,
            Op::CreateTask { session, .. }
            | Op::Await { session, .. }
            | Op::Fetch { session, .. }
            | Op::Reset(session)
            | Op::FinishTasksAndInvalidate(session)
            | Op::InvalidateAndCancel(session)
            | Op::DropSession(session)
            | Op::IdleTimeoutPasses(session)
            | Op::DelegateBlocks(session)
            | Op::DelegateReturns(session)
            | Op::DelegateDefers(session) => session_class(session),
            Op::Resume(task)
            | Op::Suspend(task)
            | Op::Cancel(task)
            | Op::DropTask(task)
            | Op::Read(task)
            | Op::Write(task)
            | Op::CloseRead(task)
            | Op::CloseWrite(task)
            | Op::Receive(task)
            | Op::CloseWith(task)
            | Op::Answer(task)
            | Op::DropResponder(task)
            | Op::ServerHeaders { task, .. }
            | Op::ServerRedirects { task, .. }
            | Op::ServerSends { task, .. }
            | Op::ServerEnds { task, .. }
            | Op::ServerFails { task, .. }
            | Op::ServerAnswersUpgrade { task, .. }
            | Op::PeerCloses { task, .. }
            | Op::TimePasses { task, .. } => {
                let task = before.task(task).expect("an allowed op's task exists");
                let session = before
                    .session(task.session)
                    .expect("a task's session exists");
                if !task.is_live() {
                    return Class::Completed {
                        kind: task.kind,
                        session: session.state,
                    };
                }
                Class::Task {
                    kind: task.kind,
                    route: task.route,
                    state: task.state,
                    exchange: task.exchange,
                    server: task.server,
                    session: session.state,
                    session_kind: session.kind,
                    held: Held::of(task, op, before.read_ahead()),
                }
            }
        }
    }

    /// The sort key: the model's enums are not `Ord`, and their declaration order is the
    /// order of the lifecycle, which is how a table should read.
    fn key(&self) -> ([u8; 8], [u8; 5]) {
        match *self {
            Class::NoSession => ([0; 8], [0; 5]),
            Class::Session {
                state,
                kind,
                live_tasks,
            } => (
                [1, kind as u8, state as u8, live_tasks.into(), 0, 0, 0, 0],
                [0; 5],
            ),
            Class::Task {
                kind,
                route,
                state,
                exchange,
                server,
                session,
                session_kind,
                held,
            } => (
                [
                    2,
                    session_kind as u8,
                    session as u8,
                    kind as u8,
                    route as u8,
                    state as u8,
                    exchange as u8,
                    server as u8,
                ],
                held.key(),
            ),
            Class::Completed { kind, session } => {
                ([3, session as u8, kind as u8, 0, 0, 0, 0, 0], [0; 5])
            }
        }
    }
}

impl OpKind {
    /// The kind of `op`.
    pub fn of(op: &Op) -> Self {
        match *op {
            Op::Par(ref first, _) => OpKind::of(first),
            Op::CreateSession { kind, .. } => OpKind::CreateSession(kind),
            Op::FinishTasksAndInvalidate(_) => OpKind::FinishTasksAndInvalidate,
            Op::InvalidateAndCancel(_) => OpKind::InvalidateAndCancel,
            Op::DropSession(_) => OpKind::DropSession,
            Op::CreateTask { kind, .. } => OpKind::CreateTask(kind),
            Op::Await { kind, .. } => OpKind::Await(kind),
            Op::Fetch { .. } => OpKind::Fetch {
                hit: false,
                full: false,
            },
            Op::Reset(_) => OpKind::Reset,
            Op::Resume(_) => OpKind::Resume,
            Op::Suspend(_) => OpKind::Suspend,
            Op::Cancel(_) => OpKind::Cancel,
            Op::DropTask(_) => OpKind::DropTask,
            Op::Read(_) => OpKind::Read,
            Op::Write(_) => OpKind::Write,
            Op::CloseRead(_) => OpKind::CloseRead,
            Op::CloseWrite(_) => OpKind::CloseWrite,
            Op::Receive(_) => OpKind::Receive,
            Op::CloseWith(_) => OpKind::CloseWith,
            Op::ServerHeaders { answer, .. } => OpKind::ServerHeaders(answer),
            Op::ServerRedirects { answer, .. } => OpKind::ServerRedirects(answer),
            Op::ServerSends { .. } => OpKind::ServerSends,
            Op::ServerEnds { reusable, .. } => OpKind::ServerEnds { reusable },
            Op::ServerFails { fault, .. } => OpKind::ServerFails(fault),
            Op::ServerAnswersUpgrade { accept, .. } => OpKind::ServerAnswersUpgrade { accept },
            Op::PeerCloses { frame, .. } => OpKind::PeerCloses(frame),
            Op::TimePasses { timer, .. } => OpKind::TimePasses(timer),
            Op::IdleTimeoutPasses(_) => OpKind::IdleTimeoutPasses,
            Op::DelegateBlocks(_) => OpKind::DelegateBlocks,
            Op::DelegateReturns(_) => OpKind::DelegateReturns,
            Op::DelegateDefers(_) => OpKind::DelegateDefers,
            Op::Answer(_) => OpKind::Answer,
            Op::DropResponder(_) => OpKind::DropResponder,
        }
    }

    /// The sort key: the order of [`Op`]'s variants, then the parameter's.
    fn key(&self) -> (u8, u8) {
        match *self {
            OpKind::CreateSession(kind) => (0, kind as u8),
            OpKind::FinishTasksAndInvalidate => (1, 0),
            OpKind::InvalidateAndCancel => (2, 0),
            OpKind::DropSession => (3, 0),
            OpKind::CreateTask(kind) => (4, kind as u8),
            OpKind::Await(kind) => (4, 8 + kind as u8),
            OpKind::Fetch { hit, full } => (4, 16 + 2 * u8::from(hit) + u8::from(full)),
            OpKind::Reset => (3, 1),
            OpKind::Resume => (5, 0),
            OpKind::Suspend => (6, 0),
            OpKind::Cancel => (7, 0),
            OpKind::DropTask => (8, 0),
            OpKind::Read => (9, 0),
            OpKind::Write => (10, 0),
            OpKind::CloseRead => (11, 0),
            OpKind::CloseWrite => (12, 0),
            OpKind::Receive => (13, 0),
            OpKind::CloseWith => (14, 0),
            OpKind::ServerHeaders(answer) => (15, answer as u8),
            OpKind::ServerRedirects(answer) => (15, 8 + answer as u8),
            OpKind::ServerSends => (16, 0),
            OpKind::ServerEnds { reusable } => (17, reusable.into()),
            OpKind::ServerFails(fault) => (18, fault as u8),
            OpKind::ServerAnswersUpgrade { accept } => (19, accept.into()),
            OpKind::PeerCloses(frame) => (20, frame as u8),
            OpKind::TimePasses(timer) => (21, timer as u8),
            OpKind::IdleTimeoutPasses => (22, 0),
            OpKind::DelegateBlocks => (23, 0),
            OpKind::DelegateReturns => (24, 0),
            OpKind::DelegateDefers => (25, 0),
            OpKind::Answer => (26, 0),
            OpKind::DropResponder => (27, 0),
        }
    }
}

impl Pair {
    /// The pair of `op` applied at `before`.
    pub fn of(before: &Model, op: &Op) -> Self {
        let op_kind = match *op {
            Op::Fetch {
                session, resource, ..
            } => {
                // Refused unless the session is active (R8), whatever its cache holds.
                let cache = before
                    .session(session)
                    .filter(|s| s.state == SessionState::Active)
                    .map(|s| &s.cache);
                OpKind::Fetch {
                    hit: cache.is_some_and(|c| c.contains(&resource)),
                    full: cache.is_some_and(|c| c.len() >= CACHE_ENTRIES),
                }
            }
            _ => OpKind::of(op),
        };
        Pair {
            op: op_kind,
            class: Class::of(before, op),
        }
    }
}

impl Ord for Class {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Class {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OpKind {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for OpKind {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The model's enums by their `Debug` name, which is a `Display` that pads.
fn name(value: impl fmt::Debug) -> String {
    format!("{value:?}")
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Class::NoSession => write!(f, "no session yet"),
            Class::Session {
                state,
                kind,
                live_tasks,
            } => write!(
                f,
                "session {:<9} {:<11} {}",
                name(kind),
                name(state),
                if live_tasks {
                    "live tasks"
                } else {
                    "no live task"
                }
            ),
            Class::Task {
                kind,
                route,
                state,
                exchange,
                server,
                session,
                session_kind,
                held,
            } => write!(
                f,
                "session {:<9} {:<11} task {:<9} {:<9} {:<16} server {}{held}",
                name(session_kind),
                name(session),
                match route {
                    Route::Handle => name(kind),
                    Route::Future => format!("{kind:?}()"),
                },
                name(state),
                name(exchange),
                name(server)
            ),
            Class::Completed { kind, session } => write!(
                f,
                "session {:<21} task {:<9} Completed",
                name(session),
                name(kind)
            ),
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OpKind::CreateSession(kind) => write!(f, "CreateSession({kind:?})"),
            OpKind::CreateTask(kind) => write!(f, "CreateTask({kind:?})"),
            OpKind::Await(kind) => write!(f, "Await({kind:?})"),
            OpKind::Fetch { hit, full } => write!(
                f,
                "Fetch({}{})",
                if hit { "hit" } else { "miss" },
                if full { ", cache full" } else { "" }
            ),
            OpKind::ServerHeaders(answer) => write!(f, "ServerHeaders({answer:?})"),
            OpKind::ServerRedirects(answer) => write!(f, "ServerRedirects({answer:?})"),
            OpKind::ServerEnds { reusable: true } => write!(f, "ServerEnds(reusable)"),
            OpKind::ServerEnds { reusable: false } => write!(f, "ServerEnds(not reusable)"),
            OpKind::ServerFails(fault) => write!(f, "ServerFails({fault:?})"),
            OpKind::ServerAnswersUpgrade { accept: true } => {
                write!(f, "ServerAnswersUpgrade(accept)")
            }
            OpKind::ServerAnswersUpgrade { accept: false } => {
                write!(f, "ServerAnswersUpgrade(refuse)")
            }
            OpKind::TimePasses(timer) => write!(f, "TimePasses({timer:?})"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.op, self.class)
    }
}

/// Every pair the model allows in some reachable state: the pairs of the searches of
/// [`universe_scopes`], which are every transition of the model (see there).
///
/// # Panics
/// If the model breaks its own rules on the way: a bug in the spec, printed with its path.
pub fn universe() -> BTreeSet<Pair> {
    universe_of(&universe_scopes())
}

/// The pairs the model allows in some state reachable within `depth` ops of `alphabet`, for
/// each scope.
///
/// # Panics
/// If the model breaks its own rules on the way: a bug in the spec, printed with its path.
pub fn universe_of(scopes: &[(Alphabet, usize)]) -> BTreeSet<Pair> {
    let mut pairs = BTreeSet::new();
    for (alphabet, depth) in scopes {
        search(alphabet, *depth, |before, op| {
            pairs.insert(Pair::of(before, op));
        })
        .unwrap_or_else(|bug| panic!("{bug}"));
    }
    pairs
}

/// The searches of [`universe_scopes`], each keeping to replay only the first (so a shortest)
/// path to each pair no earlier one applies: replayed against a system, together they apply
/// every transition of the model, one path each ([`crate::explore::replay`]), a few thousand
/// paths where the searches take hundreds of thousands of transitions.
///
/// # Panics
/// If the model breaks its own rules on the way: a bug in the spec, printed with its path.
pub fn covering() -> Vec<Exploration> {
    let mut seen = BTreeSet::new();
    let explorations = universe_scopes()
        .iter()
        .map(|(alphabet, depth)| {
            explore_where(alphabet, *depth, |before, op| {
                seen.insert(Pair::of(before, op))
            })
            .unwrap_or_else(|bug| panic!("{bug}"))
        })
        .collect();
    // The same searches found the universe on the way: spare `snapshot` doing them again.
    let _ = UNIVERSE.set(seen);
    explorations
}

/// Pairs applied to systems so far in this process, with how often.
static COUNTS: Mutex<BTreeMap<Pair, u64>> = Mutex::new(BTreeMap::new());

/// Note that `op` was applied to a system when the model stood at `before`.
pub fn record(before: &Model, op: &Op) {
    if let Op::Par(first, second) = op {
        // Two ops at once apply the transitions of both, in either order: counted as written.
        record(before, first);
        let mut after = before.clone();
        after.apply(first);
        record(&after, second);
        return;
    }
    // A test that panicked elsewhere leaves the counts as valid as they were.
    let mut counts = COUNTS.lock().unwrap_or_else(PoisonError::into_inner);
    *counts.entry(Pair::of(before, op)).or_default() += 1;
}

/// Forget every pair recorded so far.
pub fn reset() {
    COUNTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// The [`universe`], once computed in this process.
static UNIVERSE: OnceLock<BTreeSet<Pair>> = OnceLock::new();

/// The pairs recorded so far, against the [`universe`] (computed once).
pub fn snapshot() -> Coverage {
    Coverage {
        counts: COUNTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        universe: UNIVERSE.get_or_init(universe).clone(),
    }
}

/// What the suite has covered of the model's transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// Each pair applied to a system, with how often.
    pub counts: BTreeMap<Pair, u64>,
    /// Every pair the model allows in some reachable state.
    pub universe: BTreeSet<Pair>,
}

impl Coverage {
    /// Pairs of the universe never applied.
    pub fn missed(&self) -> Vec<Pair> {
        self.universe
            .iter()
            .filter(|pair| !self.counts.contains_key(pair))
            .copied()
            .collect()
    }

    /// Pairs applied that the universe lacks: the universe's search was too shallow or its
    /// alphabet too narrow.
    pub fn beyond_universe(&self) -> Vec<Pair> {
        self.counts
            .keys()
            .filter(|pair| !self.universe.contains(pair))
            .copied()
            .collect()
    }

    /// How many pairs of the universe were applied.
    pub fn covered(&self) -> usize {
        self.universe.len() - self.missed().len()
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "transitions applied (count, state class), by op:")?;
        let mut last = None;
        for (pair, count) in &self.counts {
            if last != Some(pair.op) {
                writeln!(f, "{}", pair.op)?;
                last = Some(pair.op);
            }
            writeln!(f, "  {count:>8}  {}", pair.class)?;
        }
        let missed = self.missed();
        writeln!(f, "never reached ({}):", missed.len())?;
        for pair in &missed {
            writeln!(f, "  {pair}")?;
        }
        let beyond = self.beyond_universe();
        if !beyond.is_empty() {
            writeln!(f, "applied but outside the universe ({}):", beyond.len())?;
            for pair in &beyond {
                writeln!(f, "  {pair}")?;
            }
        }
        writeln!(
            f,
            "covered {} of {} transitions",
            self.covered(),
            self.universe.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use leakproof_model::{Op, SessionId, TaskId};

    use super::*;

    fn model_after(ops: &[Op]) -> Model {
        let mut model = Model::new();
        for op in ops {
            assert!(model.allows(op), "{op:?}");
            model.apply(op);
        }
        model
    }

    const S: SessionId = SessionId(0);
    const T: TaskId = TaskId(0);

    /// A delegated session with a running stream the server has sent 64 KiB: its window full.
    fn full_stream() -> Vec<Op> {
        vec![
            Op::CreateSession {
                session: S,
                kind: SessionKind::Delegated,
                per_host: None,
            },
            Op::CreateTask {
                session: S,
                task: T,
                kind: TaskKind::Stream,
            },
            Op::Resume(T),
            Op::ServerSends {
                task: T,
                bytes: 65_536,
            },
        ]
    }

    fn held(model: &Model, op: &Op) -> Held {
        match Class::of(model, op) {
            Class::Task { held, .. } => held,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_op_sees_the_stream_facts_it_depends_on() {
        let model = model_after(&full_stream());

        assert_eq!(
            held(&model, &Op::Read(T)),
            Held::Stream {
                window: Some(Window::Full),
                peer_ended: Some(false),
                read_closed: Some(false),
                write_closed: Some(false),
            }
        );
        assert_eq!(
            held(&model, &Op::Write(T)),
            Held::Stream {
                window: None,
                peer_ended: None,
                read_closed: None,
                write_closed: Some(false),
            }
        );
        // What a cancel releases (R5): the full window, the leak URLSession has.
        assert_eq!(
            held(&model, &Op::Cancel(T)),
            Held::Stream {
                window: Some(Window::Full),
                peer_ended: None,
                read_closed: None,
                write_closed: None,
            }
        );
        assert_eq!(held(&model, &Op::Suspend(T)), Held::Nothing);
        let after_read = model_after(&[full_stream(), vec![Op::Read(T)]].concat());
        assert!(matches!(
            held(&after_read, &Op::Read(T)),
            Held::Stream {
                window: Some(Window::Partial),
                ..
            }
        ));
    }

    #[test]
    fn an_op_on_a_completed_task_is_classed_by_its_kind_and_session_only() {
        let model = model_after(&[full_stream(), vec![Op::Cancel(T)]].concat());

        for op in [
            Op::Read(T),
            Op::Resume(T),
            Op::ServerSends { task: T, bytes: 1 },
        ] {
            assert_eq!(
                Class::of(&model, &op),
                Class::Completed {
                    kind: TaskKind::Stream,
                    session: SessionState::Active,
                }
            );
        }
    }

    #[test]
    fn the_covering_paths_apply_every_pair_of_the_universe() {
        let universe = universe_of(&universe_scopes());

        let mut applied = BTreeSet::new();
        let mut paths = 0;
        for exploration in covering() {
            for path in exploration.paths.iter().filter(|path| !path.is_empty()) {
                let (last, before) = path.split_last().expect("not empty");
                let model = model_after(before);
                assert!(model.allows(last), "{path:?}");
                applied.insert(Pair::of(&model, last));
                paths += 1;
            }
        }

        assert_eq!(applied, universe);
        // One path a pair, no more.
        assert_eq!(paths, universe.len());
    }
}
