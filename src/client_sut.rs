//! The real client as the system under test: `leakproof` sessions, each against a stage of
//! its own whose held exchanges play the model's server op by op (`/hold/t3` is task t3's
//! request). What the world shows comes from the witnesses wherever one exists: the sockets
//! the client holds to the stage, the download directory, a `Weak` to the delegate, and the
//! callbacks the delegate heard. Two worlds:
//!
//! - [`ClientWorld`], on real sockets: a multi-thread runtime, the stage on loopback, the
//!   delegate's callbacks on the session's thread. After each op the world waits, within a
//!   deadline, until what it shows matches the model: the kernel's timing is not ours to know.
//! - [`SimulatedWorld`], in a simulation: one current-thread runtime with a paused clock runs
//!   the client, its delegate's callbacks (`deliver_on_runtime`) and the stage, over an
//!   in-memory network ([`SimNet`]). After each op it runs until nothing can make progress
//!   (every task waits, and no timer is due within the next millisecond: the paused clock
//!   moves only when the runtime is idle), then shows what it has, once: a mismatch is a
//!   divergence at once, with no deadline and no grace. Nothing in it is random or timed by
//!   the wall clock, so a sequence gives the same run every time (see its
//!   [`System::trace`]). At the moment of each promise it checks the witnesses
//!   ([`Checkpoints`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leakproof::{
    Configuration, Delegate, Error, Observer, Session, StreamTask, TaskInfo, Timeout, UploadBody,
    UrlCache,
};
use leakproof_model::{
    CACHE_ENTRIES, CACHED_BODY, Callback, CloseFrame, Disposition, Fault, MAX_REDIRECTS, Op,
    Outcome, Redirect, Refusal, ResourceId, Resources, Returned, SessionId, SessionKind, TaskId,
    TaskKind, Timer,
};

use leakproof_model::rules::{Rule, Violation};

use crate::assertions::{SessionView, View};
use crate::engine_sut::{model_outcome, model_resources, model_session_state, model_task_state};
use crate::machine::System;
use crate::scenario::AnyTask;
use crate::simnet::SimNet;
use crate::stage::{Held, HeldRaw, HeldWs, Liveness, RawScript, Stage};
use crate::witness;

/// How long an op may take to settle before the world shows what it has.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a matching view must stay matching, to catch a callback right behind.
const GRACE: Duration = Duration::from_millis(3);
/// How long a server op waits for its request to arrive.
const ARRIVAL: Duration = Duration::from_secs(3);
/// Upload tasks send this many bytes.
const UPLOAD: usize = 1000;
/// A stream op never waits this long: the model's reads take what is there.
const STREAM_OP: Duration = Duration::from_secs(1);

/// In a simulation, how long the world lets the runtime run for a wait that quiescence has
/// already decided (a request that arrived, a read of what is there): one millisecond of the
/// paused clock, which moves only once every task waits.
const QUIESCENT: Duration = Duration::from_millis(1);
/// The simulated network's pipes, each way: as roomy as loopback's socket buffers, which the
/// server's writes of a case (a few hundred KB at most) never fill.
const SIM_BUFFER: usize = 8 * 1024 * 1024;

/// Every session the sequence created, on one runtime, on real sockets.
pub struct ClientWorld {
    /// Shared with `act`, which drives it (`Runtime::block_on`: a handle's `block_on` does
    /// not run a current-thread runtime's tasks).
    runtime: Arc<tokio::runtime::Runtime>,
    /// The simulated network, in a simulation.
    net: Option<SimNet>,
    sessions: BTreeMap<SessionId, Sim>,
    session_of: BTreeMap<TaskId, SessionId>,
    /// `Par` ops seen: in a simulation their two ops run one after the other, in the order
    /// written for even ones and the other order for odd ones.
    pars: usize,
    checkpoints: Checkpoints,
    /// In a simulation: a suspended task's state as its handle's `Drop` returned, before the
    /// runtime ran again. The view shows it in place of the state after the op, so that what
    /// `Drop` promises (the task is cancelled, R10) is held to that moment.
    dropped_at: Option<(TaskId, leakproof::TaskState)>,
    /// Every session's download directory: one for the world, read once a view (each
    /// session's files are named after it).
    downloads: tempfile::TempDir,
}

/// The same world in a simulation (see the module's docs).
pub struct SimulatedWorld {
    world: ClientWorld,
    /// The simulated time the world began at.
    began: tokio::time::Instant,
}

impl std::fmt::Debug for SimulatedWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.world.fmt(f)
    }
}

impl Default for SimulatedWorld {
    fn default() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a tokio runtime");
        let began = runtime.block_on(async { tokio::time::Instant::now() });
        // Room for what any one server op writes (a websocket message past the client's
        // largest, 64 KiB and one byte, say) without waiting for the client to read it: a
        // write that waited would let the paused clock run on to the client's timers.
        let net = SimNet::with_buffers(crate::simnet::Buffers {
            to_server: SIM_BUFFER,
            to_client: SIM_BUFFER,
        });
        let world = ClientWorld::new(runtime, Some(net));
        SimulatedWorld { world, began }
    }
}

impl SimulatedWorld {
    /// What the simulation did so far, for comparing two runs: the stages' logs, each
    /// session's callbacks as heard, the futures' returns, and the simulated time.
    fn text(&self) -> String {
        let mut trace = String::new();
        for (id, sim) in &self.world.sessions {
            trace.push_str(&format!(
                "{id}: heard {:?}\n",
                sim.ear.heard.lock().unwrap()
            ));
            trace.push_str(&format!(
                "{id}: awaited {:?}\n",
                sim.awaited.lock().unwrap()
            ));
            for mut seen in sim.stage.log() {
                // The one random thing in a run: a websocket handshake's nonce, which RFC 6455
                // has the client draw at random. It decides nothing here.
                for (name, value) in &mut seen.headers {
                    if name == "sec-websocket-key" {
                        *value = "(random)".into();
                    }
                }
                trace.push_str(&format!("{id}: stage {seen:?}\n"));
            }
        }
        let now = self
            .world
            .runtime
            .block_on(async { tokio::time::Instant::now() });
        let elapsed = now - self.began;
        trace.push_str(&format!("{elapsed:?} of simulated time\n"));
        trace
    }
}

impl System for SimulatedWorld {
    fn apply(&mut self, op: &Op) -> View {
        // Two ops at once may release with one and allocate with the other (a resume taking a
        // pooled connection builds its request and buffers): not a moment to judge.
        let before = BytesHeld::now(&self.world).filter(|_| !matches!(op, Op::Par(..)));
        let mut view = self.world.apply_until(op, &|_| true);
        if let (Some(before), Some(after)) = (before, BytesHeld::now(&self.world))
            && let Some(broken) = before.released(&after)
        {
            view.broken.push(broken);
        }
        view
    }

    fn trace(&self) -> Option<String> {
        Some(self.text())
    }
}

