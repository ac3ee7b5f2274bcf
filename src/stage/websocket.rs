//! The stage's websocket endpoint: a `/ws/...` request with an upgrade, on the HTTP listener.
//!
//! Each websocket is scripted by its target, like `/bytes/N`:
//!
//! - `/ws/echo`: echoes every text and binary message; pings are answered (tungstenite does);
//!   a close from the client is answered with a close, then the stage closes TCP.
//! - `/ws/close?code=N&reason=TEXT&after=K&wait_ms=MS`: echoes K messages (default 0), then
//!   sends a close frame with that code (default 1000) and reason (percent-encoded, at most 123
//!   bytes, default empty), waits at most MS (default [`CLOSE_TIMEOUT`]) for the client's close,
//!   then closes TCP. The code is sent as asked, even one a peer must not send (1005, say): a
//!   misbehaving peer on purpose.
//! - `/ws/drop?after=K&reset=1`: echoes K messages (default 0), then closes TCP without a close
//!   frame: a FIN, or a reset (`SO_LINGER` 0) with `reset=1`.
//! - `/ws/silent`: upgrades, then never sends a byte: no pong, no close reply, no TCP close. It
//!   keeps reading (and counting) so that the client's writes never block; only the client can
//!   end it.
//! - `/ws/refuse?status=N`: answers the upgrade with a plain `N` (default 403, 200..=599) and a
//!   short body, no upgrade. The connection then serves HTTP on, until the client closes it.
//! - `/ws/send?count=C&size=S`: upgrades, sends C binary messages of S bytes (each [`body`]`(S)`),
//!   then echoes like `/ws/echo`.
//! - `/ws/hold/KEY`: upgrades, then parks until the test takes it with [`Stage::held_ws`] and
//!   drives it through [`HeldWs`].
//!
//! A websocket upgrade request to `/hold/KEY` (no `/ws/`) is a plain held request until the
//! test answers the upgrade: [`Held::upgrade`](super::Held::upgrade) writes the `101` and hands
//! back a [`HeldWs`] in manual mode, [`Held::refuse_upgrade`](super::Held::refuse_upgrade)
//! answers a plain status instead. That is for a harness that plays the server op by op, where
//! "the server answers the upgrade" and "the peer answers our close frame" are steps of their
//! own.
//!
//! A request to these without an upgrade (`GET`, `Upgrade: websocket`, `Connection: upgrade`,
//! `Sec-WebSocket-Version: 13`, a key) is answered `400` and not upgraded (`/ws/refuse` aside);
//! an unknown script `404`; an unknown query key or a bad value `400`.
//!
//! Counts: upgrades ([`Stage::ws_upgrades`]), whole text and binary messages received
//! ([`Stage::ws_messages_received`]), close frames received
//! ([`Stage::ws_close_frames_received`]), silent and manual websockets included, each once. A websocket's socket is in
//! [`Stage::accepted`], and in [`Stage::closed`] once: when the client closes TCP (read 0,
//! reset) or when the stage closes it as scripted.
//!
//! Bounds: a message is at most 64 MiB and a frame 16 MiB; a client that breaks the protocol or
//! these limits has its connection closed (a silent one is only left to the client). Nothing
//! grows without bound: the stage's writes wait for the client to read, and a held websocket
//! queues at most [`QUEUED`] messages for the test, then stops reading until the test takes one.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

use super::{
    Answer, BadQuery, Clock, Conn, Counters, GONE, Hangup, Liveness, Reply, Request, Route, Stage,
    Then, Wire, body, carry_out, within,
};

/// How long the stage waits for the client's close after sending its own, and for its close
/// reply to be written; then it closes TCP regardless. In manual mode, how long
/// [`HeldWs::close`] waits for the client to close TCP (and then leaves it open).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The most messages a held websocket queues for [`HeldWs::expect_message`] before it stops
/// reading from the client.
pub const QUEUED: usize = 256;

/// The largest message the stage receives or sends.
const MAX_MESSAGE: usize = 64 << 20;
/// The largest frame the stage receives.
const MAX_FRAME: usize = 16 << 20;
/// The longest reason a close frame carries (125 bytes of payload, less the code).
const MAX_REASON: usize = 123;
/// The largest control frame payload.
const MAX_CONTROL: u64 = 125;
/// Bytes read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

impl Stage {
    /// `ws://127.0.0.1:PORT` followed by `path_and_query` (a leading `/` is added if missing).
    pub fn ws_url(&self, path_and_query: &str) -> String {
        let url = self.url(path_and_query);
        format!("ws{}", url.strip_prefix("http").expect("url() is http://"))
    }

    /// `wss://127.0.0.1:PORT` followed by `path_and_query`, for a stage built with
    /// [`Builder::tls`](super::Builder::tls).
    pub fn wss_url(&self, path_and_query: &str) -> String {
        let url = self.https_url(path_and_query);
        format!(
            "wss{}",
            url.strip_prefix("https").expect("https_url() is https://")
        )
    }

