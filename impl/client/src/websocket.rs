//! Websocket tasks: an HTTP/1.1 upgrade on a connection of the task's own, then
//! `tokio-tungstenite` over hyper's upgraded socket.
//!
//! Every direction is bounded: the engine holds at most one received message (the IO reads the
//! next only once the user took it), tungstenite's messages and frames are at most
//! `max_message_size`, and what the user sends waits in the engine's write buffer, then in
//! tungstenite's, whose hard cap is `write_buffer` plus one message (tungstenite's own default
//! is unbounded).
//!
//! The close is always bounded (R11). Ours (`cancel_with`, or the handle dropped: 1001 going
//! away) sends the close frame, then reads and drops messages until the peer's close frame;
//! the engine arms the close timeout, and when it fires the task completes with
//! `TimedOut(Close)` and the driver's abort closes the socket, whatever the peer does. The
//! peer's close is answered (tungstenite queues the answer), the answer is flushed for at most
//! the close timeout, then the task completes and the socket is closed.
//!
//! The peer's close frame is reported as it was on the wire. A frame with a code no close frame
//! may carry (below 1000, 1004-1006, 1014-2999, above 4999: RFC 6455, 7.4) is the peer
//! breaking the protocol: the task fails with [`Error::WebSocketProtocol`] naming the code, and
//! the delegate hears no `did_close` (its code would be one the peer never sent). tungstenite
//! answers such a first close frame with 1002, and that answer goes out as any other; but it
//! also hands us its 1002 in place of the peer's code, so a [`Watched`] socket under tungstenite
//! keeps the peer's first close frame as it came. A close frame tungstenite cannot read (a
//! 1-byte payload, a reason that is not UTF-8) fails the websocket at once, unanswered. A close
//! frame without a payload is a close without a code: `did_close(1005, "")` (RFC 6455, 7.1.5).

use std::fmt;
use std::future::poll_fn;
use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use http::header::{self, HeaderValue};
use http::uri::Scheme;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{
    CloseCode, Control as OpControl, OpCode,
};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use crate::config::Configuration;
use crate::exchange::{Control, send_error, unless_aborted, unpaused};
use crate::pool::{Body, Connection, Origin};
use crate::session::Shared;
use crate::task::Task;
use crate::{ConnId, Core, Error, Intake, Message, Outgoing, TaskHandle, TaskId, TaskState};

/// The most a websocket frame's header takes (2 bytes, an 8-byte length, a 4-byte mask): what
/// tungstenite's write buffer needs beyond one message.
const MAX_FRAME_HEADER: usize = 14;

/// The most a close frame's reason may take (125 bytes of payload, less the code).
const MAX_CLOSE_REASON: usize = 123;

/// What [`Session::websocket_task`](crate::Session::websocket_task) takes: a URL (`ws://` or
/// `http://`; `wss://` or `https://` for TLS), or an
/// `http::Request<()>` (a `GET`) to send headers of your own with the upgrade.
pub trait IntoWebSocketRequest {
    /// The request the upgrade is made of, its URI as given.
    fn into_websocket_request(self) -> Result<http::Request<()>, Error>;
}

impl IntoWebSocketRequest for http::Request<()> {
    fn into_websocket_request(self) -> Result<http::Request<()>, Error> {
        Ok(self)
    }
}

impl IntoWebSocketRequest for http::Uri {
    fn into_websocket_request(self) -> Result<http::Request<()>, Error> {
        let mut request = http::Request::new(());
        *request.uri_mut() = self;
        Ok(request)
    }
}

impl IntoWebSocketRequest for &str {
    fn into_websocket_request(self) -> Result<http::Request<()>, Error> {
        let uri: http::Uri = self.parse().map_err(|_| Error::InvalidUrl {
            url: self.to_owned(),
            reason: "not a URL".into(),
        })?;
        uri.into_websocket_request()
    }
}

impl IntoWebSocketRequest for String {
    fn into_websocket_request(self) -> Result<http::Request<()>, Error> {
        self.as_str().into_websocket_request()
    }
}

impl IntoWebSocketRequest for &String {
    fn into_websocket_request(self) -> Result<http::Request<()>, Error> {
        self.as_str().into_websocket_request()
    }
}

