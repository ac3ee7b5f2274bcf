//! Sessions: where tasks are made, and what they share (engine, pool, driver, delegate).

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::config::Configuration;
use crate::delegate::{Delegate, TaskInfo};
use crate::delivery::{self, Infos};
use crate::driver::Driver;
use crate::exchange::{Caller, Clock, Collected, Control, Exchange};
use crate::pool::{Body, Origin, Pool, Scheme};
use crate::stream::StreamTask;
use crate::task::{DataTask, DownloadTask, Task, UploadTask};
use crate::tls::TlsState;
use crate::websocket::{IntoWebSocketRequest, WebSocketTask};
use crate::{Core, Error, Ledger, Route, SessionKind, SessionState, TaskId, TaskKind};

/// A request body for an upload.
#[derive(Debug, Clone)]
pub enum UploadBody {
    Bytes(Bytes),
    /// Streamed from the file, which must exist when the task is made.
    File(PathBuf),
}

/// A URLSession-style session: it makes tasks, keeps their connections in a pool, and tells
/// its delegate what happens.
///
/// Cheap to clone. Dropping the last clone is `finish_tasks_and_invalidate` (R10): running
/// tasks finish, then everything is released, whether or not anyone remembered to invalidate.
///
/// # Panics
/// [`Session::new`] and [`SessionBuilder::build`] must be called within a tokio runtime: the
/// session's driver and connections run on it.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// The user's side: dropping the last one drops the engine's session handle (R10).
struct Inner {
    handle: crate::SessionHandle,
    shared: Arc<Shared>,
}

/// What the session's parts share. It holds no task or future: exchanges and the driver hold
/// it, so it lives exactly as long as something of the session still runs.
pub(crate) struct Shared {
    pub core: Core,
    pub config: Configuration,
    pub pool: Pool,
    pub runtime: Handle,
    name: String,
    records: Mutex<HashMap<TaskId, Record>>,
    infos: Option<Infos>,
    /// Serializes creating a download's file (an exchange) with removing it (the driver).
    pub files: Mutex<()>,
    /// Every future the session runs (its driver, the tasks' IO, hyper's connections): the
    /// release waits for the last one to end (R4).
    pub tasks: TaskTracker,
    /// The response cache, if the configuration has one; dropped at release (R4).
    pub cache: Option<Cache>,
    /// What the session's clocks hold, for the suite to compare with the engine's ledger.
    #[cfg(feature = "test-util")]
    pub clocks: Clocks,
}

/// The timers the session's clocks really hold: the driver's queue, and the conveniences' own
/// clocks (a request and a resource timeout each, while their future runs). Counted where the
/// timers live, not where the engine decides them, so that the suite can hold the ledger to
/// them.
#[cfg(feature = "test-util")]
#[derive(Debug, Default)]
pub(crate) struct Clocks {
    pub driver: std::sync::atomic::AtomicUsize,
    pub handlers: std::sync::atomic::AtomicUsize,
}

#[cfg(feature = "test-util")]
impl Clocks {
    /// A convenience's clock runs until the returned guard goes.
    fn handler(&self) -> impl Drop + '_ {
        struct Running<'a>(&'a Clocks);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0
                    .handlers
                    .fetch_sub(2, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.handlers
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        Running(self)
    }
}

/// A task's job until its IO starts, and the control its IO listens to.
struct Record {
    job: Option<Job>,
    control: watch::Sender<Control>,
}

/// What a task's IO does once the engine starts it (`Action::Start`).
pub(crate) enum Job {
    /// A data, download or upload task: send the request, read the response.
    Exchange {
        request: http::Request<Body>,
        origin: Origin,
    },
    /// A stream task: a TCP connection of its own, bytes both ways.
    Stream { origin: Origin },
    /// A websocket task: a connection of its own, the upgrade request, then messages.
    WebSocket {
        request: http::Request<Body>,
        origin: Origin,
        /// The `Sec-WebSocket-Key` sent, to check the server's `Sec-WebSocket-Accept`.
        key: String,
        /// The subprotocols offered, to check the server's choice.
        protocols: Vec<String>,
    },
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.inner.shared.name)
            .field("state", &self.state())
            .field("resources", &self.resources())
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("name", &self.name).finish()
    }
}

