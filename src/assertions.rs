//! What a system under test showed after an op, and its comparison with the model. Each
//! difference is reported as the rule it breaks.
//!
//! ## Attribution: which rule a divergence breaks
//!
//! One wrong step usually shows several differences at once: a session that was dropped and
//! never finished (R10) also never says `did_become_invalid` (R2's word) and keeps its delegate
//! (R3's). The rule a divergence is reported with is the one whose obligation failed *first*,
//! in the order in which an op's consequences happen; the others follow from it.
//!
//! [`differences`] computes every difference, each with the rule that owns it, and puts them in
//! that causal order ([`Link`]); [`compare`] reports the first:
//!
//! 1. the op's own answer: a refusal (R8) or what a read returned (R6);
//! 2. a trace that breaks R1 or R2 by itself, whatever the model expects (a second
//!    `did_complete`, `did_become_invalid` before a task's `did_complete`): proof;
//! 3. the state of what the op acts on, its task or its session;
//! 4. the other tasks' states (cancelled with their session, admitted to a slot), then
//! 5. the other sessions' (a session is invalidated once its last task completes);
//! 6. what the delegates heard, each task's callbacks before its session's: they announce the
//!    transitions;
//! 7. what conveniences' futures returned;
//! 8. work left queued, and what is held: a transition's releases.
//!
//! A difference's rule is the obligation that made the model expect what it expects, read
//! from the op and the model before and after it: a task the model completes owes that to a
//! timeout or fault (R12), a websocket close (R11), its session's invalidate_and_cancel (R2),
//! its handle or session dropped (R10), or the lifecycle alone (R1) (`completion_rule`); a
//! session that falls short of where the model takes it owes that to R10 if no one holds it,
//! else to R2, and the shared session to R9 whatever it does (`session_rule`); a timer
//! differs by the timer the op arms or stops (`timer_rule`); what a task holds (its
//! connection, bytes, temp file) is released when it completes (R5), before its session is
//! invalidated, unless the op asked a host's slot for it (R12); what the session holds itself
//! goes at invalidation (R4: its pool, its cache) or at the shared session's idle timeout (R9).
//! A system that goes further than the model breaks the rule that forbids it: invalidated
//! early (R2), completed while suspended (R7).

use std::collections::{BTreeMap, BTreeSet};

use leakproof_model::rules::{Rule, Violation, check_trace, coalesce};
use leakproof_model::{
    Callback, Model, Op, Outcome, Refusal, Resources, Returned, SessionId, SessionKind,
    SessionState, Step, TaskId, TaskKind, TaskState, Timer,
};

/// What one session showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub state: SessionState,
    /// The implementation's own ledger.
    pub ledger: Resources,
    /// Callbacks or actions still queued: after settling there must be none.
    pub pending: u32,
    /// The witnesses' account, kept outside the implementation: connections the driver holds
    /// open or idle, timers it has armed, files that exist, and whether a `Weak` to the
    /// delegate still upgrades.
    pub witness: Resources,
    /// Every callback the delegate has heard so far.
    pub heard: Vec<Callback>,
}

/// What the whole system showed after one op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub refused: Option<Refusal>,
    /// What a stream or websocket op returned.
    pub returned: Option<Returned>,
    /// Callbacks heard during this op, all sessions, in delivery order.
    pub callbacks: Vec<Callback>,
    /// What conveniences' futures returned during this op.
    pub awaited: Vec<(TaskId, Outcome)>,
    pub tasks: BTreeMap<TaskId, TaskState>,
    pub sessions: BTreeMap<SessionId, SessionView>,
    /// Promises the witnesses showed broken at the moment they were made (a system that
    /// checks at that moment: the simulated client's), during this op.
    pub broken: Vec<Violation>,
}

