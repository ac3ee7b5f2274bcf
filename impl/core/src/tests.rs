//! Unit tests of single transitions; the whole lifecycle is checked against the model by the
//! suite's proptest, and the races by `tests/loom.rs`.

use std::time::Duration;

use bytes::Bytes;

use crate::*;

struct Recorder;

fn delegated() -> (SessionHandle, Core, Delivery<Recorder>) {
    session(Config::default(), Some(Recorder))
}

fn actions(core: &Core) -> Vec<Action> {
    std::iter::from_fn(|| core.try_action()).collect()
}

/// Deliver everything queued, answering `answer` to responses; return what was heard.
fn deliver(delivery: &mut Delivery<Recorder>, answer: Disposition) -> Vec<String> {
    let mut heard = Vec::new();
    let mut hear = |_: &Recorder, callback: Callback| {
        heard.push(format!("{callback:?}"));
        Some(answer)
    };
    while delivery.try_deliver(&mut hear) == Some(Delivered::One) {}
    heard
}

fn ok_response() -> http::Response<()> {
    http::Response::new(())
}

#[test]
fn the_delegate_given_decides_between_a_plain_and_a_delegated_session() {
    // A delegate makes the session delegated whatever the configuration says...
    let plain = Config {
        kind: SessionKind::Plain,
        ..Config::default()
    };
    let (handle, core, mut delivery) = session(plain, Some(Recorder));
    assert!(core.ledger().delegate_held);
    handle.invalidate_and_cancel();
    assert_eq!(
        deliver(&mut delivery, Disposition::Allow),
        ["BecomeInvalid"]
    );
    // ...and none makes it plain: nothing is queued, nothing held.
    let (handle, core, mut delivery) = session::<Recorder>(Config::default(), None);
    assert!(!core.ledger().delegate_held);
    handle.invalidate_and_cancel();
    assert_eq!(core.state(), SessionState::Invalidated);
    assert!(deliver(&mut delivery, Disposition::Allow).is_empty());
}

#[test]
fn the_shared_session_ignores_invalidation() {
    let shared = Config {
        kind: SessionKind::Shared,
        ..Config::default()
    };
    let (handle, core, _delivery) = session::<Recorder>(shared, None);
    handle.finish_tasks_and_invalidate();
    handle.invalidate_and_cancel();
    assert_eq!(core.state(), SessionState::Active);
}

#[test]
#[should_panic(expected = "the shared session has no delegate")]
fn the_shared_session_takes_no_delegate() {
    let shared = Config {
        kind: SessionKind::Shared,
        ..Config::default()
    };
    let _ = session(shared, Some(Recorder));
}

#[test]
fn resume_starts_on_a_new_connection_with_both_timers() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let got = actions(&core);
    assert!(matches!(
        got[0],
        Action::Start {
            reused: false,
            conn: ConnId(1),
            ..
        }
    ));
    assert_eq!(got.len(), 3);
    assert_eq!(core.ledger().timers, 2);
    assert_eq!(core.ledger().open_connections, 1);
}

#[test]
fn a_pooled_connection_is_reused_for_the_same_origin_only() {
    let (session, core, mut delivery) = delegated();
    let first = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    first.resume();
    let _ = core.response(first.id(), ok_response());
    deliver(&mut delivery, Disposition::Allow);
    assert_eq!(core.body_end(first.id(), true), Release::Pool);
    let other = session
        .create_task(TaskKind::Data, "b", Route::Delegate)
        .unwrap();
    let same = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    actions(&core);
    other.resume();
    same.resume();
    let starts: Vec<_> = actions(&core)
        .into_iter()
        .filter_map(|a| match a {
            Action::Start { conn, reused, .. } => Some((conn, reused)),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [(ConnId(2), false), (ConnId(1), true)]);
}

#[test]
fn a_stale_timer_is_ignored() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let timer = actions(&core)
        .into_iter()
        .find_map(|a| match a {
            Action::ArmTimer { timer, .. } if timer.timeout == Timeout::Request => Some(timer),
            _ => None,
        })
        .unwrap();
    let _ = core.response(task.id(), ok_response()); // re-arms the request timer
    core.timer_fired(timer);
    assert_eq!(task.state(), TaskState::Running);
}

#[test]
fn suspend_disarms_and_pauses_resume_rearms_and_unpauses() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::Upload, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    task.suspend();
    task.suspend();
    let got = actions(&core);
    assert!(matches!(got[0], Action::Pause { .. }));
    assert_eq!(got.len(), 3, "pause and two disarms, once: {got:?}");
    assert_eq!(core.ledger().timers, 0);
    task.resume();
    assert!(matches!(actions(&core)[0], Action::Unpause { .. }));
    assert_eq!(core.ledger().timers, 2);
}

#[test]
fn cancel_aborts_a_started_task_and_completes_it_once() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    task.cancel();
    task.cancel();
    core.failed(task.id(), Error::ConnectionReset);
    let got = actions(&core);
    assert!(got.contains(&Action::Abort {
        task: task.id(),
        conn: Some(ConnId(1))
    }));
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(heard[0].contains("Cancelled"));
}