/// Builds a [`Session`].
#[derive(Default)]
pub struct SessionBuilder {
    config: Configuration,
    delegate: Option<Arc<dyn Delegate>>,
    ignore_invalidation: bool,
    deliver: DeliverOn,
}

/// Where a delegated session's callbacks are delivered from.
#[derive(Default)]
enum DeliverOn {
    /// A thread of the session's own.
    #[default]
    Thread,
    /// A task on the session's runtime, awaiting this after each callback.
    #[cfg(feature = "test-util")]
    Runtime(delivery::Returned),
}

impl fmt::Debug for SessionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("config", &self.config)
            .field("delegate", &self.delegate.is_some())
            .finish()
    }
}

impl SessionBuilder {
    pub fn configuration(mut self, config: Configuration) -> Self {
        self.config = config;
        self
    }

    pub fn delegate(mut self, delegate: Arc<dyn Delegate>) -> Self {
        self.delegate = Some(delegate);
        self
    }

    /// For the suite: a session that behaves as [`Session::shared`] does (R9) without being
    /// the process-wide one, so each test case can have its own. Like the shared session, it
    /// has no delegate: [`build`](Self::build) panics if it is given one.
    #[cfg(feature = "test-util")]
    pub fn ignore_invalidation(mut self) -> Self {
        self.ignore_invalidation = true;
        self
    }

    /// For the suite's simulated world: the delegate's callbacks are delivered from a task on
    /// the session's runtime instead of a thread of the session's own, so that a
    /// current-thread runtime runs all of the session and its paused clock sees when nothing
    /// can make progress. After each callback has returned, `returned()` is awaited before the
    /// engine hears of it: until then the engine counts the delegate as still in the callback,
    /// which is how the world keeps a slow delegate in a callback without blocking the thread.
    #[cfg(feature = "test-util")]
    pub fn deliver_on_runtime<F, Fut>(mut self, returned: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let returned: delivery::Returned = Arc::new(move || Box::pin(returned()));
        self.deliver = DeliverOn::Runtime(returned);
        self
    }

    pub fn build(self) -> Session {
        assert!(
            !(self.ignore_invalidation && self.delegate.is_some()),
            "leakproof: a session that ignores invalidation has no delegate"
        );
        Session::create(
            self.config,
            self.delegate,
            self.ignore_invalidation,
            Handle::current(),
            self.deliver,
        )
    }
}

static SESSIONS: AtomicU64 = AtomicU64::new(0);
static SHARED: OnceLock<Session> = OnceLock::new();

impl Session {
    /// A session with `config`, and `delegate` to hear its callbacks (none: no callbacks).
    pub fn new(config: Configuration, delegate: Option<Arc<dyn Delegate>>) -> Session {
        Session::create(
            config,
            delegate,
            false,
            Handle::current(),
            DeliverOn::Thread,
        )
    }

    pub fn builder() -> SessionBuilder {
        SessionBuilder::default()
    }

