//! Generators of ops: every op family the model allows in the current state, weighted so that
//! tasks make progress (the environment acts often) and sequences still reach invalidation.
//!
//! [`op`] generates over every kind of task. Which op a family may produce for a task is asked
//! of [`Model::allows`], never guessed from the task's fields, so every generated op is
//! allowed.

use proptest::prelude::*;
use proptest::strategy::Union;

use leakproof_model::{
    CACHE_ENTRIES, CloseFrame, Disposition, Fault, Model, Op, Redirect, ResourceId, Route,
    SessionId, SessionKind, SessionState, TaskId, TaskKind, Timer,
};

/// How big generated worlds get: enough to race sessions and tasks against each other, small
/// enough that every op has a fair chance to hit every task.
pub const MAX_SESSIONS: u32 = 3;
pub const MAX_TASKS: u32 = 8;

/// Every kind of task, in the order of [`TaskKind`].
pub const ALL_KINDS: [TaskKind; 5] = [
    TaskKind::Data,
    TaskKind::Download,
    TaskKind::Upload,
    TaskKind::Stream,
    TaskKind::WebSocket,
];

/// The kinds of task that are one HTTP exchange (no stream, no websocket): the kinds of the
/// conveniences (`Op::Await`).
pub const HTTP_KINDS: [TaskKind; 3] = [TaskKind::Data, TaskKind::Download, TaskKind::Upload];

pub fn session_kind() -> impl Strategy<Value = SessionKind> + Clone {
    prop_oneof![
        6 => Just(SessionKind::Delegated),
        2 => Just(SessionKind::Plain),
        1 => Just(SessionKind::Shared),
    ]
}

/// A session's `max_connections_per_host`: mostly a limit small enough that resumed tasks
/// wait for a slot (and their timers run meanwhile, R12), sometimes none.
pub fn per_host() -> impl Strategy<Value = Option<u32>> + Clone {
    prop_oneof![
        3 => Just(Some(1)),
        3 => Just(Some(2)),
        2 => Just(None),
    ]
}

/// Any kind of task, each as likely.
pub fn task_kind() -> impl Strategy<Value = TaskKind> + Clone {
    proptest::sample::select(ALL_KINDS.to_vec())
}

/// Any kind of convenience ([`HTTP_KINDS`]), each as likely.
pub fn convenience_kind() -> impl Strategy<Value = TaskKind> + Clone {
    proptest::sample::select(HTTP_KINDS.to_vec())
}

/// Any answer to `did_receive_response`.
pub fn disposition() -> impl Strategy<Value = Disposition> + Clone {
    Union::new_weighted(
        [
            (6, Disposition::Allow),
            (1, Disposition::Cancel),
            (2, Disposition::BecomeDownload),
            (2, Disposition::BecomeStream),
        ]
        .into_iter()
        .map(|(weight, answer)| (weight, Just(answer)))
        .collect(),
    )
}

/// A body chunk or a websocket message: small ones, ones up to 64 KiB, and now and then one of
/// several windows.
pub fn body_bytes() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![
        4 => 1u32..=16,
        4 => 1u32..=65_536,
        // Several of a delegate's windows (48 KiB queued for it) at once: the IO reports what
        // the window has room for and the rest waits in the network (R6).
        1 => 65_537u32..=262_144,
    ]
}

/// A stream's bytes from the server, for a window of `read_ahead` bytes: a few, up to a
/// window, or more than it holds, so that the window fills and the rest waits (R6).
pub fn stream_bytes(read_ahead: u64) -> impl Strategy<Value = u32> + Clone {
    let window = u32::try_from(read_ahead).unwrap_or(u32::MAX / 2).max(1);
    prop_oneof![1u32..=16, 1..=window, window..=window.saturating_mul(2)]
}

/// Any timer.
pub fn timer() -> impl Strategy<Value = Timer> + Clone {
    prop_oneof![
        Just(Timer::Request),
        Just(Timer::Resource),
        Just(Timer::Close)
    ]
}

pub fn fault() -> impl Strategy<Value = Fault> + Clone {
    prop_oneof![Just(Fault::Reset), Just(Fault::Malformed)]
}

