//! Bugs planted on purpose, to show that the checks catch each one and name the rule it breaks
//! (`tests/attribution.rs`, `leakproof-check check --plant NAME`).
//!
//! Each bug is a system under test that wraps the engine tier's [`EngineWorld`] and distorts
//! exactly one behaviour: how a session is configured or what the simulated driver carries out
//! (an [`engine_sut::Planting`](crate::engine_sut::Planting)), which ops reach the engine, or what the system shows. Nothing is
//! planted in the product crates: the engine under the wrapper is the one the suite checks.

use std::collections::BTreeSet;
use std::fmt;

use leakproof_core::{Action, SessionKind as EngineKind, Timeout};
use leakproof_model::rules::Rule;
use leakproof_model::{Callback, Op, Outcome, Refusal, TaskId, TaskState, Timer};

use crate::assertions::View;
use crate::engine_sut::{EngineWorld, Planting};
use crate::machine::{Divergence, System, run_sequence};
use crate::run::{Options, Report, check};

/// A planted bug: its name, the rule it breaks, what it does, and the checks to run against it.
#[derive(Clone, Copy)]
pub struct Planted {
    /// A name for the command line: `check --plant NAME`.
    pub name: &'static str,
    /// The rule whose obligation the bug fails.
    pub rule: Rule,
    /// What the bug does, in a line.
    pub what: &'static str,
    /// Replay a sequence, then its teardown, against the system with the bug.
    pub run: fn(&[Op]) -> Result<usize, Divergence>,
    /// Check generated sequences against it.
    pub check: fn(&'static str, &Options) -> Report,
}

impl fmt::Debug for Planted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.rule, self.what)
    }
}

/// A planted bug as a type: the system that has it.
pub trait Bug: System {
    const NAME: &'static str;
    const RULE: Rule;
    const WHAT: &'static str;
}

const fn planted<B: Bug>() -> Planted {
    Planted {
        name: B::NAME,
        rule: B::RULE,
        what: B::WHAT,
        run: run_sequence::<B>,
        check: check::<B>,
    }
}

/// Every planted bug, at least one for each rule.
pub const PLANTED: &[Planted] = &[
    planted::<CompletesTwice>(),
    planted::<InvalidBeforeCancelledComplete>(),
    planted::<DelegateKept>(),
    planted::<PoolKeptAtInvalidation>(),
    planted::<AbortIgnored>(),
    planted::<TempFileKept>(),
    planted::<StreamReadsPastWindow>(),
    planted::<SuspendIgnored>(),
    planted::<CreatesAfterInvalidation>(),
    planted::<SharedHonoursInvalidation>(),
    planted::<DroppedSessionNeverInvalidates>(),
    planted::<DroppedSuspendedTaskKept>(),
    planted::<CloseArmsNoDeadline>(),
    planted::<TimeoutIgnored>(),
    planted::<OneSlotShort>(),
];

/// The planted bug called `name`.
pub fn named(name: &str) -> Option<&'static Planted> {
    PLANTED.iter().find(|p| p.name == name)
}

/// A world with a fault in its configuration or its driver.
macro_rules! faulty_world {
    ($bug:ident, $name:literal, $rule:ident, $what:literal, $planting:expr) => {
        #[doc = $what]
        #[derive(Debug)]
        pub struct $bug(EngineWorld);

        impl Default for $bug {
            fn default() -> Self {
                Self(EngineWorld::planted($planting))
            }
        }

        impl System for $bug {
            fn apply(&mut self, op: &Op) -> View {
                self.0.apply(op)
            }
        }

        impl Bug for $bug {
            const NAME: &'static str = $name;
            const RULE: Rule = Rule::$rule;
            const WHAT: &'static str = $what;
        }
    };
}