/// A data task that became a download and read its body whole, its file not yet handed to
/// the delegate: the task, and its file's path.
fn a_download_read_whole(
    session: &SessionHandle,
    core: &Core,
    delivery: &mut Delivery<Recorder>,
) -> (TaskHandle, std::path::PathBuf) {
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = core.response(task.id(), ok_response());
    deliver(delivery, Disposition::BecomeDownload);
    let path = actions(core)
        .into_iter()
        .find_map(|a| match a {
            Action::ReadBody { into, .. } => into,
            _ => None,
        })
        .expect("a download reads into a file");
    core.body_data(task.id(), Bytes::from_static(b"abc"));
    (task, path)
}

#[test]
fn a_download_file_is_removed_after_the_delegate_returns() {
    let (session, core, mut delivery) = delegated();
    let (task, path) = a_download_read_whole(&session, &core, &mut delivery);
    assert_eq!(
        core.ledger().buffered_bytes,
        0,
        "a download buffers nothing"
    );
    let _ = core.body_end(task.id(), false);
    actions(&core);
    assert_eq!(
        core.ledger().temp_files,
        1,
        "with the delegate until it returns"
    );
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("FinishDownloading"));
    assert_eq!(
        actions(&core),
        [Action::RemoveTempFile {
            task: task.id(),
            path
        }]
    );
    assert_eq!(core.ledger().temp_files, 0);
}

#[test]
fn did_complete_waits_until_the_handed_over_file_is_removed() {
    let (session, core, mut delivery) = delegated();
    let (task, _) = a_download_read_whole(&session, &core, &mut delivery);
    let _ = core.body_end(task.id(), false);
    actions(&core);

    // did_finish_downloading returns: the file's removal is queued, and did_complete (R5:
    // nothing held, the file included) waits until the driver has carried it out.
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(heard[0].starts_with("FinishDownloading"), "{heard:?}");
    assert!(matches!(
        core.try_action(),
        Some(Action::RemoveTempFile { .. })
    ));
    assert!(
        deliver(&mut delivery, Disposition::Allow).is_empty(),
        "taken, not carried out"
    );
    assert_eq!(core.try_action(), None);
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("Complete"), "{heard:?}");
}

#[test]
fn no_task_once_invalidation_began() {
    let (session, core, _delivery) = delegated();
    let running = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    running.resume();
    session.finish_tasks_and_invalidate();
    let refused = session.create_task(TaskKind::Data, "a", Route::Delegate);
    assert!(matches!(refused, Err(Error::SessionInvalidated)));
    assert_eq!(core.ledger().live_tasks, 1);
}

#[test]
fn the_delegate_is_dropped_right_after_did_become_invalid() {
    let delegate = std::sync::Arc::new(());
    let weak = std::sync::Arc::downgrade(&delegate);
    let (session, core, mut delivery) = session(Config::default(), Some(delegate));
    drop(session);
    let mut alive_during_callback = false;
    let done = delivery.try_deliver(|_, callback| {
        assert!(matches!(callback, Callback::BecomeInvalid));
        alive_during_callback = weak.upgrade().is_some();
        None
    });
    assert_eq!(done, Some(Delivered::Done));
    assert!(alive_during_callback);
    assert!(weak.upgrade().is_none(), "R3");
    assert!(core.is_released());
    assert!(core.ledger().is_zero());
}

#[test]
fn timeouts_come_from_the_config() {
    let config = Config {
        request_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, Some(Recorder));
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    assert!(actions(&core).contains(&Action::ArmTimer {
        timer: TimerId {
            task: task.id(),
            timeout: Timeout::Request,
            generation: 1
        },
        after: Duration::from_secs(3)
    }));
}

#[test]
fn a_handler_task_runs_inline_and_keeps_its_outcome_for_the_handler() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Handler)
        .unwrap();
    let start = task.resume_inline().expect("the handler starts it");
    assert_eq!(
        start,
        Start {
            conn: ConnId(1),
            reused: false
        }
    );
    assert!(
        !actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { .. })),
        "the driver is not asked to start it"
    );
    assert_eq!(task.resume_inline(), None, "resumes do not nest");
    assert_eq!(
        core.response(task.id(), ok_response()),
        Proceed::Read { into: None },
        "allowed at once: no delegate round trip"
    );
    core.body_data(task.id(), Bytes::from_static(b"body"));
    assert_eq!(core.ledger().buffered_bytes, 0);
    assert_eq!(core.take_outcome(task.id()).map(|r| r.is_ok()), None);
    assert_eq!(core.body_end(task.id(), true), Release::Pool);
    assert_eq!(core.take_outcome(task.id()).map(|r| r.is_ok()), Some(true));
    assert!(
        deliver(&mut delivery, Disposition::Allow).is_empty(),
        "the delegate hears nothing"
    );
}

#[test]
fn a_handler_download_hands_its_file_to_the_handler() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::Download, "a", Route::Handler)
        .unwrap();
    task.resume_inline();
    let Proceed::Read { into: Some(path) } = core.response(task.id(), ok_response()) else {
        panic!("a download reads into a file");
    };
    let _ = core.body_end(task.id(), true);
    assert!(
        !actions(&core).contains(&Action::RemoveTempFile {
            task: task.id(),
            path
        }),
        "the handler's guard owns the file now"
    );
    assert_eq!(core.ledger().temp_files, 0);
}

