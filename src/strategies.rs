//! Generators of ops: every op family the model allows in the current state, weighted so that
//! tasks make progress (the environment acts often) and sequences still reach invalidation.

use proptest::prelude::*;
use proptest::strategy::Union;

use leakproof_model::{
    Disposition, Fault, Model, Op, ServerPhase, SessionId, SessionKind, TaskId, TaskKind, Timer,
};

/// How big generated worlds get: enough to race sessions and tasks against each other, small
/// enough that every op has a fair chance to hit every task.
pub const MAX_SESSIONS: u32 = 3;
pub const MAX_TASKS: u32 = 8;

pub fn session_kind() -> impl Strategy<Value = SessionKind> + Clone {
    prop_oneof![
        6 => Just(SessionKind::Delegated),
        2 => Just(SessionKind::Plain),
        1 => Just(SessionKind::Shared),
    ]
}

pub fn task_kind() -> impl Strategy<Value = TaskKind> + Clone {
    prop_oneof![
        Just(TaskKind::Data),
        Just(TaskKind::Download),
        Just(TaskKind::Upload),
    ]
}

pub fn disposition() -> impl Strategy<Value = Disposition> + Clone {
    prop_oneof![
        6 => Just(Disposition::Allow),
        1 => Just(Disposition::Cancel),
        2 => Just(Disposition::BecomeDownload),
    ]
}

pub fn body_bytes() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![1u32..=16, 1u32..=65_536]
}

pub fn timer() -> impl Strategy<Value = Timer> + Clone {
    prop_oneof![Just(Timer::Request), Just(Timer::Resource)]
}

pub fn fault() -> impl Strategy<Value = Fault> + Clone {
    prop_oneof![Just(Fault::Reset), Just(Fault::Malformed)]
}

/// Any op the model allows now.
pub fn op(model: &Model) -> BoxedStrategy<Op> {
    let mut families: Vec<(u32, BoxedStrategy<Op>)> = Vec::new();
    let sessions: Vec<SessionId> = model
        .sessions()
        .filter(|(_, s)| s.handle)
        .map(|(id, _)| id)
        .collect();
    let session_count = model.sessions().count() as u32;
    let task_count = model.tasks().count() as u32;

    if session_count < MAX_SESSIONS {
        let session = model.next_session_id();
        let shared_taken = model.sessions().any(|(_, s)| s.kind == SessionKind::Shared);
        let kind = session_kind().prop_filter("one shared session", move |k| {
            !(shared_taken && *k == SessionKind::Shared)
        });
        families.push((
            if session_count == 0 { 100 } else { 3 },
            kind.prop_map(move |kind| Op::CreateSession { session, kind })
                .boxed(),
        ));
    }
    if !sessions.is_empty() {
        let pick = proptest::sample::select(sessions.clone());
        if task_count < MAX_TASKS {
            let task = model.next_task_id();
            families.push((
                8,
                (pick.clone(), task_kind())
                    .prop_map(move |(session, kind)| Op::CreateTask {
                        session,
                        task,
                        kind,
                    })
                    .boxed(),
            ));
        }
        families.push((
            3,
            (pick, 0..3u8)
                .prop_map(|(s, which)| match which {
                    0 => Op::FinishTasksAndInvalidate(s),
                    1 => Op::InvalidateAndCancel(s),
                    _ => Op::DropSession(s),
                })
                .boxed(),
        ));
    }

    let user_tasks: Vec<TaskId> = model
        .tasks()
        .filter(|(_, t)| t.handle)
        .map(|(id, _)| id)
        .collect();
    if !user_tasks.is_empty() {
        families.push((
            10,
            (proptest::sample::select(user_tasks), 0..10u8)
                .prop_map(|(t, which)| match which {
                    0..=4 => Op::Resume(t),
                    5..=6 => Op::Suspend(t),
                    7..=8 => Op::Cancel(t),
                    _ => Op::DropTask(t),
                })
                .boxed(),
        ));
    }

    let by_phase = |phase: ServerPhase| -> Vec<TaskId> {
        model
            .tasks()
            .filter(|(_, t)| t.server == phase)
            .map(|(id, _)| id)
            .collect()
    };
    let awaiting = by_phase(ServerPhase::RequestReceived);
    if !awaiting.is_empty() {
        families.push((
            12,
            (proptest::sample::select(awaiting), disposition())
                .prop_map(|(task, answer)| Op::ServerHeaders { task, answer })
                .boxed(),
        ));
    }
    let sending = by_phase(ServerPhase::SendingBody);
    if !sending.is_empty() {
        families.push((
            16,
            (proptest::sample::select(sending), body_bytes(), 0..5u8)
                .prop_map(|(task, bytes, which)| match which {
                    0..=2 => Op::ServerSends { task, bytes },
                    3 => Op::ServerEnds {
                        task,
                        reusable: bytes % 4 != 0,
                    },
                    _ => Op::ServerEnds {
                        task,
                        reusable: true,
                    },
                })
                .boxed(),
        ));
    }
    let breakable: Vec<TaskId> = model
        .tasks()
        .filter(|(_, t)| {
            matches!(
                t.server,
                ServerPhase::RequestReceived | ServerPhase::SendingBody
            )
        })
        .map(|(id, _)| id)
        .collect();
    if !breakable.is_empty() {
        families.push((
            2,
            (proptest::sample::select(breakable), fault())
                .prop_map(|(task, fault)| Op::ServerFails { task, fault })
                .boxed(),
        ));
    }
    let timed: Vec<TaskId> = model
        .tasks()
        .filter(|(_, t)| t.timers_armed())
        .map(|(id, _)| id)
        .collect();
    if !timed.is_empty() {
        families.push((
            2,
            (proptest::sample::select(timed), timer())
                .prop_map(|(task, timer)| Op::TimePasses { task, timer })
                .boxed(),
        ));
    }
    // Time always passes for idle connections: this keeps the union non-empty when the user
    // has let go of everything.
    let all: Vec<SessionId> = model.sessions().map(|(id, _)| id).collect();
    if !all.is_empty() {
        families.push((
            1,
            proptest::sample::select(all)
                .prop_map(Op::IdleTimeoutPasses)
                .boxed(),
        ));
    }
    Union::new_weighted(families).boxed()
}