/// The bytes witness: what the world's heap and the ledgers say around one op.
///
/// The ledger's `buffered_bytes` is the client's own word. The heap ([`crate::heap`]) is not,
/// but it cannot say whose a block is, and it sees capacity where the ledger counts bytes (a
/// stream's read-ahead buffer is made once, at its window's size; a websocket's message may
/// share its block with the connection's read buffer). One moment is exact enough: an op (not
/// two at once) that closes connections and opens none, in which the ledger lets go of `D`
/// bytes, must leave the heap at least `D` bytes smaller, less [`BytesHeld::SLACK`] for what
/// the op allocates besides (the connections' own buffers go too, some 20 KiB each). Bytes the ledger released but something still holds (the
/// prefetched data of seed 001, kept after a cancel) fail it. The simulated network's pipes are
/// not counted ([`crate::heap::outside`]): the bytes in flight are the network's.
#[derive(Debug, Clone, Copy)]
struct BytesHeld {
    heap: isize,
    buffered: u64,
    connections: u32,
    dialled: u64,
}

impl BytesHeld {
    /// Released bytes below this are lost in the harness's own allocations.
    const RELEASED: u64 = 16 * 1024;
    /// What the harness and the op's other work may allocate in one op (callbacks heard, the
    /// view, a close frame sent).
    const SLACK: isize = 8 * 1024;

    fn now(world: &ClientWorld) -> Option<BytesHeld> {
        let heap = crate::heap::live()?;
        let net = world.net.as_ref()?;
        let (buffered, connections) = world.sessions.values().fold((0, 0), |(b, c), sim| {
            let ledger = sim.observer.resources();
            (
                b + ledger.buffered_bytes,
                c + ledger.open_connections + ledger.idle_connections,
            )
        });
        Some(BytesHeld {
            heap,
            buffered,
            connections,
            dialled: net.tally().opened(),
        })
    }

    /// The broken rule, if the op released bytes that the heap still holds.
    fn released(&self, after: &BytesHeld) -> Option<Violation> {
        let released = self.buffered.checked_sub(after.buffered)?;
        let closing = after.connections < self.connections && after.dialled == self.dialled;
        if !closing || released < Self::RELEASED {
            return None;
        }
        let fell = self.heap - after.heap;
        (fell + Self::SLACK < released as isize).then(|| Violation {
            rule: Rule::R6,
            detail: format!(
                "the ledger released {released} buffered bytes and {} connections, but the \
                 heap fell by {fell} bytes only: something still holds them",
                self.connections - after.connections
            ),
        })
    }
}

/// What the witnesses showed at the moment a promise was made, where it broke a rule: a
/// download's file still there as its `did_complete` is delivered (R5), a connection, a file
/// or the delegate still held as `invalidated()` resolves (R4, R3), a convenience's task not
/// over as its future returns (R5). Each is reported with the first view after it.
#[derive(Debug, Clone, Default)]
pub struct Checkpoints(Arc<Mutex<Vec<Violation>>>);

impl Checkpoints {
    fn broken(&self, rule: Rule, detail: String) {
        self.0.lock().unwrap().push(Violation { rule, detail });
    }

    fn seen(&self) -> Vec<Violation> {
        self.0.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

impl std::fmt::Debug for ClientWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientWorld")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Default for ClientWorld {
    fn default() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        ClientWorld::new(runtime, None)
    }
}

impl ClientWorld {
    /// A world with no session yet, on `runtime`, over `net` if simulated.
    fn new(runtime: tokio::runtime::Runtime, net: Option<SimNet>) -> ClientWorld {
        ClientWorld {
            runtime: Arc::new(runtime),
            net,
            sessions: BTreeMap::new(),
            session_of: BTreeMap::new(),
            pars: 0,
            checkpoints: Checkpoints::default(),
            dropped_at: None,
            downloads: tempfile::tempdir().expect("a download dir"),
        }
    }
}

/// What a session's delegate heard, in the model's words, and what it answers.
#[derive(Debug, Default)]
struct Ear {
    heard: Mutex<Vec<Callback>>,
    ids: Mutex<HashMap<leakproof::TaskId, TaskId>>,
    answers: Mutex<HashMap<leakproof::TaskId, Disposition>>,
    /// Streams the delegate was handed, kept while the user holds the data task (the model's
    /// convention), and the tasks the user let go of.
    streams: Mutex<HashMap<leakproof::TaskId, StreamTask>>,
    dropped: Mutex<HashSet<leakproof::TaskId>>,
    /// Each task's latest connection as the server side saw it (once a server op met its
    /// request), for the witnesses at `did_complete`.
    sockets: Mutex<HashMap<leakproof::TaskId, Liveness>>,
    /// The start of the names of the session's files, once it is built.
    prefix: std::sync::OnceLock<String>,
    /// The delegate is slow: its callbacks other than did_receive_data wait here, once heard,
    /// until released.
    slow: Mutex<bool>,
    released: std::sync::Condvar,
    /// The delegate answers its next question later: it keeps the responder.
    defers: Mutex<bool>,
    /// The responders it kept, unanswered, with the answer each will give.
    responders: Mutex<HashMap<TaskId, Kept>>,
    /// What it answers to each task's redirects.
    redirects: Mutex<HashMap<leakproof::TaskId, Redirect>>,
    /// In a simulation a slow delegate does not block its thread (the runtime's): a callback
    /// heard while slow marks it stuck, and the delivery waits on `gate` (the pace) before it
    /// reports the callback returned.
    simulated: bool,
    stuck: Mutex<bool>,
    gate: tokio::sync::watch::Sender<bool>,
    /// In a simulation, what a stuck callback does as it returns (answer its question, keep
    /// the stream it was handed).
    on_return: Mutex<Option<OnReturn>>,
}

struct OnReturn(Box<dyn FnOnce(&Ear) + Send>);

impl std::fmt::Debug for OnReturn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnReturn")
    }
}

impl Kept {
    /// Give the answer the delegate will give.
    fn answer(self, ear: &Ear) {
        match self {
            Kept::Disposition(responder) => {
                let answer = ear.answer(responder.task());
                responder.answer(answer);
            }
            Kept::Redirect(responder, answer) => responder.answer(*answer),
        }
    }
}

/// A responder the delegate kept, and the answer it will give.
#[derive(Debug)]
enum Kept {
    Disposition(leakproof::Responder<leakproof::Disposition>),
    Redirect(
        leakproof::Responder<leakproof::Redirect>,
        Box<leakproof::Redirect>,
    ),
}

impl Ear {
    /// Stay in the callback while the delegate is slow (in a simulation: mark it stuck, for
    /// [`returned`](Self::returned)).
    fn keep_up(&self) {
        let slow = self.slow.lock().unwrap();
        if self.simulated {
            *self.stuck.lock().unwrap() = *slow;
            return;
        }
        drop(self.released.wait_while(slow, |slow| *slow).unwrap());
    }

    fn pace(&self, slow: bool) {
        *self.slow.lock().unwrap() = slow;
        self.released.notify_all();
        self.gate.send_replace(slow);
    }

    /// In a simulation, what the delivery awaits after each callback: a stuck callback
    /// returns once the delegate is released, and decides its question then.
    async fn returned(self: Arc<Self>) {
        if std::mem::take(&mut *self.stuck.lock().unwrap()) {
            let mut pace = self.gate.subscribe();
            let _ = pace.wait_for(|slow| !slow).await;
            let on_return = self.on_return.lock().unwrap().take();
            if let Some(on_return) = on_return {
                (on_return.0)(&self);
            }
        }
    }

