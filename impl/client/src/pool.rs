//! Connections: opening them (within per-host limits) and keeping the idle ones.
//!
//! Why a pool of our own on `hyper::client::conn` rather than hyper-util's legacy client:
//! the lifecycle rules need control hyper-util does not give. Invalidation must close every
//! idle connection at once (R4), and the legacy client closes them only when the whole client
//! is dropped. A response abandoned mid-body must close its connection, not pool it (R5),
//! and each connection must be accounted for by id in the engine's ledger. The legacy client
//! can also finish a connect in the background after its checkout lost a race, leaving a
//! socket no one accounts for. Here every connection is a [`Connection`] owned by exactly one
//! thing (an exchange, or the idle map), and dropping it closes the socket.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{ConnId, Error};

/// A request body: bytes or a file, streamed.
pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// Where connections go: host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn key(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One HTTP/1.1 connection. Dropping it closes the socket: the task running hyper's
/// connection future is aborted.
#[derive(Debug)]
pub(crate) struct Connection {
    pub sender: http1::SendRequest<Body>,
    /// Held for its Drop: aborting hyper's connection future closes the socket.
    _io: AbortOnDrop,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The idle connections, since when each is idle, and which have an idle clock pending in
/// the driver. A connection reused and parked again keeps its pending clock, which, when it
/// rings, looks again from the later park: so a request does not wake the driver to restart a
/// clock.
#[derive(Debug, Default)]
struct Idle {
    connections: HashMap<ConnId, (Connection, Instant)>,
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
#[derive(Debug, Clone, Copy)]
pub(crate) enum Note {
    /// An exchange pooled a connection that has no idle clock yet: start one.
    Parked(ConnId),
    /// The connection's socket is gone (the server closed it, or it failed).
    Closed(ConnId),
    /// For the suite: the task's `timeout` timer runs out now.
    Expire(crate::TaskId, crate::Timeout),
    /// For the suite: every idle connection's idle timeout runs out now.
    ExpireIdle,
}

/// The session's connections that are not carrying an exchange. Which connection a task
/// gets, and how many an origin may have, is the engine's decision
/// (`Config::max_connections_per_origin`): this only keeps them.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<Idle>,
    read_buffer: usize,
    runtime: Handle,
    notes: mpsc::UnboundedSender<Note>,
}

impl Pool {
    pub fn new(read_buffer: usize, runtime: Handle, notes: mpsc::UnboundedSender<Note>) -> Self {
        Self {
            idle: Mutex::new(Idle::default()),
            read_buffer,
            runtime,
            notes,
        }
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
            idle.connections.drain().collect()
        };
        drop(all);
    }

    /// Open the connection `id` to `origin`.
    pub async fn connect(&self, id: ConnId, origin: &Origin) -> Result<Connection, Error> {
        let (sender, connection) = self.handshake(origin).await?;
        let notes = self.notes.clone();
        let io = self.runtime.spawn(async move {
            // Ends when the socket closes or the sender is dropped while idle; an idle
            // connection the server closed must leave the pool (and the ledger) now, not at
            // its idle timeout. (Aborted, it says nothing: whoever aborted it knows.)
            let _ = connection.await;
            let _ = notes.send(Note::Closed(id));
        });
        Ok(Connection {
            sender,
            _io: AbortOnDrop(io.abort_handle()),
        })
    }

    /// Open a connection for a websocket's upgrade: hyper's connection future is driven with
    /// upgrades, so that a `101` hands the socket to `hyper::upgrade::on`. It never joins the
    /// pool (a websocket keeps its connection, and closes it with itself), so it tells the
    /// driver nothing. Keep the returned connection until the upgrade resolves: dropping it
    /// first aborts hyper's connection future, and the upgrade with it.
    pub async fn connect_for_upgrade(&self, origin: &Origin) -> Result<Connection, Error> {
        let (sender, connection) = self.handshake(origin).await?;
        let io = self.runtime.spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(Connection {
            sender,
            _io: AbortOnDrop(io.abort_handle()),
        })
    }

    /// Connect to `origin` and start HTTP/1.1 on the socket, hyper's read buffer bounded by
    /// the configuration's `read_buffer` (R6 counts it).
    async fn handshake(
        &self,
        origin: &Origin,
    ) -> Result<
        (
            http1::SendRequest<Body>,
            http1::Connection<TokioIo<TcpStream>, Body>,
        ),
        Error,
    > {
        let stream = connect_tcp(origin).await?;
        http1::Builder::new()
            .max_buf_size(self.read_buffer)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Io(Arc::new(io::Error::other(e))))
    }
}

/// A TCP connection to `origin`, with Nagle off (streams and requests go out as written);
/// refused is [`Error::ConnectionRefused`].
pub(crate) async fn connect_tcp(origin: &Origin) -> Result<TcpStream, Error> {
    let stream = TcpStream::connect((origin.host.as_str(), origin.port))
        .await
        .map_err(|e| connect_error(origin, e))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn connect_error(origin: &Origin, error: io::Error) -> Error {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Error::ConnectionRefused { addr: origin.key() },
        _ => Error::Io(Arc::new(error)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
