//! Streams and websockets: the engine's half of their IO.
//!
//! A stream or websocket task has a [`Pipe`]: what it read and holds for its user, and what
//! its user wrote and its IO has not taken yet. Both directions are bounded:
//! - a stream holds at most `Config::read_ahead` bytes: its IO asks [`Engine::intake`] how
//!   much it may read and stops reading the socket when the queue is full (R6, backpressure);
//!   a websocket holds at most one received message;
//! - writes wait once `Config::write_buffer` bytes are queued (a message larger than the
//!   buffer is taken alone).
//!
//! The user and the IO never touch each other: both go through these methods, under the
//! engine's one lock, so a read racing a cancel, a write racing `close_write` or our close
//! racing the peer's are each one order of transitions (`tests/loom.rs`). A pipe goes with
//! its cell at completion, and with it every byte it held (R5).

use std::collections::VecDeque;
use std::mem;
use std::task::{Poll, Waker};

use bytes::{Bytes, BytesMut};

use super::{EndedBy, Engine, Exchange, SessionKind};
use crate::error::{Error, Operation, Timeout};
use crate::{Action, Callback, Intake, Message, Outgoing, TaskId, TaskKind, TaskState};

/// The close code `going away` (RFC 6455, 7.4.1): what a websocket nobody holds sends.
pub const GOING_AWAY: u16 = 1001;

/// The close code reported when the peer's close frame carries none (RFC 6455, 7.1.5). It
/// never appears on the wire.
pub const NO_STATUS: u16 = 1005;

/// Whether a close frame may carry `code` (RFC 6455, 7.4): 1000-1003 and 1007-1013 (defined
/// for the protocol), 3000-3999 (registered) and 4000-4999 (private use). Not 1005, 1006 or
/// 1015, which are reserved to say what no frame said; not 1004 or the other unassigned ones
/// (1014 and 1016-2999); not below 1000 or above 4999. It is tungstenite's
/// `CloseCode::is_allowed`, which the client's websocket speaks through (its tests check they
/// agree on every code).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

/// A stream's read half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Reading {
    /// The IO reads the socket (when the read-ahead has room).
    #[default]
    Open,
    /// The IO read the peer's end and reads no more: once the queue is read, `read` sees the
    /// end.
    Ended,
    /// The user closed it, or read the end: nothing more is read or kept.
    Closed,
}

impl Reading {
    /// The peer's end was read (a closed half stays closed).
    fn end(&mut self) {
        if *self == Reading::Open {
            *self = Reading::Ended;
        }
    }
}

/// A stream's write half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Writing {
    /// The user may write.
    #[default]
    Open,
    /// `close_write` queued the shutdown behind what was written; the IO has not taken it.
    Closing,
    /// The IO took the shutdown and has not reported it written.
    Shutting,
    /// The shutdown is written (or there was nothing to shut: not connected yet, or a
    /// response's stream, which cannot be written).
    Closed,
}

impl Writing {
    /// `close_write`: a started stream queues its shutdown, one with no connection yet is
    /// closed at once. Whether it was open.
    fn close(&mut self, started: bool) -> bool {
        if *self != Writing::Open {
            return false;
        }
        *self = if started {
            Writing::Closing
        } else {
            Writing::Closed
        };
        true
    }

    /// The IO took `item` from the outbox.
    fn took(&mut self, item: &Outgoing) {
        if *self == Writing::Closing && matches!(item, Outgoing::Shutdown) {
            *self = Writing::Shutting;
        }
    }

