//! The `.ops` repro format: an op sequence as text a person can read, edit, keep under
//! `tests/repros/` and replay.
//!
//! One op per line, in the words of URLSession and HTTP; `#` starts a comment line; blank
//! lines are ignored. `s0`, `s1`, ... name sessions and `t0`, `t1`, ... tasks, as the line that
//! creates them says. A comment `# expect: pass`, `# expect: fail` or `# expect: fail R5` says
//! what a replay must find (pass when there is none); the other comments are notes. Every op,
//! in a sequence the model allows line by line (`tests/repros/every-op.ops` is its part on
//! data, download and upload tasks, which the harness also warms up on):
//!
//! ```text
//! # expect: pass
//! # every op of the format, in a sequence the model allows line by line
//!
//! session s0 delegated
//! session s1 plain
//! session s2 shared
//! task t0 data in s0
//! resume t0
//! server t0 head allow
//! server t0 sends 4096
//! server t0 ends
//! time s0 passes idle timeout
//! task t1 download in s0
//! resume t1
//! suspend t1
//! resume t1
//! server t1 head allow
//! server t1 sends 512
//! server t1 ends and closes
//! task t2 data in s0
//! resume t2
//! server t2 head become-download
//! task t3 upload in s0
//! resume t3
//! server t3 head cancel
//! task t4 data in s1
//! resume t4
//! server t4 resets
//! task t5 upload in s1
//! resume t5
//! server t5 sends garbage
//! task t6 data in s2
//! resume t6
//! time t6 passes request timeout
//! task t7 download in s2
//! resume t7
//! time t7 passes resource timeout
//! task t8 data in s0
//! cancel t8
//! drop t8
//! task t9 stream in s0
//! resume t9
//! server t9 sends 65536
//! read t9
//! write t9
//! server t9 ends
//! read t9
//! read t9
//! close write t9
//! task t10 data in s0
//! resume t10
//! server t10 head become-stream
//! server t10 sends 100
//! close read t10
//! task t11 websocket in s0
//! resume t11
//! server t11 upgrades
//! server t11 sends 12
//! receive t11
//! close t11 going away
//! time t11 passes close timeout
//! task t12 websocket in s0
//! resume t12
//! server t12 refuses upgrade
//! task t13 websocket in s0
//! resume t13
//! server t13 upgrades
//! server t13 closes websocket
//! task t14 websocket in s0
//! resume t14
//! server t14 upgrades
//! server t14 closes websocket with an invalid code
//! task t15 websocket in s0
//! resume t15
//! server t15 upgrades
//! close t15 going away
//! server t15 closes websocket without a code
//! finish tasks and invalidate s1
//! invalidate and cancel s0
//! drop session s2
//! ```
//!
//! A stream's `read` takes everything its window holds (`read t9` above takes 48 KiB of the
//! 64 KiB sent, then the rest, then sees the end). `close t11 going away` is the websocket's
//! `cancel_with(going away)`: the peer's close frame (`server TASK closes websocket`, which
//! for t13 comes first) is then awaited at most the close timeout, and t11's never comes. A
//! peer's close frame carries a code a close frame may carry, none (`... without a code`), or
//! one it may not (`... with an invalid code`, as t14's: a protocol error).
//!
//! [`print()`] writes the canonical form (the expect line, the notes, a blank line, the ops), so
//! `print(&parse(x)?) == x` for whatever `print` wrote, and `parse(&print(r)) == r`.
//!
//! A sequence the suite shrank keeps the generator's ids (`session s2`, `task t5`):
//! [`renumber`] makes them `s0`, `t0`, ... again, and [`Repro::from_failure`] does it for a
//! report.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use leakproof_model::rules::Rule;
use leakproof_model::{
    CloseFrame, Disposition, Fault, Model, Op, Redirect, ResourceId, SessionId, SessionKind,
    TaskId, TaskKind, Timer,
};

use crate::machine::{Divergence, System, run_sequence};
use crate::run::Failure;

/// An op sequence with what replaying it must find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repro {
    pub expect: Expect,
    /// The other comment lines, in order, without their `#`. A note is one trimmed line that
    /// does not start with `expect:`; [`print()`] writes any other as best it can.
    pub notes: Vec<String>,
    pub ops: Vec<Op>,
}

/// What replaying a repro must find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Every step and the teardown match the model.
    Pass,
    /// The system parts from the model, breaking this rule when one is given.
    Fail(Option<Rule>),
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Pass => f.write_str("pass"),
            Expect::Fail(None) => f.write_str("fail"),
            Expect::Fail(Some(rule)) => write!(f, "fail {rule}"),
        }
    }
}

/// A line of an `.ops` text that is not a comment, a blank or an op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub text: String,
    /// The line's grammar, e.g. `resume TASK`.
    pub expected: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {:?}: expected \"{}\"",
            self.line, self.text, self.expected
        )
    }
}

impl std::error::Error for ParseError {}

const EXPECT_USAGE: &str = "# expect: pass|fail|fail RULE, with RULE one of R1 to R12";
const ONE_EXPECT: &str = "a single # expect: line";

