//! A deterministic in-memory network: listeners on synthetic addresses, connections made of
//! two in-memory byte pipes, and the client's transport over it.
//!
//! # What is simulated
//!
//! - **Addresses.** [`SimNet::bind`] puts a listener on a host (an IP address written out, as
//!   `127.0.0.1`, or a name) and a port; port 0 takes the next free one, counting up from
//!   [`FIRST_PORT`]. A client connects to a host and port ([`SimNet::dial`], or the session's
//!   transport: `SimNet` implements [`leakproof::Transport`]); nothing bound there is
//!   `ConnectionRefused`, as TCP's would be. A connection is established at once, into the
//!   listener's backlog, as the kernel's handshake would; [`SimListener::accept`] takes it.
//!   Each client end gets an ephemeral port of its own (from [`FIRST_EPHEMERAL`]), which the
//!   server sees as the peer's address.
//! - **Bytes.** A connection is two pipes, client to server and server to client, each with a
//!   capacity ([`Buffers`], per network and per listener): a write takes what fits and waits
//!   when the pipe is full, so a reader that does not read holds its writer back
//!   (backpressure), as TCP's windows do, with no kernel buffering to hide it.
//! - **Ends.** Shutting down an end's write side (`poll_shutdown`) is a FIN: the other end reads
//!   what is left, then the end of the stream; writing after it is `BrokenPipe`. Dropping an
//!   end is a close: its peer reads the end of the stream, and writing to it is `BrokenPipe`.
//!   [`ServerStream::reset`] is a TCP reset: the bytes the server had not read are lost, and
//!   its next read or write fails with `ConnectionReset`; the client reads what had reached
//!   it (the pipe's bytes, up to a stall), as a TCP receiver reads its receive queue, and
//!   then fails with `ConnectionReset`; its writes fail at once.
//! - **Faults**, scheduled per connection at a count of bytes written by the server
//!   ([`SimNet::schedule`] before the connection exists, [`ServerStream::schedule`] after):
//!   a reset, a half-close (the client reads the end of the stream there; the server's later
//!   writes vanish), a stall (nothing past that byte is delivered, the pipe fills, the server's
//!   writes wait), or garbage bytes slipped into the stream there.
//! - **Witnesses** ([`Tally`]): connections opened, client ends still alive (not dropped), and
//!   connections closed by the client (its end dropped or its write side shut down, counted
//!   once), per listener, per group of listeners (a stage's), and per network. They are the
//!   network's own account, independent of the client: a client end is alive until the value
//!   the client holds is dropped.
//!
//! # What is deterministic
//!
//! Everything: there is no OS socket, no thread, no clock and no randomness here. Ports are
//! handed out in order, bytes move only when an end is polled, and a blocked end is woken only
//! through the waker it left. On a current-thread tokio runtime (with the clock paused), the
//! same program makes the same moves in the same order on every run.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use leakproof::{Endpoint, Transport};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first port a listener bound to port 0 gets.
pub const FIRST_PORT: u16 = 10_000;
/// The first port a client end gets.
pub const FIRST_EPHEMERAL: u16 = 49_152;
/// The capacity of each pipe unless [`Buffers`] say otherwise.
pub const DEFAULT_BUFFER: usize = 64 * 1024;

/// The capacity of a connection's two pipes, in bytes: what a writer can put in ahead of its
/// reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    /// Client to server: what the client can write before the server reads.
    pub to_server: usize,
    /// Server to client: what the server can write before the client reads.
    pub to_client: usize,
}

impl Default for Buffers {
    fn default() -> Buffers {
        Buffers {
            to_server: DEFAULT_BUFFER,
            to_client: DEFAULT_BUFFER,
        }
    }
}

/// What the network does to a connection once the server has written a given number of bytes
/// ([`SimNet::schedule`], [`ServerStream::schedule`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// A reset: both ends' next read or write fails with `ConnectionReset`; unread bytes are
    /// lost.
    Reset,
    /// The client reads the end of the stream at this byte; what the server writes later is
    /// taken and dropped (the server is not told).
    HalfClose,
    /// Nothing past this byte reaches the client (not even the end of the stream); the pipe
    /// fills and the server's writes then wait.
    Stall,
    /// These bytes reach the client at this point of the stream, as if the server had sent
    /// them (they are not counted as written by the server).
    Garbage(Vec<u8>),
}

/// Counts of connections, kept by the network (see the module docs). Cheap to clone: clones
/// share the counts.
#[derive(Debug, Clone, Default)]
pub struct Tally(Arc<TallyCounts>);