/// Where a difference stands in the order in which one op's consequences happen: the first
/// difference in this order is the divergence's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    /// A promise the witnesses showed broken at the moment it was made (the simulated
    /// client's checkpoints): it happened before everything the op's end shows.
    Promise,
    /// The op's own answer: a refusal, what a read or receive returned.
    Answer,
    /// A delegate's trace that breaks R1 or R2 by itself.
    Trace,
    /// The state of the task or session the op acts on.
    Subject,
    /// Other tasks' states.
    Tasks,
    /// Other sessions' states.
    Sessions,
    /// What the delegates heard.
    Callbacks,
    /// What conveniences' futures returned.
    Futures,
    /// Work left queued, and what the sessions hold.
    Resources,
}

/// The op, and the model on either side of it: what a difference's rule is read from.
struct Transition<'a> {
    /// The op itself, or a `Par`'s two.
    parts: Vec<&'a Op>,
    before: &'a Model,
    after: &'a Model,
    step: &'a Step,
}

impl Transition<'_> {
    /// Whether the op acts on task `t`.
    fn names_task(&self, t: TaskId) -> bool {
        self.parts.iter().any(|op| op.task() == Some(t))
    }

    /// Whether the op acts on session `s` itself.
    fn names_session(&self, s: SessionId) -> bool {
        self.parts.iter().any(|op| match **op {
            Op::CreateSession { session, .. }
            | Op::FinishTasksAndInvalidate(session)
            | Op::InvalidateAndCancel(session)
            | Op::DropSession(session)
            | Op::Reset(session)
            | Op::IdleTimeoutPasses(session)
            | Op::DelegateBlocks(session)
            | Op::DelegateReturns(session)
            | Op::DelegateDefers(session) => session == s,
            _ => false,
        })
    }

    /// Whether the op invalidates session `s`, or lets go of it.
    fn ends_session(&self, s: SessionId) -> bool {
        self.parts.iter().any(|op| {
            matches!(**op, Op::FinishTasksAndInvalidate(x) | Op::InvalidateAndCancel(x)
                | Op::DropSession(x) if x == s)
        })
    }

    fn session_of(&self, t: TaskId) -> Option<SessionId> {
        self.after.task(t).map(|t| t.session)
    }

    fn shared(&self, s: SessionId) -> bool {
        self.after
            .session(s)
            .is_some_and(|s| s.kind == SessionKind::Shared)
    }

    /// The outcome the model gives task `t` in this step, if anyone hears it.
    fn expected_outcome(&self, t: TaskId) -> Option<Outcome> {
        let heard = self.step.callbacks.iter().find_map(|c| match *c {
            Callback::Complete { task, outcome } if task == t => Some(outcome),
            _ => None,
        });
        heard.or_else(|| {
            self.step
                .awaited
                .iter()
                .find(|(task, _)| *task == t)
                .map(|(_, outcome)| *outcome)
        })
    }

    /// Whether the op asks one of session `s`'s host slots for a task: a session with a
    /// per-host bound where an HTTP task starts, or where tasks wait for a slot (R12).
    fn admits(&self, s: SessionId) -> bool {
        let Some(session) = self.before.session(s) else {
            return false;
        };
        if session.per_host.is_none() {
            return false;
        }
        let http = |t: TaskId| {
            self.before.task(t).is_some_and(|t| {
                t.session == s
                    && matches!(
                        t.kind,
                        TaskKind::Data | TaskKind::Download | TaskKind::Upload
                    )
            })
        };
        !session.waiting.is_empty()
            || self.parts.iter().any(|op| match **op {
                Op::Resume(t) => http(t),
                Op::Await { session, .. } | Op::Fetch { session, .. } => session == s,
                _ => false,
            })
    }
}

/// The rule a failed outcome belongs to, if not the lifecycle's in general.
fn outcome_rule(outcome: Outcome) -> Option<Rule> {
    match outcome {
        Outcome::TimedOut(Timer::Close) => Some(Rule::R11),
        Outcome::TimedOut(_)
        | Outcome::Reset
        | Outcome::Malformed
        | Outcome::TooManyRedirects
        | Outcome::NoUpgrade => Some(Rule::R12),
        _ => None,
    }
}