#[test]
fn a_dropped_handler_leaves_no_outcome_behind() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Handler)
        .unwrap();
    task.resume_inline();
    let id = task.id();
    drop(task);
    core.failed(id, Error::ConnectionReset);
    assert_eq!(core.take_outcome(id).map(|r| r.is_ok()), None);
}

#[test]
fn a_full_pool_closes_the_connection_instead() {
    let config = Config {
        max_idle_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            session
                .create_task(TaskKind::Data, "a", Route::Delegate)
                .unwrap()
        })
        .collect();
    for task in &tasks {
        task.resume();
        let _ = core.response(task.id(), ok_response());
    }
    assert_eq!(core.body_end(tasks[0].id(), true), Release::Pool);
    assert_eq!(core.body_end(tasks[1].id(), true), Release::Close);
    assert_eq!(core.ledger().idle_connections, 1);
}

#[test]
fn at_its_limit_an_origin_hands_a_released_connection_to_the_next_task() {
    let config = Config {
        max_connections_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let first = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    let second = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    let inline = session
        .create_task(TaskKind::Data, "a", Route::Handler)
        .unwrap();
    let elsewhere = session
        .create_task(TaskKind::Data, "b", Route::Delegate)
        .unwrap();
    first.resume();
    second.resume();
    assert_eq!(inline.resume_inline(), None, "no connection free: it waits");
    elsewhere.resume();
    let starts = |core: &Core| -> Vec<(TaskId, ConnId, bool)> {
        actions(core)
            .into_iter()
            .filter_map(|a| match a {
                Action::Start { task, conn, reused } => Some((task, conn, reused)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        starts(&core),
        [
            (first.id(), ConnId(1), false),
            (elsewhere.id(), ConnId(2), false)
        ],
        "the limit is per origin"
    );
    let _ = core.response(first.id(), ok_response());
    assert_eq!(core.body_end(first.id(), true), Release::Pool);
    assert_eq!(
        starts(&core),
        [(second.id(), ConnId(1), true)],
        "handed over"
    );
    core.failed(second.id(), Error::ConnectionReset);
    let waker = std::task::Waker::noop();
    assert_eq!(
        core.poll_start(inline.id(), &mut std::task::Context::from_waker(waker)),
        std::task::Poll::Ready(Some(Start {
            conn: ConnId(3),
            reused: false
        })),
        "a closed connection makes room for a new one"
    );
    assert_eq!(core.ledger().open_connections, 2);
}

#[test]
fn a_task_answered_without_the_network_gives_its_connection_back_unused() {
    let config = Config {
        max_connections_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            session
                .create_task(TaskKind::Data, "a", Route::Delegate)
                .unwrap()
        })
        .collect();
    let starts = |core: &Core| -> Vec<(TaskId, ConnId, bool)> {
        actions(core)
            .into_iter()
            .filter_map(|a| match a {
                Action::Start { task, conn, reused } => Some((task, conn, reused)),
                _ => None,
            })
            .collect()
    };
    tasks[0].resume();
    tasks[1].resume();
    assert_eq!(starts(&core), [(tasks[0].id(), ConnId(1), false)]);
    // The first is answered from a cache: its new connection is never opened, and the slot
    // goes to the second at once.
    core.connection_unused(tasks[0].id(), false);
    assert_eq!(starts(&core), [(tasks[1].id(), ConnId(2), false)]);
    assert_eq!(core.ledger().open_connections, 1);
    assert_eq!(
        core.response(tasks[0].id(), ok_response()),
        Proceed::Read { into: None }
    );
    core.body_data(tasks[0].id(), Bytes::from_static(b"cached"));
    assert_eq!(
        core.body_end(tasks[0].id(), true),
        Release::Close,
        "nothing to pool"
    );
    assert_eq!(core.task_state(tasks[0].id()), TaskState::Completed);
    assert!(
        !actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Abort { .. })),
        "its IO ended it: nothing to abort"
    );
    assert_eq!(core.ledger().idle_connections, 0);
    // A pooled connection given to a task answered without it goes back to the pool.
    let _ = core.response(tasks[1].id(), ok_response());
    assert_eq!(core.body_end(tasks[1].id(), true), Release::Pool);
    tasks[2].resume();
    assert_eq!(starts(&core), [(tasks[2].id(), ConnId(2), true)]);
    core.connection_unused(tasks[2].id(), true);
    let ledger = core.ledger();
    assert_eq!((ledger.open_connections, ledger.idle_connections), (0, 1));
    // Only before the head, and only once.
    core.connection_unused(tasks[2].id(), true);
    assert_eq!(core.ledger().idle_connections, 1);
}

#[test]
fn a_waiting_task_suspended_gives_up_its_place() {
    let config = Config {
        max_connections_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let busy = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    let waiting = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    busy.resume();
    waiting.resume();
    waiting.suspend();
    assert_eq!(core.ledger().timers, 2, "R7: only the busy task's timers");
    busy.cancel();
    assert!(
        !actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { task, .. } if *task == waiting.id())),
        "a suspended task is not started"
    );
    waiting.resume();
    assert!(
        actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { task, .. } if *task == waiting.id()))
    );
}

// ---- streams and websockets ----

fn noop() -> std::task::Context<'static> {
    std::task::Context::from_waker(std::task::Waker::noop())
}