#[derive(Debug, Default)]
struct TallyCounts {
    opened: AtomicU64,
    alive: AtomicU64,
    closed_by_client: AtomicU64,
}

impl Tally {
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Connections established (dialled and taken into a listener's backlog).
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Relaxed)
    }

    /// Client ends not dropped yet.
    pub fn client_ends_alive(&self) -> u64 {
        self.0.alive.load(Relaxed)
    }

    /// Connections the client closed: its end dropped, or its write side shut down; once each.
    pub fn closed_by_client(&self) -> u64 {
        self.0.closed_by_client.load(Relaxed)
    }
}

/// A simulated network. Cheap to clone: clones are the same network. As a
/// [`leakproof::Transport`] (plug a clone with `ConfigurationBuilder::transport`), it connects
/// a session to this network's listeners by the endpoint's host and port.
#[derive(Clone, Default)]
pub struct SimNet(Arc<Net>);

#[derive(Default)]
struct Net {
    state: Mutex<NetState>,
    tally: Tally,
}

#[derive(Default)]
struct NetState {
    listeners: HashMap<(String, u16), Arc<Listening>>,
    /// The next port to try for a listener bound to port 0 (`FIRST_PORT` when 0).
    next_port: u16,
    /// The next client end's port (`FIRST_EPHEMERAL` when 0).
    next_ephemeral: u16,
    buffers: Buffers,
    /// Faults for connections not made yet: (host, port, connection index) -> (after, fault).
    scheduled: HashMap<(String, u16, u64), Vec<(u64, Fault)>>,
}

impl fmt::Debug for SimNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.0.state);
        let mut listening: Vec<_> = state.listeners.keys().cloned().collect();
        listening.sort();
        f.debug_struct("SimNet")
            .field("listening", &listening)
            .field("opened", &self.0.tally.opened())
            .field("client_ends_alive", &self.0.tally.client_ends_alive())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimNet {
    /// A network with nothing bound, each pipe [`DEFAULT_BUFFER`] bytes.
    pub fn new() -> SimNet {
        SimNet::default()
    }

    /// A network whose connections get these pipe capacities (unless a listener's
    /// [`SimListener::set_buffers`] says otherwise).
    pub fn with_buffers(buffers: Buffers) -> SimNet {
        let net = SimNet::default();
        lock(&net.0.state).buffers = buffers;
        net
    }

    /// The whole network's counts.
    pub fn tally(&self) -> Tally {
        self.0.tally.clone()
    }

    /// Listens on `host` and `port` (0: the next free port from [`FIRST_PORT`]).
    /// `AddrInUse` if a listener is there already.
    pub fn bind(&self, host: &str, port: u16) -> io::Result<SimListener> {
        self.bind_in(host, port, None)
    }

    /// [`bind`](Self::bind), and count the listener's connections in `group` too (a tally
    /// shared by several listeners: a stage's HTTP and raw listeners, say).
    pub fn bind_in(&self, host: &str, port: u16, group: Option<&Tally>) -> io::Result<SimListener> {
        let mut state = lock(&self.0.state);
        let port = match port {
            0 => state.free_port(host)?,
            port if state.listeners.contains_key(&(host.to_owned(), port)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{host}:{port} is already bound on this simulated network"),
                ));
            }
            port => port,
        };
        let listening = Arc::new(Listening {
            host: host.to_owned(),
            port,
            tally: Tally::new(),
            group: group.cloned(),
            state: Mutex::new(Backlog {
                buffers: state.buffers,
                ..Backlog::default()
            }),
        });
        state
            .listeners
            .insert((host.to_owned(), port), Arc::clone(&listening));
        Ok(SimListener {
            listening,
            net: self.clone(),
        })
    }

    /// Connects to the listener at `host` and `port`: established at once, in its backlog.
    /// `ConnectionRefused` if nothing listens there.
    pub fn dial(&self, host: &str, port: u16) -> io::Result<ClientStream> {
        let mut state = lock(&self.0.state);
        let Some(listening) = state.listeners.get(&(host.to_owned(), port)).cloned() else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens at {host}:{port} on this simulated network"),
            ));
        };
        let client_port = state.ephemeral_port();
        let mut backlog = lock(&listening.state);
        let index = backlog.connections;
        backlog.connections += 1;
        let faults = state
            .scheduled
            .remove(&(host.to_owned(), port, index))
            .unwrap_or_default();
        drop(state);
        let mut tallies = vec![self.0.tally.clone(), listening.tally.clone()];
        tallies.extend(listening.group.clone());
        let link = Link::new(backlog.buffers, tallies, faults);
        let client = ClientStream {
            link: Arc::clone(&link),
            local: (host.to_owned(), client_port),
            remote: (host.to_owned(), port),
        };
        let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), client_port);
        backlog.queue.push_back((ServerStream { link, peer }, peer));
        if let Some(waker) = backlog.waker.take() {
            waker.wake();
        }
        Ok(client)
    }

    /// Schedules `fault` on the `connection`-th connection (0 first) that will be made to the
    /// listener at `host:port`, once its server has written `after` bytes. Faults of one
    /// connection apply in the order of their byte counts.
    pub fn schedule(&self, host: &str, port: u16, connection: u64, after: u64, fault: Fault) {
        let mut state = lock(&self.0.state);
        let faults = state
            .scheduled
            .entry((host.to_owned(), port, connection))
            .or_default();
        faults.push((after, fault));
    }
}

