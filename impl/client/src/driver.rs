//! The session's driver: one tokio task that carries out the engine's actions, in order, and
//! runs the session's clock (task timers and idle expiry). It ends when the engine says the
//! session is released, so an invalidated session leaves no background future (R4).

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;

use crate::exchange::{Caller, Exchange};
use crate::pool::{Expiry, Note};
use crate::session::{Job, Shared, lock};
use crate::{Action, ConnId, TaskId, Timeout, TimerId};

/// What the driver's clock is waiting for.
#[derive(Debug)]
enum Due {
    Timer(TimerId),
    Idle(ConnId),
}

pub(crate) struct Driver {
    shared: Arc<Shared>,
    notes: mpsc::UnboundedReceiver<Note>,
    clock: DelayQueue<Due>,
    timers: HashMap<(TaskId, Timeout), (Key, TimerId)>,
    idle: HashMap<ConnId, Key>,
    idle_timeout: Duration,
    /// The tasks' IO still running, so that an abort can wait for its end.
    io: HashMap<TaskId, JoinHandle<()>>,
}

impl Drop for Driver {
    /// Ended (released), or dropped with its runtime: either way it carries out nothing more,
    /// and no callback may wait for it.
    fn drop(&mut self) {
        self.shared.core.driver_gone();
        #[cfg(feature = "test-util")]
        self.publish(0);
    }
}

impl Driver {
    pub fn new(shared: Arc<Shared>, notes: mpsc::UnboundedReceiver<Note>) -> Self {
        let idle_timeout = shared.config.idle_timeout;
        Self {
            shared,
            notes,
            clock: DelayQueue::new(),
            timers: HashMap::new(),
            idle: HashMap::new(),
            idle_timeout,
            io: HashMap::new(),
        }
    }

