//! What a system under test showed after an op, and its comparison with the model. Each
//! difference is reported as the rule it breaks.

use std::collections::BTreeMap;

use leakproof_model::rules::{Rule, Violation, check_trace, coalesce};
use leakproof_model::{
    Callback, Model, Outcome, Refusal, Resources, Returned, SessionId, SessionKind, SessionState,
    Step, TaskId, TaskState,
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

fn broken(rule: Rule, detail: String) -> Result<(), Violation> {
    Err(Violation { rule, detail })
}

/// Compare the system with the model after an op whose step was `step`.
pub fn compare(view: &View, model: &Model, step: &Step) -> Result<(), Violation> {
    // A promise broken at its moment is the first thing that went wrong.
    if let Some(violation) = view.broken.first() {
        return Err(violation.clone());
    }
    if view.refused != step.refused {
        let invalidated = Some(Refusal::SessionInvalidated);
        let rule = if view.refused == invalidated || step.refused == invalidated {
            Rule::R8
        } else {
            Rule::R1
        };
        return broken(
            rule,
            format!("refused {:?}, the model {:?}", view.refused, step.refused),
        );
    }
    if view.returned != step.returned {
        // A read or receive that finds other bytes than the model's held what it should not,
        // or lost what it should have held.
        return broken(
            Rule::R6,
            format!(
                "returned {:?}, the model {:?}",
                view.returned, step.returned
            ),
        );
    }
    for (id, session) in &view.sessions {
        // Only a delegate hears did_become_invalid.
        let finished = model.session(*id).is_some_and(|s| {
            s.state == SessionState::Invalidated && s.kind == SessionKind::Delegated
        });
        check_trace(&session.heard, finished && session.pending == 0)
            .map_err(|v| in_session(*id, v))?;
    }
    // Each task's callbacks in its own order, and the session's after them (check_trace, R2):
    // a delegate that was slow catches up on several tasks at once, and their IOs and the
    // delivery then interleave as the threads run.
    let (heard, expected) = (per_task(&view.callbacks), per_task(&step.callbacks));
    if heard != expected {
        let (heard, expected) = (coalesce(&view.callbacks), coalesce(&step.callbacks));
        let rule = callback_rule(&heard, &expected, model);
        return broken(
            rule,
            format!("delegates heard {heard:?}, the model says {expected:?}"),
        );
    }
    let mut returned = view.awaited.clone();
    let mut expected = step.awaited.clone();
    returned.sort_by_key(|(t, _)| *t);
    expected.sort_by_key(|(t, _)| *t);
    if returned != expected {
        // A future that returned other than the model's result, or twice, or never.
        let timed =
            |a: &[(TaskId, Outcome)]| a.iter().any(|(_, o)| matches!(o, Outcome::TimedOut(_)));
        let rule = if timed(&returned) || timed(&expected) {
            Rule::R12
        } else {
            Rule::R1
        };
        return broken(
            rule,
            format!("futures returned {returned:?}, the model says {expected:?}"),
        );
    }
    for (id, task) in model.tasks() {
        let shown = view.tasks.get(&id).copied();
        if shown != Some(task.state) {
            let rule = match (shown, task.state) {
                (_, TaskState::Completed) if !task.handle => Rule::R10,
                (Some(TaskState::Completed), _) | (_, TaskState::Completed) => Rule::R1,
                _ => Rule::R7,
            };
            return broken(
                rule,
                format!("{id} is {shown:?}, the model {:?}", task.state),
            );
        }
    }
    for (id, session) in model.sessions() {
        let Some(shown) = view.sessions.get(&id) else {
            return broken(Rule::R4, format!("{id} is missing from the system"));
        };
        if shown.state != session.state {
            return broken(
                Rule::R2,
                format!("{id} is {:?}, the model {:?}", shown.state, session.state),
            );
        }
        // Callbacks wait only behind a slow delegate; how many depends on how the body was
        // cut into chunks, so only whether any wait is compared.
        if (shown.pending != 0) != (session.queued() != 0) {
            return broken(
                Rule::R4,
                format!(
                    "{id} has {} callbacks or actions left after settling, the model {}",
                    shown.pending,
                    session.queued()
                ),
            );
        }
        let held = model.resources(id);
        compare_resources(id, "ledger", &shown.ledger, &held, session.state)?;
        compare_resources(id, "witness", &shown.witness, &held, session.state)?;
    }
    Ok(())
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

fn in_session(id: SessionId, v: Violation) -> Violation {
    Violation {
        rule: v.rule,
        detail: format!("{id}: {}", v.detail),
    }
}

/// The rule a divergent trace breaks, judged by the first callback that differs.
fn callback_rule(heard: &[Callback], expected: &[Callback], model: &Model) -> Rule {
    let first = heard
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
            .and_then(|t| model.task(t))
            .is_some_and(|t| t.state == TaskState::Suspended)
    };
    let unreachable = |c: &Callback| {
        c.task()
            .and_then(|t| model.task(t))
            .is_some_and(|t| !t.handle)
    };
    match first {
        (Some(Callback::Complete { .. }), Some(Callback::Complete { .. })) => Rule::R12,
        (_, Some(c @ Callback::Complete { .. })) if unreachable(&c) => Rule::R10,
        (Some(Callback::BecomeInvalid { .. }), _) | (_, Some(Callback::BecomeInvalid { .. })) => {
            Rule::R2
        }
        (Some(Callback::FinishDownloading { .. }), _)
        | (_, Some(Callback::FinishDownloading { .. })) => Rule::R5,
        (Some(c), _) if suspended(&c) => Rule::R7,
        _ => Rule::R1,
    }
}

fn compare_resources(
    id: SessionId,
    source: &str,
    shown: &Resources,
    held: &Resources,
    state: SessionState,
) -> Result<(), Violation> {
    let connections = if state == SessionState::Invalidated {
        Rule::R4
    } else {
        Rule::R5
    };
    let fields: [(&str, u64, u64, Rule); 8] = [
        (
            "open connections",
            shown.open_connections.into(),
            held.open_connections.into(),
            connections,
        ),
        (
            "idle connections",
            shown.idle_connections.into(),
            held.idle_connections.into(),
            connections,
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
        ("timers", shown.timers.into(), held.timers.into(), Rule::R7),
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
            Rule::R4,
        ),
    ];
    for (name, shown, expected, rule) in fields {
        if shown != expected {
            return broken(
                rule,
                format!("{id} {source}: {name} {shown}, the model says {expected}"),
            );
        }
    }
    Ok(())
}