/// Read an `.ops` text. Never panics: a line that is not understood is an error naming it.
pub fn parse(text: &str) -> Result<Repro, ParseError> {
    let mut expect = None;
    let mut notes = Vec::new();
    let mut ops = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let error = |expected| ParseError {
            line: i + 1,
            text: raw.to_string(),
            expected,
        };
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            match comment.strip_prefix("expect:") {
                Some(_) if expect.is_some() => return Err(error(ONE_EXPECT)),
                Some(words) => expect = Some(parse_expect(words).ok_or(error(EXPECT_USAGE))?),
                None => notes.push(comment.to_string()),
            }
        } else if !line.is_empty() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let verb = words.first().copied().unwrap_or_default();
            ops.push(parse_op(&words).ok_or_else(|| error(usage(verb)))?);
        }
    }
    Ok(Repro {
        expect: expect.unwrap_or(Expect::Pass),
        notes,
        ops,
    })
}

/// Write a repro in the canonical form: the expect line, the notes, a blank line, the ops.
pub fn print(repro: &Repro) -> String {
    let mut out = format!("# expect: {}\n", repro.expect);
    for line in note_lines(&repro.notes) {
        out.push_str(&comment("#", line));
    }
    out.push('\n');
    for op in &repro.ops {
        out.push_str(&line(op));
        out.push('\n');
    }
    out
}

/// One op as its `.ops` line, without the newline.
pub fn line(op: &Op) -> String {
    match *op {
        Op::CreateSession {
            session,
            kind,
            per_host: None,
        } => format!("session {session} {}", session_kind_word(kind)),
        Op::CreateSession {
            session,
            kind,
            per_host: Some(limit),
        } => format!(
            "session {session} {} with {limit} per host",
            session_kind_word(kind)
        ),
        Op::CreateTask {
            session,
            task,
            kind,
        } => format!("task {task} {} in {session}", task_kind_word(kind)),
        Op::Await {
            session,
            task,
            kind,
        } => format!("await {task} {} in {session}", task_kind_word(kind)),
        Op::Fetch {
            session,
            task,
            resource,
        } => format!("fetch {task} {resource} in {session}"),
        Op::Reset(session) => format!("reset {session}"),
        Op::Resume(task) => format!("resume {task}"),
        Op::Suspend(task) => format!("suspend {task}"),
        Op::Cancel(task) => format!("cancel {task}"),
        Op::DropTask(task) => format!("drop {task}"),
        Op::Read(task) => format!("read {task}"),
        Op::Write(task) => format!("write {task}"),
        Op::CloseRead(task) => format!("close read {task}"),
        Op::CloseWrite(task) => format!("close write {task}"),
        Op::Receive(task) => format!("receive {task}"),
        Op::CloseWith(task) => format!("close {task} going away"),
        Op::FinishTasksAndInvalidate(session) => format!("finish tasks and invalidate {session}"),
        Op::InvalidateAndCancel(session) => format!("invalidate and cancel {session}"),
        Op::DropSession(session) => format!("drop session {session}"),
        Op::ServerHeaders { task, answer } => {
            format!("server {task} head {}", disposition_word(answer))
        }
        Op::ServerRedirects { task, answer } => {
            format!("server {task} redirects {}", redirect_word(answer))
        }
        Op::ServerSends { task, bytes } => format!("server {task} sends {bytes}"),
        Op::ServerEnds {
            task,
            reusable: true,
        } => format!("server {task} ends"),
        Op::ServerEnds {
            task,
            reusable: false,
        } => format!("server {task} ends and closes"),
        Op::ServerFails {
            task,
            fault: Fault::Reset,
        } => format!("server {task} resets"),
        Op::ServerFails {
            task,
            fault: Fault::Malformed,
        } => format!("server {task} sends garbage"),
        Op::ServerAnswersUpgrade { task, accept: true } => format!("server {task} upgrades"),
        Op::ServerAnswersUpgrade {
            task,
            accept: false,
        } => format!("server {task} refuses upgrade"),
        Op::PeerCloses {
            task,
            frame: CloseFrame::Code,
        } => format!("server {task} closes websocket"),
        Op::PeerCloses {
            task,
            frame: CloseFrame::NoCode,
        } => format!("server {task} closes websocket without a code"),
        Op::PeerCloses {
            task,
            frame: CloseFrame::InvalidCode,
        } => format!("server {task} closes websocket with an invalid code"),
        Op::TimePasses { task, timer } => {
            format!("time {task} passes {} timeout", timer_word(timer))
        }
        Op::IdleTimeoutPasses(session) => format!("time {session} passes idle timeout"),
        Op::DelegateBlocks(session) => format!("delegate {session} blocks"),
        Op::DelegateReturns(session) => format!("delegate {session} returns"),
        Op::DelegateDefers(session) => format!("delegate {session} answers later"),
        Op::Answer(task) => format!("answer {task}"),
        Op::DropResponder(task) => format!("drop responder {task}"),
        Op::Par(ref a, ref b) => format!("par {} | {}", line(a), line(b)),
    }
}

