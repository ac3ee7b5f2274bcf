//! The stage: a loopback HTTP/1.1 server the real client is tested against.
//!
//! Written by hand on tokio's `TcpListener` so that it can misbehave on purpose: stall, send
//! part of a body, reset, send garbage. Each request is scripted by its target:
//!
//! - `/bytes/N`: `200` with an N-byte body ([`body`]), framed by `Content-Length`. Query keys:
//!   `status=CODE`; `chunked=1`; `chunk=SIZE` (bytes per write, and per chunk when chunked;
//!   default 16 KiB); `pace_ms=MS` (pause between writes); `keep_alive=0` (`Connection: close`,
//!   then close); `header_delay_ms=MS` (pause before the head); and at most one ending:
//!   `stall_headers=1` (never answer), `stall_after=K` (head and K body bytes, then silence),
//!   `reset_after=K` (then a TCP reset), `close_after=K` (then a clean close),
//!   `no_response=1` (close without a byte), `malformed=status` (a garbage status line) or
//!   `malformed=chunk` (a chunked head, then a chunk size that is not hex). For caches:
//!   `max_age=S` (`Cache-Control: max-age=S`), `no_store=1` (`Cache-Control: no-store`),
//!   `etag=TAG` (`ETag: "TAG"`; a request whose `If-None-Match` names it is answered `304`
//!   with no body, counted by [`Stage::not_modified`]).
//! - `/redirect/CODE?to=TARGET`: a `CODE` (300..=399) whose `Location` is `TARGET`,
//!   percent-decoded (a path, relative or absolute, or a whole URL); no `to`: no `Location`.
//!   Query keys: `len=N` (an N-byte body, default 16), `keep_alive=0` (then close).
//!   `/chain/N?code=CODE` answers `CODE` to `/chain/{N-1}?code=CODE` until `/chain/0`, a `200`
//!   with a 5-byte body; `/loop/K?code=CODE` answers `CODE` to `/loop/{1-K}?code=CODE`, for
//!   ever. A stage built with [`Builder::log`] keeps every request it reads, headers and body
//!   length ([`Stage::log`]); the others keep none (a heap witness would count the log).
//! - `/hold/KEY`: parked until the test takes it with [`Stage::held`] and drives the response
//!   step by step through the [`Held`] handle. A websocket upgrade request there is answered
//!   by the test too: [`Held::upgrade`] (then a [`HeldWs`] in manual mode) or
//!   [`Held::refuse_upgrade`].
//! - `/ws/...`: a websocket on the same listener, scripted by its path (`echo`, `close`, `drop`,
//!   `silent`, `refuse`, `send`, `hold/KEY`): see [`websocket`] for the scripts and
//!   [`Stage::held_ws`] for the held one.
//! - anything else: `404`; an unknown query key or a bad value: `400`; a request that is not
//!   HTTP: `400`, then close.
//!
//! Besides HTTP, the stage opens raw TCP listeners on demand ([`Stage::listen_raw`]) for
//! stream tasks: no HTTP at all, each connection played by a [`RawScript`] (offer bytes, paced
//! or not; echo; held and driven through [`HeldRaw`]). See [`raw`]. Their sockets count in the
//! same witness.
//!
//! With [`Builder::tls`] the listener speaks TLS (ALPN `http/1.1`) and serves the same scripts
//! and websockets over it ([`Stage::https_url`], [`Stage::wss_url`]); a connection whose
//! handshake fails is counted accepted and closed as any other.
//!
//! With [`Builder::network`] the stage listens on a simulated network ([`crate::simnet`])
//! instead of loopback TCP: every script above, held exchanges, raw listeners, websockets and
//! TLS work the same over it, a reset is the network's reset, and its waits run on tokio's
//! clock (paused or not) instead of real time, so that a run on a current-thread runtime with
//! a paused clock is deterministic. Over TCP the waits keep real time (a test on a paused clock
//! against loopback sockets must not see them cut short). Its [`Stage::url`] is one the
//! network's transport resolves; [`Stage::client_ends_open`] is the network's count of the
//! client ends still alive.
//!
//! The stage is the connection witness of DESIGN.md's "Observability": it counts the sockets it
//! accepts and sees closed. It never closes a connection unless scripted to, so a connection
//! the client leaks stays in [`Stage::open`]. Stalled and garbled connections are held until
//! the client closes them: their close is the client's doing, and is what the count shows.

pub mod raw;
pub mod websocket;

pub use raw::{HeldRaw, Pace, RawEnding, RawScript};
pub use tokio_tungstenite::tungstenite::Message as WsMessage;
pub use websocket::HeldWs;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{self, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::simnet::{Buffers as SimBuffers, ClientEnd, ServerStream, SimListener, SimNet, Tally};

/// How long a [`Held`] step waits for its connection to carry it out.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes per write when the script does not say (`chunk=`).
const DEFAULT_CHUNK: usize = 16 * 1024;
/// How often waits re-check their condition.
const POLL: Duration = Duration::from_millis(2);
/// The most a client may send ahead of what the stage has parsed; past it the client is
/// misbehaving and is cut off rather than buffered without bound.
const MAX_AHEAD: usize = 1 << 20;

/// Every body the stage sends is this, repeated, starting at the body's first byte.
const PATTERN: &[u8] = b"leakproof ";
/// The pattern laid out once, long enough to slice a whole write from any offset.
static TILE: [u8; DEFAULT_CHUNK + PATTERN.len()] = {
    let mut tile = [0; DEFAULT_CHUNK + PATTERN.len()];
    let mut i = 0;
    while i < tile.len() {
        tile[i] = PATTERN[i % PATTERN.len()];
        i += 1;
    }
    tile
};

const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
const GARBAGE_STATUS: &[u8] = b"HTTP/1.1 abc\r\n\r\n";
const GARBAGE_CHUNK: &[u8] = b"zz\r\nleakproof\r\n";

/// The first `len` bytes of every body the stage sends: `leakproof ` repeated.
pub fn body(len: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(len).collect()
}

/// A running stage. Dropping it stops accepting and closes every connection it holds.
#[derive(Debug)]
pub struct Stage {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// The builder's socket buffer sizes, for the raw listeners opened later.
    buffers: Buffers,
    /// The raw listeners' accept loops ([`Stage::listen_raw`]), aborted with the stage.
    raw_listeners: Mutex<Vec<JoinHandle<()>>>,
    /// Whether the listener speaks TLS.
    tls: bool,
    /// The simulated network it listens on ([`Builder::network`]), with its listeners' counts
    /// (all of them) and the HTTP listener's own.
    sim: Option<SimSide>,
}

/// A stage's place on a simulated network.
#[derive(Debug, Clone)]
struct SimSide {
    net: SimNet,
    /// Every listener of the stage, HTTP and raw.
    all: Tally,
    /// The HTTP listener's.
    http: Tally,
}

/// Options for a [`Stage`], from [`Stage::builder`].
#[derive(Debug, Default)]
pub struct Builder {
    buffers: Buffers,
    /// Keep a log of the requests read.
    log: bool,
    /// TLS on the listener, or why it cannot be.
    tls: Option<Result<Arc<ServerConfig>, String>>,
    /// Resume TLS sessions with stateless tickets.
    stateless_tickets: bool,
    /// Listen on this simulated network instead of TCP.
    network: Option<SimNet>,
}

/// `SO_SNDBUF` and `SO_RCVBUF` of every socket a stage accepts, on any of its listeners, and
/// the loopback address they listen on (127.0.0.1 unless [`Builder::loopback`] says).
#[derive(Debug, Default, Clone, Copy)]
struct Buffers {
    send: Option<u32>,
    recv: Option<u32>,
    ip: Option<Ipv4Addr>,
}

/// A request to `/hold/KEY`, parked until the test drives its response.
///
/// Each step waits until the connection has carried it out (its bytes written), at most
/// [`STEP_TIMEOUT`], and fails with `NotConnected` once the client has gone. The steps that
/// end the exchange take the handle; dropping it without one closes the connection.
#[derive(Debug)]
pub struct Held {
    method: String,
    target: String,
    /// Whether the request asks for a websocket upgrade, or why not.
    upgrade: Result<(), &'static str>,
    steps: mpsc::UnboundedSender<(Step, Reply)>,
    open: Liveness,
    clock: Clock,
}

/// A request as the stage read it ([`Stage::log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Header names in lower case, with their values, in the order sent.
    pub headers: Vec<(String, String)>,
    /// Body bytes received, excluding framing.
    pub body_len: u64,
}

