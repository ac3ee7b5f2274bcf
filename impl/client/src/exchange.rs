//! One task's HTTP exchange: take or open a connection, send the request, report the head,
//! read the body as the engine allows, then pool or close the connection as it says.
//!
//! An exchange owns its connection, so whatever way it ends, dropping it closes the socket
//! unless the engine pooled it (R5). It stops at once when its [`Control`] says so: every
//! await races the control.
//!
//! A delegated data or upload task reports its body no faster than its delegate's window has
//! room (R6): it asks the engine for room before each frame, reports what fits, keeps the rest
//! of the frame, and does not poll hyper for more while the delegate is a window behind, so
//! hyper reads the socket no further than its own buffer.
//!
//! A data task whose delegate answered `BecomeStream` reads its body on through the stream's
//! window (R6): it asks the engine how much room there is before each chunk, never polls hyper
//! for a new frame while it holds part of the last one, and keeps its connection, never
//! pooled, until the stream is over.

use std::error::Error as _;
use std::future::{Future, poll_fn};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::cache::{self, Lookup};
use crate::pool::{Body, Connection, Note, Origin};
use crate::redirect::{Chain, DRAIN_LIMIT, Replay};
use crate::session::Shared;
use crate::{Error, Intake, Proceed, Redirect, Release, Start, TaskId, Timeout};

/// What the driver tells a running exchange. Kept as state, not messages: the exchange always
/// acts on the latest word.
#[derive(Debug, Clone, Default)]
pub(crate) struct Control {
    pub paused: bool,
    /// The delegate allowed the body: read it, into this file for a download.
    pub body: Option<Option<PathBuf>>,
    /// The delegate made the response a stream: read the body through its window (R6).
    pub stream: bool,
    /// The task is over (cancelled, timed out, invalidated): stop and drop everything.
    pub aborted: bool,
}

/// What a handler-routed exchange brings back to its handler.
#[derive(Debug)]
pub(crate) struct Collected {
    pub head: Option<http::response::Parts>,
    pub body: Bytes,
    pub file: Option<PathBuf>,
}

pub(crate) struct Exchange {
    pub shared: Arc<Shared>,
    pub task: TaskId,
    pub start: Start,
    pub origin: Origin,
    pub request: http::Request<Body>,
    pub control: watch::Receiver<Control>,
    pub caller: Caller,
}

/// Whom an exchange runs for: what bounds it in time, and where its body goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Caller {
    /// A delegate task, started by the driver: the engine's timers bound it (the driver keeps
    /// them), and the body goes to the delegate, or to a download's file.
    Delegate,
    /// A convenience, whose future awaits the exchange: its own `clock` bounds it, and the body
    /// goes to a download's file or, for a data or upload task, is collected for the caller up
    /// to `collect` bytes (`max_body_size`; a larger body fails the task).
    Handler {
        clock: Clock,
        collect: Option<usize>,
    },
}

impl Caller {
    /// The most body bytes collected for the caller; `None`: none are.
    fn collect(self) -> Option<usize> {
        match self {
            Caller::Delegate => None,
            Caller::Handler { collect, .. } => collect,
        }
    }
}

/// A handler-routed task's clock: its timeouts count from the handler's first poll, through a
/// wait for a connection slot and the exchange alike (R12), as a delegate task's count from
/// its resume.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    idle: Duration,
    start: Instant,
    until: Instant,
}

impl Clock {
    /// Start now: `idle` is the request timeout, `whole` the resource timeout.
    pub fn start(idle: Duration, whole: Duration) -> Clock {
        let start = Instant::now();
        Clock {
            idle,
            start,
            until: start + whole,
        }
    }

    /// Which timeout runs out first while nothing moves (R12): a wait for a connection slot.
    pub async fn run_out(&self) -> Timeout {
        self.run_out_after(&Activity::since(self.start)).await
    }

    /// Which timeout runs out first for an exchange whose network moves as `activity` says.
    async fn run_out_after(&self, activity: &Activity) -> Timeout {
        watchdog(activity, self.idle, self.until).await
    }
}