fn parse_op(words: &[&str]) -> Option<Op> {
    Some(match *words {
        ["par", ref rest @ ..] => {
            let bar = rest.iter().position(|w| *w == "|")?;
            let (a, b) = (&rest[..bar], &rest[bar + 1..]);
            let (a, b) = (parse_op(a)?, parse_op(b)?);
            if !a.may_run_in_parallel() || !b.may_run_in_parallel() {
                return None;
            }
            Op::Par(Box::new(a), Box::new(b))
        }
        ["session", s, kind] => Op::CreateSession {
            session: session(s)?,
            kind: parse_word(&SESSION_KINDS, session_kind_word, kind)?,
            per_host: None,
        },
        ["session", s, kind, "with", limit, "per", "host"] => Op::CreateSession {
            session: session(s)?,
            kind: parse_word(&SESSION_KINDS, session_kind_word, kind)?,
            per_host: Some(limit.parse().ok().filter(|l| *l > 0)?),
        },
        ["task", t, kind, "in", s] => Op::CreateTask {
            session: session(s)?,
            task: task(t)?,
            kind: parse_word(&TASK_KINDS, task_kind_word, kind)?,
        },
        ["fetch", t, r, "in", s] => Op::Fetch {
            session: session(s)?,
            task: task(t)?,
            resource: ResourceId(u8::try_from(r.strip_prefix('r').and_then(number)?).ok()?),
        },
        ["reset", s] => Op::Reset(session(s)?),
        ["await", t, kind, "in", s] => Op::Await {
            session: session(s)?,
            task: task(t)?,
            kind: parse_word(&TASK_KINDS, task_kind_word, kind)?,
        },
        ["delegate", s, "blocks"] => Op::DelegateBlocks(session(s)?),
        ["delegate", s, "returns"] => Op::DelegateReturns(session(s)?),
        ["delegate", s, "answers", "later"] => Op::DelegateDefers(session(s)?),
        ["answer", t] => Op::Answer(task(t)?),
        ["drop", "responder", t] => Op::DropResponder(task(t)?),
        ["resume", t] => Op::Resume(task(t)?),
        ["suspend", t] => Op::Suspend(task(t)?),
        ["cancel", t] => Op::Cancel(task(t)?),
        ["drop", t] => Op::DropTask(task(t)?),
        ["read", t] => Op::Read(task(t)?),
        ["write", t] => Op::Write(task(t)?),
        ["close", "read", t] => Op::CloseRead(task(t)?),
        ["close", "write", t] => Op::CloseWrite(task(t)?),
        ["receive", t] => Op::Receive(task(t)?),
        ["close", t, "going", "away"] => Op::CloseWith(task(t)?),
        ["finish", "tasks", "and", "invalidate", s] => Op::FinishTasksAndInvalidate(session(s)?),
        ["invalidate", "and", "cancel", s] => Op::InvalidateAndCancel(session(s)?),
        ["drop", "session", s] => Op::DropSession(session(s)?),
        ["server", t, "head", answer] => Op::ServerHeaders {
            task: task(t)?,
            answer: parse_word(&DISPOSITIONS, disposition_word, answer)?,
        },
        ["server", t, "redirects", answer] => Op::ServerRedirects {
            task: task(t)?,
            answer: parse_word(&REDIRECTS, redirect_word, answer)?,
        },
        ["server", t, "sends", "garbage"] => Op::ServerFails {
            task: task(t)?,
            fault: Fault::Malformed,
        },
        ["server", t, "sends", n] => Op::ServerSends {
            task: task(t)?,
            bytes: number(n)?,
        },
        ["server", t, "ends"] => Op::ServerEnds {
            task: task(t)?,
            reusable: true,
        },
        ["server", t, "ends", "and", "closes"] => Op::ServerEnds {
            task: task(t)?,
            reusable: false,
        },
        ["server", t, "resets"] => Op::ServerFails {
            task: task(t)?,
            fault: Fault::Reset,
        },
        ["server", t, "upgrades"] => Op::ServerAnswersUpgrade {
            task: task(t)?,
            accept: true,
        },
        ["server", t, "refuses", "upgrade"] => Op::ServerAnswersUpgrade {
            task: task(t)?,
            accept: false,
        },
        ["server", t, "closes", "websocket"] => Op::PeerCloses {
            task: task(t)?,
            frame: CloseFrame::Code,
        },
        ["server", t, "closes", "websocket", "without", "a", "code"] => Op::PeerCloses {
            task: task(t)?,
            frame: CloseFrame::NoCode,
        },
        [
            "server",
            t,
            "closes",
            "websocket",
            "with",
            "an",
            "invalid",
            "code",
        ] => Op::PeerCloses {
            task: task(t)?,
            frame: CloseFrame::InvalidCode,
        },
        ["time", s, "passes", "idle", "timeout"] => Op::IdleTimeoutPasses(session(s)?),
        ["time", t, "passes", timer, "timeout"] => Op::TimePasses {
            task: task(t)?,
            timer: parse_word(&TIMERS, timer_word, timer)?,
        },
        _ => return None,
    })
}

