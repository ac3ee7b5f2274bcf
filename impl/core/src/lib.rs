//! # leakproof-core: the sans-IO lifecycle engine
//!
//! One session's lifecycle as an engine that does no IO and reads no clock. Inputs are method
//! calls: the user's (resume, suspend, cancel, invalidate, a handle dropped), the driver's
//! (a response head, body bytes, the end, an error, a timer fired) and the delivery's
//! acknowledgements (the delegate's disposition, the body bytes it is done with). Outputs are two ordered queues:
//! - [`Action`]s the driver must carry out: start an exchange on a new or pooled connection,
//!   pause or resume reading, read the body (into a file for downloads), abort a task's IO,
//!   close a connection, arm or disarm a timer, remove a temp file;
//! - [`Callback`]s the [`Delivery`] hands to the delegate, serially and in order.
//!
//! Both queues are pushed under the engine's one lock, so their order is the order the
//! transitions happened in, whichever threads raced to cause them: a resume's `Start` can never
//! be carried out after a concurrent cancel's `Abort`. The [`Ledger`] says what the session
//! holds.
//!
//! Everything that synchronizes goes through `sync`, which is `std::sync` or, under
//! `RUSTFLAGS="--cfg loom"`, loom's: `tests/loom.rs` explores the races between the user, the
//! driver and the delivery. This crate's whole dependency graph is free of tokio and hyper so
//! that the loom build works.
//!
//! ## Rules and the code that enforces them
//!
//! | rule | where |
//! |---|---|
//! | R1 | `Engine::complete` is the only way out of a cell, and removes it; every input on a missing cell is a no-op |
//! | R2 | `Engine::invalidate_if_done` queues `BecomeInvalid` behind every `Complete`; `Engine::invalidate_and_cancel` completes tasks first |
//! | R3 | [`Delivery`] drops the delegate right after delivering `BecomeInvalid`, or in its own `Drop` |
//! | R4 | `Engine::invalidate_if_done` closes the pool; [`Core::poll_action`] ends only when released |
//! | R5 | `Engine::complete` aborts the IO (closing its connection), removes temp files, drops a pipe's bytes and, unless the IO ended the task itself, the body its delegate was not handed; `Engine::body_end` and `Engine::hop` (a followed redirect's connection) pool only read-whole, reusable connections; `Engine::begin` never gives a stream or websocket a pooled connection |
//! | R6 | `Engine::intake` (`engine/pipe.rs`) gives a stream's IO no more than its room and nothing while full; `Engine::stream_data` takes no more; a websocket's IO reads one message at a time; `Engine::body_room` gives a data task's IO no more than its delegate's window has room for, and `Engine::data_delivered` (the delivery's acknowledgement) opens it again |
//! | R7 | `Engine::suspend` pauses reading and disarms both timers; `Engine::intake` gives a suspended task nothing |
//! | R8 | `Engine::create_task` refuses before allocating |
//! | R9 | `Config::shared` makes the invalidation inputs no-ops; `Core::idle_expired` |
//! | R10 | `Drop for SessionHandle` and `Drop for TaskHandle`; `Engine::task_handle_dropped` also cancels a stream and closes a websocket nobody holds |
//! | R11 | `Engine::cancel_with` (`engine/pipe.rs`) arms `Timeout::Close`; `Engine::timer_fired` completes the task at the deadline, `Engine::ws_peer_closed` on the peer's answer; either way `Action::Abort` closes the socket |
//! | R12 | `Engine::timer_fired` (stale generations ignored) and `Engine::failed`; `Engine::body_data` disarms the request timeout while the IO waits for the delegate, `Engine::data_delivered` arms it again; `Engine::defer` disarms it while the delegate's answer is pending, `Engine::answered` arms it again; `Engine::hop` arms it afresh for each redirect's exchange, the resource timeout spanning them all |

mod engine;
mod error;
mod session;
mod sync;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

pub use engine::{
    Config, GOING_AWAY, NO_STATUS, SessionKind, SessionState, TaskState, close_code_allowed,
};
pub use error::{Error, Operation, Timeout, TlsFailure};
pub use session::{Core, Delivered, Delivery, Receipt, SessionHandle, TaskHandle, session};

/// A task of one session, numbered from 0 in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

/// A connection of one session, numbered from 1 in opening order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// One arming of one timer. A fire whose generation is no longer armed is stale and ignored,
/// so a driver need not win the race between a timer firing and its disarming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId {
    pub task: TaskId,
    pub timeout: Timeout,
    pub generation: u64,
}

/// The kinds of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    Data,
    Download,
    Upload,
    /// A raw TCP stream, or a data task's response turned into one ([`Disposition::BecomeStream`]).
    /// Its user reads from a bounded read-ahead queue (R6) and writes to a bounded outbox.
    Stream,
    WebSocket,
}

/// Its name in a sentence: `data`, `download`, `upload`, `stream`, `websocket`.
impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskKind::Data => "data",
            TaskKind::Download => "download",
            TaskKind::Upload => "upload",
            TaskKind::Stream => "stream",
            TaskKind::WebSocket => "websocket",
        })
    }
}

