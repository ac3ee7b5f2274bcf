//! The alphabet of the specification: the ops a sequence is made of, and the callbacks a
//! delegate hears.

use std::fmt;

/// A session, named by the sequence that creates it (`s0`, `s1`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u32);

/// A task, named by the sequence that creates it (`t0`, `t1`, ...). Ids are global across
/// sessions so a sequence can name a task without its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u32);

/// One of the server's cacheable resources (`r0`, `r1`, `r2`): a `200` of [`CACHED_BODY`]
/// bytes that may be kept for a minute (`Cache-Control: max-age`), served whole at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(pub u8);

/// The body of a cacheable resource, in bytes.
pub const CACHED_BODY: u64 = 1000;

/// How many cacheable responses a session's cache holds (the suite's sessions are configured
/// so): keeping one more evicts the least recently used.
pub const CACHE_ENTRIES: usize = 2;

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// How a session is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// `Session::new(config, None)`: no delegate, so no callbacks; every response is allowed.
    Plain,
    /// `Session::new(config, Some(delegate))`: the delegate hears every callback.
    Delegated,
    /// `Session::shared()`: no delegate, and it ignores invalidation (R9).
    Shared,
}

/// The kinds of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// The body is delivered to the delegate as `did_receive_data`.
    Data,
    /// The body is written to a temp file, handed over by `did_finish_downloading`, then removed.
    Download,
    /// A request body is sent; the response is handled as a data task's.
    Upload,
    /// A byte stream: a raw TCP connection (`stream_task(host, port)`), or a data task's
    /// response turned into one (`Disposition::BecomeStream`). What it reads waits in a bounded
    /// read-ahead queue for the user's `read` (R6).
    Stream,
    /// A websocket: an upgrade request, then messages both ways, then a close handshake bounded
    /// by the close timeout (R11).
    WebSocket,
}

/// How the user holds a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// A task object (`data_task(request)` and the like): it starts suspended; the user
    /// resumes, suspends, cancels and drops it; the session's delegate, if any, hears it.
    Handle,
    /// A convenience future (`session.data(request).await`, `download`, `upload`): it runs
    /// from its first poll, its timeouts count from that poll (a wait for a connection slot
    /// included), no delegate hears it and every response is allowed, dropping the future
    /// cancels the task, and its result is what the future returns. The future holds a clone
    /// of the session, so a session whose user let go is finished (R10) when the last of its
    /// futures returns.
    Future,
}

/// The delegate's answer to `did_receive_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Go on and read the body.
    Allow,
    /// Cancel the task: `did_complete(cancelled)`.
    Cancel,
    /// Turn a data task into a download task (`did_become_download`); any other kind of task
    /// completes with `InvalidDisposition`.
    BecomeDownload,
    /// Turn a data task into a stream task (`did_become_stream`): the body, from its first
    /// unread byte, is read through the stream's window. Any other kind of task completes with
    /// `InvalidDisposition`.
    BecomeStream,
}

/// The delegate's answer to `will_perform_redirection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Redirect {
    /// Follow it: the request goes to the new location, on the connection the redirect came
    /// on (pooled, then taken again in turn), as a new exchange.
    Follow,
    /// Refuse it: the redirect, a complete response with no body, is the task's response.
    Refuse,
}

/// How many redirects a task of the suite's sessions follows (`max_redirects`); the next one
/// fails it with [`Outcome::TooManyRedirects`].
pub const MAX_REDIRECTS: u32 = 2;

/// The two timeouts of a task (R12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Idle time between bytes while a response is awaited or read.
    Request,
    /// The whole task, from resume to completion.
    Resource,
    /// A websocket close handshake we began: the peer's answering close frame is awaited at
    /// most this long (R11).
    Close,
}

/// How the server can break an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The TCP connection is reset (or closed without a response).
    Reset,
    /// The bytes are not HTTP: a bad status line or chunk size.
    Malformed,
}

/// What the peer's websocket close frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseFrame {
    /// A code a close frame may carry: `did_close` with it, then success.
    Code,
    /// No payload, so no code: `did_close(1005)` (RFC 6455, 7.1.5), then success.
    NoCode,
    /// A code no close frame may carry (below 1000, 1005 or 1006 on the wire, an unassigned
    /// one, RFC 6455 7.4): the peer broke the protocol. No `did_close`; the task completes
    /// [`Outcome::Malformed`].
    InvalidCode,
}

