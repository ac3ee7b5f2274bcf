//! Stream tasks: bytes both ways over a TCP connection of the task's own
//! ([`Session::stream_task`](crate::Session::stream_task)), or a data task's response body read
//! through a stream ([`Disposition::BecomeStream`](crate::Disposition::BecomeStream)).
//!
//! Both directions are bounded (R6). The engine queues at most `stream_window - read_buffer`
//! unread bytes, and the IO reads the socket only when the engine says there is room, at most
//! that much and at most `read_buffer` at a time: a stream whose user does not read stops
//! reading the socket, so the peer meets backpressure instead of the client prefetching. What
//! the user writes waits in the engine's write buffer (at most `write_buffer` bytes) until the
//! IO has written it.
//!
//! The user's side is [`StreamTask`]: `read` and `write` with timeouts, `close_read` and
//! `close_write`, and the adapters Rust code expects: [`tokio::io::AsyncRead`],
//! [`tokio::io::AsyncWrite`] and a [`Stream`](futures_util::Stream) of chunks.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::exchange::{Control, unless_aborted, unpaused};
use crate::pool::{Origin, Socket};
use crate::session::Shared;
use crate::task::Task;
use crate::{
    ConnId, Core, Error, Intake, Operation, Outgoing, TaskHandle, TaskId, TaskState, Timeout,
};

/// A stream task: read and write bytes, each direction bounded (R6).
///
/// It starts suspended; [`resume`](Self::resume) connects (a direct stream) or lets the body be
/// read (a response's stream, which is read-only: writes fail with [`Error::WriteClosed`]).
/// Once both halves are closed (the end read, or [`close_read`](Self::close_read); and
/// [`close_write`](Self::close_write) written) the task completes and its connection closes;
/// streams never return a connection to the pool. Dropping every handle on a stream cancels
/// it.
///
/// `&StreamTask` is [`AsyncRead`] and [`AsyncWrite`] too, so one stream can be read and
/// written from two places at once; `StreamTask` is also a
/// [`Stream`](futures_util::Stream) of chunks.
#[derive(Debug)]
pub struct StreamTask {
    task: Task,
    /// The chunk stream ended (the end, or an error, was yielded).
    chunks_done: bool,
}

crate::task::session_task!(StreamTask, task);

impl StreamTask {
    pub(crate) fn new(task: Task) -> Self {
        Self {
            task,
            chunks_done: false,
        }
    }

    fn handle(&self) -> &TaskHandle {
        self.task.handle()
    }

    /// The task's id in its session.
    pub fn id(&self) -> TaskId {
        self.handle().id()
    }

    /// Where the task is in its lifecycle; `Completed` once both halves are closed, or it was
    /// cancelled or failed.
    pub fn state(&self) -> TaskState {
        self.handle().state()
    }

    /// Run the task: the first resume connects. Resumes do not nest.
    pub fn resume(&self) {
        self.handle().resume();
    }

    /// Stop reading and writing until resumed (R7): the socket is not read meanwhile.
    pub fn suspend(&self) {
        self.handle().suspend();
    }

    /// Cancel the task: `did_complete(Cancelled)`, its buffers dropped, its connection closed.
    pub fn cancel(&self) {
        self.handle().cancel();
    }

    /// The task's result once it is `Completed` (both halves closed, cancelled or failed): the
    /// one the delegate's `did_complete` gets. Awaiting it keeps nothing alive; it may be
    /// awaited after completion, and from several places at once.
    pub async fn result(&self) -> Result<(), Error> {
        poll_fn(|cx| self.handle().poll_result(cx)).await
    }

    /// Read between `min` and `max` bytes: `Some(bytes)` (empty only if `min` is 0 and nothing
    /// was there), `None` at the end of the stream. A `min` larger than the stream's queue can
    /// hold is lowered to it. Fails at once after [`close_read`](Self::close_read) or once the
    /// task is over (with its own error if it failed). It waits as long as it takes: bound it
    /// with `tokio::time::timeout` (dropping it early loses nothing: bytes that arrive stay
    /// queued for the next read), or use [`read`](Self::read).
    pub async fn read_some(&self, min: usize, max: usize) -> Result<Option<Bytes>, Error> {
        poll_fn(|cx| self.handle().poll_read(cx, min, max)).await
    }

    /// [`read_some`](Self::read_some) within `timeout`, URLSession's
    /// `readData(ofMinLength:maxLength:timeout:)`: [`Error::OpTimedOut`]`(Read)` if nothing
    /// could be read by then; the task goes on, and bytes that arrive stay queued for the next
    /// read.
    pub async fn read(
        &self,
        min: usize,
        max: usize,
        timeout: Duration,
    ) -> Result<Option<Bytes>, Error> {
        tokio::time::timeout(timeout, self.read_some(min, max))
            .await
            .unwrap_or(Err(Error::OpTimedOut(Operation::Read)))
    }