/// Make `request` a websocket upgrade (RFC 6455, 4.1): an `http` URL, `Connection: Upgrade`,
/// `Upgrade: websocket`, version 13, a fresh random key (returned, to check the server's
/// accept), and the subprotocols offered, if any.
pub(crate) fn upgrade_request(
    mut request: http::Request<()>,
    protocols: &[&str],
) -> Result<(http::Request<()>, String), Error> {
    if request.method() != http::Method::GET {
        return Err(Error::WebSocketProtocol(format!(
            "a websocket upgrade is a GET, not a {}",
            request.method()
        )));
    }
    let uri = request.uri().clone();
    let invalid = |reason: &str| Error::InvalidUrl {
        url: uri.to_string(),
        reason: reason.into(),
    };
    let scheme = match uri.scheme_str() {
        Some("ws") => Some(Scheme::HTTP),
        Some("wss") => Some(Scheme::HTTPS),
        // The session's checks say what is wrong with the others.
        Some("http" | "https") | None => None,
        Some(_) => return Err(invalid("the scheme must be ws, wss, http or https")),
    };
    if let Some(scheme) = scheme {
        let mut parts = uri.clone().into_parts();
        parts.scheme = Some(scheme);
        *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| invalid("bad URL"))?;
    }
    for protocol in protocols {
        let token = !protocol.is_empty()
            && protocol
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            return Err(Error::WebSocketProtocol(format!(
                "{protocol:?} is not a valid subprotocol name (an HTTP token)"
            )));
        }
    }
    let key = generate_key();
    let headers = request.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    let value = HeaderValue::from_str(&key).expect("base64 is a valid header value");
    headers.insert(header::SEC_WEBSOCKET_KEY, value);
    if !protocols.is_empty() {
        let value =
            HeaderValue::from_str(&protocols.join(", ")).expect("tokens make a valid header value");
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    Ok((request, key))
}

// ---- the user's side ----

/// A websocket task: send and receive messages, ping, close with a code.
///
/// It starts suspended; [`resume`](Self::resume) connects and sends the upgrade. Messages sent
/// before it opens wait for it. [`cancel_with`](Self::cancel_with) closes it with a code and a
/// reason, bounded by the close timeout (R11); [`cancel`](Self::cancel) closes the socket at
/// once. Dropping the handle of an open websocket closes it with 1001 (going away), also
/// bounded; of one not yet open, cancels it.
///
/// Like tokio-tungstenite's `WebSocketStream`, it is a [`Stream`] of the messages received and
/// a [`Sink`] of the messages to send (`StreamExt::split` makes two halves of it):
/// - the stream yields `Ok(message)`s and ends (`None`) once the websocket is closing (our
///   close or the peer's) or over; a websocket that failed or was cancelled yields its error
///   once, then ends;
/// - [`Sink::poll_ready`] waits for room in the write buffer for one message, `start_send`
///   refuses a message larger than `max_message_size` (as [`send`](Self::send) does), and
///   [`Sink::poll_flush`] waits until the IO has written every message queued;
/// - [`Sink::poll_close`] flushes what it can, begins the close handshake with
///   [`CloseCode::NORMAL`](crate::CloseCode::NORMAL) (1000) and an empty reason (for another
///   code, call [`cancel_with`](Self::cancel_with) first: the handshake under way is kept), and
///   resolves once the task is completed, with its [`result`](Self::result): `Ok` when the peer
///   answered, [`Error::TimedOut`]`(Close)` after the close timeout (R11). A websocket not
///   open yet is cancelled: `Err(Cancelled)`.
pub struct WebSocketTask {
    task: Task,
    /// The message stream ended (`None`, or an error, was yielded).
    received_done: bool,
    /// The sink's message, taken by `start_send` and queued by the next poll.
    outgoing: Option<Message>,
    /// The sink's close began our close handshake.
    closing: bool,
}

impl fmt::Debug for WebSocketTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WebSocketTask").field(&self.task).finish()
    }
}

crate::task::session_task!(WebSocketTask, task);

impl WebSocketTask {
    pub(crate) fn new(task: Task) -> Self {
        Self {
            task,
            received_done: false,
            outgoing: None,
            closing: false,
        }
    }

