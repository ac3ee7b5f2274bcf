//! Connections: opening them and keeping the idle ones. Which connection a task gets, and how
//! many an origin may have (`max_connections_per_host`, busy and idle together, and
//! `max_idle_per_host`), is the engine's to decide: it names a new or pooled connection in
//! `Action::Start`, and says whether a released one is pooled or closed. The pool opens the
//! connections it is told to and holds the idle ones.
//!
//! Why a pool of our own on `hyper::client::conn` rather than hyper-util's legacy client:
//! the lifecycle rules need control hyper-util does not give. Invalidation must close every
//! idle connection at once (R4), and the legacy client closes them only when the whole client
//! is dropped. A response abandoned mid-body must close its connection, not pool it (R5),
//! and each connection must be accounted for by id in the engine's ledger. The legacy client
//! can also finish a connect in the background after its checkout lost a race, leaving a
//! socket no one accounts for. Here every connection is a [`Connection`] owned by exactly one
//! thing (an exchange, or the idle map), and dropping it closes the socket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::task::TaskTracker;

use crate::tls::TlsState;
use crate::transport::{Connected, Connector, Endpoint, Io};
use crate::{ConnId, Error};

/// A request body: bytes or a file, streamed.
pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// How a connection speaks to its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scheme {
    /// HTTP over TCP (`http://`, `ws://`).
    Http,
    /// HTTP over TLS (`https://`, `wss://`).
    Https,
    /// A direct stream's bytes over TCP.
    Tcp,
}

/// Where connections go: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// The origin's name for the engine's per-origin accounting: the scheme is part of it, so
    /// that http and https to one host and port never share a pooled connection.
    pub fn key(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tcp => "tcp",
        };
        let mut key = String::with_capacity(scheme.len() + 3 + self.host.len() + 8);
        key.push_str(scheme);
        key.push_str("://");
        self.push_addr(&mut key);
        key
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        let mut addr = String::with_capacity(self.host.len() + 8);
        self.push_addr(&mut addr);
        addr
    }

    /// Appends `host:port` (an IPv6 host in brackets) to `out`. Built by hand rather than
    /// with `format!`: every request asks for its origin's key.
    fn push_addr(&self, out: &mut String) {
        let v6 = self.host.contains(':');
        if v6 {
            out.push('[');
        }
        out.push_str(&self.host);
        if v6 {
            out.push(']');
        }
        out.push(':');
        let mut digits = [0u8; 5];
        let mut port = self.port;
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (port % 10) as u8;
            port /= 10;
            if port == 0 {
                break;
            }
        }
        for &digit in &digits[at..] {
            out.push(char::from(digit));
        }
    }
}

/// One HTTP/1.1 connection. Dropping it closes the socket there and then, and aborts the
/// task running hyper's connection future.
#[derive(Debug)]
pub(crate) struct Connection {
    pub sender: http1::SendRequest<Body>,
    /// Held for its Drop.
    _socket: Registered,
}

/// What a [`Socket`] carries: the transport's stream (TCP, kept as it is, or another
/// transport's, boxed), or TLS over it. The TLS connection lives inside the socket, so that
/// closing the socket drops it too (its buffers, and its hold on the session's TLS
/// configuration) there and then.
enum Wire {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Other(Box<dyn Io>),
    OtherTls(Box<TlsStream<Box<dyn Io>>>),
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wire::Tcp(stream) => f.debug_tuple("Tcp").field(stream).finish(),
            Wire::Tls(stream) => f.debug_tuple("Tls").field(stream).finish(),
            Wire::Other(_) => f.write_str("Other"),
            Wire::OtherTls(_) => f.write_str("OtherTls"),
        }
    }
}

/// Forward a poll to the wire's stream, whichever it is.
macro_rules! wire {
    ($wire:expr, $stream:ident => $poll:expr) => {
        match $wire {
            Wire::Tcp($stream) => $poll,
            Wire::Tls($stream) => $poll,
            Wire::Other($stream) => $poll,
            Wire::OtherTls($stream) => $poll,
        }
    };
}

/// A socket (TCP, or TLS over TCP) the session can close at once from outside the future that
/// reads it.
///
/// Its reader (hyper's connection future, a stream's or a websocket's IO) is a task of its
/// own, and aborting or waking a task only asks it to end some time later. A promise that
/// the socket is closed (`did_complete`, `did_become_invalid`, `invalidated()`, a
/// convenience's future returning) must be true when it is made, so the socket is shared
/// with its owner and the session's registry ([`Pool`]): the owner dropping it, or the driver
/// carrying out an `Abort`, closes it where it stands. Its reader then sees the end.
#[derive(Debug, Clone)]
pub(crate) struct Socket(Arc<Mutex<Option<Wire>>>);