/// A websocket message, as the user sends and receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
}

impl Message {
    /// Its payload's length in bytes: what it counts for in the ledger and the write buffer.
    pub fn len(&self) -> usize {
        match self {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a stream's or websocket's IO must write next, in the order the user asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Stream bytes.
    Bytes(Bytes),
    /// The stream's `close_write`: shut the socket's write half down (a FIN).
    Shutdown,
    /// A websocket message.
    Message(Message),
    /// A websocket ping; its pong is reported with [`Core::ws_pong`].
    Ping,
    /// The websocket close frame we begin the handshake with (R11).
    Close { code: u16, reason: String },
}

/// What a stream's or websocket's IO may read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Read at most this many bytes (a stream's room, R6), or one message (a websocket with an
    /// empty inbox; the count is then the message size limit's business, not the engine's).
    Read(usize),
    /// A closing websocket: read and drop messages until the peer's close frame (R11).
    Discard,
}

/// The delegate's answer to `did_receive_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    Allow,
    Cancel,
    /// Only for data tasks; any other kind completes with [`Error::InvalidDisposition`].
    BecomeDownload,
    /// Only for data tasks: the body, from its first unread byte, is read through a stream
    /// whose handle the delegate gets in [`Callback::BecomeStream`].
    BecomeStream,
}

/// The delegate's answer to a redirect (`will_perform_redirection`).
// Unboxed, for the delegate's sake (`Redirect::Follow(request)`): one is made per redirect.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Redirect {
    /// Send this request next: the one proposed, or one the delegate changed.
    Follow(http::Request<()>),
    /// Do not follow: the redirect's own response is the task's response, its body the body.
    Refuse,
}

/// What the delegate answered a callback with, as the delivery hands it back to the engine.
#[allow(clippy::large_enum_variant)] // one per callback, handed straight to the engine
#[derive(Debug)]
pub enum Answer {
    /// The default answer (allow a response, follow a redirect), or none due.
    Default,
    /// For `ReceiveResponse`.
    Disposition(Disposition),
    /// For `WillRedirect`.
    Redirect(Redirect),
    /// The answer comes later, through [`Core::answer`]: the task reads nothing meanwhile,
    /// and its request timeout does not run (the resource timeout does).
    Later,
    /// There will be no answer: the task is cancelled, if it still waits for one.
    Cancel,
}

impl From<Disposition> for Answer {
    fn from(disposition: Disposition) -> Self {
        Answer::Disposition(disposition)
    }
}

impl From<Redirect> for Answer {
    fn from(redirect: Redirect) -> Self {
        Answer::Redirect(redirect)
    }
}

/// A closure's `None` is the default; `Some` a disposition.
impl From<Option<Disposition>> for Answer {
    fn from(answer: Option<Disposition>) -> Self {
        answer.map_or(Answer::Default, Answer::Disposition)
    }
}

/// What the driver must do, in queue order.
///
/// The task's IO runs concurrently with the driver, so an action addressed to a task's IO
/// (`Pause`, `Unpause`, `ReadBody`, `Abort`) can arrive after that IO has ended by itself (it
/// read an error, or the end, and told the engine): such an action is moot and the driver
/// drops it. The suite found this when a plain session's responses were allowed by queueing
/// `ReadBody`, and the IO read a reset before the driver took it; [`Proceed`] now tells the IO
/// directly, but the other actions can still arrive late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the task's request on `conn`: the pooled connection `conn` if `reused`, else a new
    /// connection the driver opens now.
    Start {
        task: TaskId,
        conn: ConnId,
        reused: bool,
    },
    /// Stop reading for the task (R7).
    Pause { task: TaskId },
    /// Read again.
    Unpause { task: TaskId },
    /// The response was allowed: read the body, into the file `into` for a download.
    ReadBody { task: TaskId, into: Option<PathBuf> },
    /// The response became a stream: read the body through the stream's window, with
    /// [`Core::poll_intake`] and [`Core::stream_data`] (R6).
    ReadStream { task: TaskId },
    /// Tear the task's IO down; the connection it holds (or has parked, see
    /// [`Core::body_end`]) is closed, not pooled (R5). For a task whose IO never started,
    /// drop the job it would have started.
    Abort { task: TaskId, conn: Option<ConnId> },
    /// Close an idle connection (the session's pool is closing, R4).
    Close { conn: ConnId },
    /// Start `timer`; when it fires, report it with [`Core::timer_fired`]. Replaces the
    /// task's previous timer of the same kind.
    ArmTimer { timer: TimerId, after: Duration },
    /// Stop `timer`.
    DisarmTimer { timer: TimerId },
    /// Remove a download's temp file (missing is fine: the delegate may have moved it).
    RemoveTempFile { task: TaskId, path: PathBuf },
}