    fn handle(&self) -> &TaskHandle {
        self.task.handle()
    }

    /// A message `send` refuses: one larger than `max_message_size`.
    fn too_large(&self, message: &Message) -> Result<(), Error> {
        let max = self.task.shared().config.max_message_size;
        if message.len() > max {
            return Err(Error::WebSocketProtocol(format!(
                "a {}-byte message is larger than max_message_size ({max} bytes)",
                message.len()
            )));
        }
        Ok(())
    }

    /// Queue the sink's message, if it holds one, once the write buffer has room.
    fn poll_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.outgoing.is_none() {
            return Poll::Ready(Ok(()));
        }
        let result = ready!(self.task.handle().poll_send(cx, &mut self.outgoing));
        // A message the websocket can no longer take goes: the error says why.
        self.outgoing = None;
        Poll::Ready(result)
    }

    /// The task's id in its session.
    pub fn id(&self) -> TaskId {
        self.handle().id()
    }

    /// `Canceling` while our close awaits the peer's (at most the close timeout).
    pub fn state(&self) -> TaskState {
        self.handle().state()
    }

    /// Run the task: the first resume connects and sends the upgrade. Resumes do not nest.
    pub fn resume(&self) {
        self.handle().resume();
    }

    /// Stop reading and sending until resumed (R7); the upgrade's timers stop too.
    pub fn suspend(&self) {
        self.handle().suspend();
    }

    /// Cancel at once, without a close handshake: `did_complete(Cancelled)`, the socket closed.
    pub fn cancel(&self) {
        self.handle().cancel();
    }

    /// The task's result once it is `Completed` (the close handshake done, timed out, or the
    /// websocket failed or was cancelled): the one the delegate's `did_complete` gets.
    /// Awaiting it keeps nothing alive; it may be awaited after completion, and from several
    /// places at once.
    pub async fn result(&self) -> Result<(), Error> {
        poll_fn(|cx| self.handle().poll_result(cx)).await
    }

    /// Send `message` once the write buffer has room (before the websocket opens, it waits
    /// for it). A message larger than the configuration's `max_message_size` is refused with
    /// [`Error::WebSocketProtocol`], and the websocket goes on. Fails once the close began or
    /// the websocket is over.
    pub async fn send(&self, message: Message) -> Result<(), Error> {
        self.too_large(&message)?;
        let mut message = Some(message);
        poll_fn(|cx| self.handle().poll_send(cx, &mut message)).await
    }

    /// The next message, waiting for one. Fails once the close began (ours or the peer's), or
    /// the websocket is over: with its error if it failed, else [`Error::Closed`].
    pub async fn receive(&self) -> Result<Message, Error> {
        poll_fn(|cx| self.handle().poll_receive(cx)).await
    }

    /// The next message if one is there now; `Ok(None)` if not. Fails as
    /// [`receive`](Self::receive) does. Do not call it while a `receive` of the same websocket
    /// is pending elsewhere: that `receive` would not be woken by the next message.
    pub fn try_receive(&self) -> Result<Option<Message>, Error> {
        self.handle().try_receive()
    }

    /// Send a ping and wait for its pong. Fails, and never hangs, once the websocket ends
    /// before the pong comes.
    pub async fn ping(&self) -> Result<(), Error> {
        let id = self.handle().ping()?;
        poll_fn(|cx| self.handle().poll_pong(cx, id)).await
    }

    /// Begin the close handshake with `code` and `reason` (cut to 123 bytes, a close frame's
    /// room): messages still arriving are dropped, and the task completes when the peer's close
    /// frame arrives, or with [`Error::TimedOut`]`(Close)` after the close timeout, then the
    /// socket is closed (R11). A websocket not open yet is cancelled; one already closing or
    /// over is left as it is.
    ///
    /// A code no close frame may carry ([`CloseCode::is_allowed`]: 1005, 1006, below 1000...)
    /// is refused with [`Error::InvalidCloseCode`], and the websocket goes on untouched.
    pub fn cancel_with(
        &self,
        code: impl Into<crate::CloseCode>,
        reason: &str,
    ) -> Result<(), Error> {
        let code = code.into();
        if !code.is_allowed() {
            return Err(Error::InvalidCloseCode(code.get()));
        }
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.handle().cancel_with(code.get(), &reason[..end]);
        Ok(())
    }

    /// The close code: the peer's once its close frame arrived, ours while it is awaited.
    pub fn close_code(&self) -> Option<crate::CloseCode> {
        self.handle().close_frame().map(|(code, _)| code.into())
    }

    /// The close reason, as [`close_code`](Self::close_code).
    pub fn close_reason(&self) -> Option<String> {
        self.handle().close_frame().map(|(_, reason)| reason)
    }
}