impl Seen {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether a held request's connection is still open, as the stage sees it; it outlives the
/// [`Held`] (whose ending steps consume it), so a test can tell which socket closed.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Arc<std::sync::atomic::AtomicBool>, Option<ClientEnd>);

impl Liveness {
    /// The liveness of a connection over `wire`: over a simulated network it can also tell
    /// whether the client's end is gone.
    pub(crate) fn of(wire: &Wire) -> Liveness {
        let client = match wire {
            Wire::Sim(stream) => Some(stream.client_end()),
            Wire::SimTls(stream) => Some(stream.get_ref().0.client_end()),
            Wire::Tcp(_) | Wire::Tls(_) => None,
        };
        Liveness(Arc::default(), client)
    }

    /// True until the stage has seen the connection closed (by either side).
    pub fn is_open(&self) -> bool {
        !self.0.load(Relaxed)
    }

    /// Over a simulated network, whether the client has dropped its end of the connection, as
    /// the network sees it; `None` over TCP.
    pub fn client_dropped(&self) -> Option<bool> {
        self.1.as_ref().map(ClientEnd::dropped)
    }

    fn closed(&self) {
        self.0.store(true, Relaxed);
    }
}

impl Stage {
    /// Starts a stage on 127.0.0.1 with an ephemeral port, on the current tokio runtime.
    pub async fn start() -> io::Result<Stage> {
        Stage::builder().start().await
    }

    /// A stage with options.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (or the [`Builder::loopback`] address) followed by
    /// `path_and_query`, for a stage built with [`Builder::tls`] (the certificate must name
    /// that address).
    pub fn https_url(&self, path_and_query: &str) -> String {
        assert!(self.tls, "https_url: this stage was built without tls");
        format!(
            "https{}",
            self.url(path_and_query)
                .strip_prefix("http")
                .unwrap_or_default()
        )
    }

    /// TLS handshakes that resumed a session the client had cached (the rest were full).
    pub fn tls_resumptions(&self) -> u64 {
        self.shared.counters.tls_resumed.load(Relaxed)
    }

    /// Whether the stage speaks TLS ([`Builder::tls`]).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `http://127.0.0.1:PORT` (or the [`Builder::loopback`] address) followed by
    /// `path_and_query` (a leading `/` is added if missing).
    pub fn url(&self, path_and_query: &str) -> String {
        let slash = if path_and_query.starts_with('/') {
            ""
        } else {
            "/"
        };
        format!("http://{}{slash}{path_and_query}", self.addr)
    }

    /// Connections accepted so far, on every listener: HTTP and websocket, and raw.
    pub fn accepted(&self) -> u64 {
        self.shared.counters.accepted.load(Relaxed)
    }

    /// Connections closed so far, by the client (read 0, reset) or by the script; each once.
    pub fn closed(&self) -> u64 {
        self.shared.counters.closed.load(Relaxed)
    }

    /// Connections accepted and not yet closed.
    pub fn open(&self) -> u64 {
        let closed = self.closed();
        self.accepted().saturating_sub(closed)
    }

    /// `304 Not Modified` answers so far (scripts with `etag=`).
    pub fn not_modified(&self) -> u64 {
        self.shared.counters.not_modified.load(Relaxed)
    }

    /// Request heads parsed so far.
    pub fn requests(&self) -> u64 {
        self.shared.counters.requests.load(Relaxed)
    }

    /// Response body bytes handed to the kernel (`write` returned), excluding framing. Counts
    /// what sits in socket buffers too: see DESIGN.md's pitfall on loopback buffering.
    pub fn body_bytes_written(&self) -> u64 {
        self.shared.counters.body_bytes_written.load(Relaxed)
    }

    /// Request body bytes received, excluding framing.
    pub fn request_body_bytes(&self) -> u64 {
        self.shared.counters.request_body_bytes.load(Relaxed)
    }