/// The grammar of the lines that start with `verb`, for the error that says what was expected.
fn usage(verb: &str) -> &'static str {
    match verb {
        "session" => "session SESSION plain|delegated|shared",
        "task" => "task TASK data|download|upload|stream|websocket in SESSION",
        "await" => "await TASK data|download|upload in SESSION",
        "par" => "par OP | OP (two of: a session op, task, resume, suspend, cancel, drop)",
        "delegate" => "delegate SESSION blocks|returns",
        "resume" => "resume TASK",
        "suspend" => "suspend TASK",
        "cancel" => "cancel TASK",
        "drop" => "drop TASK|drop session SESSION",
        "read" => "read TASK",
        "write" => "write TASK",
        "close" => "close read TASK|close write TASK|close TASK going away",
        "receive" => "receive TASK",
        "finish" => "finish tasks and invalidate SESSION",
        "invalidate" => "invalidate and cancel SESSION",
        "server" => {
            "server TASK head allow|cancel|become-download|become-stream|sends N|ends|ends and closes|resets|sends garbage|upgrades|refuses upgrade|closes websocket [without a code|with an invalid code]"
        }
        "time" => {
            "time TASK passes request|resource|close timeout|time SESSION passes idle timeout"
        }
        _ => {
            "# a comment, or an op: session, task, await, par, resume, suspend, cancel, drop, read, write, close, receive, finish, invalidate, server, time, delegate"
        }
    }
}

fn parse_expect(words: &str) -> Option<Expect> {
    match *words.split_whitespace().collect::<Vec<_>>() {
        ["pass"] => Some(Expect::Pass),
        ["fail"] => Some(Expect::Fail(None)),
        ["fail", rule] => Rule::ALL
            .into_iter()
            .find(|r| r.to_string() == rule)
            .map(|r| Expect::Fail(Some(r))),
        _ => None,
    }
}

// Each word is written by one exhaustive match and read back by searching every value's word,
// so the two directions cannot disagree; the round-trip test covers every value.
const SESSION_KINDS: [SessionKind; 3] = [
    SessionKind::Plain,
    SessionKind::Delegated,
    SessionKind::Shared,
];
const TASK_KINDS: [TaskKind; 5] = [
    TaskKind::Data,
    TaskKind::Download,
    TaskKind::Upload,
    TaskKind::Stream,
    TaskKind::WebSocket,
];
const DISPOSITIONS: [Disposition; 4] = [
    Disposition::Allow,
    Disposition::Cancel,
    Disposition::BecomeDownload,
    Disposition::BecomeStream,
];
const TIMERS: [Timer; 3] = [Timer::Request, Timer::Resource, Timer::Close];

fn session_kind_word(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Plain => "plain",
        SessionKind::Delegated => "delegated",
        SessionKind::Shared => "shared",
    }
}

fn task_kind_word(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Data => "data",
        TaskKind::Download => "download",
        TaskKind::Upload => "upload",
        TaskKind::Stream => "stream",
        TaskKind::WebSocket => "websocket",
    }
}

const REDIRECTS: [Redirect; 2] = [Redirect::Follow, Redirect::Refuse];

fn redirect_word(answer: Redirect) -> &'static str {
    match answer {
        Redirect::Follow => "follow",
        Redirect::Refuse => "refuse",
    }
}

fn disposition_word(answer: Disposition) -> &'static str {
    match answer {
        Disposition::Allow => "allow",
        Disposition::Cancel => "cancel",
        Disposition::BecomeDownload => "become-download",
        Disposition::BecomeStream => "become-stream",
    }
}

fn timer_word(timer: Timer) -> &'static str {
    match timer {
        Timer::Request => "request",
        Timer::Resource => "resource",
        Timer::Close => "close",
    }
}

fn parse_word<T: Copy>(all: &[T], word: fn(T) -> &'static str, text: &str) -> Option<T> {
    all.iter().copied().find(|value| word(*value) == text)
}

/// Decimal digits only: `u32::from_str` would also take `+5`, which `print` never writes.
fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn session(text: &str) -> Option<SessionId> {
    text.strip_prefix('s').and_then(number).map(SessionId)
}

fn task(text: &str) -> Option<TaskId> {
    text.strip_prefix('t').and_then(number).map(TaskId)
}

/// The lines of the notes; a note with a line break still writes one comment per line, so it
/// cannot turn into an op.
fn note_lines(notes: &[String]) -> impl Iterator<Item = &str> {
    notes.iter().flat_map(|note| note.split('\n'))
}

/// `marker` and the text, with no trailing space when the text is empty.
fn comment(marker: &str, text: &str) -> String {
    match text.trim() {
        "" => format!("{marker}\n"),
        text => format!("{marker} {text}\n"),
    }
}