/// The rule that obliges task `t` to complete in this step, as the op and the model say.
fn completion_rule(cx: &Transition, t: TaskId, outcome: Option<Outcome>) -> Rule {
    for op in &cx.parts {
        match **op {
            Op::TimePasses {
                task,
                timer: Timer::Close,
            }
            | Op::PeerCloses { task, .. }
            | Op::CloseWith(task)
                if task == t =>
            {
                return Rule::R11;
            }
            Op::TimePasses { task, .. } | Op::ServerFails { task, .. } if task == t => {
                return Rule::R12;
            }
            _ => {}
        }
    }
    if let Some(rule) = outcome.and_then(outcome_rule) {
        return rule;
    }
    let session = cx.session_of(t);
    let by_session = |matches: fn(&Op, SessionId) -> bool| {
        session.is_some_and(|s| cx.parts.iter().any(|op| matches(op, s)))
    };
    if by_session(|op, s| *op == Op::InvalidateAndCancel(s)) {
        // R2: under invalidate_and_cancel, the cancelled tasks complete first.
        return Rule::R2;
    }
    let dropped = cx
        .parts
        .iter()
        .any(|op| matches!(**op, Op::DropTask(task) if task == t))
        || by_session(|op, s| *op == Op::DropSession(s));
    let unreachable = cx.after.task(t).is_some_and(|task| !task.handle);
    if dropped || (unreachable && outcome == Some(Outcome::Cancelled)) {
        return Rule::R10;
    }
    Rule::R1
}

/// The rule a task's state breaks: the obligation it fell short of, or what forbids going
/// further than the model.
fn task_rule(cx: &Transition, t: TaskId, shown: Option<TaskState>, expected: TaskState) -> Rule {
    if let Some(s) = cx.session_of(t)
        && cx.shared(s)
        && cx.ends_session(s)
    {
        // R9: the shared session's tasks go on whatever is done to it.
        return Rule::R9;
    }
    let websocket = cx
        .after
        .task(t)
        .is_some_and(|t| t.kind == TaskKind::WebSocket);
    match (shown, expected) {
        (_, TaskState::Completed) => completion_rule(cx, t, cx.expected_outcome(t)),
        // Completed though the model keeps it: R7 if it was suspended (no timeout, no read).
        (Some(TaskState::Completed), TaskState::Suspended) => Rule::R7,
        (Some(TaskState::Completed), _) => Rule::R1,
        (Some(TaskState::Canceling), _) | (_, TaskState::Canceling) if websocket => Rule::R11,
        (Some(TaskState::Suspended), TaskState::Running)
        | (Some(TaskState::Running), TaskState::Suspended) => Rule::R7,
        _ => Rule::R1,
    }
}

/// How far along its lifecycle a session state is.
fn rank(state: SessionState) -> u8 {
    match state {
        SessionState::Active => 0,
        SessionState::Finishing | SessionState::Cancelling => 1,
        SessionState::Invalidated => 2,
    }
}

/// The rule a session's state breaks.
fn session_rule(
    cx: &Transition,
    s: SessionId,
    shown: SessionState,
    expected: SessionState,
) -> Rule {
    let session = cx.after.session(s);
    if cx.shared(s) {
        return Rule::R9;
    }
    if rank(shown) > rank(expected) {
        // Invalidated (or begun) before the model: before its tasks' did_complete.
        return Rule::R2;
    }
    if session.is_some_and(|s| !s.handle) && rank(shown) < rank(expected) {
        // R10: a session no one can reach is finished, and always reaches Invalidated.
        return Rule::R10;
    }
    Rule::R2
}