    /// The process-wide session: no delegate, the default configuration, and it ignores
    /// invalidation (R9); its idle connections still close after the idle timeout. It runs on a
    /// runtime thread of its own, so it serves any runtime and outlives them.
    ///
    /// # Panics
    /// If the process cannot start a thread or a tokio runtime.
    pub fn shared() -> Session {
        SHARED
            .get_or_init(|| {
                let (runtime_tx, runtime_rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("leakproof-shared".into())
                    .spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("leakproof: cannot start the shared session's runtime");
                        runtime.block_on(async {
                            let _ = runtime_tx.send(Handle::current());
                            std::future::pending::<()>().await;
                        });
                    })
                    .expect("leakproof: cannot start the shared session's thread");
                let runtime = runtime_rx
                    .recv()
                    .expect("leakproof: the shared session's runtime did not start");
                Session::create(
                    Configuration::default(),
                    None,
                    true,
                    runtime,
                    DeliverOn::Thread,
                )
            })
            .clone()
    }

    fn create(
        config: Configuration,
        delegate: Option<Arc<dyn Delegate>>,
        shared: bool,
        runtime: Handle,
        deliver: DeliverOn,
    ) -> Session {
        let name = format!(
            "leakproof-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let kind = match (shared, delegate.is_some()) {
            (true, _) => SessionKind::Shared,
            (false, true) => SessionKind::Delegated,
            (false, false) => SessionKind::Plain,
        };
        let engine_config = crate::Config {
            kind,
            request_timeout: config.request_timeout,
            resource_timeout: config.resource_timeout,
            download_dir: config.download_dir.clone(),
            name: name.clone(),
            max_idle_per_origin: config.max_idle_per_host,
            max_connections_per_origin: config.max_connections_per_host,
            // R6: the window less the transport's buffer (hyper's, or a stream's scratch).
            read_ahead: config.read_ahead(),
            delegate_ahead: config.delegate_ahead(),
            write_buffer: config.write_buffer,
            close_timeout: config.close_timeout,
        };
        let delegated = delegate.is_some();
        let (handle, core, delivery) = crate::session(engine_config, delegate);
        let (notes, notes_rx) = mpsc::unbounded_channel();
        let tasks = TaskTracker::new();
        let infos: Option<Infos> = delegated.then(Default::default);
        // Made within the session's runtime, whose clock the cache's is.
        let cache = {
            let _runtime = runtime.enter();
            config
                .url_cache
                .clone()
                .map(|cache| Cache::new(cache, &name))
        };
        let shared = Arc::new(Shared {
            cache,
            core,
            pool: Pool::new(
                config.read_buffer,
                runtime.clone(),
                tasks.clone(),
                notes,
                TlsState::new(&config),
                config.transport.clone(),
            ),
            config,
            runtime: runtime.clone(),
            name: name.clone(),
            records: Mutex::new(HashMap::new()),
            #[cfg(feature = "test-util")]
            clocks: Clocks::default(),
            infos: infos.clone(),
            files: Mutex::new(()),
            tasks: tasks.clone(),
        });
        tasks.spawn_on(Driver::new(shared.clone(), notes_rx).run(), &runtime);
        match (infos, deliver) {
            (Some(infos), DeliverOn::Thread) => {
                if let Err(error) = delivery::spawn(&name, delivery, infos, Arc::downgrade(&shared))
                {
                    // The delivery (and with it the delegate) is dropped: no callbacks, but
                    // nothing leaks either.
                    tracing::error!(%error, "leakproof: cannot start the delegate's thread");
                }
            }
            #[cfg(feature = "test-util")]
            (Some(infos), DeliverOn::Runtime(returned)) => {
                delivery::spawn_on(&runtime, delivery, infos, Arc::downgrade(&shared), returned);
            }
            (None, _) => drop(delivery),
        }
        Session {
            inner: Arc::new(Inner { handle, shared }),
        }
    }

    // ---- tasks ----

    /// A data task: the body goes to the delegate as `did_receive_data`. Starts suspended.
    pub fn data_task(&self, request: http::Request<()>) -> Result<DataTask, Error> {
        self.task(TaskKind::Data, request.map(|()| empty()))
            .map(DataTask)
    }

    /// A download task: the body goes to a temp file handed to `did_finish_downloading`.
    pub fn download_task(&self, request: http::Request<()>) -> Result<DownloadTask, Error> {
        self.task(TaskKind::Download, request.map(|()| empty()))
            .map(DownloadTask)
    }

    /// An upload task: `body` is sent as the request body.
    pub fn upload_task(
        &self,
        request: http::Request<()>,
        body: UploadBody,
    ) -> Result<UploadTask, Error> {
        let request = with_body(request, body)?;
        self.task(TaskKind::Upload, request).map(UploadTask)
    }

    /// A stream task: a TCP connection of its own to `host:port`, read and written through
    /// bounded buffers (R6: the socket is not read past the stream's window). Starts
    /// suspended; `resume` connects. Its delegate hears `did_complete` only.
    pub fn stream_task(&self, host: &str, port: u16) -> Result<StreamTask, Error> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let invalid = |reason: &str| Error::InvalidUrl {
            url: format!("tcp://{authority}"),
            reason: reason.into(),
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let uri = http::Uri::builder()
            .scheme("tcp")
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            .map_err(|_| invalid("bad host"))?;
        let origin = Origin {
            scheme: Scheme::Tcp,
            host: host.to_owned(),
            port,
        };
        let info = TaskInfo {
            id: TaskId(0),
            kind: TaskKind::Stream,
            method: http::Method::CONNECT,
            uri,
        };
        self.task_with(TaskKind::Stream, Job::Stream { origin }, info)
            .map(StreamTask::new)
    }

    /// A websocket task: `request` (a `ws://` or `http://` URL, or an `http::Request<()>` for
    /// headers of your own) is sent as an upgrade on a connection of its own, offering
    /// `protocols` (none: no `Sec-WebSocket-Protocol`). Starts suspended; `resume` connects.
    /// Its delegate hears `did_open` once the server accepts, `did_close` when the close
    /// handshake is done, then `did_complete`; an upgrade the server refuses completes with
    /// [`Error::NoUpgrade`] and no `did_open`. Its close is bounded by the configuration's
    /// `close_timeout` (R11).
    pub fn websocket_task(
        &self,
        request: impl IntoWebSocketRequest,
        protocols: &[&str],
    ) -> Result<WebSocketTask, Error> {
        let shared = &self.inner.shared;
        let request = request.into_websocket_request()?;
        let uri = request.uri().clone();
        let (request, key) = crate::websocket::upgrade_request(request, protocols)?;
        let (request, origin) = prepare(request.map(|()| empty()), &shared.config)?;
        let info = TaskInfo {
            id: TaskId(0),
            kind: TaskKind::WebSocket,
            method: request.method().clone(),
            uri,
        };
        let job = Job::WebSocket {
            request,
            origin,
            key,
            protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
        };
        self.task_with(TaskKind::WebSocket, job, info)
            .map(WebSocketTask::new)
    }

    fn task(&self, kind: TaskKind, request: http::Request<Body>) -> Result<Task, Error> {
        let shared = &self.inner.shared;
        let (request, origin) = prepare(request, &shared.config)?;
        let info = TaskInfo {
            id: TaskId(0),
            kind,
            method: request.method().clone(),
            uri: request.uri().clone(),
        };
        self.task_with(kind, Job::Exchange { request, origin }, info)
    }

    /// Create a delegate-routed task that will run `job` once started.
    fn task_with(&self, kind: TaskKind, job: Job, info: TaskInfo) -> Result<Task, Error> {
        let shared = &self.inner.shared;
        let origin = match &job {
            Job::Exchange { origin, .. }
            | Job::Stream { origin }
            | Job::WebSocket { origin, .. } => origin.key(),
        };
        // The delegate's view of the task is in place before the engine lets anyone else see
        // the task: a concurrent invalidate_and_cancel may queue its did_complete at once, and
        // the delivery, which looks the task up under this lock, must find it (R1). (Lock
        // order: the infos, then the engine's; nothing takes them the other way round.)
        let mut infos = shared.infos.as_ref().map(|infos| lock(infos));
        // R8: refused here, and whatever was built is dropped.
        let handle = self
            .inner
            .handle
            .create_task(kind, &origin, Route::Delegate)?;
        let id = handle.id();
        if let Some(infos) = &mut infos {
            infos.insert(id, Arc::new(TaskInfo { id, ..info }));
        }
        drop(infos);
        let (control, _) = watch::channel(Control::default());
        lock(&shared.records).insert(
            id,
            Record {
                job: Some(job),
                control,
            },
        );
        Ok(Task::new(handle, shared.clone()))
    }

    // ---- conveniences ----

    /// Fetch `request`'s response and body. Dropping the future cancels the task.
    pub async fn data(&self, request: http::Request<()>) -> Result<http::Response<Bytes>, Error> {
        let collected = self
            .inline(TaskKind::Data, request.map(|()| empty()))
            .await?;
        Ok(http::Response::from_parts(
            collected.head.expect("a completed exchange has a head"),
            collected.body,
        ))
    }

    /// Fetch `request`'s body into a temp file in the download directory. The returned file
    /// is removed when it is dropped unless [`DownloadedFile::persist`]ed. Dropping the future
    /// cancels the task and removes the partial file.
    pub async fn download(
        &self,
        request: http::Request<()>,
    ) -> Result<http::Response<DownloadedFile>, Error> {
        let collected = self
            .inline(TaskKind::Download, request.map(|()| empty()))
            .await?;
        let file = DownloadedFile {
            path: collected.file,
        };
        Ok(http::Response::from_parts(
            collected.head.expect("a completed exchange has a head"),
            file,
        ))
    }

    /// Send `body` with `request`; return the response and its body.
    pub async fn upload(
        &self,
        request: http::Request<()>,
        body: UploadBody,
    ) -> Result<http::Response<Bytes>, Error> {
        let request = with_body(request, body)?;
        let collected = self.inline(TaskKind::Upload, request).await?;
        Ok(http::Response::from_parts(
            collected.head.expect("a completed exchange has a head"),
            collected.body,
        ))
    }

    /// Run a handler-routed task in this future: no callbacks, no driver on the way.
    async fn inline(
        &self,
        kind: TaskKind,
        request: http::Request<Body>,
    ) -> Result<Collected, Error> {
        let shared = &self.inner.shared;
        // The timeouts count from the first poll, a wait for a connection slot included.
        let clock = Clock::start(
            shared.config.request_timeout,
            shared.config.resource_timeout,
        );
        #[cfg(feature = "test-util")]
        let _running = shared.clocks.handler();
        let (request, origin) = prepare(request, &shared.config)?;
        let handle = self
            .inner
            .handle
            .create_task(kind, &origin.key(), Route::Handler)?;
        let id = handle.id();
        let (control, receiver) = watch::channel(Control::default());
        lock(&shared.records).insert(id, Record { job: None, control });
        // Dropped with this future: cancels the task if it is still running, and forgets it.
        let task = CancelOnDrop(Task::new(handle, shared.clone()));
        let start = match task.0.handle().resume_inline() {
            Some(start) => start,
            // Its origin is at its connection limit: wait for a connection to be released,
            // within the task's timeouts.
            None => {
                let started = tokio::select! {
                    biased;
                    start = poll_fn(|cx| shared.core.poll_start(id, cx)) => start,
                    timeout = clock.run_out() => {
                        shared.core.handler_timed_out(id, timeout);
                        None
                    }
                };
                match started {
                    Some(start) => start,
                    None => {
                        return Err(match shared.core.take_outcome(id) {
                            Some(Err(error)) => error,
                            _ => Error::Cancelled,
                        });
                    }
                }
            }
        };
        let collected = Exchange {
            shared: shared.clone(),
            task: id,
            start,
            origin,
            request,
            control: receiver,
            caller: Caller::Handler {
                clock,
                collect: (kind != TaskKind::Download).then_some(shared.config.max_body_size),
            },
        }
        .run()
        .await;
        // Removes a download's file on every way out but success, where the caller's own
        // guard takes over.
        let mut file_guard = DownloadedFile {
            path: collected.file.clone(),
        };
        match shared.core.take_outcome(id) {
            Some(Ok(())) => {
                file_guard.path = None; // disarmed, not forgotten: forgetting leaks the path
                Ok(collected)
            }
            Some(Err(error)) => Err(error),
            None => Err(Error::Cancelled),
        }
    }

    // ---- invalidation and observation ----

    /// No new tasks; once the running ones complete the session is invalidated and releases
    /// everything. A no-op on the shared session (R9).
    pub fn finish_tasks_and_invalidate(&self) {
        self.inner.handle.finish_tasks_and_invalidate();
    }

    /// Cancel every task, then invalidate. A no-op on the shared session (R9).
    pub fn invalidate_and_cancel(&self) {
        self.inner.handle.invalidate_and_cancel();
    }

    /// Resolves once the session is invalidated, `did_become_invalid` has returned, the
    /// delegate is dropped (R3) and the driver has closed everything (R4). Never resolves for
    /// the shared session.
    pub async fn invalidated(&self) {
        self.observer().invalidated().await;
    }

    pub fn state(&self) -> SessionState {
        self.inner.shared.core.state()
    }

    /// What the session holds now, by its own account.
    pub fn resources(&self) -> Ledger {
        self.inner.shared.resources()
    }

    /// How many completed tasks' results this session keeps because a handle to them is still
    /// held (for `result()`); 0 once every such handle is dropped (R5).
    pub fn kept_results(&self) -> usize {
        self.inner.shared.core.kept_results()
    }

    /// The session's name, unique in the process; download temp files start with it.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    pub fn configuration(&self) -> &Configuration {
        &self.inner.shared.config
    }

    /// For the suite's witnesses: the session's TLS client configuration (which holds its
    /// resumption store), not kept alive; `None` once the session released it.
    #[cfg(feature = "test-util")]
    pub fn tls_config(&self) -> Option<std::sync::Weak<rustls::ClientConfig>> {
        self.inner
            .shared
            .pool
            .tls_config()
            .map(|config| Arc::downgrade(&config))
    }

    /// For the suite's witnesses: the session's response cache store, not kept alive; `None`
    /// once the session released it (or it has no cache). `reset` replaces the store.
    #[cfg(feature = "test-util")]
    pub fn cache_store(&self) -> Option<std::sync::Weak<dyn std::any::Any + Send + Sync>> {
        let store = self.inner.shared.cache.as_ref()?.weak_store()?;
        Some(store as std::sync::Weak<dyn std::any::Any + Send + Sync>)
    }

    /// Where the session's response cache keeps its bodies, if on disk.
    pub fn cache_directory(&self) -> Option<&Path> {
        self.inner.shared.cache.as_ref()?.dir()
    }

    /// Empty the session's response cache, close its idle connections and forget its TLS
    /// sessions (URLSession's `reset(completionHandler:)`); resolves once the idle sockets are
    /// closed. The session goes on: running tasks are untouched, new connections make full TLS
    /// handshakes into a fresh store, and new requests miss the cache. On an invalidated
    /// session it empties what is not released yet (the cache, while the delegate is still in
    /// `did_become_invalid`).
    pub async fn reset(&self) {
        let shared = &self.inner.shared;
        if let Some(cache) = &shared.cache {
            cache.clear();
        }
        shared.pool.reset_tls(&shared.config);
        let (done, closed) = tokio::sync::oneshot::channel();
        shared.pool.note(crate::pool::Note::CloseIdle(done));
        // An error: the driver is gone, and with it every connection.
        let _ = closed.await;
    }

    /// A view of the session that does not keep it alive: dropping every [`Session`] clone
    /// still invalidates it (R10) while an observer waits for that.
    pub fn observer(&self) -> Observer {
        Observer {
            shared: self.inner.shared.clone(),
        }
    }
}

