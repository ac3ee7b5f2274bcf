//! The stage's raw TCP listeners, for stream tasks: no HTTP, only bytes.
//!
//! [`Stage::listen_raw`] opens a listener of its own on 127.0.0.1 (an ephemeral port, the
//! builder's `send_buffer` and `recv_buffer`; on the stage's simulated network if it has one),
//! owned by the stage and stopped with it; every connection it accepts plays its
//! [`RawScript`]:
//!
//! - [`RawScript::offer`]`(N)`: writes N bytes of [`body`](super::body) as fast as the client
//!   reads, then ends as its [`RawEnding`] says; by default [`RawEnding::End`]: a FIN (shutdown
//!   of the write side), then it reads on until the client closes.
//! - [`RawScript::paced`]`(N, bytes, pause)`: the same, `bytes` per write and `pause` between
//!   writes.
//! - [`RawScript::echo`]: writes back what it reads, one read at a time (no read-ahead while a
//!   write waits), until the client closes or shuts down its write side; then it closes.
//! - [`RawScript::hold`]`(KEY)`: parked until the test takes it with [`Stage::held_raw`] and
//!   drives it through [`HeldRaw`].
//!
//! While it writes or waits, a raw connection reads what the client sends (counted, and kept
//! for [`HeldRaw::received`]), so that the client's close is seen at once; echo aside, where a
//! write that waits stops the reading, so that the client meets backpressure too.
//!
//! Counts: [`Stage::raw_bytes_written`] is the bytes `write` took (the kernel's buffers
//! included), the backpressure witness: with a small `send_buffer` and a client that does not
//! read, it stays near the two sockets' buffer sizes however large the offer.
//! [`Stage::raw_bytes_received`] is the bytes read from clients. A raw socket is in
//! [`Stage::accepted`] and [`Stage::raw_accepted`], and closed once, in [`Stage::closed`] and
//! [`Stage::raw_closed`]: when a read returns 0 (the client closed, or shut down its write
//! side) or fails (reset), or when the stage closes it as scripted. A held connection whose
//! client shut down only its write side is counted closed then, but the stage keeps its own
//! side open for the test's steps (a half-close is TCP: the client may still read).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{
    Answer, Clock, DEFAULT_CHUNK, Hangup, Listener, Liveness, PATTERN, POLL, Reply, Shared, Socket,
    Stage, TILE, Wire, carry_out, within,
};

/// The most bytes a held raw connection keeps for [`HeldRaw::received`]; past it bytes are
/// counted, not kept.
pub const MAX_KEPT: usize = 16 << 20;

/// Bytes per read.
const READ_CHUNK: usize = 16 * 1024;

/// What every connection to a raw listener does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawScript {
    /// Writes `len` bytes of [`body`](super::body), in writes of `pace.bytes` with `pace.pause`
    /// between them if paced, as fast as the client reads otherwise; then ends as `then` says.
    Offer {
        len: u64,
        pace: Option<Pace>,
        then: RawEnding,
    },
    /// Writes back what it reads.
    Echo,
    /// Parks each connection under the key for [`Stage::held_raw`].
    Hold(String),
}

/// Bytes per write and the pause between writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub bytes: usize,
    pub pause: Duration,
}

/// How an offer ends once its bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RawEnding {
    /// A FIN (shutdown of the write side); then it reads on until the client closes.
    #[default]
    End,
    /// No FIN: the connection stays open, reading, until the client closes it.
    Hold,
    /// A clean close.
    Close,
    /// A reset (`SO_LINGER` 0, then close).
    Reset,
}

impl RawScript {
    /// Writes `len` bytes as fast as the client reads, then ends with [`RawEnding::End`].
    pub fn offer(len: u64) -> RawScript {
        RawScript::Offer {
            len,
            pace: None,
            then: RawEnding::End,
        }
    }

    /// Writes `len` bytes, `bytes` per write (at least 1) with `pause` between writes, then ends
    /// with [`RawEnding::End`].
    pub fn paced(len: u64, bytes: usize, pause: Duration) -> RawScript {
        RawScript::Offer {
            len,
            pace: Some(Pace {
                bytes: bytes.max(1),
                pause,
            }),
            then: RawEnding::End,
        }
    }

