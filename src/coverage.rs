//! Coverage of the model's transitions: which (state class, op kind) pairs the suite has
//! driven a system through, against the universe of pairs the model allows in some reachable
//! state.
//!
//! A [`Class`] abstracts the model around an op to what decides the op's transition; an
//! [`OpKind`] is the op without its ids and byte counts. [`record`] counts every pair applied
//! to a system, process-wide, so a test that reads [`snapshot`] must be alone in its binary.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

use leakproof_model::{
    Disposition, Exchange, Fault, Model, Op, ServerPhase, SessionKind, SessionState, TaskKind,
    TaskState, Timer,
};

use crate::explore::{Alphabet, search};

/// The depth of the model-only search that finds the universe. With [`Alphabet::every_kind`]
/// the pairs found at depths 1 to 12 are 3, 24, 95, 292, 736, 1210, 1483, then 1534 from
/// depth 8 on; wider alphabets (three tasks to depth 10, two sessions to depth 9, two sessions
/// of three tasks to depth 9: 3.9 million states) find the same 1534. Depth 9 keeps one depth
/// of margin and takes about 5 s in a debug build.
pub const UNIVERSE_DEPTH: usize = 9;

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
    /// An op on a task, by the user or the environment, and the task's session.
    Task {
        kind: TaskKind,
        state: TaskState,
        exchange: Exchange,
        server: ServerPhase,
        session: SessionState,
        session_kind: SessionKind,
    },
}

/// An op without its ids and byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    CreateSession(SessionKind),
    FinishTasksAndInvalidate,
    InvalidateAndCancel,
    DropSession,
    CreateTask(TaskKind),
    Resume,
    Suspend,
    Cancel,
    DropTask,
    ServerHeaders(Disposition),
    ServerSends,
    ServerEnds { reusable: bool },
    ServerFails(Fault),
    TimePasses(Timer),
    IdleTimeoutPasses,
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
            Op::CreateSession { .. } => Class::NoSession,
            Op::CreateTask { session, .. }
            | Op::FinishTasksAndInvalidate(session)
            | Op::InvalidateAndCancel(session)
            | Op::DropSession(session)
            | Op::IdleTimeoutPasses(session) => session_class(session),
            Op::Resume(task)
            | Op::Suspend(task)
            | Op::Cancel(task)
            | Op::DropTask(task)
            | Op::ServerHeaders { task, .. }
            | Op::ServerSends { task, .. }
            | Op::ServerEnds { task, .. }
            | Op::ServerFails { task, .. }
            | Op::TimePasses { task, .. } => {
                let task = before.task(task).expect("an allowed op's task exists");
                let session = before
                    .session(task.session)
                    .expect("a task's session exists");
                Class::Task {
                    kind: task.kind,
                    state: task.state,
                    exchange: task.exchange,
                    server: task.server,
                    session: session.state,
                    session_kind: session.kind,
                }
            }
        }
    }

    /// The sort key: the model's enums are not `Ord`, and their declaration order is the
    /// order of the lifecycle, which is how a table should read.
    fn key(&self) -> [u8; 7] {
        match *self {
            Class::NoSession => [0; 7],
            Class::Session {
                state,
                kind,
                live_tasks,
            } => [1, kind as u8, state as u8, live_tasks.into(), 0, 0, 0],
            Class::Task {
                kind,
                state,
                exchange,
                server,
                session,
                session_kind,
            } => [
                2,
                session_kind as u8,
                session as u8,
                kind as u8,
                state as u8,
                exchange as u8,
                server as u8,
            ],
        }
    }
}

