//! The lifecycle by example: each test is one short story told in ops.

use crate::rules::{check_model, check_trace};
use crate::*;

const S: SessionId = SessionId(0);
const T: TaskId = TaskId(0);
const U: TaskId = TaskId(1);

/// Apply ops in order; return every callback heard, checking the model's invariants as it goes.
fn run(model: &mut Model, ops: &[Op]) -> Vec<Callback> {
    let mut heard = Vec::new();
    for op in ops {
        let step = model.apply(op);
        assert_eq!(step.refused, None, "{op:?} refused");
        heard.extend(step.callbacks);
        check_model(model).unwrap();
    }
    heard
}

fn session(kind: SessionKind) -> Op {
    Op::CreateSession {
        session: S,
        kind,
        per_host: None,
    }
}

fn limited(kind: SessionKind, per_host: u32) -> Op {
    Op::CreateSession {
        session: S,
        kind,
        per_host: Some(per_host),
    }
}

fn task(task: TaskId, kind: TaskKind) -> Op {
    Op::CreateTask {
        session: S,
        task,
        kind,
    }
}

fn complete(task: TaskId, outcome: Outcome) -> Callback {
    Callback::Complete { task, outcome }
}

#[test]
fn a_data_task_runs_to_completion_and_pools_its_connection() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
            Op::ServerSends { task: T, bytes: 10 },
            Op::ServerEnds {
                task: T,
                reusable: true,
            },
        ],
    );
    assert_eq!(
        heard,
        [
            Callback::ReceiveResponse { task: T },
            Callback::ReceiveData { task: T, bytes: 10 },
            complete(T, Outcome::Success),
        ]
    );
    let held = m.resources(S);
    assert_eq!((held.open_connections, held.idle_connections), (0, 1));
    assert_eq!(held.live_tasks, 0);
}

#[test]
fn invalidate_and_cancel_completes_every_task_before_the_session_is_invalid() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            task(U, TaskKind::Download),
            Op::Resume(T),
        ],
    );
    let step = m.apply(&Op::InvalidateAndCancel(S));
    assert_eq!(
        step.callbacks,
        [
            complete(T, Outcome::Cancelled),
            complete(U, Outcome::Cancelled),
            Callback::BecomeInvalid { session: S },
        ]
    );
    assert!(m.resources(S).is_zero());
}

#[test]
fn dropping_the_last_handle_invalidates_once_the_running_task_ends() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::DropTask(T),
            Op::DropSession(S),
        ],
    );
    assert_eq!(m.session(S).unwrap().state, SessionState::Finishing);
    assert_eq!(m.resources(S).open_connections, 1);
    let step = m.apply(&Op::ServerFails {
        task: T,
        fault: Fault::Reset,
    });
    assert_eq!(
        step.callbacks,
        [
            complete(T, Outcome::Reset),
            Callback::BecomeInvalid { session: S }
        ]
    );
    assert!(m.resources(S).is_zero());
}

#[test]
fn a_suspended_task_without_a_handle_is_cancelled() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Upload),
            Op::DropTask(T),
        ],
    );
    assert_eq!(heard, [complete(T, Outcome::Cancelled)]);
}

#[test]
fn a_suspended_task_reads_nothing_until_resumed() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
            Op::Suspend(T),
        ],
    );
    assert_eq!(m.resources(S).timers, 0, "R7: no timers while suspended");
    for op in [
        Op::ServerSends { task: T, bytes: 5 },
        Op::ServerSends { task: T, bytes: 7 },
        Op::ServerEnds {
            task: T,
            reusable: false,
        },
    ] {
        assert_eq!(m.apply(&op).callbacks, []);
    }
    assert!(!m.allows(&Op::TimePasses {
        task: T,
        timer: Timer::Request
    }));
    assert_eq!(
        m.apply(&Op::Resume(T)).callbacks,
        [
            Callback::ReceiveData { task: T, bytes: 5 },
            Callback::ReceiveData { task: T, bytes: 7 },
            complete(T, Outcome::Success),
        ]
    );
    assert_eq!(m.resources(S).idle_connections, 0, "not reusable: closed");
}

#[test]
fn suspend_twice_resume_once_runs_the_task() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Plain),
            task(T, TaskKind::Data),
            Op::Suspend(T),
            Op::Suspend(T),
            Op::Resume(T),
        ],
    );
    assert_eq!(m.task(T).unwrap().state, TaskState::Running);
}

#[test]
fn a_task_created_after_invalidation_began_is_refused() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::FinishTasksAndInvalidate(S),
        ],
    );
    let step = m.apply(&task(U, TaskKind::Data));
    assert_eq!(step.refused, Some(Refusal::SessionInvalidated));
    assert!(m.task(U).is_none(), "R8: nothing allocated");
    assert_eq!(m.resources(S).live_tasks, 1);
}

#[test]
fn a_download_hands_over_its_file_then_completes() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeDownload,
            },
        ],
    );
    assert_eq!(m.resources(S).temp_files, 1);
    let step = m.apply(&Op::ServerEnds {
        task: T,
        reusable: true,
    });
    let mut all = heard;
    all.extend(step.callbacks);
    assert_eq!(
        all,
        [
            Callback::ReceiveResponse { task: T },
            Callback::BecomeDownload { task: T },
            Callback::FinishDownloading { task: T },
            complete(T, Outcome::Success),
        ]
    );
    assert_eq!(m.resources(S).temp_files, 0);
    check_trace(&all, false).unwrap();
}