/// The rule a session's count of armed timers breaks: the timers the op arms or stops in the
/// model, its own task's first; if the model changed none, the system changed one by itself.
fn timer_rule(cx: &Transition, s: SessionId) -> Rule {
    let mut tasks: Vec<TaskId> = cx
        .after
        .session(s)
        .map(|session| session.tasks.clone())
        .unwrap_or_default();
    tasks.sort_by_key(|t| !cx.names_task(*t));
    let http = [Timer::Request, Timer::Resource];
    for t in &tasks {
        let (before, after) = (cx.before.task(*t), cx.after.task(*t));
        let armed =
            |task: Option<&leakproof_model::Task>, timer| task.is_some_and(|t| t.armed(timer));
        if armed(before, Timer::Close) != armed(after, Timer::Close) {
            return Rule::R11;
        }
        if http
            .iter()
            .any(|timer| armed(before, *timer) != armed(after, *timer))
        {
            let suspended = |task: Option<&leakproof_model::Task>| {
                task.is_some_and(|t| t.state == TaskState::Suspended)
            };
            return if suspended(before) || suspended(after) {
                Rule::R7
            } else {
                Rule::R12
            };
        }
    }
    let any = |f: fn(&leakproof_model::Task) -> bool| {
        tasks.iter().filter_map(|t| cx.after.task(*t)).any(f)
    };
    if any(|t| t.closing()) {
        Rule::R11
    } else if any(|t| t.state == TaskState::Suspended) {
        Rule::R7
    } else {
        Rule::R12
    }
}

/// The rule of the obligation `op` puts on a system, standing where `before` stands: what a
/// system that fails the op without showing a difference (it panics) is reported with.
pub fn obligation(op: &Op, before: &Model) -> Rule {
    let shared = |s: SessionId| {
        before
            .session(s)
            .is_some_and(|s| s.kind == SessionKind::Shared)
    };
    match *op {
        Op::Par(ref a, _) => obligation(a, before),
        Op::CreateTask { session, .. } | Op::Await { session, .. } | Op::Fetch { session, .. }
            if before
                .session(session)
                .is_some_and(|s| s.state != SessionState::Active) =>
        {
            Rule::R8
        }
        Op::FinishTasksAndInvalidate(s)
        | Op::InvalidateAndCancel(s)
        | Op::DropSession(s)
        | Op::IdleTimeoutPasses(s)
            if shared(s) =>
        {
            Rule::R9
        }
        Op::FinishTasksAndInvalidate(_) | Op::InvalidateAndCancel(_) => Rule::R2,
        Op::DropSession(_) | Op::DropTask(_) => Rule::R10,
        Op::Reset(_) => Rule::R4,
        Op::Resume(_) | Op::Suspend(_) => Rule::R7,
        Op::Read(_) | Op::Receive(_) | Op::ServerSends { .. } => Rule::R6,
        Op::ServerEnds { .. } | Op::IdleTimeoutPasses(_) => Rule::R5,
        Op::CloseWith(_)
        | Op::PeerCloses { .. }
        | Op::TimePasses {
            timer: Timer::Close,
            ..
        } => Rule::R11,
        Op::TimePasses { .. } | Op::ServerFails { .. } => Rule::R12,
        _ => Rule::R1,
    }
}

/// Compare the system with the model after `op`, which took the model from `before` to
/// `after` with `step`: the root difference, if any (see the module's docs).
pub fn compare(
    view: &View,
    op: &Op,
    before: &Model,
    after: &Model,
    step: &Step,
) -> Result<(), Violation> {
    match differences(view, op, before, after, step)
        .into_iter()
        .next()
    {
        Some((_, violation)) => Err(violation),
        None => Ok(()),
    }
}