    /// Websocket upgrades answered (`101`) so far.
    pub fn ws_upgrades(&self) -> u64 {
        self.shared.counters.ws_upgrades.load(Relaxed)
    }

    /// Whole text and binary messages received from clients so far (control frames aside).
    pub fn ws_messages_received(&self) -> u64 {
        self.shared.counters.ws_messages_received.load(Relaxed)
    }

    /// Close frames received from clients so far, silent websockets included.
    pub fn ws_close_frames_received(&self) -> u64 {
        self.shared.counters.ws_close_frames_received.load(Relaxed)
    }

    /// Waits for a websocket to `/ws/hold/{key}` and takes it, upgraded; `None` if none comes
    /// within `timeout`. Websockets with the same key are taken in arrival order; the keys are
    /// apart from [`Stage::held`]'s.
    pub async fn held_ws(&self, key: &str, timeout: Duration) -> Option<HeldWs> {
        let clock = self.shared.clock;
        self.shared.parked_ws.take(clock, key, timeout).await
    }
}

/// A websocket to `/ws/hold/KEY`, upgraded and parked until the test drives it; or one the test
/// upgraded itself with [`Held::upgrade`](super::Held::upgrade), in manual mode.
///
/// Each step waits until the connection has carried it out (its frame written), at most
/// [`STEP_TIMEOUT`](super::STEP_TIMEOUT), and fails with `NotConnected` once the connection is
/// gone. Meanwhile the stage reads what the client sends and queues it for
/// [`HeldWs::expect_message`]. By default it answers the client's close frame with a close and
/// then closes TCP; after [`HeldWs::silent`] it answers nothing and leaves the close to the
/// client. The steps that end the connection take the handle; dropping it without one closes
/// TCP (a FIN, no close frame).
///
/// Manual mode: the stage never answers the client's close frame by itself, and never closes
/// TCP by itself (not on the client's close, not when the client breaks the protocol: it reads
/// on until the client closes). The client's close frame is queued and counted
/// ([`HeldWs::closes_received`]), and answering it is the test's step: [`HeldWs::close`]. Every
/// step works in this mode; messages can still be sent after the client's close, until the
/// stage's own close. Pings are still answered.
///
/// How: tungstenite answers a close frame as it reads it (it queues the reply and switches to
/// "closed by peer", after which it refuses to send anything but that reply, and as a server
/// ends the connection once it is flushed). So in manual mode the client's close frames never
/// reach tungstenite: the socket under it takes them out of the byte stream whole (a close
/// frame is at most 131 bytes), and hands the rest on as it comes. tungstenite stays active
/// until the stage sends its own close. Bytes after the client's close frame are dropped
/// (a client must send nothing after it); a close frame tungstenite would refuse (fragmented,
/// over 125 bytes, a 1-byte or non-UTF-8 payload, reserved bits, unmasked) goes through to it,
/// and fails the websocket as before.
#[derive(Debug)]
pub struct HeldWs {
    target: String,
    steps: mpsc::UnboundedSender<(WsStep, Reply)>,
    received: mpsc::Receiver<Message>,
    open: Liveness,
    closes: Arc<AtomicU64>,
    manual: bool,
    clock: Clock,
}

/// The connection's ends of a [`HeldWs`]: the steps it carries out, where it queues what the
/// client sends, where it counts the client's close frames, and its mode.
#[derive(Debug)]
pub(super) struct WsEnds {
    steps: mpsc::UnboundedReceiver<(WsStep, Reply)>,
    queue: mpsc::Sender<Message>,
    closes: Arc<AtomicU64>,
    manual: bool,
}

impl HeldWs {
    /// A handle and the connection's ends of it.
    pub(super) fn pair(
        target: String,
        open: Liveness,
        manual: bool,
        clock: Clock,
    ) -> (HeldWs, WsEnds) {
        let (steps_tx, steps) = mpsc::unbounded_channel();
        let (queue, received) = mpsc::channel(QUEUED);
        let closes = Arc::default();
        let held = HeldWs {
            target,
            steps: steps_tx,
            received,
            open,
            closes: Arc::clone(&closes),
            manual,
            clock,
        };
        let ends = WsEnds {
            steps,
            queue,
            closes,
            manual,
        };
        (held, ends)
    }

    /// The upgrade request's target, path and query.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the websocket is in manual mode: upgraded by [`Held::upgrade`](super::Held::upgrade).
    pub fn is_manual(&self) -> bool {
        self.manual
    }

    /// Close frames received from the client on this connection so far (as soon as the stage
    /// reads them, whether or not [`HeldWs::expect_message`] took them yet).
    pub fn closes_received(&self) -> u64 {
        self.closes.load(Relaxed)
    }