#[test]
fn become_download_on_an_upload_is_a_typed_error() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Upload),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeDownload,
            },
        ],
    );
    assert_eq!(
        heard.last(),
        Some(&complete(T, Outcome::InvalidDisposition))
    );
}

#[test]
fn the_shared_session_ignores_invalidation_but_its_idle_connections_expire() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Shared),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
            Op::ServerEnds {
                task: T,
                reusable: true,
            },
            Op::InvalidateAndCancel(S),
            Op::DropSession(S),
        ],
    );
    assert_eq!(m.session(S).unwrap().state, SessionState::Active);
    assert_eq!(m.resources(S).idle_connections, 1);
    m.apply(&Op::IdleTimeoutPasses(S));
    assert_eq!(m.resources(S).idle_connections, 0);
}

#[test]
fn a_timeout_closes_the_connection() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::TimePasses {
                task: T,
                timer: Timer::Request,
            },
        ],
    );
    assert_eq!(heard, [complete(T, Outcome::TimedOut(Timer::Request))]);
    assert!(m.resources(S).open_connections == 0 && m.resources(S).idle_connections == 0);
}

#[test]
fn the_trace_checker_catches_both_rules() {
    let done = complete(T, Outcome::Success);
    let data = Callback::ReceiveData { task: T, bytes: 1 };
    let invalid = Callback::BecomeInvalid { session: S };
    assert_eq!(
        check_trace(&[done, data], false).unwrap_err().rule,
        rules::Rule::R1
    );
    assert_eq!(
        check_trace(&[done, done], false).unwrap_err().rule,
        rules::Rule::R1
    );
    assert_eq!(
        check_trace(&[data, invalid], false).unwrap_err().rule,
        rules::Rule::R2
    );
    assert_eq!(
        check_trace(&[done, invalid, invalid], true)
            .unwrap_err()
            .rule,
        rules::Rule::R2
    );
    assert_eq!(
        check_trace(&[done], true).unwrap_err().rule,
        rules::Rule::R2
    );
    check_trace(&[data, done, invalid], true).unwrap();
}

#[test]
fn coalesce_merges_adjacent_chunks_of_one_task_only() {
    let d = |task, bytes| Callback::ReceiveData { task, bytes };
    assert_eq!(
        rules::coalesce(&[d(T, 1), d(T, 2), d(U, 3), d(T, 4)]),
        [d(T, 3), d(U, 3), d(T, 4)]
    );
}

// ---- streams ----

/// Apply one op and return what it returned.
fn returned(model: &mut Model, op: Op) -> Option<Returned> {
    let step = model.apply(&op);
    assert_eq!(step.refused, None, "{op:?} refused");
    check_model(model).unwrap();
    step.returned
}

#[test]
fn a_stream_reads_no_further_than_its_read_ahead() {
    let mut m = Model::with_read_ahead(100);
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Stream),
            Op::Resume(T),
            Op::ServerSends { task: T, bytes: 70 },
            Op::ServerSends { task: T, bytes: 70 },
        ],
    );
    // R6: 100 held, 40 still in the network.
    assert_eq!(m.resources(S).buffered_bytes, 100);
    assert_eq!(m.task(T).unwrap().unread_bytes(), 40);
    assert_eq!(returned(&mut m, Op::Read(T)), Some(Returned::Read(100)));
    assert_eq!(m.resources(S).buffered_bytes, 40);
    run(
        &mut m,
        &[Op::ServerEnds {
            task: T,
            reusable: true,
        }],
    );
    assert_eq!(returned(&mut m, Op::Read(T)), Some(Returned::Read(40)));
    assert_eq!(returned(&mut m, Op::Read(T)), Some(Returned::Eof));
    assert_eq!(m.apply(&Op::Read(T)).refused, Some(Refusal::ReadClosed));
    // Both halves closed: done, and the connection closes (a stream is never pooled).
    let heard = run(&mut m, &[Op::CloseWrite(T)]);
    assert_eq!(heard, [complete(T, Outcome::Success)]);
    assert_eq!(
        m.resources(S),
        Resources {
            live_tasks: 0,
            delegate_held: true,
            ..Resources::default()
        }
    );
    assert_eq!(m.apply(&Op::Write(T)).refused, Some(Refusal::Closed));
}

#[test]
fn cancelling_a_stream_before_any_read_releases_its_read_ahead() {
    // The seed's repro: the server offers more than the window; the stream is cancelled.
    let mut m = Model::with_read_ahead(64);
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Stream),
            Op::Resume(T),
            Op::ServerSends {
                task: T,
                bytes: 8_000_000,
            },
        ],
    );
    assert_eq!(m.resources(S).buffered_bytes, 64);
    let heard = run(&mut m, &[Op::Cancel(T), Op::FinishTasksAndInvalidate(S)]);
    assert_eq!(
        heard,
        [
            complete(T, Outcome::Cancelled),
            Callback::BecomeInvalid { session: S }
        ]
    );
    assert!(m.resources(S).is_zero());
}