/// Session and task ids renamed in order of first appearance, from 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renumbering {
    sessions: BTreeMap<SessionId, SessionId>,
    tasks: BTreeMap<TaskId, TaskId>,
}

impl Renumbering {
    /// The renaming that makes `ops` read `s0`, `s1`, ... and `t0`, `t1`, ...
    pub fn of(ops: &[Op]) -> Self {
        let mut renumbering = Self::default();
        let atoms = ops.iter().flat_map(|op| match op {
            Op::Par(a, b) => vec![&**a, &**b],
            op => vec![op],
        });
        for op in atoms {
            let (session, task) = ids(op);
            if let Some(s) = session {
                let next = SessionId(renumbering.sessions.len() as u32);
                renumbering.sessions.entry(s).or_insert(next);
            }
            if let Some(t) = task {
                let next = TaskId(renumbering.tasks.len() as u32);
                renumbering.tasks.entry(t).or_insert(next);
            }
        }
        renumbering
    }

    /// The new name of `id`; an id the ops never named keeps its own.
    pub fn session(&self, id: SessionId) -> SessionId {
        self.sessions.get(&id).copied().unwrap_or(id)
    }

    /// The new name of `id`; an id the ops never named keeps its own.
    pub fn task(&self, id: TaskId) -> TaskId {
        self.tasks.get(&id).copied().unwrap_or(id)
    }

    /// `op` with its ids renamed.
    pub fn op(&self, op: &Op) -> Op {
        let (s, t) = (|id| self.session(id), |id| self.task(id));
        match *op {
            Op::Par(ref a, ref b) => Op::Par(Box::new(self.op(a)), Box::new(self.op(b))),
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => Op::CreateSession {
                session: s(session),
                kind,
                per_host,
            },
            Op::CreateTask {
                session,
                task,
                kind,
            } => Op::CreateTask {
                session: s(session),
                task: t(task),
                kind,
            },
            Op::Await {
                session,
                task,
                kind,
            } => Op::Await {
                session: s(session),
                task: t(task),
                kind,
            },
            Op::Fetch {
                session,
                task,
                resource,
            } => Op::Fetch {
                session: s(session),
                task: t(task),
                resource,
            },
            Op::Reset(session) => Op::Reset(s(session)),
            Op::FinishTasksAndInvalidate(session) => Op::FinishTasksAndInvalidate(s(session)),
            Op::InvalidateAndCancel(session) => Op::InvalidateAndCancel(s(session)),
            Op::DropSession(session) => Op::DropSession(s(session)),
            Op::IdleTimeoutPasses(session) => Op::IdleTimeoutPasses(s(session)),
            Op::DelegateBlocks(session) => Op::DelegateBlocks(s(session)),
            Op::DelegateReturns(session) => Op::DelegateReturns(s(session)),
            Op::DelegateDefers(session) => Op::DelegateDefers(s(session)),
            Op::Answer(task) => Op::Answer(t(task)),
            Op::DropResponder(task) => Op::DropResponder(t(task)),
            Op::Resume(task) => Op::Resume(t(task)),
            Op::Suspend(task) => Op::Suspend(t(task)),
            Op::Cancel(task) => Op::Cancel(t(task)),
            Op::DropTask(task) => Op::DropTask(t(task)),
            Op::Read(task) => Op::Read(t(task)),
            Op::Write(task) => Op::Write(t(task)),
            Op::CloseRead(task) => Op::CloseRead(t(task)),
            Op::CloseWrite(task) => Op::CloseWrite(t(task)),
            Op::Receive(task) => Op::Receive(t(task)),
            Op::CloseWith(task) => Op::CloseWith(t(task)),
            Op::ServerAnswersUpgrade { task, accept } => Op::ServerAnswersUpgrade {
                task: t(task),
                accept,
            },
            Op::PeerCloses { task, frame } => Op::PeerCloses {
                task: t(task),
                frame,
            },
            Op::ServerHeaders { task, answer } => Op::ServerHeaders {
                task: t(task),
                answer,
            },
            Op::ServerSends { task, bytes } => Op::ServerSends {
                task: t(task),
                bytes,
            },
            Op::ServerRedirects { task, answer } => Op::ServerRedirects {
                task: t(task),
                answer,
            },
            Op::ServerEnds { task, reusable } => Op::ServerEnds {
                task: t(task),
                reusable,
            },
            Op::ServerFails { task, fault } => Op::ServerFails {
                task: t(task),
                fault,
            },
            Op::TimePasses { task, timer } => Op::TimePasses {
                task: t(task),
                timer,
            },
        }
    }
}

/// The ids an op names, sessions first as `task t5 data in s2` reads.
fn ids(op: &Op) -> (Option<SessionId>, Option<TaskId>) {
    match *op {
        Op::CreateSession { session, .. }
        | Op::FinishTasksAndInvalidate(session)
        | Op::InvalidateAndCancel(session)
        | Op::DropSession(session)
        | Op::IdleTimeoutPasses(session)
        | Op::DelegateBlocks(session)
        | Op::DelegateReturns(session)
        | Op::DelegateDefers(session)
        | Op::Reset(session) => (Some(session), None),
        Op::CreateTask { session, task, .. }
        | Op::Await { session, task, .. }
        | Op::Fetch { session, task, .. } => (Some(session), Some(task)),
        _ => (None, op.task()),
    }
}