    /// What the delegate does last in its callback: now, or in a simulation, if the callback
    /// is stuck, as it returns (see [`returned`](Self::returned)), as a blocked thread would.
    fn last(&self, f: impl FnOnce(&Ear) + Send + 'static) {
        if self.simulated && *self.stuck.lock().unwrap() {
            *self.on_return.lock().unwrap() = Some(OnReturn(Box::new(f)));
        } else {
            f(self);
        }
    }

    /// The delegate was asked a question (`kept` holds its responder): it answers as it
    /// returns, or keeps the responder if it answers later.
    fn ask(&self, id: TaskId, kept: Kept) {
        self.last(move |ear| ear.decide(id, kept));
    }

    fn decide(&self, id: TaskId, kept: Kept) {
        if std::mem::take(&mut *self.defers.lock().unwrap()) {
            self.responders.lock().unwrap().insert(id, kept);
        } else {
            kept.answer(self);
        }
    }
}

#[derive(Debug)]
struct Listener {
    session: SessionId,
    ear: Arc<Ear>,
    /// In a simulation: where a promise broken at its moment is noted, and the download
    /// directory, whose files are witnessed as `did_complete` is delivered.
    checkpoints: Option<(Checkpoints, std::path::PathBuf)>,
}

impl Listener {
    /// Record the callback as it comes in, then stay in it while the delegate is slow.
    fn hear(&self, task: &TaskInfo, callback: impl FnOnce(TaskId) -> Callback) {
        self.hear_only(task, callback);
        self.ear.keep_up();
    }

    /// Record the callback; did_receive_data returns at once, whatever the pace.
    fn hear_only(&self, task: &TaskInfo, callback: impl FnOnce(TaskId) -> Callback) {
        let id = self.ear.ids.lock().unwrap()[&task.id];
        self.ear.heard.lock().unwrap().push(callback(id));
    }
}

impl Ear {
    /// What the delegate answers to the task's response head.
    fn answer(&self, task: leakproof::TaskId) -> leakproof::Disposition {
        let answer = self.answers.lock().unwrap().get(&task).copied();
        match answer.unwrap_or(Disposition::Allow) {
            Disposition::Allow => leakproof::Disposition::Allow,
            Disposition::Cancel => leakproof::Disposition::Cancel,
            Disposition::BecomeDownload => leakproof::Disposition::BecomeDownload,
            Disposition::BecomeStream => leakproof::Disposition::BecomeStream,
        }
    }
}

impl Delegate for Listener {
    fn did_receive_response_with(
        &self,
        task: &TaskInfo,
        _: &http::Response<()>,
        responder: leakproof::Responder<leakproof::Disposition>,
    ) {
        self.hear(task, |task| Callback::ReceiveResponse { task });
        let id = self.ear.ids.lock().unwrap()[&task.id];
        self.ear.ask(id, Kept::Disposition(responder));
    }

    fn will_perform_redirection_with(
        &self,
        task: &TaskInfo,
        _: &http::Response<()>,
        request: http::Request<()>,
        responder: leakproof::Responder<leakproof::Redirect>,
    ) {
        self.hear(task, |task| Callback::WillRedirect { task });
        let answer = self.ear.redirects.lock().unwrap().get(&task.id).copied();
        let answer = match answer.unwrap_or(Redirect::Follow) {
            Redirect::Follow => leakproof::Redirect::Follow(request),
            Redirect::Refuse => leakproof::Redirect::Refuse,
        };
        let id = self.ear.ids.lock().unwrap()[&task.id];
        self.ear
            .ask(id, Kept::Redirect(responder, Box::new(answer)));
    }

    fn did_become_stream(&self, task: &TaskInfo, stream: StreamTask) {
        self.hear(task, |task| Callback::BecomeStream { task });
        let id = task.id;
        self.ear.last(move |ear| {
            if !ear.dropped.lock().unwrap().contains(&id) {
                ear.streams.lock().unwrap().insert(id, stream);
            }
        });
    }

    fn did_open(&self, task: &TaskInfo, _: Option<&str>) {
        self.hear(task, |task| Callback::Open { task });
    }

    fn did_close(&self, task: &TaskInfo, _: leakproof::CloseCode, _: &str) {
        self.hear(task, |task| Callback::Close { task });
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        let bytes = data.len() as u64;
        self.hear_only(task, |task| Callback::ReceiveData { task, bytes });
    }

    fn did_become_download(&self, task: &TaskInfo) {
        self.hear(task, |task| Callback::BecomeDownload { task });
    }

    fn did_finish_downloading(&self, task: &TaskInfo, _: &std::path::Path) {
        self.hear(task, |task| Callback::FinishDownloading { task });
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let outcome = model_outcome(&result);
        // R5 at its moment: a completed task holds nothing; its file is gone already.
        if let Some((checkpoints, downloads)) = &self.checkpoints {
            let prefix = self.ear.prefix.get().expect("named");
            let name = format!("{prefix}{}.download", task.id.0);
            let files = witness::files_in(downloads).unwrap_or_default();
            let id = || self.ear.ids.lock().unwrap()[&task.id];
            if let Some(file) = files
                .iter()
                .find(|f| f.file_name().is_some_and(|n| n.to_string_lossy() == name))
            {
                let detail = format!(
                    "{}'s file {} exists as did_complete is delivered",
                    id(),
                    file.display()
                );
                checkpoints.broken(Rule::R5, detail);
            }
            // Its connection, unless it went back to the pool: a task that failed or was
            // cancelled closed it, and a stream's or a websocket's is never pooled.
            let pooled = result.is_ok()
                && matches!(
                    task.kind,
                    leakproof::TaskKind::Data
                        | leakproof::TaskKind::Download
                        | leakproof::TaskKind::Upload
                );
            let open = self
                .ear
                .sockets
                .lock()
                .unwrap()
                .get(&task.id)
                .and_then(Liveness::client_dropped)
                == Some(false);
            if open && !pooled {
                let detail = format!(
                    "{}'s connection is open on the client's side as did_complete({outcome:?}) is delivered",
                    id()
                );
                checkpoints.broken(Rule::R5, detail);
            }
        }
        self.hear(task, |task| Callback::Complete { task, outcome });
    }

    fn did_become_invalid(&self) {
        let session = self.session;
        self.ear
            .heard
            .lock()
            .unwrap()
            .push(Callback::BecomeInvalid { session });
        self.ear.keep_up();
    }
}

/// One session, its stage and its download directory.
struct Sim {
    kind: SessionKind,
    /// In a simulation: the network, whose count of the client's open ends is the witness of
    /// its sockets.
    net: Option<SimNet>,
    checkpoints: Checkpoints,
    session: Option<Session>,
    observer: Observer,
    stage: Stage,
    /// The start of the names of this session's files in the world's download directory.
    prefix: String,
    delegate: Option<Weak<Listener>>,
    ear: Arc<Ear>,
    /// How many of the heard callbacks earlier views reported.
    reported: usize,
    /// What conveniences' futures returned, as they returned, and how many earlier views
    /// reported.
    awaited: Arc<Mutex<Vec<(TaskId, Outcome)>>>,
    reported_awaited: usize,
    tasks: BTreeMap<TaskId, SimTask>,
}