/// One step of a sequence: something the user does, or something the server or the clock does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    // The user's ops on sessions.
    /// Create a session. `per_host` is its `max_connections_per_host`: at most that many
    /// connections for HTTP exchanges to its host, busy or pooled, and more resumed tasks
    /// wait for one (`None`: no limit). Streams and websocket take none of them.
    CreateSession {
        session: SessionId,
        kind: SessionKind,
        per_host: Option<u32>,
    },
    /// `finish_tasks_and_invalidate`: no new tasks; invalidate once running ones complete.
    FinishTasksAndInvalidate(SessionId),
    /// `invalidate_and_cancel`: cancel every task, then invalidate.
    InvalidateAndCancel(SessionId),
    /// Drop the last `Session` handle (R10).
    DropSession(SessionId),
    /// `session.reset()`: empty the response cache and close the idle connections; the
    /// session goes on.
    Reset(SessionId),

    // The user's ops on tasks.
    /// Create a task (`Suspended`), or be refused with `SessionInvalidated` (R8).
    CreateTask {
        session: SessionId,
        task: TaskId,
        kind: TaskKind,
    },
    /// Start a convenience (`session.data(request)`, `download`, `upload`; `kind` is one of
    /// the three) and keep polling it: a `Running` task whose handle is the future
    /// ([`Route::Future`]), or refused with `SessionInvalidated` (R8) by its first poll.
    /// `DropTask` drops the future.
    Await {
        session: SessionId,
        task: TaskId,
        kind: TaskKind,
    },
    /// `session.data(request).await` of a cacheable resource (a convenience, as
    /// [`Op::Await`]): answered from the session's cache if it holds the resource, with no
    /// request sent (the connection slot it took goes back unused); else the server answers
    /// whole at once, and the response is kept.
    Fetch {
        session: SessionId,
        task: TaskId,
        resource: ResourceId,
    },
    /// Run the task; the first resume sends the request.
    Resume(TaskId),
    /// Stop reading; timers stop too (R7).
    Suspend(TaskId),
    /// Cancel the task.
    Cancel(TaskId),
    /// Drop the task's handles; a `Suspended` task can then never run, so it is cancelled
    /// (R10). A stream nobody can read is cancelled too; an open websocket nobody can use is
    /// closed (`going away`, bounded by R11).
    DropTask(TaskId),

    // The user's ops on stream tasks.
    /// `read(0, window, 0)`: take every byte the stream holds, or see the end of the stream.
    Read(TaskId),
    /// `write` a few bytes.
    Write(TaskId),
    /// `close_read`: no more reading; what the stream holds is dropped.
    CloseRead(TaskId),
    /// `close_write`: send the end of the stream (a FIN).
    CloseWrite(TaskId),

    // The user's ops on websocket tasks.
    /// A `receive` that does not wait: take the message the task holds, if any.
    Receive(TaskId),
    /// `cancel_with(going away)`: begin the close handshake.
    CloseWith(TaskId),

    // The environment: the server and the clock.
    /// The server sends the response head; the delegate will answer `answer`.
    ServerHeaders { task: TaskId, answer: Disposition },
    /// The server answers with a redirect to another resource of its own (a `307` with no
    /// body, kept alive); the delegate will answer `answer` to `will_perform_redirection`.
    /// Without a delegate (or for a convenience) it is followed. One more than
    /// [`MAX_REDIRECTS`] fails the task.
    ServerRedirects { task: TaskId, answer: Redirect },
    /// The server sends `bytes` bytes of body; on a stream, `bytes` raw bytes; on a websocket,
    /// one message of `bytes` bytes.
    ServerSends { task: TaskId, bytes: u32 },
    /// The server ends the body; `reusable` says whether the connection may be kept alive.
    ServerEnds { task: TaskId, reusable: bool },
    /// The server breaks the exchange.
    ServerFails { task: TaskId, fault: Fault },
    /// The server answers a websocket's upgrade request: `101 Switching Protocols` if
    /// `accept`, else a plain response.
    ServerAnswersUpgrade { task: TaskId, accept: bool },
    /// The peer sends a websocket close frame carrying `frame` (first, or answering ours).
    PeerCloses { task: TaskId, frame: CloseFrame },
    /// The server stalls until `timer` fires for the task.
    TimePasses { task: TaskId, timer: Timer },
    /// The pool's idle timeout passes for the session's idle connections (R9).
    IdleTimeoutPasses(SessionId),
    /// The session's delegate becomes slow: the next callback it hears other than
    /// `did_receive_data` does not return until [`Op::DelegateReturns`]. Meanwhile the
    /// session's other callbacks wait in its queue, and a data task whose delegate is a window
    /// behind stops reading (R6).
    DelegateBlocks(SessionId),
    /// The slow delegate returns from the callback it is in (if any) and keeps up again.
    DelegateReturns(SessionId),
    /// The session's delegate will answer its next question later: the next
    /// `did_receive_response` it returns from keeps a responder (`did_receive_response_with`)
    /// instead of answering. The task reads nothing until [`Op::Answer`] or
    /// [`Op::DropResponder`], its request timer stops (its resource timer runs on), and the
    /// session's other callbacks go on meanwhile.
    DelegateDefers(SessionId),

    // The delegate's ops on a responder it kept.
    /// The delegate answers through the task's responder, with the answer the server op that
    /// sent the head named; a no-op for a task that no longer waits for it.
    Answer(TaskId),
    /// The delegate drops the task's responder unanswered: a task still waiting for the answer
    /// is cancelled.
    DropResponder(TaskId),

    // Concurrency.
    /// Two user ops of one session at once, from two threads: the outcome must be one of the
    /// two serial orders ([`crate::Model::linearizations`]). Each is a session op or a task
    /// object's `create`, `resume`, `suspend`, `cancel` or `drop`, at most one of them a
    /// creation, and each must be allowed whichever runs first.
    Par(Box<Op>, Box<Op>),
}