/// Watches a session without owning it (see [`Session::observer`]).
#[derive(Debug, Clone)]
pub struct Observer {
    shared: Arc<Shared>,
}

impl Observer {
    /// As [`Session::invalidated`].
    pub async fn invalidated(&self) {
        let core = self.shared.core.clone();
        poll_fn(|cx| core.poll_released(cx)).await;
        // Released: nothing new starts, and what runs is ending (aborted, or done). Resolve
        // once the last of it has, so that no future of the session outlives the promise.
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        // Every socket is closed and every future gone, and with them the TLS connections:
        // the TLS state goes now, not when the driver next runs.
        self.shared.pool.release_tls();
        if let Some(cache) = &self.shared.cache {
            cache.release();
        }
    }

    pub fn state(&self) -> SessionState {
        self.shared.core.state()
    }

    pub fn resources(&self) -> Ledger {
        self.shared.resources()
    }

    /// A task's state, whether or not anyone still holds its handle.
    pub fn task_state(&self, task: TaskId) -> crate::TaskState {
        self.shared.core.task_state(task)
    }

    /// For the suite: the task's `timeout` runs out now, as if that much time had passed for
    /// it alone (the model's `TimePasses`). A no-op if that timer is not armed.
    #[cfg(feature = "test-util")]
    pub fn time_passes(&self, task: TaskId, timeout: crate::Timeout) {
        self.shared
            .pool
            .note(crate::pool::Note::Expire(task, timeout));
    }