    /// Queue all of `data` for the stream's IO, waiting while the write buffer is full (its
    /// bound is the configuration's `write_buffer`). Returns once queued, not once written: see
    /// [`flushed`](Self::flushed). It waits as long as it takes: bound it with
    /// `tokio::time::timeout` (what was queued by then stays queued), or use
    /// [`write`](Self::write).
    pub async fn write_all(&self, data: impl AsRef<[u8]>) -> Result<(), Error> {
        let data = data.as_ref();
        let mut written = 0;
        while written < data.len() {
            written += poll_fn(|cx| self.handle().poll_write(cx, &data[written..])).await?;
        }
        Ok(())
    }

    /// [`write_all`](Self::write_all) within `timeout`, URLSession's
    /// `write(_:timeout:)`: [`Error::OpTimedOut`]`(Write)` if it could not all be queued by
    /// then; what was queued stays queued.
    pub async fn write(&self, data: impl AsRef<[u8]>, timeout: Duration) -> Result<(), Error> {
        tokio::time::timeout(timeout, self.write_all(data))
            .await
            .unwrap_or(Err(Error::OpTimedOut(Operation::Write)))
    }

    /// Wait until the IO has written everything queued, as long as it takes.
    pub async fn flushed(&self) -> Result<(), Error> {
        poll_fn(|cx| self.handle().poll_flush(cx)).await
    }

    /// [`flushed`](Self::flushed) within `timeout`: [`Error::OpTimedOut`]`(Flush)` after it.
    pub async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        tokio::time::timeout(timeout, self.flushed())
            .await
            .unwrap_or(Err(Error::OpTimedOut(Operation::Flush)))
    }

    /// No more reading: what the stream holds is dropped and the socket is not read again. A
    /// stream with both halves closed completes.
    pub fn close_read(&self) {
        self.handle().close_read();
    }

    /// No more writing: the end of the stream (a FIN) is sent after what was written. A stream
    /// with both halves closed completes.
    pub fn close_write(&self) {
        self.handle().close_write();
    }

    /// The chunk size of the [`Stream`](futures_util::Stream) adapter: a whole transport read.
    fn chunk(&self) -> usize {
        self.task.shared().config.read_buffer
    }
}

/// The error an IO adapter reports: the kind a caller of `std::io` expects, and the task's
/// [`Error`] inside (`io::Error::get_ref` and downcast to read it).
fn to_io(error: Error) -> io::Error {
    let kind = match &error {
        Error::ConnectionReset => io::ErrorKind::ConnectionReset,
        Error::ConnectionRefused { .. } => io::ErrorKind::ConnectionRefused,
        Error::TimedOut(_) | Error::OpTimedOut(_) => io::ErrorKind::TimedOut,
        Error::WriteClosed | Error::Closed(_) => io::ErrorKind::BrokenPipe,
        Error::Cancelled => io::ErrorKind::Interrupted,
        Error::Io(inner) => inner.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, error)
}

/// `AsyncRead` on a stream's handle: what is queued, up to the buffer's room. The end of the
/// stream, and a read half closed by `close_read`, read as the end (`Ok` with nothing filled).
fn poll_read_into(
    handle: &TaskHandle,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if buf.remaining() == 0 {
        return Poll::Ready(Ok(()));
    }
    match ready!(handle.poll_read(cx, 1, buf.remaining())) {
        Ok(Some(bytes)) => {
            buf.put_slice(&bytes);
            Poll::Ready(Ok(()))
        }
        Ok(None) | Err(Error::ReadClosed) => Poll::Ready(Ok(())),
        Err(error) => Poll::Ready(Err(to_io(error))),
    }
}

/// `AsyncWrite::poll_shutdown`: `close_write`, then wait until everything, the end included, is
/// handed to the IO. A stream that completed by it (its read half was closed already) has shut
/// down as asked.
fn poll_shutdown_of(handle: &TaskHandle, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    handle.close_write();
    match ready!(handle.poll_flush(cx)) {
        Ok(()) | Err(Error::Closed(_)) => Poll::Ready(Ok(())),
        Err(error) => Poll::Ready(Err(to_io(error))),
    }
}

impl AsyncRead for StreamTask {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_into(self.handle(), cx, buf)
    }
}

impl AsyncRead for &StreamTask {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_into(self.handle(), cx, buf)
    }
}

impl AsyncWrite for StreamTask {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.handle().poll_write(cx, buf).map_err(to_io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.handle().poll_flush(cx).map_err(to_io)
    }

    /// `close_write`, then flush.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_shutdown_of(self.handle(), cx)
    }
}

impl AsyncWrite for &StreamTask {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.handle().poll_write(cx, buf).map_err(to_io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.handle().poll_flush(cx).map_err(to_io)
    }

    /// `close_write`, then flush.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_shutdown_of(self.handle(), cx)
    }
}