impl Op {
    /// The task this op is about, if any.
    pub fn task(&self) -> Option<TaskId> {
        match *self {
            Op::CreateTask { task, .. }
            | Op::Await { task, .. }
            | Op::Fetch { task, .. }
            | Op::Resume(task)
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
            | Op::ServerAnswersUpgrade { task, .. }
            | Op::PeerCloses { task, .. }
            | Op::ServerHeaders { task, .. }
            | Op::ServerRedirects { task, .. }
            | Op::ServerSends { task, .. }
            | Op::ServerEnds { task, .. }
            | Op::ServerFails { task, .. }
            | Op::TimePasses { task, .. } => Some(task),
            Op::CreateSession { .. }
            | Op::FinishTasksAndInvalidate(_)
            | Op::InvalidateAndCancel(_)
            | Op::DropSession(_)
            | Op::Reset(_)
            | Op::IdleTimeoutPasses(_)
            | Op::DelegateBlocks(_)
            | Op::DelegateReturns(_)
            | Op::DelegateDefers(_)
            | Op::Par(..) => None,
        }
    }

    /// Whether the op may be one of the two of an [`Op::Par`]: a user op of a session or a
    /// task object that returns nothing but a refusal.
    pub fn may_run_in_parallel(&self) -> bool {
        matches!(
            self,
            Op::FinishTasksAndInvalidate(_)
                | Op::InvalidateAndCancel(_)
                | Op::DropSession(_)
                | Op::CreateTask { .. }
                | Op::Resume(_)
                | Op::Suspend(_)
                | Op::Cancel(_)
                | Op::DropTask(_)
        )
    }

    /// Whether the op comes from the environment (server or clock) rather than the user.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            Op::ServerHeaders { .. }
                | Op::ServerRedirects { .. }
                | Op::ServerSends { .. }
                | Op::ServerEnds { .. }
                | Op::ServerFails { .. }
                | Op::ServerAnswersUpgrade { .. }
                | Op::PeerCloses { .. }
                | Op::TimePasses { .. }
                | Op::IdleTimeoutPasses(_)
                | Op::DelegateBlocks(_)
                | Op::DelegateReturns(_)
                | Op::DelegateDefers(_)
        )
    }
}

/// How a task ended: the argument of `did_complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Cancelled,
    TimedOut(Timer),
    Reset,
    /// The server's bytes broke HTTP, or the peer broke the websocket protocol.
    Malformed,
    InvalidDisposition,
    /// A websocket's upgrade request got a plain response.
    NoUpgrade,
    /// A redirect came after [`MAX_REDIRECTS`] were followed.
    TooManyRedirects,
}

/// What a delegate hears. Callbacks of one session are delivered serially, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Callback {
    ReceiveResponse {
        task: TaskId,
    },
    /// `will_perform_redirection`: a redirect's head arrived; the delegate decides.
    WillRedirect {
        task: TaskId,
    },
    /// `bytes` bytes of body. Consecutive ones for a task may be split or merged by the
    /// transport; compare traces with [`crate::rules::coalesce`].
    ReceiveData {
        task: TaskId,
        bytes: u64,
    },
    BecomeDownload {
        task: TaskId,
    },
    FinishDownloading {
        task: TaskId,
    },
    /// The data task is a stream task now; the delegate is handed its handle.
    BecomeStream {
        task: TaskId,
    },
    /// The websocket's upgrade was accepted.
    Open {
        task: TaskId,
    },
    /// The websocket's close handshake completed: the peer's close frame arrived.
    Close {
        task: TaskId,
    },
    Complete {
        task: TaskId,
        outcome: Outcome,
    },
    BecomeInvalid {
        session: SessionId,
    },
}

impl Callback {
    /// The task the callback is about; `None` for `BecomeInvalid`.
    pub fn task(&self) -> Option<TaskId> {
        match *self {
            Callback::ReceiveResponse { task }
            | Callback::WillRedirect { task }
            | Callback::ReceiveData { task, .. }
            | Callback::BecomeDownload { task }
            | Callback::FinishDownloading { task }
            | Callback::BecomeStream { task }
            | Callback::Open { task }
            | Callback::Close { task }
            | Callback::Complete { task, .. } => Some(task),
            Callback::BecomeInvalid { .. } => None,
        }
    }
}

/// Why the model refuses an op that was allowed to be tried: the error the user gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// R8: a task was created after invalidation began.
    SessionInvalidated,
    /// A read on a stream whose read half is closed (`close_read`, or the end already read).
    ReadClosed,
    /// A write on a stream whose write half is closed (`close_write`, or a response's stream,
    /// which cannot be written).
    WriteClosed,
    /// A stream or websocket op on a task that is completed, or closing.
    Closed,
}

/// What a user op on a stream or websocket returned, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Returned {
    /// `read` took this many bytes (0: none were there yet).
    Read(u64),
    /// `read` saw the end of the stream.
    Eof,
    /// `receive` took a message of this many bytes, or found none yet.
    Received(Option<u64>),
}
