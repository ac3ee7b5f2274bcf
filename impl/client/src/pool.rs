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

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

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

/// What connections tell the session's driver.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Note {
    /// An exchange pooled its connection: start its idle clock.
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
    idle: Mutex<HashMap<ConnId, Connection>>,
    read_buffer: usize,
    runtime: Handle,
    notes: mpsc::UnboundedSender<Note>,
}

impl Pool {
    pub fn new(read_buffer: usize, runtime: Handle, notes: mpsc::UnboundedSender<Note>) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            read_buffer,
            runtime,
            notes,
        }
    }

    pub fn note(&self, note: Note) {
        let _ = self.notes.send(note);
    }

    pub fn holds(&self, id: ConnId) -> bool {
        lock(&self.idle).contains_key(&id)
    }

    /// Keep `connection` as `id` (an exchange parks it before asking the engine, see
    /// `leakproof_core::Core::body_end`).
    pub fn park(&self, id: ConnId, connection: Connection) {
        lock(&self.idle).insert(id, connection);
    }

    /// Take the pooled connection `id`, if it is still there and still open.
    pub fn take(&self, id: ConnId) -> Option<Connection> {
        lock(&self.idle)
            .remove(&id)
            .filter(|c| !c.sender.is_closed())
    }

    /// Close the pooled connection `id`; whether it was there.
    pub fn close(&self, id: ConnId) -> bool {
        let connection = lock(&self.idle).remove(&id);
        connection.is_some() // dropped here, outside the lock
    }

    pub fn close_all(&self) {
        let all: Vec<Connection> = lock(&self.idle).drain().map(|(_, c)| c).collect();
        drop(all);
    }

    /// Open the connection `id` to `origin`.
    pub async fn connect(&self, id: ConnId, origin: &Origin) -> Result<Connection, Error> {
        let stream = TcpStream::connect((origin.host.as_str(), origin.port))
            .await
            .map_err(|e| connect_error(origin, e))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.read_buffer)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Io(Arc::new(io::Error::other(e))))?;
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