fn open_stream(session: &SessionHandle, core: &Core) -> TaskHandle {
    let task = session
        .create_task(TaskKind::Stream, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let got = actions(core);
    assert!(
        matches!(got[..], [Action::Start { reused: false, .. }]),
        "{got:?}"
    );
    task
}

#[test]
fn a_stream_reads_no_further_than_its_window_and_holds_no_timer() {
    let (session, core, _delivery) = session(
        Config {
            read_ahead: 8,
            ..Config::default()
        },
        Some(Recorder),
    );
    let task = open_stream(&session, &core);
    assert_eq!(core.ledger().timers, 0);
    assert_eq!(core.try_intake(task.id()), Some(Intake::Read(8)));
    assert_eq!(core.stream_data(task.id(), b"0123456789"), 8);
    // R6: full, so the IO must stop reading the socket.
    assert_eq!(core.try_intake(task.id()), None);
    assert_eq!(core.ledger().buffered_bytes, 8);
    let read = task.poll_read(&mut noop(), 1, 5);
    assert!(matches!(read, std::task::Poll::Ready(Ok(Some(b))) if b == "01234"));
    assert_eq!(core.try_intake(task.id()), Some(Intake::Read(5)));
    assert_eq!(core.ledger().peak_buffered_bytes, 8);
}

#[test]
fn a_stream_completes_once_both_halves_are_closed_and_its_end_is_written() {
    let (session, core, _delivery) = delegated();
    let task = open_stream(&session, &core);
    assert!(task.poll_write(&mut noop(), b"abc").is_ready());
    task.close_write();
    assert!(matches!(
        task.poll_write(&mut noop(), b"x"),
        std::task::Poll::Ready(Err(Error::WriteClosed))
    ));
    core.stream_end(task.id());
    assert!(matches!(
        task.poll_read(&mut noop(), 1, 9),
        std::task::Poll::Ready(Ok(None))
    ));
    // The end is read, but the shutdown is not written yet: not done.
    assert_eq!(task.state(), TaskState::Running);
    assert_eq!(
        core.try_outgoing(task.id()),
        Some(Outgoing::Bytes(Bytes::from_static(b"abc")))
    );
    core.sent(task.id());
    assert_eq!(core.try_outgoing(task.id()), Some(Outgoing::Shutdown));
    core.sent(task.id());
    assert_eq!(task.state(), TaskState::Completed);
    assert!(matches!(actions(&core)[..], [Action::Abort { .. }]));
    // Errors at once after the end, with no hang.
    assert!(matches!(
        task.poll_read(&mut noop(), 1, 9),
        std::task::Poll::Ready(Err(Error::Closed(TaskKind::Stream)))
    ));
}

#[test]
fn a_stream_whose_handles_are_all_gone_is_cancelled() {
    let (session, core, mut delivery) = delegated();
    let task = open_stream(&session, &core);
    core.stream_data(task.id(), b"held");
    drop(task);
    actions(&core); // the abort, carried out: did_complete waits for it
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].contains("Cancelled"), "{heard:?}");
    assert_eq!(core.ledger().buffered_bytes, 0);
}

#[test]
fn become_stream_hands_the_delegate_a_handle_and_reads_through_the_window() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    assert_eq!(core.response(task.id(), ok_response()), Proceed::Wait);
    let mut stream = None;
    let mut hear = |_: &Recorder, callback: Callback| match callback {
        Callback::ReceiveResponse { .. } => Some(Disposition::BecomeStream),
        Callback::BecomeStream { stream: handle, .. } => {
            stream = handle;
            None
        }
        other => panic!("heard {other:?}"),
    };
    while delivery.try_deliver(&mut hear) == Some(Delivered::One) {}
    let stream = stream.expect("the delegate got the stream's handle");
    let got = actions(&core);
    assert!(
        got.contains(&Action::ReadStream { task: task.id() }),
        "{got:?}"
    );
    assert_eq!(core.ledger().timers, 0, "a stream waits on its user");
    // A response's stream cannot be written.
    assert!(matches!(
        stream.poll_write(&mut noop(), b"x"),
        std::task::Poll::Ready(Err(Error::WriteClosed))
    ));
    // The user lets go of the data task: the delegate's handle keeps the stream alive.
    drop(task);
    assert_eq!(stream.state(), TaskState::Running);
    drop(stream);
    assert_eq!(core.task_state(TaskId(0)), TaskState::Completed);
}

fn open_websocket(session: &SessionHandle, core: &Core) -> TaskHandle {
    let task = session
        .create_task(TaskKind::WebSocket, "a", Route::Delegate)
        .unwrap();
    task.resume();
    assert_eq!(core.ledger().timers, 2, "the handshake is timed");
    core.ws_opened(task.id(), Some("chat".into()));
    assert_eq!(core.ledger().timers, 0, "an open websocket is not");
    actions(core);
    task
}