#[test]
fn a_data_task_becomes_a_stream_that_keeps_the_unread_body() {
    let mut m = Model::with_read_ahead(10);
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::Suspend(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeStream,
            },
            Op::ServerSends { task: T, bytes: 25 },
            Op::ServerEnds {
                task: T,
                reusable: true,
            },
            Op::Resume(T),
        ],
    );
    assert_eq!(
        heard,
        [
            Callback::ReceiveResponse { task: T },
            Callback::BecomeStream { task: T }
        ]
    );
    let t = m.task(T).unwrap();
    assert_eq!(
        (t.kind, t.buffered, t.timers_armed()),
        (TaskKind::Stream, 10, false)
    );
    assert_eq!(m.apply(&Op::Write(T)).refused, Some(Refusal::WriteClosed));
    for expected in [10, 10, 5] {
        assert_eq!(
            returned(&mut m, Op::Read(T)),
            Some(Returned::Read(expected))
        );
    }
    // A response's stream has no write half: the end of the body ends it.
    let step = m.apply(&Op::Read(T));
    assert_eq!(step.returned, Some(Returned::Eof));
    assert_eq!(step.callbacks, [complete(T, Outcome::Success)]);
    assert_eq!(m.resources(S).idle_connections, 0);
}

#[test]
fn become_stream_on_a_download_is_a_typed_error_and_a_dropped_stream_is_cancelled() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Download),
            task(U, TaskKind::Stream),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeStream,
            },
            Op::Resume(U),
            Op::DropTask(U),
        ],
    );
    assert_eq!(
        heard,
        [
            Callback::ReceiveResponse { task: T },
            complete(T, Outcome::InvalidDisposition),
            complete(U, Outcome::Cancelled),
        ]
    );
}

#[test]
fn a_stream_is_reset_only_while_it_reads() {
    let mut m = Model::with_read_ahead(10);
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Stream),
            Op::Resume(T),
            Op::ServerSends { task: T, bytes: 10 },
        ],
    );
    // Full, it reads nothing: a reset now would race the user's next write and lose what
    // the kernels hold, which the model cannot tell. The alphabet leaves it out.
    let reset = Op::ServerFails {
        task: T,
        fault: Fault::Reset,
    };
    assert!(!m.allows(&reset));
    // Nor can raw bytes be malformed.
    assert!(!m.allows(&Op::ServerFails {
        task: T,
        fault: Fault::Malformed,
    }));
    assert_eq!(returned(&mut m, Op::Read(T)), Some(Returned::Read(10)));
    assert!(m.allows(&reset));
    let heard = run(&mut m, &[reset]);
    assert_eq!(heard, [complete(T, Outcome::Reset)]);
    assert_eq!(m.apply(&Op::Read(T)).refused, Some(Refusal::Closed));
}

// ---- websockets ----

fn open_websocket(m: &mut Model) -> Vec<Callback> {
    run(
        m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::WebSocket),
            Op::Resume(T),
            Op::ServerAnswersUpgrade {
                task: T,
                accept: true,
            },
        ],
    )
}

#[test]
fn a_websocket_opens_holds_one_message_and_completes_on_the_peers_close() {
    let mut m = Model::new();
    assert_eq!(open_websocket(&mut m), [Callback::Open { task: T }]);
    assert_eq!(m.resources(S).timers, 0, "an open websocket has no timer");
    run(
        &mut m,
        &[
            Op::ServerSends { task: T, bytes: 5 },
            Op::ServerSends { task: T, bytes: 7 },
            Op::PeerCloses {
                task: T,
                frame: CloseFrame::Code,
            },
        ],
    );
    // One message held; the next and the close wait in the network.
    assert_eq!(m.resources(S).buffered_bytes, 5);
    assert_eq!(
        returned(&mut m, Op::Receive(T)),
        Some(Returned::Received(Some(5)))
    );
    let step = m.apply(&Op::Receive(T));
    assert_eq!(step.returned, Some(Returned::Received(Some(7))));
    // The close is read once the last message is taken.
    assert_eq!(
        step.callbacks,
        [Callback::Close { task: T }, complete(T, Outcome::Success)]
    );
    // Receive after a normal close errors.
    assert_eq!(m.apply(&Op::Receive(T)).refused, Some(Refusal::Closed));
}

#[test]
fn a_refused_upgrade_gives_only_did_complete() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::WebSocket),
            Op::Resume(T),
            Op::ServerAnswersUpgrade {
                task: T,
                accept: false,
            },
        ],
    );
    assert_eq!(heard, [complete(T, Outcome::NoUpgrade)]);
}

#[test]
fn our_close_to_a_silent_peer_completes_at_the_close_deadline() {
    // The seed's repro: cancel_with(going away), finish_tasks_and_invalidate, silent peer.
    let mut m = Model::new();
    open_websocket(&mut m);
    let heard = run(
        &mut m,
        &[
            Op::ServerSends { task: T, bytes: 3 },
            Op::CloseWith(T),
            Op::FinishTasksAndInvalidate(S),
        ],
    );
    assert!(heard.is_empty());
    let t = m.task(T).unwrap();
    assert_eq!(
        (t.state, t.armed(Timer::Close)),
        (TaskState::Canceling, true)
    );
    assert_eq!(
        m.resources(S).buffered_bytes,
        0,
        "closing drops what was held"
    );
    assert_eq!(m.session(S).unwrap().state, SessionState::Finishing);
    let heard = run(
        &mut m,
        &[Op::TimePasses {
            task: T,
            timer: Timer::Close,
        }],
    );
    assert_eq!(
        heard,
        [
            complete(T, Outcome::TimedOut(Timer::Close)),
            Callback::BecomeInvalid { session: S }
        ]
    );
    assert!(m.resources(S).is_zero());
}