/// Who hears about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// The session's delegate hears its callbacks; the driver runs its IO.
    Delegate,
    /// Its handler (an awaiting future, say) runs its IO and learns everything itself: no
    /// callback is queued, every response is allowed, a finished download's file is handed
    /// to it, and its outcome is kept for [`Core::take_outcome`]. It keeps the task's clock
    /// too: its timers count in the ledger, but no `ArmTimer`/`DisarmTimer` is queued for
    /// them; the handler reports a timeout with [`Core::handler_timed_out`].
    Handler,
}

/// Where a handler-routed task's exchange starts (see [`TaskHandle::resume_inline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The connection: pooled if `reused`, else one to open now.
    pub conn: ConnId,
    pub reused: bool,
}

/// What the IO does after reporting the response head.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Proceed {
    /// Read the body now, into the file `into` for a download.
    Read { into: Option<PathBuf> },
    /// Wait: the delegate decides, and the driver gets [`Action::ReadBody`] or
    /// [`Action::Abort`].
    Wait,
    /// The task is over; drop the exchange.
    Stop,
}

/// What the IO that read a body to its end must do with its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Release {
    /// Keep it alive in the session's pool.
    Pool,
    /// Close it.
    Close,
}

/// What the delegate hears, in queue order.
#[derive(Debug)]
pub enum Callback {
    /// A redirect's head arrived; `request` would follow it. The delegate answers with a
    /// [`Redirect`] ([`Answer::Redirect`]), the default being to follow `request`.
    WillRedirect {
        task: TaskId,
        response: http::Response<()>,
        /// Boxed: every callback in the queue is as large as the largest.
        request: Box<http::Request<()>>,
    },
    ReceiveResponse {
        task: TaskId,
        response: http::Response<()>,
    },
    ReceiveData {
        task: TaskId,
        data: Bytes,
    },
    BecomeDownload {
        task: TaskId,
    },
    /// The file at `location` is the delegate's until the callback returns; then it is removed
    /// unless the delegate moved it.
    FinishDownloading {
        task: TaskId,
        location: PathBuf,
    },
    /// The data task is a stream now. `stream` is its new handle, the delegate's to keep:
    /// always `Some` when the delegate gets it (the delivery makes it). A stream whose every
    /// handle is dropped is cancelled.
    BecomeStream {
        task: TaskId,
        stream: Option<TaskHandle>,
    },
    /// The websocket's upgrade was accepted.
    Open {
        task: TaskId,
        protocol: Option<String>,
    },
    /// The websocket's close handshake is done: the peer's close frame arrived.
    Close {
        task: TaskId,
        code: u16,
        reason: String,
    },
    Complete {
        task: TaskId,
        result: Result<(), Error>,
    },
    BecomeInvalid,
}

impl Callback {
    /// The task the callback is about; `None` for `BecomeInvalid`.
    pub fn task(&self) -> Option<TaskId> {
        match self {
            Callback::WillRedirect { task, .. }
            | Callback::ReceiveResponse { task, .. }
            | Callback::ReceiveData { task, .. }
            | Callback::BecomeDownload { task }
            | Callback::FinishDownloading { task, .. }
            | Callback::BecomeStream { task, .. }
            | Callback::Open { task, .. }
            | Callback::Close { task, .. }
            | Callback::Complete { task, .. } => Some(*task),
            Callback::BecomeInvalid => None,
        }
    }
}

/// What a session holds, by its own account. The suite never trusts it alone: witnesses
/// outside the implementation confirm every release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ledger {
    /// Connections held by tasks.
    pub open_connections: u32,
    /// Connections in the pool.
    pub idle_connections: u32,
    /// Bytes read and held for the user: body bytes queued for the delegate (at most its
    /// window, R6), streams' read-ahead, websockets' received messages (R6).
    pub buffered_bytes: u64,
    /// The most `buffered_bytes` has ever been.
    pub peak_buffered_bytes: u64,
    /// Tasks not completed.
    pub live_tasks: u32,
    /// Armed timers.
    pub timers: u32,
    /// Download files not yet removed.
    pub temp_files: u32,
    /// Bytes the user wrote to streams and websockets that their IO has not taken yet.
    pub outgoing_bytes: u64,
    pub delegate_held: bool,
    /// Actions the driver has not taken yet.
    pub pending_actions: u32,
    /// Callbacks not delivered yet.
    pub pending_callbacks: u32,
    /// TLS sessions cached for resumption (tickets and TLS 1.2 sessions). The engine knows
    /// nothing of TLS and leaves it 0: the client fills it in from its session's store.
    pub tls_sessions: u32,
    /// Bytes of responses the session's cache holds (bodies and headers). The engine knows
    /// nothing of the cache and leaves it 0: the client fills it in.
    pub cached_bytes: u64,
    /// Responses the session's cache holds; the client's to fill in too.
    pub cached_responses: u32,
}

impl Ledger {
    /// Nothing held and nothing pending (the peak is history, not a holding).
    pub fn is_zero(&self) -> bool {
        Ledger {
            peak_buffered_bytes: 0,
            ..*self
        } == Ledger::default()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
