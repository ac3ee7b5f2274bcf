//! The transport seam: how a session opens a connection.
//!
//! A session reaches the network in one place only: when it opens a connection for an origin
//! (host and port), it asks its configuration's [`Transport`] for a byte stream. Every
//! connection goes through it: the pooled connections of data, download and upload tasks
//! (and of the conveniences), a stream task's own (`stream_task(host, port)`), a websocket's.
//! TCP ([`Tcp`]) is the default; a test can plug a simulated network instead
//! ([`ConfigurationBuilder::transport`](crate::ConfigurationBuilder::transport)).
//!
//! What the seam promises, what it costs and why it is shaped so: see [`Transport`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Where a connection goes: a host (a name or an IP address, without brackets) and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint<'a> {
    host: &'a str,
    port: u16,
}

impl<'a> Endpoint<'a> {
    pub(crate) fn new(host: &'a str, port: u16) -> Self {
        Endpoint { host, port }
    }

    /// The host: a DNS name, or an IP address (an IPv6 one without brackets).
    pub fn host(&self) -> &'a str {
        self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Endpoint<'_> {
    /// `host:port`, `[v6]:port` for an IPv6 address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How a session opens its connections: a byte stream to an [`Endpoint`]. Plugged with
/// [`ConfigurationBuilder::transport`](crate::ConfigurationBuilder::transport); [`Tcp`] by
/// default.
///
/// # What the seam promises
///
/// - **The client layers the protocols.** A transport yields bytes: for `https://` and
///   `wss://` the client runs TLS (with the session's configuration and resumption store) over
///   the stream the transport yields, then HTTP/1.1, or the websocket, over that. A transport
///   never sees a scheme, and never does TLS for the client.
/// - **The session owns the stream from the moment `connect` returns it.** It lives inside the
///   session's closable socket (the one the driver closes on an abort, an invalidation, an
///   idle expiry), and it is *dropped* when the connection is released: a response that cannot
///   be pooled, an idle connection expired or closed by `reset()`, a task cancelled, the
///   session invalidated. Dropping the stream is the close: the transport's stream must
///   release its connection in its `Drop` (a [`tokio::net::TcpStream`] does, and so does a
///   simulated one). The client may also call `poll_shutdown` first (a websocket's close, a
///   stream task's `close_write`), but never relies on it.
/// - **When it is dropped is the rules' business:** a task's connection is dropped before its
///   `did_complete` is delivered (R5), and every connection before `did_become_invalid` and
///   `invalidated()` (R4). A transport's own witness (the server side of a simulated network
///   seeing the close) therefore sees each close in the order the rules promise it, and the
///   client end is gone at the moment of the promise.
/// - **A connect is bounded and cancellable.** The future `connect` returns is awaited within
///   the task's timers (the request timeout bounds it) and dropped on an abort; dropping it
///   must leave nothing behind.
/// - **Errors stay typed.** A connect that fails with [`std::io::ErrorKind::ConnectionRefused`]
///   is [`Error::ConnectionRefused`](crate::Error::ConnectionRefused); any other error is
///   [`Error::Io`](crate::Error::Io), on the task that needed the connection.
///
/// # Cost
///
/// The default path pays nothing for the seam: [`Tcp`] is not called through a trait object;
/// its streams are kept as they are (`tokio::net::TcpStream`, or TLS over it). Another
/// transport's stream is boxed once, when it connects, and its reads and writes go through
/// one virtual call each.
///
/// # Design
///
/// hyper-util's legacy client takes any `tower::Service<Uri>` whose response is a byte stream
/// (its `Connect` trait is a sealed alias for that), and is generic over it; reqwest layers
/// `Service<Uri>` connectors and erases them, keeping its built-in HTTP/TLS connector as a fast
/// path when no layer is added. Here a [`Session`](crate::Session) is not generic (it is a
/// handle anyone can hold), and the seam needs neither `poll_ready` nor a `Uri` (the client
/// knows the origin; the scheme is its business): so a small trait of our own, an `async`
/// connect to a host and port, erased behind an `Arc` in the configuration, with TCP kept as
/// a variant of its own rather than a boxed transport.
///
/// # Example
///
/// ```
/// use std::io;
/// use leakproof::{Configuration, Endpoint, Transport};
///
/// /// Every connection goes to one address, whatever the URL says.
/// #[derive(Debug)]
/// struct Fixed(std::net::SocketAddr);
///
/// impl Transport for Fixed {
///     type Stream = tokio::net::TcpStream;
///
///     async fn connect(&self, _to: Endpoint<'_>) -> io::Result<Self::Stream> {
///         tokio::net::TcpStream::connect(self.0).await
///     }
/// }
///
/// let config = Configuration::builder()
///     .transport(Fixed(([127, 0, 0, 1], 8080).into()))
///     .build()?;
/// # Ok::<(), leakproof::Error>(())
/// ```
pub trait Transport: fmt::Debug + Send + Sync + 'static {
    /// The connection: bytes both ways; dropping it closes it.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// Open a connection to `to`. Refused is [`io::ErrorKind::ConnectionRefused`].
    fn connect(&self, to: Endpoint<'_>) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// TCP, the default transport: `tokio::net::TcpStream`, with Nagle off (requests and stream
/// writes go out as written).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Transport for Tcp {
    type Stream = TcpStream;

    async fn connect(&self, to: Endpoint<'_>) -> io::Result<TcpStream> {
        let stream = TcpStream::connect((to.host, to.port)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A transport's stream, erased.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for S {}

type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send + 'a>>;

/// A [`Transport`], erased so that a configuration (and a session) stays one type.
pub(crate) trait Erased: fmt::Debug + Send + Sync {
    fn connect<'a>(&'a self, to: Endpoint<'a>) -> Connecting<'a>;
}

impl<T: Transport> Erased for T {
    fn connect<'a>(&'a self, to: Endpoint<'a>) -> Connecting<'a> {
        Box::pin(async move {
            let stream = Transport::connect(self, to).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }
}

/// The configuration's transport: TCP, called directly, or another one, erased.
#[derive(Clone, Default)]
pub(crate) enum Connector {
    #[default]
    Tcp,
    Other(Arc<dyn Erased>),
}

impl Connector {
    pub fn new<T: Transport>(transport: T) -> Connector {
        if (&transport as &dyn Any).is::<Tcp>() {
            return Connector::Tcp;
        }
        Connector::Other(Arc::new(transport))
    }
}

/// What a connector yields: a TCP stream as it is, or another transport's stream, boxed.
pub(crate) enum Connected {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

impl Connector {
    pub async fn connect(&self, to: Endpoint<'_>) -> io::Result<Connected> {
        match self {
            Connector::Tcp => Transport::connect(&Tcp, to).await.map(Connected::Tcp),
            Connector::Other(transport) => transport.connect(to).await.map(Connected::Other),
        }
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connector::Tcp => fmt::Debug::fmt(&Tcp, f),
            Connector::Other(transport) => fmt::Debug::fmt(transport, f),
        }
    }
}