#[test]
fn our_close_answered_by_the_peer_records_did_close() {
    let mut m = Model::new();
    open_websocket(&mut m);
    run(&mut m, &[Op::CloseWith(T)]);
    assert_eq!(m.apply(&Op::Receive(T)).refused, Some(Refusal::Closed));
    let heard = run(
        &mut m,
        &[
            Op::ServerSends { task: T, bytes: 9 },
            Op::PeerCloses {
                task: T,
                frame: CloseFrame::NoCode,
            },
        ],
    );
    assert_eq!(
        heard,
        [Callback::Close { task: T }, complete(T, Outcome::Success)]
    );
}

#[test]
fn a_peer_close_with_an_invalid_code_is_a_protocol_error_without_did_close() {
    for closing in [false, true] {
        let mut m = Model::new();
        open_websocket(&mut m);
        if closing {
            run(&mut m, &[Op::CloseWith(T)]);
        }
        let heard = run(
            &mut m,
            &[Op::PeerCloses {
                task: T,
                frame: CloseFrame::InvalidCode,
            }],
        );
        assert_eq!(
            heard,
            [complete(T, Outcome::Malformed)],
            "closing: {closing}"
        );
        let held = m.resources(S);
        assert_eq!(
            (held.open_connections, held.live_tasks, held.timers),
            (0, 0, 0),
            "closing: {closing}"
        );
    }
}

#[test]
fn a_dropped_tcp_connection_completes_an_open_websocket_with_an_error() {
    let mut m = Model::new();
    open_websocket(&mut m);
    let heard = run(
        &mut m,
        &[Op::ServerFails {
            task: T,
            fault: Fault::Reset,
        }],
    );
    assert_eq!(heard, [complete(T, Outcome::Reset)]);
}

#[test]
fn dropping_an_open_websocket_closes_it_and_cancel_cuts_the_handshake_short() {
    let mut m = Model::new();
    open_websocket(&mut m);
    run(
        &mut m,
        &[task(U, TaskKind::WebSocket), Op::Resume(U), Op::DropTask(T)],
    );
    assert_eq!(m.task(T).unwrap().state, TaskState::Canceling);
    // Not open yet: nothing to close, so it is cancelled.
    let heard = run(&mut m, &[Op::CloseWith(U), Op::InvalidateAndCancel(S)]);
    assert_eq!(
        heard,
        [
            complete(U, Outcome::Cancelled),
            complete(T, Outcome::Cancelled),
            Callback::BecomeInvalid { session: S }
        ]
    );
}

#[test]
fn a_task_waits_for_its_hosts_slot_with_its_timers_running_and_takes_the_pooled_connection() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 1),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            Op::Resume(T),
            Op::Resume(U),
        ],
    );
    let waiting = m.task(U).unwrap();
    assert_eq!(waiting.exchange, Exchange::AwaitingConnection);
    assert!(!waiting.connection, "no connection while it waits");
    assert!(
        waiting.armed(Timer::Request) && waiting.armed(Timer::Resource),
        "R12"
    );
    assert!(!m.allows(&Op::ServerHeaders {
        task: U,
        answer: Disposition::Allow
    }));
    assert_eq!(m.resources(S).open_connections, 1);
    run(
        &mut m,
        &[
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
            Op::ServerEnds {
                task: T,
                reusable: true,
            },
        ],
    );
    // T's connection went to the pool and U took it at once.
    let started = m.task(U).unwrap();
    assert_eq!(started.exchange, Exchange::AwaitingResponse);
    assert_eq!(started.server, ServerPhase::RequestReceived);
    assert_eq!(m.resources(S).idle_connections, 0);
    assert_eq!(m.resources(S).open_connections, 1);
}

#[test]
fn a_waiting_task_that_times_out_or_is_suspended_leaves_nothing_behind() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 1),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            task(TaskId(2), TaskKind::Data),
            Op::Resume(T),
            Op::Resume(U),
            Op::Resume(TaskId(2)),
            Op::TimePasses {
                task: U,
                timer: Timer::Resource,
            },
            Op::Suspend(TaskId(2)),
        ],
    );
    assert_eq!(heard, [complete(U, Outcome::TimedOut(Timer::Resource))]);
    let suspended = m.task(TaskId(2)).unwrap();
    assert_eq!(
        suspended.exchange,
        Exchange::NotStarted,
        "it gave up its place"
    );
    assert_eq!(suspended.armed_timers(), 0, "R7");
    assert!(m.session(S).unwrap().waiting.is_empty());
    // T fails: its slot is free, and the resumed task takes it.
    run(
        &mut m,
        &[
            Op::ServerFails {
                task: T,
                fault: Fault::Reset,
            },
            Op::Resume(TaskId(2)),
        ],
    );
    assert_eq!(
        m.task(TaskId(2)).unwrap().exchange,
        Exchange::AwaitingResponse
    );
}