/// When the exchange last saw the network move, for the request timeout (idle time between
/// bytes). An atomic, so that the exchange's future stays `Send`.
#[derive(Debug)]
struct Activity {
    start: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self::since(Instant::now())
    }

    /// Last seen moving at `start`.
    fn since(start: Instant) -> Self {
        Self {
            start,
            nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        self.nanos.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// Which of a handler's timeouts runs out first (R12).
async fn watchdog(activity: &Activity, idle: Duration, until: Instant) -> Timeout {
    loop {
        tokio::time::sleep_until((activity.last() + idle).min(until)).await;
        let now = Instant::now();
        if now >= until {
            return Timeout::Resource;
        }
        if now >= activity.last() + idle {
            return Timeout::Request;
        }
    }
}

/// Run `work` unless `control` says stop first (or its sender is gone: the task is forgotten);
/// `None` then. Stream and websocket IO race every await with it, as exchanges do.
pub(crate) async fn unless_aborted<F: Future>(
    control: &watch::Receiver<Control>,
    work: F,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    // Most work is done at its first poll: then no waiter is registered with the control.
    // The control is looked at first all the same, as the select below does.
    if stopped(control, |c| c.aborted) {
        return None;
    }
    if let Poll::Ready(out) = poll_once(work.as_mut()).await {
        return Some(out);
    }
    let mut control = control.clone();
    tokio::select! {
        biased;
        _ = control.wait_for(|c| c.aborted) => None,
        out = work => Some(out),
    }
}

/// Whether `control` says stop (`stop` of its value) or its sender is gone, as `wait_for`
/// would find at once; no waiter is registered.
fn stopped(control: &watch::Receiver<Control>, stop: impl FnOnce(&Control) -> bool) -> bool {
    control.has_changed().is_err() || stop(&control.borrow())
}

/// Poll `work` once: its output, or `Pending` (its waker registered as any poll does).
async fn poll_once<F: Future>(mut work: Pin<&mut F>) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await
}

/// Wait until `control` lets the IO go on (R7); false once it says stop.
pub(crate) async fn unpaused(control: &mut watch::Receiver<Control>) -> bool {
    matches!(control.wait_for(|c| !c.paused || c.aborted).await, Ok(c) if !c.aborted)
}

/// What the delegate's answer let the exchange do.
enum Allowed {
    /// Read the body, into this file for a download.
    Body(Option<PathBuf>),
    /// Read the body through the stream's window.
    Stream,
}

/// Why an exchange stopped short.
enum Stop {
    /// Told to stop (or its driver is gone): the engine has already ended the task.
    Aborted,
    /// It failed: the engine must hear why.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Failed(error)
    }
}

impl From<io::Error> for Stop {
    fn from(error: io::Error) -> Self {
        Stop::Failed(error.into())
    }
}

impl Exchange {
    /// Run to the end. Failures are reported to the engine here; the caller learns the outcome
    /// from the engine.
    pub async fn run(mut self) -> Collected {
        let mut collected = Collected {
            head: None,
            body: Bytes::new(),
            file: None,
        };
        let stop = match self.caller {
            Caller::Delegate => self.exchange(&mut collected, &Activity::new()).await,
            Caller::Handler { clock, .. } => {
                let (core, task) = (self.shared.core.clone(), self.task);
                let activity = Activity::since(clock.start);
                tokio::select! {
                    biased;
                    stop = self.exchange(&mut collected, &activity) => stop,
                    timeout = clock.run_out_after(&activity) => {
                        core.handler_timed_out(task, timeout);
                        Err(Stop::Aborted)
                    }
                }
            }
        };
        // R7: a suspended task reads nothing, so a failure hyper saw meanwhile (a reset while
        // the head was awaited, say) is reported when it is resumed, as the model reads it.
        if let Err(Stop::Failed(error)) = stop
            && self.unpaused().await.is_ok()
        {
            self.shared.core.failed(self.task, error);
        }
        collected
    }