impl NetState {
    fn free_port(&mut self, host: &str) -> io::Result<u16> {
        for _ in 0..=u16::MAX {
            let port = if self.next_port == 0 {
                FIRST_PORT
            } else {
                self.next_port
            };
            self.next_port = port.checked_add(1).unwrap_or(FIRST_PORT);
            if !self.listeners.contains_key(&(host.to_owned(), port)) {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("no free port left on {host}"),
        ))
    }

    fn ephemeral_port(&mut self) -> u16 {
        let port = if self.next_ephemeral == 0 {
            FIRST_EPHEMERAL
        } else {
            self.next_ephemeral
        };
        self.next_ephemeral = port.checked_add(1).unwrap_or(FIRST_EPHEMERAL);
        port
    }
}

impl Transport for SimNet {
    type Stream = ClientStream;

    async fn connect(&self, to: Endpoint<'_>) -> io::Result<ClientStream> {
        self.dial(to.host(), to.port())
    }
}

/// A listener on a [`SimNet`]. Dropping it unbinds its address and resets the connections
/// still in its backlog, as closing a TCP listener does.
pub struct SimListener {
    listening: Arc<Listening>,
    net: SimNet,
}

struct Listening {
    host: String,
    port: u16,
    tally: Tally,
    group: Option<Tally>,
    state: Mutex<Backlog>,
}

#[derive(Default)]
struct Backlog {
    queue: VecDeque<(ServerStream, SocketAddr)>,
    waker: Option<Waker>,
    buffers: Buffers,
    /// Connections made so far: the next one's index for [`SimNet::schedule`].
    connections: u64,
}

impl fmt::Debug for SimListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimListener")
            .field("host", &self.listening.host)
            .field("port", &self.listening.port)
            .finish_non_exhaustive()
    }
}

impl SimListener {
    /// The host it listens on, as bound.
    pub fn host(&self) -> &str {
        &self.listening.host
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.listening.port
    }