#[test]
fn streams_websockets_and_a_response_made_a_stream_take_no_http_slot() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 1),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            task(TaskId(2), TaskKind::WebSocket),
            task(TaskId(3), TaskKind::Stream),
            Op::Resume(TaskId(2)),
            Op::Resume(TaskId(3)),
            Op::Resume(T),
            Op::Resume(U),
        ],
    );
    assert_eq!(m.task(T).unwrap().exchange, Exchange::AwaitingResponse);
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingConnection);
    run(
        &mut m,
        &[Op::ServerHeaders {
            task: T,
            answer: Disposition::BecomeStream,
        }],
    );
    // T's connection is its stream's now: U takes a new one.
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingResponse);
    assert_eq!(m.resources(S).open_connections, 4);
}

fn awaiting(task: TaskId, kind: TaskKind) -> Op {
    Op::Await {
        session: S,
        task,
        kind,
    }
}

#[test]
fn a_convenience_runs_from_its_first_poll_and_returns_its_result_to_nobody_else() {
    let mut m = Model::new();
    let step = |m: &mut Model, op: Op| {
        let step = m.apply(&op);
        check_model(m).unwrap();
        step
    };
    step(&mut m, session(SessionKind::Delegated));
    let first = step(&mut m, awaiting(T, TaskKind::Download));
    assert_eq!(first.refused, None);
    let t = m.task(T).unwrap();
    assert_eq!((t.state, t.route), (TaskState::Running, Route::Future));
    assert_eq!(
        m.resources(S).timers,
        2,
        "its timeouts count from the first poll"
    );
    // Resume, suspend and cancel are not the future's to offer.
    assert!(!m.allows(&Op::Resume(T)) && !m.allows(&Op::Cancel(T)));
    let head = step(
        &mut m,
        Op::ServerHeaders {
            task: T,
            answer: Disposition::Cancel,
        },
    );
    assert!(head.callbacks.is_empty(), "no delegate hears a convenience");
    assert_eq!(m.resources(S).temp_files, 1, "every response is allowed");
    let end = step(
        &mut m,
        Op::ServerEnds {
            task: T,
            reusable: true,
        },
    );
    assert!(end.callbacks.is_empty());
    assert_eq!(end.awaited, [(T, Outcome::Success)]);
    let held = m.resources(S);
    assert_eq!((held.temp_files, held.idle_connections), (0, 1));
}

#[test]
fn a_queued_convenience_times_out_and_a_dropped_one_is_cancelled_silently() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Plain, 1),
            awaiting(T, TaskKind::Data),
            awaiting(U, TaskKind::Upload),
        ],
    );
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingConnection);
    let timed_out = m.apply(&Op::TimePasses {
        task: U,
        timer: Timer::Resource,
    });
    assert_eq!(timed_out.awaited, [(U, Outcome::TimedOut(Timer::Resource))]);
    assert!(m.session(S).unwrap().waiting.is_empty());
    let dropped = m.apply(&Op::DropTask(T));
    assert!(
        dropped.awaited.is_empty(),
        "a dropped future returns nothing"
    );
    assert_eq!(m.task(T).unwrap().state, TaskState::Completed);
    assert!(m.resources(S).open_connections == 0 && m.resources(S).live_tasks == 0);
}

#[test]
fn a_running_convenience_holds_its_session_after_the_user_let_go() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            awaiting(T, TaskKind::Data),
            Op::DropSession(S),
        ],
    );
    assert!(heard.is_empty());
    assert_eq!(m.session(S).unwrap().state, SessionState::Active);
    let end = m.apply(&Op::ServerFails {
        task: T,
        fault: Fault::Reset,
    });
    assert_eq!(end.awaited, [(T, Outcome::Reset)]);
    // The future returned with the session's last clone: R10, and nothing is left to finish.
    assert_eq!(end.callbacks, [Callback::BecomeInvalid { session: S }]);
    assert_eq!(m.session(S).unwrap().state, SessionState::Invalidated);
    assert!(m.resources(S).is_zero());
}

#[test]
fn a_convenience_after_invalidation_began_is_refused_and_invalidate_and_cancel_ends_one() {
    let mut m = Model::new();
    run(
        &mut m,
        &[session(SessionKind::Plain), awaiting(T, TaskKind::Data)],
    );
    let cancelled = m.apply(&Op::InvalidateAndCancel(S));
    assert_eq!(cancelled.awaited, [(T, Outcome::Cancelled)]);
    let mut m = Model::new();
    run(
        &mut m,
        &[session(SessionKind::Plain), Op::FinishTasksAndInvalidate(S)],
    );
    let refused = m.apply(&awaiting(T, TaskKind::Data));
    assert_eq!(refused.refused, Some(Refusal::SessionInvalidated));
    assert!(m.task(T).is_none(), "R8: nothing allocated");
}

