//! The engine behind the sync seam, and the handles that own its inputs.
//!
//! Three kinds of owner share one locked [`Engine`]:
//! - the user holds a [`SessionHandle`] and [`TaskHandle`]s; dropping them is an input (R10);
//! - the driver holds a [`Core`]: it reports what the network did and carries out the
//!   [`Action`]s, in order, from [`Core::poll_action`];
//! - the [`Delivery`] owns the delegate and hands it the [`Callback`]s, serially and in order;
//!   it drops the delegate right after `did_become_invalid` returns (R3).
//!
//! No lock is held while user code runs: the delegate is called with the lock released, and
//! wakers are woken after it is released.

use std::fmt;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::engine::{Config, Engine, SessionState, TaskState};
use crate::error::Error;
use crate::sync::{Arc, Mutex, lock};
use crate::{
    Action, Answer, Callback, ConnId, Disposition, Intake, Ledger, Message, Outgoing, Proceed,
    Redirect, Release, Route, SessionKind, Start, TaskId, TaskKind, TimerId,
};

/// Create a session's engine. `delegate` decides whether callbacks are queued at all: a
/// session given one is [`SessionKind::Delegated`], one without is
/// [`SessionKind::Plain`] unless `config.kind` is [`SessionKind::Shared`].
///
/// # Panics
///
/// If `config.kind` is `Shared` and a delegate is given: the shared session has none.
pub fn session<D>(mut config: Config, delegate: Option<D>) -> (SessionHandle, Core, Delivery<D>) {
    config.kind = match (config.kind, delegate.is_some()) {
        (SessionKind::Shared, true) => panic!("the shared session has no delegate"),
        (SessionKind::Shared, false) => SessionKind::Shared,
        (_, true) => SessionKind::Delegated,
        (_, false) => SessionKind::Plain,
    };
    let core = Core {
        engine: Arc::new(Mutex::new(Engine::new(config))),
    };
    let handle = SessionHandle { core: core.clone() };
    let delivery = Delivery {
        core: core.clone(),
        delegate,
        done: false,
    };
    (handle, core, delivery)
}

/// The driver's side of a session: report what the network did, carry out the actions.
/// Cloning it does not keep the session from finishing; only user handles do (R10).
#[derive(Clone)]
pub struct Core {
    engine: Arc<Mutex<Engine>>,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("state", &self.state())
            .field("ledger", &self.ledger())
            .finish()
    }
}

impl Core {
    /// Run one input, then wake whoever has something new to see.
    fn update<R>(&self, input: impl FnOnce(&mut Engine) -> R) -> R {
        let mut wake: Vec<Waker> = Vec::new();
        let result = {
            let mut engine = lock(&self.engine);
            let result = input(&mut engine);
            let released = engine.is_released();
            if engine.has_actions() || released {
                wake.extend(engine.action_waker.take());
            }
            if engine.has_callbacks() || engine.state() == SessionState::Invalidated {
                wake.extend(engine.callback_waker.take());
            }
            if released {
                wake.append(&mut engine.release_wakers);
            }
            wake.append(&mut engine.wake_later);
            result
        };
        wake.into_iter().for_each(Waker::wake);
        result
    }

    fn read<R>(&self, getter: impl FnOnce(&Engine) -> R) -> R {
        getter(&lock(&self.engine))
    }

    // ---- getters ----

    pub fn state(&self) -> SessionState {
        self.read(Engine::state)
    }

    pub fn task_state(&self, task: TaskId) -> TaskState {
        self.read(|e| e.task_state(task))
    }

    /// What the session holds now, by its own account.
    pub fn ledger(&self) -> Ledger {
        self.read(Engine::ledger)
    }

    /// How many completed tasks the engine keeps something of (their result, a stream's end, a
    /// handler's outcome) because a handle to them is still held; 0 once every such handle is
    /// gone (R5).
    pub fn kept_results(&self) -> usize {
        self.read(Engine::kept)
    }