/// `ops` with sessions and tasks renamed `s0`, `t0`, ... in order of first appearance. A
/// shrunk sequence keeps the generator's ids; the model treats ids only as names, so it
/// allows and answers the renamed sequence exactly as the original.
pub fn renumber(ops: &[Op]) -> Vec<Op> {
    let renumbering = Renumbering::of(ops);
    ops.iter().map(|op| renumbering.op(op)).collect()
}

/// Whether the model allows each op where it stands; [`run_sequence`] skips the others, so a
/// mistyped id in a hand-written repro would silently do nothing.
pub fn allowed(ops: &[Op]) -> Vec<bool> {
    let mut model = Model::new();
    ops.iter()
        .map(|op| {
            let allowed = model.allows(op);
            if allowed {
                model.apply(op);
            }
            allowed
        })
        .collect()
}

impl Repro {
    /// The repro of a run's failure: the ops that ran, renumbered, expected to pass once the
    /// bug is fixed, with a note naming the rule and the op of the first divergence.
    pub fn from_failure(failure: &Failure) -> Self {
        let ran = allowed(&failure.ops);
        let ops: Vec<Op> = failure
            .ops
            .iter()
            .zip(ran)
            .filter(|(_, ran)| *ran)
            .map(|(op, _)| op.clone())
            .collect();
        let ops = renumber(&ops);
        let message = &failure.message;
        let note = match (broken_rule(message), divergence_step(message)) {
            // Every op of `ops` runs, so step n is its nth op; later steps are the teardown.
            (Some(rule), Some(step)) => match step.checked_sub(1).and_then(|i| ops.get(i)) {
                Some(op) => format!("{rule} broken at step {step}: {}", line(op)),
                None => format!("{rule} broken at step {step}, in the teardown"),
            },
            _ => {
                let first = message.lines().next().unwrap_or_default();
                format!("found by leakproof-check: {first}")
            }
        };
        Repro {
            expect: Expect::Pass,
            notes: vec![note],
            ops,
        }
    }
}

/// The rule a failure message names first: a [`Divergence`] says `R5 broken: ...`, the
/// engine's own assertions `R5: ...`.
pub fn broken_rule(message: &str) -> Option<Rule> {
    let first = message.split_whitespace().next()?;
    let name = first.strip_suffix(':').unwrap_or(first);
    Rule::ALL.into_iter().find(|rule| rule.to_string() == name)
}

/// The step a [`Divergence`]'s message names.
fn divergence_step(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once("first divergence at step ")?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// A `#[test]` that replays `repro` against the engine and fails with the divergence, ready
/// to paste into a test file of this package. `name` becomes the function's name (made a
/// valid identifier); the notes become comments. Laid out as rustfmt would.
pub fn test_snippet(name: &str, repro: &Repro) -> String {
    test_snippet_against(name, repro, "engine")
}

/// [`test_snippet`] against a target: `"engine"` ([`EngineWorld`](crate::engine_sut)),
/// `"simulated"` ([`SimulatedWorld`](crate::client_sut)) or `"sockets"`
/// ([`ClientWorld`](crate::client_sut)).
pub fn test_snippet_against(name: &str, repro: &Repro, target: &str) -> String {
    let (module, world) = match target {
        "sockets" | "client" => ("client_sut", "ClientWorld"),
        "simulated" => ("client_sut", "SimulatedWorld"),
        _ => ("engine_sut", "EngineWorld"),
    };
    let mut out = String::new();
    for line in note_lines(&repro.notes) {
        out.push_str(&comment("//", line));
    }
    out.push_str(&format!("#[test]\nfn {}() {{\n", identifier(name)));
    out.push_str(&format!("    use leakproof_check::{module}::{world};\n"));
    out.push_str("    use leakproof_check::machine::run_sequence;\n");
    out.push_str("    use leakproof_model::*;\n\n");
    out.push_str(&format!(
        "    let ops: &[Op] = &[{}];\n",
        rust_elements(&repro.ops)
    ));
    out.push_str(&format!(
        "    if let Err(divergence) = run_sequence::<{world}>(ops) {{\n"
    ));
    out.push_str("        panic!(\"{divergence}\");\n");
    out.push_str("    }\n}\n");
    out
}

/// `name` as a snake_case identifier.
fn identifier(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        id.insert_str(0, "repro_");
    }
    id
}