struct SimTask {
    client: leakproof::TaskId,
    kind: TaskKind,
    handle: Option<AnyTask>,
    /// A convenience: its future, spawned after its first poll. Kept after it was dropped
    /// (aborted), to witness when the runtime has dropped it.
    future: Option<tokio::task::JoinHandle<()>>,
    /// The server's side of the exchange, once its request arrived.
    held: Option<Held>,
    /// The server's side of a raw stream, once it connected.
    raw: Option<HeldRaw>,
    /// The server's side of a websocket, once it accepted the upgrade.
    ws: Option<HeldWs>,
    /// The user shut the stream's write half: the stage sees that as a close (a read of 0)
    /// while the client still holds the socket for reading.
    write_shut: bool,
    /// Resumed at least once: a stream is connecting, or connected.
    resumed: bool,
    /// Whether the stage still has the exchange's connection open.
    socket: Option<Liveness>,
    /// Redirects the server sent: the next request arrives as `/hold/{task}.{hops}`.
    hops: u32,
    /// The server closed or broke the connection (a reset, an end and a close, garbage): the
    /// stage counts it closed (hyper's connection task drops a socket that sent garbage even
    /// for a suspended task) though the client still holds its dead end until it reads the
    /// failure (R7).
    server_closed: bool,
}

impl System for ClientWorld {
    fn apply(&mut self, op: &Op) -> View {
        self.apply_until(op, &|_| false)
    }

    fn apply_until(&mut self, op: &Op, settled: &dyn Fn(&View) -> bool) -> View {
        let runtime = Arc::clone(&self.runtime);
        let now = move || runtime.block_on(async { tokio::time::Instant::now() });
        let began = self.net.is_some().then(&now);
        let (refused, returned) = self.act(op);
        let view = if let Some(began) = began {
            // Quiescence: the sleep ends once every task waits and no timer is due before it.
            self.runtime
                .block_on(async { tokio::time::sleep(QUIESCENT).await });
            // An op that waited on the paused clock for something that never came let the
            // client's timers run: the world's own mistake, not the client's.
            let waited = now() - began;
            assert!(
                waited <= 8 * QUIESCENT,
                "the simulated world waited {waited:?} of simulated time in {op:?}"
            );
            self.view(refused, returned)
        } else {
            self.settle(refused, returned, settled)
        };
        for sim in self.sessions.values_mut() {
            sim.reported = sim.ear.heard.lock().unwrap().len();
            sim.reported_awaited = sim.awaited.lock().unwrap().len();
        }
        self.checkpoints.clear();
        self.dropped_at = None;
        view
    }
}