    /// Invalidated, delivered, delegate dropped, no action left (R4).
    pub fn is_released(&self) -> bool {
        self.read(Engine::is_released)
    }

    /// Ready once the session is released.
    pub fn poll_released(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut engine = lock(&self.engine);
        if engine.is_released() {
            return Poll::Ready(());
        }
        if !engine
            .release_wakers
            .iter()
            .any(|w| w.will_wake(cx.waker()))
        {
            engine.release_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    // ---- the driver's outputs ----

    /// The next thing the driver must do; `None` once the session is released and nothing
    /// will ever come again.
    ///
    /// Asking means the driver has carried out every action it took before: it carries them
    /// out one at a time, in order, and asks again only once the last one is done. A promise
    /// that waits for them (`did_complete`, `did_become_invalid`, the release itself) is kept
    /// from then on.
    pub fn poll_action(&self, cx: &mut Context<'_>) -> Poll<Option<Action>> {
        self.update(|engine| {
            engine.carried_out();
            match engine.next_action() {
                Some(action) => Poll::Ready(Some(action)),
                None if engine.is_released() => Poll::Ready(None),
                None => {
                    engine.action_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
    }

    /// The next action if there is one now; asking means, as for
    /// [`poll_action`](Self::poll_action), that the ones taken before are carried out.
    pub fn try_action(&self) -> Option<Action> {
        self.update(|engine| {
            engine.carried_out();
            engine.next_action()
        })
    }

    /// The driver is gone and carries out nothing more (its runtime shut down): no callback
    /// waits for it any more, so the delegate still hears the rest and is released.
    pub fn driver_gone(&self) {
        self.update(Engine::driver_gone);
    }

    // ---- the driver's inputs ----

    /// The response head arrived. On [`Proceed::Wait`] the IO reads nothing more, errors
    /// included, until the driver gets [`Action::ReadBody`]: the delegate decides first.
    pub fn response(&self, task: TaskId, response: http::Response<()>) -> Proceed {
        self.update(|e| e.response(task, response))
    }

    /// A redirect's head arrived and `request` would follow it (the IO decided it is one to
    /// follow: a redirect status with a usable `Location`, within the limit). The delegate, if
    /// the task has one, answers; the IO waits for the answer with [`Core::poll_redirect`],
    /// reading nothing meanwhile.
    pub fn redirect(&self, task: TaskId, response: http::Response<()>, request: http::Request<()>) {
        self.update(|e| e.redirect(task, response, request));
    }

    /// The answer to the task's redirect: [`Redirect::Follow`] with the request to send next
    /// (read the redirect's body, then [`Core::hop`]), or [`Redirect::Refuse`] (the redirect
    /// is the response: wait for the disposition as after [`Proceed::Wait`]). `None` once the
    /// task is over.
    pub fn poll_redirect(&self, task: TaskId, cx: &mut Context<'_>) -> Poll<Option<Redirect>> {
        self.update(|e| e.poll_redirect(task, cx.waker()))
    }

    /// The followed redirect's exchange is over; the next goes to `origin`. Park the
    /// redirect's connection first, as for [`Core::body_end`], then pool or close it as the
    /// answer says; the next connection comes from [`Core::poll_start`].
    #[must_use = "the connection must be pooled or closed as the engine says"]
    pub fn hop(&self, task: TaskId, origin: &str, reusable: bool) -> Release {
        self.update(|e| e.hop(task, origin, reusable))
    }

    /// The delegate's answer that comes after its callback returned ([`Answer::Later`]): a
    /// [`Disposition`] for `ReceiveResponse`, a [`Redirect`] for `WillRedirect`, or
    /// [`Answer::Cancel`] when there will be none. A no-op if the task no longer waits for
    /// that answer (it was cancelled, timed out, invalidated, or answered already).
    pub fn answer(&self, task: TaskId, answer: Answer) {
        self.update(|e| match answer {
            Answer::Disposition(disposition) => e.answer(task, disposition),
            Answer::Redirect(redirect) => e.redirect_answer(task, Some(redirect)),
            Answer::Cancel => e.unanswered(task),
            Answer::Default | Answer::Later => {}
        });
    }

    /// Where a handler-routed task starts once its origin has a connection for it (see
    /// [`TaskHandle::resume_inline`]); `None` if it completed while waiting.
    pub fn poll_start(&self, task: TaskId, cx: &mut Context<'_>) -> Poll<Option<Start>> {
        self.update(|e| e.poll_start(task, cx.waker()))
    }

    /// How a handler-routed task ended; `None` while it runs, or once taken.
    pub fn take_outcome(&self, task: TaskId) -> Option<Result<(), Error>> {
        self.update(|e| e.take_outcome(task))
    }

    /// How many body bytes the task's IO may read and report with [`Core::body_data`] now
    /// (R6): the room in the delegate's window for a delegated data or upload task, else no
    /// limit. Pending while the delegate is a window behind: the IO must not read the socket
    /// meanwhile, and is woken once the delegate has caught up. `None` once the task reads no
    /// body (it is over).
    pub fn poll_body_room(&self, task: TaskId, cx: &mut Context<'_>) -> Poll<Option<usize>> {
        self.update(|e| e.body_room(task, Some(cx.waker())))
    }

    /// [`Core::poll_body_room`] without waiting: `Some(0)` while the delegate is behind.
    pub fn try_body_room(&self, task: TaskId) -> Option<usize> {
        match self.update(|e| e.body_room(task, None)) {
            Poll::Ready(room) => room,
            Poll::Pending => Some(0),
        }
    }

    /// Body bytes arrived (for a download, after they were written to its file). A delegated
    /// data or upload task's IO reports no more than [`Core::poll_body_room`] allowed.
    pub fn body_data(&self, task: TaskId, data: Bytes) {
        self.update(|e| e.body_data(task, data));
    }

    /// The body ended; the answer says what the caller must do with its connection.
    ///
    /// Park the connection where the driver keeps idle connections *before* calling this, and
    /// take it back out and drop it if the answer is [`Release::Close`]. Once the engine has
    /// pooled it, a concurrent invalidation may queue [`Action::Close`] for it at once; a
    /// connection parked only after this returns could miss that close and leak (found by
    /// `tests/loom.rs`, `finish_tasks_and_invalidate_vs_the_last_task_completing`).
    #[must_use = "the connection must be pooled or closed as the engine says"]
    pub fn body_end(&self, task: TaskId, reusable: bool) -> Release {
        self.update(|e| e.body_end(task, reusable))
    }

    /// The task's IO answered it without the network (a fresh response from the client's
    /// cache): the connection [`Action::Start`] gave it goes back unused, a pooled one
    /// (`reused`) to the pool, a new one unopened, and a task waiting for a slot of its origin
    /// may take it. Then the IO reports the head, the body and its end as usual, with no
    /// connection to pool: `body_end` says [`Release::Close`] and there is nothing to close.
    pub fn connection_unused(&self, task: TaskId, reused: bool) {
        self.update(|e| e.connection_unused(task, reused));
    }

    /// The task's IO failed; it closes its own connection.
    pub fn failed(&self, task: TaskId, error: Error) {
        self.update(|e| e.failed(task, error));
    }

    /// A handler-routed task's `timeout` ran out on its handler's clock. Ignored if that timer
    /// is not armed (the task is suspended, or over).
    pub fn handler_timed_out(&self, task: TaskId, timeout: crate::Timeout) {
        self.update(|e| e.handler_timed_out(task, timeout));
    }

    /// An armed timer fired. Stale timers are ignored.
    pub fn timer_fired(&self, timer: TimerId) {
        self.update(|e| e.timer_fired(timer));
    }

    /// An idle connection is gone: its idle timeout passed (the driver closed it), or the
    /// server closed it. Unknown or busy connections are ignored.
    pub fn idle_expired(&self, conn: ConnId) {
        self.update(|e| e.idle_expired(conn));
    }

    // ---- the IO of streams and websockets ----

    /// What the task's IO may read now (R6, R7); `None` once it must stop reading for good.
    pub fn poll_intake(&self, task: TaskId, cx: &mut Context<'_>) -> Poll<Option<Intake>> {
        self.update(|e| e.intake(task, Some(cx.waker())))
    }

    /// [`Core::poll_intake`] without waiting.
    pub fn try_intake(&self, task: TaskId) -> Option<Intake> {
        match self.update(|e| e.intake(task, None)) {
            Poll::Ready(intake) => intake,
            Poll::Pending => None,
        }
    }

    /// Bytes read from a stream's socket (or a response stream's body); returns how many the
    /// read-ahead took: all of them if the IO read no more than [`Intake::Read`] allowed. The
    /// IO keeps the rest and offers it again when there is room.
    pub fn stream_data(&self, task: TaskId, data: &[u8]) -> usize {
        self.update(|e| e.stream_data(task, data))
    }

    /// The peer ended the stream.
    pub fn stream_end(&self, task: TaskId) {
        self.update(|e| e.stream_end(task));
    }

    /// The websocket's upgrade was accepted (`101`), with this subprotocol.
    pub fn ws_opened(&self, task: TaskId, protocol: Option<String>) {
        self.update(|e| e.ws_opened(task, protocol));
    }

    /// A websocket message arrived.
    pub fn ws_message(&self, task: TaskId, message: Message) {
        self.update(|e| e.ws_message(task, message));
    }

    /// A pong arrived.
    pub fn ws_pong(&self, task: TaskId) {
        self.update(|e| e.ws_pong(task));
    }

    /// The peer's close frame arrived, with `code` if its payload was not empty, and, if it
    /// came first, the IO has answered it. The task completes: with `did_close` and success, or
    /// with [`Error::WebSocketProtocol`] if no close frame may carry `code`
    /// ([`close_code_allowed`](crate::close_code_allowed)); either way the driver gets
    /// [`Action::Abort`] and closes the connection.
    pub fn ws_peer_closed(&self, task: TaskId, code: Option<u16>, reason: String) {
        self.update(|e| e.ws_peer_closed(task, code, reason));
    }

    /// The next thing the task's IO must write; `None` once the task is gone. Report each
    /// item written with [`Core::sent`].
    pub fn poll_outgoing(&self, task: TaskId, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        self.update(|e| e.outgoing(task, Some(cx.waker())))
    }

    /// [`Core::poll_outgoing`] without waiting.
    pub fn try_outgoing(&self, task: TaskId) -> Option<Outgoing> {
        match self.update(|e| e.outgoing(task, None)) {
            Poll::Ready(item) => item,
            Poll::Pending => None,
        }
    }

    /// The item the IO took last is written.
    pub fn sent(&self, task: TaskId) {
        self.update(|e| e.sent(task));
    }
}

/// The user's handle on a session. Dropping it is `finish_tasks_and_invalidate` (R10); a
/// client that wants cheap clones keeps it in an `Arc`.
pub struct SessionHandle {
    core: Core,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SessionHandle").field(&self.core).finish()
    }
}

impl SessionHandle {
    /// Create a `Suspended` task; refused once invalidation has begun (R8).
    pub fn create_task(
        &self,
        kind: TaskKind,
        origin: &str,
        route: Route,
    ) -> Result<TaskHandle, Error> {
        let id = self.core.update(|e| e.create_task(kind, origin, route))?;
        Ok(TaskHandle {
            core: self.core.clone(),
            id,
        })
    }

    pub fn finish_tasks_and_invalidate(&self) {
        self.core.update(Engine::finish_tasks_and_invalidate);
    }

    pub fn invalidate_and_cancel(&self) {
        self.core.update(Engine::invalidate_and_cancel);
    }

    pub fn core(&self) -> &Core {
        &self.core
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.core.update(Engine::session_handle_dropped);
    }
}

/// The user's handle on a task. Dropping it cancels a `Suspended` task, which nothing could
/// resume any more (R10); a running task runs on.
pub struct TaskHandle {
    core: Core,
    id: TaskId,
}

impl fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

impl TaskHandle {
    pub fn id(&self) -> TaskId {
        self.id
    }

    pub fn state(&self) -> TaskState {
        self.core.task_state(self.id)
    }

    pub fn resume(&self) {
        self.core.update(|e| e.resume(self.id));
    }

    /// Resume a handler-routed task and return where its handler starts the exchange: the
    /// first time only, and only if a connection is free now; otherwise wait with
    /// [`Core::poll_start`].
    pub fn resume_inline(&self) -> Option<Start> {
        self.core.update(|e| e.resume_and_start(self.id))
    }

    pub fn suspend(&self) {
        self.core.update(|e| e.suspend(self.id));
    }

    pub fn cancel(&self) {
        self.core.update(|e| e.cancel(self.id));
    }

    /// Ready with the task's result once it is `Completed`: the one its delegate's
    /// `did_complete` gets, with or without a delegate. It is kept while a handle to the task
    /// exists, so it can be asked for after completion and from several places; asking
    /// changes nothing about the task.
    pub fn poll_result(&self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.core.update(|e| e.poll_result(self.id, cx.waker()))
    }

    // ---- streams ----

    /// Read between `min` and `max` bytes from a stream: `Some(bytes)`, which is empty only
    /// when `min` is 0 and nothing was there; `None` at the end of the stream. Fails at once
    /// once the read half is closed or the task is over, with the task's own error if it had
    /// one.
    pub fn poll_read(
        &self,
        cx: &mut Context<'_>,
        min: usize,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, Error>> {
        self.core
            .update(|e| e.read(self.id, min, max, Some(cx.waker())))
    }

    /// Queue bytes for the stream's IO; returns how many were taken. Waits while the write
    /// buffer is full.
    pub fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<Result<usize, Error>> {
        self.core
            .update(|e| e.write(self.id, data, Some(cx.waker())))
    }

    /// Ready once the IO has written everything queued.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.core.update(|e| e.flush(self.id, Some(cx.waker())))
    }

    /// No more reading: what the stream holds is dropped. A stream with both halves closed
    /// completes.
    pub fn close_read(&self) {
        self.core.update(|e| e.close_read(self.id));
    }

    /// No more writing: the end of the stream is sent after what was written.
    pub fn close_write(&self) {
        self.core.update(|e| e.close_write(self.id));
    }

    // ---- websockets ----

    /// Take the websocket's received message; wait for one.
    pub fn poll_receive(&self, cx: &mut Context<'_>) -> Poll<Result<Message, Error>> {
        self.core.update(|e| e.receive(self.id, Some(cx.waker())))
    }

    /// Take the websocket's received message if there is one now, without taking the place
    /// of a `poll_receive` waiting elsewhere.
    pub fn try_receive(&self) -> Result<Option<Message>, Error> {
        match self.core.update(|e| e.receive(self.id, None)) {
            Poll::Ready(result) => result.map(Some),
            Poll::Pending => Ok(None),
        }
    }

    /// Queue the message in `message` once the write buffer has room; `message` is `None`
    /// once it is queued.
    pub fn poll_send(
        &self,
        cx: &mut Context<'_>,
        message: &mut Option<Message>,
    ) -> Poll<Result<(), Error>> {
        self.core
            .update(|e| e.send(self.id, message, Some(cx.waker())))
    }

    /// Queue a ping; wait for its pong with [`TaskHandle::poll_pong`].
    pub fn ping(&self) -> Result<u64, Error> {
        self.core.update(|e| e.ping(self.id))
    }

    /// Ready once ping `id` is answered; an error once the websocket is over.
    pub fn poll_pong(&self, cx: &mut Context<'_>, id: u64) -> Poll<Result<(), Error>> {
        self.core.update(|e| e.pong(self.id, id, Some(cx.waker())))
    }

    /// Begin the close handshake with `code` and `reason`; it completes when the peer answers,
    /// or with [`Error::TimedOut`]`(`[`Timeout::Close`](crate::Timeout::Close)`)` after the
    /// close timeout (R11). A websocket not open yet is cancelled.
    pub fn cancel_with(&self, code: u16, reason: impl Into<String>) {
        let reason = reason.into();
        self.core.update(|e| e.cancel_with(self.id, code, reason));
    }

    /// The close frame's code and reason: the peer's, or ours while the peer's is awaited.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        self.core.read(|e| e.close_frame(self.id))
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.core.update(|e| e.task_handle_dropped(self.id));
    }
}

/// What one delivery step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// One callback was handed to the delegate.
    One,
    /// The session is invalidated and the delegate dropped: nothing will come again.
    Done,
}

/// The sole owner of the delegate and the sole consumer of the callback queue. It calls the
/// delegate serially, in queue order, with no lock held; it drops the delegate right after
/// `did_become_invalid` returns (R3), or when it is dropped itself.
pub struct Delivery<D> {
    core: Core,
    delegate: Option<D>,
    done: bool,
}

impl<D> fmt::Debug for Delivery<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("delegate_held", &self.delegate.is_some())
            .field("done", &self.done)
            .finish()
    }
}

/// A callback taken for the delegate by [`Delivery::begin`], whose return is reported with
/// [`Delivery::finish`].
#[derive(Debug)]
#[must_use = "the engine counts the delegate as in the callback until it is finished"]
pub struct Receipt(Ack);

/// What the delivery must tell the engine once the delegate has returned.
#[derive(Debug)]
enum Ack {
    None,
    Answer(TaskId),
    Redirect(TaskId),
    /// Body bytes the delegate is done with: its window has room again (R6).
    Data(TaskId, u64),
    FileHandedOver(TaskId),
    Invalid,
}

impl<D> Delivery<D> {
    /// Hand the next callback to the delegate through `deliver`, which returns the delegate's
    /// answer: a disposition for `ReceiveResponse`, a [`Redirect`] for `WillRedirect`
    /// ([`Answer::Default`], or `None`, for the default: allow, follow), ignored otherwise.
    pub fn poll_deliver<F, A>(&mut self, cx: &mut Context<'_>, deliver: F) -> Poll<Delivered>
    where
        F: FnOnce(&D, Callback) -> A,
        A: Into<Answer>,
    {
        self.step(Some(cx.waker()), deliver)
            .map_or(Poll::Pending, Poll::Ready)
    }

    /// Deliver the next callback if there is one now.
    pub fn try_deliver<F, A>(&mut self, deliver: F) -> Option<Delivered>
    where
        F: FnOnce(&D, Callback) -> A,
        A: Into<Answer>,
    {
        self.step(None, deliver)
    }

    fn step<F, A>(&mut self, waker: Option<&Waker>, deliver: F) -> Option<Delivered>
    where
        F: FnOnce(&D, Callback) -> A,
        A: Into<Answer>,
    {
        let (callback, receipt) = match self.take(waker) {
            Err(done) => return Some(done),
            Ok(None) => return None,
            Ok(Some(taken)) => taken,
        };
        let delegate = self
            .delegate
            .as_ref()
            .expect("callbacks are queued only for a delegate");
        let disposition = deliver(delegate, callback);
        Some(self.finish(receipt, disposition))
    }

    /// Take the next callback for the delegate without calling it, for a caller that hands
    /// it over itself (see [`Delivery::delegate`]) and reports the delegate's return with
    /// [`Delivery::finish`]: until then the engine counts the delegate as in that callback
    /// (a body chunk is still owed against its window, a handed-over file still exists).
    /// `Ok(None)` when nothing is queued now; `Err(Delivered::Done)` once nothing will come
    /// again. Take the next one only after finishing this one: callbacks are serial.
    pub fn begin(&mut self) -> Result<Option<(Callback, Receipt)>, Delivered> {
        self.take(None)
    }

    /// [`begin`](Self::begin), waiting: `Pending` (with `cx`'s waker kept, to be woken when a
    /// callback is queued) while nothing is queued.
    pub fn poll_begin(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Callback, Receipt), Delivered>> {
        match self.take(Some(cx.waker())) {
            Err(done) => Poll::Ready(Err(done)),
            Ok(None) => Poll::Pending,
            Ok(Some(taken)) => Poll::Ready(Ok(taken)),
        }
    }

    /// The delegate returned from the callback `receipt` was taken with; `answer` is its
    /// answer to a `ReceiveResponse` or a `WillRedirect` (its default for the others, which
    /// ignore it).
    pub fn finish(&mut self, receipt: Receipt, answer: impl Into<Answer>) -> Delivered {
        let answer = answer.into();
        match receipt.0 {
            Ack::None => {}
            Ack::Answer(task) => self.core.update(|e| match answer {
                Answer::Later => e.defer(task, false),
                Answer::Cancel => e.unanswered(task),
                Answer::Disposition(disposition) => e.answer(task, disposition),
                Answer::Default | Answer::Redirect(_) => e.answer(task, Disposition::Allow),
            }),
            Ack::Redirect(task) => self.core.update(|e| match answer {
                Answer::Later => e.defer(task, true),
                Answer::Cancel => e.unanswered(task),
                Answer::Redirect(redirect) => e.redirect_answer(task, Some(redirect)),
                Answer::Default | Answer::Disposition(_) => e.redirect_answer(task, None),
            }),
            Ack::Data(task, len) => self.core.update(|e| e.data_delivered(task, len)),
            Ack::FileHandedOver(task) => self.core.update(|e| e.file_handed_over(task)),
            Ack::Invalid => {
                self.release();
                return Delivered::Done;
            }
        }
        Delivered::One
    }

    /// The delegate, while the delivery holds it (until `did_become_invalid` has returned).
    pub fn delegate(&self) -> Option<&D> {
        self.delegate.as_ref()
    }

    fn take(&mut self, waker: Option<&Waker>) -> Result<Option<(Callback, Receipt)>, Delivered> {
        if self.done {
            return Err(Delivered::Done);
        }
        let callback = {
            let mut engine = lock(&self.core.engine);
            match engine.next_callback() {
                Some(callback) => callback,
                None if self.delegate.is_none() && engine.state() == SessionState::Invalidated => {
                    self.done = true;
                    return Err(Delivered::Done);
                }
                None => {
                    if let Some(waker) = waker {
                        engine.callback_waker = Some(waker.clone());
                    }
                    return Ok(None);
                }
            }
        };
        let callback = match callback {
            // The engine counted this handle when it queued the callback: it is adopted here.
            Callback::BecomeStream { task, stream: None } => Callback::BecomeStream {
                task,
                stream: Some(TaskHandle {
                    core: self.core.clone(),
                    id: task,
                }),
            },
            callback => callback,
        };
        let ack = match callback {
            Callback::ReceiveResponse { task, .. } => Ack::Answer(task),
            Callback::WillRedirect { task, .. } => Ack::Redirect(task),
            Callback::ReceiveData { task, ref data } => Ack::Data(task, data.len() as u64),
            Callback::FinishDownloading { task, .. } => Ack::FileHandedOver(task),
            Callback::BecomeInvalid => Ack::Invalid,
            _ => Ack::None,
        };
        Ok(Some((callback, Receipt(ack))))
    }

    /// R3: drop the delegate, then let the engine know (so no one sees it counted as held
    /// after it is gone).
    fn release(&mut self) {
        drop(self.delegate.take());
        self.done = true;
        self.core.update(Engine::delegate_released);
    }
}

impl<D> Drop for Delivery<D> {
    fn drop(&mut self) {
        if !self.done {
            self.release();
        }
    }
}