#[test]
fn a_websocket_holds_one_message_and_queues_sends_in_order() {
    let (session, core, mut delivery) = delegated();
    let task = open_websocket(&session, &core);
    assert_eq!(core.try_intake(task.id()), Some(Intake::Read(usize::MAX)));
    core.ws_message(task.id(), Message::Text("one".into()));
    assert_eq!(core.try_intake(task.id()), None, "one message held at most");
    assert_eq!(core.ledger().buffered_bytes, 3);
    let mut message = Some(Message::Binary(Bytes::from_static(b"hi")));
    assert!(task.poll_send(&mut noop(), &mut message).is_ready());
    let id = task.ping().unwrap();
    assert!(task.poll_pong(&mut noop(), id).is_pending());
    assert_eq!(
        core.try_outgoing(task.id()),
        Some(Outgoing::Message(Message::Binary(Bytes::from_static(
            b"hi"
        ))))
    );
    core.sent(task.id());
    assert_eq!(core.try_outgoing(task.id()), Some(Outgoing::Ping));
    core.sent(task.id());
    core.ws_pong(task.id());
    assert!(matches!(
        task.poll_pong(&mut noop(), id),
        std::task::Poll::Ready(Ok(()))
    ));
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("Open"), "{heard:?}");
}

#[test]
fn our_close_waits_for_the_peers_at_most_the_close_timeout() {
    let (session, core, mut delivery) = session(
        Config {
            close_timeout: Duration::from_millis(300),
            ..Config::default()
        },
        Some(Recorder),
    );
    let task = open_websocket(&session, &core);
    core.ws_message(task.id(), Message::Text("unread".into()));
    let id = task.ping().unwrap();
    task.cancel_with(GOING_AWAY, "bye");
    assert_eq!(task.state(), TaskState::Canceling);
    assert_eq!(
        core.ledger().buffered_bytes,
        0,
        "closing drops what was held"
    );
    assert!(matches!(
        task.poll_receive(&mut noop()),
        std::task::Poll::Ready(Err(Error::Closed(TaskKind::WebSocket)))
    ));
    assert_eq!(core.try_intake(task.id()), Some(Intake::Discard));
    assert_eq!(task.close_frame(), Some((GOING_AWAY, "bye".into())));
    let deadline = actions(&core)
        .into_iter()
        .find_map(|a| match a {
            Action::ArmTimer { timer, after } if timer.timeout == Timeout::Close => {
                assert_eq!(after, Duration::from_millis(300));
                Some(timer)
            }
            _ => None,
        })
        .expect("R11: the close is bounded");
    core.timer_fired(deadline);
    assert_eq!(task.state(), TaskState::Completed);
    // The outstanding ping fails; it does not hang.
    assert!(matches!(
        task.poll_pong(&mut noop(), id),
        std::task::Poll::Ready(Err(Error::TimedOut(Timeout::Close)))
    ));
    actions(&core); // the abort that closes the socket comes before did_complete
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(
        heard.iter().any(|h| h.contains("TimedOut(Close)")),
        "{heard:?}"
    );
    assert!(
        !heard.iter().any(|h| h.starts_with("Close")),
        "no did_close without the peer's"
    );
}

#[test]
fn the_peers_close_is_recorded_and_completes_the_websocket() {
    let (session, core, mut delivery) = delegated();
    let task = open_websocket(&session, &core);
    core.ws_peer_closed(task.id(), Some(4000), "done".into());
    assert_eq!(task.state(), TaskState::Completed);
    assert_eq!(task.close_frame(), Some((4000, "done".into())));
    let heard = deliver(&mut delivery, Disposition::Allow);
    let names: Vec<&str> = heard.iter().map(|h| h.split(' ').next().unwrap()).collect();
    assert_eq!(names, ["Open", "Close"], "did_complete waits for the abort");
    assert!(matches!(actions(&core)[..], [Action::Abort { .. }]));
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("Complete"), "{heard:?}");
}

#[test]
fn a_peer_close_without_a_code_is_reported_as_1005() {
    let (session, core, mut delivery) = delegated();
    let task = open_websocket(&session, &core);
    core.ws_peer_closed(task.id(), None, String::new());
    assert_eq!(task.close_frame(), Some((crate::NO_STATUS, String::new())));
    actions(&core); // did_complete waits for the abort
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(
        heard[1].starts_with("Close") && heard[1].contains("1005"),
        "{heard:?}"
    );
    assert!(heard[2].contains("Ok"), "{heard:?}");
}

#[test]
fn a_peer_close_with_a_code_no_frame_may_carry_is_a_protocol_error() {
    for code in [
        0,
        999,
        1004,
        1005,
        1006,
        1014,
        1015,
        1016,
        2999,
        5000,
        u16::MAX,
    ] {
        let (session, core, mut delivery) = delegated();
        let task = open_websocket(&session, &core);
        core.ws_peer_closed(task.id(), Some(code), "why".into());
        assert_eq!(task.state(), TaskState::Completed);
        assert_eq!(
            task.close_frame(),
            None,
            "{code}: no close code the peer never sent"
        );
        assert!(matches!(actions(&core)[..], [Action::Abort { .. }]));
        let heard = deliver(&mut delivery, Disposition::Allow);
        let names: Vec<&str> = heard.iter().map(|h| h.split(' ').next().unwrap()).collect();
        assert_eq!(names, ["Open", "Complete"], "{code}: no did_close");
        assert!(
            heard[1].contains("WebSocketProtocol") && heard[1].contains(&code.to_string()),
            "{code}: {heard:?}"
        );
    }
    for code in [
        1000, 1001, 1002, 1003, 1007, 1011, 1013, 3000, 3999, 4000, 4999,
    ] {
        assert!(crate::close_code_allowed(code), "{code}");
    }
}