    async fn exchange(&mut self, out: &mut Collected, activity: &Activity) -> Result<(), Stop> {
        let mut request = std::mem::replace(&mut self.request, http::Request::new(empty()));
        let shared = self.shared.clone();
        // The session's cache: a GET with no body (a data or download task's) may be answered
        // from it, or asked for again with the stored response's validators.
        let cache = shared.cache.as_ref();
        // The request as the task made it: what the cache's rules read, and what a first
        // redirect is made from.
        let sent = sent_parts(&request);
        let replay = request.extensions().get::<Replay>().cloned();
        let key = cache::key(request.method(), &self.origin.key(), request.uri());
        let cacheable = cache
            .map(|_| &sent)
            .filter(|sent| cache::applies(sent) && request.body().is_end_stream());
        let mut stale = None;
        // A revalidation's request, its conditional headers added.
        let mut revalidating = None;
        if let (Some(cache), Some(sent)) = (cache, cacheable) {
            match self.or_abort(cache.lookup(&key, sent)).await? {
                Lookup::Fresh(hit) => {
                    // No connection: the one the engine gave goes back unused. A pooled one
                    // never left the pool's idle map; the driver checks it is still there (its
                    // idle clock may have closed it meanwhile) as for any connection parked.
                    shared.core.connection_unused(self.task, self.start.reused);
                    if self.start.reused {
                        shared.pool.note(Note::Parked(self.start.conn));
                    }
                    activity.touch();
                    let answer = Answer {
                        connection: None,
                        reusable: false,
                        body: Source::Cached(Some(hit.body)),
                        keep: None,
                        refused: false,
                    };
                    return self.respond(out, activity, hit.head, answer).await;
                }
                Lookup::Stale {
                    request: revalidation,
                    policy,
                    body,
                } => {
                    *request.headers_mut() = revalidation.headers.clone();
                    revalidating = Some(sent_parts(&request));
                    stale = Some((revalidation, policy, body));
                }
                Lookup::Miss => {}
            }
        }
        let first = revalidating.as_ref().unwrap_or(&sent);
        let mut chain = Chain::new(replay.as_ref(), self.shared.config.max_redirects);
        let (core, task) = (self.shared.core.clone(), self.task);
        let mut hopped = false;
        // Send, and follow redirects, until a response that is the task's own.
        let (connection, parts, mut body, refused) = loop {
            let (connection, response) = self.send(request).await?;
            activity.touch();
            let (parts, mut body) = response.into_parts();
            // R7: a suspended task reports nothing until it is resumed.
            self.unpaused().await?;
            // Until a first hop, `self.origin` is where `first` went.
            let Some(next) = chain.next(&parts, first, &self.origin)? else {
                break (connection, parts, body, false);
            };
            core.redirect(task, head_of(&parts), next);
            let answer = self
                .or_abort(poll_fn(|cx| core.poll_redirect(task, cx)))
                .await?
                .ok_or(Stop::Aborted)?;
            let next = match answer {
                Redirect::Follow(next) => next,
                // The redirect is the response: the delegate hears it as one.
                Redirect::Refuse => break (connection, parts, body, true),
            };
            let (next, origin) = chain.follow(next, &self.shared.config)?;
            let reusable = keeps_alive(&parts) && self.drain(&parts, &mut body, activity).await?;
            drop(body);
            // The redirect's connection goes back to the pool, or is closed; the next
            // exchange's comes from the engine, within its origin's limit.
            self.release(connection, reusable, |core, reusable| {
                core.hop(task, &origin.key(), reusable)
            });
            self.start = self
                .or_abort(poll_fn(|cx| core.poll_start(task, cx)))
                .await?
                .ok_or(Stop::Aborted)?;
            self.origin = origin;
            request = next;
            hopped = true;
            // R7: a task suspended between two hops sends its next request once resumed.
            self.unpaused().await?;
        };
        let reusable = keeps_alive(&parts);
        // The cache speaks for the request as the task made it: a response reached by a
        // redirect, or a redirect refused, is neither kept nor taken as a revalidation.
        let (stale, cacheable) = if hopped || refused {
            (None, None)
        } else {
            (stale, cacheable)
        };
        let revalidated = stale.is_some();
        let keep_key = key.clone();
        if let (Some(cache), Some((revalidation, policy, stored))) = (cache, stale)
            && let Some(hit) = cache.revalidated(&key, &policy, &revalidation, &parts, stored)
        {
            // Still good (a 304): the stored body answers. The 304 has none; its end is read
            // so that the connection may be pooled.
            while let Some(frame) = self.or_abort(body.frame()).await? {
                frame.map_err(|error| Stop::Failed(body_error(&error)))?;
            }
            let answer = Answer {
                connection: Some(connection),
                reusable,
                body: Source::Cached(Some(hit.body)),
                keep: None,
                refused: false,
            };
            return self.respond(out, activity, hit.head, answer).await;
        }
        // An unsafe method's success makes what is stored for its URL stale (RFC 9111, 4.4).
        if let Some(cache) = cache
            && !sent.method.is_safe()
            && (parts.status.is_success() || parts.status.is_redirection())
        {
            let get = cache::key(&http::Method::GET, &self.origin.key(), &sent.uri);
            cache.remove(&get);
        }
        let keep = match (cache, cacheable) {
            (Some(cache), Some(sent)) => {
                let keep = cache.admits(sent, &parts).map(|policy| Keep {
                    key,
                    policy,
                    request: copy_parts(sent),
                    // Sized by the head when it says: no regrowth, no slack kept.
                    copy: Some(BytesMut::with_capacity(
                        content_length(&parts).map_or(0, |len| len as usize),
                    )),
                    limit: cache.max_entry(),
                });
                if keep.is_none() && revalidated {
                    // Stale, and what replaces it may not be stored: it goes.
                    cache.remove(&keep_key);
                }
                keep
            }
            _ => None,
        };
        let answer = Answer {
            connection: Some(connection),
            reusable,
            body: Source::Net(body),
            keep,
            refused,
        };
        self.respond(out, activity, parts, answer).await
    }