    /// For the suite: the task timers the session's clocks hold now (the driver's queue and
    /// the conveniences' own clocks), counted where they live, apart from the engine's ledger.
    #[cfg(feature = "test-util")]
    pub fn clock_timers(&self) -> u32 {
        use std::sync::atomic::Ordering::Relaxed;
        let clocks = &self.shared.clocks;
        (clocks.driver.load(Relaxed) + clocks.handlers.load(Relaxed)) as u32
    }

    /// For the suite: every idle connection's idle timeout runs out now.
    #[cfg(feature = "test-util")]
    pub fn idle_time_passes(&self) {
        self.shared.pool.note(crate::pool::Note::ExpireIdle);
    }
}

impl Shared {
    /// The engine's ledger, with the TLS sessions the pool's store caches (the engine knows
    /// nothing of TLS).
    pub fn resources(&self) -> Ledger {
        Ledger {
            tls_sessions: self.pool.tls_sessions(),
            cached_bytes: self.cache.as_ref().map_or(0, Cache::bytes),
            cached_responses: self.cache.as_ref().map_or(0, Cache::responses),
            ..self.core.ledger()
        }
    }

    /// The driver starts a task's IO: its job and its control.
    pub fn take_job(&self, task: TaskId) -> Option<(Job, watch::Receiver<Control>)> {
        let mut records = lock(&self.records);
        let record = records.get_mut(&task)?;
        let job = record.job.take()?;
        Some((job, record.control.subscribe()))
    }