/// A world that never hears the ops `ignores` picks: they do not reach the engine, and it
/// shows what it showed before.
macro_rules! deaf_world {
    ($bug:ident, $name:literal, $rule:ident, $what:literal, $ignores:expr) => {
        #[doc = $what]
        #[derive(Debug, Default)]
        pub struct $bug(EngineWorld);

        impl System for $bug {
            fn apply(&mut self, op: &Op) -> View {
                let ignores: fn(&EngineWorld, &Op) -> bool = $ignores;
                match op {
                    _ if ignores(&self.0, op) => self.0.look(),
                    // One of two ops at once is heard alone.
                    Op::Par(a, b) if ignores(&self.0, a) => self.0.apply(b),
                    Op::Par(a, b) if ignores(&self.0, b) => self.0.apply(a),
                    _ => self.0.apply(op),
                }
            }
        }

        impl Bug for $bug {
            const NAME: &'static str = $name;
            const RULE: Rule = Rule::$rule;
            const WHAT: &'static str = $what;
        }
    };
}

/// A world that shows something other than what happened: `distort` rewrites each view.
macro_rules! lying_world {
    ($bug:ident, $name:literal, $rule:ident, $what:literal) => {
        impl System for $bug {
            fn apply(&mut self, op: &Op) -> View {
                let view = self.world.apply(op);
                self.distort(op, view)
            }
        }

        impl Bug for $bug {
            const NAME: &'static str = $name;
            const RULE: Rule = Rule::$rule;
            const WHAT: &'static str = $what;
        }
    };
}

// R1 ---------------------------------------------------------------------------------------

/// Every did_complete is said twice.
#[derive(Debug, Default)]
pub struct CompletesTwice {
    world: EngineWorld,
}

impl CompletesTwice {
    fn distort(&mut self, _: &Op, mut view: View) -> View {
        view.callbacks = twice(&view.callbacks);
        for session in view.sessions.values_mut() {
            session.heard = twice(&session.heard);
        }
        view
    }
}

fn twice(trace: &[Callback]) -> Vec<Callback> {
    let mut out = Vec::with_capacity(trace.len());
    for callback in trace {
        out.push(*callback);
        if matches!(callback, Callback::Complete { .. }) {
            out.push(*callback);
        }
    }
    out
}

lying_world!(
    CompletesTwice,
    "completes-twice",
    R1,
    "Every did_complete is said twice."
);

// R2 ---------------------------------------------------------------------------------------

/// did_become_invalid is said as the invalidation begins, before the cancelled tasks'
/// did_complete, which then never come (nothing comes after it), as swift-corelibs-foundation
/// orders them.
#[derive(Debug, Default)]
pub struct InvalidBeforeCancelledComplete {
    world: EngineWorld,
    /// Tasks whose did_complete was swallowed.
    swallowed: BTreeSet<TaskId>,
}

impl InvalidBeforeCancelledComplete {
    fn distort(&mut self, _: &Op, mut view: View) -> View {
        for (id, session) in &view.sessions {
            let invalid = Callback::BecomeInvalid { session: *id };
            let Some(at) = view.callbacks.iter().position(|c| *c == invalid) else {
                continue;
            };
            for callback in &view.callbacks[..at] {
                if let Callback::Complete {
                    task,
                    outcome: Outcome::Cancelled,
                } = *callback
                    && session.heard.contains(callback)
                {
                    self.swallowed.insert(task);
                }
            }
        }
        let swallowed = |c: &Callback| matches!(c, Callback::Complete { task, .. } if self.swallowed.contains(task));
        view.callbacks.retain(|c| !swallowed(c));
        for session in view.sessions.values_mut() {
            session.heard.retain(|c| !swallowed(c));
        }
        view
    }
}

lying_world!(
    InvalidBeforeCancelledComplete,
    "invalid-before-cancelled-complete",
    R2,
    "did_become_invalid comes before the cancelled tasks' did_complete, which never come."
);

// R3 ---------------------------------------------------------------------------------------

/// The session keeps its delegate after did_become_invalid: the ledger says so, and the
/// test's `Weak` still upgrades.
#[derive(Debug, Default)]
pub struct DelegateKept {
    world: EngineWorld,
}

impl DelegateKept {
    fn distort(&mut self, _: &Op, mut view: View) -> View {
        for (id, session) in &mut view.sessions {
            let invalid = Callback::BecomeInvalid { session: *id };
            if session.heard.contains(&invalid) {
                session.ledger.delegate_held = true;
                session.witness.delegate_held = true;
            }
        }
        view
    }
}

lying_world!(
    DelegateKept,
    "delegate-kept",
    R3,
    "The delegate is kept after did_become_invalid."
);