    /// Its address, when its host is an IP address; `InvalidInput` for a name.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let ip: IpAddr = self.listening.host.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a name, not an IP address", self.listening.host),
            )
        })?;
        Ok(SocketAddr::new(ip, self.listening.port))
    }

    /// This listener's counts.
    pub fn tally(&self) -> Tally {
        self.listening.tally.clone()
    }

    /// The pipe capacities its next connection gets.
    pub fn buffers(&self) -> Buffers {
        lock(&self.listening.state).buffers
    }

    /// Pipe capacities for the connections made from now on.
    pub fn set_buffers(&self, buffers: Buffers) {
        lock(&self.listening.state).buffers = buffers;
    }

    /// The next connection, in the order they were made, and its client end's address.
    pub async fn accept(&self) -> io::Result<(ServerStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// [`accept`](Self::accept), as a poll.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(ServerStream, SocketAddr)>> {
        let mut backlog = lock(&self.listening.state);
        match backlog.queue.pop_front() {
            Some(accepted) => Poll::Ready(Ok(accepted)),
            None => {
                backlog.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for SimListener {
    fn drop(&mut self) {
        let key = (self.listening.host.clone(), self.listening.port);
        lock(&self.net.0.state).listeners.remove(&key);
        let waiting = std::mem::take(&mut lock(&self.listening.state).queue);
        for (stream, _) in waiting {
            stream.reset();
        }
    }
}

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    buf: VecDeque<u8>,
    capacity: usize,
    /// The writer shut down its side (or dropped its end): the reader gets the end of the
    /// stream once `buf` is drained.
    fin: bool,
    /// The reader dropped its end: writes fail.
    reader_gone: bool,
    /// Stalled: how many of `buf`'s first bytes may still be read; `None` when not stalled.
    deliverable: Option<usize>,
    /// Bytes the writer put in (injected garbage aside).
    written: u64,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl Pipe {
    fn new(capacity: usize) -> Pipe {
        Pipe {
            capacity: capacity.max(1),
            ..Pipe::default()
        }
    }

    fn wake_reader(&mut self) {
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let available = self
            .deliverable
            .map_or(self.buf.len(), |d| d.min(self.buf.len()));
        if available == 0 {
            if self.fin && self.buf.is_empty() && self.deliverable.is_none() {
                return Poll::Ready(Ok(()));
            }
            self.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = available.min(out.remaining());
        let (front, back) = self.buf.as_slices();
        let from_front = n.min(front.len());
        out.put_slice(&front[..from_front]);
        out.put_slice(&back[..n - from_front]);
        self.buf.drain(..n);
        if let Some(deliverable) = &mut self.deliverable {
            *deliverable -= n;
        }
        if n > 0 {
            self.wake_writer();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.reader_gone {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the peer closed the connection",
            )));
        }
        if self.fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "a write after this end's write side was shut down",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = self.capacity.saturating_sub(self.buf.len());
        if room == 0 {
            self.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        crate::heap::outside(|| self.buf.extend(&data[..n]));
        self.written += n as u64;
        self.wake_reader();
        Poll::Ready(Ok(n))
    }

    /// The writer's side ends: the reader reads what is left, then the end of the stream.
    fn finish(&mut self) {
        self.fin = true;
        self.wake_reader();
    }

    /// The reader's end is gone: what it did not read is dropped, writes fail.
    fn abandon(&mut self) {
        self.reader_gone = true;
        self.buf.clear();
        self.deliverable = None;
        self.wake_writer();
    }
}

/// A connection: both pipes, and what the network does to it.
struct Link {
    state: Mutex<LinkState>,
    /// The network's, the listener's, and the listener's group's.
    tallies: Vec<Tally>,
}

struct LinkState {
    /// Client to server.
    up: Pipe,
    /// Server to client.
    down: Pipe,
    reset: bool,
    /// A half-close fault cut the stream: the server's writes are dropped.
    truncated: bool,
    /// The client's close is counted.
    client_closed: bool,
    /// Faults to come, by the server's byte count.
    faults: VecDeque<(u64, Fault)>,
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the connection was reset")
}

impl Link {
    fn new(buffers: Buffers, tallies: Vec<Tally>, mut faults: Vec<(u64, Fault)>) -> Arc<Link> {
        for tally in &tallies {
            tally.0.opened.fetch_add(1, Relaxed);
            tally.0.alive.fetch_add(1, Relaxed);
        }
        faults.sort_by_key(|(after, _)| *after);
        let mut state = LinkState {
            up: Pipe::new(buffers.to_server),
            down: Pipe::new(buffers.to_client),
            reset: false,
            truncated: false,
            client_closed: false,
            faults: faults.into(),
        };
        state.apply_due_faults();
        Arc::new(Link {
            state: Mutex::new(state),
            tallies,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    /// Counts the client's close, once.
    fn client_closed(&self, state: &mut LinkState) {
        if !state.client_closed {
            state.client_closed = true;
            for tally in &self.tallies {
                tally.0.closed_by_client.fetch_add(1, Relaxed);
            }
        }
    }
}

impl LinkState {
    /// A reset: what the client sent and the server had not read is lost; what had reached
    /// the client (its receive buffer: the pipe's bytes up to a stall) stays readable, then
    /// its reads fail, as a TCP receiver's do.
    fn reset(&mut self) {
        self.reset = true;
        self.up.buf.clear();
        if let Some(deliverable) = self.down.deliverable.take() {
            self.down.buf.truncate(deliverable);
        }
        for pipe in [&mut self.up, &mut self.down] {
            pipe.deliverable = None;
            pipe.wake_reader();
            pipe.wake_writer();
        }
    }

    /// Applies every fault whose byte count the server has reached.
    fn apply_due_faults(&mut self) {
        while let Some((after, _)) = self.faults.front() {
            if *after > self.down.written {
                return;
            }
            let Some((_, fault)) = self.faults.pop_front() else {
                return;
            };
            match fault {
                Fault::Reset => self.reset(),
                Fault::HalfClose => {
                    self.truncated = true;
                    self.down.finish();
                }
                Fault::Stall => {
                    if self.down.deliverable.is_none() {
                        self.down.deliverable = Some(self.down.buf.len());
                    }
                }
                Fault::Garbage(bytes) => {
                    crate::heap::outside(|| self.down.buf.extend(bytes));
                    self.down.wake_reader();
                }
            }
        }
    }

    fn server_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.reset {
            return Poll::Ready(Err(reset_error()));
        }
        // Stop at the next fault's byte, so that it applies exactly there.
        let data = match self.faults.front() {
            Some((after, _)) => {
                let room = usize::try_from(after - self.down.written).unwrap_or(usize::MAX);
                &data[..data.len().min(room)]
            }
            None => data,
        };
        let n = if self.truncated {
            if self.down.reader_gone {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the peer closed the connection",
                )));
            }
            self.down.written += data.len() as u64;
            data.len()
        } else {
            match self.down.poll_write(cx, data) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            }
        };
        self.apply_due_faults();
        Poll::Ready(Ok(n))
    }
}

/// The client's end of a connection: the stream a session's transport yields. Dropping it is
/// the client's close (see [`Tally`]).
pub struct ClientStream {
    link: Arc<Link>,
    local: (String, u16),
    remote: (String, u16),
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("local_port", &self.local.1)
            .field(
                "remote",
                &format_args!("{}:{}", self.remote.0, self.remote.1),
            )
            .finish()
    }
}