/// Every difference between the system and the model after `op`, each with the rule whose
/// obligation it fails, root first (see the module's docs).
pub fn differences(
    view: &View,
    op: &Op,
    before: &Model,
    after: &Model,
    step: &Step,
) -> Vec<(Link, Violation)> {
    let cx = Transition {
        parts: match op {
            Op::Par(a, b) => vec![&**a, &**b],
            _ => vec![op],
        },
        before,
        after,
        step,
    };
    let mut found: Vec<(Link, Violation)> = Vec::new();
    let mut differ = |link: Link, rule: Rule, detail: String| {
        found.push((link, Violation { rule, detail }));
    };

    // A promise the witnesses showed broken at its moment, during the op.
    for violation in &view.broken {
        differ(Link::Promise, violation.rule, violation.detail.clone());
    }

    // The op's own answer.
    if view.refused != step.refused {
        let invalidated = Some(Refusal::SessionInvalidated);
        let rule = if view.refused == invalidated || step.refused == invalidated {
            Rule::R8
        } else {
            Rule::R1
        };
        let detail = format!("refused {:?}, the model {:?}", view.refused, step.refused);
        differ(Link::Answer, rule, detail);
    }
    if view.returned != step.returned {
        // A read or receive that finds other bytes than the model's held what it should not,
        // or lost what it should have held.
        let detail = format!(
            "returned {:?}, the model {:?}",
            view.returned, step.returned
        );
        differ(Link::Answer, Rule::R6, detail);
    }

    // Each delegate's whole trace, judged by itself: the system's own word that it is done
    // (invalidated, nothing queued) must come with did_become_invalid, after a did_complete
    // for each of its tasks.
    for (id, session) in &view.sessions {
        let delegated = after
            .session(*id)
            .is_some_and(|s| s.kind == SessionKind::Delegated);
        let finished =
            delegated && session.state == SessionState::Invalidated && session.pending == 0;
        let tasks: Vec<TaskId> = after
            .tasks()
            .filter(|(_, t)| t.session == *id && t.route == leakproof_model::Route::Handle)
            .map(|(t, _)| t)
            .collect();
        if let Err(v) = check_trace(&session.heard, finished)
            .and_then(|()| invalid_after_every_task(&session.heard, &tasks))
        {
            differ(Link::Trace, v.rule, format!("{id}: {}", v.detail));
        }
    }

    // States: the op's subject, then the other tasks, then the other sessions.
    for (id, task) in after.tasks() {
        let shown = view.tasks.get(&id).copied();
        if shown != Some(task.state) {
            let link = if cx.names_task(id) {
                Link::Subject
            } else {
                Link::Tasks
            };
            let rule = task_rule(&cx, id, shown, task.state);
            differ(
                link,
                rule,
                format!("{id} is {shown:?}, the model {:?}", task.state),
            );
        }
    }
    for (id, session) in after.sessions() {
        let link = if cx.names_session(id) {
            Link::Subject
        } else {
            Link::Sessions
        };
        let Some(shown) = view.sessions.get(&id) else {
            differ(link, Rule::R4, format!("{id} is missing from the system"));
            continue;
        };
        if shown.state != session.state {
            let rule = session_rule(&cx, id, shown.state, session.state);
            let detail = format!("{id} is {:?}, the model {:?}", shown.state, session.state);
            differ(link, rule, detail);
        }
    }

    // Each task's callbacks in its own order, and the session's after them (the trace above,
    // R2): a delegate that was slow catches up on several tasks at once, and their IOs and the
    // delivery then interleave as the threads run.
    let (heard, expected) = (per_task(&view.callbacks), per_task(&step.callbacks));
    if heard != expected {
        let keys: BTreeSet<Option<TaskId>> = heard.keys().chain(expected.keys()).copied().collect();
        // Tasks first: a session's did_become_invalid follows from its tasks' did_complete.
        let keys = keys
            .iter()
            .filter(|k| k.is_some())
            .chain(keys.iter().filter(|k| k.is_none()));
        let none = Vec::new();
        for key in keys {
            let (h, e) = (
                heard.get(key).unwrap_or(&none),
                expected.get(key).unwrap_or(&none),
            );
            if h != e {
                let rule = callback_rule(&cx, h, e);
                let what = key.map_or("sessions".to_string(), |t| t.to_string());
                differ(
                    Link::Callbacks,
                    rule,
                    format!("{what}: delegates heard {h:?}, the model says {e:?}"),
                );
            }
        }
    }

    let returned: BTreeMap<TaskId, Vec<Outcome>> = by_task(&view.awaited);
    let awaited: BTreeMap<TaskId, Vec<Outcome>> = by_task(&step.awaited);
    if returned != awaited {
        // A future that returned other than the model's result, or twice, or never.
        let tasks: BTreeSet<TaskId> = returned.keys().chain(awaited.keys()).copied().collect();
        for t in tasks {
            let (shown, expected) = (returned.get(&t), awaited.get(&t));
            if shown == expected {
                continue;
            }
            let first = |o: Option<&Vec<Outcome>>| o.and_then(|o| o.first().copied());
            let rule = match (first(shown), first(expected)) {
                (_, Some(outcome)) if shown.is_none() => completion_rule(&cx, t, Some(outcome)),
                (Some(a), Some(b)) => outcome_rule(b).or(outcome_rule(a)).unwrap_or(Rule::R1),
                (Some(a), None) => outcome_rule(a).unwrap_or(Rule::R1),
                _ => Rule::R1,
            };
            differ(
                Link::Futures,
                rule,
                format!("{t}'s future returned {shown:?}, the model says {expected:?}"),
            );
        }
    }

    for (id, session) in after.sessions() {
        let Some(shown) = view.sessions.get(&id) else {
            continue;
        };
        // Callbacks wait only behind a slow delegate; how many depends on how the body was
        // cut into chunks, so only whether any wait is compared.
        if (shown.pending != 0) != (session.queued() != 0) {
            let detail = format!(
                "{id} has {} callbacks or actions left after settling, the model {}",
                shown.pending,
                session.queued()
            );
            differ(Link::Resources, Rule::R4, detail);
        }
        let held = after.resources(id);
        for (source, resources) in [("ledger", &shown.ledger), ("witness", &shown.witness)] {
            for (rule, detail) in compare_resources(&cx, id, source, resources, &held) {
                differ(Link::Resources, rule, detail);
            }
        }
    }
    found.sort_by_key(|(link, _)| *link);
    found
}