/// The stream's bytes as they arrive, in chunks of at most `read_buffer` bytes; it ends at the
/// end of the stream (or after `close_read`), and after yielding the task's error once.
impl futures_util::Stream for StreamTask {
    type Item = Result<Bytes, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.chunks_done {
            return Poll::Ready(None);
        }
        let item = match ready!(this.handle().poll_read(cx, 1, this.chunk())) {
            Ok(Some(bytes)) => return Poll::Ready(Some(Ok(bytes))),
            Ok(None) | Err(Error::ReadClosed) => None,
            Err(error) => Some(Err(error)),
        };
        this.chunks_done = true;
        Poll::Ready(item)
    }
}

// ---- the IO of a direct stream ----

/// Run a direct stream's IO: connect to `origin`, then read as the engine lets it and write
/// what the engine hands over, until the task is over. Stops at once, closing the socket, when
/// the control says abort (cancel, both halves closed, invalidation).
pub(crate) async fn run(
    shared: Arc<Shared>,
    task: TaskId,
    conn: ConnId,
    origin: Origin,
    mut control: watch::Receiver<Control>,
) {
    let core = shared.core.clone();
    let read_buffer = shared.config.read_buffer;
    let connect_timeout = shared.config.request_timeout;
    let io = async {
        // The engine runs no timer for a stream; a connect that hangs is bounded here (R12).
        // Registered, so that the driver's abort closes it at once; dropped with this IO.
        let (socket, _registered) =
            tokio::time::timeout(connect_timeout, shared.pool.open(conn, &origin))
                .await
                .unwrap_or(Err(Error::TimedOut(Timeout::Request)))?;
        tracing::debug!(?task, addr = %origin.key(), "stream connected");
        let (mut reader, mut writer) = (socket.clone(), socket);
        tokio::try_join!(
            read_side(&core, task, &mut reader, read_buffer, control.clone()),
            write_side(&core, task, &mut writer),
        )?;
        Ok::<(), Error>(())
    };
    match unless_aborted(&control, io).await {
        // Aborted: the socket was dropped with the IO, so it is closed.
        None => tracing::debug!(?task, "stream aborted"),
        Some(Ok(())) => tracing::debug!(?task, "stream over"),
        Some(Err(error)) => {
            tracing::debug!(?task, %error, "stream failed");
            // R7: a suspended task hears of a failure once it is resumed.
            if unpaused(&mut control).await {
                core.failed(task, error);
            }
        }
    }
}

/// Read the socket into the engine's queue, never more than it has room for (R6) and never
/// while the task is suspended (R7). Ends when the engine says stop (the read half closed, or
/// the task over) or at the peer's end.
async fn read_side(
    core: &Core,
    task: TaskId,
    reader: &mut Socket,
    read_buffer: usize,
    mut control: watch::Receiver<Control>,
) -> Result<(), Error> {
    // Allocated at the first read: a stream that is never read holds no scratch.
    let mut scratch = Vec::new();
    loop {
        if !unpaused(&mut control).await {
            return Ok(()); // aborted: the caller drops the socket
        }
        let room = match poll_fn(|cx| core.poll_intake(task, cx)).await {
            Some(Intake::Read(room)) => room,
            // Not a stream's: read, and let the engine drop what no one will read.
            Some(Intake::Discard) => read_buffer,
            None => return Ok(()),
        };
        let want = room.min(read_buffer);
        if scratch.len() < want {
            scratch.resize(want, 0);
        }
        let read = tokio::select! {
            biased;
            // R7: suspended while waiting for bytes: stop waiting (a socket read that is
            // dropped loses nothing) and ask the engine again once resumed.
            _ = control.wait_for(|c| c.paused || c.aborted) => continue,
            read = reader.read(&mut scratch[..want]) => read,
        };
        // The read half may have closed while the read waited: then nothing reads this
        // socket any more, and what the read brought (bytes, the end, a reset) is nobody's. A
        // reset still ends the task if the user writes: the write meets it.
        let intake = poll_fn(|cx| Poll::Ready(core.poll_intake(task, cx))).await;
        if matches!(intake, Poll::Ready(None)) {
            return Ok(());
        }
        let read = read.map_err(io_error)?;
        if read == 0 {
            core.stream_end(task);
            return Ok(());
        }
        // All of it is taken: no more was read than the room.
        core.stream_data(task, &scratch[..read]);
    }
}

/// Write what the user queued, in order, reporting each item written. Ends when the task is
/// over.
async fn write_side(core: &Core, task: TaskId, writer: &mut Socket) -> Result<(), Error> {
    while let Some(item) = poll_fn(|cx| core.poll_outgoing(task, cx)).await {
        match item {
            Outgoing::Bytes(bytes) => writer.write_all(&bytes).await.map_err(io_error)?,
            Outgoing::Shutdown => writer.shutdown().await.map_err(io_error)?,
            other => tracing::debug!(?task, ?other, "not a stream's to write: dropped"),
        }
        core.sent(task);
    }
    Ok(())
}

/// A socket error as the task's error: the peer going away is a reset, the rest is IO.
fn io_error(error: io::Error) -> Error {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Error::ConnectionReset,
        _ => Error::Io(Arc::new(error)),
    }
}