impl ClientStream {
    /// The port of this end, as the server sees it.
    pub fn local_port(&self) -> u16 {
        self.local.1
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.link.lock();
        if state.reset && state.down.buf.is_empty() {
            return Poll::Ready(Err(reset_error()));
        }
        state.down.poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.link.lock();
        if state.reset {
            return Poll::Ready(Err(reset_error()));
        }
        state.up.poll_write(cx, buf)
    }

    /// Nothing to flush: a write is in the pipe once it returns (a TCP socket's flush is a
    /// no-op too, reset or not).
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A FIN: the server reads the end of the stream; counted as the client's close.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.link.lock();
        if state.reset {
            return Poll::Ready(Err(reset_error()));
        }
        state.up.finish();
        self.link.client_closed(&mut state);
        Poll::Ready(Ok(()))
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let mut state = self.link.lock();
        state.up.finish();
        state.down.abandon();
        self.link.client_closed(&mut state);
        for tally in &self.link.tallies {
            tally.0.alive.fetch_sub(1, Relaxed);
        }
    }
}

/// The server's end of a connection, from [`SimListener::accept`]. Dropping it is a close
/// (the client reads the end of the stream), unless it was reset.
pub struct ServerStream {
    link: Arc<Link>,
    peer: SocketAddr,
}

impl fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ServerStream {
    /// The client end's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Resets the connection: both ends' next read or write fails with `ConnectionReset`, and
    /// the bytes neither had read are lost.
    pub fn reset(&self) {
        self.link.lock().reset();
    }

    /// Schedules `fault` for when this end has written `after` bytes in all (at once if it
    /// has already).
    pub fn schedule(&self, after: u64, fault: Fault) {
        let mut state = self.link.lock();
        let at = state.faults.partition_point(|(a, _)| *a <= after);
        state.faults.insert(at, (after, fault));
        state.apply_due_faults();
    }

    /// Bytes this end has written, as the network took them.
    pub fn written(&self) -> u64 {
        self.link.lock().down.written
    }

    /// Whether the client's end is gone (dropped).
    pub fn client_dropped(&self) -> bool {
        self.link.lock().down.reader_gone
    }

    /// A handle that tells, for as long as it is kept, whether the client's end is gone.
    pub fn client_end(&self) -> ClientEnd {
        ClientEnd(Arc::clone(&self.link))
    }
}

/// The network's view of one connection's client end (see [`ServerStream::client_end`]).
#[derive(Clone)]
pub struct ClientEnd(Arc<Link>);

impl fmt::Debug for ClientEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEnd")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl ClientEnd {
    /// Whether the client has dropped its end.
    pub fn dropped(&self) -> bool {
        self.0.lock().down.reader_gone
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.link.lock();
        if state.reset {
            return Poll::Ready(Err(reset_error()));
        }
        state.up.poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.link.lock().server_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.link.lock().reset {
            true => Poll::Ready(Err(reset_error())),
            false => Poll::Ready(Ok(())),
        }
    }

    /// A FIN: the client reads what is left, then the end of the stream.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.link.lock();
        if state.reset {
            return Poll::Ready(Err(reset_error()));
        }
        state.down.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for ServerStream {
    fn drop(&mut self) {
        let mut state = self.link.lock();
        if !state.reset {
            state.down.finish();
            state.up.abandon();
        }
    }
}