/// The messages received, as [`receive`](WebSocketTask::receive) takes them; see
/// [`WebSocketTask`].
impl Stream for WebSocketTask {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.received_done {
            return Poll::Ready(None);
        }
        let item = match ready!(this.handle().poll_receive(cx)) {
            Ok(message) => return Poll::Ready(Some(Ok(message))),
            // Closing, or closed cleanly: the end of the messages.
            Err(Error::Closed(_)) => None,
            Err(error) => Some(Err(error)),
        };
        this.received_done = true;
        Poll::Ready(item)
    }
}

/// The messages to send; see [`WebSocketTask`] for what each step waits for, and for the
/// close.
impl Sink<Message> for WebSocketTask {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().poll_outgoing(cx)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        let this = self.get_mut();
        this.too_large(&message)?;
        // poll_ready was Ready: the slot is empty.
        this.outgoing = Some(message);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_outgoing(cx))?;
        this.handle().poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if !this.closing {
            // What cannot be flushed any more (the websocket is closing or over) is told by
            // the result.
            let _ = ready!(Pin::new(&mut *this).poll_flush(cx));
            if this.handle().state() != TaskState::Canceling {
                let code = crate::CloseCode::NORMAL.get();
                this.handle().cancel_with(code, String::new());
            }
            this.closing = true;
        }
        this.handle().poll_result(cx)
    }
}

// ---- the IO ----

type Socket = WebSocketStream<Watched<TokioIo<Upgraded>>>;

/// What a websocket's IO needs to open it.
pub(crate) struct Upgrade {
    pub shared: Arc<Shared>,
    pub task: TaskId,
    pub conn: ConnId,
    pub origin: Origin,
    pub request: http::Request<Body>,
    pub key: String,
    pub protocols: Vec<String>,
}

/// tungstenite's limits: messages and frames at most `max_message_size`; its write buffer at
/// most `write_buffer` plus one message (each message is flushed before the next is taken, so
/// it never holds more); its read buffer `read_buffer`.
fn ws_config(config: &Configuration) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.read_buffer)
        .write_buffer_size(config.write_buffer)
        .max_write_buffer_size(
            config
                .write_buffer
                .saturating_add(config.max_message_size)
                .saturating_add(MAX_FRAME_HEADER),
        )
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
}