#[test]
fn a_websocket_not_yet_open_is_cancelled_by_cancel_with() {
    let (session, core, _delivery) = delegated();
    let task = session
        .create_task(TaskKind::WebSocket, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    task.cancel_with(1000, "");
    assert!(matches!(
        task.poll_receive(&mut noop()),
        std::task::Poll::Ready(Err(Error::Cancelled))
    ));
}

/// A waker that records that it was woken.
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn did_become_invalid_waits_until_the_pools_close_is_carried_out() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = core.response(task.id(), ok_response());
    deliver(&mut delivery, Disposition::Allow);
    assert_eq!(core.body_end(task.id(), true), Release::Pool);
    drop((task, session));
    // Invalidated, but the pooled connection's Close waits for the driver: R4 is not true
    // yet, so did_become_invalid waits too, and so does the release.
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(
        heard.iter().all(|h| !h.starts_with("BecomeInvalid")),
        "{heard:?}"
    );
    let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
    let waker = std::task::Waker::from(flag.clone());
    assert!(
        core.poll_released(&mut std::task::Context::from_waker(&waker))
            .is_pending()
    );
    let rest = actions(&core);
    assert!(
        matches!(rest.last(), Some(Action::Close { .. })),
        "{rest:?}"
    );
    assert!(!core.is_released(), "the delegate is still held");
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(
        heard.iter().any(|h| h.starts_with("BecomeInvalid")),
        "{heard:?}"
    );
    assert!(core.is_released());
    assert!(
        flag.0.load(std::sync::atomic::Ordering::SeqCst),
        "whoever awaits the release hears of it"
    );
}

#[test]
fn did_complete_waits_until_the_actions_before_it_are_carried_out() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    task.cancel();
    assert!(deliver(&mut delivery, Disposition::Allow).is_empty());
    // Taken, but not yet carried out: the driver has not asked for more.
    while !matches!(core.try_action(), Some(Action::Abort { .. })) {}
    assert!(deliver(&mut delivery, Disposition::Allow).is_empty());
    assert_eq!(core.ledger().pending_actions, 1, "taken, not carried out");
    assert_eq!(core.try_action(), None);
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].contains("Cancelled"), "{heard:?}");
    assert_eq!(core.ledger().pending_actions, 0);
}

/// Whether the task's request timer is armed, by the driver's account of the actions.
fn request_timer_armed(got: &[Action], task: TaskId, before: bool) -> bool {
    got.iter().fold(before, |armed, action| match action {
        Action::ArmTimer { timer, .. } if timer.task == task => {
            armed || timer.timeout == Timeout::Request
        }
        Action::DisarmTimer { timer }
            if timer.task == task && timer.timeout == Timeout::Request =>
        {
            false
        }
        _ => armed,
    })
}

#[test]
fn a_delegate_a_window_behind_stops_the_body_and_its_request_timeout() {
    let (session, core, mut delivery) = session(
        Config {
            delegate_ahead: 8,
            ..Config::default()
        },
        Some(Recorder),
    );
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    let id = task.id();
    task.resume();
    let _ = core.response(id, ok_response());
    deliver(&mut delivery, Disposition::Allow);
    let armed = request_timer_armed(&actions(&core), id, false);
    assert!(armed);
    assert_eq!(core.try_body_room(id), Some(8));
    core.body_data(id, Bytes::from_static(b"leak"));
    assert_eq!(core.try_body_room(id), Some(4));
    core.body_data(id, Bytes::from_static(b"proof"));
    // A window behind: no room, and the network's idle time is not counted (R6, R12).
    assert_eq!(core.try_body_room(id), Some(0));
    let armed = request_timer_armed(&actions(&core), id, armed);
    assert!(!armed, "disarmed while the delegate is behind");
    assert_eq!(core.ledger().timers, 1, "the resource timeout runs on");
    // Suspended and resumed while behind: still no request timer.
    task.suspend();
    task.resume();
    let armed = request_timer_armed(&actions(&core), id, armed);
    assert!(!armed);
    assert_eq!(core.ledger().timers, 1);
    // The delegate catches up: room again, and the request timeout is armed again.
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert_eq!(heard.len(), 2, "{heard:?}");
    assert_eq!(core.try_body_room(id), Some(8));
    assert!(request_timer_armed(&actions(&core), id, armed));
    assert_eq!(core.ledger().timers, 2);
}

#[test]
fn a_cancelled_task_drops_the_body_its_delegate_was_not_handed() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = core.response(task.id(), ok_response());
    deliver(&mut delivery, Disposition::Allow);
    core.body_data(task.id(), Bytes::from_static(b"stale"));
    core.body_data(task.id(), Bytes::from_static(b"bytes"));
    assert_eq!(core.ledger().buffered_bytes, 10);
    task.cancel();
    assert_eq!(core.ledger().buffered_bytes, 0, "R5");
    assert_eq!(core.try_body_room(task.id()), None);
    actions(&core); // did_complete waits for the abort to be carried out
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(heard[0].starts_with("Complete"), "{heard:?}");
}

