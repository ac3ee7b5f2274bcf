//! Streams: leakproof's stream and websocket tasks against the same work done directly with
//! tokio and tokio-tungstenite.
//!
//! Everything runs in one process, on one multi-thread tokio runtime (2 workers) shared with
//! the stage (`leakproof_check::stage::Stage`, a loopback server), as in `throughput.rs`:
//!
//! - `stream_read`: an iteration opens a connection to a raw endpoint of the stage
//!   (`RawScript::offer`: 64 MiB, then a FIN) and reads it to the end. leakproof: a direct
//!   `Session::stream_task` with the default configuration (a 64 KiB stream window, a 16 KiB
//!   read buffer), resumed, read with `read(1, 64 KiB, LIMIT)` until `None`, then
//!   `close_write` (both halves closed: the task completes and its socket closes). Baseline: a
//!   `tokio::net::TcpStream` (no Nagle, as leakproof's), read into a 64 KiB buffer until EOF,
//!   then dropped. Each read of either side is bounded by a `tokio::time::timeout`, as
//!   leakproof's `read` bounds its own, so both pay for one timer per read. Both read from the
//!   same listener. Throughput in bytes.
//! - `websocket_echo`: an iteration is [`ROUND_TRIPS`] round trips, one after another, of a
//!   [`MESSAGE`]-byte binary message through the stage's `/ws/echo` (send, then receive the
//!   echo). leakproof: a `Session::websocket_task`; baseline: `tokio_tungstenite::client_async`
//!   over a `TcpStream` (no Nagle, as leakproof's), with tungstenite's default configuration.
//!   Each side opens its websocket once, before the groups, and keeps it to the end. Throughput
//!   in round trips (criterion's "elements").
//!
//! Layout of `main`: build the runtime, the stage, the session and the raw endpoint; open both
//! websockets; warm up (one 64 MiB read each, its bytes checked against the stage's pattern,
//! and a few round trips each, their echoes checked); criterion's groups; then our own
//! summary with the ratios (see [`summary`]), printed and written to
//! `$CARGO_TARGET_DIR/criterion/streams-summary.txt` (`target/criterion/...` when the variable
//! is unset); then the teardown, which checks that nothing leaks: both websockets closed, the
//! session invalidated holding nothing, every socket the stage accepted closed.
//!
//! Nothing here asserts on speed: the figures are reported, never checked. Every measured
//! iteration does check that it read all 64 MiB, or that each echo is the message sent.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) criterion runs each benchmark
//! once; the summary is then skipped, and only the warm-up and the teardown's checks run.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput};
use futures_util::{SinkExt, StreamExt};
use leakproof::{Configuration, Message, Session, WebSocketTask};
use leakproof_check::stage::{RawScript, Stage, WsMessage, body};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;

/// The bytes the raw endpoint offers per connection.
const STREAM_LEN: u64 = 64 << 20;
/// The most a read takes at once: leakproof's `read` `max`, the baseline's buffer.
const READ_MAX: usize = 64 * 1024;
/// Round trips per `websocket_echo` iteration.
const ROUND_TRIPS: usize = 1000;
/// The size of each websocket message.
const MESSAGE: usize = 32;
/// The bound on every wait for the network: a hang fails the bench instead of stalling it.
const LIMIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// The two sides of each group, in the order they are benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Leakproof,
    Baseline,
}

const SIDES: [Side; 2] = [Side::Leakproof, Side::Baseline];

/// What is read: the session for stream tasks, the raw endpoint's address.
#[derive(Clone, Copy)]
struct Streams<'a> {
    session: &'a Session,
    addr: SocketAddr,
}