    /// Whether this websocket's TCP connection is still open, now and after this handle is gone.
    pub fn liveness(&self) -> Liveness {
        self.open.clone()
    }

    /// Sends a binary message of `bytes` bytes, [`body`]`(bytes)`.
    pub async fn send_binary(&self, bytes: usize) -> io::Result<()> {
        if bytes > MAX_MESSAGE {
            return Err(invalid("a message larger than the stage's 64 MiB"));
        }
        self.step(WsStep::Binary(bytes)).await
    }

    /// Sends a text message.
    pub async fn send_text(&self, text: &str) -> io::Result<()> {
        if text.len() > MAX_MESSAGE {
            return Err(invalid("a message larger than the stage's 64 MiB"));
        }
        self.step(WsStep::Text(text.to_owned())).await
    }

    /// Sends a ping carrying `payload` (at most 125 bytes); the client's pong comes through
    /// [`HeldWs::expect_message`].
    pub async fn ping(&self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_CONTROL as usize {
            return Err(invalid("a ping's payload longer than 125 bytes"));
        }
        self.step(WsStep::Ping(payload.to_vec())).await
    }

    /// Sends a close frame with `code` and `reason` (at most 123 bytes), and does not wait for
    /// the client's: its close comes through [`HeldWs::expect_message`], after which the stage
    /// closes TCP (unless silenced). `InvalidInput` after the stage's close frame.
    ///
    /// In manual mode this is also how the client's close is answered (its frame is sent
    /// whether the client closed first or not), and the stage never closes TCP: once the frame
    /// is written, it waits at most [`CLOSE_TIMEOUT`] for the client to close TCP, reading (and
    /// queueing) meanwhile. If the client does, this returns once the close is counted
    /// ([`HeldWs::liveness`] shows it); if not, it returns `Ok` all the same with the
    /// connection still open and held: the test may wait on, or end it ([`HeldWs::drop_tcp`],
    /// [`HeldWs::reset`]).
    pub async fn close(&self, code: u16, reason: &str) -> io::Result<()> {
        if reason.len() > MAX_REASON {
            return Err(invalid("a close reason longer than 123 bytes"));
        }
        self.step(WsStep::Close(code, reason.to_owned())).await
    }

    /// Sends a close frame whose payload is `payload`, as it is: a code and a reason, nothing
    /// at all (no code), or what no peer may send (a code reserved or unassigned, 1005 or 1006
    /// on the wire, a single byte, a reason that is not UTF-8): a misbehaving peer on purpose.
    /// Otherwise as [`HeldWs::close`], except that the stage's tungstenite does not know it
    /// closed: it answers the client's close frame as a first one, and messages can still be
    /// sent after it.
    pub async fn close_with_payload(&self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_CONTROL as usize {
            return Err(invalid("a close frame's payload longer than 125 bytes"));
        }
        self.step(WsStep::RawClose(payload.to_vec())).await
    }

    /// From now on the stage answers nothing: no pong, no close reply, and it does not close
    /// TCP when the client's close comes. It keeps reading, so messages still arrive here.
    /// Sending steps fail with `InvalidInput` afterwards.
    pub async fn silent(&self) -> io::Result<()> {
        self.step(WsStep::Silent).await
    }

    /// Closes TCP without a close frame (a FIN); returns once the close is counted.
    pub async fn drop_tcp(self) -> io::Result<()> {
        self.step(WsStep::Drop).await
    }

    /// Resets the TCP connection (`SO_LINGER` 0, then close); returns once it is counted.
    pub async fn reset(self) -> io::Result<()> {
        self.step(WsStep::Reset).await
    }

    /// The next message the client sent, in order, control messages (ping, pong, close)
    /// included; `None` if none comes within `timeout`, or at once when none is left and the
    /// connection has ended.
    pub async fn expect_message(&mut self, timeout: Duration) -> Option<Message> {
        within(self.clock, timeout, self.received.recv())
            .await
            .flatten()
    }

    async fn step(&self, step: WsStep) -> io::Result<()> {
        carry_out(self.clock, &self.steps, step).await
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[derive(Debug)]
enum WsStep {
    Binary(usize),
    Text(String),
    Ping(Vec<u8>),
    Close(u16, String),
    RawClose(Vec<u8>),
    Silent,
    Drop,
    Reset,
}

/// What a `/ws/...` target asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Script {
    Echo,
    Close {
        after: u64,
        code: u16,
        reason: String,
        wait: Duration,
    },
    Drop {
        after: u64,
        reset: bool,
    },
    Silent,
    Refuse {
        status: u16,
    },
    Send {
        count: u64,
        size: usize,
    },
    Hold(String),
}

impl Script {
    /// The route of `/ws/{script}?{query}`.
    pub(super) fn route(script: &str, query: &str) -> Route {
        if let Some(key) = script.strip_prefix("hold/").filter(|key| !key.is_empty()) {
            return Route::WebSocket(Script::Hold(key.to_owned()));
        }
        match Script::parse(script, query) {
            Ok(Some(script)) => Route::WebSocket(script),
            Ok(None) => Route::NotFound,
            Err(bad) => Route::BadQuery(bad),
        }
    }

