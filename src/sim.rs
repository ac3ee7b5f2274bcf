//! The simulated network: the real client over turmoil's deterministic network and clock.
//!
//! [turmoil](https://docs.rs/turmoil) runs each host (a client, a server) on a tokio
//! current-thread runtime of its own, one after another on the calling thread, with tokio's
//! clock paused: a simulation advances time in ticks (1 ms by default) and delivers the
//! messages between hosts with a latency drawn from its seeded random numbers. A leakproof
//! [`Session`](leakproof::Session) made inside a host runs there: its driver, its tasks' IO and
//! hyper's connection futures are spawned on the host's runtime (`Handle::current()`), and
//! every timer of the client (request, resource, idle, close) is a `tokio::time` timer on the
//! host's paused clock, so a 60 s timeout costs 60,000 ticks and no wall-clock wait.
//!
//! The pieces:
//! - [`Turmoil`]: the client's transport over `turmoil::net::TcpStream` (plug it with
//!   `ConfigurationBuilder::transport`). The session owns each simulated stream and drops it
//!   to close it, as it does a TCP one; the simulated network then carries the FIN (or the
//!   RST, if unread bytes were left) to the server host.
//! - [`serve`], [`serve_tls`]: a small HTTP/1.1 server on hyper's server side (over TLS for
//!   the second), to run as a turmoil host.
//!   hyper rather than the stage: the stage is written on tokio's sockets, `tokio::spawn` and
//!   wall-clock deadlines (`std::time::Instant`) and its scripts are driven from the test
//!   thread, so making it run inside a host is a rewrite of its listener, its waits and its
//!   reset (SO_LINGER); a hyper server over turmoil's listener is a few lines, and its routes
//!   (a body of N bytes after a simulated delay, a stall) are what the client's tests need
//!   here.
//! - [`Witness`]: the server side's count of the connections it accepted and saw closed by
//!   the client (its read gave the end of the stream, or failed: a reset). It is independent
//!   of the client: the close it counts is what the simulated network delivered.
//! - [`Trace`]: events of both sides in order, each stamped with the simulated time, so that
//!   one seed's run can be compared byte for byte with another's.
//!
//! What is deterministic: the network (latencies, order of delivery), each host's clock and
//! its tasks' scheduling, given the seed ([`sim`]). What is not, and so stays out of the cases
//! that compare traces, is listed in the README ("Transports").

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use leakproof::{Endpoint, Transport};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use turmoil::net::{TcpListener, TcpStream};

/// The client's transport in a simulation: a simulated TCP connection to the endpoint (its
/// host resolved by the simulation's names: `http://server/` reaches the host `server`).
/// Connecting to a port nothing listens on is refused, as TCP's would be.
#[derive(Debug, Clone, Copy, Default)]
pub struct Turmoil;

impl Transport for Turmoil {
    type Stream = TcpStream;

    async fn connect(&self, to: Endpoint<'_>) -> io::Result<TcpStream> {
        TcpStream::connect((to.host(), to.port())).await
    }
}

/// A simulation from `seed`: message latencies drawn between 1 and 20 ms and the hosts run in
/// an order drawn at each tick, both from the seed, so that different seeds interleave the
/// hosts differently; 1 ms ticks; at most `duration` of simulated time.
pub fn sim<'a>(seed: u64, duration: Duration) -> turmoil::Sim<'a> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .enable_random_order()
        .simulation_duration(duration)
        .build()
}

/// The simulated time now, as the trace writes it: milliseconds since the simulation began.
fn now() -> String {
    let elapsed = turmoil::sim_elapsed().unwrap_or_default();
    format!("{:>9.3}ms", elapsed.as_secs_f64() * 1e3)
}

/// Events of a simulation in the order they happened, each stamped with the simulated time
/// and the side that saw it. Cheap to clone: clones share one log.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<String>>>);

impl Trace {
    pub fn new() -> Trace {
        Trace::default()
    }