impl Streams<'_> {
    fn name(side: Side) -> &'static str {
        match side {
            Side::Leakproof => "leakproof",
            Side::Baseline => "tokio_tcp",
        }
    }

    /// One connection to the raw endpoint, read to its end; with `verify`, every byte is
    /// checked against the stage's pattern. Panics on any failure or a short read.
    async fn read_all(self, side: Side, verify: bool) -> u64 {
        let mut check = verify.then(Pattern::new);
        let mut total = 0u64;
        match side {
            Side::Leakproof => {
                let host = self.addr.ip().to_string();
                let task = self
                    .session
                    .stream_task(&host, self.addr.port())
                    .expect("stream task");
                task.resume();
                while let Some(chunk) = task.read(1, READ_MAX, LIMIT).await.expect("stream read") {
                    if let Some(check) = &mut check {
                        check.feed(total, &chunk);
                    }
                    total += chunk.len() as u64;
                }
                // The end was read; closing the write half too completes the task.
                task.close_write();
            }
            Side::Baseline => {
                let mut socket = timeout(LIMIT, TcpStream::connect(self.addr))
                    .await
                    .expect("connect timed out")
                    .expect("connect");
                socket.set_nodelay(true).expect("TCP_NODELAY");
                let mut buf = vec![0u8; READ_MAX];
                loop {
                    let n = timeout(LIMIT, socket.read(&mut buf))
                        .await
                        .expect("read timed out")
                        .expect("read");
                    if n == 0 {
                        break;
                    }
                    if let Some(check) = &mut check {
                        check.feed(total, &buf[..n]);
                    }
                    total += n as u64;
                }
            }
        }
        assert_eq!(
            total,
            STREAM_LEN,
            "{} read a short stream",
            Self::name(side)
        );
        total
    }
}

/// The stage's body pattern laid out once, long enough to compare a whole read at any offset.
struct Pattern {
    tile: Vec<u8>,
    period: usize,
}

impl Pattern {
    fn new() -> Self {
        // The body is one pattern repeated: its period is the smallest shift that maps it
        // onto itself.
        let probe = body(64);
        let period = (1..probe.len())
            .find(|&p| probe[p..] == probe[..probe.len() - p])
            .expect("the stage's body is periodic");
        Self {
            tile: body(READ_MAX + period),
            period,
        }
    }

    /// Checks `chunk`, found at `offset` in the stream.
    fn feed(&mut self, offset: u64, chunk: &[u8]) {
        assert!(chunk.len() <= READ_MAX, "a read longer than asked");
        let start = (offset % self.period as u64) as usize;
        assert!(
            chunk == &self.tile[start..start + chunk.len()],
            "the bytes at offset {offset} are not the stage's"
        );
    }
}

/// Both websockets, open to `/ws/echo`.
struct Echoes {
    leakproof: WebSocketTask,
    /// Behind a lock only because sending and receiving take `&mut`: it is taken once per
    /// iteration, uncontended.
    tungstenite: Mutex<Ws>,
    message: Bytes,
}