/// The elements of the snippet's array, laid out as rustfmt does: on one line if they fit its
/// `array_width` (60) and hold no struct literal (which are all wider than its
/// `struct_lit_width`, so one field a line); a lone struct literal hugging the brackets;
/// otherwise one element a line.
fn rust_elements(ops: &[Op]) -> String {
    let literals: Vec<Literal> = ops.iter().map(rust_literal).collect();
    let tuples: Vec<&str> = literals
        .iter()
        .filter_map(|literal| match literal {
            Literal::Tuple(text) => Some(text.as_str()),
            Literal::Struct { .. } | Literal::Par(..) => None,
        })
        .collect();
    let one_line = tuples.join(", ");
    match literals.as_slice() {
        _ if tuples.len() == literals.len() && one_line.len() <= 60 => one_line,
        [lone @ Literal::Struct { .. }] => lone.write("    "),
        _ => {
            let mut out = String::from("\n");
            for literal in &literals {
                out.push_str(&format!("        {},\n", literal.write("        ")));
            }
            out + "    "
        }
    }
}

/// An op written as Rust.
enum Literal {
    /// `Op::Resume(TaskId(0))`
    Tuple(String),
    /// `Op::ServerSends { task: TaskId(0), bytes: 10 }`
    Struct {
        variant: &'static str,
        fields: Vec<(&'static str, String)>,
    },
    /// `Op::Par(Box::new(..), Box::new(..))`, one box a line.
    Par(Box<Literal>, Box<Literal>),
}

impl Literal {
    /// The literal, its continuation lines indented from `indent`.
    fn write(&self, indent: &str) -> String {
        match self {
            Literal::Tuple(text) => text.clone(),
            Literal::Struct { variant, fields } => {
                let mut out = format!("Op::{variant} {{\n");
                for (field, value) in fields {
                    out.push_str(&format!("{indent}    {field}: {value},\n"));
                }
                out + indent + "}"
            }
            Literal::Par(a, b) => {
                let inner = format!("{indent}    ");
                format!(
                    "Op::Par(\n{inner}Box::new({}),\n{inner}Box::new({}),\n{indent})",
                    a.write(&inner),
                    b.write(&inner)
                )
            }
        }
    }
}

fn rust_literal(op: &Op) -> Literal {
    let s = |id: SessionId| format!("SessionId({})", id.0);
    let t = |id: TaskId| format!("TaskId({})", id.0);
    let tuple = |variant: &str, arg: String| Literal::Tuple(format!("Op::{variant}({arg})"));
    let named = |variant, fields: &[(&'static str, String)]| Literal::Struct {
        variant,
        fields: fields.to_vec(),
    };
    match *op {
        Op::Par(ref a, ref b) => Literal::Par(Box::new(rust_literal(a)), Box::new(rust_literal(b))),
        Op::CreateSession {
            session,
            kind,
            per_host,
        } => named(
            "CreateSession",
            &[
                ("session", s(session)),
                ("kind", format!("SessionKind::{kind:?}")),
                ("per_host", format!("{per_host:?}")),
            ],
        ),
        Op::CreateTask {
            session,
            task,
            kind,
        } => named(
            "CreateTask",
            &[
                ("session", s(session)),
                ("task", t(task)),
                ("kind", format!("TaskKind::{kind:?}")),
            ],
        ),
        Op::Await {
            session,
            task,
            kind,
        } => named(
            "Await",
            &[
                ("session", s(session)),
                ("task", t(task)),
                ("kind", format!("TaskKind::{kind:?}")),
            ],
        ),
        Op::FinishTasksAndInvalidate(session) => tuple("FinishTasksAndInvalidate", s(session)),
        Op::InvalidateAndCancel(session) => tuple("InvalidateAndCancel", s(session)),
        Op::DropSession(session) => tuple("DropSession", s(session)),
        Op::IdleTimeoutPasses(session) => tuple("IdleTimeoutPasses", s(session)),
        Op::DelegateBlocks(session) => tuple("DelegateBlocks", s(session)),
        Op::DelegateReturns(session) => tuple("DelegateReturns", s(session)),
        Op::DelegateDefers(session) => tuple("DelegateDefers", s(session)),
        Op::Reset(session) => tuple("Reset", s(session)),
        Op::Fetch {
            session,
            task,
            resource,
        } => named(
            "Fetch",
            &[
                ("session", s(session)),
                ("task", t(task)),
                ("resource", format!("ResourceId({})", resource.0)),
            ],
        ),
        Op::Answer(task) => tuple("Answer", t(task)),
        Op::DropResponder(task) => tuple("DropResponder", t(task)),
        Op::Resume(task) => tuple("Resume", t(task)),
        Op::Suspend(task) => tuple("Suspend", t(task)),
        Op::Cancel(task) => tuple("Cancel", t(task)),
        Op::DropTask(task) => tuple("DropTask", t(task)),
        Op::Read(task) => tuple("Read", t(task)),
        Op::Write(task) => tuple("Write", t(task)),
        Op::CloseRead(task) => tuple("CloseRead", t(task)),
        Op::CloseWrite(task) => tuple("CloseWrite", t(task)),
        Op::Receive(task) => tuple("Receive", t(task)),
        Op::CloseWith(task) => tuple("CloseWith", t(task)),
        Op::ServerAnswersUpgrade { task, accept } => named(
            "ServerAnswersUpgrade",
            &[("task", t(task)), ("accept", accept.to_string())],
        ),
        Op::ServerHeaders { task, answer } => named(
            "ServerHeaders",
            &[
                ("task", t(task)),
                ("answer", format!("Disposition::{answer:?}")),
            ],
        ),
        Op::ServerRedirects { task, answer } => named(
            "ServerRedirects",
            &[
                ("task", t(task)),
                ("answer", format!("Redirect::{answer:?}")),
            ],
        ),
        Op::ServerSends { task, bytes } => named(
            "ServerSends",
            &[("task", t(task)), ("bytes", bytes.to_string())],
        ),
        Op::ServerEnds { task, reusable } => named(
            "ServerEnds",
            &[("task", t(task)), ("reusable", reusable.to_string())],
        ),
        Op::ServerFails { task, fault } => named(
            "ServerFails",
            &[("task", t(task)), ("fault", format!("Fault::{fault:?}"))],
        ),
        Op::PeerCloses { task, frame } => named(
            "PeerCloses",
            &[
                ("task", t(task)),
                ("frame", format!("CloseFrame::{frame:?}")),
            ],
        ),
        Op::TimePasses { task, timer } => named(
            "TimePasses",
            &[("task", t(task)), ("timer", format!("Timer::{timer:?}"))],
        ),
    }
}

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Every step and the teardown matched the model.
    Agreement { steps: usize },
    /// The system parted from the model.
    Divergence(Divergence),
    /// The system panicked: one of its own assertions (`R5: ...`), or a harness bug.
    Panic(String),
}

/// A replay judged against the repro's expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub expect: Expect,
    pub found: Found,
}

