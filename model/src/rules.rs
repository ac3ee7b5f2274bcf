//! The rules as checks: properties of a callback trace (R1, R2) and of a model state (R2, R4,
//! R5, R6, R7), usable on any implementation's trace and on the model itself.

use std::collections::BTreeSet;
use std::fmt;

use crate::alphabet::{Callback, TaskId};
use crate::machine::{Model, SessionState, TaskState};

/// A broken rule, with the rule's number from DESIGN.md and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub detail: String,
}

/// The rules of DESIGN.md that a trace or a state can break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
    R11,
    R12,
}

impl Rule {
    /// Every rule, in order.
    pub const ALL: [Rule; 12] = [
        Rule::R1,
        Rule::R2,
        Rule::R3,
        Rule::R4,
        Rule::R5,
        Rule::R6,
        Rule::R7,
        Rule::R8,
        Rule::R9,
        Rule::R10,
        Rule::R11,
        Rule::R12,
    ];
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} broken: {}", self.rule, self.detail)
    }
}

impl std::error::Error for Violation {}

fn broken(rule: Rule, detail: String) -> Result<(), Violation> {
    Err(Violation { rule, detail })
}

/// Check one session's callback trace, as delivered so far, against R1 and R2:
/// at most one `did_complete` per task and nothing about a task after it (R1); at most one
/// `did_become_invalid`, after every task's `did_complete`, and nothing after it (R2).
///
/// A trace that is complete (the session is invalidated) must also have a `did_complete` for
/// every task it mentions: pass `finished = true`.
pub fn check_trace(trace: &[Callback], finished: bool) -> Result<(), Violation> {
    let mut completed = BTreeSet::new();
    let mut mentioned = BTreeSet::new();
    let mut invalid = false;
    for (i, callback) in trace.iter().enumerate() {
        if invalid {
            return broken(
                Rule::R2,
                format!("callback #{i} {callback:?} after did_become_invalid"),
            );
        }
        match *callback {
            Callback::BecomeInvalid { .. } => {
                if let Some(t) = mentioned.difference(&completed).next() {
                    return broken(
                        Rule::R2,
                        format!("did_become_invalid (#{i}) before {t}'s did_complete"),
                    );
                }
                invalid = true;
            }
            Callback::Complete { task, .. } => {
                if !completed.insert(task) {
                    return broken(Rule::R1, format!("second did_complete for {task} (#{i})"));
                }
                mentioned.insert(task);
            }
            _ => {
                let task = callback.task().expect("task callback");
                if completed.contains(&task) {
                    return broken(
                        Rule::R1,
                        format!("{callback:?} (#{i}) after {task}'s did_complete"),
                    );
                }
                mentioned.insert(task);
            }
        }
    }
    if finished {
        if !invalid {
            return broken(Rule::R2, "no did_become_invalid".into());
        }
        if let Some(t) = mentioned.difference(&completed).next() {
            return broken(Rule::R1, format!("{t} never got did_complete"));
        }
    }
    Ok(())
}

/// Merge consecutive `ReceiveData` of the same task: a transport may split or join body
/// chunks, and the rules speak of bytes, not of chunks.
pub fn coalesce(trace: &[Callback]) -> Vec<Callback> {
    let mut out: Vec<Callback> = Vec::with_capacity(trace.len());
    for callback in trace {
        if let (
            Some(Callback::ReceiveData { task: last, bytes }),
            Callback::ReceiveData { task, bytes: more },
        ) = (out.last_mut(), callback)
            && *last == *task
        {
            *bytes += more;
            continue;
        }
        out.push(*callback);
    }
    out
}

/// Check the model's own state invariants. The model is the specification, so these are
/// checked at every state the exhaustive search reaches: a violation is a bug in the spec.
pub fn check_model(model: &Model) -> Result<(), Violation> {
    for (id, task) in model.tasks() {
        if task.state == TaskState::Completed
            && (task.connection || task.temp_file || task.held_bytes() > 0)
        {
            return broken(Rule::R5, format!("completed {id} still holds {task:?}"));
        }
        if task.buffered > model.read_ahead() {
            return broken(
                Rule::R6,
                format!(
                    "{id} holds {} bytes read ahead, past its {}",
                    task.buffered,
                    model.read_ahead()
                ),
            );
        }
        if let Some(window) = task.window
            && task.undelivered > window
        {
            return broken(
                Rule::R6,
                format!(
                    "{id} has {} bytes said to its delegate and not returned, past its {window}",
                    task.undelivered
                ),
            );
        }
        if task.state == TaskState::Suspended && task.timers_armed() {
            return broken(Rule::R7, format!("suspended {id} has timers armed"));
        }
    }
    for (id, session) in model.sessions() {
        let held = model.resources(id);
        let live: Vec<TaskId> = session
            .tasks
            .iter()
            .copied()
            .filter(|t| model.task(*t).is_some_and(|t| t.is_live()))
            .collect();
        // R4 holds once did_become_invalid has returned: until then a slow delegate still
        // has it, and what it was handed (a download's file) or is still owed.
        let released = session.kind != crate::SessionKind::Delegated || session.delegate_released;
        if session.state == SessionState::Invalidated && released && !held.is_zero() {
            return broken(Rule::R4, format!("invalidated {id} still holds {held:?}"));
        }
        // The host's slots: HTTP exchanges' connections, busy and pooled, within `per_host`;
        // a task waits for one only while none is to be had (R12 times it meanwhile).
        let http = |t: &&crate::Task| {
            t.connection
                && matches!(
                    t.kind,
                    crate::TaskKind::Data | crate::TaskKind::Download | crate::TaskKind::Upload
                )
        };
        let busy = session
            .tasks
            .iter()
            .filter_map(|t| model.task(*t))
            .filter(http)
            .count() as u32;
        if let Some(limit) = session.per_host
            && busy + session.idle_connections > limit
        {
            return broken(
                Rule::R12,
                format!(
                    "{id} has {busy} busy and {} idle connections, past its {limit} per host",
                    session.idle_connections
                ),
            );
        }
        let can_start = session.idle_connections > 0
            || session
                .per_host
                .is_none_or(|limit| busy + session.idle_connections < limit);
        if !session.waiting.is_empty() && can_start {
            return broken(
                Rule::R12,
                format!(
                    "{id} keeps {:?} waiting with a connection to be had",
                    session.waiting
                ),
            );
        }
        if session.state != SessionState::Active
            && session.state != SessionState::Invalidated
            && live.is_empty()
        {
            return broken(
                Rule::R2,
                format!("{id} is {:?} with no live task", session.state),
            );
        }
        if session.state == SessionState::Cancelling
            && live
                .iter()
                .all(|t| model.task(*t).unwrap().state != TaskState::Canceling)
        {
            return broken(Rule::R2, format!("{id} is cancelling but no task is"));
        }
    }
    Ok(())
}