    /// Every request read so far, in the order the stage read them (its body read whole), if
    /// built with [`Builder::log`]; else nothing.
    pub fn log(&self) -> Vec<Seen> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `predicate` holds, checking every few milliseconds; false if `timeout` passes
    /// first. Timeouts here are real time: a paused tokio clock does not cut them short.
    pub async fn wait_until(&self, predicate: impl Fn(&Stage) -> bool, timeout: Duration) -> bool {
        within(self.shared.clock, timeout, async {
            while !predicate(self) {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
        .is_some()
    }

    /// The client ends of the connections the listener accepted, for a witness that must tell
    /// them from the sockets of an earlier stage that had the same port
    /// ([`crate::witness::client_sockets_of`]). Over a simulated network they also carry the
    /// network's count of the HTTP listener's client ends, which the witness reads instead of
    /// the kernel's table.
    pub fn peers(&self) -> Peers {
        Peers {
            port: self.addr.port(),
            ports: Arc::clone(&self.shared.peers),
            ends: self.sim.as_ref().map(|sim| sim.http.clone()),
        }
    }

    /// The simulated network the stage listens on, if built with [`Builder::network`].
    pub fn network(&self) -> Option<&SimNet> {
        self.sim.as_ref().map(|sim| &sim.net)
    }

    /// Over a simulated network: the network's counts of the connections to every listener of
    /// the stage, HTTP and raw (opened, client ends alive, closed by the client). `None` over
    /// TCP.
    pub fn tally(&self) -> Option<Tally> {
        self.sim.as_ref().map(|sim| sim.all.clone())
    }

    /// Over a simulated network: the client ends of the stage's connections (every listener)
    /// that the client has not dropped yet, as the network counts them. It holds at the very
    /// moment it is asked, as [`crate::witness::client_sockets_of`] does over TCP. `None` over
    /// TCP.
    pub fn client_ends_open(&self) -> Option<u64> {
        self.sim.as_ref().map(|sim| sim.all.client_ends_alive())
    }

    /// Waits until every accepted connection is closed. True at once if none was accepted:
    /// assert [`Stage::accepted`] too where that matters.
    pub async fn wait_all_closed(&self, timeout: Duration) -> bool {
        self.wait_until(|stage| stage.open() == 0, timeout).await
    }

    /// Waits for a request to `/hold/{key}` and takes it; `None` if none arrives within
    /// `timeout`. Requests with the same key are taken in arrival order.
    pub async fn held(&self, key: &str, timeout: Duration) -> Option<Held> {
        self.shared
            .parked
            .take(self.shared.clock, key, timeout)
            .await
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // An accept task owns its connections' JoinSet: aborting it aborts them all.
        self.accept.abort();
        let raw = self
            .raw_listeners
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for accept in raw.drain(..) {
            accept.abort();
        }
    }
}

impl Builder {
    /// Sets `SO_SNDBUF` of every accepted socket, so that the server's byte count shows
    /// backpressure instead of kernel buffering. The kernel may round it up (Linux doubles it).
    /// Applies to the raw listeners ([`Stage::listen_raw`]) too.
    pub fn send_buffer(mut self, bytes: u32) -> Builder {
        self.buffers.send = Some(bytes);
        self
    }

    /// Sets `SO_RCVBUF` of every accepted socket, HTTP and raw, so that a client's writes meet
    /// backpressure sooner. The kernel may round it up (Linux doubles it).
    pub fn recv_buffer(mut self, bytes: u32) -> Builder {
        self.buffers.recv = Some(bytes);
        self
    }

    /// Keep every request read, for [`Stage::log`]. Off by default: the log grows with every
    /// request, and a test that measures its heap would see it.
    pub fn log(mut self) -> Builder {
        self.log = true;
        self
    }

    /// Listen on `ip`, another address of the loopback range (127.0.0.0/8) than 127.0.0.1, so
    /// that several stages are several hosts to a client: each its own TLS server name, say.
    /// An address outside the range makes [`start`](Self::start) fail: the stage serves this
    /// machine only.
    pub fn loopback(mut self, ip: Ipv4Addr) -> Builder {
        self.buffers.ip = Some(ip);
        self
    }

    /// With [`tls`](Self::tls): resume TLS sessions with stateless tickets (rustls's ring
    /// `Ticketer`: the session's state, encrypted, is the ticket) rather than with the session
    /// ids of a server-side cache. The server then keeps nothing per session, so a test that
    /// counts the process's heap sees the client's resumption store alone.
    pub fn stateless_tickets(mut self) -> Builder {
        self.stateless_tickets = true;
        self
    }

    /// Listen on `net`, a simulated network, instead of loopback TCP: the HTTP listener and
    /// the raw ones ([`Stage::listen_raw`]) are bound there, on the [`loopback`](Self::loopback)
    /// address (127.0.0.1 by default) with a port of the network's. A session reaches the stage
    /// with the network as its transport (`ConfigurationBuilder::transport(net.clone())`).
    /// [`send_buffer`](Self::send_buffer) and [`recv_buffer`](Self::recv_buffer) size the
    /// network's pipes (server to client, client to server) instead of socket buffers, exactly.
    /// The stage's waits then run on tokio's clock: see the module docs.
    pub fn network(mut self, net: &SimNet) -> Builder {
        self.network = Some(net.clone());
        self
    }

    /// Speak TLS on the listener (TLS 1.2 and 1.3, ALPN `http/1.1`) with this certificate
    /// chain (the server's first) and its key; the raw listeners stay plain TCP.
    pub fn tls(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Builder {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .map(|mut config| {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(config)
            })
            .map_err(|e| format!("the stage's TLS certificate or key: {e}"));
        self.tls = Some(config);
        self
    }

    /// Binds 127.0.0.1:0 (or the [`loopback`](Self::loopback) address) and spawns the accept
    /// loop on the current tokio runtime.
    pub async fn start(self) -> io::Result<Stage> {
        let tls = match self.tls {
            None => None,
            Some(Ok(mut config)) => {
                if self.stateless_tickets {
                    let ticketer = rustls::crypto::ring::Ticketer::new()
                        .map_err(|e| io::Error::other(format!("the stage's TLS tickets: {e}")))?;
                    Arc::make_mut(&mut config).ticketer = ticketer;
                }
                Some(TlsAcceptor::from(config))
            }
            Some(Err(why)) => return Err(io::Error::new(io::ErrorKind::InvalidInput, why)),
        };
        let all = Tally::new();
        let on = self.network.as_ref().map(|net| (net, &all));
        let listener = self.buffers.listen(on)?;
        let addr = listener.local_addr()?;
        let sim = match (&self.network, &listener) {
            (Some(net), Listener::Sim(listener)) => Some(SimSide {
                net: net.clone(),
                all,
                http: listener.tally(),
            }),
            _ => None,
        };
        let shared = Arc::new(Shared {
            logging: self.log,
            clock: if sim.is_some() {
                Clock::Tokio
            } else {
                Clock::Real
            },
            ..Shared::default()
        });
        let is_tls = tls.is_some();
        let accept = tokio::spawn(accept(listener, Arc::clone(&shared), tls));
        Ok(Stage {
            addr,
            shared,
            accept,
            buffers: self.buffers,
            raw_listeners: Mutex::default(),
            tls: is_tls,
            sim,
        })
    }
}

impl Buffers {
    /// A listener on 127.0.0.1 (or the loopback address set) with an ephemeral port whose
    /// accepted sockets get these sizes: a TCP one, or one on a simulated network (counted in
    /// the tally given with it too).
    fn listen(self, sim: Option<(&SimNet, &Tally)>) -> io::Result<Listener> {
        let ip = self.ip.unwrap_or(Ipv4Addr::LOCALHOST);
        if !ip.is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the stage listens on loopback addresses only, not {ip}"),
            ));
        }
        if let Some((net, tally)) = sim {
            let listener = net.bind_in(&ip.to_string(), 0, Some(tally))?;
            let defaults = listener.buffers();
            let size = |bytes: Option<u32>, default| {
                bytes.map_or(default, |b| usize::try_from(b).unwrap_or(usize::MAX))
            };
            listener.set_buffers(SimBuffers {
                to_client: size(self.send, defaults.to_client),
                to_server: size(self.recv, defaults.to_server),
            });
            return Ok(Listener::Sim(listener));
        }
        Ok(Listener::Tcp(self.listen_tcp(ip)?))
    }

    fn listen_tcp(self, ip: Ipv4Addr) -> io::Result<TcpListener> {
        let socket = TcpSocket::new_v4()?;
        // Set before listen(): accepted sockets inherit them, see tcp(7).
        if let Some(bytes) = self.send {
            socket.set_send_buffer_size(bytes)?;
        }
        if let Some(bytes) = self.recv {
            socket.set_recv_buffer_size(bytes)?;
        }
        socket.bind(SocketAddr::from((ip, 0)))?;
        socket.listen(1024)
    }
}

/// A stage's listener: loopback TCP, or a simulated network's.
#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Sim(SimListener),
}

/// A connection a [`Listener`] accepted.
enum Socket {
    Tcp(TcpStream),
    Sim(ServerStream),
}

impl Listener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(listener) => listener.local_addr(),
            Listener::Sim(listener) => listener.local_addr(),
        }
    }

    /// The next connection, Nagle off for TCP (framing and body, paced writes, go out as they
    /// are written), and its client end's address.
    async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Socket::Tcp(stream), peer))
            }
            Listener::Sim(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Socket::Sim(stream), peer))
            }
        }
    }
}

impl Socket {
    /// The plain wire over this socket.
    fn wire(self) -> Wire {
        match self {
            Socket::Tcp(stream) => Wire::Tcp(stream),
            Socket::Sim(stream) => Wire::Sim(stream),
        }
    }
}

impl Held {
    /// The request's method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Whether this request's connection is still open, now and after this handle is gone.
    pub fn liveness(&self) -> Liveness {
        self.open.clone()
    }