/// What a peer's close frame carries: mostly a code, now and then none or an invalid one.
pub fn close_frame() -> impl Strategy<Value = CloseFrame> + Clone {
    prop_oneof![
        3 => Just(CloseFrame::Code),
        1 => Just(CloseFrame::NoCode),
        1 => Just(CloseFrame::InvalidCode),
    ]
}

/// Any op the model allows now, over every kind of task.
pub fn op(model: &Model) -> BoxedStrategy<Op> {
    let mut families: Vec<(u32, BoxedStrategy<Op>)> = Vec::new();
    let sessions: Vec<SessionId> = model
        .sessions()
        .filter(|(_, s)| s.handle)
        .map(|(id, _)| id)
        .collect();
    let session_count = model.sessions().count() as u32;
    let task_count = model.tasks().count() as u32;
    // The tasks for which the model allows the op `make` builds, for families whose other
    // fields do not change whether it is (bytes aside, which are never 0 here); faults and
    // timers, which do, are listed op by op.
    let tasks_allowing = |make: fn(TaskId) -> Op| -> Vec<TaskId> {
        model
            .tasks()
            .map(|(id, _)| id)
            .filter(|id| model.allows(&make(*id)))
            .collect()
    };

    if session_count < MAX_SESSIONS {
        let session = model.next_session_id();
        let shared_taken = model.sessions().any(|(_, s)| s.kind == SessionKind::Shared);
        let kind = session_kind().prop_filter("one shared session", move |k| {
            !(shared_taken && *k == SessionKind::Shared)
        });
        families.push((
            if session_count == 0 { 100 } else { 3 },
            (kind, per_host())
                .prop_map(move |(kind, per_host)| Op::CreateSession {
                    session,
                    kind,
                    per_host,
                })
                .boxed(),
        ));
    }
    if task_count < MAX_TASKS {
        // Tasks go mostly to active sessions; a session whose invalidation has begun refuses
        // them (R8), which is worth trying now and then.
        let task = model.next_task_id();
        let (active, refusing): (Vec<SessionId>, Vec<SessionId>) = sessions.iter().partition(|s| {
            model
                .session(**s)
                .is_some_and(|s| s.state == SessionState::Active)
        });
        for (weight, sessions) in [(8, active), (1, refusing)] {
            if !sessions.is_empty() {
                families.push((
                    weight,
                    (proptest::sample::select(sessions.clone()), task_kind())
                        .prop_map(move |(session, kind)| Op::CreateTask {
                            session,
                            task,
                            kind,
                        })
                        .boxed(),
                ));
                // Conveniences (`session.data(request).await` and the like).
                families.push((
                    (weight / 3).max(1),
                    (
                        proptest::sample::select(sessions.clone()),
                        convenience_kind(),
                    )
                        .prop_map(move |(session, kind)| Op::Await {
                            session,
                            task,
                            kind,
                        })
                        .boxed(),
                ));
                // Fetches of the server's cacheable resources, one more than a cache holds,
                // so that they hit, miss and evict.
                families.push((
                    (weight / 2).max(1),
                    (proptest::sample::select(sessions), 0..=CACHE_ENTRIES as u8)
                        .prop_map(move |(session, r)| Op::Fetch {
                            session,
                            task,
                            resource: ResourceId(r),
                        })
                        .boxed(),
                ));
            }
        }
    }
    if !sessions.is_empty() {
        families.push((
            3,
            (proptest::sample::select(sessions.clone()), 0..4u8)
                .prop_map(|(s, which)| match which {
                    0 => Op::FinishTasksAndInvalidate(s),
                    1 => Op::InvalidateAndCancel(s),
                    2 => Op::Reset(s),
                    _ => Op::DropSession(s),
                })
                .boxed(),
        ));
    }

    // The user's ops go mostly to live tasks, so that they make progress; on a completed task
    // they are no-ops or refused, which is worth trying now and then (R1).
    let mut user_family =
        |weight: u32, make: fn(TaskId, u8) -> Op, choices: u8, tasks: Vec<TaskId>| {
            let (live, done): (Vec<TaskId>, Vec<TaskId>) = tasks
                .into_iter()
                .partition(|t| model.task(*t).is_some_and(|t| t.is_live()));
            for (weight, tasks) in [(weight, live), (1, done)] {
                if !tasks.is_empty() {
                    families.push((
                        weight,
                        (proptest::sample::select(tasks), 0..choices)
                            .prop_map(move |(t, which)| make(t, which))
                            .boxed(),
                    ));
                }
            }
        };
    user_family(
        10,
        |t, which| match which {
            0..=4 => Op::Resume(t),
            5..=6 => Op::Suspend(t),
            7..=8 => Op::Cancel(t),
            _ => Op::DropTask(t),
        },
        10,
        tasks_allowing(Op::Resume),
    );
    // A convenience's future can only be dropped (its task is cancelled); now and then, so
    // that most run to their end.
    let futures: Vec<TaskId> = model
        .tasks()
        .filter(|(_, t)| t.route == Route::Future && t.handle)
        .map(|(id, _)| id)
        .collect();
    user_family(1, |t, _| Op::DropTask(t), 1, futures);
    // Streams: reads rarer than the server's sends, so the window fills now and then (R6);
    // closing a half rarer still, so streams live long enough to fill.
    user_family(
        8,
        |t, which| match which {
            0..=4 => Op::Read(t),
            5..=7 => Op::Write(t),
            8 => Op::CloseRead(t),
            _ => Op::CloseWrite(t),
        },
        10,
        tasks_allowing(Op::Read),
    );
    // Websockets: mostly receiving; a close now and then starts the handshake (R11).
    user_family(
        6,
        |t, which| match which {
            0..=3 => Op::Receive(t),
            _ => Op::CloseWith(t),
        },
        6,
        tasks_allowing(Op::Receive),
    );

    // Two user ops of one session at once (linearizability): now and then, among the ops a
    // user could make now, so that races like a creation against invalidate_and_cancel, or a
    // resume against a cancel, come up.
    let mut candidates: Vec<Op> = Vec::new();
    for &session in &sessions {
        candidates.extend([
            Op::FinishTasksAndInvalidate(session),
            Op::InvalidateAndCancel(session),
            Op::DropSession(session),
        ]);
        if task_count < MAX_TASKS {
            let task = model.next_task_id();
            candidates.extend(ALL_KINDS.iter().map(|&kind| Op::CreateTask {
                session,
                task,
                kind,
            }));
        }
    }
    for t in tasks_allowing(Op::Resume) {
        candidates.extend([
            Op::Resume(t),
            Op::Suspend(t),
            Op::Cancel(t),
            Op::DropTask(t),
        ]);
    }
    if candidates.len() > 1 {
        let before = std::sync::Arc::new(model.clone());
        let pick = proptest::sample::select(candidates);
        families.push((
            2,
            (pick.clone(), pick)
                // A pair not allowed together (the same op twice, two creations, one that
                // undoes the other) is its first op alone, which is allowed: no rejection.
                .prop_map(move |(a, b)| {
                    let par = Op::Par(Box::new(a.clone()), Box::new(b));
                    if before.allows(&par) { par } else { a }
                })
                .boxed(),
        ));
    }

    // The server: a head for an HTTP request, an answer for an upgrade request.
    let awaiting_head = tasks_allowing(|task| Op::ServerHeaders {
        task,
        answer: Disposition::Allow,
    });
    if !awaiting_head.is_empty() {
        families.push((
            12,
            (proptest::sample::select(awaiting_head), disposition())
                .prop_map(|(task, answer)| Op::ServerHeaders { task, answer })
                .boxed(),
        ));
    }
    // A redirect instead of the head, followed more often than refused; now and then past
    // the limit.
    let redirectable = tasks_allowing(|task| Op::ServerRedirects {
        task,
        answer: Redirect::Follow,
    });
    if !redirectable.is_empty() {
        families.push((
            4,
            (proptest::sample::select(redirectable), 0..4u8)
                .prop_map(|(task, which)| Op::ServerRedirects {
                    task,
                    answer: if which == 0 {
                        Redirect::Refuse
                    } else {
                        Redirect::Follow
                    },
                })
                .boxed(),
        ));
    }
    let awaiting_upgrade = tasks_allowing(|task| Op::ServerAnswersUpgrade { task, accept: true });
    if !awaiting_upgrade.is_empty() {
        families.push((
            12,
            (proptest::sample::select(awaiting_upgrade), 0..6u8)
                .prop_map(|(task, which)| Op::ServerAnswersUpgrade {
                    task,
                    accept: which != 0,
                })
                .boxed(),
        ));
    }
    // A body, then its end.
    let (streams_sending, bodies): (Vec<TaskId>, Vec<TaskId>) =
        tasks_allowing(|task| Op::ServerEnds {
            task,
            reusable: true,
        })
        .into_iter()
        .partition(|t| model.task(*t).is_some_and(|t| t.kind == TaskKind::Stream));
    if !bodies.is_empty() {
        families.push((
            16,
            (proptest::sample::select(bodies), body_bytes(), 0..5u8)
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
    // A stream's bytes, often more than its window holds (R6), then its end.
    if !streams_sending.is_empty() {
        families.push((
            10,
            (
                proptest::sample::select(streams_sending),
                stream_bytes(model.read_ahead()),
                0..6u8,
            )
                .prop_map(|(task, bytes, which)| match which {
                    0..=4 => Op::ServerSends { task, bytes },
                    // A stream's connection is never pooled, whatever the server says.
                    _ => Op::ServerEnds {
                        task,
                        reusable: bytes % 2 == 0,
                    },
                })
                .boxed(),
        ));
    }
    // A websocket's messages, then the peer's close frame (first, or answering ours).
    let messaging = tasks_allowing(|task| Op::PeerCloses {
        task,
        frame: CloseFrame::Code,
    });
    if !messaging.is_empty() {
        families.push((
            10,
            (
                proptest::sample::select(messaging),
                body_bytes(),
                0..4u8,
                close_frame(),
            )
                .prop_map(|(task, bytes, which, frame)| match which {
                    0..=2 => Op::ServerSends { task, bytes },
                    _ => Op::PeerCloses { task, frame },
                })
                .boxed(),
        ));
    }
    // A fault: a reset anywhere, malformed bytes only where they are HTTP.
    let faults: Vec<Op> = model
        .tasks()
        .flat_map(|(task, _)| {
            [Fault::Reset, Fault::Malformed].map(|fault| Op::ServerFails { task, fault })
        })
        .filter(|op| model.allows(op))
        .collect();
    if !faults.is_empty() {
        families.push((2, proptest::sample::select(faults).boxed()));
    }

    // The clock: a task's timers fire only when armed (R7); a close handshake's deadline often
    // enough that websockets reach it as well as the peer's answer (R11).
    for (weight, timers) in [
        (2, &[Timer::Request, Timer::Resource][..]),
        (12, &[Timer::Close][..]),
    ] {
        let timeouts: Vec<Op> = model
            .tasks()
            .flat_map(|(task, _)| {
                timers
                    .iter()
                    .map(move |&timer| Op::TimePasses { task, timer })
            })
            .filter(|op| model.allows(op))
            .collect();
        if !timeouts.is_empty() {
            families.push((weight, proptest::sample::select(timeouts).boxed()));
        }
    }
    // The delegate's pace: now and then slow, so that callbacks queue behind the one it is in
    // and bodies fill their windows (R6); released more often than blocked, so that most
    // sequences end with it keeping up.
    let pace: Vec<Op> = model
        .sessions()
        .flat_map(|(s, _)| [Op::DelegateBlocks(s), Op::DelegateReturns(s)])
        .filter(|op| model.allows(op))
        .collect();
    let (blocks, returns): (Vec<Op>, Vec<Op>) = pace
        .into_iter()
        .partition(|op| matches!(op, Op::DelegateBlocks(_)));
    for (weight, ops) in [(3, blocks), (3, returns)] {
        if !ops.is_empty() {
            families.push((weight, proptest::sample::select(ops).boxed()));
        }
    }
    // The delegate answers later: its next question keeps a responder, answered or dropped
    // some ops on, so that the task waits with its request timer stopped (R12) while the
    // session's other callbacks go on.
    let defers: Vec<Op> = model
        .sessions()
        .map(|(s, _)| Op::DelegateDefers(s))
        .filter(|op| model.allows(op))
        .collect();
    if !defers.is_empty() {
        families.push((2, proptest::sample::select(defers).boxed()));
    }
    let responders: Vec<Op> = model
        .tasks()
        .flat_map(|(t, _)| [Op::Answer(t), Op::Answer(t), Op::DropResponder(t)])
        .filter(|op| model.allows(op))
        .collect();
    if !responders.is_empty() {
        families.push((4, proptest::sample::select(responders).boxed()));
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

#[cfg(test)]
mod tests {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    use leakproof_model::{Callback, Model, Op, Returned, Step, TaskKind, Timer};

    use super::*;

    /// What generated sequences reached, summed over cases.
    #[derive(Debug, Default)]
    struct Reached {
        ops: usize,
        kinds: Vec<TaskKind>,
        full_windows: usize,
        eofs: usize,
        becomes_stream: usize,
        opened: usize,
        closing: usize,
        closed_by_peer: usize,
        close_timeouts: usize,
        /// Cases in which a window filled, a websocket opened, a close timed out.
        cases_full: usize,
        cases_open: usize,
        cases_close_timeout: usize,
    }

    /// `cases` sequences of up to `length` ops from `generate`, from a fixed seed, each op
    /// checked to be allowed where it stands.
    fn walk(
        cases: usize,
        length: usize,
        generate: impl Fn(&Model) -> BoxedStrategy<Op>,
    ) -> Reached {
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
        );
        let mut reached = Reached::default();
        for _ in 0..cases {
            let (full, open, timeout) =
                (reached.full_windows, reached.opened, reached.close_timeouts);
            let mut model = Model::new();
            for _ in 0..length {
                let op = generate(&model)
                    .new_tree(&mut runner)
                    .expect("a generator never rejects")
                    .current();
                assert!(
                    model.allows(&op),
                    "generated {op:?}, not allowed in {model:?}"
                );
                let step: Step = model.apply(&op);
                reached.ops += 1;
                if let Op::CreateTask { kind, .. } = op {
                    reached.kinds.push(kind);
                }
                if let Op::TimePasses {
                    timer: Timer::Close,
                    ..
                } = op
                {
                    reached.close_timeouts += 1;
                }
                if step.returned == Some(Returned::Eof) {
                    reached.eofs += 1;
                }
                for callback in &step.callbacks {
                    match callback {
                        Callback::BecomeStream { .. } => reached.becomes_stream += 1,
                        Callback::Open { .. } => reached.opened += 1,
                        Callback::Close { .. } => reached.closed_by_peer += 1,
                        _ => {}
                    }
                }
                for (_, task) in model.tasks() {
                    if task.buffered == model.read_ahead() && task.is_live() {
                        reached.full_windows += 1;
                    }
                    if task.closing() {
                        reached.closing += 1;
                    }
                }
            }
            reached.cases_full += usize::from(reached.full_windows > full);
            reached.cases_open += usize::from(reached.opened > open);
            reached.cases_close_timeout += usize::from(reached.close_timeouts > timeout);
        }
        reached
    }

    #[test]
    fn every_kind_is_generated_and_streams_and_websockets_go_the_whole_way() {
        let reached = walk(256, 48, op);

        for kind in ALL_KINDS {
            assert!(
                reached.kinds.contains(&kind),
                "no {kind:?} task: {reached:?}"
            );
        }
        // R6: windows fill in one case of 16 at least (one in five, as weighted now); streams
        // read to their end; responses become streams.
        assert!(reached.cases_full >= 256 / 16, "{reached:?}");
        assert!(reached.eofs > 0, "{reached:?}");
        assert!(reached.becomes_stream > 0, "{reached:?}");
        // R11: websockets open in one case of 32 at least (one in ten now), close, and their
        // close ends both ways: the peer answers, or the deadline passes.
        assert!(reached.cases_open >= 256 / 32, "{reached:?}");
        assert!(reached.closing > 0, "{reached:?}");
        assert!(reached.closed_by_peer > 0, "{reached:?}");
        assert!(reached.cases_close_timeout >= 2, "{reached:?}");
    }
}