#[test]
fn two_ops_at_once_have_the_outcomes_of_their_two_serial_orders() {
    let mut m = Model::new();
    run(&mut m, &[session(SessionKind::Delegated)]);
    let par = Op::Par(
        Box::new(task(T, TaskKind::Data)),
        Box::new(Op::InvalidateAndCancel(S)),
    );
    assert!(m.allows(&par));
    let orders = m.linearizations(&par);
    assert_eq!(orders.len(), 2);
    // Created, then cancelled with the rest: its did_complete comes before did_become_invalid.
    let (created, step) = &orders[0];
    assert_eq!(step.refused, None);
    assert_eq!(
        step.callbacks,
        [
            complete(T, Outcome::Cancelled),
            Callback::BecomeInvalid { session: S }
        ]
    );
    assert_eq!(created.task(T).unwrap().state, TaskState::Completed);
    // Invalidated first: the creation is refused and nothing is allocated (R8).
    let (refused, step) = &orders[1];
    assert_eq!(step.refused, Some(Refusal::SessionInvalidated));
    assert_eq!(step.callbacks, [Callback::BecomeInvalid { session: S }]);
    assert!(refused.task(T).is_none());
    // The model's own apply takes the order as written.
    assert_eq!(m.clone().apply(&par), orders[0].1);
}

#[test]
fn par_takes_only_user_ops_of_one_session_allowed_in_either_order() {
    let mut m = Model::new();
    run(
        &mut m,
        &[session(SessionKind::Plain), task(T, TaskKind::Data)],
    );
    let par = |a: Op, b: Op| Op::Par(Box::new(a), Box::new(b));
    assert!(m.allows(&par(Op::Resume(T), Op::Cancel(T))));
    // Dropping the handle first leaves no handle to resume with.
    assert!(!m.allows(&par(Op::DropTask(T), Op::Resume(T))));
    // Two creations would race for the same id.
    assert!(!m.allows(&par(task(U, TaskKind::Data), task(U, TaskKind::Upload))));
    // The server is not a user.
    assert!(!m.allows(&par(
        Op::Resume(T),
        Op::ServerFails {
            task: T,
            fault: Fault::Reset
        }
    )));
}

#[test]
fn a_slow_delegate_holds_the_queue_and_a_full_window_stops_the_read() {
    let mut m = Model::new();
    let window = m.read_ahead();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            Op::Resume(T),
            task(U, TaskKind::Data),
            Op::Resume(U),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
            Op::DelegateBlocks(S),
        ],
    );
    // Stuck in did_receive_response: U's answer waits behind it, and U reads nothing.
    let head = m.apply(&Op::ServerHeaders {
        task: U,
        answer: Disposition::Allow,
    });
    assert_eq!(head.callbacks, [Callback::ReceiveResponse { task: U }]);
    assert_eq!(
        m.session(S).unwrap().pace,
        Pace::Stuck(Callback::ReceiveResponse { task: U })
    );
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingDisposition);
    // T's body passes (did_receive_data returns), but not its end: did_complete would stick.
    let sent = m.apply(&Op::ServerSends {
        task: T,
        bytes: 3 * window as u32,
    });
    assert!(
        sent.callbacks.is_empty(),
        "queued behind the stuck callback"
    );
    assert_eq!(
        m.task(T).unwrap().undelivered,
        window,
        "R6: one window, no more"
    );
    assert_eq!(m.resources(S).buffered_bytes, window);
    assert!(m.task(T).unwrap().behind());
    assert!(!m.allows(&Op::TimePasses {
        task: T,
        timer: Timer::Request
    }));
    // Cancelled behind the queue: its body goes, its did_complete is next in line.
    m.apply(&Op::Cancel(T));
    assert_eq!(m.resources(S).buffered_bytes, 0, "R5");
    let returned = m.apply(&Op::DelegateReturns(S));
    assert_eq!(returned.callbacks, [complete(T, Outcome::Cancelled)]);
    assert_eq!(m.task(U).unwrap().exchange, Exchange::ReceivingBody);
    check_model(&m).unwrap();
}

#[test]
fn a_delegate_stuck_in_did_become_invalid_is_held_until_it_returns() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            Op::DelegateBlocks(S),
            Op::InvalidateAndCancel(S),
        ],
    );
    let session = m.session(S).unwrap();
    assert_eq!(session.state, SessionState::Invalidated);
    assert!(
        m.resources(S).delegate_held,
        "R3: until did_become_invalid returns"
    );
    m.apply(&Op::DelegateReturns(S));
    assert!(m.resources(S).is_zero());
}

#[test]
fn an_answer_given_later_holds_the_body_and_the_request_timer_until_it_comes() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            Op::Resume(T),
            Op::Resume(U),
            Op::DelegateDefers(S),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeDownload,
            },
            Op::ServerSends { task: T, bytes: 10 },
        ],
    );
    assert_eq!(heard, [Callback::ReceiveResponse { task: T }]);
    let t = m.task(T).unwrap();
    assert!(t.responder && t.deferred());
    assert_eq!(t.unread_bytes(), 10, "nothing is read before the answer");
    assert!(
        !t.armed(Timer::Request),
        "R12: the network is not what it waits on"
    );
    assert!(t.armed(Timer::Resource));
    // The session's other callbacks go on meanwhile, and U's answer is given at once.
    let other = m.apply(&Op::ServerHeaders {
        task: U,
        answer: Disposition::Allow,
    });
    assert_eq!(other.callbacks, [Callback::ReceiveResponse { task: U }]);
    assert_eq!(m.task(U).unwrap().exchange, Exchange::ReceivingBody);
    let answered = m.apply(&Op::Answer(T));
    assert_eq!(answered.callbacks, [Callback::BecomeDownload { task: T }]);
    let t = m.task(T).unwrap();
    assert!(!t.responder && t.temp_file && t.armed(Timer::Request));
    assert_eq!(t.unread_bytes(), 0);
    assert!(!m.allows(&Op::Answer(T)), "a responder answers once");
}