    /// Writes back what it reads.
    pub fn echo() -> RawScript {
        RawScript::Echo
    }

    /// Parks each connection under `key` for [`Stage::held_raw`].
    pub fn hold(key: impl Into<String>) -> RawScript {
        RawScript::Hold(key.into())
    }

    /// An offer that ends as `ending` says; other scripts are left as they are.
    pub fn then(self, ending: RawEnding) -> RawScript {
        match self {
            RawScript::Offer { len, pace, .. } => RawScript::Offer {
                len,
                pace,
                then: ending,
            },
            script => script,
        }
    }
}

impl Stage {
    /// Opens a raw TCP listener whose every connection plays `script`, and returns its
    /// address. It uses the builder's buffer sizes, counts in the stage's witness, and stops
    /// with the stage, its connections aborted. Call it as often as there are scripts to play.
    pub async fn listen_raw(&self, script: RawScript) -> io::Result<SocketAddr> {
        let on = self.sim.as_ref().map(|sim| (&sim.net, &sim.all));
        let listener = self.buffers.listen(on)?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(accept(listener, script, Arc::clone(&self.shared)));
        let mut listeners = self
            .raw_listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners.push(accept);
        Ok(addr)
    }

    /// Raw connections accepted so far (also in [`Stage::accepted`]).
    pub fn raw_accepted(&self) -> u64 {
        self.shared.counters.raw_accepted.load(Relaxed)
    }

    /// Raw connections closed so far (also in [`Stage::closed`]).
    pub fn raw_closed(&self) -> u64 {
        self.shared.counters.raw_closed.load(Relaxed)
    }

    /// Raw connections accepted and not yet closed.
    pub fn raw_open(&self) -> u64 {
        let closed = self.raw_closed();
        self.raw_accepted().saturating_sub(closed)
    }

    /// Bytes raw connections handed to the kernel (`write` returned): the backpressure witness.
    /// Counts what sits in socket buffers too: see DESIGN.md's pitfall on loopback buffering.
    pub fn raw_bytes_written(&self) -> u64 {
        self.shared.counters.raw_bytes_written.load(Relaxed)
    }

    /// Bytes raw connections read from their clients.
    pub fn raw_bytes_received(&self) -> u64 {
        self.shared.counters.raw_bytes_received.load(Relaxed)
    }

    /// Waits for a raw connection held under `key` ([`RawScript::hold`]) and takes it; `None`
    /// if none comes within `timeout`. Connections with the same key are taken in arrival
    /// order.
    pub async fn held_raw(&self, key: &str, timeout: Duration) -> Option<HeldRaw> {
        let clock = self.shared.clock;
        self.shared.parked_raw.take(clock, key, timeout).await
    }
}

/// A raw connection held by [`RawScript::hold`], driven by the test.
///
/// It reads what the client sends all along, keeping it for [`HeldRaw::received`]. Each step
/// waits until the connection has carried it out (its bytes written), at most
/// [`STEP_TIMEOUT`](super::STEP_TIMEOUT), and fails with `NotConnected` once the connection is
/// gone. The steps that close the connection take the handle; dropping it without one closes
/// the connection (a clean close): keep it until the client has closed when that close must be
/// the client's.
#[derive(Debug)]
pub struct HeldRaw {
    steps: mpsc::UnboundedSender<(RawStep, Reply)>,
    kept: Arc<Kept>,
    open: Liveness,
    clock: Clock,
}

impl HeldRaw {
    /// Sends `bytes` more bytes, continuing [`body`](super::body). `InvalidInput` after
    /// [`HeldRaw::end`].
    pub async fn send(&self, bytes: u64) -> io::Result<()> {
        self.step(RawStep::Send(bytes)).await
    }

    /// Shuts down the write side (a FIN); the connection reads on until the client closes.
    pub async fn end(&self) -> io::Result<()> {
        self.step(RawStep::End).await
    }