/// Each task's outcomes as its future returned them.
fn by_task(awaited: &[(TaskId, Outcome)]) -> BTreeMap<TaskId, Vec<Outcome>> {
    let mut tasks: BTreeMap<TaskId, Vec<Outcome>> = BTreeMap::new();
    for (t, outcome) in awaited {
        tasks.entry(*t).or_default().push(*outcome);
    }
    tasks
}

/// R2, with what the model knows of the session's tasks: `did_become_invalid` comes after a
/// `did_complete` for every task of the session its delegate hears, even one it never heard of
/// otherwise.
fn invalid_after_every_task(trace: &[Callback], tasks: &[TaskId]) -> Result<(), Violation> {
    let Some(at) = trace
        .iter()
        .position(|c| matches!(c, Callback::BecomeInvalid { .. }))
    else {
        return Ok(());
    };
    let completed: BTreeSet<TaskId> = trace[..at]
        .iter()
        .filter_map(|c| match c {
            Callback::Complete { task, .. } => Some(*task),
            _ => None,
        })
        .collect();
    match tasks.iter().find(|t| !completed.contains(t)) {
        Some(t) => Err(Violation {
            rule: Rule::R2,
            detail: format!("did_become_invalid (#{at}) before {t}'s did_complete"),
        }),
        None => Ok(()),
    }
}

/// The callbacks of each task (and the sessions' own), each in order, adjacent chunks of body
/// merged.
fn per_task(trace: &[Callback]) -> BTreeMap<Option<TaskId>, Vec<Callback>> {
    let mut tasks: BTreeMap<Option<TaskId>, Vec<Callback>> = BTreeMap::new();
    for callback in trace {
        tasks.entry(callback.task()).or_default().push(*callback);
    }
    tasks.into_iter().map(|(t, c)| (t, coalesce(&c))).collect()
}