#[test]
fn a_responder_dropped_unanswered_cancels_its_task_and_one_outliving_it_does_nothing() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Upload),
            Op::Resume(T),
            Op::DelegateDefers(S),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::Allow,
            },
        ],
    );
    let dropped = m.apply(&Op::DropResponder(T));
    assert_eq!(dropped.callbacks, [complete(T, Outcome::Cancelled)]);
    assert_eq!(m.resources(S).open_connections, 0, "R5");
    // A responder kept for a task that is over answers nothing.
    run(
        &mut m,
        &[
            task(U, TaskKind::Data),
            Op::Resume(U),
            Op::DelegateDefers(S),
            Op::ServerHeaders {
                task: U,
                answer: Disposition::Allow,
            },
            Op::Cancel(U),
            Op::FinishTasksAndInvalidate(S),
        ],
    );
    assert_eq!(m.session(S).unwrap().state, SessionState::Invalidated);
    let late = m.apply(&Op::Answer(U));
    assert!(late.callbacks.is_empty());
    assert!(m.resources(S).is_zero(), "R4: a responder holds nothing");
}

#[test]
fn a_followed_redirect_pools_its_connection_and_waits_its_turn_for_one() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 1),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            Op::Resume(T),
            Op::Resume(U),
            Op::ServerRedirects {
                task: T,
                answer: Redirect::Follow,
            },
        ],
    );
    assert_eq!(heard, [Callback::WillRedirect { task: T }]);
    // The next request goes on the redirect's connection, ahead of U, which waits for one.
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingConnection);
    let t = m.task(T).unwrap();
    assert_eq!((t.exchange, t.hops), (Exchange::AwaitingResponse, 1));
    assert!(t.connection && t.armed(Timer::Request) && t.armed(Timer::Resource));
    assert_eq!(t.server, ServerPhase::RequestReceived);
    let heard = run(
        &mut m,
        &[
            Op::ServerRedirects {
                task: T,
                answer: Redirect::Follow,
            },
            Op::ServerRedirects {
                task: T,
                answer: Redirect::Follow,
            },
        ],
    );
    assert_eq!(
        heard.last(),
        Some(&complete(T, Outcome::TooManyRedirects)),
        "{heard:?}"
    );
    assert_eq!(m.resources(S).idle_connections, 0, "R5: closed, not pooled");
    // Its slot is free: U takes a new connection.
    assert_eq!(m.task(U).unwrap().exchange, Exchange::AwaitingResponse);
    assert_eq!(m.resources(S).open_connections, 1);
}

#[test]
fn a_refused_redirect_is_the_response_and_an_answer_later_holds_the_hop() {
    let mut m = Model::new();
    let heard = run(
        &mut m,
        &[
            session(SessionKind::Delegated),
            task(T, TaskKind::Upload),
            Op::Resume(T),
            Op::ServerRedirects {
                task: T,
                answer: Redirect::Refuse,
            },
        ],
    );
    assert_eq!(
        heard,
        [
            Callback::WillRedirect { task: T },
            Callback::ReceiveResponse { task: T },
            complete(T, Outcome::Success),
        ]
    );
    assert_eq!(m.resources(S).idle_connections, 1, "read whole: pooled");
    let heard = run(
        &mut m,
        &[
            task(U, TaskKind::Download),
            Op::Resume(U),
            Op::DelegateDefers(S),
            Op::ServerRedirects {
                task: U,
                answer: Redirect::Follow,
            },
            Op::Suspend(U),
        ],
    );
    assert_eq!(heard, [Callback::WillRedirect { task: U }]);
    assert!(m.task(U).unwrap().deferred());
    // Answered while suspended: it reads nothing, so it follows once resumed (R7).
    m.apply(&Op::Answer(U));
    let u = m.task(U).unwrap();
    assert_eq!(
        (u.exchange, u.connection),
        (Exchange::FollowingRedirect, true)
    );
    assert_eq!((u.armed_timers(), u.hops), (0, 0), "R7");
    m.apply(&Op::Resume(U));
    let u = m.task(U).unwrap();
    assert_eq!(
        (u.exchange, u.server),
        (Exchange::AwaitingResponse, ServerPhase::RequestReceived)
    );
    assert_eq!((u.hops, u.connection), (1, true));
}

fn fetch(task: TaskId, resource: u8) -> Op {
    Op::Fetch {
        session: S,
        task,
        resource: ResourceId(resource),
    }
}