impl Socket {
    fn new(wire: Wire) -> Self {
        Socket(Arc::new(Mutex::new(Some(wire))))
    }

    /// Close it now (the file descriptor is released); a no-op if it is closed already.
    fn close(&self) {
        let stream = lock(&self.0).take();
        drop(stream);
    }

    fn closed() -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the session closed this socket",
        )
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(wire) => wire!(wire, stream => Pin::new(stream).poll_read(cx, buf)),
            None => Poll::Ready(Err(Socket::closed())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(wire) => wire!(wire, stream => Pin::new(stream).poll_write(cx, buf)),
            None => Poll::Ready(Err(Socket::closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match lock(&self.0).as_mut() {
            Some(wire) => wire!(wire, stream => Pin::new(stream).poll_write_vectored(cx, bufs)),
            None => Poll::Ready(Err(Socket::closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // A TcpStream's are, and a TLS stream's gathers them into one record; another
        // transport's stream says for itself.
        match lock(&self.0).as_ref() {
            Some(Wire::Other(stream)) => stream.is_write_vectored(),
            _ => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(wire) => wire!(wire, stream => Pin::new(stream).poll_flush(cx)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).as_mut() {
            Some(wire) => wire!(wire, stream => Pin::new(stream).poll_shutdown(cx)),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// The session's open sockets by connection, with the task that reads each (hyper's
/// connection future), so that [`Pool::kill`] can close one at once.
type Sockets = Arc<Mutex<HashMap<ConnId, (Socket, Option<AbortHandle>)>>>;

/// An entry in the registry, held by the socket's owner: dropping it closes the socket,
/// aborts its reader and removes the entry, so the registry holds only live sockets.
#[derive(Debug)]
pub(crate) struct Registered {
    sockets: Sockets,
    id: ConnId,
    socket: Socket,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.socket.close();
        let reader = {
            let mut sockets = lock(&self.sockets);
            // A retry may have registered a new socket under the same id: leave it be.
            match sockets.get(&self.id) {
                Some((socket, _)) if Arc::ptr_eq(&socket.0, &self.socket.0) => {
                    sockets.remove(&self.id).and_then(|(_, reader)| reader)
                }
                _ => None,
            }
        };
        if let Some(reader) = reader {
            reader.abort();
        }
    }
}

/// The idle connections, since when each is idle, and which have an idle clock pending in
/// the driver. A connection reused and parked again keeps its pending clock, which, when it
/// rings, looks again from the later park: so a request does not wake the driver to restart a
/// clock.
#[derive(Debug, Default)]
struct Idle {
    /// By id, so that closing them all (`reset`, invalidation) goes in one order, the
    /// connections' own, run after run: a hash map's order changes with its random keys, and
    /// with it the order a simulated network sees the closes in.
    connections: BTreeMap<ConnId, (Connection, Instant)>,
    clocked: HashSet<ConnId>,
}

/// What the idle clock of a connection finds when it rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Idle the whole timeout: closed now.
    Closed,
    /// Parked again since: look again then.
    Later(Instant),
    /// Not in the pool (busy, or closed already): the clock stops.
    Gone,
}

/// What connections tell the session's driver.
#[derive(Debug)]
pub(crate) enum Note {
    /// An exchange pooled a connection that has no idle clock yet: start one.
    Parked(ConnId),
    /// The connection's socket is gone (the server closed it, or it failed).
    Closed(ConnId),
    /// The task's IO ended.
    IoEnded(crate::TaskId),
    /// For the suite: the task's `timeout` timer runs out now.
    #[cfg(feature = "test-util")]
    Expire(crate::TaskId, crate::Timeout),
    /// For the suite: every idle connection's idle timeout runs out now.
    #[cfg(feature = "test-util")]
    ExpireIdle,
    /// Close every idle connection now (`Session::reset`), then say so.
    CloseIdle(tokio::sync::oneshot::Sender<()>),
}

/// The session's connections that are not carrying an exchange. Which connection a task
/// gets, and how many an origin may have, is the engine's decision
/// (`Config::max_connections_per_origin`): this only keeps them.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<Idle>,
    sockets: Sockets,
    read_buffer: usize,
    runtime: Handle,
    /// Every future the session runs, so that its release can wait for the last one.
    tasks: TaskTracker,
    notes: mpsc::UnboundedSender<Note>,
    tls: Mutex<Tls>,
    /// How connections are opened (the configuration's transport).
    connector: Connector,
}

/// The session's TLS state, from its creation to its release.
#[derive(Debug)]
enum Tls {
    Ready(TlsState),
    /// The configuration could not be made: https fails with this.
    Failed(Error),
    /// The session is released: so is its TLS state.
    Released,
}

impl Pool {
    pub fn new(
        read_buffer: usize,
        runtime: Handle,
        tasks: TaskTracker,
        notes: mpsc::UnboundedSender<Note>,
        tls: Result<TlsState, Error>,
        connector: Connector,
    ) -> Self {
        Self {
            tasks,
            idle: Mutex::new(Idle::default()),
            sockets: Sockets::default(),
            read_buffer,
            runtime,
            notes,
            tls: Mutex::new(tls.map_or_else(Tls::Failed, Tls::Ready)),
            connector,
        }
    }

    /// TLS sessions cached for resumption.
    pub fn tls_sessions(&self) -> u32 {
        match &*lock(&self.tls) {
            Tls::Ready(state) => state.cached(),
            Tls::Failed(_) | Tls::Released => 0,
        }
    }

    /// Drop the TLS state (the client configuration and the resumption store): the session
    /// is released, every socket closed, so nothing holds it but this.
    pub fn release_tls(&self) {
        let state = std::mem::replace(&mut *lock(&self.tls), Tls::Released);
        drop(state);
    }

    /// A fresh TLS state for the connections opened from now on (`Session::reset`): the old
    /// store is emptied and dropped, but for the hold of connections still open on it.
    pub fn reset_tls(&self, config: &crate::config::Configuration) {
        let mut tls = lock(&self.tls);
        if let Tls::Ready(old) = &*tls {
            old.clear();
            *tls = TlsState::new(config).map_or_else(Tls::Failed, Tls::Ready);
        }
    }

    /// For the suite: the session's TLS client configuration, if it has not been released.
    #[cfg(feature = "test-util")]
    pub fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        match &*lock(&self.tls) {
            Tls::Ready(state) => Some(state.config().clone()),
            Tls::Failed(_) | Tls::Released => None,
        }
    }

    /// A TLS connection over `stream` to `origin`, with the session's configuration.
    async fn tls<S>(&self, stream: S, origin: &Origin) -> Result<TlsStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // The state is cloned out of the lock: the handshake is awaited without it.
        let config = match &*lock(&self.tls) {
            Tls::Ready(state) => Ok(state.clone()),
            Tls::Failed(error) => Err(error.clone()),
            Tls::Released => Err(Error::SessionInvalidated),
        };
        config?.connect(stream, &origin.host).await
    }

    pub fn note(&self, note: Note) {
        let _ = self.notes.send(note);
    }

    pub fn holds(&self, id: ConnId) -> bool {
        lock(&self.idle).connections.contains_key(&id)
    }

    /// Keep `connection` as `id` (an exchange parks it before asking the engine, see
    /// `leakproof_core::Core::body_end`). True if it needs an idle clock: it has none pending.
    pub fn park(&self, id: ConnId, connection: Connection) -> bool {
        let mut idle = lock(&self.idle);
        idle.connections.insert(id, (connection, Instant::now()));
        idle.clocked.insert(id)
    }

    /// Take the pooled connection `id`, if it is still there and still open.
    pub fn take(&self, id: ConnId) -> Option<Connection> {
        let taken = lock(&self.idle).connections.remove(&id);
        taken.map(|(c, _)| c).filter(|c| !c.sender.is_closed())
    }

    /// Close the pooled connection `id`; whether it was there.
    pub fn close(&self, id: ConnId) -> bool {
        let connection = {
            let mut idle = lock(&self.idle);
            idle.clocked.remove(&id);
            idle.connections.remove(&id)
        };
        connection.is_some() // dropped here, outside the lock
    }

    /// The idle clock of `id` rang after `timeout`.
    pub fn expire(&self, id: ConnId, timeout: Duration) -> Expiry {
        let mut idle = lock(&self.idle);
        let Some((_, since)) = idle.connections.get(&id) else {
            idle.clocked.remove(&id);
            return Expiry::Gone;
        };
        let due = *since + timeout;
        if due > Instant::now() {
            return Expiry::Later(due);
        }
        idle.clocked.remove(&id);
        let connection = idle.connections.remove(&id);
        drop(idle);
        drop(connection);
        Expiry::Closed
    }

    /// The idle connections' ids.
    pub fn idle_ids(&self) -> Vec<ConnId> {
        lock(&self.idle).connections.keys().copied().collect()
    }

    pub fn close_all(&self) {
        let all: Vec<_> = {
            let mut idle = lock(&self.idle);
            idle.clocked.clear();
            std::mem::take(&mut idle.connections).into_iter().collect()
        };
        drop(all);
    }

    /// Close the socket of connection `id` now, wherever it is (an exchange's, a stream's, a
    /// websocket's, or idle), and abort its reader: the driver carrying out `Abort`.
    pub fn kill(&self, id: ConnId) {
        let entry = lock(&self.sockets).remove(&id);
        if let Some((socket, reader)) = entry {
            socket.close();
            if let Some(reader) = reader {
                reader.abort();
            }
        }
    }

    /// Connect to `origin` as connection `id` (through the transport, and TLS over its stream
    /// for https): the socket, registered, and its registration, whose owner closes it by
    /// dropping it.
    pub async fn open(&self, id: ConnId, origin: &Origin) -> Result<(Socket, Registered), Error> {
        let connected = self
            .connector
            .connect(Endpoint::new(&origin.host, origin.port))
            .await
            .map_err(|e| connect_error(origin, e))?;
        // The handshake is within the connect the exchange awaits, so its request timeout
        // bounds it.
        let wire = match (connected, origin.scheme) {
            (Connected::Tcp(tcp), Scheme::Http | Scheme::Tcp) => Wire::Tcp(tcp),
            (Connected::Tcp(tcp), Scheme::Https) => {
                Wire::Tls(Box::new(self.tls(tcp, origin).await?))
            }
            (Connected::Other(stream), Scheme::Http | Scheme::Tcp) => Wire::Other(stream),
            (Connected::Other(stream), Scheme::Https) => {
                Wire::OtherTls(Box::new(self.tls(stream, origin).await?))
            }
        };
        let socket = Socket::new(wire);
        lock(&self.sockets).insert(id, (socket.clone(), None));
        let registered = Registered {
            sockets: self.sockets.clone(),
            id,
            socket: socket.clone(),
        };
        Ok((socket, registered))
    }

    /// Open the connection `id` to `origin`.
    pub async fn connect(&self, id: ConnId, origin: &Origin) -> Result<Connection, Error> {
        let (socket, registered) = self.open(id, origin).await?;
        let (sender, connection) = self.handshake(socket).await?;
        let notes = self.notes.clone();
        let io = self.tasks.spawn_on(
            async move {
                // Ends when the socket closes or the sender is dropped while idle; an idle
                // connection the server closed must leave the pool (and the ledger) now, not at
                // its idle timeout. (Aborted, it says nothing: whoever aborted it knows.)
                let _ = connection.await;
                let _ = notes.send(Note::Closed(id));
            },
            &self.runtime,
        );
        self.read_by(id, io.abort_handle());
        Ok(Connection {
            sender,
            _socket: registered,
        })
    }

    /// Open connection `id` for a websocket's upgrade: hyper's connection future is driven
    /// with upgrades, so that a `101` hands the socket to `hyper::upgrade::on`. It never joins
    /// the pool (a websocket keeps its connection, and closes it with itself), so it tells the
    /// driver nothing. Keep the returned connection as long as the websocket lives: dropping
    /// it closes the socket, the upgraded one too.
    pub async fn connect_for_upgrade(
        &self,
        id: ConnId,
        origin: &Origin,
    ) -> Result<Connection, Error> {
        let (socket, registered) = self.open(id, origin).await?;
        let (sender, connection) = self.handshake(socket).await?;
        let io = self.tasks.spawn_on(
            async move {
                let _ = connection.with_upgrades().await;
            },
            &self.runtime,
        );
        self.read_by(id, io.abort_handle());
        Ok(Connection {
            sender,
            _socket: registered,
        })
    }

    /// Connection `id`'s socket is read by that task: abort it with the socket.
    fn read_by(&self, id: ConnId, reader: AbortHandle) {
        match lock(&self.sockets).get_mut(&id) {
            Some((_, slot)) => *slot = Some(reader),
            None => reader.abort(), // killed meanwhile
        }
    }

    /// Start HTTP/1.1 on the socket, hyper's read buffer bounded by the configuration's
    /// `read_buffer` (R6 counts it).
    async fn handshake(
        &self,
        socket: Socket,
    ) -> Result<
        (
            http1::SendRequest<Body>,
            http1::Connection<TokioIo<Socket>, Body>,
        ),
        Error,
    > {
        http1::Builder::new()
            .max_buf_size(self.read_buffer)
            .handshake(TokioIo::new(socket))
            .await
            .map_err(|e| Error::Io(Arc::new(io::Error::other(e))))
    }
}

/// A transport's failure to connect to `origin`: refused is [`Error::ConnectionRefused`].
fn connect_error(origin: &Origin, error: io::Error) -> Error {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Error::ConnectionRefused {
            addr: origin.addr(),
        },
        _ => Error::Io(Arc::new(error)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