    /// Resets the connection (`SO_LINGER` 0, then close); returns once the close is counted.
    pub async fn reset(self) -> io::Result<()> {
        self.step(RawStep::Reset).await
    }

    /// Closes the connection cleanly; returns once the close is counted.
    pub async fn close(self) -> io::Result<()> {
        self.step(RawStep::Close).await
    }

    /// The bytes read from the client so far (the first [`MAX_KEPT`] of them).
    pub fn received(&self) -> Vec<u8> {
        self.kept
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many bytes were read from the client so far.
    pub fn received_len(&self) -> u64 {
        self.kept.len.load(Relaxed)
    }

    /// Waits until at least `len` bytes were read from the client; false if `timeout` passes
    /// first.
    pub async fn wait_received(&self, len: u64, timeout: Duration) -> bool {
        within(self.clock, timeout, async {
            while self.received_len() < len {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
        .is_some()
    }

    /// Whether this connection is still open, now and after this handle is gone.
    pub fn liveness(&self) -> Liveness {
        self.open.clone()
    }

    async fn step(&self, step: RawStep) -> io::Result<()> {
        carry_out(self.clock, &self.steps, step).await
    }
}

/// What [`RawConn::write_all`] woke up for.
enum Moved {
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
}

#[derive(Debug)]
enum RawStep {
    Send(u64),
    End,
    Reset,
    Close,
}

/// What a held connection read from its client.
#[derive(Debug, Default)]
struct Kept {
    bytes: Mutex<Vec<u8>>,
    len: AtomicU64,
}

async fn accept(listener: Listener, script: RawScript, shared: Arc<Shared>) {
    // Dropped with this task when the stage drops, aborting every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.counters.accepted.fetch_add(1, Relaxed);
                    shared.counters.raw_accepted.fetch_add(1, Relaxed);
                    connections.spawn(serve(stream, script.clone(), Arc::clone(&shared)));
                }
                // Out of descriptors, say: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn serve(socket: Socket, script: RawScript, shared: Arc<Shared>) {
    let stream = socket.wire();
    let mut conn = RawConn {
        liveness: Liveness::of(&stream),
        stream,
        shared: Arc::clone(&shared),
        kept: None,
        half_closed: false,
        buf: vec![0; READ_CHUNK],
    };
    let (hangup, answer) = conn.run(script).await;
    let liveness = conn.liveness.clone();
    conn.hang_up(hangup).await;
    // Counted closed after its socket is, unless a held connection's client half-closed it
    // and it was counted then.
    if liveness.is_open() {
        count_closed(&liveness, &shared);
    }
    if let Some((reply, result)) = answer {
        let _ = reply.send(result);
    }
}

/// The one place a raw connection is counted closed.
fn count_closed(liveness: &Liveness, shared: &Shared) {
    liveness.closed();
    shared.counters.closed.fetch_add(1, Relaxed);
    shared.counters.raw_closed.fetch_add(1, Relaxed);
}

struct RawConn {
    stream: Wire,
    shared: Arc<Shared>,
    /// Told when the connection closes.
    liveness: Liveness,
    /// A held connection's client shut down its write side (counted closed then).
    half_closed: bool,
    /// Where a held connection keeps what it reads.
    kept: Option<Arc<Kept>>,
    /// For reads.
    buf: Vec<u8>,
}

/// Counts (and keeps, when held) bytes read from the client.
fn took(shared: &Shared, kept: Option<&Kept>, bytes: &[u8]) {
    let n = bytes.len() as u64;
    shared.counters.raw_bytes_received.fetch_add(n, Relaxed);
    if let Some(kept) = kept {
        let mut kept_bytes = kept.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let room = MAX_KEPT.saturating_sub(kept_bytes.len());
        kept_bytes.extend_from_slice(&bytes[..bytes.len().min(room)]);
        kept.len.fetch_add(n, Relaxed);
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the client closed the connection",
    )
}

impl RawConn {
    /// Plays the script until the connection ends; a held step that ended it comes back to be
    /// answered after the close.
    async fn run(&mut self, script: RawScript) -> (Hangup, Option<Answer>) {
        match script {
            RawScript::Offer { len, pace, then } => {
                let (bytes, pause) = pace.map_or((len, Duration::ZERO), |pace| {
                    (pace.bytes.max(1) as u64, pace.pause)
                });
                if let Err(hangup) = self.send_body(0, len, bytes, pause).await {
                    return (hangup, None);
                }
                let hangup = match then {
                    RawEnding::End => match self.stream.shutdown().await {
                        Ok(()) => Hangup::WaitForClient,
                        Err(_) => Hangup::Gone,
                    },
                    RawEnding::Hold => Hangup::WaitForClient,
                    RawEnding::Close => Hangup::Fin,
                    RawEnding::Reset => Hangup::Reset,
                };
                (hangup, None)
            }
            RawScript::Echo => (self.echo().await, None),
            RawScript::Hold(key) => self.hold(key).await,
        }
    }

    /// Writes bytes `offset..offset + len` of [`body`](super::body), `per_write` bytes at a time
    /// with `pause` between writes. `Err` with how to hang up when the client went away.
    async fn send_body(
        &mut self,
        offset: u64,
        len: u64,
        per_write: u64,
        pause: Duration,
    ) -> Result<(), Hangup> {
        let mut done = 0;
        while done < len {
            if done > 0 {
                self.pause(pause).await?;
            }
            let end = done + (len - done).min(per_write);
            while done < end {
                let start = ((offset + done) % PATTERN.len() as u64) as usize;
                let n = (end - done).min(DEFAULT_CHUNK as u64) as usize;
                self.write_all(&TILE[start..start + n]).await?;
                done += n as u64;
            }
        }
        Ok(())
    }

    /// Writes all of `bytes` as the client takes them, reading meanwhile: whichever of the
    /// write and a read is ready, the write first.
    async fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), Hangup> {
        let RawConn {
            stream,
            shared,
            kept,
            buf,
            half_closed,
            liveness,
        } = self;
        while !bytes.is_empty() {
            let reading = !*half_closed;
            let event = poll_fn(|cx| {
                if let Poll::Ready(written) = Pin::new(&mut *stream).poll_write(cx, bytes) {
                    return Poll::Ready(Moved::Wrote(written));
                }
                if reading {
                    let mut into = ReadBuf::new(buf);
                    if let Poll::Ready(read) = Pin::new(&mut *stream).poll_read(cx, &mut into) {
                        return Poll::Ready(Moved::Read(read.map(|()| into.filled().len())));
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Moved::Read(Ok(n @ 1..)) => took(shared, kept.as_deref(), &buf[..n]),
                // A held connection's client shut its write side: it may still read.
                Moved::Read(Ok(0)) if kept.is_some() => {
                    *half_closed = true;
                    count_closed(liveness, shared);
                }
                Moved::Read(Ok(0) | Err(_)) => return Err(Hangup::Gone),
                Moved::Wrote(Ok(n @ 1..)) => {
                    shared
                        .counters
                        .raw_bytes_written
                        .fetch_add(n as u64, Relaxed);
                    bytes = &bytes[n..];
                }
                Moved::Wrote(Ok(0) | Err(_)) => return Err(Hangup::Gone),
            }
        }
        Ok(())
    }

    /// Sleeps, reading meanwhile so that a client closing ends the wait.
    async fn pause(&mut self, duration: Duration) -> Result<(), Hangup> {
        if duration.is_zero() {
            return Ok(());
        }
        let sleep = tokio::time::sleep(duration);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = &mut sleep => return Ok(()),
                read = self.read_some() => read?,
            }
        }
    }

    /// Reads once: `Err(Gone)` when the client closed (read 0) or the socket failed.
    async fn read_some(&mut self) -> Result<(), Hangup> {
        match self.stream.read(&mut self.buf).await {
            Ok(n @ 1..) => {
                took(&self.shared, self.kept.as_deref(), &self.buf[..n]);
                Ok(())
            }
            Ok(0) | Err(_) => Err(Hangup::Gone),
        }
    }

    /// Writes back each read before the next one.
    async fn echo(&mut self) -> Hangup {
        loop {
            let n = match self.stream.read(&mut self.buf).await {
                Ok(n @ 1..) => n,
                // The client is done sending: nothing more to echo.
                Ok(0) => return Hangup::Fin,
                Err(_) => return Hangup::Gone,
            };
            took(&self.shared, None, &self.buf[..n]);
            let mut rest = &self.buf[..n];
            while !rest.is_empty() {
                match self.stream.write(rest).await {
                    Ok(written @ 1..) => {
                        self.shared
                            .counters
                            .raw_bytes_written
                            .fetch_add(written as u64, Relaxed);
                        rest = &rest[written..];
                    }
                    Ok(0) | Err(_) => return Hangup::Gone,
                }
            }
        }
    }

    /// Parks the connection for [`Stage::held_raw`] and carries out its steps, reading
    /// meanwhile.
    async fn hold(&mut self, key: String) -> (Hangup, Option<Answer>) {
        let kept = Arc::new(Kept::default());
        self.kept = Some(Arc::clone(&kept));
        let (steps_tx, mut steps) = mpsc::unbounded_channel();
        let held = HeldRaw {
            steps: steps_tx,
            kept,
            open: self.liveness.clone(),
            clock: self.shared.clock,
        };
        self.shared.parked_raw.park(key, held);
        let mut sent = 0;
        let mut ended = false;
        // The client shut down its write side: nothing more to read, but it may still read
        // what the test sends.
        let mut half_closed = false;
        loop {
            let (step, reply) = tokio::select! {
                biased;
                step = steps.recv() => match step {
                    Some(step) => step,
                    // The handle was dropped.
                    None => return (Hangup::Fin, None),
                },
                read = self.stream.read(&mut self.buf), if !half_closed => match read {
                    Ok(n @ 1..) => {
                        took(&self.shared, self.kept.as_deref(), &self.buf[..n]);
                        continue;
                    }
                    // Both sides have ended: the connection is over.
                    Ok(0) if ended => return (Hangup::Gone, None),
                    Ok(0) => {
                        half_closed = true;
                        self.half_closed = true;
                        count_closed(&self.liveness, &self.shared);
                        continue;
                    }
                    Err(_) => return (Hangup::Gone, None),
                },
            };
            match step {
                RawStep::Send(_) if ended => {
                    let why = "a send after the write side was shut down";
                    let _ = reply.send(Err(io::Error::new(io::ErrorKind::InvalidInput, why)));
                }
                RawStep::Send(n) => match self.send_body(sent, n, u64::MAX, Duration::ZERO).await {
                    Ok(()) => {
                        sent += n;
                        let _ = reply.send(Ok(()));
                    }
                    Err(hangup) => return (hangup, Some((reply, Err(gone())))),
                },
                RawStep::End => {
                    if !ended {
                        if let Err(e) = self.stream.shutdown().await {
                            return (Hangup::Gone, Some((reply, Err(e))));
                        }
                        ended = true;
                    }
                    let _ = reply.send(Ok(()));
                }
                // A close happens now: answer once it is counted.
                RawStep::Close => return (Hangup::Fin, Some((reply, Ok(())))),
                RawStep::Reset => return (Hangup::Reset, Some((reply, Ok(())))),
            }
        }
    }

    async fn hang_up(mut self, hangup: Hangup) {
        match hangup {
            Hangup::Fin => {
                let _ = self.stream.shutdown().await;
            }
            Hangup::Reset => self.stream.reset(),
            Hangup::WaitForClient => while self.read_some().await.is_ok() {},
            Hangup::Gone => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_build() {
        let paced = RawScript::paced(30, 0, Duration::from_millis(5)).then(RawEnding::Reset);
        assert_eq!(
            paced,
            RawScript::Offer {
                len: 30,
                pace: Some(Pace {
                    bytes: 1,
                    pause: Duration::from_millis(5)
                }),
                then: RawEnding::Reset,
            }
        );
        assert_eq!(RawScript::echo().then(RawEnding::Close), RawScript::Echo);
    }
}