impl ClientWorld {
    /// On real sockets: wait, within [`SETTLE`], until what the world shows is `settled`.
    fn settle(
        &self,
        refused: Option<Refusal>,
        returned: Option<Returned>,
        settled: &dyn Fn(&View) -> bool,
    ) -> View {
        let deadline = Instant::now() + SETTLE;
        loop {
            let view = self.view(refused, returned);
            if settled(&view) {
                std::thread::sleep(GRACE);
                let again = self.view(refused, returned);
                if settled(&again) {
                    return again;
                }
            }
            if Instant::now() >= deadline {
                return view;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// How long a server op waits for its request, and a stream op for its bytes: in a
    /// simulation the world has settled, so what will come has come.
    fn patience(&self, real: Duration) -> Duration {
        if self.net.is_some() { QUIESCENT } else { real }
    }

    /// Do what `op` says; whether the client refused it, and what it returned.
    fn act(&mut self, op: &Op) -> (Option<Refusal>, Option<Returned>) {
        let rt = Arc::clone(&self.runtime);
        let runtime = rt.handle().clone();
        match *op {
            Op::CreateSession {
                session,
                kind,
                per_host,
            } => {
                let net = self.net.clone();
                let checkpoints = self.checkpoints.clone();
                let downloads = self.downloads.path().to_owned();
                let sim = rt.block_on(Sim::new(
                    session,
                    kind,
                    per_host,
                    net,
                    checkpoints,
                    downloads,
                ));
                self.sessions.insert(session, sim);
            }
            Op::FinishTasksAndInvalidate(s) => self.user_session(s).finish_tasks_and_invalidate(),
            Op::InvalidateAndCancel(s) => self.user_session(s).invalidate_and_cancel(),
            Op::DropSession(s) => self.sim(s).session = None,
            Op::IdleTimeoutPasses(s) => self.sim(s).observer.idle_time_passes(),
            Op::CreateTask {
                session,
                task,
                kind,
            } => {
                // A stream's server is a raw listener of its own, held under the task's name.
                let raw = (kind == TaskKind::Stream).then(|| {
                    let stage = &self.sim(session).stage;
                    runtime
                        .block_on(stage.listen_raw(RawScript::hold(task.to_string())))
                        .expect("a raw listener")
                });
                let _guard = runtime.enter();
                match self.sim(session).create_task(task, kind, raw) {
                    Ok(()) => {
                        self.session_of.insert(task, session);
                    }
                    Err(Error::SessionInvalidated) => {
                        return (Some(Refusal::SessionInvalidated), None);
                    }
                    Err(error) => panic!("R8: creating {task} failed: {error}"),
                }
            }
            Op::Await {
                session,
                task,
                kind,
            } => {
                let _guard = runtime.enter();
                let path = format!("/hold/{task}");
                if let Err(error) = self.sim(session).convenience(task, kind, &path, &runtime) {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: {task}'s first poll failed: {error}"
                    );
                    return (Some(Refusal::SessionInvalidated), None);
                }
                self.session_of.insert(task, session);
            }
            Op::Par(ref a, ref b) => return (self.par([a, b], &runtime), None),
            Op::DelegateBlocks(s) => self.sim(s).ear.pace(true),
            Op::DelegateReturns(s) => self.sim(s).ear.pace(false),
            Op::DelegateDefers(s) => *self.sim(s).ear.defers.lock().unwrap() = true,
            Op::Fetch {
                session,
                task,
                resource,
            } => {
                let _guard = runtime.enter();
                let path = cacheable(resource);
                let sim = self.sim(session);
                if let Err(error) = sim.convenience(task, TaskKind::Data, &path, &runtime) {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: {task}'s first poll failed: {error}"
                    );
                    return (Some(Refusal::SessionInvalidated), None);
                }
                self.session_of.insert(task, session);
            }
            Op::Reset(s) => {
                let session = self.user_session(s).clone();
                // The promise: once reset() returns, the idle connections are closed.
                let reset = async { tokio::time::timeout(ARRIVAL, session.reset()).await };
                rt.block_on(reset).expect("reset() returns");
            }
            Op::Answer(t) | Op::DropResponder(t) => {
                let ear = self.sim(self.session_of[&t]).ear.clone();
                let kept = ear.responders.lock().unwrap().remove(&t);
                let kept = kept.unwrap_or_else(|| panic!("{t}: no responder kept"));
                // Dropped unanswered, unless the op answers.
                if let Op::Answer(_) = op {
                    kept.answer(&ear);
                }
            }
            Op::Resume(t) => {
                self.user_task(t).resume();
                self.task(t).resumed = true;
            }
            Op::Suspend(t) => self.user_task(t).suspend(),
            Op::Cancel(t) => self.user_task(t).cancel(),
            Op::DropTask(t) => {
                let s = self.session_of[&t];
                let sim = self.sim(s);
                let task = sim.tasks.get_mut(&t).expect("task");
                let client = task.client;
                let handle = task.handle.take();
                // Dropping a suspended task's handle cancels it, there and then (R10). (A
                // stream may be on its way to the delegate, which then holds it.)
                let promised = handle.is_some()
                    && task.kind != TaskKind::Stream
                    && sim.observer.task_state(client) == leakproof::TaskState::Suspended;
                if let Some(future) = &task.future {
                    // Dropping a spawned future: the runtime drops it at its next turn.
                    future.abort();
                }
                sim.ear.dropped.lock().unwrap().insert(client);
                let stream = sim.ear.streams.lock().unwrap().remove(&client);
                drop((handle, stream));
                if promised && self.net.is_some() {
                    let state = self.sim(s).observer.task_state(client);
                    self.dropped_at = Some((t, state));
                }
            }
            Op::Read(t) => {
                let patience = self.patience(STREAM_OP);
                let read = self.with_stream(t, |s| rt.block_on(s.read(0, usize::MAX, patience)));
                match read {
                    Ok(Some(bytes)) => return (None, Some(Returned::Read(bytes.len() as u64))),
                    Ok(None) => return (None, Some(Returned::Eof)),
                    Err(error) => return (Some(refusal(&error)), None),
                }
            }
            Op::Write(t) => {
                let patience = self.patience(STREAM_OP);
                let write = self.with_stream(t, |s| rt.block_on(s.write(b"leakproof", patience)));
                if let Err(error) = write {
                    return (Some(refusal(&error)), None);
                }
            }
            Op::CloseRead(t) => self.with_stream(t, StreamTask::close_read),
            Op::CloseWrite(t) => {
                // The stage sees the write half's end as a close: take the connection first,
                // so the witness knows which socket that was.
                let entry = self.task(t);
                let connected = entry.resumed && entry.kind == TaskKind::Stream;
                let client = entry.client;
                let live = self.sim(self.session_of[&t]).observer.task_state(client)
                    != leakproof::TaskState::Completed;
                if connected && live && self.task(t).held.is_none() {
                    rt.block_on(self.raw(t));
                }
                self.with_stream(t, StreamTask::close_write);
                self.task(t).write_shut = true;
            }
            Op::Receive(t) => match self.websocket(t).try_receive() {
                Ok(message) => {
                    let bytes = message.map(|m| m.len() as u64);
                    return (None, Some(Returned::Received(bytes)));
                }
                Err(error) => return (Some(refusal(&error)), None),
            },
            Op::CloseWith(t) => self
                .websocket(t)
                .cancel_with(1001, "going away")
                .expect("1001 may be sent"),
            Op::ServerAnswersUpgrade { task, accept } => {
                let upgraded = rt.block_on(self.server(task, |held| async move {
                    if accept {
                        held.upgrade().await.map(|ws| (None, Some(ws)))
                    } else {
                        held.refuse_upgrade(403).await.map(|()| (None, None))
                    }
                }));
                self.task(task).ws = upgraded.flatten();
            }
            Op::PeerCloses { task, frame } => {
                // The frame's payload as the wire carries it: 1000, nothing, or 999.
                let payload: &[u8] = match frame {
                    CloseFrame::Code => &[0x03, 0xe8],
                    CloseFrame::NoCode => &[],
                    CloseFrame::InvalidCode => &[0x03, 0xe7],
                };
                // In a simulation the world waits until nothing moves, no longer: a websocket
                // suspended since before its upgrade reads nothing, so the stage carries the
                // frame out once it does.
                let patience = self.patience(ARRIVAL);
                if let Some(ws) = &self.task(task).ws {
                    let close = ws.close_with_payload(payload);
                    let _ = rt.block_on(async { tokio::time::timeout(patience, close).await });
                }
            }
            Op::TimePasses { task, timer } => {
                let client = self.task(task).client;
                let timeout = match timer {
                    Timer::Request => Timeout::Request,
                    Timer::Resource => Timeout::Resource,
                    Timer::Close => Timeout::Close,
                };
                self.sim(self.session_of[&task])
                    .observer
                    .time_passes(client, timeout);
            }
            Op::ServerHeaders { task, answer } => {
                let sim = self.sim(self.session_of[&task]);
                let client = sim.tasks[&task].client;
                sim.ear.answers.lock().unwrap().insert(client, answer);
                rt.block_on(self.server(task, |held| async move {
                    held.head(200, true, None).await.map(|()| (Some(held), ()))
                }));
            }
            Op::ServerRedirects { task, answer } => {
                let sim = self.sim(self.session_of[&task]);
                let client = sim.tasks[&task].client;
                sim.ear.redirects.lock().unwrap().insert(client, answer);
                let next = format!("/hold/{}", hold_key(task, sim.tasks[&task].hops + 1));
                rt.block_on(self.server(task, |held| async move {
                    held.redirect(307, &next).await.map(|()| (None, ()))
                }));
                self.task(task).hops += 1;
            }
            Op::ServerSends { task, bytes } => {
                let bytes = u64::from(bytes);
                let (kind, raw) = (self.task(task).kind, self.task(task).held.is_none());
                match kind {
                    TaskKind::Stream if raw => {
                        if let Some(raw) = rt.block_on(self.raw(task)) {
                            let _ = rt.block_on(raw.send(bytes));
                        }
                    }
                    TaskKind::WebSocket => {
                        // As for a close: no longer than until nothing moves.
                        let patience = self.patience(ARRIVAL);
                        if let Some(ws) = &self.task(task).ws {
                            let send = ws.send_binary(bytes as usize);
                            let _ =
                                rt.block_on(async { tokio::time::timeout(patience, send).await });
                        }
                    }
                    _ => {
                        rt.block_on(self.server(task, |held| async move {
                            let _ = held.send(bytes).await;
                            Ok((Some(held), ()))
                        }));
                    }
                }
            }
            Op::ServerEnds { task, reusable } => {
                if self.task(task).kind == TaskKind::Stream && self.task(task).held.is_none() {
                    if let Some(raw) = rt.block_on(self.raw(task)) {
                        let _ = rt.block_on(raw.end());
                    }
                } else {
                    self.task(task).server_closed |= !reusable;
                    rt.block_on(self.server(task, |held| async move {
                        if reusable {
                            held.end().await?;
                        } else {
                            held.end_and_close().await?;
                        }
                        Ok((None, ()))
                    }));
                }
            }
            Op::ServerFails { task, fault } => {
                self.task(task).server_closed = true;
                let entry = self.task(task);
                if let Some(ws) = entry.ws.take() {
                    let _ = rt.block_on(ws.reset());
                } else if entry.kind == TaskKind::Stream && entry.held.is_none() {
                    if rt.block_on(self.raw(task)).is_some()
                        && let Some(raw) = self.task(task).raw.take()
                    {
                        let _ = rt.block_on(raw.reset());
                    }
                } else {
                    rt.block_on(self.server(task, |held| async move {
                        match fault {
                            Fault::Reset => held.reset().await?,
                            Fault::Malformed => held.malformed().await?,
                        }
                        Ok((None, ()))
                    }));
                }
            }
        }
        (None, None)
    }

    /// Two user ops of one session at once, from two threads released together; then the
    /// world's own account of what they did. The refusal, if one was refused.
    fn par(&mut self, ops: [&Op; 2], runtime: &tokio::runtime::Handle) -> Option<Refusal> {
        if self.net.is_some() {
            // One thread: the two ops run one after the other, alternately in each order.
            let [a, b] = ops;
            let order = if self.pars % 2 == 0 { [a, b] } else { [b, a] };
            self.pars += 1;
            let mut refused = None;
            for op in order {
                refused = refused.or(self.act(op).0);
            }
            return refused;
        }
        let s = crate::machine::session_of_op(ops[0], &self.session_of);
        // Made ready first: a stream's listener, the name the delegate will hear a new task
        // by (its callbacks may come before this thread learns it was created), and what the
        // user lets go of, to be dropped on its thread.
        let mut owned: Vec<Option<Box<dyn Send>>> = Vec::new();
        let mut raw = None;
        for op in ops {
            owned.push(match *op {
                Op::CreateTask { task, kind, .. } => {
                    if kind == TaskKind::Stream {
                        let stage = &self.sim(s).stage;
                        let listener =
                            runtime.block_on(stage.listen_raw(RawScript::hold(task.to_string())));
                        raw = Some(listener.expect("a raw listener"));
                    }
                    let sim = self.sim(s);
                    let next = leakproof::TaskId(sim.tasks.len() as u64);
                    sim.ear.ids.lock().unwrap().insert(next, task);
                    None
                }
                Op::DropSession(_) => Some(Box::new(self.sim(s).session.take())),
                Op::DropTask(t) => {
                    let sim = self.sim(s);
                    let task = sim.tasks.get_mut(&t).expect("task");
                    let client = task.client;
                    let handle = task.handle.take();
                    sim.ear.dropped.lock().unwrap().insert(client);
                    let stream = sim.ear.streams.lock().unwrap().remove(&client);
                    Some(Box::new((handle, stream)))
                }
                _ => None,
            });
        }
        let sim = &self.sessions[&s];
        type Made = Option<Result<AnyTask, Error>>;
        let jobs: Vec<Box<dyn FnOnce() -> Made + Send + '_>> = ops
            .into_iter()
            .zip(owned)
            .map(|(op, owned)| {
                Box::new(move || {
                    let _runtime = runtime.enter();
                    let user = || sim.session.as_ref().expect("the user holds the session");
                    let task = |t: &TaskId| sim.tasks[t].handle.as_ref().expect("held");
                    match *op {
                        Op::CreateTask { task, kind, .. } => {
                            return Some(sim.make_task(task, kind, raw));
                        }
                        Op::FinishTasksAndInvalidate(_) => user().finish_tasks_and_invalidate(),
                        Op::InvalidateAndCancel(_) => user().invalidate_and_cancel(),
                        Op::Resume(t) => task(&t).resume(),
                        Op::Suspend(t) => task(&t).suspend(),
                        Op::Cancel(t) => task(&t).cancel(),
                        Op::DropSession(_) | Op::DropTask(_) => drop(owned),
                        ref other => panic!("{other:?} does not run in parallel"),
                    }
                    None
                }) as Box<dyn FnOnce() -> Made + Send + '_>
            })
            .collect();
        let results = crate::machine::run_together(jobs);
        let mut refused = None;
        for (op, result) in ops.into_iter().zip(results) {
            match (op, result) {
                (Op::CreateTask { task, kind, .. }, Some(Ok(handle))) => {
                    self.session_of.insert(*task, s);
                    self.sim(s).adopt(*task, *kind, handle);
                }
                (Op::CreateTask { task, .. }, Some(Err(error))) => {
                    assert!(
                        matches!(error, Error::SessionInvalidated),
                        "R8: creating {task} failed: {error}"
                    );
                    let sim = self.sim(s);
                    let next = leakproof::TaskId(sim.tasks.len() as u64);
                    sim.ear.ids.lock().unwrap().remove(&next);
                    refused = Some(Refusal::SessionInvalidated);
                }
                (Op::Resume(t), _) => self.task(*t).resumed = true,
                _ => {}
            }
        }
        refused
    }

    /// Do `f` with the user's handle on a stream task, or on the stream a data task became.
    fn with_stream<R>(&mut self, t: TaskId, f: impl FnOnce(&StreamTask) -> R) -> R {
        let s = self.session_of[&t];
        let sim = self.sim(s);
        let task = &sim.tasks[&t];
        match &task.handle {
            Some(AnyTask::Stream(stream)) => f(stream),
            _ => f(&sim.ear.streams.lock().unwrap()[&task.client]),
        }
    }

    fn websocket(&mut self, t: TaskId) -> &leakproof::WebSocketTask {
        match self.user_task(t) {
            AnyTask::WebSocket(ws) => ws,
            _ => panic!("{t} is not a websocket"),
        }
    }

    /// The server's side of a raw stream, waiting for it to connect the first time.
    async fn raw(&mut self, task: TaskId) -> Option<&HeldRaw> {
        let patience = self.patience(ARRIVAL);
        let sim = self
            .sessions
            .get_mut(&self.session_of[&task])
            .expect("session");
        let entry = sim.tasks.get_mut(&task).expect("task");
        if entry.raw.is_none() {
            let raw = sim.stage.held_raw(&task.to_string(), patience).await?;
            entry.socket = Some(raw.liveness());
            let mut sockets = sim.ear.sockets.lock().unwrap();
            sockets.insert(entry.client, raw.liveness());
            drop(sockets);
            entry.raw = Some(raw);
        }
        entry.raw.as_ref()
    }

    /// Let the task's server side do `step` (which keeps the exchange, or ends it). A task the
    /// client has completed is left alone: nothing the server does can reach it any more.
    async fn server<F, Fut, T>(&mut self, task: TaskId, step: F) -> Option<T>
    where
        F: FnOnce(Held) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<(Option<Held>, T)>>,
    {
        let patience = self.patience(ARRIVAL);
        let sim = self
            .sessions
            .get_mut(&self.session_of[&task])
            .expect("session");
        let entry = sim.tasks.get_mut(&task).expect("task");
        if sim.observer.task_state(entry.client) == leakproof::TaskState::Completed {
            return None;
        }
        let held = match entry.held.take() {
            Some(held) => held,
            None => match sim.stage.held(&hold_key(task, entry.hops), patience).await {
                Some(held) => {
                    entry.socket = Some(held.liveness());
                    let mut sockets = sim.ear.sockets.lock().unwrap();
                    sockets.insert(entry.client, held.liveness());
                    drop(sockets);
                    held
                }
                None => return None, // never arrived: the view will show the client's side
            },
        };
        let (kept, out) = step(held).await.ok()?;
        entry.held = kept;
        Some(out)
    }

    fn sim(&mut self, s: SessionId) -> &mut Sim {
        self.sessions.get_mut(&s).expect("session exists")
    }

    fn user_session(&mut self, s: SessionId) -> &Session {
        self.sim(s)
            .session
            .as_ref()
            .expect("the user holds the session")
    }

    fn task(&mut self, t: TaskId) -> &mut SimTask {
        let s = self.session_of[&t];
        self.sim(s).tasks.get_mut(&t).expect("task exists")
    }

    fn user_task(&mut self, t: TaskId) -> &AnyTask {
        self.task(t)
            .handle
            .as_ref()
            .expect("the user holds the task")
    }

    fn view(&self, refused: Option<Refusal>, returned: Option<Returned>) -> View {
        let mut view = View {
            refused,
            returned,
            broken: self.checkpoints.seen(),
            ..View::default()
        };
        let files = witness::files_in(self.downloads.path()).ok();
        for (id, sim) in &self.sessions {
            let heard = sim.ear.heard.lock().unwrap().clone();
            view.callbacks.extend_from_slice(&heard[sim.reported..]);
            let awaited = sim.awaited.lock().unwrap();
            view.awaited
                .extend_from_slice(&awaited[sim.reported_awaited..]);
            for (t, task) in &sim.tasks {
                view.tasks
                    .insert(*t, model_task_state(sim.observer.task_state(task.client)));
            }
            view.sessions.insert(*id, sim.view(heard, files.as_deref()));
        }
        if let Some((t, state)) = self.dropped_at {
            view.tasks.insert(t, model_task_state(state));
        }
        view
    }
}

impl Sim {
    async fn new(
        id: SessionId,
        kind: SessionKind,
        per_host: Option<u32>,
        net: Option<SimNet>,
        checkpoints: Checkpoints,
        downloads: std::path::PathBuf,
    ) -> Sim {
        let stage = match &net {
            None => Stage::start().await,
            Some(net) => Stage::builder().network(net).log().start().await,
        }
        .expect("a stage");
        let mut config = Configuration::builder();
        if let Some(net) = &net {
            config = config.transport(net.clone());
        }
        let config = config
            .download_dir(&downloads)
            .max_connections_per_host(per_host.map_or(usize::MAX, |l| l as usize))
            .max_idle_per_host(usize::MAX)
            .max_redirects(MAX_REDIRECTS)
            .url_cache(Some(suite_cache()))
            .build()
            .expect("a valid configuration");
        let ear = Arc::new(Ear {
            simulated: net.is_some(),
            ..Ear::default()
        });
        let mut builder = Session::builder().configuration(config);
        let mut delegate = None;
        match kind {
            SessionKind::Plain => {}
            SessionKind::Shared => builder = builder.ignore_invalidation(),
            SessionKind::Delegated => {
                let listener = Arc::new(Listener {
                    session: id,
                    ear: ear.clone(),
                    checkpoints: net
                        .is_some()
                        .then(|| (checkpoints.clone(), downloads.clone())),
                });
                delegate = Some(Arc::downgrade(&listener));
                builder = builder.delegate(listener);
                if net.is_some() {
                    let ear = ear.clone();
                    builder = builder.deliver_on_runtime(move || ear.clone().returned());
                }
            }
        }
        let session = builder.build();
        let prefix = format!("{}-", session.name());
        ear.prefix.set(prefix.clone()).expect("set once");
        if net.is_some() && kind != SessionKind::Shared {
            // R4 and R3 at their moment: as invalidated() resolves, the session holds no
            // socket and no file, and its delegate is gone.
            let observer = session.observer();
            let tally = stage.tally().expect("a stage on the network");
            let delegate = delegate.clone();
            let checkpoints = checkpoints.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                observer.invalidated().await;
                let open = tally.client_ends_alive();
                if open > 0 {
                    let detail = format!("{open} sockets open as invalidated() resolves");
                    checkpoints.broken(Rule::R4, detail);
                }
                let files = files_of(&prefix, &witness::files_in(&downloads).unwrap_or_default());
                if !files.is_empty() {
                    let detail = format!("files {files:?} exist as invalidated() resolves");
                    checkpoints.broken(Rule::R4, detail);
                }
                if delegate.is_some_and(|d| d.upgrade().is_some()) {
                    let detail = "the delegate is held as invalidated() resolves".to_owned();
                    checkpoints.broken(Rule::R3, detail);
                }
            });
        }
        Sim {
            kind,
            net,
            checkpoints,
            observer: session.observer(),
            session: Some(session),
            stage,
            prefix,
            delegate,
            ear,
            reported: 0,
            awaited: Arc::default(),
            reported_awaited: 0,
            tasks: BTreeMap::new(),
        }
    }

    /// Start a convenience as a user does: poll its future once here (it creates and starts
    /// its task, or is refused), then spawn it, holding a clone of the session as a spawned
    /// future must. What it returns is recorded as it returns; a finished download's file is
    /// dropped (so removed) first, and the future's clone of the session with it.
    fn convenience(
        &mut self,
        task: TaskId,
        kind: TaskKind,
        path: &str,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), Error> {
        use std::future::Future;
        let user = self.session.clone().expect("the user holds the session");
        let url = self.stage.url(path);
        let mut future = Box::pin(async move {
            let get = http::Request::get(url.clone()).body(()).unwrap();
            let result = match kind {
                TaskKind::Data => user.data(get).await.map(drop),
                TaskKind::Download => user.download(get).await.map(drop),
                TaskKind::Upload => {
                    let post = http::Request::post(url).body(()).unwrap();
                    let body = UploadBody::Bytes(Bytes::from(vec![b'u'; UPLOAD]));
                    user.upload(post, body).await.map(drop)
                }
                TaskKind::Stream | TaskKind::WebSocket => unreachable!("no {kind:?} convenience"),
            };
            drop(user);
            result
        });
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let first = future.as_mut().poll(&mut cx);
        if let std::task::Poll::Ready(Err(error)) = first {
            return Err(error);
        }
        // Task ids count from 0 in creation order; this one was created by that poll.
        let client = leakproof::TaskId(self.tasks.len() as u64);
        let returned = self.awaited.clone();
        let spawned = match first {
            // A fast server (and the cache) can answer within the first poll: the future is
            // gone as the poll returns (a finished task stands for it).
            std::task::Poll::Ready(result) => {
                returned
                    .lock()
                    .unwrap()
                    .push((task, model_outcome(&result)));
                Some(runtime.spawn(async {}))
            }
            std::task::Poll::Pending => {
                assert_eq!(
                    self.observer.task_state(client),
                    leakproof::TaskState::Running,
                    "{task}: a convenience runs from its first poll"
                );
                let (observer, checkpoints) = (self.observer.clone(), self.checkpoints.clone());
                Some(runtime.spawn(async move {
                    let result = future.await;
                    // R5 at its moment: the future returns once its task is over.
                    let state = observer.task_state(client);
                    if state != leakproof::TaskState::Completed {
                        let detail = format!("{task} is {state:?} as its future returns");
                        checkpoints.broken(Rule::R5, detail);
                    }
                    returned
                        .lock()
                        .unwrap()
                        .push((task, model_outcome(&result)));
                }))
            }
        };
        self.ear.ids.lock().unwrap().insert(client, task);
        self.tasks.insert(
            task,
            SimTask {
                client,
                kind,
                handle: None,
                future: spawned,
                held: None,
                raw: None,
                ws: None,
                write_shut: false,
                resumed: true,
                socket: None,
                server_closed: false,
                hops: 0,
            },
        );
        Ok(())
    }

    fn create_task(
        &mut self,
        task: TaskId,
        kind: TaskKind,
        raw: Option<std::net::SocketAddr>,
    ) -> Result<(), Error> {
        let handle = self.make_task(task, kind, raw)?;
        self.adopt(task, kind, handle);
        Ok(())
    }

    /// Make a task object of `kind`, as `task`, against this session's stage.
    fn make_task(
        &self,
        task: TaskId,
        kind: TaskKind,
        raw: Option<std::net::SocketAddr>,
    ) -> Result<AnyTask, Error> {
        let session = self.session.as_ref().expect("the user holds the session");
        let url = self.stage.url(&format!("/hold/{task}"));
        let get = || http::Request::get(url.clone()).body(()).unwrap();
        let handle = match kind {
            TaskKind::Data => AnyTask::Data(session.data_task(get())?),
            TaskKind::Download => AnyTask::Download(session.download_task(get())?),
            TaskKind::Upload => AnyTask::Upload(session.upload_task(
                http::Request::post(url.clone()).body(()).unwrap(),
                UploadBody::Bytes(Bytes::from(vec![b'u'; UPLOAD])),
            )?),
            TaskKind::Stream => {
                let addr = raw.expect("a stream's listener");
                AnyTask::Stream(session.stream_task("127.0.0.1", addr.port())?)
            }
            TaskKind::WebSocket => {
                let url = self.stage.ws_url(&format!("/hold/{task}"));
                AnyTask::WebSocket(session.websocket_task(url.as_str(), &[])?)
            }
        };
        Ok(handle)
    }

    /// Keep a task object the user made, and its name for the delegate.
    fn adopt(&mut self, task: TaskId, kind: TaskKind, handle: AnyTask) {
        let client = handle.id();
        self.ear.ids.lock().unwrap().insert(client, task);
        self.tasks.insert(
            task,
            SimTask {
                client,
                kind,
                handle: Some(handle),
                future: None,
                held: None,
                raw: None,
                ws: None,
                write_shut: false,
                resumed: false,
                socket: None,
                server_closed: false,
                hops: 0,
            },
        );
    }

    /// `files`: the world's download directory, if it could be read.
    fn view(&self, heard: Vec<Callback>, files: Option<&[std::path::PathBuf]>) -> SessionView {
        let ledger = self.observer.resources();
        let delegated = self.kind == SessionKind::Delegated;
        let completed = heard
            .iter()
            .filter(|c| matches!(c, Callback::Complete { .. }))
            .count();
        // A convenience is live until its future is gone: returned, or dropped by the runtime
        // after an abort. No delegate hears it.
        let conveniences = self.tasks.values().filter(|t| t.future.is_some());
        let (futures, futures_live) = conveniences.fold((0, 0), |(n, live), t| {
            let finished = t.future.as_ref().is_some_and(|f| f.is_finished());
            (n + 1, live + usize::from(!finished))
        });
        let files = files.map_or(u32::MAX, |f| files_of(&self.prefix, f).len() as u32);
        // A connection the server broke is dead at once, and may be closed at once (hyper drops
        // a socket that sent garbage); the client holds its dead end until the task reads the
        // failure (R7), so a closed socket still counts for a live task. In a simulation the
        // network tells whether the client dropped that end (if not, the count below has it).
        let closed_by_server_but_held = self
            .tasks
            .values()
            .filter(|t| {
                (t.server_closed || t.write_shut)
                    && t.socket
                        .as_ref()
                        .is_some_and(|s| !s.is_open() && s.client_dropped().unwrap_or(true))
                    && self.observer.task_state(t.client) != leakproof::TaskState::Completed
            })
            .count();
        let sockets = match &self.net {
            None => self.stage.open() as usize,
            // The network's own count of the ends the client holds open: exact.
            Some(_) => self
                .stage
                .client_ends_open()
                .map_or(usize::MAX, |n| n as usize),
        } + closed_by_server_but_held;
        let sockets = sockets as u32;
        SessionView {
            state: model_session_state(self.observer.state()),
            ledger: model_resources(&ledger),
            pending: ledger.pending_actions + ledger.pending_callbacks,
            witness: Resources {
                // The stage sees sockets, busy or idle alike: the ledger splits them.
                open_connections: sockets.saturating_sub(ledger.idle_connections),
                idle_connections: ledger.idle_connections.min(sockets),
                buffered_bytes: ledger.buffered_bytes,
                // Completions are witnessed by what the delegate heard, while it keeps up.
                live_tasks: if delegated && !*self.ear.slow.lock().unwrap() {
                    (self.tasks.len() - futures - completed + futures_live) as u32
                } else {
                    ledger.live_tasks
                },
                // Counted where the timers live (the driver's queue, a convenience's clock),
                // not where the engine decides them.
                timers: self.observer.clock_timers(),
                temp_files: files,
                delegate_held: self
                    .delegate
                    .as_ref()
                    .is_some_and(|w| w.upgrade().is_some()),
                // The ledger's word: the stage's request count shows only that a hit sent
                // nothing (the connection counts above).
                cached_responses: ledger.cached_responses,
            },
            heard,
        }
    }
}