    /// The request's target, path and query.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the request is a websocket upgrade request (`GET`, `Upgrade: websocket`,
    /// `Connection: upgrade`, `Sec-WebSocket-Version: 13`, a key): one [`Held::upgrade`] can
    /// accept.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.upgrade.is_ok()
    }

    /// Accepts the websocket upgrade: `101 Switching Protocols` with the key's
    /// `Sec-WebSocket-Accept`, and the first protocol the client offered in
    /// `Sec-WebSocket-Protocol`, if any. Returns once the `101` is written; the connection is a
    /// [`HeldWs`] from then on, in manual mode (see [`HeldWs`]): it never answers the client's
    /// close frame by itself, nor closes TCP by itself. Counted like a `/ws/...` websocket:
    /// in [`Stage::ws_upgrades`] and the message and close frame counts.
    ///
    /// `InvalidInput` if the request is not a websocket upgrade request, or once the response
    /// head is sent; the handle is consumed either way, so the connection is then closed as when
    /// a handle is dropped (a FIN).
    pub async fn upgrade(self) -> io::Result<HeldWs> {
        if let Err(why) = self.upgrade {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("upgrade() on a request that is not a websocket upgrade: {why}"),
            ));
        }
        let (ws, ends) = HeldWs::pair(self.target.clone(), self.open.clone(), true, self.clock);
        self.step(Step::Upgrade(ends)).await?;
        Ok(ws)
    }

    /// Refuses a websocket upgrade (or answers any held request) with a plain `status`
    /// (200..=599) and a short body, framed by `Content-Length`: the client sees a complete
    /// response that is not a `101`. The connection then stays a plain HTTP one, as after
    /// [`Held::end`]: it serves its next request, and is closed when the client closes it (or
    /// at once if the request asked for `Connection: close`). Nothing is counted as an upgrade.
    ///
    /// `InvalidInput` for a status out of range, or once the response head is sent.
    pub async fn refuse_upgrade(self, status: u16) -> io::Result<()> {
        if !(200..=599).contains(&status) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refuse_upgrade({status}): expected a status in 200..=599"),
            ));
        }
        self.step(Step::RefuseUpgrade(status)).await
    }

    /// Sends the response head: `Transfer-Encoding: chunked` if `chunked` (then
    /// `content_length` is ignored), else `Content-Length` if given, else a body delimited by
    /// the close (`Connection: close`).
    pub async fn head(
        &self,
        status: u16,
        chunked: bool,
        content_length: Option<u64>,
    ) -> io::Result<()> {
        let framing = match (chunked, content_length) {
            (true, _) => Framing::Chunked,
            (false, Some(len)) => Framing::Length(len),
            (false, None) => Framing::UntilClose,
        };
        self.step(Step::Head { status, framing }).await
    }

    /// Answers with a redirect to `location` (`status`, `Location`, `Content-Length: 0`): the
    /// response is complete, and the connection serves its next request, as after
    /// [`Held::end`].
    ///
    /// `InvalidInput` once the response head is sent.
    pub async fn redirect(self, status: u16, location: &str) -> io::Result<()> {
        let location = location.to_owned();
        self.step(Step::Redirect { status, location }).await
    }

    /// Sends `bytes` more body bytes, continuing [`body`]; one chunk when chunked (none if 0).
    pub async fn send(&self, bytes: u64) -> io::Result<()> {
        self.step(Step::Send(bytes)).await
    }

    /// Ends the body (the last chunk when chunked); the connection then serves its next
    /// request, unless the body was delimited by the close.
    pub async fn end(self) -> io::Result<()> {
        self.step(Step::End).await
    }

    /// Ends the body, then closes the connection.
    pub async fn end_and_close(self) -> io::Result<()> {
        self.step(Step::EndAndClose).await
    }

    /// Resets the TCP connection (`SO_LINGER` 0, then close).
    pub async fn reset(self) -> io::Result<()> {
        self.step(Step::Reset).await
    }

    /// Sends bytes that are not HTTP: a garbage status line before the head, a chunk size that
    /// is not hex after a chunked head. Then holds the connection until the client closes it.
    /// A `Content-Length` or close-delimited body has no framing left to break: `InvalidInput`.
    pub async fn malformed(self) -> io::Result<()> {
        self.step(Step::Malformed).await
    }

    /// Closes the connection cleanly (FIN) wherever the response stands.
    pub async fn close(self) -> io::Result<()> {
        self.step(Step::Close).await
    }

    async fn step(&self, step: Step) -> io::Result<()> {
        carry_out(self.clock, &self.steps, step).await
    }
}

/// Hands a step to a held connection and waits, at most [`STEP_TIMEOUT`], until it is carried
/// out: `NotConnected` once the connection is gone, `TimedOut` if it is stuck (a write the
/// client does not read, typically).
async fn carry_out<S>(
    clock: Clock,
    steps: &mpsc::UnboundedSender<(S, Reply)>,
    step: S,
) -> io::Result<()> {
    let gone = || io::Error::new(io::ErrorKind::NotConnected, "the held connection is gone");
    let (reply, done) = oneshot::channel();
    steps.send((step, reply)).map_err(|_| gone())?;
    match within(clock, STEP_TIMEOUT, done).await {
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(gone()),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the held connection did not carry out the step in time (is the client reading?)",
        )),
    }
}

/// The clock a stage's waits run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Clock {
    /// Real time, over TCP: under a paused tokio clock a deadline would otherwise pass before
    /// loopback bytes arrive.
    #[default]
    Real,
    /// Tokio's, over a simulated network: nothing moves but through the runtime, so a paused
    /// clock is exact (and deterministic), and a real one is real time.
    Tokio,
}

/// Awaits `fut` for at most `timeout` on `clock`.
async fn within<F: Future>(clock: Clock, timeout: Duration, fut: F) -> Option<F::Output> {
    if clock == Clock::Tokio {
        return tokio::time::timeout(timeout, fut).await.ok();
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut fut = pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = tokio::time::sleep(POLL) => if std::time::Instant::now() >= deadline { return None },
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// What the waits run on.
    clock: Clock,
    counters: Counters,
    /// Whether requests are logged ([`Builder::log`]).
    logging: bool,
    log: Mutex<Vec<Seen>>,
    parked: Lot<Held>,
    parked_ws: Lot<HeldWs>,
    parked_raw: Lot<HeldRaw>,
    /// The client ends of the connections the listener accepted: their ports.
    peers: Arc<Mutex<HashSet<u16>>>,
}

/// The client ends a stage's listener accepted connections from (see [`Stage::peers`]).
/// Cheap to clone: a delegate can keep one.
#[derive(Debug, Clone)]
pub struct Peers {
    port: u16,
    ports: Arc<Mutex<HashSet<u16>>>,
    /// Over a simulated network, the network's count of the HTTP listener's connections.
    ends: Option<Tally>,
}

impl Peers {
    /// The stage's own port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the stage accepted a connection from a client end at `port`.
    pub fn accepted_from(&self, port: u16) -> bool {
        self.ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&port)
    }

    /// Over a simulated network, the network's count of the connections to the stage's HTTP
    /// listener (its client ends alive, in particular); `None` over TCP.
    pub fn simulated(&self) -> Option<&Tally> {
        self.ends.as_ref()
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
    body_bytes_written: AtomicU64,
    request_body_bytes: AtomicU64,
    /// `101` answers written.
    ws_upgrades: AtomicU64,
    /// Text and binary messages received, whole.
    ws_messages_received: AtomicU64,
    /// Close frames received.
    ws_close_frames_received: AtomicU64,
    /// TLS handshakes that resumed a session the client had cached.
    tls_resumed: AtomicU64,
    /// `304 Not Modified` answers written.
    not_modified: AtomicU64,
    /// Raw sockets accepted and closed (also counted in `accepted` and `closed`).
    raw_accepted: AtomicU64,
    raw_closed: AtomicU64,
    /// Raw bytes handed to the kernel (`write` returned) and read from clients.
    raw_bytes_written: AtomicU64,
    raw_bytes_received: AtomicU64,
}

/// Held connections parked by key until the test takes them, in arrival order. A taker waits
/// to be told of each arrival, not by polling, so that a simulated run has no busy timer.
#[derive(Debug)]
struct Lot<T> {
    parked: Mutex<HashMap<String, VecDeque<T>>>,
    arrived: tokio::sync::Notify,
}

impl<T> Default for Lot<T> {
    fn default() -> Self {
        Lot {
            parked: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
        }
    }
}

impl<T> Lot<T> {
    fn park(&self, key: String, held: T) {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        parked.entry(key).or_default().push_back(held);
        drop(parked);
        self.arrived.notify_waiters();
    }

    fn unpark(&self, key: &str) -> Option<T> {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        parked.get_mut(key)?.pop_front()
    }

    /// Waits for one parked under `key` and takes it; `None` if none comes within `timeout`.
    async fn take(&self, clock: Clock, key: &str, timeout: Duration) -> Option<T> {
        within(clock, timeout, async {
            loop {
                let arrival = self.arrived.notified();
                let mut arrival = pin!(arrival);
                arrival.as_mut().enable();
                if let Some(held) = self.unpark(key) {
                    return held;
                }
                arrival.await;
            }
        })
        .await
    }
}

async fn accept(listener: Listener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    // Dropped with this task when the stage drops, aborting every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.counters.accepted.fetch_add(1, Relaxed);
                    shared
                        .peers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(peer.port());
                    connections.spawn(serve(stream, Arc::clone(&shared), tls.clone()));
                }
                // Out of descriptors, say: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// The TLS handshake over `stream`, the resumed ones counted; `None` when it fails.
async fn handshake<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    shared: &Shared,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = acceptor.accept(stream).await.ok()?;
    if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        shared.counters.tls_resumed.fetch_add(1, Relaxed);
    }
    Some(stream)
}

