//! # leakproof-model: the lifecycle specification
//!
//! This crate is the specification of leakproof's session and task lifecycles, written as a
//! pure, deterministic state machine. It has no dependencies and does no IO. The engine
//! (`leakproof-core`) and the client (`leakproof`) are checked against it op by op: for every op
//! of a sequence, [`Model::apply`] says what the delegates must hear ([`Step::callbacks`]),
//! whether the op is refused ([`Step::refused`]), and [`Model::resources`] says what each
//! session may hold afterwards.
//!
//! ## The lifecycle in one page
//!
//! A **session** starts `Active`. `finish_tasks_and_invalidate` (or dropping its last handle,
//! R10) makes it `Finishing`: no new tasks, running ones go on. `invalidate_and_cancel` makes it
//! `Cancelling`: every task is cancelled. Once a finishing or cancelling session has no live
//! task it is `Invalidated`: its delegate hears `did_become_invalid` and is dropped, its pooled
//! connections are closed, and it holds nothing ([`SessionState`]).
//!
//! A **task** starts `Suspended`. `resume` runs it: the first resume takes a pooled connection
//! or opens one and sends the request. `suspend` stops it reading and stops its timers.
//! `cancel`, a `Cancel` disposition, an error, a timeout, or the end of the body completes it:
//! exactly one `did_complete`, then nothing more about it ([`TaskState`]).
//!
//! The **environment** is part of the alphabet ([`Op`]): the server sends a head, body bytes,
//! an end, or breaks the exchange; time passes until a timer fires. A suspended task does not
//! read, so what the server sends meanwhile waits in the network and is read on resume.
//!
//! A **stream** task ([`TaskKind::Stream`]) is a raw TCP connection, or a data task whose
//! delegate answered [`Disposition::BecomeStream`]. What it reads waits in a read-ahead queue
//! of at most [`Model::read_ahead`] bytes for the user's `read`; past that it reads nothing and
//! the rest waits in the network (R6). `close_read` drops the queue; the stream completes once
//! both halves are closed (a response's stream has no write half). Its connection is never
//! pooled.
//!
//! A **websocket** task ([`TaskKind::WebSocket`]) sends its upgrade request on resume. An
//! accepted upgrade is `did_open`; a refused one completes it with [`Outcome::NoUpgrade`] and
//! no `did_open`. It holds at most one received message; the next ones, and the peer's close,
//! wait behind it. `cancel_with` begins the close handshake: the task is `Canceling`, drops
//! what it held and what still arrives, and completes when the peer's close frame arrives
//! (`did_close`, then success) or when [`Timer::Close`] fires (timed out): never later (R11).
//! The peer's close frame, first or answering ours, carries a code, none (`did_close` all the
//! same: the client reports 1005), or a code no close frame may carry ([`CloseFrame`]): that
//! is the peer breaking the protocol, so no `did_close`, and the task completes
//! [`Outcome::Malformed`].
//!
//! ## Choices the rules leave open, and what this model decides
//!
//! - The delegate answers `did_receive_response` synchronously, so the answer travels with the
//!   server's head ([`Op::ServerHeaders`]).
//! - Dropping the handle of a `Suspended` task cancels it at once, whatever the session's
//!   state: nothing can resume it any more, so waiting would only hold its session open. R10's
//!   "cancelled then" (at the session's last handle) follows.
//! - A session without a delegate hears nothing and allows every response.
//! - A `BecomeDownload` answer to anything but a data task completes it with
//!   [`Outcome::InvalidDisposition`]: a typed error, not a panic.
//! - Suspending stops both timers; resuming re-arms them in full (R7).
//! - Only HTTP exchanges are timed by the request and resource timeouts: a connected stream
//!   and an open websocket wait on their user. A websocket's handshake is timed; its close is
//!   timed by [`Timer::Close`].
//! - A stream nobody holds a handle to is cancelled (nothing could read it); an open websocket
//!   nobody holds is closed with `going away`, within the close timeout.
//! - The suite's delegates keep the handle `did_become_stream` gives them exactly while the
//!   user holds the data task's handle; a stream nobody keeps is cancelled at once.
//! - A stream's read and a websocket's receive in the alphabet do not wait: `read(0, window,
//!   0)` takes everything held ([`Returned::Read`], [`Returned::Eof`]), `receive` takes the
//!   held message if there is one ([`Returned::Received`]). Ops on a completed or closing task
//!   fail at once ([`Refusal::Closed`]).
//! - A session's `per_host` ([`Op::CreateSession`]) bounds its HTTP exchanges' connections,
//!   busy and pooled: a resumed data, download or upload task takes a pooled connection, else
//!   a new one within the bound, else waits its turn ([`Exchange::AwaitingConnection`]) with
//!   its timers running; suspending it gives up its place. A stream, a websocket and a
//!   response made a stream have connections of their own, outside the bound.
//! - A convenience ([`Op::Await`], [`Route::Future`]) is a data, download or upload task that
//!   runs from its future's first poll: no delegate hears it, every response is allowed, its
//!   timeouts count from that poll, and its result is the future's output
//!   ([`Step::awaited`]). The user cannot resume, suspend or cancel it; dropping the future
//!   cancels it. The future holds a clone of the session, so dropping the user's last handle
//!   finishes the session (R10) only once its last convenience has returned.
//! - The delegate's pace is the environment's ([`Op::DelegateBlocks`], [`Pace`]): a slow
//!   delegate stays in its next callback other than `did_receive_data` until released, and
//!   the session's other callbacks wait in its queue. A data or upload task's body goes to
//!   its delegate through a window as large as a stream's read-ahead: while the bytes said
//!   and not returned from fill it, the task reads nothing more and its request timer stops
//!   (the IO waits on the delegate, not the network). A task cancelled or timed out drops
//!   the body bytes still queued for it, so its `did_complete` is not behind them (R5); one
//!   that failed in the network has its bytes delivered first. A response head's answer,
//!   and a finished download's file going, take effect when the delegate returns
//!   ([`Exchange::AwaitingDisposition`]); R4 holds of an invalidated session once
//!   `did_become_invalid` has returned.
//! - Two user ops at once ([`Op::Par`]: session ops and task objects' create, resume,
//!   suspend, cancel and drop, of one session, each allowed in either order) must have the
//!   outcome of one of their two serial orders ([`Model::linearizations`]): the checks run
//!   against both, and the model goes on from the one the system showed. A pair where
//!   either op would admit a waiting fetch is not offered: the server answers a fetch whole
//!   as it is admitted, which puts that answer between the two ops in both orders.
//! - A redirect ([`Op::ServerRedirects`]) is a complete `307` with no body, kept alive, to
//!   another resource of the same server. The delegate decides
//!   ([`Callback::WillRedirect`], [`Exchange::AwaitingRedirect`]; a convenience and a task
//!   without a delegate follow). Followed, its connection goes back to the pool and the task
//!   begins again, waiting its turn for a connection like a resumed one; refused, the
//!   redirect is the response, heard with `did_receive_response`. A task that followed
//!   [`MAX_REDIRECTS`] fails at the next ([`Outcome::TooManyRedirects`]) and closes the
//!   connection.
//! - A session's response cache is a resource of its own ([`Resources::cached_responses`]):
//!   a fetch of a cacheable resource ([`Op::Fetch`], a convenience) is answered from it if it
//!   holds the resource, and the connection slot the fetch took goes back unused; else the
//!   server answers whole and the response is kept, the least recently used evicted past
//!   [`CACHE_ENTRIES`]. [`Op::Reset`] empties it and closes the idle connections; R4 holds
//!   of it at invalidation; the shared session's stays, bounded (R9).
//! - The delegate may answer later ([`Op::DelegateDefers`]): it keeps the responder its next
//!   question hands it ([`Task::responder`]), the task reads nothing and its request timer
//!   stops ([`Task::deferred`]) while the session's other callbacks go on, until
//!   [`Op::Answer`], or [`Op::DropResponder`], which cancels the task if it still waits.
//! - As a slow delegate returns ([`Op::DelegateReturns`]) or answers late ([`Op::Answer`]),
//!   the task it lets read reads what already waits in the network (and a fetch it lets into
//!   a connection slot is answered) either at once or once the session's queued callbacks
//!   have taken effect: both orders are outcomes
//!   ([`Model::linearizations`]). A client's IO runs beside its delivery of callbacks, so
//!   the next callback (a cancel freeing a slot, a stream let go of) may act first. Only
//!   which connection a waiting task gets, or which ending a task has, differs.
//! - A peer's close completes the websocket at once, once read; a message not yet received
//!   goes with the task (R5), and `receive` then fails.
//!
//! ## Promises, and what each means at its moment
//!
//! The model's steps say *what* is released; a promise says *when*. Each promise below is
//! made at one moment the user can see, and at that moment, not later, the world must
//! already show what it says. The suite's simulated world checks each one there, with
//! witnesses the client does not keep (the network's count of the client's open ends, the
//! download directory, a `Weak` to the delegate), before the runtime runs again.
//!
//! | promise | the moment | what is true then |
//! |---|---|---|
//! | `did_complete(task, result)` | as the delegate is handed it | the task is `Completed`; its download file, if it had one, is gone (R5); unless the task succeeded and its connection went back to the pool, that connection is closed on the client's side (R5: a failed, cancelled or timed-out task's, a stream's, a websocket's); nothing more about the task follows (R1) |
//! | `did_become_invalid()` | as the delegate is handed it | every `did_complete` of the session came before it (R2); once it returns, the delegate is dropped (R3) |
//! | `invalidated()` resolves | as the future returns `Ready` | the session is `Invalidated` and holds nothing (R4): no client end of its connections is open, no file of its is left, its delegate's `Weak` is dead (R3), no future of the session still runs |
//! | a convenience's future returns | as `poll` returns `Ready` | its task is `Completed` (R5): what it held is released, and its result is the task's one outcome (R1) |
//! | a task handle's `Drop` returns | as `drop` returns | a task that was `Suspended` is `Completed`, cancelled (R10), before anything else runs; a running task runs on (R10), except a stream nobody can read, which is cancelled |
//! | the ledger, `resources()` | after every op, once nothing can move | the ledger equals what the witnesses see: the clocks hold exactly the timers it counts (R7, R12), and bytes it no longer counts are gone from the heap once their connection is closed (R6) |
//!
//! ## Rules and the code that encodes them
//!
//! | rule | what it says | where the model encodes it |
//! |---|---|---|
//! | R1 | one `did_complete` per task, nothing after | `Model::complete` is the only way to `Completed`, and the one place a convenience's result is given ([`Step::awaited`]); every op on a completed task is a no-op (`Model::network`, `Model::resume`); checked on traces by [`rules::check_trace`]; under concurrent user ops, against either serial order ([`Model::linearizations`]) |
//! | R2 | `did_become_invalid` once, after every `did_complete` | `Model::invalidate_if_done`, reached only from `complete` and the invalidation ops; `Model::invalidate_and_cancel` completes tasks first; [`rules::check_trace`] |
//! | R3 | the delegate is dropped right after `did_become_invalid` | [`Model::resources`]: `delegate_held` is false from `Invalidated` on |
//! | R4 | nothing held at `Invalidated` | `Model::invalidate_if_done` empties the pool; [`rules::check_model`] checks the zero ledger |
//! | R5 | a completed task holds nothing; its connection is pooled only if read whole and reusable | `Model::complete` and `Model::complete_success`; streams and websockets never pool theirs (`Model::resume`) |
//! | R6 | a stream holds at most its read-ahead and reads nothing past it; a delegate is owed at most its window of body bytes | `Model::pump` stops a stream at `read_ahead`, a websocket at one message, and a data or upload task whose delegate is a window behind ([`Task::undelivered`], [`Task::window`]); [`Resources::buffered_bytes`] counts them and the session's queued body bytes; [`rules::check_model`] |
//! | R7 | a suspended task reads nothing and has no timers | `Model::network` queues what a suspended task would read; [`Task::timers_armed`]; [`Model::allows`] lets no timer fire then |
//! | R8 | no task after invalidation begins, nothing allocated | `Op::CreateTask` and `Op::Await` in [`Model::apply`] returns [`Refusal::SessionInvalidated`] |
//! | R9 | the shared session ignores invalidation; idle connections still expire | `Model::finish_tasks_and_invalidate`, `Model::invalidate_and_cancel`, `Op::IdleTimeoutPasses` |
//! | R10 | the last session handle dropped is finish_tasks_and_invalidate; unreachable suspended tasks are cancelled | `Op::DropSession` and `Op::DropTask` in [`Model::apply`]; a convenience's future is a handle on its session (`Model::complete` finishes a session let go of when its last future returns) and dropping it cancels its task (`Model::drop_task`) |
//! | R11 | a websocket close completes within the close timeout | `Model::close_websocket` makes the task `Canceling`, where [`Task::armed`] arms [`Timer::Close`]; `Model::pump` completes it on the peer's close, `Op::TimePasses` at the deadline |
//! | R12 | timeouts and network errors end a task with a typed outcome and release as R5; a task's timers run while it waits for one of its host's connection slots | `Op::TimePasses`, `Model::read` for faults, both through `Model::complete`; `Exchange::AwaitingConnection` arms both timers ([`Task::timers_armed`]); `Model::admit` starts waiters as connections are released; [`rules::check_model`] checks the per-host bound |

mod alphabet;
mod machine;
mod resources;
pub mod rules;

pub use alphabet::{
    CACHE_ENTRIES, CACHED_BODY, Callback, CloseFrame, Disposition, Fault, MAX_REDIRECTS, Op,
    Outcome, Redirect, Refusal, ResourceId, Returned, Route, SessionId, SessionKind, TaskId,
    TaskKind, Timer,
};
pub use machine::{
    DEFAULT_READ_AHEAD, Exchange, Model, Pace, ServerPhase, Session, SessionState, Step, Task,
    TaskState,
};
pub use resources::Resources;

#[cfg(test)]
mod tests;