    /// For the suite: the task timers the clock holds (its idle entries aside).
    #[cfg(feature = "test-util")]
    fn publish(&self, timers: usize) {
        let driver = &self.shared.clocks.driver;
        driver.store(timers, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn run(mut self) {
        loop {
            #[cfg(feature = "test-util")]
            self.publish(self.clock.len().saturating_sub(self.idle.len()));
            // Biased: the same order every time, so that a run on one thread is the same
            // run again (the suite's simulated world); actions first, as the engine asks.
            tokio::select! {
                biased;
                action = poll_fn(|cx| self.shared.core.poll_action(cx)) => {
                    // With the suite's hooks, the driver lets every other task run between
                    // taking an action and carrying it out, as another thread may on a
                    // multi-thread runtime: on the simulated world's one thread, a promise
                    // made in between (a waiter woken as the last action is taken) shows.
                    #[cfg(feature = "test-util")]
                    if action.is_some() {
                        tokio::task::yield_now().await;
                    }
                    match action {
                        Some(Action::Abort { task, conn }) => {
                            self.carry_out(Action::Abort { task, conn });
                            // Its socket is closed already; a connect still in flight, or a
                            // file still open, goes with the IO's end. The abort is carried
                            // out, and the driver asks for the next action (see
                            // Core::poll_action), only then: the IO, woken by the abort, ends
                            // at once.
                            if let Some(io) = self.io.remove(&task) {
                                let _ = io.await;
                            }
                        }
                        Some(action) => self.carry_out(action),
                        None => break,
                    }
                }
                Some(due) = poll_fn(|cx| self.clock.poll_expired(cx)) => {
                    self.due(due.into_inner());
                }
                Some(note) = self.notes.recv() => self.noted(note),
            }
        }
        // Released: by the engine's account nothing is pooled; make sure of it. Every socket
        // closed, the TLS state goes too.
        self.shared.pool.close_all();
        self.shared.pool.release_tls();
        if let Some(cache) = &self.shared.cache {
            cache.release();
        }
    }

    fn carry_out(&mut self, action: Action) {
        let shared = &self.shared;
        match action {
            Action::Start { task, conn, reused } => {
                // A reused connection's idle clock stays pending: ringing, it finds the
                // connection busy (or parked again, and looks again later).
                let Some((job, control)) = shared.take_job(task) else {
                    return; // Its handle went and the engine has it cancelled already.
                };
                match job {
                    Job::Exchange { request, origin } => {
                        let exchange = Exchange {
                            shared: shared.clone(),
                            task,
                            start: crate::Start { conn, reused },
                            origin,
                            request,
                            control,
                            caller: Caller::Delegate,
                        };
                        let io = spawn_io(shared, task, async move {
                            exchange.run().await;
                        });
                        self.io.insert(task, io);
                    }
                    // Streams and websockets never reuse a connection: theirs is their own.
                    Job::Stream { origin } => {
                        let io = crate::stream::run(shared.clone(), task, conn, origin, control);
                        let io = spawn_io(shared, task, io);
                        self.io.insert(task, io);
                    }
                    Job::WebSocket {
                        request,
                        origin,
                        key,
                        protocols,
                    } => {
                        let upgrade = crate::websocket::Upgrade {
                            shared: shared.clone(),
                            task,
                            conn,
                            origin,
                            request,
                            key,
                            protocols,
                        };
                        let io = spawn_io(shared, task, crate::websocket::run(upgrade, control));
                        self.io.insert(task, io);
                    }
                }
            }
            Action::Pause { task } => shared.control(task, |c| c.paused = true),
            Action::Unpause { task } => shared.control(task, |c| c.paused = false),
            Action::ReadBody { task, into } => shared.control(task, |c| c.body = Some(into)),
            Action::ReadStream { task } => shared.control(task, |c| c.stream = true),
            Action::Abort { task, conn } => {
                // Every kind of IO races its awaits with the control: an exchange, a stream,
                // a websocket (R11: a close that timed out ends here, its socket closed).
                shared.control(task, |c| c.aborted = true);
                // Its job goes now: a task that never started has nothing else to drop it
                // (R5); a running IO has seen the abort and keeps its own copy of the control.
                shared.forget(task);
                if let Some(conn) = conn {
                    // Closed here, not when the IO next runs: did_complete, which waits for
                    // this action, finds the socket closed (R5).
                    shared.pool.kill(conn);
                    // The exchange may have parked its connection already (see Core::body_end).
                    shared.pool.close(conn);
                }
            }
            Action::Close { conn } => {
                if let Some(key) = self.idle.remove(&conn) {
                    self.clock.try_remove(&key);
                }
                shared.pool.close(conn);
            }
            Action::ArmTimer { timer, after } => {
                let key = self.clock.insert(Due::Timer(timer), after);
                if let Some((old, _)) = self
                    .timers
                    .insert((timer.task, timer.timeout), (key, timer))
                {
                    self.clock.try_remove(&old);
                }
            }
            Action::DisarmTimer { timer } => {
                let slot = (timer.task, timer.timeout);
                if self
                    .timers
                    .get(&slot)
                    .is_some_and(|(_, armed)| *armed == timer)
                {
                    let (key, _) = self.timers.remove(&slot).expect("armed");
                    self.clock.try_remove(&key);
                }
            }
            Action::RemoveTempFile { path, .. } => {
                // Missing is fine: the delegate may have moved it. Under the files' lock, so
                // that an exchange creating it cannot slip in between (see Exchange::create).
                let _files = lock(&shared.files);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn noted(&mut self, note: Note) {
        match note {
            Note::Parked(conn) => {
                if !self.shared.pool.holds(conn) {
                    // Closed between parking and pooling, or already reused: either way the
                    // engine must not keep counting it idle.
                    self.shared.core.idle_expired(conn);
                }
                let key = self.clock.insert(Due::Idle(conn), self.idle_timeout);
                if let Some(old) = self.idle.insert(conn, key) {
                    self.clock.try_remove(&old);
                }
            }
            Note::Closed(conn) => {
                if self.shared.pool.close(conn) {
                    if let Some(key) = self.idle.remove(&conn) {
                        self.clock.try_remove(&key);
                    }
                    self.shared.core.idle_expired(conn);
                }
            }
            Note::IoEnded(task) => {
                self.io.remove(&task);
            }
            #[cfg(feature = "test-util")]
            Note::Expire(task, timeout) => {
                if let Some((key, timer)) = self.timers.remove(&(task, timeout)) {
                    self.clock.try_remove(&key);
                    self.due(Due::Timer(timer));
                } else {
                    // A convenience keeps its own clock in its future: it runs out as that
                    // clock would have it.
                    self.shared.core.handler_timed_out(task, timeout);
                }
            }
            #[cfg(feature = "test-util")]
            Note::ExpireIdle => self.close_idle(),
            Note::CloseIdle(done) => {
                self.close_idle();
                let _ = done.send(());
            }
        }
    }

    /// Close every idle connection, as if its idle timeout ran out.
    fn close_idle(&mut self) {
        for conn in self.shared.pool.idle_ids() {
            if let Some(key) = self.idle.remove(&conn) {
                self.clock.try_remove(&key);
            }
            self.shared.pool.close(conn);
            self.shared.core.idle_expired(conn);
        }
    }

    fn due(&mut self, due: Due) {
        match due {
            Due::Timer(timer) => {
                self.timers.remove(&(timer.task, timer.timeout));
                self.shared.core.timer_fired(timer);
            }
            Due::Idle(conn) => match self.shared.pool.expire(conn, self.idle_timeout) {
                Expiry::Later(at) => {
                    let key = self.clock.insert_at(Due::Idle(conn), at);
                    self.idle.insert(conn, key);
                }
                Expiry::Closed | Expiry::Gone => {
                    self.idle.remove(&conn);
                    self.shared.core.idle_expired(conn);
                }
            },
        }
    }
}

/// Run a task's IO on the session's runtime; once it ends, the task's record goes (unless its
/// handle still holds it: see `Task`'s drop), and the driver lets go of its handle.
fn spawn_io(
    shared: &Arc<Shared>,
    task: TaskId,
    io: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let shared = shared.clone();
    let runtime = shared.runtime.clone();
    shared.tasks.clone().spawn_on(
        async move {
            io.await;
            shared.forget(task);
            shared.pool.note(Note::IoEnded(task));
        },
        &runtime,
    )
}
