//! How a task can end other than by success, and why an op can be refused.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::{Disposition, TaskKind};

/// Which of a task's timers fired (R11, R12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timeout {
    /// Nothing arrived for the request timeout while a response was awaited or read.
    Request,
    /// The whole task outlived the resource timeout.
    Resource,
    /// A websocket's peer did not answer our close frame within the close timeout.
    Close,
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Timeout::Request => "request timeout (idle time between bytes)",
            Timeout::Resource => "resource timeout (whole task)",
            Timeout::Close => "close timeout (the peer did not answer our close frame)",
        })
    }
}

/// An operation on a stream's or a websocket's handle, as an error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// A stream's read.
    Read,
    /// A stream's write.
    Write,
    /// A stream's flush.
    Flush,
    /// A websocket's receive.
    Receive,
    /// A websocket's send.
    Send,
    /// A websocket's ping, or the wait for its pong.
    Ping,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
            Operation::Receive => "receive",
            Operation::Send => "send",
            Operation::Ping => "ping",
        })
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate does not chain to a trusted root.
    UnknownIssuer,
    /// The server's certificate is not valid for the host the URL names.
    NameMismatch,
    /// The server's certificate (or one in its chain) has expired.
    Expired,
    /// The server's certificate (or one in its chain) is not valid yet.
    NotYetValid,
    /// The server's certificate is unusable otherwise (revoked, badly encoded, a bad signature,
    /// not meant for a server).
    BadCertificate,
    /// The peer does not speak TLS as it should: not TLS at all, an alert, no common version or
    /// cipher suite, a closed connection mid-handshake.
    Protocol,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownIssuer => {
                "the server's certificate is not signed by a trusted root (a private CA's root \
                 can be added with add_root_certificate in the Configuration)"
            }
            TlsFailure::NameMismatch => "the server's certificate is not valid for this host",
            TlsFailure::Expired => "the server's certificate has expired",
            TlsFailure::NotYetValid => "the server's certificate is not valid yet",
            TlsFailure::BadCertificate => "the server's certificate is invalid",
            TlsFailure::Protocol => "TLS protocol error",
        })
    }
}

/// Every way a task or an op can fail. Cheap to clone: a completed task keeps its error and
/// the delegate gets a copy.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("the task was cancelled")]
    Cancelled,
    #[error("timed out: the {0} elapsed; raise it in the Configuration if the server is slow")]
    TimedOut(Timeout),
    #[error("connection to {addr} refused: is the server running and listening there?")]
    ConnectionRefused { addr: String },
    #[error("the server reset or closed the connection before the response was complete")]
    ConnectionReset,
    #[error("malformed response from the server: {0}")]
    MalformedResponse(String),
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "the delegate answered {disposition:?} for a {kind:?} task, which cannot do that; \
         only data tasks can become downloads or streams"
    )]
    InvalidDisposition {
        disposition: Disposition,
        kind: TaskKind,
    },
    #[error(
        "the session is invalidated (or invalidation has begun): create a new Session for new tasks"
    )]
    SessionInvalidated,
    #[error("invalid configuration: {0}")]
    InvalidConfiguration(String),
    #[error("the server answered the websocket upgrade with status {status}, not 101")]
    NoUpgrade { status: u16 },
    #[error("websocket protocol error: {0}")]
    WebSocketProtocol(String),
    #[error(
        "close code {0} may not be sent in a close frame (RFC 6455, 7.4): use 1000-1003, \
         1007-1013 or 3000-4999"
    )]
    InvalidCloseCode(u16),
    #[error("the stream's read half is closed (close_read, or the end was read)")]
    ReadClosed,
    #[error("the stream's write half is closed (close_write, or it is a response's stream)")]
    WriteClosed,
    /// The stream or websocket task (its kind) is over, or a websocket is closing.
    #[error("the {0} is closed")]
    Closed(TaskKind),
    /// A stream operation with a timeout found nothing to do within it.
    #[error("the {0} timed out; the task goes on (retry, or cancel it)")]
    OpTimedOut(Operation),
    #[error("a {kind} task cannot {op}")]
    WrongKind { kind: TaskKind, op: Operation },
    #[error(
        "the response body is larger than max_body_size ({limit} bytes), the most a convenience \
         collects in memory: raise it in the Configuration, or use download() or a data task"
    )]
    BodyTooLarge { limit: u64 },
    #[error("TLS handshake with {host} failed: {kind}: {detail}")]
    Tls {
        host: String,
        kind: TlsFailure,
        detail: String,
    },
    #[error(
        "more than {limit} redirects: raise max_redirects in the Configuration, or set it to 0 \
         to get a redirect as the response"
    )]
    TooManyRedirects { limit: u32 },
    #[error("redirect loop: {method} {url} was requested before in this chain of redirects")]
    RedirectLoop { method: String, url: String },
    #[error("the redirect to {location:?} cannot be followed: {reason}")]
    InvalidRedirect { location: String, reason: String },
    #[error("I/O error: {0}")]
    Io(#[source] Arc<io::Error>),
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Self {
        Error::Io(Arc::new(error))
    }
}