/// Run a websocket's IO: upgrade, then messages both ways until the close handshake is done or
/// the task is over. Stops at once, closing the socket, when the control says abort (cancel,
/// the close timeout, invalidation).
pub(crate) async fn run(upgrade: Upgrade, mut control: watch::Receiver<Control>) {
    let Upgrade {
        shared,
        task,
        conn,
        origin,
        request,
        key,
        protocols,
    } = upgrade;
    let core = shared.core.clone();
    let close_timeout = shared.config.close_timeout;
    let sent = unless_aborted(&control, send(&shared, conn, &origin, request)).await;
    let (connection, mut response) = match sent {
        None => return, // aborted: whatever was connected is dropped, so closed
        Some(Err(error)) => {
            tracing::debug!(?task, %error, "websocket upgrade failed");
            // R7: a suspended task hears of a failure once it is resumed.
            if unpaused(&mut control).await {
                core.failed(task, error);
            }
            return;
        }
        Some(Ok(sent)) => sent,
    };
    // R7: a suspended task reports nothing until it is resumed; meanwhile the answer waits,
    // its connection held, as an exchange's response head does.
    if !unpaused(&mut control).await {
        return;
    }
    let opened = match accepted(&response, &key, &protocols) {
        // Anything but an accepted upgrade: the connection is dropped on the way out, so
        // closed (R5).
        Err(error) => Err(error),
        Ok(protocol) => match unless_aborted(&control, hyper::upgrade::on(&mut response)).await {
            None => return, // aborted: dropped on the way out, so closed
            Some(Ok(upgraded)) => Ok((upgraded, protocol)),
            Some(Err(e)) => Err(Error::WebSocketProtocol(format!("the upgrade failed: {e}"))),
        },
    };
    // hyper's connection future has handed the socket over (or the answer was refused). The
    // rest of the connection is a shell, but it owns the socket's registration: kept to the
    // end of this IO, whose every way out closes the socket with it.
    let (upgraded, protocol) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            tracing::debug!(?task, %error, "websocket upgrade refused");
            drop(connection); // closed before the engine hears (R5)
            core.failed(task, error);
            return;
        }
    };
    let config = ws_config(&shared.config);
    let io = Watched::new(TokioIo::new(upgraded));
    let ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await;
    tracing::debug!(?task, ?protocol, "websocket open");
    core.ws_opened(task, protocol);
    let mut open = Open {
        core: core.clone(),
        task,
        ws,
        sending: Sending::Idle,
        running: Running::Both,
    };
    let Some(outcome) = unless_aborted(&control, poll_fn(|cx| open.poll(cx))).await else {
        tracing::debug!(?task, "websocket aborted");
        return;
    };
    let ended = match outcome {
        Outcome::PeerClosed { code, reason } => {
            // Our answer (tungstenite queued it) goes out if it can within the close timeout;
            // either way the handshake is over for us (R11).
            let flush = poll_fn(|cx| Pin::new(&mut open.ws).poll_flush(cx));
            let flushed = tokio::time::timeout(close_timeout, flush);
            if unless_aborted(&control, flushed).await.is_none() {
                return;
            }
            tracing::debug!(?task, ?code, %reason, "websocket closed by the peer's close frame");
            Some(Ok((code, reason)))
        }
        Outcome::Gone => {
            tracing::debug!(?task, "websocket over");
            None
        }
        Outcome::Failed(error) => {
            tracing::debug!(?task, %error, "websocket failed");
            Some(Err(error))
        }
    };
    // The socket is closed before the engine hears: the did_complete that follows finds it
    // closed (R5), with nothing left for anyone to do.
    drop(open);
    drop(connection);
    match ended {
        Some(Ok((code, reason))) => core.ws_peer_closed(task, code, reason),
        Some(Err(error)) => core.failed(task, error),
        None => {}
    }
}

/// Connect and send the upgrade request; the answer, whatever it is, and the connection it
/// came on (which must outlive the upgrade: see `Pool::connect_for_upgrade`).
async fn send(
    shared: &Shared,
    conn: ConnId,
    origin: &Origin,
    request: http::Request<Body>,
) -> Result<(Connection, http::Response<Incoming>), Error> {
    let mut connection = shared.pool.connect_for_upgrade(conn, origin).await?;
    connection
        .sender
        .ready()
        .await
        .map_err(|e| send_error(&e))?;
    let response = connection
        .sender
        .send_request(request)
        .await
        .map_err(|e| send_error(&e))?;
    Ok((connection, response))
}

/// Check the server's answer to the upgrade (RFC 6455, 4.1): `101`, `Upgrade: websocket`,
/// `Connection: upgrade`, the accept key derived from ours, and a subprotocol we offered if it
/// names one. Anything else is [`Error::NoUpgrade`] (another status) or
/// [`Error::WebSocketProtocol`].
fn accepted<B>(
    response: &http::Response<B>,
    key: &str,
    offered: &[String],
) -> Result<Option<String>, Error> {
    let status = response.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::NoUpgrade {
            status: status.as_u16(),
        });
    }
    let headers = response.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let protocol_error = |why: String| Err(Error::WebSocketProtocol(why));
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return protocol_error(
            "the 101 does not say Upgrade: websocket and Connection: upgrade".into(),
        );
    }
    let expected = derive_accept_key(key.as_bytes());
    let accept = headers.get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
        return protocol_error("the server's Sec-WebSocket-Accept does not match our key".into());
    }
    match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => Ok(None),
        Some(value) => {
            let chosen = value.to_str().unwrap_or_default().trim();
            if offered.iter().any(|p| p == chosen) {
                Ok(Some(chosen.to_owned()))
            } else {
                protocol_error(format!(
                    "the server chose the subprotocol {chosen:?}, which was not offered"
                ))
            }
        }
    }
}