#[test]
fn a_network_failure_delivers_the_body_read_before_it() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = core.response(task.id(), ok_response());
    deliver(&mut delivery, Disposition::Allow);
    core.body_data(task.id(), Bytes::from_static(b"read"));
    core.failed(task.id(), Error::ConnectionReset);
    actions(&core); // did_complete waits for the driver to disarm the timers
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("ReceiveData"), "{heard:?}");
    assert!(heard[1].starts_with("Complete"), "{heard:?}");
    assert_eq!(core.ledger().buffered_bytes, 0);
}

#[test]
fn streams_and_websockets_take_no_http_slot() {
    let (session, core, _delivery) = crate::session(
        Config {
            max_connections_per_origin: 1,
            ..Config::default()
        },
        Some(Recorder),
    );
    let mut tasks = Vec::new();
    for kind in [
        TaskKind::WebSocket,
        TaskKind::WebSocket,
        TaskKind::Stream,
        TaskKind::Data,
    ] {
        let task = session.create_task(kind, "a", Route::Delegate).unwrap();
        task.resume();
        let started = actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { reused: false, .. }));
        assert!(
            started,
            "a {kind:?} starts at once on a host at its HTTP limit of 1"
        );
        tasks.push(task);
    }
    let second = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    second.resume();
    assert!(
        !actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { .. })),
        "the second HTTP exchange waits for the one slot"
    );
    assert_eq!(core.ledger().open_connections, 4);
}

fn redirect_to(uri: &str) -> (http::Response<()>, http::Request<()>) {
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::FOUND;
    let request = http::Request::get(uri).body(()).unwrap();
    (response, request)
}

fn poll_redirect(core: &Core, task: TaskId) -> std::task::Poll<Option<Redirect>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    core.poll_redirect(task, &mut cx)
}

/// A redirect to `uri` comes for `task`, which follows it without asking anyone (no delegate).
fn follows(core: &Core, task: TaskId, uri: &str) {
    let (response, request) = redirect_to(uri);
    core.redirect(task, response, request);
    assert!(matches!(
        poll_redirect(core, task),
        std::task::Poll::Ready(Some(Redirect::Follow(_)))
    ));
}

fn poll_start(core: &Core, task: TaskId) -> std::task::Poll<Option<Start>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    core.poll_start(task, &mut cx)
}

#[test]
fn a_followed_redirect_hands_its_pooled_connection_to_the_next_hop() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    let (response, request) = redirect_to("http://a/next");
    core.redirect(task.id(), response, request);
    assert!(
        poll_redirect(&core, task.id()).is_pending(),
        "the delegate decides"
    );
    let heard = deliver(&mut delivery, Disposition::Allow);
    assert!(heard[0].starts_with("WillRedirect"), "{heard:?}");
    assert!(matches!(
        poll_redirect(&core, task.id()),
        std::task::Poll::Ready(Some(Redirect::Follow(_)))
    ));
    // The same origin: the connection goes to the pool and straight back to the task.
    assert_eq!(core.hop(task.id(), "a", true), Release::Pool);
    let start = Start {
        conn: ConnId(1),
        reused: true,
    };
    assert_eq!(
        poll_start(&core, task.id()),
        std::task::Poll::Ready(Some(start))
    );
    let ledger = core.ledger();
    assert_eq!((ledger.open_connections, ledger.idle_connections), (1, 0));
    assert_eq!(ledger.timers, 2, "both timers run on");
    // No new Start for the driver: the task's IO runs on.
    assert!(
        !actions(&core)
            .iter()
            .any(|a| matches!(a, Action::Start { .. }))
    );
    let _ = core.response(task.id(), ok_response());
    deliver(&mut delivery, Disposition::Allow);
    assert_eq!(core.body_end(task.id(), true), Release::Pool);
    assert_eq!(core.ledger().idle_connections, 1);
}