    /// `None` for an unknown script.
    fn parse(script: &str, query: &str) -> Result<Option<Script>, BadQuery> {
        let mut script = match script {
            "echo" => Script::Echo,
            "close" => Script::Close {
                after: 0,
                code: 1000,
                reason: String::new(),
                wait: CLOSE_TIMEOUT,
            },
            "drop" => Script::Drop {
                after: 0,
                reset: false,
            },
            "silent" => Script::Silent,
            "refuse" => Script::Refuse { status: 403 },
            "send" => Script::Send { count: 0, size: 0 },
            _ => return Ok(None),
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
            match (&mut script, key) {
                (Script::Close { after, .. } | Script::Drop { after, .. }, "after") => {
                    *after = number()?;
                }
                (Script::Close { wait, .. }, "wait_ms") => {
                    *wait = Duration::from_millis(number()?);
                }
                (Script::Close { code, .. }, "code") => {
                    *code = value.parse().map_err(|_| bad("expected 0..=65535"))?;
                }
                (Script::Close { reason, .. }, "reason") => {
                    *reason = percent_decode(value)
                        .filter(|reason| reason.len() <= MAX_REASON)
                        .ok_or_else(|| bad("expected percent-encoded UTF-8, at most 123 bytes"))?;
                }
                (Script::Drop { reset, .. }, "reset") => {
                    *reset = match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad("expected 0 or 1")),
                    };
                }
                (Script::Refuse { status }, "status") => {
                    *status = value
                        .parse()
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| bad("expected 200..=599"))?;
                }
                (Script::Send { count, .. }, "count") => *count = number()?,
                (Script::Send { size, .. }, "size") => {
                    *size = value
                        .parse()
                        .ok()
                        .filter(|&size| size <= MAX_MESSAGE)
                        .ok_or_else(|| bad("expected a size up to 64 MiB"))?;
                }
                _ => return Err(bad("unknown key")),
            }
        }
        Ok(Some(script))
    }
}

/// `%XX` escapes decoded; `None` if one is broken or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// What a request's head says about a websocket upgrade.
#[derive(Debug, Default)]
pub(super) struct Upgrade {
    websocket: bool,
    connection_upgrade: bool,
    version_13: bool,
    key: Option<String>,
    /// The first subprotocol the client offered (`Sec-WebSocket-Protocol`).
    protocol: Option<String>,
}

impl Upgrade {
    /// Takes in one header of the request.
    pub(super) fn header(&mut self, name: &str, value: &str) {
        let has_token = |token: &str| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        };
        if name.eq_ignore_ascii_case("upgrade") {
            self.websocket |= has_token("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            self.connection_upgrade |= has_token("upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            self.version_13 = value == "13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            self.key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") && self.protocol.is_none() {
            self.protocol = value
                .split(',')
                .map(str::trim)
                .find(|protocol| !protocol.is_empty())
                .map(str::to_owned);
        }
    }

    /// The key to answer, if the request is a websocket upgrade; else why it is not one.
    pub(super) fn key(&self, method: &str) -> Result<&str, &'static str> {
        if method != "GET" {
            return Err("a websocket upgrade is a GET");
        }
        if !self.websocket || !self.connection_upgrade {
            return Err(
                "not a websocket upgrade: expected Upgrade: websocket, Connection: upgrade",
            );
        }
        if !self.version_13 {
            return Err("expected Sec-WebSocket-Version: 13");
        }
        self.key
            .as_deref()
            .filter(|key| !key.is_empty())
            .ok_or("expected a Sec-WebSocket-Key")
    }
}

impl Conn {
    /// Plays a `/ws/...` request: refuses it, or upgrades it and plays the script to its end.
    pub(super) async fn websocket(
        &mut self,
        request: &Request,
        script: Script,
    ) -> (Then, Option<Answer>) {
        if let Script::Refuse { status } = script {
            return (
                self.refuse(status, "websocket refused by the script").await,
                None,
            );
        }
        let key = match request.upgrade.key(&request.method) {
            Ok(key) => key,
            Err(why) => return (self.refuse(400, why).await, None),
        };
        if self.accept_upgrade(key, None).await.is_err() {
            return (GONE, None);
        }
        let (hangup, answer) = match script {
            Script::Hold(key) => {
                let liveness = self.liveness.clone();
                let clock = self.shared.clock;
                let (held, ends) = HeldWs::pair(request.target.clone(), liveness, false, clock);
                self.shared.parked_ws.park(key, held);
                let mut session = self.session(Some(Arc::clone(&ends.closes)), false).await;
                session.hold(ends).await
            }
            script => (self.session(None, false).await.play(script).await, None),
        };
        (Then::Break(hangup), answer)
    }