async fn serve(socket: Socket, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let stream = match (tls, socket) {
        (None, socket) => Some(socket.wire()),
        (Some(acceptor), Socket::Tcp(stream)) => handshake(&acceptor, stream, &shared)
            .await
            .map(|stream| Wire::Tls(Box::new(stream))),
        (Some(acceptor), Socket::Sim(stream)) => handshake(&acceptor, stream, &shared)
            .await
            .map(|stream| Wire::SimTls(Box::new(stream))),
    };
    let Some(stream) = stream else {
        // The client refused the certificate, or did not speak TLS: its socket is dropped,
        // so closed, and counted as every other.
        shared.counters.closed.fetch_add(1, Relaxed);
        return;
    };
    let liveness = Liveness::of(&stream);
    let mut conn = Conn {
        stream,
        ahead: Vec::new(),
        body_read: 0,
        liveness,
        shared: Arc::clone(&shared),
    };
    let (hangup, answer) = conn.run().await;
    let liveness = conn.liveness.clone();
    conn.hang_up(hangup).await;
    // The one place a connection is counted closed, after its socket is.
    liveness.closed();
    shared.counters.closed.fetch_add(1, Relaxed);
    if let Some((reply, result)) = answer {
        let _ = reply.send(result);
    }
}

/// Where a held step's result goes.
type Reply = oneshot::Sender<io::Result<()>>;

/// A held step's result, sent once the connection is closed so that the caller sees the close
/// counted.
type Answer = (Reply, io::Result<()>);

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hangup {
    /// A clean close: FIN.
    Fin,
    /// `SO_LINGER` 0, then close: RST.
    Reset,
    /// Hold the socket, reading and discarding, until the client closes it.
    WaitForClient,
    /// The client already closed, or the socket failed: only drop it.
    Gone,
}

/// What a connection does after a response: serve the next request, or hang up.
type Then = ControlFlow<Hangup>;

const GONE: Then = Then::Break(Hangup::Gone);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug)]
enum Step {
    /// Answer the websocket upgrade with a `101`, then be the held websocket these ends drive.
    Upgrade(websocket::WsEnds),
    /// A plain complete response instead of the `101`.
    RefuseUpgrade(u16),
    Head {
        status: u16,
        framing: Framing,
    },
    /// A complete redirect: `status`, `Location: location`, no body; the connection then
    /// serves its next request.
    Redirect {
        status: u16,
        location: String,
    },
    Send(u64),
    End,
    EndAndClose,
    Reset,
    Malformed,
    Close,
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    /// The client asked for `Connection: close`.
    close: bool,
    /// Its `If-None-Match`, if any.
    if_none_match: Option<String>,
    /// What the head says about a websocket upgrade.
    upgrade: websocket::Upgrade,
}