    pub fn control(&self, task: TaskId, change: impl FnOnce(&mut Control)) {
        if let Some(record) = lock(&self.records).get(&task) {
            record.control.send_modify(change);
        }
    }

    /// Whether the session has a delegate: without one, no task's head goes to any.
    pub fn delegated(&self) -> bool {
        self.infos.is_some()
    }

    /// The task's exchange is over, or it never had one and never will.
    pub fn forget(&self, task: TaskId) {
        let record = lock(&self.records).remove(&task);
        drop(record);
    }
}

/// A handler's task: a running task's handle alone would let it run on (R10), but a dropped
/// convenience future means nobody wants its result.
struct CancelOnDrop(Task);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.handle().cancel();
    }
}

/// A finished download's file. Removed when dropped, unless persisted.
#[derive(Debug)]
pub struct DownloadedFile {
    path: Option<PathBuf>,
}

impl DownloadedFile {
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Move the file to `to` and keep it there.
    pub fn persist(mut self, to: impl AsRef<Path>) -> Result<(), Error> {
        let from = self.path.take().unwrap_or_default();
        if let Err(error) = std::fs::rename(&from, to.as_ref()) {
            self.path = Some(from);
            return Err(error.into());
        }
        Ok(())
    }
}

impl Drop for DownloadedFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The request with `body`; the body rides along in its extensions too, for a 307 or 308 to
/// send again (`redirect::Replay`).
fn with_body(request: http::Request<()>, body: UploadBody) -> Result<http::Request<Body>, Error> {
    let (mut parts, ()) = request.into_parts();
    let length = match &body {
        UploadBody::Bytes(bytes) => bytes.len() as u64,
        UploadBody::File(path) => std::fs::metadata(path)?.len(),
    };
    parts
        .headers
        .insert(http::header::CONTENT_LENGTH, length.into());
    let sent = crate::redirect::upload_body(&body);
    parts.extensions.insert(crate::redirect::Replay(body));
    Ok(http::Request::from_parts(parts, sent))
}