    /// Answers a held request's upgrade ([`Held::upgrade`](super::Held::upgrade)): writes the
    /// `101`, answers the step, then plays the held websocket in the ends' mode until the
    /// connection ends. `None` when the upgrade does not fit: the step is answered
    /// `InvalidInput` and nothing is sent.
    pub(super) async fn upgrade_held(
        &mut self,
        request: &Request,
        head_sent: bool,
        ends: WsEnds,
        reply: Reply,
    ) -> Option<(Then, Option<Answer>)> {
        let key = match request.upgrade.key(&request.method) {
            Ok(_) if head_sent => {
                let _ = reply.send(Err(invalid("upgrade() after the response head")));
                return None;
            }
            Ok(key) => key,
            Err(why) => {
                let _ = reply.send(Err(invalid(why)));
                return None;
            }
        };
        let protocol = request.upgrade.protocol.as_deref();
        if let Err(e) = self.accept_upgrade(key, protocol).await {
            return Some((GONE, Some((reply, Err(e)))));
        }
        let _ = reply.send(Ok(()));
        let mut session = self
            .session(Some(Arc::clone(&ends.closes)), ends.manual)
            .await;
        let (hangup, answer) = session.hold(ends).await;
        Some((Then::Break(hangup), answer))
    }

    /// Writes the `101` for `key`, with `protocol` as the chosen subprotocol if given, and
    /// counts the upgrade.
    async fn accept_upgrade(&mut self, key: &str, protocol: Option<&str>) -> io::Result<()> {
        let mut response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        if let Some(protocol) = protocol {
            response += &format!("sec-websocket-protocol: {protocol}\r\n");
        }
        response += "\r\n";
        self.stream.write_all(response.as_bytes()).await?;
        self.shared.counters.ws_upgrades.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The websocket on this upgraded connection. The frames the client sent right behind its
    /// request (in `ahead`) are read first. `closes` is a held websocket's own count of close
    /// frames; `manual` takes the client's close frames out of tungstenite's way.
    async fn session(&mut self, closes: Option<Arc<AtomicU64>>, manual: bool) -> Session<'_> {
        let io = Io {
            stream: &mut self.stream,
            mute: false,
            inbound: Inbound::new(std::mem::take(&mut self.ahead), manual),
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
        Session {
            ws,
            counters: &self.shared.counters,
            clock: self.shared.clock,
            closes,
        }
    }
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_FRAME))
        // The stage flushes every message it sends, so the buffer holds one message at most.
        .max_write_buffer_size(2 * MAX_MESSAGE)
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// The socket under a websocket. Muted, it swallows every write: tungstenite goes on reading,
/// counting and "answering", and nothing reaches the client. Reads go through [`Inbound`].
struct Io<'a> {
    stream: &'a mut Wire,
    mute: bool,
    inbound: Inbound,
}

/// The client's bytes on their way to tungstenite; in manual mode, less the client's close
/// frames, which are taken out whole (see [`HeldWs`]).
struct Inbound {
    /// Read from the socket and not yet handed on; first, the bytes the client sent right
    /// behind its upgrade request.
    buf: Vec<u8>,
    /// Manual mode: take the client's close frames out.
    withhold: bool,
    /// Manual mode: bytes of the current frame still to hand on as they are; at a frame's
    /// start when 0.
    passing: u64,
    /// Close frames taken out, for the session to take ([`Session::receive`]).
    withheld: VecDeque<Message>,
    /// A close frame was taken out: what follows is dropped, only the end of TCP matters.
    after_close: bool,
    /// The client closed its side (a read of 0).
    eof: bool,
}

impl Inbound {
    fn new(buf: Vec<u8>, withhold: bool) -> Inbound {
        Inbound {
            buf,
            withhold,
            passing: 0,
            withheld: VecDeque::new(),
            after_close: false,
            eof: false,
        }
    }

    /// How many bytes at the front of `buf` go to tungstenite now: 0 when more must be read
    /// first. In manual mode it stops at each frame's header, and takes a close frame out once
    /// it is whole.
    fn handable(&mut self) -> usize {
        loop {
            if self.after_close {
                self.buf.clear();
            }
            if self.buf.is_empty() {
                return 0;
            }
            if !self.withhold {
                return self.buf.len();
            }
            if self.passing > 0 {
                let passing = usize::try_from(self.passing).unwrap_or(usize::MAX);
                return self.buf.len().min(passing);
            }
            let mut cursor = Cursor::new(&self.buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return 0,
                // tungstenite fails the websocket on it: hand everything on.
                Err(_) => {
                    self.passing = u64::MAX;
                    continue;
                }
            };
            let head = cursor.position();
            let total = head.saturating_add(len);
            let closing = header.opcode == OpCode::Control(Control::Close)
                && header.is_final
                && !(header.rsv1 || header.rsv2 || header.rsv3)
                && len <= MAX_CONTROL;
            if !closing {
                self.passing = total;
                continue;
            }
            // At most 14 + 125 bytes.
            let (head, total) = (head as usize, total as usize);
            if self.buf.len() < total {
                return 0;
            }
            match client_close(&header, &self.buf[head..total]) {
                Some(close) => {
                    self.withheld.push_back(close);
                    self.after_close = true;
                }
                // One tungstenite refuses: it fails the websocket.
                None => self.passing = total as u64,
            }
        }
    }
}