enum Incoming {
    Request(Request),
    /// Not HTTP, or a body whose framing is broken: answered with 400, then closed.
    Malformed(&'static str),
}

/// A connection's socket: TCP, or TLS over TCP; or the same over a simulated network.
pub(crate) enum Wire {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Sim(ServerStream),
    SimTls(Box<tokio_rustls::server::TlsStream<ServerStream>>),
}

impl Wire {
    /// Resets the connection: `SO_LINGER` 0 on a TCP socket (the reset goes out when it is
    /// closed, next), the network's reset on a simulated one.
    fn reset(&self) {
        match self {
            Wire::Tcp(stream) => {
                let _ = stream.set_zero_linger();
            }
            Wire::Tls(stream) => {
                let _ = stream.get_ref().0.set_zero_linger();
            }
            Wire::Sim(stream) => stream.reset(),
            Wire::SimTls(stream) => stream.get_ref().0.reset(),
        }
    }
}

/// Forward a poll to the wire's stream, whichever it is.
macro_rules! wire {
    ($wire:expr, $stream:ident => $poll:expr) => {
        match $wire.get_mut() {
            Wire::Tcp($stream) => $poll,
            Wire::Tls($stream) => $poll,
            Wire::Sim($stream) => $poll,
            Wire::SimTls($stream) => $poll,
        }
    };
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        wire!(self, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        wire!(self, stream => Pin::new(stream).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        wire!(self, stream => Pin::new(stream).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        wire!(self, stream => Pin::new(stream).poll_shutdown(cx))
    }
}

struct Conn {
    stream: Wire,
    /// Bytes read from the client and not yet parsed.
    ahead: Vec<u8>,
    /// The current request's body bytes read so far.
    body_read: u64,
    shared: Arc<Shared>,
    /// Told when the connection closes.
    liveness: Liveness,
}

impl Conn {
    /// Serves requests until the connection ends; a held step that ended it comes back to be
    /// answered after the close.
    async fn run(&mut self) -> (Hangup, Option<Answer>) {
        loop {
            let request = match self.read_request().await {
                Ok(Incoming::Request(request)) => request,
                Ok(Incoming::Malformed(why)) => {
                    let answered = self.write_text(400, why, true).await;
                    return (answered.map_or(Hangup::Gone, |()| Hangup::Fin), None);
                }
                Err(_) => return (Hangup::Gone, None),
            };
            let (then, answer) = match Route::of(&request.target) {
                Route::Hold(key) => self.hold(&request, key).await,
                Route::WebSocket(script) => self.websocket(&request, script).await,
                Route::Script(script) => {
                    let then = match &script.etag {
                        Some(etag) if request.if_none_match.as_deref() == Some(etag) => {
                            self.not_modified(&script).await
                        }
                        _ => self.play(&script).await,
                    };
                    (then.unwrap_or(GONE), None)
                }
                Route::Redirect(redirect) => (self.redirect(&redirect).await.unwrap_or(GONE), None),
                Route::NotFound => (self.refuse(404, "no such script").await, None),
                Route::BadQuery(bad) => (self.refuse(400, &bad.to_string()).await, None),
            };
            match then {
                Then::Continue(()) if !request.close => {}
                Then::Continue(()) => return (Hangup::Fin, answer),
                Then::Break(hangup) => return (hangup, answer),
            }
        }
    }

    /// Answers a request the stage cannot play; the connection stays open.
    async fn refuse(&mut self, status: u16, why: &str) -> Then {
        match self.write_text(status, why, false).await {
            Ok(()) => Then::Continue(()),
            Err(_) => GONE,
        }
    }

    async fn play(&mut self, script: &Script) -> io::Result<Then> {
        let (upto, then) = match script.ending {
            Ending::NoResponse => return Ok(Then::Break(Hangup::Fin)),
            Ending::StallHeaders => return Ok(Then::Break(Hangup::WaitForClient)),
            Ending::Whole if script.keep_alive => (script.len, Then::Continue(())),
            Ending::Whole => (script.len, Then::Break(Hangup::Fin)),
            Ending::StallAfter(k) => (k, Then::Break(Hangup::WaitForClient)),
            Ending::ResetAfter(k) => (k, Then::Break(Hangup::Reset)),
            Ending::CloseAfter(k) => (k, Then::Break(Hangup::Fin)),
            Ending::Malformed(_) => (0, Then::Break(Hangup::WaitForClient)),
        };
        self.pause(script.header_delay).await?;
        let framing = match script.ending {
            Ending::Malformed(Garbage::Status) => return self.write_garbage(GARBAGE_STATUS).await,
            Ending::Malformed(Garbage::Chunk) => Framing::Chunked,
            _ if script.chunked => Framing::Chunked,
            _ => Framing::Length(script.len),
        };
        self.write_head_with(
            script.status,
            framing,
            !script.keep_alive,
            &script.cache_headers(),
        )
        .await?;
        let mut sent = 0;
        while sent < upto {
            if sent > 0 {
                self.pause(script.pace).await?;
            }
            let n = (upto - sent).min(script.chunk as u64);
            self.write_body(framing, sent, n).await?;
            sent += n;
        }
        match script.ending {
            Ending::Whole => self.end_body(framing).await?,
            Ending::Malformed(_) => return self.write_garbage(GARBAGE_CHUNK).await,
            _ => {}
        }
        Ok(then)
    }

    /// A redirect: its head, `Location` included, and its short body.
    async fn redirect(&mut self, redirect: &Redirect) -> io::Result<Then> {
        let framing = Framing::Length(redirect.len);
        let close = !redirect.keep_alive;
        let location = redirect
            .location
            .as_deref()
            .map_or(String::new(), |location| {
                format!("location: {location}\r\n")
            });
        self.write_head_with(redirect.status, framing, close, &location)
            .await?;
        self.write_body(framing, 0, redirect.len).await?;
        Ok(if close {
            Then::Break(Hangup::Fin)
        } else {
            Then::Continue(())
        })
    }

    /// Parks the request for [`Stage::held`] and carries out its steps, watching for the client
    /// closing meanwhile.
    async fn hold(&mut self, request: &Request, key: String) -> (Then, Option<Answer>) {
        let (steps_tx, mut steps) = mpsc::unbounded_channel();
        let held = Held {
            method: request.method.clone(),
            target: request.target.clone(),
            upgrade: request.upgrade.key(&request.method).map(|_| ()),
            steps: steps_tx,
            open: self.liveness.clone(),
            clock: self.shared.clock,
        };
        self.shared.parked.park(key, held);
        let mut exchange = Exchange::default();
        loop {
            let (step, reply) = match self.next_step(&mut steps).await {
                Ok(step) => step,
                Err(hangup) => return (Then::Break(hangup), None),
            };
            if let Step::Upgrade(ends) = step {
                let head_sent = exchange.framing.is_some();
                match self.upgrade_held(request, head_sent, ends, reply).await {
                    Some(ending) => return ending,
                    None => continue,
                }
            }
            let outcome = match self.take_step(step, &mut exchange).await {
                Ok(outcome) => outcome,
                Err(step) => {
                    let _ = reply.send(Err(exchange.out_of_order(&step)));
                    continue;
                }
            };
            match outcome {
                Ok(None) => {
                    let _ = reply.send(Ok(()));
                }
                // A close happens now: answer once it is counted.
                Ok(Some(then @ Then::Break(Hangup::Fin | Hangup::Reset))) => {
                    return (then, Some((reply, Ok(()))));
                }
                // Serving on, or waiting for the client: answer now.
                Ok(Some(then)) => {
                    let _ = reply.send(Ok(()));
                    return (then, None);
                }
                Err(e) => return (GONE, Some((reply, Err(e)))),
            }
        }
    }

    /// The next step of a held exchange, or how the connection ends without one: `Fin` when
    /// the handle was dropped, `Gone` when the client closed.
    async fn next_step(
        &mut self,
        steps: &mut mpsc::UnboundedReceiver<(Step, Reply)>,
    ) -> Result<(Step, Reply), Hangup> {
        loop {
            tokio::select! {
                biased;
                step = steps.recv() => return step.ok_or(Hangup::Fin),
                read = self.read_ahead() => read.map_err(|_| Hangup::Gone)?,
            }
        }
    }

    /// Carries out a step: `Some` when it ends the exchange. A step that does not fit where the
    /// response stands is handed back, and nothing is sent.
    async fn take_step(
        &mut self,
        step: Step,
        exchange: &mut Exchange,
    ) -> Result<io::Result<Option<Then>>, Step> {
        let done = |then| Ok(Ok(then));
        let framing = exchange.framing;
        let outcome = match (step, framing) {
            (Step::RefuseUpgrade(status), None) => {
                let refused = self.write_text(status, "websocket upgrade refused", false);
                refused.await.map(|()| Some(Then::Continue(())))
            }
            (Step::Head { status, framing }, None) => {
                exchange.framing = Some(framing);
                let close = framing == Framing::UntilClose;
                self.write_head(status, framing, close).await.map(|()| None)
            }
            (Step::Redirect { status, location }, None) => {
                let location = format!("location: {location}\r\n");
                let head = self.write_head_with(status, Framing::Length(0), false, &location);
                head.await.map(|()| Some(Then::Continue(())))
            }
            (Step::Send(n), Some(framing)) => {
                let offset = exchange.sent;
                exchange.sent += n;
                self.write_body(framing, offset, n).await.map(|()| None)
            }
            (Step::End, Some(Framing::UntilClose)) => return done(Some(Then::Break(Hangup::Fin))),
            (Step::End, Some(framing)) => {
                let then = Then::Continue(());
                self.end_body(framing).await.map(|()| Some(then))
            }
            (Step::EndAndClose, Some(framing)) => {
                let then = Then::Break(Hangup::Fin);
                self.end_body(framing).await.map(|()| Some(then))
            }
            (Step::Reset, _) => return done(Some(Then::Break(Hangup::Reset))),
            (Step::Close, _) => return done(Some(Then::Break(Hangup::Fin))),
            (Step::Malformed, None) => self.write_garbage(GARBAGE_STATUS).await.map(Some),
            (Step::Malformed, Some(Framing::Chunked)) => {
                self.write_garbage(GARBAGE_CHUNK).await.map(Some)
            }
            (step, _) => return Err(step),
        };
        Ok(outcome)
    }

    /// Sends bytes that are not HTTP, then waits for the client to give up on them.
    async fn write_garbage(&mut self, garbage: &[u8]) -> io::Result<Then> {
        self.stream.write_all(garbage).await?;
        Ok(Then::Break(Hangup::WaitForClient))
    }

    async fn hang_up(mut self, hangup: Hangup) {
        match hangup {
            Hangup::Fin => {
                let _ = self.stream.shutdown().await;
            }
            Hangup::Reset => self.stream.reset(),
            Hangup::WaitForClient => {
                let mut sink = [0; 4096];
                while let Ok(1..) = self.stream.read(&mut sink).await {}
            }
            Hangup::Gone => {}
        }
    }

    /// Reads one request head and its whole body (counted, discarded), so that the connection
    /// can serve the next one.
    async fn read_request(&mut self) -> io::Result<Incoming> {
        let (request, body, consumed) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(&self.ahead) {
                Ok(httparse::Status::Complete(consumed)) => match Request::from_head(&parsed) {
                    Ok((request, body)) => break (request, body, consumed),
                    Err(why) => return Ok(Incoming::Malformed(why)),
                },
                Ok(httparse::Status::Partial) => self.read_ahead().await?,
                Err(_) => return Ok(Incoming::Malformed("not an HTTP/1.1 request head")),
            }
        };
        self.ahead.drain(..consumed);
        self.shared.counters.requests.fetch_add(1, Relaxed);
        self.body_read = 0;
        match body {
            RequestBody::None => {}
            RequestBody::Length(len) => self.discard_body(len).await?,
            RequestBody::Chunked => {
                if let Err(why) = self.discard_chunked_body().await? {
                    return Ok(Incoming::Malformed(why));
                }
            }
        }
        if self.shared.logging {
            let seen = Seen {
                method: request.method.clone(),
                target: request.target.clone(),
                headers: request.headers.clone(),
                body_len: self.body_read,
            };
            self.shared
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(seen);
        }
        Ok(Incoming::Request(request))
    }

    async fn discard_body(&mut self, len: u64) -> io::Result<()> {
        let mut left = len;
        loop {
            let n = self
                .ahead
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            self.ahead.drain(..n);
            self.body_read += n as u64;
            self.shared
                .counters
                .request_body_bytes
                .fetch_add(n as u64, Relaxed);
            left -= n as u64;
            if left == 0 {
                return Ok(());
            }
            self.read_ahead().await?;
        }
    }

    /// The outer result is the socket's, the inner one the framing's.
    async fn discard_chunked_body(&mut self) -> io::Result<Result<(), &'static str>> {
        loop {
            let size = match httparse::parse_chunk_size(&self.ahead) {
                Ok(httparse::Status::Complete((consumed, size))) => {
                    self.ahead.drain(..consumed);
                    size
                }
                Ok(httparse::Status::Partial) => {
                    self.read_ahead().await?;
                    continue;
                }
                Err(_) => return Ok(Err("a request chunk size is not hex")),
            };
            if size == 0 {
                self.discard_trailers().await?;
                return Ok(Ok(()));
            }
            self.discard_body(size).await?;
            while self.ahead.len() < 2 {
                self.read_ahead().await?;
            }
            if self.ahead.drain(..2).as_slice() != b"\r\n" {
                return Ok(Err("a request chunk does not end with CRLF"));
            }
        }
    }

    async fn discard_trailers(&mut self) -> io::Result<()> {
        loop {
            match self.ahead.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.ahead.drain(..2);
                    return Ok(());
                }
                Some(end) => {
                    self.ahead.drain(..end + 2);
                }
                None => self.read_ahead().await?,
            }
        }
    }

    /// Reads what the client sent into `ahead`. The client closing is an error here: every
    /// caller is waiting for bytes, and a close ends the connection.
    async fn read_ahead(&mut self) -> io::Result<()> {
        if self.ahead.len() > MAX_AHEAD {
            return Err(io::Error::other(
                "the client sent too much ahead of its responses",
            ));
        }
        match self.stream.read_buf(&mut self.ahead).await? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    /// Sleeps, reading ahead meanwhile so that a client closing ends the wait.
    async fn pause(&mut self, duration: Duration) -> io::Result<()> {
        if duration.is_zero() {
            return Ok(());
        }
        let mut sleep = pin!(tokio::time::sleep(duration));
        loop {
            tokio::select! {
                biased;
                () = &mut sleep => return Ok(()),
                read = self.read_ahead() => read?,
            }
        }
    }

    /// A `304 Not Modified` for a script with `etag=`, whose tag the request named: its cache
    /// headers and no body.
    async fn not_modified(&mut self, script: &Script) -> io::Result<Then> {
        self.pause(script.header_delay).await?;
        let mut head = "HTTP/1.1 304 Not Modified\r\n".to_owned();
        head += &script.cache_headers();
        if !script.keep_alive {
            head += "connection: close\r\n";
        }
        head += "\r\n";
        self.stream.write_all(head.as_bytes()).await?;
        self.shared.counters.not_modified.fetch_add(1, Relaxed);
        Ok(if script.keep_alive {
            Then::Continue(())
        } else {
            Then::Break(Hangup::Fin)
        })
    }

    async fn write_head(&mut self, status: u16, framing: Framing, close: bool) -> io::Result<()> {
        self.write_head_with(status, framing, close, "").await
    }

    /// A response head with `extra` header lines (each ending in CRLF).
    async fn write_head_with(
        &mut self,
        status: u16,
        framing: Framing,
        close: bool,
        extra: &str,
    ) -> io::Result<()> {
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            426 => "Upgrade Required",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            307 => "Temporary Redirect",
            _ => "",
        };
        let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
        match framing {
            Framing::Length(len) => head += &format!("content-length: {len}\r\n"),
            Framing::Chunked => head += "transfer-encoding: chunked\r\n",
            Framing::UntilClose => {}
        }
        if close || framing == Framing::UntilClose {
            head += "connection: close\r\n";
        }
        head += extra;
        head += "\r\n";
        self.stream.write_all(head.as_bytes()).await
    }

    /// Writes body bytes `offset..offset + len` of [`body`]: one chunk when chunked.
    async fn write_body(&mut self, framing: Framing, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if framing == Framing::Chunked {
            self.stream
                .write_all(format!("{len:x}\r\n").as_bytes())
                .await?;
        }
        let mut done = 0;
        while done < len {
            let start = ((offset + done) % PATTERN.len() as u64) as usize;
            let n = (len - done).min(DEFAULT_CHUNK as u64) as usize;
            self.write_counted(&TILE[start..start + n]).await?;
            done += n as u64;
        }
        if framing == Framing::Chunked {
            self.stream.write_all(b"\r\n").await?;
        }
        Ok(())
    }

    async fn end_body(&mut self, framing: Framing) -> io::Result<()> {
        match framing {
            Framing::Chunked => self.stream.write_all(LAST_CHUNK).await,
            Framing::Length(_) | Framing::UntilClose => Ok(()),
        }
    }

    /// A small complete response for the stage's own answers (404, 400).
    async fn write_text(&mut self, status: u16, text: &str, close: bool) -> io::Result<()> {
        self.write_head(status, Framing::Length(text.len() as u64), close)
            .await?;
        self.write_counted(text.as_bytes()).await
    }

    /// Writes `bytes`, counting each write as it returns: the count is what left the server.
    async fn write_counted(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.stream.write(bytes).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.shared
                .counters
                .body_bytes_written
                .fetch_add(n as u64, Relaxed);
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// Where a held response stands.
#[derive(Debug, Default)]
struct Exchange {
    /// The head's framing, once the head is sent.
    framing: Option<Framing>,
    /// Body bytes sent so far.
    sent: u64,
}

impl Exchange {
    fn out_of_order(&self, step: &Step) -> io::Error {
        let why = match self.framing {
            None => format!("{step:?} before the head"),
            Some(framing) => format!("{step:?} after a {framing:?} head"),
        };
        io::Error::new(io::ErrorKind::InvalidInput, why)
    }
}

enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

impl Request {
    fn from_head(
        parsed: &httparse::Request<'_, '_>,
    ) -> Result<(Request, RequestBody), &'static str> {
        let mut body = RequestBody::None;
        let mut close = false;
        let mut if_none_match = None;
        let mut upgrade = websocket::Upgrade::default();
        let mut headers = Vec::new();
        for header in parsed.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .map_err(|_| "a header value is not UTF-8")?
                .trim();
            upgrade.header(header.name, value);
            headers.push((header.name.to_ascii_lowercase(), value.to_owned()));
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                if value.to_ascii_lowercase().contains("chunked") {
                    body = RequestBody::Chunked;
                }
            } else if header.name.eq_ignore_ascii_case("content-length") {
                // Chunked framing wins over a length (RFC 9112, 6.3).
                if !matches!(body, RequestBody::Chunked) {
                    body = RequestBody::Length(value.parse().map_err(|_| "a bad content-length")?);
                }
            } else if header.name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if header.name.eq_ignore_ascii_case("if-none-match") {
                if_none_match = Some(value.to_owned());
            }
        }
        let request = Request {
            method: parsed.method.unwrap_or_default().to_owned(),
            target: parsed.path.unwrap_or_default().to_owned(),
            headers,
            close,
            if_none_match,
            upgrade,
        };
        Ok((request, body))
    }
}

