//! The engine's races, explored by loom. Each test races two inputs, then drives the session
//! to release and checks R1 and R2 on the delivered trace, R3 with a `Weak` to the delegate,
//! a zero ledger, and the driver's own account of connections and timers.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p leakproof-core --release --test loom`
#![cfg(loom)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use leakproof_core::{
    Action, Answer, Callback, Config, ConnId, Core, Delivered, Delivery, Disposition, Error,
    Message, Outgoing, Release, Route, SessionHandle, TaskHandle, TaskId, TaskKind, Timeout,
    TimerId,
};
use leakproof_model as model;
use loom::thread;

type Delegate = Arc<()>;

/// `loom::model`, printing how many interleavings it explored and how long that took.
fn explore(name: &str, race: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let started = Instant::now();
    loom::model(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        race();
    });
    println!(
        "loom: {name}: {} interleavings in {:.2?}",
        runs.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// What the delegate heard, in the model's words, so the model's rule checks apply.
fn shape(callback: &Callback) -> model::Callback {
    let task = |t: &TaskId| model::TaskId(t.0 as u32);
    match callback {
        // No race here has a redirect (the model has none): its head would be a response's.
        Callback::ReceiveResponse { task: t, .. } | Callback::WillRedirect { task: t, .. } => {
            model::Callback::ReceiveResponse { task: task(t) }
        }
        Callback::ReceiveData { task: t, data } => model::Callback::ReceiveData {
            task: task(t),
            bytes: data.len() as u64,
        },
        Callback::BecomeDownload { task: t } => model::Callback::BecomeDownload { task: task(t) },
        Callback::FinishDownloading { task: t, .. } => {
            model::Callback::FinishDownloading { task: task(t) }
        }
        Callback::BecomeStream { task: t, .. } => model::Callback::BecomeStream { task: task(t) },
        Callback::Open { task: t, .. } => model::Callback::Open { task: task(t) },
        Callback::Close { task: t, .. } => model::Callback::Close { task: task(t) },
        Callback::Complete { task: t, result } => model::Callback::Complete {
            task: task(t),
            outcome: if result.is_ok() {
                model::Outcome::Success
            } else {
                model::Outcome::Cancelled
            },
        },
        Callback::BecomeInvalid => model::Callback::BecomeInvalid {
            session: model::SessionId(0),
        },
    }
}

/// Deliver until nothing is queued now; `Done` ends it.
fn deliver_now(delivery: &mut Delivery<Delegate>, trace: &mut Vec<model::Callback>) {
    let mut hear = |_: &Delegate, callback: Callback| {
        trace.push(shape(&callback));
        None
    };
    while delivery.try_deliver(&mut hear) == Some(Delivered::One) {}
}

/// Deliver, blocking on the engine's waker, until the delegate is released.
fn deliver_to_the_end(mut delivery: Delivery<Delegate>) -> Vec<model::Callback> {
    let mut trace = Vec::new();
    loom::future::block_on(poll_fn(|cx| {
        loop {
            let step = delivery.poll_deliver(cx, |_, callback| {
                trace.push(shape(&callback));
                None
            });
            match step {
                std::task::Poll::Ready(Delivered::One) => continue,
                other => return other.map(|_| ()),
            }
        }
    }));
    trace
}

/// The driver's own account: which connections are open or pooled and which timers are
/// armed, kept from the actions alone. It also checks their order makes sense.
#[derive(Default)]
struct Driver {
    conn_of: BTreeMap<TaskId, ConnId>,
    open: BTreeSet<ConnId>,
    idle: BTreeSet<ConnId>,
    timers: BTreeSet<(TaskId, u8)>,
    /// The armed timers' ids, so a test can fire one.
    armed: Vec<TimerId>,
    aborted: BTreeSet<TaskId>,
}

impl Driver {
    /// Carry out every action there is now.
    fn run(&mut self, core: &Core) {
        while let Some(action) = core.try_action() {
            self.carry_out(action);
        }
    }

    /// Carry out actions as they come, blocking on the engine's waker, until the session is
    /// released: the driver's loop. The delivery waits for it (a `did_complete` until the
    /// actions queued before it are carried out), so it must run while the delivery does.
    fn run_to_release(&mut self, core: &Core) {
        loom::future::block_on(poll_fn(|cx| {
            loop {
                match core.poll_action(cx) {
                    std::task::Poll::Ready(Some(action)) => self.carry_out(action),
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        }));
    }

    fn carry_out(&mut self, action: Action) {
        {
            match action {
                Action::Start { task, conn, reused } => {
                    assert!(
                        !self.aborted.contains(&task),
                        "Start after Abort for {task:?}"
                    );
                    if reused {
                        assert!(self.idle.remove(&conn), "reused {conn:?} was not idle");
                    }
                    self.open.insert(conn);
                    self.conn_of.insert(task, conn);
                }
                Action::Abort { task, conn } => {
                    self.aborted.insert(task);
                    if let Some(conn) = conn {
                        // Held by the IO, or parked by it for body_end.
                        let _ = self.open.remove(&conn) || self.idle.remove(&conn);
                    }
                }
                Action::ReadBody { task, .. }
                | Action::ReadStream { task }
                | Action::Unpause { task } => {
                    assert!(!self.aborted.contains(&task), "{task:?} read after Abort");
                }
                Action::Close { conn } => assert!(self.idle.remove(&conn), "closed non-idle"),
                Action::ArmTimer { timer, .. } => {
                    self.timers.insert((timer.task, timer.timeout as u8));
                    self.armed.push(timer);
                }
                Action::DisarmTimer { timer } => {
                    self.timers.remove(&(timer.task, timer.timeout as u8));
                }
                Action::Pause { .. } | Action::RemoveTempFile { .. } => {}
            }
        }
    }

    /// The task's IO read its body to the end: it parks its connection with the idle ones,
    /// as `Core::body_end` requires, before asking the engine.
    fn park(&mut self, task: TaskId) {
        let conn = self.conn_of[&task];
        if self.open.remove(&conn) {
            self.idle.insert(conn);
        }
    }

    /// ... and takes it back out to close it if the engine says so.
    fn io_ended(&mut self, task: TaskId, release: Release) {
        if release == Release::Close {
            self.idle.remove(&self.conn_of[&task]);
        }
    }

    fn holds_nothing(&self) -> bool {
        self.open.is_empty() && self.idle.is_empty() && self.timers.is_empty()
    }
}

struct World {
    session: SessionHandle,
    core: Core,
    delivery: Option<Delivery<Delegate>>,
    delegate: Weak<()>,
    driver: Driver,
    trace: Vec<model::Callback>,
}

fn world() -> World {
    world_with(Config::default())
}

fn world_with(config: Config) -> World {
    let delegate = Arc::new(());
    let weak = Arc::downgrade(&delegate);
    let (session, core, delivery) = leakproof_core::session(config, Some(delegate));
    World {
        session,
        core,
        delivery: Some(delivery),
        delegate: weak,
        driver: Driver::default(),
        trace: Vec::new(),
    }
}

type Deliverer = thread::JoinHandle<Vec<model::Callback>>;

impl World {
    /// A resumed task whose response was allowed: its body is being read.
    fn reading_task(&mut self) -> TaskHandle {
        let task = self
            .session
            .create_task(TaskKind::Data, "origin", Route::Delegate)
            .unwrap();
        task.resume();
        let _ = self.core.response(task.id(), http::Response::new(()));
        self.driver.run(&self.core);
        let delivery = self.delivery.as_mut().unwrap();
        deliver_now(delivery, &mut self.trace);
        self.driver.run(&self.core);
        task
    }

    /// From here on the delegate is called on a thread of its own, racing everything else.
    fn deliver_in_background(&mut self) -> Deliverer {
        let delivery = self.delivery.take().unwrap();
        thread::spawn(move || deliver_to_the_end(delivery))
    }

    /// Drop every user handle, let the session finish, and check every rule on the way out.
    fn finish(self, deliverer: Deliverer, tasks: Vec<TaskHandle>) -> Vec<model::Callback> {
        let World {
            session,
            core,
            delegate,
            mut driver,
            mut trace,
            ..
        } = self;
        drop(tasks);
        drop(session);
        driver.run_to_release(&core);
        trace.extend(deliverer.join().unwrap());
        assert_released(&core, &delegate, &driver, &trace);
        trace
    }
}

fn assert_released(core: &Core, delegate: &Weak<()>, driver: &Driver, trace: &[model::Callback]) {
    // R1 (one did_complete per task, nothing after) and R2 (did_become_invalid last, once).
    model::rules::check_trace(trace, true).unwrap_or_else(|v| panic!("{v}: {trace:?}"));
    assert!(
        delegate.upgrade().is_none(),
        "R3: the delegate outlived did_become_invalid"
    );
    assert!(core.is_released(), "not released: {core:?}");
    assert!(core.ledger().is_zero(), "R4: {:?}", core.ledger());
    assert_eq!(core.kept_results(), 0, "R5: a result kept with no handle");
    assert!(
        driver.holds_nothing(),
        "R4: the driver still holds something"
    );
}

#[test]
fn cancel_vs_completion() {
    explore("cancel_vs_completion", || {
        let mut w = world();
        let task = w.reading_task();
        let id = task.id();
        let deliverer = w.deliver_in_background();
        let canceller = thread::spawn(move || {
            task.cancel();
            task
        });
        w.driver.park(id);
        let release = w.core.body_end(id, true);
        let task = canceller.join().unwrap();
        w.driver.io_ended(id, release);
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn a_result_awaited_vs_cancel_vs_completion() {
    explore("a_result_awaited_vs_cancel_vs_completion", || {
        let mut w = world();
        let task = Arc::new(w.reading_task());
        let id = task.id();
        let deliverer = w.deliver_in_background();
        // The user awaits the result while the task is cancelled and its IO completes it: the
        // waiter must be woken whichever wins, with the result did_complete gets.
        let user = task.clone();
        let waiter = thread::spawn(move || wait(|cx| user.poll_result(cx)));
        let canceller = task.clone();
        let canceller = thread::spawn(move || canceller.cancel());
        w.driver.park(id);
        let release = w.core.body_end(id, true);
        canceller.join().unwrap();
        w.driver.io_ended(id, release);
        let result = waiter.join().unwrap();
        // Asked again once completed: the same, at once.
        let again = wait(|cx| task.poll_result(cx));
        assert_eq!(result.is_ok(), again.is_ok());
        let task = Arc::into_inner(task).unwrap();
        let trace = w.finish(deliverer, vec![task]);
        let completed = trace.iter().find_map(|callback| match callback {
            model::Callback::Complete { outcome, .. } => Some(*outcome),
            _ => None,
        });
        let expected = if result.is_ok() {
            model::Outcome::Success
        } else {
            model::Outcome::Cancelled
        };
        assert_eq!(completed, Some(expected), "{result:?} vs {trace:?}");
    });
}

#[test]
fn two_concurrent_cancels() {
    explore("two_concurrent_cancels", || {
        let mut w = world();
        let task = Arc::new(w.reading_task());
        let deliverer = w.deliver_in_background();
        let other = task.clone();
        let canceller = thread::spawn(move || other.cancel());
        task.cancel();
        canceller.join().unwrap();
        let task = Arc::into_inner(task).unwrap();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn resume_vs_invalidate_and_cancel() {
    explore("resume_vs_invalidate_and_cancel", || {
        let mut w = world();
        let task = w
            .session
            .create_task(TaskKind::Upload, "origin", Route::Delegate)
            .unwrap();
        let deliverer = w.deliver_in_background();
        let resumer = thread::spawn(move || {
            task.resume();
            task
        });
        w.session.invalidate_and_cancel();
        let task = resumer.join().unwrap();
        // The driver checks that no Start or read comes after the Abort.
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn finish_tasks_and_invalidate_vs_the_last_task_completing() {
    explore(
        "finish_tasks_and_invalidate_vs_the_last_task_completing",
        || {
            let mut w = world();
            let task = w.reading_task();
            let id = task.id();
            let deliverer = w.deliver_in_background();
            let session = std::mem::replace(&mut w.session, dummy_session());
            let finisher = thread::spawn(move || {
                session.finish_tasks_and_invalidate();
                session
            });
            w.driver.park(id);
            let release = w.core.body_end(id, true);
            drop(std::mem::replace(&mut w.session, finisher.join().unwrap()));
            w.driver.io_ended(id, release);
            w.finish(deliverer, vec![task]);
        },
    );
}

#[test]
fn last_session_handle_dropped_vs_delivery() {
    explore("last_session_handle_dropped_vs_delivery", || {
        let mut w = world();
        let task = w.reading_task();
        w.driver.park(task.id());
        let release = w.core.body_end(task.id(), true); // did_complete queued, not delivered
        w.driver.io_ended(task.id(), release);
        let deliverer = w.deliver_in_background();
        // `finish` drops the last handles while the delegate hears did_complete.
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn task_handle_dropped_vs_session_finishing() {
    explore("task_handle_dropped_vs_session_finishing", || {
        let mut w = world();
        let task = w
            .session
            .create_task(TaskKind::Download, "origin", Route::Delegate)
            .unwrap();
        let deliverer = w.deliver_in_background();
        let dropper = thread::spawn(move || drop(task));
        w.session.finish_tasks_and_invalidate();
        dropper.join().unwrap();
        // R10: the suspended, unreachable task was cancelled, so the session is invalidated.
        assert_eq!(w.core.state(), leakproof_core::SessionState::Invalidated);
        w.finish(deliverer, vec![]);
    });
}

#[test]
fn disposition_vs_cancel() {
    explore("disposition_vs_cancel", || {
        let mut w = world();
        let task = w
            .session
            .create_task(TaskKind::Data, "origin", Route::Delegate)
            .unwrap();
        task.resume();
        let _ = w.core.response(task.id(), http::Response::new(()));
        w.driver.run(&w.core);
        // The delegate answers Allow while the user cancels; the driver checks that no
        // ReadBody comes after the Abort, whichever wins.
        let deliverer = w.deliver_in_background();
        task.cancel();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn a_released_connection_vs_cancelling_the_task_waiting_for_it() {
    explore(
        "a_released_connection_vs_cancelling_the_task_waiting_for_it",
        || {
            let mut w = world_with(Config {
                max_connections_per_origin: 1,
                ..Config::default()
            });
            let busy = w.reading_task();
            let waiting = w
                .session
                .create_task(TaskKind::Data, "origin", Route::Delegate)
                .unwrap();
            waiting.resume(); // the origin is at its limit: it waits
            let deliverer = w.deliver_in_background();
            let canceller = thread::spawn(move || {
                waiting.cancel();
                waiting
            });
            w.driver.park(busy.id());
            let release = w.core.body_end(busy.id(), true);
            let waiting = canceller.join().unwrap();
            w.driver.io_ended(busy.id(), release);
            // Whichever won, the connection went to the waiting task (then was aborted with it)
            // or stayed pooled: the driver checks each step, `finish` that nothing is left.
            w.finish(deliverer, vec![busy, waiting]);
        },
    );
}

#[test]
fn delivered_bytes_vs_the_io_waiting_for_room_vs_cancel() {
    explore(
        "delivered_bytes_vs_the_io_waiting_for_room_vs_cancel",
        || {
            let mut w = world_with(Config {
                delegate_ahead: 4,
                ..Config::default()
            });
            let task = w.reading_task();
            let id = task.id();
            // The delegate is a window behind: the IO may read nothing more (R6), and the
            // request timeout, the network's idle time, is not armed meanwhile.
            w.core.body_data(id, Bytes::from_static(b"leak"));
            assert_eq!(w.core.try_body_room(id), Some(0));
            w.driver.run(&w.core);
            assert!(!w.driver.timers.contains(&(id, Timeout::Request as u8)));
            // The delegate acknowledges on its thread; the IO waits for room and reports what
            // fits; the user cancels.
            let deliverer = w.deliver_in_background();
            let core = w.core.clone();
            let io = thread::spawn(move || {
                let mut rest = Bytes::from_static(b"proof");
                while !rest.is_empty() {
                    match wait(|cx| core.poll_body_room(id, cx)) {
                        Some(room) => core.body_data(id, rest.split_to(room.min(rest.len()))),
                        None => return false, // the task is over: the IO stops
                    }
                }
                true
            });
            task.cancel();
            let _read_all = io.join().unwrap();
            assert_eq!(w.core.try_body_room(id), None);
            let ledger = w.core.ledger();
            assert!(
                ledger.peak_buffered_bytes <= 4,
                "R6: more than the window was queued: {ledger:?}"
            );
            // R5: what the delegate was not handed went with the task.
            assert_eq!(ledger.buffered_bytes, 0, "{ledger:?}");
            w.finish(deliverer, vec![task]);
        },
    );
}

/// A stand-in handle, so a test can move the real one into a thread and back.
fn dummy_session() -> SessionHandle {
    leakproof_core::session::<Delegate>(Config::default(), None).0
}

// ---- streams and websockets ----

/// A resumed stream task, connected: its IO may read and write.
fn open_stream(w: &mut World) -> TaskHandle {
    let task = w
        .session
        .create_task(TaskKind::Stream, "origin", Route::Delegate)
        .unwrap();
    task.resume();
    w.driver.run(&w.core);
    task
}

/// A resumed websocket task whose upgrade was accepted.
fn open_websocket(w: &mut World) -> TaskHandle {
    let task = w
        .session
        .create_task(TaskKind::WebSocket, "origin", Route::Delegate)
        .unwrap();
    task.resume();
    w.core.ws_opened(task.id(), None);
    w.driver.run(&w.core);
    deliver_now(w.delivery.as_mut().unwrap(), &mut w.trace);
    task
}

/// Block on a user op until it is ready: loom reports a deadlock if nothing ever wakes it.
fn wait<T>(mut poll: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<T>) -> T {
    loom::future::block_on(poll_fn(|cx| poll(cx)))
}

#[test]
fn read_vs_cancel() {
    explore("read_vs_cancel", || {
        let mut w = world_with(Config {
            read_ahead: 4,
            ..Config::default()
        });
        let task = Arc::new(open_stream(&mut w));
        let id = task.id();
        // The IO filled the window; more waits in the socket (R6).
        assert_eq!(w.core.stream_data(id, b"leakproof"), 4);
        let deliverer = w.deliver_in_background();
        let user = task.clone();
        // The user reads until the stream fails: a read blocked on an empty window must be
        // woken by the cancel, not left hanging.
        let reader = thread::spawn(move || {
            let mut read = 0;
            loop {
                match wait(|cx| user.poll_read(cx, 1, 3)) {
                    Ok(Some(bytes)) => read += bytes.len(),
                    Ok(None) => panic!("no end was sent"),
                    Err(error) => return (read, error),
                }
            }
        });
        task.cancel();
        let (read, error) = reader.join().unwrap();
        assert!(read <= 4, "read {read} bytes, past the window");
        assert!(matches!(error, Error::Cancelled), "{error}");
        // The bytes the stream held went with it.
        assert_eq!(w.core.stream_data(id, b"more"), 0);
        let task = Arc::into_inner(task).unwrap();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn write_vs_close_write() {
    explore("write_vs_close_write", || {
        let mut w = world();
        let task = Arc::new(open_stream(&mut w));
        let id = task.id();
        let deliverer = w.deliver_in_background();
        let user = task.clone();
        let writer = thread::spawn(move || wait(|cx| user.poll_write(cx, b"xyz")));
        task.close_write();
        let written = writer.join().unwrap();
        // The IO takes what was queued: the write's bytes before the end, or the write
        // refused, never bytes after the end.
        let mut wire = Vec::new();
        while let Some(item) = w.core.try_outgoing(id) {
            wire.push(item);
            w.core.sent(id);
        }
        match written {
            Ok(3) => assert_eq!(
                wire,
                [
                    Outgoing::Bytes(bytes::Bytes::from_static(b"xyz")),
                    Outgoing::Shutdown
                ]
            ),
            Err(Error::WriteClosed) => assert_eq!(wire, [Outgoing::Shutdown]),
            other => panic!("write returned {other:?}"),
        }
        // Both halves closed: the stream completes.
        task.close_read();
        assert_eq!(task.state(), leakproof_core::TaskState::Completed);
        let task = Arc::into_inner(task).unwrap();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn our_close_vs_the_peers_close() {
    explore("our_close_vs_the_peers_close", || {
        let mut w = world();
        let task = Arc::new(open_websocket(&mut w));
        let id = task.id();
        let deliverer = w.deliver_in_background();
        let user = task.clone();
        let closer = thread::spawn(move || user.cancel_with(1000, "done"));
        // The IO read the peer's close frame (and answered it, had it come first).
        w.core.ws_peer_closed(id, Some(1001), "away".into());
        closer.join().unwrap();
        // Whichever came first, the handshake is complete: the peer's frame is the record.
        assert_eq!(task.close_frame(), Some((1001, "away".into())));
        assert_eq!(task.state(), leakproof_core::TaskState::Completed);
        let task = Arc::into_inner(task).unwrap();
        let trace_before = w.trace.clone();
        w.finish(deliverer, vec![task]);
        assert!(trace_before.len() == 1, "only did_open before the race");
    });
}

#[test]
fn the_close_deadline_vs_a_late_close_frame() {
    explore("the_close_deadline_vs_a_late_close_frame", || {
        let mut w = world();
        let task = open_websocket(&mut w);
        let id = task.id();
        task.cancel_with(1001, "");
        w.driver.run(&w.core);
        let deadline = *w
            .driver
            .armed
            .iter()
            .rfind(|t| t.task == id && t.timeout == Timeout::Close)
            .expect("R11: our close arms the close deadline");
        let deliverer = w.deliver_in_background();
        let core = w.core.clone();
        // The clock fires the deadline while the IO reads the peer's late answer.
        let clock = thread::spawn(move || core.timer_fired(deadline));
        w.core.ws_peer_closed(id, Some(1001), String::new());
        clock.join().unwrap();
        // Exactly one ending (the driver checks one Abort and no timer left); the socket is
        // closed either way.
        assert_eq!(task.state(), leakproof_core::TaskState::Completed);
        let ended = wait(|cx| task.poll_receive(cx));
        assert!(
            matches!(
                ended,
                Err(Error::TimedOut(Timeout::Close)) | Err(Error::Closed(TaskKind::WebSocket))
            ),
            "{ended:?}"
        );
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn receive_vs_the_peers_message_and_close() {
    explore("receive_vs_the_peers_message_and_close", || {
        let mut w = world();
        let task = Arc::new(open_websocket(&mut w));
        let id = task.id();
        let deliverer = w.deliver_in_background();
        let user = task.clone();
        let receiver = thread::spawn(move || wait(|cx| user.poll_receive(cx)));
        w.core.ws_message(id, Message::Text("hi".into()));
        // The message is the receiver's or goes with the task; the receiver never hangs.
        w.core.ws_peer_closed(id, Some(1000), String::new());
        match receiver.join().unwrap() {
            Ok(Message::Text(text)) => assert_eq!(text, "hi"),
            Ok(other) => panic!("got {other:?}"),
            Err(error) => assert!(
                matches!(error, Error::Closed(TaskKind::WebSocket)),
                "{error}"
            ),
        }
        let task = Arc::into_inner(task).unwrap();
        w.finish(deliverer, vec![task]);
    });
}

// ---- promises at their moment ----

/// `did_complete` waits until the driver has carried out what the engine queued before it:
/// the abort that closes the task's socket (R5 holds when the delegate hears it). The driver
/// here flags the socket closed while it carries out the abort; the delegate checks the flag.
#[test]
fn did_complete_vs_the_driver_carrying_out_the_abort() {
    use loom::sync::atomic::AtomicBool;
    use std::task::Poll;

    explore("did_complete_vs_the_driver_carrying_out_the_abort", || {
        let mut w = world();
        let task = w.reading_task();
        let closed = Arc::new(AtomicBool::new(false));
        let mut delivery = w.delivery.take().unwrap();
        let seen = closed.clone();
        let deliverer = thread::spawn(move || {
            let mut trace = Vec::new();
            loom::future::block_on(poll_fn(|cx| {
                loop {
                    let step = delivery.poll_deliver(cx, |_, callback| {
                        if matches!(callback, Callback::Complete { .. }) {
                            assert!(
                                seen.load(Ordering::SeqCst),
                                "R5: did_complete came before the abort closed the socket"
                            );
                        }
                        trace.push(shape(&callback));
                        None
                    });
                    match step {
                        Poll::Ready(Delivered::One) => continue,
                        other => return other.map(|_| ()),
                    }
                }
            }));
            trace
        });
        let core = w.core.clone();
        let driver = thread::spawn(move || {
            loom::future::block_on(poll_fn(|cx| {
                loop {
                    match core.poll_action(cx) {
                        Poll::Ready(Some(Action::Abort { .. })) => {
                            closed.store(true, Ordering::SeqCst);
                        }
                        Poll::Ready(Some(_)) => {}
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }));
        });
        task.cancel();
        drop(task);
        drop(w.session);
        driver.join().unwrap();
        let mut trace = w.trace;
        trace.extend(deliverer.join().unwrap());
        model::rules::check_trace(&trace, true).unwrap_or_else(|v| panic!("{v}: {trace:?}"));
        assert!(w.delegate.upgrade().is_none(), "R3");
        assert!(w.core.is_released());
    });
}

/// A resumed task whose response head arrived; its `ReceiveResponse` is queued.
fn asking_task(w: &mut World) -> TaskHandle {
    let task = w
        .session
        .create_task(TaskKind::Data, "origin", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = w.core.response(task.id(), http::Response::new(()));
    w.driver.run(&w.core);
    task
}

/// Deliver what is queued now, the delegate answering every response later.
fn deliver_answering_later(w: &mut World) {
    let trace = &mut w.trace;
    let mut later = |_: &Delegate, callback: Callback| {
        trace.push(shape(&callback));
        match callback {
            Callback::ReceiveResponse { .. } => Answer::Later,
            _ => Answer::Default,
        }
    };
    let delivery = w.delivery.as_mut().unwrap();
    while delivery.try_deliver(&mut later) == Some(Delivered::One) {}
}

#[test]
fn a_late_answer_vs_cancel() {
    explore("a_late_answer_vs_cancel", || {
        let mut w = world();
        let task = asking_task(&mut w);
        deliver_answering_later(&mut w);
        w.driver.run(&w.core);
        // Pending: the request timeout stopped, the resource timeout runs.
        assert_eq!(w.core.ledger().timers, 1);
        let deliverer = w.deliver_in_background();
        let (core, id) = (w.core.clone(), task.id());
        let answerer = thread::spawn(move || {
            core.answer(id, Answer::Disposition(Disposition::Allow));
        });
        // Whichever wins, one did_complete (R1), no ReadBody after the Abort (the driver
        // checks), and nothing held at the end.
        task.cancel();
        answerer.join().unwrap();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn a_late_answer_vs_the_delivery_deferring_it() {
    explore("a_late_answer_vs_the_delivery_deferring_it", || {
        let mut w = world();
        let task = asking_task(&mut w);
        // The delegate hands its responder to another thread, which may answer before the
        // callback has returned and the delivery has told the engine the answer comes later.
        let (core, id) = (w.core.clone(), task.id());
        let answerer = thread::spawn(move || {
            core.answer(id, Answer::Disposition(Disposition::Allow));
        });
        deliver_answering_later(&mut w);
        answerer.join().unwrap();
        w.driver.run(&w.core);
        // In every order the answer stands and the request timeout runs again.
        assert_eq!(w.core.ledger().timers, 2);
        assert_eq!(w.core.ledger().open_connections, 1);
        let deliverer = w.deliver_in_background();
        task.cancel();
        w.finish(deliverer, vec![task]);
    });
}

#[test]
fn a_redirect_hop_vs_invalidate_and_cancel() {
    explore("a_redirect_hop_vs_invalidate_and_cancel", || {
        let mut w = world();
        let task = w
            .session
            .create_task(TaskKind::Data, "origin", Route::Delegate)
            .unwrap();
        let id = task.id();
        task.resume();
        w.driver.run(&w.core);
        let mut redirect = http::Response::new(());
        *redirect.status_mut() = http::StatusCode::FOUND;
        let next = http::Request::get("http://origin/next").body(()).unwrap();
        w.core.redirect(id, redirect, next);
        deliver_now(w.delivery.as_mut().unwrap(), &mut w.trace); // followed, by default
        let followed = wait(|cx| w.core.poll_redirect(id, cx));
        assert!(matches!(
            followed,
            Some(leakproof_core::Redirect::Follow(_))
        ));
        let deliverer = w.deliver_in_background();
        let session = std::mem::replace(&mut w.session, dummy_session());
        let canceller = thread::spawn(move || {
            session.invalidate_and_cancel();
            session
        });
        // The IO hops: it parks the redirect's connection, asks the engine, takes the next.
        w.driver.park(id);
        let release = w.core.hop(id, "origin", true);
        w.driver.io_ended(id, release);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(Some(start)) = w.core.poll_start(id, &mut cx) {
            if start.reused {
                assert!(
                    w.driver.idle.remove(&start.conn),
                    "reused a connection not idle"
                );
            }
            w.driver.open.insert(start.conn);
            w.driver.conn_of.insert(id, start.conn);
        }
        drop(std::mem::replace(&mut w.session, canceller.join().unwrap()));
        // Whichever won, the connection the hop left is the pool's (then closed with it) or
        // the next exchange's (then aborted with the task), never both, never neither.
        w.finish(deliverer, vec![task]);
    });
}