/// The close message in a client's close frame; `None` if tungstenite would refuse it
/// (unmasked, a 1-byte payload, a reason that is not UTF-8). The code is the one sent, even one
/// a peer must not send (tungstenite would report 1002 for those).
fn client_close(header: &FrameHeader, masked: &[u8]) -> Option<Message> {
    let mask = header.mask?;
    let payload: Vec<u8> = masked
        .iter()
        .zip(mask.iter().cycle())
        .map(|(byte, mask)| byte ^ mask)
        .collect();
    match payload.as_slice() {
        [] => Some(Message::Close(None)),
        [_] => None,
        [high, low, reason @ ..] => {
            let reason = std::str::from_utf8(reason).ok()?;
            Some(close_message(u16::from_be_bytes([*high, *low]), reason))
        }
    }
}

impl AsyncRead for Io<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Io {
            stream, inbound, ..
        } = self.get_mut();
        loop {
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let n = inbound.handable().min(out.remaining());
            if n > 0 {
                out.put_slice(&inbound.buf[..n]);
                inbound.buf.drain(..n);
                if inbound.withhold {
                    inbound.passing -= n as u64;
                }
                return Poll::Ready(Ok(()));
            }
            if !inbound.withheld.is_empty() {
                // tungstenite sees nothing yet; the session takes the close frame as soon as
                // this read returns ([`Session::receive`]). The wake is only a safeguard.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if inbound.eof {
                return Poll::Ready(Ok(()));
            }
            if !inbound.withhold && inbound.buf.is_empty() {
                return Pin::new(&mut **stream).poll_read(cx, out);
            }
            let mut chunk = [0; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut **stream).poll_read(cx, &mut read))?;
            match read.filled() {
                [] => inbound.eof = true,
                bytes => inbound.buf.extend_from_slice(bytes),
            }
        }
    }
}

impl AsyncWrite for Io<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.mute {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut *this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.mute {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.mute {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *this.stream).poll_shutdown(cx)
    }
}

/// What came from the client.
enum Received {
    /// A whole text or binary message.
    Data(Message),
    /// A ping or a pong.
    Control(Message),
    /// A close frame.
    Close(Message),
    /// The websocket is over: the client closed TCP, broke the protocol, or the close handshake
    /// is done.
    Ended,
}

struct Session<'a> {
    ws: WebSocketStream<Io<'a>>,
    counters: &'a Counters,
    /// What its waits run on.
    clock: Clock,
    /// A held websocket's own count of the client's close frames.
    closes: Option<Arc<AtomicU64>>,
}

/// What a held websocket's loop woke up for.
enum Event {
    Step(Option<(WsStep, Reply)>),
    Client(Option<mpsc::OwnedPermit<Message>>, Received),
}

/// A held websocket between events.
struct Holding {
    /// What the client sends, for [`HeldWs::expect_message`].
    queue: mpsc::Sender<Message>,
    /// Manual mode: no close reply, no TCP close, of the stage's own accord.
    manual: bool,
    /// Silenced: nothing is written.
    silent: bool,
    /// The websocket is over, its TCP connection not (silent or manual): read raw until the
    /// client closes it.
    over: bool,
}