/// What a request's target asks for.
enum Route {
    Script(Script),
    Redirect(Redirect),
    Hold(String),
    WebSocket(websocket::Script),
    NotFound,
    BadQuery(BadQuery),
}

/// A `/bytes/N` response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Script {
    status: u16,
    len: u64,
    chunked: bool,
    chunk: usize,
    pace: Duration,
    keep_alive: bool,
    header_delay: Duration,
    ending: Ending,
    /// `Cache-Control: max-age=`.
    max_age: Option<u64>,
    /// `Cache-Control: no-store`.
    no_store: bool,
    /// The `ETag`, quoted.
    etag: Option<String>,
}

/// A `/redirect/CODE`, `/chain/N` or `/loop/K` response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Redirect {
    status: u16,
    /// `None`: no `Location` header.
    location: Option<String>,
    len: u64,
    keep_alive: bool,
}

impl Redirect {
    /// The route for a redirecting path; `None` if `path` is not one.
    fn route(path: &str, query: &str) -> Option<Route> {
        let (kind, rest) = path.strip_prefix('/')?.split_once('/')?;
        if !matches!(kind, "redirect" | "chain" | "loop") {
            return None;
        }
        let mut redirect = Redirect {
            status: 302,
            location: None,
            len: 16,
            keep_alive: true,
        };
        let mut code = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let bad = |why| {
                Route::BadQuery(BadQuery {
                    pair: pair.to_owned(),
                    why,
                })
            };
            let Some((key, value)) = pair.split_once('=') else {
                return Some(bad("expected key=value"));
            };
            match key {
                "to" if kind == "redirect" => match percent_decode(value) {
                    Some(to) => redirect.location = Some(to),
                    None => return Some(bad("a bad percent-encoding")),
                },
                "code" if kind != "redirect" => match value.parse().ok().filter(is_redirect) {
                    Some(status) => code = Some(status),
                    None => return Some(bad("expected 300..=399")),
                },
                "len" => match value.parse() {
                    Ok(len) => redirect.len = len,
                    Err(_) => return Some(bad("expected a number")),
                },
                "keep_alive" => match value {
                    "0" => redirect.keep_alive = false,
                    "1" => redirect.keep_alive = true,
                    _ => return Some(bad("expected 0 or 1")),
                },
                _ => return Some(bad("unknown key")),
            }
        }
        let code = code.unwrap_or(302);
        let number = rest.parse::<u16>().ok();
        match (kind, number) {
            ("redirect", Some(status)) if is_redirect(&status) => redirect.status = status,
            ("chain", Some(0)) => return Some(Route::Script(Script::parse(5, "").ok()?)),
            ("chain", Some(n)) => {
                redirect.status = code;
                redirect.location = Some(format!("/chain/{}?code={code}", n - 1));
            }
            ("loop", Some(k @ 0..=1)) => {
                redirect.status = code;
                redirect.location = Some(format!("/loop/{}?code={code}", 1 - k));
            }
            _ => return Some(Route::NotFound),
        }
        Some(Route::Redirect(redirect))
    }
}