impl Verdict {
    /// Whether the replay found what the repro expects.
    pub fn held(&self) -> bool {
        match (self.expect, &self.found) {
            (Expect::Pass, Found::Agreement { .. }) => true,
            (Expect::Fail(None), Found::Divergence(_) | Found::Panic(_)) => true,
            (Expect::Fail(Some(rule)), Found::Divergence(divergence)) => {
                divergence.violation.rule == rule
            }
            (Expect::Fail(Some(rule)), Found::Panic(message)) => broken_rule(message) == Some(rule),
            _ => false,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = if self.held() { "held" } else { "FAILED" };
        write!(f, "{held} (expected {}): ", self.expect)?;
        match &self.found {
            Found::Agreement { steps } => {
                write!(f, "every rule held over {steps} steps, teardown included")
            }
            Found::Divergence(divergence) => write!(f, "{divergence}"),
            Found::Panic(message) => write!(f, "the system panicked: {message}"),
        }
    }
}

/// Replay `repro` against a fresh `S`, then its teardown, and judge what happened.
pub fn replay<S: System>(repro: &Repro) -> Verdict {
    // The engine under test asserts its own protocol: a panic is a finding, not a crash.
    let found = match catch_unwind(AssertUnwindSafe(|| run_sequence::<S>(&repro.ops))) {
        Ok(Ok(steps)) => Found::Agreement { steps },
        Ok(Err(divergence)) => Found::Divergence(divergence),
        Err(panic) => Found::Panic(crate::machine::panic_message(&*panic)),
    };
    Verdict {
        expect: repro.expect,
        found,
    }
}

/// The replay of one `.ops` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub path: PathBuf,
    pub ops: usize,
    /// Ops (1-based) the model does not allow where they stand, so nothing ran them.
    pub skipped: Vec<usize>,
    pub verdict: Verdict,
}

impl ReplayReport {
    /// Whether the file's expectation held and every op in it ran.
    pub fn held(&self) -> bool {
        self.verdict.held() && self.skipped.is_empty()
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ops", self.path.display(), self.ops)?;
        if !self.skipped.is_empty() {
            write!(f, ", ops {:?} skipped (not allowed there)", self.skipped)?;
        }
        write!(f, ": {}", self.verdict)
    }
}

/// An `.ops` file that could not be replayed.
#[derive(Debug)]
pub enum ReplayError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    Parse {
        path: PathBuf,
        error: ParseError,
    },
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Read { path, error } => write!(f, "{}: {error}", path.display()),
            ReplayError::Parse { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for ReplayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReplayError::Read { error, .. } => Some(error),
            ReplayError::Parse { error, .. } => Some(error),
        }
    }
}

/// Read, parse and replay one `.ops` file against a fresh `S`.
pub fn replay_file<S: System>(path: impl AsRef<Path>) -> Result<ReplayReport, ReplayError> {
    let path = path.as_ref().to_path_buf();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) => return Err(ReplayError::Read { path, error }),
    };
    let repro = match parse(&text) {
        Ok(repro) => repro,
        Err(error) => return Err(ReplayError::Parse { path, error }),
    };
    let skipped = (1..)
        .zip(allowed(&repro.ops))
        .filter(|(_, allowed)| !allowed)
        .map(|(n, _)| n)
        .collect();
    Ok(ReplayReport {
        ops: repro.ops.len(),
        skipped,
        verdict: replay::<S>(&repro),
        path,
    })
}