impl Echoes {
    fn name(side: Side) -> &'static str {
        match side {
            Side::Leakproof => "leakproof",
            Side::Baseline => "tokio_tungstenite",
        }
    }

    async fn open(session: &Session, stage: &Stage) -> Echoes {
        let url = stage.ws_url("/ws/echo");
        let leakproof = session
            .websocket_task(url.as_str(), &[])
            .expect("websocket task");
        leakproof.resume();
        let tcp = timeout(LIMIT, TcpStream::connect(stage.addr()))
            .await
            .expect("connect timed out")
            .expect("connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let (ws, response) = timeout(LIMIT, tokio_tungstenite::client_async(url, tcp))
            .await
            .expect("upgrade timed out")
            .expect("upgrade");
        assert_eq!(response.status(), 101);
        Echoes {
            leakproof,
            tungstenite: Mutex::new(ws),
            message: Bytes::from(body(MESSAGE)),
        }
    }

    /// `n` round trips one after another, each echo checked. Panics on any failure.
    async fn round_trips(&self, side: Side, n: usize) {
        match side {
            Side::Leakproof => {
                let ws = &self.leakproof;
                for _ in 0..n {
                    ws.send(Message::Binary(self.message.clone()))
                        .await
                        .expect("leakproof send");
                    match timeout(LIMIT, ws.receive())
                        .await
                        .expect("no echo within the limit")
                        .expect("leakproof receive")
                    {
                        Message::Binary(echo) => assert_eq!(echo, self.message),
                        other => panic!("leakproof received {other:?}, not the echo"),
                    }
                }
            }
            Side::Baseline => {
                let mut ws = self.tungstenite.lock().await;
                for _ in 0..n {
                    ws.send(WsMessage::Binary(self.message.clone()))
                        .await
                        .expect("tungstenite send");
                    loop {
                        match timeout(LIMIT, ws.next())
                            .await
                            .expect("no echo within the limit")
                            .expect("the websocket ended")
                            .expect("tungstenite receive")
                        {
                            WsMessage::Binary(echo) => {
                                assert_eq!(echo, self.message);
                                break;
                            }
                            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                            other => panic!("tungstenite received {other:?}, not the echo"),
                        }
                    }
                }
            }
        }
    }

    /// Both close handshakes: leakproof's is bounded by its close timeout; tungstenite's is
    /// awaited here, bounded by [`LIMIT`].
    async fn close(&self) {
        let _ = self.leakproof.cancel_with(1000, "bench over");
        let mut ws = self.tungstenite.lock().await;
        timeout(LIMIT, async {
            ws.close(None).await.expect("tungstenite close");
            // Until the stage's close frame, then the end.
            while let Some(message) = ws.next().await {
                if message.is_err() {
                    break;
                }
            }
        })
        .await
        .expect("tungstenite's close handshake did not end within the limit");
    }
}

/// Whether criterion measures (`cargo bench`) rather than runs each benchmark once as a test
/// (`cargo test --benches`, `cargo bench -- --test`) or lists them. As criterion decides it.
fn benchmarking() -> bool {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    has("--bench")
        && !has("--test")
        && !has("--list")
        && !std::env::args().any(|a| a.starts_with("--profile-time"))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stage = runtime.block_on(Stage::start()).expect("stage");
    let addr = runtime
        .block_on(stage.listen_raw(RawScript::offer(STREAM_LEN)))
        .expect("raw listener");

    // The default configuration: a 64 KiB stream window, a 16 KiB read buffer.
    let session = {
        let _context = runtime.enter();
        Session::new(Configuration::default(), None)
    };
    let streams = Streams {
        session: &session,
        addr,
    };
    let echoes = runtime.block_on(Echoes::open(&session, &stage));

    // Warm up, and check the bytes once: every measured read checks its length only.
    runtime.block_on(async {
        for side in SIDES {
            streams.read_all(side, true).await;
            echoes.round_trips(side, 100).await;
        }
    });

    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let mut group = criterion.benchmark_group("stream_read");
    group.throughput(Throughput::Bytes(STREAM_LEN));
    // Iterations of tens of milliseconds: the same count in every sample keeps a group within
    // its measurement time (criterion's linear sampling would need 55 of them).
    group.sampling_mode(SamplingMode::Flat);
    for side in SIDES {
        group.bench_function(Streams::name(side), |b| {
            b.to_async(&runtime).iter(|| streams.read_all(side, false));
        });
    }
    group.finish();

    let mut group = criterion.benchmark_group("websocket_echo");
    group.throughput(Throughput::Elements(ROUND_TRIPS as u64));
    group.sampling_mode(SamplingMode::Flat);
    let echoes_ref = &echoes;
    for side in SIDES {
        group.bench_function(Echoes::name(side), |b| {
            b.to_async(&runtime)
                .iter(|| echoes_ref.round_trips(side, ROUND_TRIPS));
        });
    }
    group.finish();

    criterion.final_summary();

    if benchmarking() {
        let report = runtime.block_on(summary(streams, &echoes));
        println!("{report}");
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| PathBuf::from("target"), PathBuf::from)
            .join("criterion");
        let path = dir.join("streams-summary.txt");
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &report)) {
            Ok(()) => println!("(summary written to {})", path.display()),
            Err(error) => eprintln!("could not write {}: {error}", path.display()),
        }
    }

    // Teardown: nothing may outlive the clients.
    runtime.block_on(async {
        echoes.close().await;
        session.finish_tasks_and_invalidate();
        timeout(LIMIT, session.invalidated())
            .await
            .expect("the session was not invalidated within the limit");
        let held = session.resources();
        assert!(
            held.is_zero(),
            "the invalidated session still holds {held:?}"
        );
        // The websocket task's handle outlives its close handshake.
        drop(echoes);
        assert!(
            stage.wait_all_closed(LIMIT).await,
            "{} of the {} sockets the stage accepted are still open after both clients are done",
            stage.open(),
            stage.accepted(),
        );
    });
    println!(
        "teardown: websockets closed, session invalidated holding nothing; all {} sockets \
         closed ({} raw, {} websocket upgrades)",
        stage.accepted(),
        stage.raw_accepted(),
        stage.ws_upgrades(),
    );
    drop(session);
    drop(stage);
}