fn is_redirect(status: &u16) -> bool {
    (300..=399).contains(status)
}

/// `%XX` decoded; `None` if an escape is broken or the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `%`-encode everything but unreserved characters, for a `to=` value.
pub fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How a scripted response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Whole,
    NoResponse,
    StallHeaders,
    StallAfter(u64),
    ResetAfter(u64),
    CloseAfter(u64),
    Malformed(Garbage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Garbage {
    Status,
    Chunk,
}

/// A query pair the stage cannot play: the 400's body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BadQuery {
    pair: String,
    why: &'static str,
}

impl fmt::Display for BadQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pair, self.why)
    }
}

impl Route {
    fn of(target: &str) -> Route {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if let Some(script) = path.strip_prefix("/ws/") {
            return websocket::Script::route(script, query);
        }
        if let Some(key) = path.strip_prefix("/hold/").filter(|key| !key.is_empty()) {
            return Route::Hold(key.to_owned());
        }
        if let Some(route) = Redirect::route(path, query) {
            return route;
        }
        let Some(len) = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()) else {
            return Route::NotFound;
        };
        match Script::parse(len, query) {
            Ok(script) => Route::Script(script),
            Err(bad) => Route::BadQuery(bad),
        }
    }
}

impl Script {
    /// The cache headers the script asks for, as header lines.
    fn cache_headers(&self) -> String {
        let mut directives = Vec::new();
        if let Some(age) = self.max_age {
            directives.push(format!("max-age={age}"));
        }
        if self.no_store {
            directives.push("no-store".to_owned());
        }
        let mut lines = String::new();
        if !directives.is_empty() {
            lines += &format!("cache-control: {}\r\n", directives.join(", "));
        }
        if let Some(etag) = &self.etag {
            lines += &format!("etag: {etag}\r\n");
        }
        lines
    }

    fn parse(len: u64, query: &str) -> Result<Script, BadQuery> {
        let mut script = Script {
            status: 200,
            len,
            chunked: false,
            chunk: DEFAULT_CHUNK,
            pace: Duration::ZERO,
            keep_alive: true,
            header_delay: Duration::ZERO,
            ending: Ending::Whole,
            max_age: None,
            no_store: false,
            etag: None,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let bad = |why| BadQuery {
                pair: pair.to_owned(),
                why,
            };
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            let number = || value.parse::<u64>().map_err(|_| bad("expected a number"));
            let flag = || match value {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(bad("expected 0 or 1")),
            };
            let within_body = |k: u64| {
                if k <= len {
                    Ok(k)
                } else {
                    Err(bad("past the body's length"))
                }
            };
            let ending = match key {
                "status" => {
                    script.status = value
                        .parse()
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| bad("expected 200..=599"))?;
                    None
                }
                "chunked" => {
                    script.chunked = flag()?;
                    None
                }
                "chunk" => {
                    script.chunk = value
                        .parse()
                        .ok()
                        .filter(|&c| c > 0)
                        .ok_or_else(|| bad("expected a positive size"))?;
                    None
                }
                "pace_ms" => {
                    script.pace = Duration::from_millis(number()?);
                    None
                }
                "keep_alive" => {
                    script.keep_alive = flag()?;
                    None
                }
                "header_delay_ms" => {
                    script.header_delay = Duration::from_millis(number()?);
                    None
                }
                "max_age" => {
                    script.max_age = Some(number()?);
                    None
                }
                "no_store" => {
                    script.no_store = flag()?;
                    None
                }
                "etag" => {
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        return Err(bad("expected letters and digits"));
                    }
                    script.etag = Some(format!("\"{value}\""));
                    None
                }
                "stall_headers" => flag()?.then_some(Ending::StallHeaders),
                "no_response" => flag()?.then_some(Ending::NoResponse),
                "stall_after" => Some(Ending::StallAfter(within_body(number()?)?)),
                "reset_after" => Some(Ending::ResetAfter(within_body(number()?)?)),
                "close_after" => Some(Ending::CloseAfter(within_body(number()?)?)),
                "malformed" => match value {
                    "status" => Some(Ending::Malformed(Garbage::Status)),
                    "chunk" => Some(Ending::Malformed(Garbage::Chunk)),
                    _ => return Err(bad("expected status or chunk")),
                },
                _ => return Err(bad("unknown key")),
            };
            if let Some(ending) = ending {
                if script.ending != Ending::Whole {
                    return Err(bad(
                        "a second ending: one of stall_*, reset_after, close_after, no_response, malformed",
                    ));
                }
                script.ending = ending;
            }
        }
        Ok(script)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_from_the_query() {
        let script = Script::parse(
            100,
            "chunked=1&chunk=10&pace_ms=5&status=503&stall_after=20",
        )
        .unwrap();
        assert!(script.chunked);
        assert_eq!((script.chunk, script.status), (10, 503));
        assert_eq!(script.pace, Duration::from_millis(5));
        assert_eq!(script.ending, Ending::StallAfter(20));
    }

    #[test]
    fn cache_headers_come_from_the_query() {
        let script = Script::parse(10, "max_age=60&no_store=1&etag=v1").unwrap();
        assert_eq!(
            script.cache_headers(),
            "cache-control: max-age=60, no-store\r\netag: \"v1\"\r\n"
        );
        assert_eq!(Script::parse(10, "").unwrap().cache_headers(), "");
    }

    #[test]
    fn bad_queries_are_refused() {
        for query in [
            "nope=1",
            "chunk=0",
            "status=99",
            "chunked=yes",
            "close_after=101",
            "reset_after=1&stall_after=1",
            "malformed=body",
            "pace_ms",
            "max_age=soon",
            "etag=a\"b",
            "etag=",
        ] {
            assert!(Script::parse(100, query).is_err(), "{query}");
        }
    }

    #[test]
    fn redirects_route_from_the_path_and_query() {
        let to = percent_encode("/bytes/5?status=201");
        let Route::Redirect(r) = Route::of(&format!("/redirect/307?to={to}&len=3")) else {
            panic!("not a redirect");
        };
        assert_eq!((r.status, r.len), (307, 3));
        assert_eq!(r.location.as_deref(), Some("/bytes/5?status=201"));
        let Route::Redirect(r) = Route::of("/chain/2?code=301") else {
            panic!("not a redirect");
        };
        assert_eq!(r.location.as_deref(), Some("/chain/1?code=301"));
        assert!(matches!(Route::of("/chain/0"), Route::Script(_)));
        let Route::Redirect(r) = Route::of("/loop/1") else {
            panic!("not a redirect");
        };
        assert_eq!(r.location.as_deref(), Some("/loop/0?code=302"));
        assert!(matches!(Route::of("/redirect/200"), Route::NotFound));
        assert!(matches!(
            Route::of("/redirect/302?to=%zz"),
            Route::BadQuery(_)
        ));
    }

    #[test]
    fn the_tile_is_the_body_pattern() {
        assert_eq!(TILE[..], body(TILE.len())[..]);
    }
}