#[test]
fn a_hop_to_an_origin_at_its_limit_waits_and_a_cancel_then_aborts_it() {
    let config = Config {
        max_connections_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let holder = session
        .create_task(TaskKind::Data, "b", Route::Delegate)
        .unwrap();
    holder.resume();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    follows(&core, task.id(), "http://b/");
    // Not reusable: closed; "b" is at its limit, so the task waits, holding nothing.
    assert_eq!(core.hop(task.id(), "b", false), Release::Close);
    assert!(poll_start(&core, task.id()).is_pending());
    assert_eq!(core.ledger().open_connections, 1, "the holder's only");
    task.cancel();
    let got = actions(&core);
    assert!(
        got.contains(&Action::Abort {
            task: task.id(),
            conn: None
        }),
        "{got:?}"
    );
    assert_eq!(poll_start(&core, task.id()), std::task::Poll::Ready(None));
}

#[test]
fn a_hop_made_while_suspended_leaves_its_pooled_connection_to_a_waiting_task() {
    let config = Config {
        max_connections_per_origin: 1,
        ..Config::default()
    };
    let (session, core, _delivery) = session(config, None::<Recorder>);
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let waiter = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    waiter.resume();
    actions(&core);
    follows(&core, task.id(), "http://a/next");
    // Suspended just as its IO, the redirect's body read, hops: its connection is pooled and
    // its next request waits for the resume, so the task waiting for the origin's one
    // connection must take it now, not wait beside it until it times out.
    task.suspend();
    assert_eq!(core.hop(task.id(), "a", true), Release::Pool);
    let got = actions(&core);
    assert!(
        got.contains(&Action::Start {
            task: waiter.id(),
            conn: ConnId(1),
            reused: true
        }),
        "{got:?}"
    );
    assert_eq!(core.ledger().idle_connections, 0);
}

#[test]
fn a_task_resumed_between_hops_keeps_the_connection_its_io_waits_for() {
    let (session, core, _delivery) = session(Config::default(), None::<Recorder>);
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    let (response, request) = redirect_to("http://a/next");
    core.redirect(task.id(), response, request);
    assert!(poll_redirect(&core, task.id()).is_ready());
    // Suspended as its IO hops: the connection is pooled, and the resume takes it back for
    // the IO, which waits for it in poll_start.
    task.suspend();
    assert_eq!(core.hop(task.id(), "a", true), Release::Pool);
    task.resume();
    assert_eq!(
        poll_start(&core, task.id()),
        std::task::Poll::Ready(Some(Start {
            conn: ConnId(1),
            reused: true
        })),
        "the IO between hops is handed the connection the resume gave its task"
    );
}

#[test]
fn a_refused_redirect_is_the_response() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    actions(&core);
    let (response, request) = redirect_to("http://a/next");
    core.redirect(task.id(), response, request);
    let mut heard = Vec::new();
    let mut refuse = |_: &Recorder, callback: Callback| {
        heard.push(format!("{callback:?}"));
        match callback {
            Callback::WillRedirect { .. } => Answer::Redirect(Redirect::Refuse),
            _ => Answer::Default,
        }
    };
    while delivery.try_deliver(&mut refuse) == Some(Delivered::One) {}
    assert!(heard[0].starts_with("WillRedirect"), "{heard:?}");
    assert!(heard[1].starts_with("ReceiveResponse"), "{heard:?}");
    assert!(matches!(
        poll_redirect(&core, task.id()),
        std::task::Poll::Ready(Some(Redirect::Refuse))
    ));
    assert!(actions(&core).contains(&Action::ReadBody {
        task: task.id(),
        into: None
    }));
}

#[test]
fn an_answer_given_later_stops_the_request_timeout_until_it_comes() {
    let (session, core, mut delivery) = delegated();
    let task = session
        .create_task(TaskKind::Data, "a", Route::Delegate)
        .unwrap();
    task.resume();
    let _ = core.response(task.id(), ok_response());
    let armed: Vec<TimerId> = actions(&core)
        .into_iter()
        .filter_map(|action| match action {
            Action::ArmTimer { timer, .. } if timer.timeout == Timeout::Request => Some(timer),
            _ => None,
        })
        .collect();
    let later = |_: &Recorder, _: Callback| Answer::Later;
    assert_eq!(delivery.try_deliver(later), Some(Delivered::One));
    assert_eq!(core.ledger().timers, 1, "the resource timer only");
    let disarmed = actions(&core);
    assert!(
        disarmed.contains(&Action::DisarmTimer {
            timer: *armed.last().unwrap()
        }),
        "{disarmed:?}"
    );
    // The request timer fires late, after its disarming: stale, ignored.
    core.timer_fired(*armed.last().unwrap());
    assert_eq!(task.state(), TaskState::Running);
    // Suspended and resumed meanwhile: still no request timer while the answer is pending.
    task.suspend();
    task.resume();
    assert_eq!(core.ledger().timers, 1);
    actions(&core);
    core.answer(task.id(), Answer::Disposition(Disposition::Allow));
    let got = actions(&core);
    assert!(got.iter().any(|a| matches!(
        a,
        Action::ArmTimer { timer, .. } if timer.timeout == Timeout::Request
    )));
    assert!(got.contains(&Action::ReadBody {
        task: task.id(),
        into: None
    }));
    assert_eq!(core.ledger().timers, 2);
    // A second answer is a no-op.
    core.answer(task.id(), Answer::Disposition(Disposition::Cancel));
    assert_eq!(task.state(), TaskState::Running);
}

#[test]
fn errors_name_their_kind_and_operation() {
    assert_eq!(
        Error::Closed(TaskKind::WebSocket).to_string(),
        "the websocket is closed"
    );
    assert_eq!(
        Error::OpTimedOut(Operation::Read).to_string(),
        "the read timed out; the task goes on (retry, or cancel it)"
    );
    let wrong = Error::WrongKind {
        kind: TaskKind::Stream,
        op: Operation::Send,
    };
    assert_eq!(wrong.to_string(), "a stream task cannot send");
}

#[test]
fn an_io_error_keeps_its_source() {
    use std::error::Error as _;

    let io = Error::from(std::io::Error::other("disk full"));
    let source = io.source().expect("an I/O error keeps its source");
    assert_eq!(source.to_string(), "disk full");
    assert!(Error::Cancelled.source().is_none());
}

#[test]
fn a_websocket_op_on_a_stream_is_refused_with_the_kind_and_the_op() {
    let (session, _core, _delivery) = delegated();
    let stream = session
        .create_task(TaskKind::Stream, "a", Route::Delegate)
        .unwrap();
    let refused = stream.ping().unwrap_err();
    assert!(
        matches!(
            refused,
            Error::WrongKind {
                kind: TaskKind::Stream,
                op: Operation::Ping
            }
        ),
        "{refused}"
    );
}