/// How an open websocket's loop ended.
enum Outcome {
    /// The peer's close frame arrived (first, or answering ours), with its code if it had a
    /// payload; the code is as sent, whether or not a close frame may carry it.
    PeerClosed { code: Option<u16>, reason: String },
    /// The task is over: nothing more to read or write.
    Gone,
    /// The socket or the protocol failed.
    Failed(Error),
}

/// Where the item the IO took from the engine stands.
enum Sending {
    /// None taken, nothing to flush.
    Idle,
    /// None taken, but tungstenite queued an answer (a pong) that must go out even if nothing
    /// else is sent. (An item taken and flushed carries it along.)
    Answering,
    /// Taken, waiting for tungstenite to accept it.
    Queued(WsMessage),
    /// Accepted, being flushed; the engine hears `sent` once flushed.
    Flushing,
}

/// The directions of an open websocket still at work; once neither is, its loop ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Running {
    Both,
    /// The engine wants nothing more written (the task is over), but reads go on.
    Reads,
    /// The engine wants nothing more read (the task is over), but writes go on.
    Writes,
}

/// An open websocket's IO: reads as the engine lets it (one message at a time, R6's
/// counterpart for messages; nothing while suspended, R7), writes what the engine hands over,
/// each item flushed before the next is taken.
struct Open {
    core: Core,
    task: TaskId,
    ws: Socket,
    sending: Sending,
    running: Running,
}