    /// Report the head, then the body as the engine allows; keep the response in the cache if
    /// `answer` says so, and pool or close the connection (none: the cache answered).
    async fn respond(
        &mut self,
        out: &mut Collected,
        activity: &Activity,
        parts: http::response::Parts,
        answer: Answer,
    ) -> Result<(), Stop> {
        let Answer {
            connection,
            reusable,
            mut body,
            mut keep,
            refused,
        } = answer;
        // R7: a suspended task reports nothing until it is resumed. A refused redirect's head
        // was reported already, and may be answered while the task is suspended: its file is
        // made when the engine hands it over, as for any allowed body; only reading waits.
        if !refused {
            self.unpaused().await?;
        }
        let length = content_length(&parts);
        // The engine hands the head to the task's delegate, if any; a session without one
        // needs no copy of the headers.
        let head = if self.shared.delegated() {
            head_of(&parts)
        } else {
            status_of(&parts)
        };
        out.head = Some(parts);
        let proceed = if refused {
            Proceed::Wait // ReceiveResponse is queued already
        } else {
            self.shared.core.response(self.task, head)
        };
        let into = match proceed {
            Proceed::Read { into } => into,
            Proceed::Stop => return Err(Stop::Aborted),
            Proceed::Wait => match self.allowed().await? {
                Allowed::Body(into) => into,
                Allowed::Stream => {
                    // The connection goes with the exchange: a stream's is never pooled.
                    let _connection = connection;
                    return self.stream_body(&mut body).await;
                }
            },
        };
        let collect = self.caller.collect();
        if let Some(limit) = collect
            && length.is_some_and(|length| length > limit as u64)
        {
            return Err(Error::BodyTooLarge {
                limit: limit as u64,
            }
            .into());
        }
        let mut file = match &into {
            Some(path) => Some(self.create(path)?),
            None => None,
        };
        let mut kept = BytesMut::new();
        let (core, task) = (self.shared.core.clone(), self.task);
        // What hyper gave beyond the delegate's room, reported first when there is room again.
        let mut rest = Bytes::new();
        loop {
            self.unpaused().await?;
            // R6: while the delegate is a window behind, hyper is not polled, so it reads the
            // socket no further than its own buffer.
            let room = self
                .or_abort(std::future::poll_fn(|cx| core.poll_body_room(task, cx)))
                .await?
                .ok_or(Stop::Aborted)?;
            if rest.is_empty() {
                let Some(frame) = self.unless_paused(body.next()).await? else {
                    continue; // R7: suspended mid-read; the frame waits in hyper's channel
                };
                match frame {
                    Some(Ok(frame)) => {
                        activity.touch();
                        let Some(data) = frame else {
                            continue; // trailers
                        };
                        if let Some(keep) = &mut keep {
                            keep.add(&data);
                        }
                        if let Some(file) = &mut file {
                            file.write_all(&data).await?;
                        }
                        if let Some(limit) = collect {
                            if kept.len() + data.len() > limit {
                                return Err(Error::BodyTooLarge {
                                    limit: limit as u64,
                                }
                                .into());
                            }
                            kept.extend_from_slice(&data);
                        }
                        rest = data;
                    }
                    Some(Err(error)) => return Err(body_error(&error).into()),
                    None => break,
                }
            }
            let data = rest.split_to(room.min(rest.len()));
            core.body_data(task, data);
        }
        if let Some(mut file) = file {
            file.flush().await?;
        }
        // Kept before the task completes: its did_complete finds it cached.
        if let (Some(keep), Some(cache), Some(head)) =
            (keep, self.shared.cache.as_ref(), out.head.as_ref())
            && let Some(copy) = keep.copy
        {
            // The entry holds its length, not the capacity a growing copy reached.
            let copy = if copy.capacity() > copy.len() {
                Bytes::copy_from_slice(&copy)
            } else {
                copy.freeze()
            };
            cache.insert(keep.key, keep.policy, &keep.request, head, copy);
        }
        out.body = kept.freeze();
        out.file = into;
        drop(body);
        match connection {
            Some(connection) => self.finish(connection, reusable),
            // Nothing to pool or close (see Core::connection_unused).
            None => drop(self.shared.core.body_end(self.task, false)),
        }
        Ok(())
    }

