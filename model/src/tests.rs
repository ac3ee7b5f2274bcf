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
    Op::CreateSession { session: S, kind }
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