/// Check the URL, add the default headers and `Host`, and put the target in origin form.
pub(crate) fn prepare(
    request: http::Request<Body>,
    config: &Configuration,
) -> Result<(http::Request<Body>, Origin), Error> {
    prepare_with(request, config, true)
}

/// [`prepare`], for a redirect's next request: the session's default credentials
/// (`Authorization`, `Cookie`, `Proxy-Authorization`) are added only if `credentials` (the
/// hop stays on its origin); the other default headers as for any request.
pub(crate) fn prepare_with(
    mut request: http::Request<Body>,
    config: &Configuration,
    credentials: bool,
) -> Result<(http::Request<Body>, Origin), Error> {
    let uri = request.uri().clone();
    let invalid = |reason: &str| Error::InvalidUrl {
        url: uri.to_string(),
        reason: reason.into(),
    };
    let (scheme, default_port) = match uri.scheme_str() {
        Some("http") => (Scheme::Http, 80),
        Some("https") => (Scheme::Https, 443),
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => {
            return Err(invalid(
                "the URL must be absolute, with http:// or https:// and a host",
            ));
        }
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("no host"))?;
    let port = uri
        .authority()
        .map_or(Ok(None), |a| explicit_port(a.as_str()))
        .map_err(|reason| invalid(&reason))?
        .unwrap_or(default_port);
    let origin = Origin {
        scheme,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    };
    let headers = request.headers_mut();
    for (name, value) in &config.default_headers {
        let withheld = !credentials && crate::redirect::CREDENTIALS.contains(name);
        if !headers.contains_key(name) && !withheld {
            headers.insert(name.clone(), value.clone());
        }
    }
    if !headers.contains_key(http::header::HOST) {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        let value = http::HeaderValue::from_str(authority).map_err(|_| invalid("bad host"))?;
        headers.insert(http::header::HOST, value);
    }
    // Origin form: the path and query alone (taken as parsed, not parsed again).
    let mut target = http::uri::Parts::default();
    target.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    *request.uri_mut() = http::Uri::from_parts(target).map_err(|_| invalid("bad path"))?;
    Ok((request, origin))
}

/// The port an authority names, if it names one. An empty port is the scheme's default (RFC
/// 3986, 3.2.3). One that is not a port (out of range, or 0) is the user's error, never a
/// reason to fall back to the default and send the request there: `http::Uri` parses
/// `host:99999` and only then finds no `u16` in it.
fn explicit_port(authority: &str) -> Result<Option<u16>, String> {
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    let Some(colon) = authority[host_end..].rfind(':') else {
        return Ok(None);
    };
    let digits = &authority[host_end + colon + 1..];
    match digits.parse::<u16>() {
        _ if digits.is_empty() => Ok(None),
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(format!(
            "the port {digits} is not a port: it must be 1 to 65535"
        )),
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
