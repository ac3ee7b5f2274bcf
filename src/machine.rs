//! The state machine test, generic over the system under test: the engine now, the real
//! client with the stage next. After every op the system's [`View`] must match the model; the
//! teardown lets go of everything the way a careless user would and checks that every session
//! still releases everything (R3, R4, R10).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

use leakproof_model::{Model, Op, SessionKind, TaskState, Timer};

use crate::assertions::{View, compare};
use crate::reference::{RefState, Reference};

/// A system that can be checked against the model: it applies an op, settles, and shows
/// what it holds.
pub trait System: Default {
    fn apply(&mut self, op: &Op) -> View;
}

/// Ops applied across every case so far, for the report.
pub static OPS_APPLIED: AtomicU64 = AtomicU64::new(0);

/// The system under test and how far into its sequence it is.
#[derive(Debug, Default)]
pub struct Run<S> {
    pub system: S,
    pub step: usize,
}

/// The proptest-state-machine test of `S` against the model.
#[derive(Debug)]
pub struct Conformance<S>(PhantomData<S>);

impl<S: System> Conformance<S> {
    fn step(run: &mut Run<S>, model: &RefState, op: &Op) {
        run.step += 1;
        OPS_APPLIED.fetch_add(1, Ordering::Relaxed);
        let view = run.system.apply(op);
        if let Err(violation) = compare(&view, &model.model, &model.last) {
            panic!(
                "{violation}\n  first divergence at step {} ({op:?})",
                run.step
            );
        }
    }
}

impl<S: System> StateMachineTest for Conformance<S> {
    type SystemUnderTest = Run<S>;
    type Reference = Reference;

    fn init_test(_: &RefState) -> Run<S> {
        Run::default()
    }

    fn apply(mut run: Run<S>, model: &RefState, op: Op) -> Run<S> {
        Self::step(&mut run, model, &op);
        run
    }

    fn teardown(mut run: Run<S>, mut model: RefState) {
        for op in teardown_ops(&model.model) {
            model = Reference::apply(model, &op);
            Self::step(&mut run, &model, &op);
        }
        // Every session the user could reach is gone now, so each must hold nothing; `compare`
        // above checked it against the model, which says so.
        for (id, session) in model.model.sessions() {
            let held = model.model.resources(id);
            assert!(
                held.is_zero(),
                "spec: {id} ({:?}) holds {held:?} after teardown",
                session.kind
            );
        }
    }
}

/// What a careless user and the passing of time do at the end: drop every handle (R10), let
/// each running task time out, let idle connections expire (R9).
pub fn teardown_ops(model: &Model) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut model = model.clone();
    let mut push = |model: &mut Model, op: Op| {
        model.apply(&op);
        ops.push(op);
    };
    let handles: Vec<_> = model
        .tasks()
        .filter(|(_, t)| t.handle)
        .map(|(id, _)| id)
        .collect();
    for t in handles {
        push(&mut model, Op::DropTask(t));
    }
    let sessions: Vec<_> = model
        .sessions()
        .filter(|(_, s)| s.handle)
        .map(|(id, _)| id)
        .collect();
    for s in sessions {
        push(&mut model, Op::DropSession(s));
    }
    let running: Vec<_> = model
        .tasks()
        .filter(|(_, t)| t.state == TaskState::Running)
        .map(|(id, _)| id)
        .collect();
    for task in running {
        push(
            &mut model,
            Op::TimePasses {
                task,
                timer: Timer::Resource,
            },
        );
    }
    let all: Vec<_> = model.sessions().map(|(id, s)| (id, s.kind)).collect();
    for (s, kind) in all {
        if kind == SessionKind::Shared || model.resources(s).idle_connections > 0 {
            push(&mut model, Op::IdleTimeoutPasses(s));
        }
    }
    ops
}
