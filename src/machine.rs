//! The state machine test, generic over the system under test: the engine
//! ([`crate::engine_sut`]), and the real client against the stage, simulated or on sockets
//! ([`crate::client_sut`]). After every op the system's [`View`] must match the model; the
//! teardown lets go of everything the way a careless user would and checks that every session
//! still releases everything (R3, R4, R10).

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest_state_machine::StateMachineTest;

use leakproof_model::rules::{Rule, Violation};
use leakproof_model::{CACHE_ENTRIES, Model, Op, Pace, Resources, SessionKind, Timer};

use crate::assertions::{View, compare, obligation};
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

    /// What the run did, for a system whose runs are deterministic: the same sequence gives
    /// the same text, byte for byte. `None` for a system whose timing is the kernel's.
    fn trace(&self) -> Option<String> {
        None
    }
}

thread_local! {
    /// The digest of every trace of the cases this thread ran since it was last reset, in the
    /// order they ran (FNV-1a, 64 bits), and how many there were: two runs of the same cases
    /// from the same seed must give the same digest.
    static TRACES: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((FNV_OFFSET, 0)) };
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Start a new digest of this thread's traces.
pub fn reset_traces() {
    TRACES.set((FNV_OFFSET, 0));
}

/// The digest of this thread's traces since [`reset_traces`], and how many were folded in;
/// `None` if none was.
pub fn traces() -> Option<(u64, u64)> {
    let traces = TRACES.get();
    (traces.1 > 0).then_some(traces)
}

/// Fold one case's trace into this thread's digest.
pub fn add_trace(trace: &str) {
    let (mut digest, runs) = TRACES.get();
    for byte in trace.bytes().chain([0xff]) {
        digest ^= u64::from(byte);
        digest = digest.wrapping_mul(0x0100_0000_01b3);
    }
    TRACES.set((digest, runs + 1));
}

/// Ops applied across every case so far, for the report.
pub static OPS_APPLIED: AtomicU64 = AtomicU64::new(0);

/// The system under test, how far into its sequence it is, and the model as the system has
/// taken it: where an op had two outcomes ([`Op::Par`]), the one the system showed. The
/// generator's reference takes the order as written, so an op it generates after a `Par`
/// that went the other way may not be allowed here: it is skipped, as a replay skips it.
#[derive(Debug)]
pub struct Run<S> {
    pub system: S,
    pub step: usize,
    pub actual: RefState,
    /// What the heap witness counted live before the system was made ([`crate::heap`]).
    heap: Option<isize>,
    /// The op applied last.
    last: Option<Op>,
}

impl<S: System> Default for Run<S> {
    fn default() -> Self {
        if crate::heap::live().is_some() {
            warm_up::<S>();
        }
        let heap = crate::heap::live();
        Run {
            system: crate::heap::inside(S::default),
            step: 0,
            actual: RefState::default(),
            heap,
            last: None,
        }
    }
}