    /// Read a followed redirect's body to its end, so that its connection can be pooled: true
    /// if it ended within [`DRAIN_LIMIT`] bytes; false for a longer one, or a failure (the
    /// connection is closed then, and the redirect followed all the same).
    async fn drain(
        &mut self,
        parts: &http::response::Parts,
        body: &mut Incoming,
        activity: &Activity,
    ) -> Result<bool, Stop> {
        if content_length(parts).is_some_and(|length| length > DRAIN_LIMIT as u64) {
            return Ok(false);
        }
        let mut read = 0;
        loop {
            self.unpaused().await?;
            let Some(frame) = self.unless_paused(body.frame()).await? else {
                continue; // R7: suspended mid-read
            };
            match frame {
                Some(Ok(frame)) => {
                    activity.touch();
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_LIMIT {
                        return Ok(false);
                    }
                }
                Some(Err(_)) => return Ok(false),
                None => return Ok(true),
            }
        }
    }

    /// The response became a stream (`Action::ReadStream`): hand the body to the engine no
    /// faster than the stream's window has room (R6). What hyper gave beyond the room is kept
    /// and offered first when there is room again, and hyper is not asked for another frame
    /// meanwhile: bytes read from the socket are never lost, and never more than one frame is
    /// held here. Then the connection is held until the engine ends the task (the user reads
    /// to the end, closes, cancels, or drops every handle).
    async fn stream_body(&mut self, body: &mut Source) -> Result<(), Stop> {
        let (core, task) = (self.shared.core.clone(), self.task);
        let mut rest = Bytes::new();
        loop {
            // R7: a suspended stream reads nothing (its intake is pending meanwhile too).
            self.unpaused().await?;
            let intake = self
                .or_abort(std::future::poll_fn(|cx| core.poll_intake(task, cx)))
                .await?;
            let room = match intake {
                Some(Intake::Read(room)) => room,
                // Not a stream's; read and let the engine drop what it cannot hold.
                Some(Intake::Discard) => usize::MAX,
                None => break, // read closed, or the task is over
            };
            if rest.is_empty() {
                let Some(frame) = self.unless_paused(body.next()).await? else {
                    continue; // R7: suspended while waiting; the frame waits in hyper's channel
                };
                match frame {
                    Some(Ok(frame)) => match frame {
                        Some(data) => rest = data,
                        None => continue, // trailers
                    },
                    Some(Err(error)) => return Err(body_error(&error).into()),
                    None => {
                        core.stream_end(task);
                        break;
                    }
                }
            }
            let offer = room.min(rest.len());
            let taken = core.stream_data(task, &rest[..offer]);
            rest.advance(taken.min(offer));
        }
        // Nothing more to read: the connection stays the task's until the engine ends it.
        self.or_abort(std::future::pending::<()>()).await
    }