/// The files among `files` whose names start with `prefix`: one session's.
fn files_of(prefix: &str, files: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    files
        .iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .cloned()
        .collect()
}

/// The model's refusal for an error a stream or websocket op returned.
fn refusal(error: &Error) -> Refusal {
    match error {
        Error::ReadClosed => Refusal::ReadClosed,
        Error::WriteClosed => Refusal::WriteClosed,
        _ => Refusal::Closed,
    }
}

/// The stage's key for a task's request: `t3` first, `t3.1` after one redirect, and so on.
fn hold_key(task: TaskId, hops: u32) -> String {
    match hops {
        0 => task.to_string(),
        hops => format!("{task}.{hops}"),
    }
}

/// The stage's cacheable resource `resource`: [`CACHED_BODY`] bytes, `max-age` 60 s (and one
/// more second per resource, which tells their URLs apart).
fn cacheable(resource: ResourceId) -> String {
    format!(
        "/bytes/{CACHED_BODY}?max_age={}",
        60 + u32::from(resource.0)
    )
}

/// The suite's sessions' response cache: room for [`CACHE_ENTRIES`] cacheable responses
/// (each [`CACHED_BODY`] bytes and a few hundred of headers), not one more.
fn suite_cache() -> UrlCache {
    let room = (CACHE_ENTRIES as u64 + 1) * CACHED_BODY;
    UrlCache::memory(room as usize).max_entry(2 * CACHED_BODY as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(heap: isize, buffered: u64, connections: u32, dialled: u64) -> BytesHeld {
        BytesHeld {
            heap,
            buffered,
            connections,
            dialled,
        }
    }

    #[test]
    fn released_bytes_the_heap_still_holds_break_r6() {
        let before = held(500_000, 49_152, 2, 3);
        // The connection's buffers went, the window's bytes did not.
        let broken = before.released(&held(478_000, 0, 1, 3)).expect("broken");
        assert_eq!(broken.rule, Rule::R6);
        assert!(broken.detail.contains("49152"), "{}", broken.detail);
        // Both went.
        assert!(before.released(&held(430_000, 0, 1, 3)).is_none());
    }

    #[test]
    fn only_a_closing_op_that_releases_enough_is_judged() {
        let before = held(500_000, 49_152, 2, 3);
        // No connection closed: a stream's buffer stays at its window's capacity.
        assert!(before.released(&held(500_000, 0, 2, 3)).is_none());
        // A connection dialled in the same op: its buffers hide the release.
        assert!(before.released(&held(500_000, 0, 1, 4)).is_none());
        // Too little released to tell from the harness's own allocations.
        let small = held(500_000, 8_000, 2, 3);
        assert!(small.released(&held(500_000, 0, 1, 3)).is_none());
    }
}