    /// Log `event` as seen by `side` now.
    pub fn record(&self, side: &str, event: impl fmt::Display) {
        let line = format!("{} {side}: {event}", now());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    /// The whole log, one event a line.
    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

/// The server side's count of connections: accepted, and seen closed by the client.
#[derive(Debug, Clone, Default)]
pub struct Witness(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
}

impl Witness {
    pub fn new() -> Witness {
        Witness::default()
    }

    /// Connections the server accepted.
    pub fn accepted(&self) -> u64 {
        self.0.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose client end the server saw close (end of stream, or a reset).
    pub fn closed(&self) -> u64 {
        self.0.closed.load(Ordering::SeqCst)
    }

    /// Requests the server read.
    pub fn requests(&self) -> u64 {
        self.0.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted and not seen closed.
    pub fn open(&self) -> u64 {
        self.accepted() - self.closed()
    }

    /// Wait, on the simulated clock and at most `within`, until `closed` connections have
    /// been seen closed; whether they were.
    pub async fn wait_closed(&self, closed: u64, within: Duration) -> bool {
        let seen = async {
            while self.closed() < closed {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(within, seen).await.is_ok()
    }
}

/// An accepted connection, watched: its first end of stream or read error is the client's
/// close, counted and traced once.
struct Watched {
    stream: TcpStream,
    id: u64,
    witness: Witness,
    trace: Trace,
    ended: bool,
}

impl Watched {
    fn ended(&mut self, how: &str) {
        if !self.ended {
            self.ended = true;
            self.witness.0.closed.fetch_add(1, Ordering::SeqCst);
            self.trace.record(
                "server",
                format_args!("conn {} closed by the client ({how})", self.id),
            );
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.ended("end of stream");
            }
            Poll::Ready(Err(error)) => {
                let how = format!("{:?}", error.kind());
                this.ended(&how);
            }
            _ => {}
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The body of every response: `leakproof ` repeated, as the stage's.
fn body(len: usize) -> Bytes {
    crate::stage::body(len).into()
}

/// What the server does with a request, by its target:
/// - `/bytes/N`: `200` with an N-byte body, framed by `Content-Length`; query keys:
///   `delay_ms=MS` answers after MS of simulated time, `max_age=S` says
///   `Cache-Control: max-age=S`;
/// - `/stall`: never answers (the connection stays open until the client closes it);
/// - anything else: `404`.
enum Route {
    Bytes {
        len: usize,
        delay: Duration,
        max_age: Option<u64>,
    },
    Stall,
    NotFound,
}

fn route(target: &str) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/stall" {
        return Route::Stall;
    }
    let Some(len) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Route::NotFound;
    };
    let number = |key: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
            .and_then(|n| n.parse::<u64>().ok())
    };
    Route::Bytes {
        len,
        delay: number("delay_ms").map_or(Duration::ZERO, Duration::from_millis),
        max_age: number("max_age"),
    }
}

/// Serve HTTP/1.1 on `port` of the current host, for ever: the software of a turmoil host
/// (`sim.host("server", move || serve(80, witness.clone(), trace.clone()))`). Each connection
/// is counted by `witness` and its requests and close written to `trace`.
pub async fn serve(port: u16, witness: Witness, trace: Trace) -> turmoil::Result {
    serve_on(port, None, witness, trace).await
}

/// [`serve`], over TLS (ALPN `http/1.1`) with `config`: https (and the client's TLS over its
/// simulated stream) in a simulation. A connection whose handshake fails is counted as any
/// other.
pub async fn serve_tls(
    port: u16,
    config: Arc<rustls::ServerConfig>,
    witness: Witness,
    trace: Trace,
) -> turmoil::Result {
    serve_on(port, Some(TlsAcceptor::from(config)), witness, trace).await
}

async fn serve_on(
    port: u16,
    tls: Option<TlsAcceptor>,
    witness: Witness,
    trace: Trace,
) -> turmoil::Result {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let id = witness.0.accepted.fetch_add(1, Ordering::SeqCst);
        trace.record("server", format_args!("conn {id} accepted from {peer}"));
        let watched = Watched {
            stream,
            id,
            witness: witness.clone(),
            trace: trace.clone(),
            ended: false,
        };
        let (tls, witness, trace) = (tls.clone(), witness.clone(), trace.clone());
        tokio::spawn(async move {
            let served = match tls {
                None => connection(watched, id, witness, trace.clone()).await,
                Some(tls) => match tls.accept(watched).await {
                    Ok(stream) => connection(stream, id, witness, trace.clone()).await,
                    Err(error) => Err(error.to_string()),
                },
            };
            if let Err(error) = served {
                trace.record("server", format_args!("conn {id} ended: {error}"));
            }
        });
    }
}

/// Serve one connection's requests by their routes (see [`Route`]) until it ends.
async fn connection<S>(stream: S, id: u64, witness: Witness, trace: Trace) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (trace, witness) = (trace.clone(), witness.clone());
        async move {
            witness.0.requests.fetch_add(1, Ordering::SeqCst);
            let target = request.uri().to_string();
            trace.record(
                "server",
                format_args!("conn {id} {} {target}", request.method()),
            );
            let response = match route(&target) {
                Route::Bytes {
                    len,
                    delay,
                    max_age,
                } => {
                    tokio::time::sleep(delay).await;
                    let mut response = http::Response::new(Full::new(body(len)));
                    if let Some(seconds) = max_age {
                        let value = format!("max-age={seconds}");
                        response.headers_mut().insert(
                            http::header::CACHE_CONTROL,
                            http::HeaderValue::from_str(&value).expect("a header value"),
                        );
                    }
                    response
                }
                Route::Stall => std::future::pending().await,
                Route::NotFound => {
                    let mut response = http::Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = http::StatusCode::NOT_FOUND;
                    response
                }
            };
            trace.record(
                "server",
                format_args!("conn {id} answers {}", response.status()),
            );
            Ok::<_, Infallible>(response)
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|error| error.to_string())
}