impl OpKind {
    /// The kind of `op`.
    pub fn of(op: &Op) -> Self {
        match *op {
            Op::CreateSession { kind, .. } => OpKind::CreateSession(kind),
            Op::FinishTasksAndInvalidate(_) => OpKind::FinishTasksAndInvalidate,
            Op::InvalidateAndCancel(_) => OpKind::InvalidateAndCancel,
            Op::DropSession(_) => OpKind::DropSession,
            Op::CreateTask { kind, .. } => OpKind::CreateTask(kind),
            Op::Resume(_) => OpKind::Resume,
            Op::Suspend(_) => OpKind::Suspend,
            Op::Cancel(_) => OpKind::Cancel,
            Op::DropTask(_) => OpKind::DropTask,
            Op::ServerHeaders { answer, .. } => OpKind::ServerHeaders(answer),
            Op::ServerSends { .. } => OpKind::ServerSends,
            Op::ServerEnds { reusable, .. } => OpKind::ServerEnds { reusable },
            Op::ServerFails { fault, .. } => OpKind::ServerFails(fault),
            Op::TimePasses { timer, .. } => OpKind::TimePasses(timer),
            Op::IdleTimeoutPasses(_) => OpKind::IdleTimeoutPasses,
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
            OpKind::Resume => (5, 0),
            OpKind::Suspend => (6, 0),
            OpKind::Cancel => (7, 0),
            OpKind::DropTask => (8, 0),
            OpKind::ServerHeaders(answer) => (9, answer as u8),
            OpKind::ServerSends => (10, 0),
            OpKind::ServerEnds { reusable } => (11, reusable.into()),
            OpKind::ServerFails(fault) => (12, fault as u8),
            OpKind::TimePasses(timer) => (13, timer as u8),
            OpKind::IdleTimeoutPasses => (14, 0),
        }
    }
}

impl Pair {
    /// The pair of `op` applied at `before`.
    pub fn of(before: &Model, op: &Op) -> Self {
        Pair {
            op: OpKind::of(op),
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
                state,
                exchange,
                server,
                session,
                session_kind,
            } => write!(
                f,
                "session {:<9} {:<11} task {:<8} {:<9} {:<16} server {}",
                name(session_kind),
                name(session),
                name(kind),
                name(state),
                name(exchange),
                name(server)
            ),
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OpKind::CreateSession(kind) => write!(f, "CreateSession({kind:?})"),
            OpKind::CreateTask(kind) => write!(f, "CreateTask({kind:?})"),
            OpKind::ServerHeaders(answer) => write!(f, "ServerHeaders({answer:?})"),
            OpKind::ServerEnds { reusable: true } => write!(f, "ServerEnds(reusable)"),
            OpKind::ServerEnds { reusable: false } => write!(f, "ServerEnds(not reusable)"),
            OpKind::ServerFails(fault) => write!(f, "ServerFails({fault:?})"),
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

/// Every pair the model allows in some state reachable within `depth` ops of
/// [`Alphabet::every_kind`]. Deep enough ([`UNIVERSE_DEPTH`]), that is every transition of the
/// model: a class describes one session and at most one of its tasks, so other sessions and
/// more tasks add states but no classes.
///
/// # Panics
/// If the model breaks its own rules on the way: a bug in the spec, printed with its path.
pub fn universe(depth: usize) -> BTreeSet<Pair> {
    let mut pairs = BTreeSet::new();
    search(&Alphabet::every_kind(), depth, |before, op| {
        pairs.insert(Pair::of(before, op));
    })
    .unwrap_or_else(|bug| panic!("{bug}"));
    pairs
}

/// Pairs applied to systems so far in this process, with how often.
static COUNTS: Mutex<BTreeMap<Pair, u64>> = Mutex::new(BTreeMap::new());

/// Note that `op` was applied to a system when the model stood at `before`.
pub fn record(before: &Model, op: &Op) {
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

/// The pairs recorded so far, against the universe at [`UNIVERSE_DEPTH`] (computed once).
pub fn snapshot() -> Coverage {
    static UNIVERSE: OnceLock<BTreeSet<Pair>> = OnceLock::new();
    Coverage {
        counts: COUNTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        universe: UNIVERSE.get_or_init(|| universe(UNIVERSE_DEPTH)).clone(),
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