    /// The IO wrote the item it took last.
    fn sent(&mut self) {
        if *self == Writing::Shutting {
            *self = Writing::Closed;
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Pipe {
    /// A stream's read-ahead.
    queue: BytesMut,
    /// A websocket's received messages (one at most, unless an IO reads without asking).
    inbox: VecDeque<Message>,
    reading: Reading,
    writing: Writing,
    outbox: VecDeque<Outgoing>,
    /// Bytes in `outbox` and the item the IO took and has not reported written.
    unsent: usize,
    in_flight: usize,
    pings: u64,
    pongs: u64,
    /// The close frame: ours (`cancel_with`) until the peer's arrives.
    pub(crate) close: Option<(u16, String)>,
    reader: Option<Waker>,
    writer: Option<Waker>,
    io: Option<Waker>,
    pingers: Vec<Waker>,
}

impl Pipe {
    pub(crate) fn new() -> Box<Self> {
        Box::default()
    }

    /// A response's stream: readable only.
    pub(crate) fn response() -> Box<Self> {
        Box::new(Pipe {
            writing: Writing::Closed,
            ..Pipe::default()
        })
    }

    /// Bytes it holds for its user (R6).
    pub(crate) fn held(&self) -> u64 {
        (self.queue.len() + self.inbox.iter().map(Message::len).sum::<usize>()) as u64
    }

    pub(crate) fn unsent(&self) -> u64 {
        self.unsent as u64
    }

    /// Every waker, to wake once the pipe is gone (they will find their task completed).
    pub(crate) fn wakers(&mut self) -> impl Iterator<Item = Waker> + use<> {
        let pingers = mem::take(&mut self.pingers);
        [self.reader.take(), self.writer.take(), self.io.take()]
            .into_iter()
            .flatten()
            .chain(pingers)
    }
}

/// How a pipe task ended, kept while its user still holds a handle, so that every op after
/// the end fails at once with the task's own error.
#[derive(Debug)]
pub(crate) struct End {
    pub(crate) result: Result<(), Error>,
    pub(crate) close: Option<(u16, String)>,
    kind: TaskKind,
}

impl End {
    pub(crate) fn new(
        result: Result<(), Error>,
        close: Option<(u16, String)>,
        kind: TaskKind,
    ) -> Self {
        Self {
            result,
            close,
            kind,
        }
    }
}

fn register(slot: &mut Option<Waker>, waker: Option<&Waker>) {
    if let Some(waker) = waker {
        slot.replace(waker.clone());
    }
}

impl Engine {
    /// The error an op meant for a `kind` task gets on a completed (or never existing) one.
    fn ended(&self, task: TaskId, kind: TaskKind) -> Error {
        match self.ends.get(&task) {
            Some(End {
                result: Err(error), ..
            }) => error.clone(),
            Some(End { kind, .. }) => Error::Closed(*kind),
            None => Error::Closed(kind),
        }
    }

    /// The task's pipe, if it is a live task of that kind.
    fn pipe_of(&mut self, task: TaskId, kind: TaskKind, op: Operation) -> Result<&mut Pipe, Error> {
        let Some(cell) = self.tasks.get(&task) else {
            return Err(self.ended(task, kind));
        };
        if cell.kind != kind {
            return Err(Error::WrongKind {
                kind: cell.kind,
                op,
            });
        }
        Ok(self
            .tasks
            .get_mut(&task)
            .and_then(|cell| cell.pipe.as_deref_mut())
            .expect("a stream or websocket task has a pipe"))
    }

    pub(super) fn wake_io(&mut self, task: TaskId) {
        if let Some(waker) = self.pipe_mut(task).and_then(|p| p.io.take()) {
            self.wake_later.push(waker);
        }
    }

    fn pipe_mut(&mut self, task: TaskId) -> Option<&mut Pipe> {
        self.tasks
            .get_mut(&task)
            .and_then(|c| c.pipe.as_deref_mut())
    }

    fn hold(&mut self, bytes: u64) {
        self.held += bytes;
        self.peak_buffered = self.peak_buffered.max(self.buffered + self.held);
    }

    // ---- the user's inputs: streams ----

    /// Take between `min` (clamped to the read-ahead: more could never arrive) and `max`
    /// bytes. `Some(empty)` when `min` is 0 and nothing is there; `None` at the end of the
    /// stream, which closes the read half.
    pub(crate) fn read(
        &mut self,
        task: TaskId,
        min: usize,
        max: usize,
        waker: Option<&Waker>,
    ) -> Poll<Result<Option<Bytes>, Error>> {
        let cap = self.config.read_ahead;
        let pipe = match self.pipe_of(task, TaskKind::Stream, Operation::Read) {
            Ok(pipe) => pipe,
            Err(error) => return Poll::Ready(Err(error)),
        };
        if pipe.reading == Reading::Closed {
            return Poll::Ready(Err(Error::ReadClosed));
        }
        let ended = pipe.reading == Reading::Ended;
        let available = pipe.queue.len();
        let enough = available >= min.min(cap).max(1);
        if available > 0 && max > 0 && (enough || ended) {
            let bytes = pipe.queue.split_to(available.min(max)).freeze();
            self.held -= bytes.len() as u64;
            // Room again: the IO reads on.
            self.wake_io(task);
            return Poll::Ready(Ok(Some(bytes)));
        }
        if available == 0 && ended {
            pipe.reading = Reading::Closed;
            self.finish_stream_if_closed(task);
            return Poll::Ready(Ok(None));
        }
        if min == 0 || max == 0 {
            return Poll::Ready(Ok(Some(Bytes::new())));
        }
        register(&mut pipe.reader, waker);
        Poll::Pending
    }

    /// Queue as much of `data` as the write buffer has room for; wait if it has none.
    pub(crate) fn write(
        &mut self,
        task: TaskId,
        data: &[u8],
        waker: Option<&Waker>,
    ) -> Poll<Result<usize, Error>> {
        let cap = self.config.write_buffer;
        let pipe = match self.pipe_of(task, TaskKind::Stream, Operation::Write) {
            Ok(pipe) => pipe,
            Err(error) => return Poll::Ready(Err(error)),
        };
        if pipe.writing != Writing::Open {
            return Poll::Ready(Err(Error::WriteClosed));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = cap.saturating_sub(pipe.unsent);
        if room == 0 {
            register(&mut pipe.writer, waker);
            return Poll::Pending;
        }
        let n = room.min(data.len());
        pipe.outbox
            .push_back(Outgoing::Bytes(Bytes::copy_from_slice(&data[..n])));
        pipe.unsent += n;
        self.wake_io(task);
        Poll::Ready(Ok(n))
    }

    /// Ready once the IO has written everything queued.
    pub(crate) fn flush(&mut self, task: TaskId, waker: Option<&Waker>) -> Poll<Result<(), Error>> {
        let kind = self.tasks.get(&task).map(|c| c.kind);
        let Some(pipe) = self.pipe_mut(task) else {
            return Poll::Ready(match kind {
                Some(kind) => Err(Error::WrongKind {
                    kind,
                    op: Operation::Flush,
                }),
                None => Err(self.ended(task, TaskKind::Stream)),
            });
        };
        if pipe.unsent == 0 {
            return Poll::Ready(Ok(()));
        }
        register(&mut pipe.writer, waker);
        Poll::Pending
    }

    /// No more reading: what the stream holds is dropped and its IO stops reading.
    pub(crate) fn close_read(&mut self, task: TaskId) {
        let Some(pipe) = self.pipe_mut(task) else {
            return;
        };
        if pipe.reading == Reading::Closed {
            return;
        }
        pipe.reading = Reading::Closed;
        let dropped = mem::take(&mut pipe.queue);
        self.held -= dropped.len() as u64;
        self.wake_io(task);
        self.finish_stream_if_closed(task);
    }

    /// No more writing: the end of the stream is queued behind what was written.
    pub(crate) fn close_write(&mut self, task: TaskId) {
        let started = self
            .tasks
            .get(&task)
            .is_some_and(|c| c.exchange != Exchange::NotStarted);
        let Some(pipe) = self.pipe_mut(task) else {
            return;
        };
        if !pipe.writing.close(started) {
            return;
        }
        // With no connection yet there is nothing to shut: what was queued goes with the task.
        if started {
            pipe.outbox.push_back(Outgoing::Shutdown);
        }
        self.wake_io(task);
        self.finish_stream_if_closed(task);
    }

    /// A stream whose read half is closed and whose end is written is done; its connection
    /// closes (streams are never pooled).
    fn finish_stream_if_closed(&mut self, task: TaskId) {
        let done = self
            .tasks
            .get(&task)
            .and_then(|c| c.pipe.as_deref())
            .is_some_and(|p| p.reading == Reading::Closed && p.writing == Writing::Closed);
        if done && self.tasks[&task].kind == TaskKind::Stream {
            self.complete(task, Ok(()), EndedBy::Other);
        }
    }

    // ---- the user's inputs: websockets ----

    /// Take the received message; wait if there is none.
    pub(crate) fn receive(
        &mut self,
        task: TaskId,
        waker: Option<&Waker>,
    ) -> Poll<Result<Message, Error>> {
        let closing = self.task_state(task) == TaskState::Canceling;
        let pipe = match self.pipe_of(task, TaskKind::WebSocket, Operation::Receive) {
            Ok(pipe) => pipe,
            Err(error) => return Poll::Ready(Err(error)),
        };
        if closing {
            return Poll::Ready(Err(Error::Closed(TaskKind::WebSocket)));
        }
        match pipe.inbox.pop_front() {
            Some(message) => {
                self.held -= message.len() as u64;
                self.wake_io(task);
                Poll::Ready(Ok(message))
            }
            None => {
                register(&mut pipe.reader, waker);
                Poll::Pending
            }
        }
    }

    /// Queue `message` (taken from the option) once the write buffer has room. Messages sent
    /// before the websocket opens wait for it.
    pub(crate) fn send(
        &mut self,
        task: TaskId,
        message: &mut Option<Message>,
        waker: Option<&Waker>,
    ) -> Poll<Result<(), Error>> {
        let cap = self.config.write_buffer;
        let closing = self.task_state(task) == TaskState::Canceling;
        let pipe = match self.pipe_of(task, TaskKind::WebSocket, Operation::Send) {
            Ok(pipe) => pipe,
            Err(error) => return Poll::Ready(Err(error)),
        };
        if closing {
            return Poll::Ready(Err(Error::Closed(TaskKind::WebSocket)));
        }
        let Some(len) = message.as_ref().map(Message::len) else {
            return Poll::Ready(Ok(()));
        };
        // A message larger than the whole buffer goes alone.
        if pipe.unsent > 0 && pipe.unsent + len > cap {
            register(&mut pipe.writer, waker);
            return Poll::Pending;
        }
        let message = message.take().expect("checked");
        pipe.unsent += len;
        pipe.outbox.push_back(Outgoing::Message(message));
        self.wake_io(task);
        Poll::Ready(Ok(()))
    }

    /// Queue a ping; its number, for [`Engine::pong`].
    pub(crate) fn ping(&mut self, task: TaskId) -> Result<u64, Error> {
        let closing = self.task_state(task) == TaskState::Canceling;
        let pipe = self.pipe_of(task, TaskKind::WebSocket, Operation::Ping)?;
        if closing {
            return Err(Error::Closed(TaskKind::WebSocket));
        }
        pipe.pings += 1;
        let id = pipe.pings;
        pipe.outbox.push_back(Outgoing::Ping);
        self.wake_io(task);
        Ok(id)
    }

    /// Ready once ping `id` is answered, or with an error once the websocket is gone.
    pub(crate) fn pong(
        &mut self,
        task: TaskId,
        id: u64,
        waker: Option<&Waker>,
    ) -> Poll<Result<(), Error>> {
        let pipe = match self.pipe_of(task, TaskKind::WebSocket, Operation::Ping) {
            Ok(pipe) => pipe,
            Err(error) => return Poll::Ready(Err(error)),
        };
        if pipe.pongs >= id {
            return Poll::Ready(Ok(()));
        }
        if let Some(waker) = waker
            && !pipe.pingers.iter().any(|w| w.will_wake(waker))
        {
            pipe.pingers.push(waker.clone());
        }
        Poll::Pending
    }

    /// `cancel_with(code, reason)`: an open websocket begins the close handshake, bounded by
    /// the close timeout (R11); one that is not open has nothing to close and is cancelled.
    pub(crate) fn cancel_with(&mut self, task: TaskId, code: u16, reason: String) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.kind != TaskKind::WebSocket {
            self.cancel(task);
            return;
        }
        match (cell.state, cell.exchange) {
            (TaskState::Canceling | TaskState::Completed, _) => {}
            (state @ (TaskState::Running | TaskState::Suspended), Exchange::Open) => {
                cell.state = TaskState::Canceling;
                if state == TaskState::Suspended {
                    // A suspended websocket's IO was paused: it reads again, to find the
                    // peer's close (R11).
                    self.actions.push_back(Action::Unpause { task });
                }
                let cell = self.tasks.get_mut(&task).expect("live task");
                let pipe = cell.pipe.as_deref_mut().expect("websocket pipe");
                let dropped: usize = pipe.inbox.drain(..).map(|m| m.len()).sum();
                pipe.outbox.push_back(Outgoing::Close {
                    code,
                    reason: reason.clone(),
                });
                pipe.close = Some((code, reason));
                let readers = pipe.reader.take();
                self.held -= dropped as u64;
                self.wake_later.extend(readers);
                self.wake_io(task);
                self.arm(task, Timeout::Close);
            }
            (TaskState::Running | TaskState::Suspended, _) => self.cancel(task),
        }
    }

    /// The close frame of a websocket: the peer's, or ours while the peer's is awaited.
    pub(crate) fn close_frame(&self, task: TaskId) -> Option<(u16, String)> {
        match self.tasks.get(&task) {
            Some(cell) => cell.pipe.as_deref().and_then(|p| p.close.clone()),
            None => self.ends.get(&task).and_then(|end| end.close.clone()),
        }
    }

    // ---- the driver's inputs ----

    /// What the task's IO may read now; `None` once it must stop reading for good.
    pub(crate) fn intake(&mut self, task: TaskId, waker: Option<&Waker>) -> Poll<Option<Intake>> {
        let cap = self.config.read_ahead;
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Poll::Ready(None);
        };
        let (state, kind, open) = (cell.state, cell.kind, cell.exchange == Exchange::Open);
        let Some(pipe) = cell.pipe.as_deref_mut() else {
            return Poll::Ready(None);
        };
        let intake = match (kind, state) {
            (TaskKind::WebSocket, TaskState::Canceling) => Some(Intake::Discard),
            // R7: a suspended task reads nothing.
            (_, TaskState::Running) if open => match kind {
                TaskKind::Stream if pipe.reading != Reading::Open => {
                    return Poll::Ready(None);
                }
                TaskKind::Stream => Some(cap - pipe.queue.len())
                    .filter(|room| *room > 0)
                    .map(Intake::Read),
                _ => pipe.inbox.is_empty().then_some(Intake::Read(usize::MAX)),
            },
            _ => None,
        };
        match intake {
            Some(intake) => Poll::Ready(Some(intake)),
            None => {
                register(&mut pipe.io, waker);
                Poll::Pending
            }
        }
    }

    /// The IO read `data` from a stream's socket; the engine takes what the read-ahead has room
    /// for (all of it, if the IO asked [`Engine::intake`] first) and returns how much.
    pub(crate) fn stream_data(&mut self, task: TaskId, data: &[u8]) -> usize {
        let cap = self.config.read_ahead;
        let Some(pipe) = self.pipe_mut(task) else {
            return 0;
        };
        if pipe.reading == Reading::Closed {
            return data.len(); // Nobody will read it: dropped, as the socket's rest will be.
        }
        let n = data.len().min(cap - pipe.queue.len());
        if n > 0 {
            if pipe.queue.capacity() == 0 {
                pipe.queue.reserve(cap);
            }
            pipe.queue.extend_from_slice(&data[..n]);
            let reader = pipe.reader.take();
            self.wake_later.extend(reader);
            self.hold(n as u64);
        }
        n
    }

    /// The peer ended the stream (a FIN, or the end of a response's body).
    pub(crate) fn stream_end(&mut self, task: TaskId) {
        if let Some(pipe) = self.pipe_mut(task) {
            pipe.reading.end();
            let reader = pipe.reader.take();
            self.wake_later.extend(reader);
        }
    }

    /// A websocket's upgrade was accepted.
    pub(crate) fn ws_opened(&mut self, task: TaskId, protocol: Option<String>) {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return;
        };
        if cell.exchange != Exchange::AwaitingResponse {
            return;
        }
        cell.exchange = Exchange::Open;
        // It waits on its user now, not on the server: no timer runs for an open websocket.
        self.disarm_all(task);
        if self.config.kind == SessionKind::Delegated {
            self.say(Callback::Open { task, protocol });
        }
        self.wake_io(task);
    }

    /// The IO read a websocket message.
    pub(crate) fn ws_message(&mut self, task: TaskId, message: Message) {
        let closing = self.task_state(task) == TaskState::Canceling;
        let Some(pipe) = self.pipe_mut(task) else {
            return;
        };
        if closing {
            return; // A closing websocket drops what still arrives (R11).
        }
        let len = message.len() as u64;
        pipe.inbox.push_back(message);
        let reader = pipe.reader.take();
        self.wake_later.extend(reader);
        self.hold(len);
    }

    /// A pong arrived: it answers the oldest unanswered ping.
    pub(crate) fn ws_pong(&mut self, task: TaskId) {
        if let Some(pipe) = self.pipe_mut(task) {
            pipe.pongs = (pipe.pongs + 1).min(pipe.pings);
            let pingers = mem::take(&mut pipe.pingers);
            self.wake_later.extend(pingers);
        }
    }

    /// The peer's close frame arrived, with `code` if it carried one (and the IO has answered
    /// it, if it was first): the handshake is done, the websocket completes and its connection
    /// closes. A code no close frame may carry is the peer breaking the protocol: the websocket
    /// fails with [`Error::WebSocketProtocol`] and no `did_close`, whose code would be one the
    /// peer never sent.
    pub(crate) fn ws_peer_closed(&mut self, task: TaskId, code: Option<u16>, reason: String) {
        let Some(pipe) = self.pipe_mut(task) else {
            return;
        };
        let code = match code {
            None => NO_STATUS,
            Some(code) if close_code_allowed(code) => code,
            Some(code) => {
                let error = Error::WebSocketProtocol(format!(
                    "the peer's close frame carries the code {code}, which no close frame may \
                     carry (RFC 6455, 7.4)"
                ));
                self.complete(task, Err(error), EndedBy::Other);
                return;
            }
        };
        pipe.close = Some((code, reason.clone()));
        if self.config.kind == SessionKind::Delegated {
            self.say(Callback::Close { task, code, reason });
        }
        self.complete(task, Ok(()), EndedBy::Other);
    }

    /// The next thing the IO must write; `None` once the task is gone.
    pub(crate) fn outgoing(
        &mut self,
        task: TaskId,
        waker: Option<&Waker>,
    ) -> Poll<Option<Outgoing>> {
        let Some(cell) = self.tasks.get_mut(&task) else {
            return Poll::Ready(None);
        };
        // Suspending stops reading (R7); what the user wrote still goes out, and so do a
        // closing websocket's close frame and what was queued before it (R11).
        let moving = match cell.state {
            TaskState::Running | TaskState::Suspended => cell.exchange == Exchange::Open,
            TaskState::Canceling => true,
            TaskState::Completed => false,
        };
        let Some(pipe) = cell.pipe.as_deref_mut() else {
            return Poll::Ready(None);
        };
        match pipe.outbox.pop_front().filter(|_| moving) {
            Some(item) => {
                pipe.in_flight = match &item {
                    Outgoing::Bytes(bytes) => bytes.len(),
                    Outgoing::Message(message) => message.len(),
                    _ => 0,
                };
                pipe.writing.took(&item);
                Poll::Ready(Some(item))
            }
            None => {
                register(&mut pipe.io, waker);
                Poll::Pending
            }
        }
    }

    /// The IO wrote the item it took last.
    pub(crate) fn sent(&mut self, task: TaskId) {
        let Some(pipe) = self.pipe_mut(task) else {
            return;
        };
        pipe.unsent -= mem::take(&mut pipe.in_flight);
        // Once the end is written, and only then, may a stream whose read half is closed
        // complete.
        pipe.writing.sent();
        let writer = pipe.writer.take();
        self.wake_later.extend(writer);
        self.finish_stream_if_closed(task);
    }

    // ---- transitions ----

    /// The delegate answered `BecomeStream` for a data task: its body is read through a
    /// stream's window from now on, and the delegate gets the stream's handle.
    pub(super) fn become_stream(&mut self, task: TaskId) {
        let cell = self.tasks.get_mut(&task).expect("live task");
        cell.kind = TaskKind::Stream;
        cell.exchange = Exchange::Open;
        cell.pipe = Some(Pipe::response());
        // The delegate's handle counts from now: the stream cannot be cancelled for want of
        // one before it is delivered.
        cell.handles += 1;
        // A stream waits on its user, not on the server.
        self.disarm_all(task);
        self.say(Callback::BecomeStream { task, stream: None });
        self.actions.push_back(Action::ReadStream { task });
        // Its connection is the stream's now, out of the origin's HTTP slots: a task waiting
        // for one takes it.
        let origin = self.tasks[&task].origin.clone();
        self.admit(&origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_half_ends_once_and_a_closed_one_stays_closed() {
        let mut reading = Reading::Open;
        reading.end();
        assert_eq!(reading, Reading::Ended);
        reading.end();
        assert_eq!(reading, Reading::Ended);
        let mut closed = Reading::Closed;
        closed.end();
        assert_eq!(closed, Reading::Closed);
    }

    #[test]
    fn the_write_half_is_closed_only_once_its_shutdown_is_written() {
        let mut writing = Writing::Open;
        assert!(writing.close(true));
        assert_eq!(writing, Writing::Closing);
        assert!(!writing.close(true), "closed once");
        // What was written before the shutdown goes out first.
        writing.took(&Outgoing::Bytes(Bytes::from_static(b"x")));
        writing.sent();
        assert_eq!(writing, Writing::Closing);
        writing.took(&Outgoing::Shutdown);
        assert_eq!(writing, Writing::Shutting);
        writing.sent();
        assert_eq!(writing, Writing::Closed);
    }

    #[test]
    fn a_write_half_with_no_connection_has_nothing_to_shut() {
        let mut writing = Writing::Open;
        assert!(writing.close(false));
        assert_eq!(writing, Writing::Closed);
        assert_eq!(Pipe::response().writing, Writing::Closed);
    }
}