#[test]
fn a_cached_response_answers_without_the_network_and_the_least_recently_used_goes_first() {
    let mut m = Model::new();
    let hit = TaskId(2);
    let step = m.apply(&session(SessionKind::Plain));
    assert!(step.callbacks.is_empty());
    let missed = m.apply(&fetch(T, 0));
    assert_eq!(missed.awaited, [(T, Outcome::Success)]);
    let held = m.resources(S);
    assert_eq!((held.cached_responses, held.idle_connections), (1, 1));
    m.apply(&fetch(U, 1));
    // A hit takes the pooled connection's slot and gives it back unused.
    let answered = m.apply(&fetch(hit, 0));
    assert_eq!(answered.awaited, [(hit, Outcome::Success)]);
    assert_eq!(m.resources(S).idle_connections, 1);
    // r2 evicts r1, the least recently used: r0 was used last.
    m.apply(&fetch(TaskId(3), 2));
    let cache: Vec<_> = m.session(S).unwrap().cache.iter().copied().collect();
    assert_eq!(cache, [ResourceId(0), ResourceId(2)]);
    m.apply(&Op::Reset(S));
    let held = m.resources(S);
    assert_eq!((held.cached_responses, held.idle_connections), (0, 0));
    m.apply(&fetch(TaskId(4), 0));
    m.apply(&Op::FinishTasksAndInvalidate(S));
    assert!(m.resources(S).is_zero(), "R4: nothing cached either");
}

#[test]
fn a_read_let_by_a_delegates_return_may_come_before_or_after_its_next_callback() {
    // A slow delegate is in t0's did_receive_response; the user drops t0 and the server
    // resets it; the delegate returns, answering become-stream.
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 1),
            Op::DelegateBlocks(S),
            task(T, TaskKind::Data),
            Op::Resume(T),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeStream,
            },
            Op::DropTask(T),
            Op::ServerFails {
                task: T,
                fault: Fault::Reset,
            },
        ],
    );
    let returns = Op::DelegateReturns(S);
    let orders = m.linearizations(&returns);
    assert_eq!(orders.len(), 2);
    // The stream's IO reads the reset at once: the task fails before the delegate, handed the
    // stream, lets go of it.
    let (_, first) = &orders[0];
    assert!(
        first.callbacks.contains(&complete(T, Outcome::Reset)),
        "{first:?}"
    );
    // Or the delegate's let-go comes first: nobody holds the stream, it is cancelled, and the
    // reset finds it completed.
    let (lagged, second) = &orders[1];
    assert!(
        second.callbacks.contains(&complete(T, Outcome::Cancelled)),
        "{second:?}"
    );
    check_model(lagged).unwrap();
    assert_eq!(
        lagged.resources(S),
        orders[0].0.resources(S),
        "nothing held longer"
    );
    // The model's own apply reads at once.
    assert_eq!(m.clone().apply(&returns), orders[0].1);
    // Where the orders cannot differ, there is one outcome.
    let mut prompt = Model::new();
    run(
        &mut prompt,
        &[session(SessionKind::Delegated), Op::DelegateBlocks(S)],
    );
    assert_eq!(prompt.linearizations(&returns).len(), 1);
}

#[test]
fn two_ops_that_would_admit_a_waiting_fetch_are_not_run_at_once() {
    // Two data tasks hold both of the host's slots; a fetch and a convenience wait.
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 2),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            Op::Resume(U),
            Op::Resume(T),
            Op::Fetch {
                session: S,
                task: TaskId(2),
                resource: ResourceId(0),
            },
            awaiting(TaskId(3), TaskKind::Data),
        ],
    );
    // Either cancel alone admits the fetch, which the server answers whole at once: in both
    // serial orders its pooled connection is there for the convenience, which a system that
    // cancels both first need not show.
    let par = Op::Par(Box::new(Op::Cancel(U)), Box::new(Op::Cancel(T)));
    assert!(m.allows(&Op::Cancel(U)) && m.allows(&Op::Cancel(T)));
    assert!(!m.allows(&par));
    // With no fetch waiting, the two cancels may run at once.
    let mut plain = Model::new();
    run(
        &mut plain,
        &[
            limited(SessionKind::Delegated, 2),
            task(T, TaskKind::Data),
            task(U, TaskKind::Data),
            Op::Resume(U),
            Op::Resume(T),
            awaiting(TaskId(3), TaskKind::Data),
        ],
    );
    assert!(plain.allows(&par));
}

#[test]
fn a_fetch_admitted_as_a_delegate_returns_may_be_answered_after_its_next_callback() {
    let mut m = Model::new();
    run(
        &mut m,
        &[
            limited(SessionKind::Delegated, 2),
            task(T, TaskKind::Data),
            Op::DelegateBlocks(S),
            task(U, TaskKind::Download),
            Op::Resume(U),
            Op::Resume(T),
            task(TaskId(2), TaskKind::Data),
            Op::ServerHeaders {
                task: T,
                answer: Disposition::BecomeStream,
            },
            Op::Fetch {
                session: S,
                task: TaskId(3),
                resource: ResourceId(0),
            },
            Op::ServerHeaders {
                task: U,
                answer: Disposition::Cancel,
            },
            Op::Resume(TaskId(2)),
        ],
    );
    let orders = m.linearizations(&Op::DelegateReturns(S));
    assert_eq!(orders.len(), 2);
    // Answered at once: its pooled connection goes to t2 as t1's cancel frees a slot.
    assert_eq!(orders[0].0.resources(S).idle_connections, 0);
    // Answered after the cancel: t2 took a new connection, the fetch's is idle after.
    assert_eq!(orders[1].0.resources(S).idle_connections, 1);
    for (model, step) in &orders {
        check_model(model).unwrap();
        assert!(
            step.awaited.contains(&(TaskId(3), Outcome::Success)),
            "{step:?}"
        );
    }
}