impl Open {
    /// Read and write until the close handshake is done, the task is over, or something fails.
    /// Both directions make progress independently: a peer that does not read does not stop
    /// us from reading its close frame.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        if self.running != Running::Writes {
            match self.poll_reads(cx) {
                Poll::Ready(Ok(())) if self.running == Running::Reads => {
                    return Poll::Ready(Outcome::Gone);
                }
                Poll::Ready(Ok(())) => self.running = Running::Writes,
                Poll::Ready(Err(outcome)) => return Poll::Ready(outcome),
                Poll::Pending => {}
            }
        }
        if self.running != Running::Reads {
            match self.poll_writes(cx) {
                Poll::Ready(Ok(())) if self.running == Running::Writes => {
                    return Poll::Ready(Outcome::Gone);
                }
                Poll::Ready(Ok(())) => self.running = Running::Reads,
                Poll::Ready(Err(outcome)) => return Poll::Ready(outcome),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Read messages while the engine asks for them: `Ok` once it wants none ever again (the
    /// task is over), `Err` with how the websocket ended.
    fn poll_reads(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Outcome>> {
        loop {
            let keep = match ready!(self.core.poll_intake(self.task, cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Intake::Read(_)) => true,
                // R11: closing; read on to the peer's close frame, dropping messages.
                Some(Intake::Discard) => false,
            };
            let message = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(message)) => message,
                Some(Err(WsError::Protocol(ProtocolError::InvalidCloseSequence))) => {
                    let error = Error::WebSocketProtocol(
                        "the peer's close frame has a 1 byte payload: a close code takes 2".into(),
                    );
                    return Poll::Ready(Err(Outcome::Failed(error)));
                }
                Some(Err(error)) => return Poll::Ready(Err(Outcome::Failed(ws_error(error)))),
                // The stream ended without a close frame.
                None => return Poll::Ready(Err(Outcome::Failed(Error::ConnectionReset))),
            };
            match message {
                WsMessage::Text(text) if keep => {
                    let text = Message::Text(text.as_str().to_owned());
                    self.core.ws_message(self.task, text);
                }
                WsMessage::Binary(bytes) if keep => {
                    self.core.ws_message(self.task, Message::Binary(bytes));
                }
                WsMessage::Text(_) | WsMessage::Binary(_) => {}
                // tungstenite queued the pong; make sure it goes out.
                WsMessage::Ping(_) => {
                    if let Sending::Idle = self.sending {
                        self.sending = Sending::Answering;
                    }
                }
                WsMessage::Pong(_) => self.core.ws_pong(self.task),
                WsMessage::Close(frame) => {
                    // tungstenite reports a first close frame's invalid code as its own 1002:
                    // the frame as it came says what the peer sent.
                    let (code, reason) = match self.ws.get_ref().peer_close() {
                        Some([high, low, reason @ ..]) => (
                            Some(u16::from_be_bytes([*high, *low])),
                            String::from_utf8_lossy(reason).into_owned(),
                        ),
                        Some(_) => (None, String::new()),
                        None => match frame {
                            Some(frame) => (
                                Some(u16::from(frame.code)),
                                frame.reason.as_str().to_owned(),
                            ),
                            None => (None, String::new()),
                        },
                    };
                    return Poll::Ready(Err(Outcome::PeerClosed { code, reason }));
                }
                WsMessage::Frame(_) => {}
            }
        }
    }

    /// Write what the engine hands over, in order, each flushed before `sent`: `Ok` once the
    /// task is over, `Err` if the socket failed.
    fn poll_writes(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Outcome>> {
        let failed = |error: WsError| Poll::Ready(Err(Outcome::Failed(ws_error(error))));
        loop {
            match std::mem::replace(&mut self.sending, Sending::Idle) {
                sending @ (Sending::Idle | Sending::Answering) => {
                    match self.core.poll_outgoing(self.task, cx) {
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Ready(Some(item)) => match to_ws(item) {
                            Some(message) => self.sending = Sending::Queued(message),
                            None => {
                                self.sending = sending;
                                self.core.sent(self.task);
                            }
                        },
                        Poll::Pending => {
                            if let Sending::Answering = sending {
                                match Pin::new(&mut self.ws).poll_flush(cx) {
                                    Poll::Ready(Ok(())) => {}
                                    Poll::Ready(Err(error)) => return failed(error),
                                    Poll::Pending => self.sending = Sending::Answering,
                                }
                            }
                            return Poll::Pending;
                        }
                    }
                }
                Sending::Queued(message) => {
                    match Pin::new(&mut self.ws).poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return failed(error),
                        Poll::Pending => {
                            self.sending = Sending::Queued(message);
                            return Poll::Pending;
                        }
                    }
                    match Pin::new(&mut self.ws).start_send(message) {
                        Ok(()) => self.sending = Sending::Flushing,
                        // Our close crossed the peer's: the peer's is being answered instead.
                        Err(WsError::Protocol(ProtocolError::SendAfterClosing)) => {
                            self.core.sent(self.task);
                        }
                        Err(error) => return failed(error),
                    }
                }
                Sending::Flushing => match Pin::new(&mut self.ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.core.sent(self.task),
                    Poll::Ready(Err(error)) => return failed(error),
                    Poll::Pending => {
                        self.sending = Sending::Flushing;
                        return Poll::Pending;
                    }
                },
            }
        }
    }
}

/// The frame an outgoing item goes as; `None` for a stream's items, which a websocket never
/// gets.
fn to_ws(item: Outgoing) -> Option<WsMessage> {
    Some(match item {
        Outgoing::Message(Message::Text(text)) => WsMessage::Text(text.into()),
        Outgoing::Message(Message::Binary(bytes)) => WsMessage::Binary(bytes),
        Outgoing::Ping => WsMessage::Ping(Bytes::new()),
        Outgoing::Close { code, reason } => WsMessage::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })),
        Outgoing::Bytes(_) | Outgoing::Shutdown => return None,
    })
}

/// A tungstenite error as the task's error: the connection going away without a close frame is
/// a reset; a broken protocol or a message over the limits is [`Error::WebSocketProtocol`].
fn ws_error(error: WsError) -> Error {
    match error {
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Error::ConnectionReset,
        WsError::Io(error) => match error.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Error::ConnectionReset,
            _ => Error::Io(Arc::new(error)),
        },
        error => Error::WebSocketProtocol(error.to_string()),
    }
}