/// Our own figures, since criterion does not hand its estimates back to the program; the same
/// approach as `throughput.rs`'s summary.
///
/// How they are taken: per group, [`ROUNDS`] rounds; in each round each side does a fixed
/// amount of work (`stream_read`: one 64 MiB read to the end; `websocket_echo`:
/// [`ROUND_TRIPS`] round trips) timed with `Instant` around it, the same shape as criterion's
/// iterations. The two sides alternate within each round and the one that goes first
/// alternates between rounds, so drift and noise fall on both alike. Each side's figure is the
/// median of its per-round rates; the ratio is leakproof's median over the baseline's, and the
/// paired figure beside it is the median of the per-round ratios (the two agree when the run
/// was quiet).
async fn summary(streams: Streams<'_>, echoes: &Echoes) -> String {
    let mut report = format!(
        "\nsummary (median of {ROUNDS} alternating timed rounds, see summary() in benches/streams.rs):"
    );

    let stream = alternate(STREAM_LEN as f64, |side| streams.read_all(side, false)).await;
    let mib = |bytes_per_s: f64| bytes_per_s / f64::from(1u32 << 20);
    let _ = write!(
        report,
        "\nstream_read (64 MiB per round): leakproof {} MiB/s, tokio TcpStream {} MiB/s, \
         ratio leakproof/tokio {:.2} (paired {:.2})",
        thousands(mib(stream.leakproof)),
        thousands(mib(stream.baseline)),
        stream.ratio(),
        stream.paired,
    );

    let echo = alternate(ROUND_TRIPS as f64, |side| {
        echoes.round_trips(side, ROUND_TRIPS)
    })
    .await;
    let _ = write!(
        report,
        "\nwebsocket_echo ({ROUND_TRIPS} x {MESSAGE} B per round): leakproof {} round trips/s, \
         tokio-tungstenite {} round trips/s, ratio leakproof/tungstenite {:.2} (paired {:.2})",
        thousands(echo.leakproof),
        thousands(echo.baseline),
        echo.ratio(),
        echo.paired,
    );
    report
}

/// Rounds per group in [`summary`].
const ROUNDS: usize = 11;

/// One group's summary: each side's median rate, and the median of the per-round ratios.
struct Figures {
    leakproof: f64,
    baseline: f64,
    paired: f64,
}

impl Figures {
    fn ratio(&self) -> f64 {
        self.leakproof / self.baseline
    }
}

/// [`ROUNDS`] rounds of `work` for each side, alternating; `units` is what one `work` does.
async fn alternate<F, Fut>(units: f64, mut work: F) -> Figures
where
    F: FnMut(Side) -> Fut,
    Fut: Future,
{
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for i in [round % 2, 1 - round % 2] {
            let start = Instant::now();
            work(SIDES[i]).await;
            rates[i].push(units / start.elapsed().as_secs_f64());
        }
    }
    let mut ratios: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(l, b)| l / b).collect();
    Figures {
        leakproof: median(&mut rates[0]),
        baseline: median(&mut rates[1]),
        paired: median(&mut ratios),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// `14213.7` as `14 214`: whole numbers, thousands apart.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}