/// The rule one task's (or the sessions') divergent callbacks break, judged by the first that
/// differs: what the model expected there and the system did not say is owed to the
/// obligation behind it; what the system said there unasked, to the rule that forbids it.
fn callback_rule(cx: &Transition, heard: &[Callback], expected: &[Callback]) -> Rule {
    let (shown, wanted) = heard
        .iter()
        .zip(expected)
        .find(|(a, b)| a != b)
        .map(|(a, b)| (Some(*a), Some(*b)))
        .unwrap_or_else(|| {
            (
                heard.get(expected.len()).copied(),
                expected.get(heard.len()).copied(),
            )
        });
    let suspended = |c: &Callback| {
        c.task()
            .and_then(|t| cx.after.task(t))
            .is_some_and(|t| t.state == TaskState::Suspended)
    };
    match (shown, wanted) {
        (
            Some(Callback::Complete { outcome: a, .. }),
            Some(Callback::Complete {
                task, outcome: b, ..
            }),
        ) => outcome_rule(b)
            .or(outcome_rule(a))
            .unwrap_or_else(|| completion_rule(cx, task, Some(b))),
        (_, Some(Callback::Complete { task, outcome })) => completion_rule(cx, task, Some(outcome)),
        (_, Some(Callback::BecomeInvalid { session })) => {
            let unreachable = cx.after.session(session).is_some_and(|s| !s.handle);
            if unreachable { Rule::R10 } else { Rule::R2 }
        }
        (Some(Callback::BecomeInvalid { .. }), _) => Rule::R2,
        (Some(Callback::FinishDownloading { .. }), _)
        | (_, Some(Callback::FinishDownloading { .. })) => Rule::R5,
        (Some(Callback::Close { .. }), _) | (_, Some(Callback::Close { .. })) => Rule::R11,
        (Some(c), _) if suspended(&c) => Rule::R7,
        (
            Some(Callback::ReceiveData { bytes: more, .. }),
            Some(Callback::ReceiveData { bytes, .. }),
        ) if more > bytes => Rule::R6,
        (Some(Callback::Complete { outcome, .. }), _) => outcome_rule(outcome).unwrap_or(Rule::R1),
        _ => Rule::R1,
    }
}

/// Each resource the session holds, against the model; the rule of each difference.
fn compare_resources(
    cx: &Transition,
    id: SessionId,
    source: &str,
    shown: &Resources,
    held: &Resources,
) -> Vec<(Rule, String)> {
    let invalidated = cx
        .after
        .session(id)
        .is_some_and(|s| s.state == SessionState::Invalidated);
    let shared = cx.shared(id);
    let expire = cx.parts.iter().any(|op| **op == Op::IdleTimeoutPasses(id));
    // What a task holds is released when it completes (R5), which comes before its session's
    // invalidation: only what the session holds itself, its pool and its cache, is R4's.
    let held_by_tasks = if cx.admits(id) { Rule::R12 } else { Rule::R5 };
    let pooled = if invalidated {
        Rule::R4
    } else if shared && expire {
        Rule::R9
    } else {
        held_by_tasks
    };
    let fields: [(&str, u64, u64, Rule); 8] = [
        (
            "open connections",
            shown.open_connections.into(),
            held.open_connections.into(),
            held_by_tasks,
        ),
        (
            "idle connections",
            shown.idle_connections.into(),
            held.idle_connections.into(),
            pooled,
        ),
        (
            "buffered bytes",
            shown.buffered_bytes,
            held.buffered_bytes,
            if shown.buffered_bytes > held.buffered_bytes {
                Rule::R6
            } else {
                Rule::R5
            },
        ),
        (
            "live tasks",
            shown.live_tasks.into(),
            held.live_tasks.into(),
            Rule::R1,
        ),
        (
            "timers",
            shown.timers.into(),
            held.timers.into(),
            timer_rule(cx, id),
        ),
        (
            "temp files",
            shown.temp_files.into(),
            held.temp_files.into(),
            Rule::R5,
        ),
        (
            "delegate held",
            shown.delegate_held.into(),
            held.delegate_held.into(),
            Rule::R3,
        ),
        (
            "cached responses",
            shown.cached_responses.into(),
            held.cached_responses.into(),
            if shared { Rule::R9 } else { Rule::R4 },
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, shown, expected, _)| shown != expected)
        .map(|(name, shown, expected, rule)| {
            (
                rule,
                format!("{id} {source}: {name} {shown}, the model says {expected}"),
            )
        })
        .collect()
}