/// The socket under tungstenite, which keeps the payload of the peer's first close frame as it
/// came: tungstenite hands over a first close frame whose code no close frame may carry with
/// its own 1002 in place of that code. It follows the frames in the bytes read (a frame's
/// header, then its payload) and keeps nothing but the header being read and that one payload
/// (a close frame's is at most 125 bytes; a longer or fragmented one tungstenite refuses).
pub(crate) struct Watched<S> {
    io: S,
    /// The header being read (at most 14 bytes).
    header: Vec<u8>,
    /// Bytes of the current frame's payload still to come.
    payload_left: u64,
    /// Collecting the current frame's payload: a close frame's, with its mask if it has one.
    collecting: Option<(Vec<u8>, Option<[u8; 4]>)>,
    /// The first close frame's payload, once whole.
    close: Option<Vec<u8>>,
    /// The bytes stopped making frames tungstenite can read: it fails the websocket.
    lost: bool,
}

impl<S> Watched<S> {
    fn new(io: S) -> Self {
        Watched {
            io,
            header: Vec::new(),
            payload_left: 0,
            collecting: None,
            close: None,
            lost: false,
        }
    }

    /// The payload of the peer's first close frame, once it was read whole.
    fn peer_close(&self) -> Option<&[u8]> {
        self.close.as_deref()
    }

    /// Follow the frames through `bytes`, read from the peer in order.
    fn follow(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.close.is_none() && !self.lost {
            if self.payload_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                if let Some((payload, _)) = &mut self.collecting {
                    payload.extend_from_slice(&bytes[..n]);
                }
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_read();
                }
                continue;
            }
            let had = self.header.len();
            let n = bytes.len().min(MAX_FRAME_HEADER - had);
            self.header.extend_from_slice(&bytes[..n]);
            let mut cursor = Cursor::new(&self.header[..]);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((header, len))) => {
                    let used = usize::try_from(cursor.position()).unwrap_or(MAX_FRAME_HEADER);
                    bytes = &bytes[used - had..];
                    self.header.clear();
                    let close = header.opcode == OpCode::Control(OpControl::Close)
                        && header.is_final
                        && len <= 125;
                    self.collecting = close.then(|| (Vec::new(), header.mask));
                    self.payload_left = len;
                    if len == 0 {
                        self.frame_read();
                    }
                }
                Ok(None) => bytes = &bytes[n..],
                Err(_) => self.lost = true,
            }
        }
    }

    /// The current frame's payload is read whole.
    fn frame_read(&mut self) {
        if let Some((mut payload, mask)) = self.collecting.take() {
            if let Some(mask) = mask {
                for (byte, mask) in payload.iter_mut().zip(mask.iter().cycle()) {
                    *byte ^= mask;
                }
            }
            self.close = Some(payload);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.follow(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_allowed_are_tungstenites() {
        for code in 0..=u16::MAX {
            assert_eq!(
                leakproof_core::close_code_allowed(code),
                CloseCode::from(code).is_allowed(),
                "{code}"
            );
        }
    }

    /// A server's frame: final, unmasked.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => frame.push(n as u8),
            n => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn the_watch_keeps_the_first_close_frame_as_it_came_however_the_bytes_are_cut() {
        let mut bytes = frame(0x2, &[7; 300]);
        bytes.extend(frame(0x9, b"ping"));
        bytes.extend(frame(0x1, b"text"));
        bytes.extend(frame(0x8, &[0x03, 0xe7, b'w', b'h', b'y']));
        let close_read = bytes.len();
        bytes.extend(frame(0x8, &[0x03, 0xe8]));
        for cut in [1, 2, 3, 7, 64, bytes.len()] {
            let mut watched = Watched::new(());
            let mut read = 0;
            for chunk in bytes.chunks(cut) {
                watched.follow(chunk);
                read += chunk.len();
                if read < close_read {
                    assert_eq!(watched.peer_close(), None, "{cut}");
                }
            }
            assert_eq!(
                watched.peer_close(),
                Some(&[0x03, 0xe7, b'w', b'h', b'y'][..]),
                "{cut}"
            );
        }
        let mut watched = Watched::new(());
        watched.follow(&frame(0x8, &[]));
        assert_eq!(watched.peer_close(), Some(&[][..]));
        // Masked (a server must not mask, and tungstenite refuses it; the watch still reads it).
        let mut watched = Watched::new(());
        watched.follow(&[0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe7 ^ 2]);
        assert_eq!(watched.peer_close(), Some(&[0x03, 0xe7][..]));
    }
}
