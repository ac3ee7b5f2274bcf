//! The state machine test, generic over the system under test: the engine now, the real
//! client with the stage next. After every op the system's [`View`] must match the model; the
//! teardown lets go of everything the way a careless user would and checks that every session
//! still releases everything (R3, R4, R10).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

use leakproof_model::rules::Violation;
use leakproof_model::{Model, Op, SessionKind, Timer};

use crate::assertions::{View, compare};
use crate::reference::{RefState, Reference};

/// A system that can be checked against the model: it applies an op, settles, and shows
/// what it holds.
pub trait System: Default {
    fn apply(&mut self, op: &Op) -> View;

    /// Apply `op` and wait, within the system's own deadline, until `settled` holds of what it
    /// shows (a system that works asynchronously cannot know when it is done by itself; the
    /// deadline turns a system that never gets there into a divergence). Synchronous systems
    /// are settled when `apply` returns.
    fn apply_until(&mut self, op: &Op, settled: &dyn Fn(&View) -> bool) -> View {
        let _ = settled;
        self.apply(op)
    }
}

/// Ops applied across every case so far, for the report.
pub static OPS_APPLIED: AtomicU64 = AtomicU64::new(0);

/// The system under test, how far into its sequence it is, and the model as it stood before
/// the op being applied (for coverage).
#[derive(Debug, Default)]
pub struct Run<S> {
    pub system: S,
    pub step: usize,
    pub before: Model,
}

/// The proptest-state-machine test of `S` against the model.
#[derive(Debug)]
pub struct Conformance<S>(PhantomData<S>);

/// Where a system first parted from the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// 1-based index of the op in the sequence (teardown ops continue the count).
    pub step: usize,
    pub op: Op,
    pub violation: Violation,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n  first divergence at step {} ({:?})",
            self.violation, self.step, self.op
        )
    }
}

/// Apply `op` to the model and the system and compare them.
fn step<S: System>(run: &mut Run<S>, model: &mut RefState, op: &Op) -> Result<(), Divergence> {
    run.step += 1;
    OPS_APPLIED.fetch_add(1, Ordering::Relaxed);
    crate::coverage::record(&model.model, op);
    let next = Reference::apply(std::mem::take(model), op);
    *model = next;
    let view = run
        .system
        .apply_until(op, &|view| compare(view, &model.model, &model.last).is_ok());
    compare(&view, &model.model, &model.last).map_err(|violation| Divergence {
        step: run.step,
        op: op.clone(),
        violation,
    })
}

/// Run a whole sequence against a fresh system, then the teardown, without panicking: the
/// replay of `.ops` files and the exhaustive search use this. Ops the model does not allow
/// where they stand are skipped, as the generator's shrinking does.
pub fn run_sequence<S: System>(ops: &[Op]) -> Result<usize, Divergence> {
    let mut run = Run::<S>::default();
    let mut model = RefState::default();
    for op in ops {
        if model.model.allows(op) {
            step(&mut run, &mut model, op)?;
        }
    }
    for op in teardown_ops(&model.model) {
        step(&mut run, &mut model, &op)?;
    }
    Ok(run.step)
}

impl<S: System> StateMachineTest for Conformance<S> {
    type SystemUnderTest = Run<S>;
    type Reference = Reference;

    fn init_test(_: &RefState) -> Run<S> {
        Run::default()
    }

    fn apply(mut run: Run<S>, model: &RefState, op: Op) -> Run<S> {
        // proptest-state-machine has applied `op` to the model already.
        run.step += 1;
        OPS_APPLIED.fetch_add(1, Ordering::Relaxed);
        crate::coverage::record(&run.before, &op);
        run.before = model.model.clone();
        let view = run.system.apply_until(&op, &|view| {
            compare(view, &model.model, &model.last).is_ok()
        });
        if let Err(violation) = compare(&view, &model.model, &model.last) {
            let step = run.step;
            panic!(
                "{}",
                Divergence {
                    step,
                    op,
                    violation
                }
            );
        }
        run
    }

    fn teardown(mut run: Run<S>, mut model: RefState) {
        for op in teardown_ops(&model.model) {
            if let Err(divergence) = step(&mut run, &mut model, &op) {
                panic!("{divergence}");
            }
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
    // What nobody holds and still runs waits on a timer: the resource timeout of an HTTP
    // exchange, or the close deadline of a websocket saying goodbye (R11).
    let waiting: Vec<_> = model
        .tasks()
        .filter(|(_, t)| t.is_live())
        .filter_map(|(id, t)| {
            [Timer::Resource, Timer::Close]
                .into_iter()
                .find(|timer| t.armed(*timer))
                .map(|timer| (id, timer))
        })
        .collect();
    for (task, timer) in waiting {
        push(&mut model, Op::TimePasses { task, timer });
    }
    let all: Vec<_> = model.sessions().map(|(id, s)| (id, s.kind)).collect();
    for (s, kind) in all {
        if kind == SessionKind::Shared || model.resources(s).idle_connections > 0 {
            push(&mut model, Op::IdleTimeoutPasses(s));
        }
    }
    ops
}