// R4, R5 ----------------------------------------------------------------------------------

faulty_world!(
    PoolKeptAtInvalidation,
    "pool-kept-at-invalidation",
    R4,
    "The driver forgets to close the pooled connections of an invalidated session.",
    Planting {
        forgets: Some(|action| matches!(action, Action::Close { .. })),
        ..Planting::default()
    }
);

faulty_world!(
    AbortIgnored,
    "abort-ignored",
    R5,
    "The driver forgets an abort: a cancelled task's connection stays open.",
    Planting {
        forgets: Some(|action| matches!(action, Action::Abort { conn: Some(_), .. })),
        ..Planting::default()
    }
);

faulty_world!(
    TempFileKept,
    "temp-file-kept",
    R5,
    "The driver forgets to remove a download's temp file.",
    Planting {
        forgets: Some(|action| matches!(action, Action::RemoveTempFile { .. })),
        ..Planting::default()
    }
);

// R6 ---------------------------------------------------------------------------------------

faulty_world!(
    StreamReadsPastWindow,
    "stream-reads-past-window",
    R6,
    "A stream reads ahead twice its window.",
    Planting {
        configure: Some(|config| config.read_ahead *= 2),
        ..Planting::default()
    }
);

// R7 ---------------------------------------------------------------------------------------

deaf_world!(
    SuspendIgnored,
    "suspend-ignored",
    R7,
    "suspend does nothing: the task runs on.",
    |_, op| matches!(op, Op::Suspend(_))
);

// R8 ---------------------------------------------------------------------------------------

/// A task created once invalidation has begun is not refused (it is made and never runs).
#[derive(Debug, Default)]
pub struct CreatesAfterInvalidation {
    world: EngineWorld,
}

impl CreatesAfterInvalidation {
    fn distort(&mut self, op: &Op, mut view: View) -> View {
        if matches!(op, Op::CreateTask { .. }) && view.refused == Some(Refusal::SessionInvalidated)
        {
            view.refused = None;
        }
        view
    }
}

lying_world!(
    CreatesAfterInvalidation,
    "creates-after-invalidation",
    R8,
    "A task created once invalidation has begun is not refused."
);

// R9 ---------------------------------------------------------------------------------------

faulty_world!(
    SharedHonoursInvalidation,
    "shared-honours-invalidation",
    R9,
    "The shared session honours invalidation, as an ordinary one does.",
    Planting {
        configure: Some(|config| config.kind = EngineKind::Plain),
        ..Planting::default()
    }
);

// R10 --------------------------------------------------------------------------------------

deaf_world!(
    DroppedSessionNeverInvalidates,
    "dropped-session-never-invalidates",
    R10,
    "A session whose last handle is dropped is never finished: it keeps itself alive.",
    |_, op| matches!(op, Op::DropSession(_))
);

deaf_world!(
    DroppedSuspendedTaskKept,
    "dropped-suspended-task-kept",
    R10,
    "A suspended task whose handle is dropped is kept, never cancelled.",
    |world, op| match op {
        Op::DropTask(t) => world.look().tasks.get(t) == Some(&TaskState::Suspended),
        _ => false,
    }
);

// R11 --------------------------------------------------------------------------------------

faulty_world!(
    CloseArmsNoDeadline,
    "close-arms-no-deadline",
    R11,
    "A websocket close arms no close deadline: the driver forgets the timer.",
    Planting {
        forgets: Some(|action| matches!(
            action,
            Action::ArmTimer { timer, .. } if timer.timeout == Timeout::Close
        )),
        ..Planting::default()
    }
);

// R12 --------------------------------------------------------------------------------------

deaf_world!(
    TimeoutIgnored,
    "timeout-ignored",
    R12,
    "The request and resource timeouts never fire.",
    |_, op| matches!(
        op,
        Op::TimePasses {
            timer: Timer::Request | Timer::Resource,
            ..
        }
    )
);

faulty_world!(
    OneSlotShort,
    "one-slot-short",
    R12,
    "A host's connection slots are one short: a resumed task waits with a slot to be had.",
    Planting {
        configure: Some(|config| {
            if config.max_connections_per_origin > 1 {
                config.max_connections_per_origin -= 1;
            }
        }),
        ..Planting::default()
    }
);