    /// Get a connection and send the request on it. A pooled connection the server has
    /// closed meanwhile is replaced once by a new one, with the request unsent; or, if the
    /// request went out and the close came with no byte of response, with the request sent
    /// again, when it is idempotent and has no body (RFC 9112, 9.3.1): the server closed the
    /// idle connection as the request reached it.
    async fn send(
        &mut self,
        mut request: http::Request<Body>,
    ) -> Result<(Connection, http::Response<Incoming>), Stop> {
        let pooled = if self.start.reused {
            self.shared.pool.take(self.start.conn)
        } else {
            None
        };
        let mut retried = pooled.is_none();
        let mut again = (pooled.is_some()
            && request.method().is_idempotent()
            && request.body().is_end_stream())
        .then(|| sent_parts(&request));
        let mut connection = match pooled {
            Some(connection) => connection,
            None => self.connect().await?,
        };
        loop {
            if self.or_abort(connection.sender.ready()).await?.is_err() && !retried {
                retried = true;
                connection = self.connect().await?;
                continue;
            }
            match self
                .or_abort(connection.sender.try_send_request(request))
                .await?
            {
                Ok(response) => return Ok((connection, response)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        request = unsent;
                        connection = self.connect().await?;
                    }
                    None if !retried && error.error().is_incomplete_message() => {
                        let Some(parts) = again.take() else {
                            return Err(send_error(error.error()).into());
                        };
                        retried = true;
                        request = http::Request::from_parts(parts, empty());
                        connection = self.connect().await?;
                    }
                    _ => return Err(send_error(error.error()).into()),
                },
            }
        }
    }

    /// Create the download's file, unless the task is aborted, under the lock the driver
    /// removes files under: the engine queues `Abort` before `RemoveTempFile`, so either the
    /// file is created first and the driver's removal finds it, or the abort is seen here and
    /// no file is made. Never a file made after its removal, not even for a moment: a
    /// `did_complete` that waits for the removal finds the directory empty. (The stage's
    /// empty-directory witness caught the file an async create left behind.)
    fn create(&self, path: &std::path::Path) -> Result<tokio::fs::File, Stop> {
        let _files = crate::session::lock(&self.shared.files);
        if self.control.borrow().aborted {
            return Err(Stop::Aborted);
        }
        Ok(tokio::fs::File::from_std(std::fs::File::create(path)?))
    }

    async fn connect(&mut self) -> Result<Connection, Stop> {
        let shared = self.shared.clone();
        let origin = self.origin.clone();
        let id = self.start.conn;
        Ok(self
            .or_abort(async move { shared.pool.connect(id, &origin).await })
            .await??)
    }

    /// The body is read whole: park the connection, then let the engine say whether it stays
    /// (see `leakproof_core::Core::body_end`).
    fn finish(&self, connection: Connection, reusable: bool) {
        let task = self.task;
        self.release(connection, reusable, |core, reusable| {
            core.body_end(task, reusable)
        });
    }

    /// Park the connection, then pool or close it as `ask` (the engine, told whether it is
    /// reusable) says: once the engine has pooled it, a concurrent invalidation may close it at
    /// once, so it must be parked already (see `leakproof_core::Core::body_end`).
    fn release(
        &self,
        connection: Connection,
        reusable: bool,
        ask: impl FnOnce(&crate::Core, bool) -> Release,
    ) {
        let reusable = reusable && !connection.sender.is_closed();
        let id = self.start.conn;
        let needs_clock = self.shared.pool.park(id, connection);
        match ask(&self.shared.core, reusable) {
            Release::Pool if needs_clock => self.shared.pool.note(Note::Parked(id)),
            Release::Pool => {}
            Release::Close => {
                self.shared.pool.close(id);
            }
        }
    }

    async fn unpaused(&mut self) -> Result<(), Stop> {
        if unpaused(&mut self.control).await {
            Ok(())
        } else {
            Err(Stop::Aborted)
        }
    }

    async fn allowed(&mut self) -> Result<Allowed, Stop> {
        match self
            .control
            .wait_for(|c| c.body.is_some() || c.stream || c.aborted)
            .await
        {
            Ok(c) if c.aborted => Err(Stop::Aborted),
            Ok(c) if c.stream => Ok(Allowed::Stream),
            Ok(c) => Ok(Allowed::Body(c.body.clone().flatten())),
            Err(_) => Err(Stop::Aborted),
        }
    }

    /// Run `work` unless the control says pause (`None`) or stop first. `work` must lose
    /// nothing when dropped unfinished, as reading a body frame does not.
    async fn unless_paused<F: Future>(&mut self, work: F) -> Result<Option<F::Output>, Stop> {
        let mut work = std::pin::pin!(work);
        // The fast way when the work is done at its first poll, as in `unless_aborted`.
        if !stopped(&self.control, |c| c.paused || c.aborted)
            && let Poll::Ready(out) = poll_once(work.as_mut()).await
        {
            return Ok(Some(out));
        }
        let mut control = self.control.clone();
        tokio::select! {
            biased;
            stop = control.wait_for(|c| c.paused || c.aborted) => match stop {
                Ok(c) if !c.aborted => Ok(None),
                _ => Err(Stop::Aborted),
            },
            out = work => Ok(Some(out)),
        }
    }

    /// Run `work` unless the control says stop first.
    async fn or_abort<F: Future>(&mut self, work: F) -> Result<F::Output, Stop> {
        unless_aborted(&self.control, work)
            .await
            .ok_or(Stop::Aborted)
    }
}