impl Session<'_> {
    async fn receive(&mut self) -> Received {
        // A close frame taken out of the stream (manual mode) comes out when tungstenite waits
        // for more: its read returns pending at once when it takes one out.
        let next = poll_fn(|cx| {
            let withheld =
                |ws: &mut WebSocketStream<Io<'_>>| ws.get_mut().inbound.withheld.pop_front();
            if let Some(close) = withheld(&mut self.ws) {
                return Poll::Ready(Some(Ok(close)));
            }
            match self.ws.poll_next_unpin(cx) {
                Poll::Pending => withheld(&mut self.ws)
                    .map_or(Poll::Pending, |close| Poll::Ready(Some(Ok(close)))),
                ready => ready,
            }
        })
        .await;
        match next {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                self.counters.ws_messages_received.fetch_add(1, Relaxed);
                Received::Data(message)
            }
            Some(Ok(message @ Message::Close(_))) => {
                self.counters.ws_close_frames_received.fetch_add(1, Relaxed);
                if let Some(closes) = &self.closes {
                    closes.fetch_add(1, Relaxed);
                }
                Received::Close(message)
            }
            Some(Ok(message)) => Received::Control(message),
            Some(Err(_)) | None => Received::Ended,
        }
    }

    /// Reads and discards raw bytes once the websocket is over but TCP is not: `Ended` when the
    /// client closes it.
    async fn discard(&mut self) -> Received {
        let mut sink = [0; 4096];
        while let Ok(1..) = self.ws.get_mut().stream.read(&mut sink).await {}
        Received::Ended
    }

    async fn play(&mut self, script: Script) -> Hangup {
        match script {
            Script::Echo => self.echo(None).await.err().unwrap_or(Hangup::Fin),
            Script::Send { count, size } => {
                let message = Bytes::from(body(size));
                for _ in 0..count {
                    if self
                        .ws
                        .send(Message::Binary(message.clone()))
                        .await
                        .is_err()
                    {
                        return Hangup::Fin;
                    }
                }
                self.echo(None).await.err().unwrap_or(Hangup::Fin)
            }
            Script::Close {
                after,
                code,
                reason,
                wait,
            } => match self.echo(Some(after)).await {
                Ok(()) => self.close(code, &reason, wait).await,
                Err(hangup) => hangup,
            },
            Script::Drop { after, reset } => match self.echo(Some(after)).await {
                Ok(()) if reset => Hangup::Reset,
                Ok(()) => Hangup::Fin,
                Err(hangup) => hangup,
            },
            Script::Silent => self.silent().await,
            // Answered before the upgrade.
            Script::Refuse { .. } | Script::Hold(_) => Hangup::Fin,
        }
    }

    /// Echoes text and binary messages until `limit` of them are (`None`: no limit). `Err` with
    /// how to hang up if the websocket ends first.
    async fn echo(&mut self, limit: Option<u64>) -> Result<(), Hangup> {
        let mut echoed = 0;
        while limit.is_none_or(|limit| echoed < limit) {
            match self.receive().await {
                Received::Data(message) => {
                    self.ws.send(message).await.map_err(|_| Hangup::Fin)?;
                    echoed += 1;
                }
                Received::Control(_) => {}
                Received::Close(_) => return Err(self.answer_close().await),
                Received::Ended => return Err(Hangup::Fin),
            }
        }
        Ok(())
    }

    /// After the client's close: writes the close reply tungstenite queued, at most
    /// [`CLOSE_TIMEOUT`]; then the stage closes TCP.
    async fn answer_close(&mut self) -> Hangup {
        let _ = within(self.clock, CLOSE_TIMEOUT, self.ws.flush()).await;
        Hangup::Fin
    }

    /// Sends a close frame, waits at most `wait` for the client's, then the stage closes TCP.
    async fn close(&mut self, code: u16, reason: &str, wait: Duration) -> Hangup {
        if self.ws.send(close_message(code, reason)).await.is_err() {
            return Hangup::Fin;
        }
        let _ = within(self.clock, wait, async {
            while !matches!(self.receive().await, Received::Close(_) | Received::Ended) {}
        })
        .await;
        Hangup::Fin
    }

    /// Answers nothing, reads on, and leaves the close to the client.
    async fn silent(&mut self) -> Hangup {
        self.ws.get_mut().mute = true;
        while !matches!(self.receive().await, Received::Ended) {}
        Hangup::WaitForClient
    }

    /// Carries out a held websocket's steps, queueing what the client sends meanwhile, until
    /// the connection ends.
    async fn hold(&mut self, ends: WsEnds) -> (Hangup, Option<Answer>) {
        let WsEnds {
            mut steps,
            queue,
            manual,
            ..
        } = ends;
        let mut held = Holding {
            queue,
            manual,
            silent: false,
            over: false,
        };
        loop {
            let event = tokio::select! {
                biased;
                step = steps.recv() => Event::Step(step),
                (permit, received) = self.next_from_client(&held) => Event::Client(permit, received),
            };
            match event {
                // The handle was dropped.
                Event::Step(None) => return (Hangup::Fin, None),
                Event::Step(Some((step, reply))) => {
                    if let Some(ending) = self.take_step(step, reply, &mut held).await {
                        return ending;
                    }
                }
                Event::Client(permit, received) => {
                    if let Some(hangup) = self.on_client(permit, received, &mut held).await {
                        return (hangup, None);
                    }
                }
            }
        }
    }

    /// The next thing the client sends, with room for it in the queue: the client meets
    /// backpressure while the queue is full.
    async fn next_from_client(
        &mut self,
        held: &Holding,
    ) -> (Option<mpsc::OwnedPermit<Message>>, Received) {
        if held.over {
            return (None, self.discard().await);
        }
        let permit = held.queue.clone().reserve_owned().await.ok();
        (permit, self.receive().await)
    }

    /// Queues what the client sent for the test; `Some` with how to hang up when the
    /// connection ends.
    async fn on_client(
        &mut self,
        permit: Option<mpsc::OwnedPermit<Message>>,
        received: Received,
        held: &mut Holding,
    ) -> Option<Hangup> {
        match received {
            Received::Data(message) | Received::Control(message) => {
                if let Some(permit) = permit {
                    permit.send(message);
                }
                None
            }
            Received::Close(message) => {
                if let Some(permit) = permit {
                    permit.send(message);
                }
                if held.silent || held.manual {
                    None
                } else {
                    Some(self.answer_close().await)
                }
            }
            Received::Ended if held.over => Some(Hangup::Gone),
            Received::Ended if held.silent || held.manual => {
                held.over = true;
                None
            }
            Received::Ended => Some(Hangup::Fin),
        }
    }

    /// Carries out a held step: `Some` when it ends the connection.
    async fn take_step(
        &mut self,
        step: WsStep,
        reply: Reply,
        held: &mut Holding,
    ) -> Option<(Hangup, Option<Answer>)> {
        let message = match step {
            // A close happens now: answer once it is counted.
            WsStep::Drop => return Some((Hangup::Fin, Some((reply, Ok(()))))),
            WsStep::Reset => return Some((Hangup::Reset, Some((reply, Ok(()))))),
            WsStep::Silent => {
                held.silent = true;
                self.ws.get_mut().mute = true;
                let _ = reply.send(Ok(()));
                return None;
            }
            _ if held.silent => {
                let _ = reply.send(Err(invalid("the held websocket was silenced")));
                return None;
            }
            WsStep::Binary(bytes) => Message::Binary(body(bytes).into()),
            WsStep::Text(text) => Message::text(text),
            WsStep::Ping(payload) => Message::Ping(payload.into()),
            WsStep::Close(code, reason) => close_message(code, &reason),
            WsStep::RawClose(payload) => {
                Message::Frame(Frame::from_payload(FrameHeader::default(), payload.into()))
            }
        };
        let closing = match &message {
            Message::Frame(frame) => frame.header().opcode == OpCode::Control(Control::Close),
            message => message.is_close(),
        };
        match self.ws.send(message).await {
            Ok(()) if closing && held.manual => self.await_tcp_close(reply, held).await,
            Ok(()) => {
                let _ = reply.send(Ok(()));
                None
            }
            Err(WsError::Protocol(ProtocolError::SendAfterClosing)) => {
                let _ = reply.send(Err(invalid("the websocket has sent its close frame")));
                None
            }
            Err(WsError::Io(e)) => Some((Hangup::Fin, Some((reply, Err(e))))),
            Err(e) => Some((Hangup::Fin, Some((reply, Err(io::Error::other(e)))))),
        }
    }

    /// Manual mode, after the stage's close frame: waits at most [`CLOSE_TIMEOUT`] for the
    /// client to close TCP, queueing what it sends meanwhile. If it does, the step is answered
    /// once the close is counted; if not, now, and the websocket stays held, its TCP open.
    async fn await_tcp_close(
        &mut self,
        reply: Reply,
        held: &mut Holding,
    ) -> Option<(Hangup, Option<Answer>)> {
        let closed = within(self.clock, CLOSE_TIMEOUT, async {
            loop {
                let (permit, received) = self.next_from_client(held).await;
                if let Some(hangup) = self.on_client(permit, received, held).await {
                    return hangup;
                }
            }
        })
        .await;
        match closed {
            Some(hangup) => Some((hangup, Some((reply, Ok(()))))),
            None => {
                let _ = reply.send(Ok(()));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_from_the_path_and_query() {
        assert_eq!(
            Script::parse("close", "code=4001&reason=bye%20now&after=2&wait_ms=10"),
            Ok(Some(Script::Close {
                after: 2,
                code: 4001,
                reason: "bye now".to_owned(),
                wait: Duration::from_millis(10),
            }))
        );
        assert_eq!(
            Script::parse("drop", "reset=1"),
            Ok(Some(Script::Drop {
                after: 0,
                reset: true
            }))
        );
        assert_eq!(
            Script::parse("send", "count=3&size=10"),
            Ok(Some(Script::Send { count: 3, size: 10 }))
        );
        assert_eq!(Script::parse("nope", ""), Ok(None));
        assert!(matches!(
            Script::route("hold/k", ""),
            Route::WebSocket(Script::Hold(key)) if key == "k"
        ));
    }

    #[test]
    fn bad_queries_are_refused() {
        for (script, query) in [
            ("echo", "after=1"),
            ("close", "code=70000"),
            ("close", "reason=%zz"),
            ("close", "reason=%ff"),
            ("drop", "reset=yes"),
            ("refuse", "status=101"),
            ("send", "size=99999999999"),
            ("send", "count"),
        ] {
            assert!(Script::parse(script, query).is_err(), "{script}?{query}");
        }
        let long = "a".repeat(MAX_REASON + 1);
        assert!(Script::parse("close", &format!("reason={long}")).is_err());
    }
}