thread_local! {
    /// The systems this thread has warmed up, by type name.
    static WARM: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Once a thread and a system: run a sequence of every op against a throwaway `S`, outside the heap
/// witness, so that what lives for the thread or the process once first used (tokio's,
/// hyper's, rustls' lazy state) is made before the first world is measured, and is not
/// counted against it.
fn warm_up<S: System>() {
    let name = std::any::type_name::<S>();
    if WARM.with_borrow(|warm| warm.contains(&name)) {
        return;
    }
    WARM.with_borrow_mut(|warm| warm.push(name));
    let repro = crate::ops::parse(include_str!("../tests/repros/every-op.ops"))
        .expect("the every-op repro parses");
    // Stepped as a case is (a system that settles waits for the model's outcome, not for its
    // deadline), and dropped without the heap's check: what it leaves is the baseline.
    let mut run = Run::<S>::default();
    for op in &repro.ops {
        let _ = step(&mut run, op);
    }
    for op in teardown_ops(&run.actual.model) {
        let _ = step(&mut run, &op);
    }
}

impl<S> Run<S> {
    /// Drop the system; with the heap witness installed, what it left live must be within
    /// [`WORLD_BOUND`](crate::heap::WORLD_BOUND) of what was live before it was made.
    pub fn end(self) -> Result<(), Divergence> {
        let Run {
            system,
            heap,
            step,
            last,
            ..
        } = self;
        crate::heap::inside(|| drop(system));
        let (Some(before), Some(after), Some(op)) = (heap, crate::heap::live(), last) else {
            return Ok(());
        };
        let left = after - before;
        if left <= crate::heap::WORLD_BOUND {
            return Ok(());
        }
        Err(Divergence {
            step,
            op,
            violation: Violation {
                rule: leakproof_model::rules::Rule::R4,
                detail: format!(
                    "the world left {left} bytes live on the heap once dropped (bound {})",
                    crate::heap::WORLD_BOUND
                ),
            },
        })
    }
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

/// Apply `op` to the system and compare what it shows with the model's outcomes of `op`
/// (one, or a `Par`'s two serial orders); the model goes on from the outcome it showed. An op
/// the model does not allow where it stands is skipped.
fn step<S: System>(run: &mut Run<S>, op: &Op) -> Result<(), Divergence> {
    if !run.actual.model.allows(op) {
        return Ok(());
    }
    run.step += 1;
    run.last = Some(op.clone());
    OPS_APPLIED.fetch_add(1, Ordering::Relaxed);
    crate::coverage::record(&run.actual.model, op);
    let before = &run.actual.model;
    let outcomes = before.linearizations(op);
    let system = &mut run.system;
    let applied = catch_unwind(AssertUnwindSafe(|| {
        crate::heap::inside(|| {
            system.apply_until(op, &|view| {
                outcomes
                    .iter()
                    .any(|(after, step)| compare(view, op, before, after, step).is_ok())
            })
        })
    }));
    // A system that panics has failed the op: its message's rule if it names one (a system's
    // own assertion), else the rule of the obligation the op puts on it.
    let view = applied.map_err(|panic| {
        let message = panic_message(&*panic);
        Divergence {
            step: run.step,
            op: op.clone(),
            violation: Violation {
                rule: rule_named(&message).unwrap_or_else(|| obligation(op, before)),
                detail: format!("the system panicked: {message}"),
            },
        }
    })?;
    let mut first = None;
    for (model, step) in outcomes {
        match compare(&view, op, &run.actual.model, &model, &step) {
            Ok(()) => {
                run.actual = RefState { model, last: step };
                return Ok(());
            }
            Err(violation) => {
                first.get_or_insert(violation);
            }
        }
    }
    Err(Divergence {
        step: run.step,
        op: op.clone(),
        violation: first.expect("an allowed op has an outcome"),
    })
}

/// Run a whole sequence against a fresh system, then the teardown, without panicking: the
/// replay of `.ops` files and the exhaustive search use this. Ops the model does not allow
/// where they stand are skipped, as the generator's shrinking does.
pub fn run_sequence<S: System>(ops: &[Op]) -> Result<usize, Divergence> {
    let mut run = Run::<S>::default();
    for op in ops {
        step(&mut run, op)?;
    }
    for op in teardown_ops(&run.actual.model) {
        step(&mut run, &op)?;
    }
    let steps = run.step;
    run.end()?;
    Ok(steps)
}

impl<S: System> StateMachineTest for Conformance<S> {
    type SystemUnderTest = Run<S>;
    type Reference = Reference;

    fn init_test(_: &RefState) -> Run<S> {
        Run::default()
    }

    fn apply(mut run: Run<S>, _: &RefState, op: Op) -> Run<S> {
        // The reference has applied `op` in the order written; the run follows the system.
        if let Err(divergence) = step(&mut run, &op) {
            panic!("{divergence}");
        }
        run
    }

    fn teardown(mut run: Run<S>, _: RefState) {
        for op in teardown_ops(&run.actual.model) {
            if let Err(divergence) = step(&mut run, &op) {
                panic!("{divergence}");
            }
        }
        if let Some(trace) = run.system.trace() {
            add_trace(&trace);
        }
        // Every session the user could reach is gone now, so each must hold nothing; `compare`
        // above checked it against the model, which says so.
        let model = &run.actual;
        for (id, session) in model.model.sessions() {
            let held = model.model.resources(id);
            if !released_at_teardown(session.kind, held) {
                // R10: a session no one can reach releases everything; the shared one keeps
                // only its bounded cache (R9).
                let rule = match session.kind {
                    SessionKind::Shared => Rule::R9,
                    _ => Rule::R10,
                };
                let detail = format!(
                    "spec: {id} ({:?}) holds {held:?} after teardown",
                    session.kind
                );
                panic!("{}", Violation { rule, detail });
            }
        }
        if let Err(divergence) = run.end() {
            panic!("{divergence}");
        }
    }
}

/// What a panic said.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The first rule a message names as its own (`R6: ...`, `R6 broken: ...`), wherever it
/// stands: `assert_eq!` puts its message after its own words.
pub fn rule_named(message: &str) -> Option<Rule> {
    message.split_whitespace().find_map(|word| {
        let name = word.strip_suffix(':').unwrap_or(word);
        let named = Rule::ALL
            .into_iter()
            .find(|rule| rule.to_string() == name)?;
        (word.ends_with(':') || message.contains(&format!("{name} broken"))).then_some(named)
    })
}

/// Whether a session of `kind` that holds `held` after [`teardown_ops`] released what it
/// must: everything (R4, R10), but the shared session, which lives on (R9) with its cache,
/// bounded.
pub fn released_at_teardown(kind: SessionKind, mut held: Resources) -> bool {
    if kind == SessionKind::Shared && held.cached_responses <= CACHE_ENTRIES as u32 {
        held.cached_responses = 0;
    }
    held.is_zero()
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
    // A slow delegate catches up first: a delegate that never returns holds its session.
    let slow: Vec<_> = model
        .sessions()
        .filter(|(_, s)| s.pace != Pace::Prompt)
        .map(|(id, _)| id)
        .collect();
    for s in slow {
        push(&mut model, Op::DelegateReturns(s));
    }
    // A careless delegate drops the responders it kept: their tasks are cancelled.
    let responders: Vec<_> = model
        .tasks()
        .filter(|(_, t)| t.responder)
        .map(|(id, _)| id)
        .collect();
    for t in responders {
        push(&mut model, Op::DropResponder(t));
    }
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

/// Run each of `jobs` on a thread of its own, the threads released together by a barrier (the
/// two ops of an `Op::Par`); their results, in order. A job that panics fails the run.
pub fn run_together<'a, T: Send>(jobs: Vec<Box<dyn FnOnce() -> T + Send + 'a>>) -> Vec<T> {
    let barrier = std::sync::Barrier::new(jobs.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    job()
                })
            })
            .collect();
        threads
            .into_iter()
            // A user op's panic goes on with its own message (and the rule it names).
            .map(|t| t.join().unwrap_or_else(|panic| resume_unwind(panic)))
            .collect()
    })
}

/// The session a user op of an `Op::Par` is about: the one it names, or its task's, as a
/// system's own map of tasks to sessions has it.
pub fn session_of_op(
    op: &Op,
    tasks: &std::collections::BTreeMap<leakproof_model::TaskId, leakproof_model::SessionId>,
) -> leakproof_model::SessionId {
    match *op {
        Op::CreateTask { session, .. }
        | Op::FinishTasksAndInvalidate(session)
        | Op::InvalidateAndCancel(session)
        | Op::DropSession(session) => session,
        _ => tasks[&op.task().expect("a task op")],
    }
}