/// Where a response comes from, and what becomes of it.
struct Answer {
    /// The connection it came on; `None` when the cache answered without one.
    connection: Option<Connection>,
    /// Whether the server keeps the connection alive.
    reusable: bool,
    body: Source,
    /// Keep a copy for the cache.
    keep: Option<Keep>,
    /// A redirect the delegate refused: its `did_receive_response` is queued already.
    refused: bool,
}

/// A response's body: from the network, or from the cache.
enum Source {
    Net(Incoming),
    Cached(Option<Bytes>),
}

impl Source {
    /// The next frame: its data (`None` for trailers); `None` at the end. Loses nothing when
    /// dropped unfinished.
    async fn next(&mut self) -> Option<Result<Option<Bytes>, hyper::Error>> {
        match self {
            Source::Net(body) => Some(body.frame().await?.map(|frame| frame.into_data().ok())),
            Source::Cached(body) => body.take().map(|body| Ok(Some(body))),
        }
    }
}

/// A response being read that the cache may keep, once it is read whole.
struct Keep {
    key: String,
    policy: http_cache_semantics::CachePolicy,
    request: http::request::Parts,
    /// The body so far; `None` once it grew past `limit`.
    copy: Option<BytesMut>,
    limit: u64,
}

impl Keep {
    fn add(&mut self, data: &[u8]) {
        if let Some(copy) = &mut self.copy {
            if (copy.len() + data.len()) as u64 > self.limit {
                self.copy = None; // too large to keep: the bytes go now, not at the end
            } else {
                copy.extend_from_slice(data);
            }
        }
    }
}

/// A request's method, target, version and headers, without its body: what the cache's
/// policy reads.
fn sent_parts<B>(request: &http::Request<B>) -> http::request::Parts {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = request.method().clone();
    parts.uri = request.uri().clone();
    parts.version = request.version();
    parts.headers = request.headers().clone();
    parts
}

/// `http::request::Parts` is not `Clone` (its extensions may not be).
fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = http::Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    sent_parts(&request)
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The head the engine and the delegate see.
pub(crate) fn head_of(parts: &http::response::Parts) -> http::Response<()> {
    let mut head = http::Response::new(());
    *head.status_mut() = parts.status;
    *head.version_mut() = parts.version;
    *head.headers_mut() = parts.headers.clone();
    head
}

/// The head without its headers.
fn status_of(parts: &http::response::Parts) -> http::Response<()> {
    let mut head = http::Response::new(());
    *head.status_mut() = parts.status;
    *head.version_mut() = parts.version;
    head
}

/// The body's length, if the head says it (a chunked body's is not known up front).
fn content_length(parts: &http::response::Parts) -> Option<u64> {
    parts
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn keeps_alive(parts: &http::response::Parts) -> bool {
    let close = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    parts.version == http::Version::HTTP_11 && !close
}

/// An error sending the request or reading the head.
pub(crate) fn send_error(error: &hyper::Error) -> Error {
    if error.is_parse() || error.is_parse_status() {
        Error::MalformedResponse(error.to_string())
    } else if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
        Error::ConnectionReset
    } else {
        io_or_reset(error)
    }
}

/// An error reading the body.
fn body_error(error: &hyper::Error) -> Error {
    if error.is_parse() {
        Error::MalformedResponse(error.to_string())
    } else if error.is_incomplete_message() {
        Error::ConnectionReset
    } else {
        io_or_reset(error)
    }
}

fn io_or_reset(error: &hyper::Error) -> Error {
    let io = error
        .source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    match io {
        Some(
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof,
        ) => Error::ConnectionReset,
        // A chunk-size line that is not hex surfaces as an invalid-data IO error.
        Some(io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput) => {
            Error::MalformedResponse(error.to_string())
        }
        _ => Error::Io(Arc::new(io::Error::other(error.to_string()))),
    }
}
