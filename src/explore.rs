//! Exhaustive small-scope search: every op sequence up to a depth over a bounded alphabet,
//! breadth first, deduplicated by model state. The specification is checked against its own
//! rules at every state it reaches and on every step it takes; then every transition it took
//! is replayed against a system (the shortest path to its source, then its op), teardown and
//! full release included.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::rc::Rc;

use leakproof_model::rules::{Rule, Violation, check_model, check_trace};
use leakproof_model::{
    CACHE_ENTRIES, Callback, CloseFrame, Disposition, Fault, Model, Op, Redirect, ResourceId,
    Route, SessionId, SessionKind, SessionState, Step, TaskKind, Timer,
};

use crate::machine::{Divergence, System, run_sequence, teardown_ops};
use crate::strategies::ALL_KINDS;

/// The depth `cargo test` explores and replays against the engine with the default alphabet:
/// 21,262 states, 110,373 transitions, so 110,374 paths and 1,022,861 ops with their
/// teardowns; about a minute in a debug build on two cores shared with another job (exploring
/// 3 s, replaying 62 s). Streams and websockets make each depth cost about three times the one
/// before: depth 8 has 367,708 transitions, so the depth that was 8 for data, download and
/// upload tasks alone (65,464 transitions then) is 7 now.
pub const DEFAULT_DEPTH: usize = 7;

/// The depth to explore [`Alphabet::every_kind`] to: 15,599 states, 70,004 transitions and
/// 601,677 ops, about 45 s against the engine in a debug build on two cores shared with
/// another job. Its three kinds of session make each depth cost about three and a half times
/// the one before: depth 7 has 248,324 transitions.
pub const EVERY_KIND_DEPTH: usize = 6;

/// The ops the search may try: how many sessions and tasks it creates and of which kinds, and
/// the body sizes the server sends. Every user op, disposition, upgrade answer, fault, timer
/// and `reusable` is always in, except the dispositions that make a task of a kind the
/// alphabet leaves out (`BecomeStream` without streams, `BecomeDownload` without downloads).
/// Ids are the ones the model hands out next (`s0`, then `s1`; `t0`, then `t1`), so two
/// sequences that differ only in naming reach the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alphabet {
    pub sessions: u32,
    pub session_kinds: Vec<SessionKind>,
    pub tasks: u32,
    pub task_kinds: Vec<TaskKind>,
    pub body_sizes: Vec<u32>,
    /// The sessions' `max_connections_per_host` (`None`: no limit).
    pub per_host: Vec<Option<u32>>,
    /// The conveniences (`Op::Await`) it may start, of these kinds; they count among `tasks`.
    pub conveniences: Vec<TaskKind>,
    /// Whether the delegate may be slow (`Op::DelegateBlocks`, `Op::DelegateReturns`), or
    /// answer later (`Op::DelegateDefers`, `Op::Answer`, `Op::DropResponder`).
    pub pace: bool,
    /// Whether the server may redirect (`Op::ServerRedirects`, followed or refused).
    pub redirects: bool,
    /// Whether the user fetches cacheable resources (`Op::Fetch`) and resets sessions
    /// (`Op::Reset`).
    pub fetches: bool,
}

impl Default for Alphabet {
    /// One delegated session (the one that hears every callback), two tasks of any kind, a
    /// body chunk (or stream bytes, or websocket message) of one byte and one of 64 KiB, which
    /// fills a stream's 48 KiB read-ahead window and leaves the rest in the network (R6).
    fn default() -> Self {
        Self {
            sessions: 1,
            session_kinds: vec![SessionKind::Delegated],
            tasks: 2,
            task_kinds: ALL_KINDS.to_vec(),
            body_sizes: vec![1, 65_536],
            per_host: vec![None],
            conveniences: Vec::new(),
            pace: false,
            redirects: false,
            fetches: false,
        }
    }
}

impl Alphabet {
    /// One session of any kind and two tasks of any kind: every state class of the model (see
    /// [`crate::coverage::universe_scopes`]) is reachable with it. One body size suffices:
    /// 64 KiB fills a stream's window with some left over, a read then leaves it part full;
    /// what else the size changes (the bytes a delegate hears) is no state.
    pub fn every_kind() -> Self {
        Self {
            session_kinds: vec![
                SessionKind::Delegated,
                SessionKind::Plain,
                SessionKind::Shared,
            ],
            body_sizes: vec![65_536],
            // One connection per host: the second of two HTTP tasks waits for it (R12).
            per_host: vec![Some(1)],
            ..Self::default()
        }
    }

    /// The ops of the alphabet that the model allows in `model`.
    pub fn ops(&self, model: &Model) -> Vec<Op> {
        let mut ops = Vec::new();
        let session = model.next_session_id();
        if session.0 < self.sessions {
            ops.extend(self.session_kinds.iter().flat_map(|&kind| {
                self.per_host
                    .iter()
                    .map(move |&per_host| Op::CreateSession {
                        session,
                        kind,
                        per_host,
                    })
            }));
        }
        let task = model.next_task_id();
        for (session, _) in model.sessions() {
            if task.0 < self.tasks {
                ops.extend(self.task_kinds.iter().map(|&kind| Op::CreateTask {
                    session,
                    task,
                    kind,
                }));
                ops.extend(self.conveniences.iter().map(|&kind| Op::Await {
                    session,
                    task,
                    kind,
                }));
            }
            ops.extend([
                Op::FinishTasksAndInvalidate(session),
                Op::InvalidateAndCancel(session),
                Op::DropSession(session),
                Op::IdleTimeoutPasses(session),
            ]);
            if self.fetches {
                if task.0 < self.tasks {
                    ops.extend((0..=CACHE_ENTRIES as u8).map(|r| Op::Fetch {
                        session,
                        task,
                        resource: ResourceId(r),
                    }));
                }
                ops.push(Op::Reset(session));
            }
            if self.pace {
                ops.extend([
                    Op::DelegateBlocks(session),
                    Op::DelegateReturns(session),
                    Op::DelegateDefers(session),
                ]);
            }
        }
        // A response turns into a download or a stream only when those are in the alphabet.
        let mut answers = vec![Disposition::Allow, Disposition::Cancel];
        for (kind, answer) in [
            (TaskKind::Download, Disposition::BecomeDownload),
            (TaskKind::Stream, Disposition::BecomeStream),
        ] {
            if self.task_kinds.contains(&kind) {
                answers.push(answer);
            }
        }
        for (task, t) in model.tasks() {
            // A convenience allows every response whatever the answer would have been.
            let answers = match t.route {
                Route::Handle => answers.clone(),
                Route::Future => DISPOSITIONS.to_vec(),
            };
            ops.extend([
                Op::Resume(task),
                Op::Suspend(task),
                Op::Cancel(task),
                Op::DropTask(task),
                // Streams' and websockets' own ops: `allows` keeps them to their kind.
                Op::Read(task),
                Op::Write(task),
                Op::CloseRead(task),
                Op::CloseWrite(task),
                Op::Receive(task),
                Op::CloseWith(task),
                // A responder the delegate kept: `allows` keeps them to one.
                Op::Answer(task),
                Op::DropResponder(task),
            ]);
            ops.extend(
                answers
                    .iter()
                    .map(|&answer| Op::ServerHeaders { task, answer }),
            );
            if self.redirects {
                ops.extend(
                    [Redirect::Follow, Redirect::Refuse]
                        .map(|answer| Op::ServerRedirects { task, answer }),
                );
            }
            ops.extend([true, false].map(|accept| Op::ServerAnswersUpgrade { task, accept }));
            ops.extend(
                self.body_sizes
                    .iter()
                    .map(|&bytes| Op::ServerSends { task, bytes }),
            );
            ops.extend([true, false].map(|reusable| Op::ServerEnds { task, reusable }));
            ops.extend(
                [
                    CloseFrame::Code,
                    CloseFrame::NoCode,
                    CloseFrame::InvalidCode,
                ]
                .map(|frame| Op::PeerCloses { task, frame }),
            );
            ops.extend(
                [Fault::Reset, Fault::Malformed].map(|fault| Op::ServerFails { task, fault }),
            );
            ops.extend(
                [Timer::Request, Timer::Resource, Timer::Close]
                    .map(|timer| Op::TimePasses { task, timer }),
            );
        }
        ops.retain(|op| model.allows(op));
        ops
    }
}

/// Every answer to `did_receive_response`.
const DISPOSITIONS: [Disposition; 4] = [
    Disposition::Allow,
    Disposition::Cancel,
    Disposition::BecomeDownload,
    Disposition::BecomeStream,
];

/// How big a search was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub depth: usize,
    /// Distinct model states reached, the initial one included.
    pub states: usize,
    /// Ops applied: every allowed op of the alphabet from every state above the last depth.
    pub transitions: usize,
    /// States first reached at each depth, from 0 (the initial state) to `depth`.
    pub new_states: Vec<usize>,
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "depth {}: {} states (new per depth {:?}), {} transitions",
            self.depth, self.states, self.new_states, self.transitions
        )
    }
}

/// What the search found, and what to replay.
#[derive(Debug, Clone)]
pub struct Exploration {
    pub alphabet: Alphabet,
    pub depth: usize,
    pub states: usize,
    pub transitions: usize,
    pub new_states: Vec<usize>,
    /// What to replay, shortest first: the empty path, then for every transition the shortest
    /// path to its source followed by its op. So each distinct state's shortest path is here,
    /// and so is every step into a state reached before: a `Cancel`, a `TimePasses` and a
    /// `ServerFails` from the same state reach the same state but say different callbacks.
    pub paths: Vec<Vec<Op>>,
}

impl fmt::Display for Exploration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "depth {}: {} states (new per depth {:?}), {} transitions, {} paths",
            self.depth,
            self.states,
            self.new_states,
            self.transitions,
            self.paths.len()
        )
    }
}

/// A bug in the specification: a path along which the model breaks its own rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecBug {
    pub path: Vec<Op>,
    pub violation: Violation,
}

impl fmt::Display for SpecBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "spec: {}", self.violation)?;
        writeln!(f, "  path ({} ops):", self.path.len())?;
        for op in &self.path {
            writeln!(f, "    {op:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecBug {}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    pub paths: usize,
    /// Ops applied to the system, teardowns included.
    pub ops: usize,
}

/// Every op path up to `depth` over `alphabet`, deduplicated by model state, each state and
/// step checked against the model's rules; the paths to replay.
pub fn explore(alphabet: &Alphabet, depth: usize) -> Result<Exploration, SpecBug> {
    explore_where(alphabet, depth, |_, _| true)
}

/// [`explore`], keeping to replay only the transitions `keep` accepts (it is asked once per
/// transition, breadth first, with the state before and the op): the paths are the empty one
/// and those transitions'. The census still counts every transition searched.
pub fn explore_where(
    alphabet: &Alphabet,
    depth: usize,
    mut keep: impl FnMut(&Model, &Op) -> bool,
) -> Result<Exploration, SpecBug> {
    let mut transitions = Vec::new();
    let tree = walk(alphabet, depth, |source, before, op| {
        if keep(before, op) {
            transitions.push((source, op.clone()));
        }
    })?;
    let paths = std::iter::once(Vec::new())
        .chain(
            transitions
                .iter()
                .map(|(source, op)| path_then(&tree.parents, *source, op)),
        )
        .collect();
    Ok(Exploration {
        alphabet: alphabet.clone(),
        depth,
        states: tree.census.states,
        transitions: tree.census.transitions,
        new_states: tree.census.new_states,
        paths,
    })
}

/// The search of [`explore`] without the paths, calling `visit` with the state before and
/// the op of every transition: the model alone, as deep as memory for its states allows.
pub fn search(
    alphabet: &Alphabet,
    depth: usize,
    mut visit: impl FnMut(&Model, &Op),
) -> Result<Census, SpecBug> {
    walk(alphabet, depth, |_, before, op| visit(before, op)).map(|tree| tree.census)
}

/// The breadth-first search, calling `visit` with the source node, the state before and the
/// op of every transition.
fn walk(
    alphabet: &Alphabet,
    depth: usize,
    mut visit: impl FnMut(usize, &Model, &Op),
) -> Result<Tree, SpecBug> {
    let mut parents: Vec<(usize, Option<Op>)> = vec![(0, None)];
    let root = Rc::new(Model::new());
    check_state(&root, &Traces::new()).map_err(|violation| SpecBug {
        path: Vec::new(),
        violation,
    })?;
    let mut visited = HashSet::from([Rc::clone(&root)]);
    let mut frontier = vec![Reached {
        model: root,
        node: 0,
        traces: Traces::new(),
    }];
    let mut new_states = vec![1];
    let mut transitions = 0;
    for _ in 0..depth {
        let mut next = Vec::new();
        for at in &frontier {
            for op in alphabet.ops(&at.model) {
                visit(at.node, &at.model, &op);
                transitions += 1;
                let bug = |violation| SpecBug {
                    path: path_then(&parents, at.node, &op),
                    violation,
                };
                let mut model = Model::clone(&at.model);
                let step = model.apply(&op);
                // Checked on every step, even into a known state: the trace differs by path.
                // A step without callbacks leaves every trace, and whether it is finished, as
                // it was.
                let heard = if step.callbacks.is_empty() {
                    None
                } else {
                    Some(hear(&at.traces, &model, &step).map_err(bug)?)
                };
                if visited.contains(&model) {
                    continue;
                }
                let traces = heard.unwrap_or_else(|| at.traces.clone());
                check_state(&model, &traces).map_err(bug)?;
                let model = Rc::new(model);
                visited.insert(Rc::clone(&model));
                parents.push((at.node, Some(op)));
                next.push(Reached {
                    model,
                    node: parents.len() - 1,
                    traces,
                });
            }
        }
        new_states.push(next.len());
        frontier = next;
    }
    Ok(Tree {
        census: Census {
            depth,
            states: parents.len(),
            transitions,
            new_states,
        },
        parents,
    })
}

/// Replay every path of `exploration` against a fresh `S`, each followed by the teardown and
/// its release check; stop at the first path where `S` parts from the model.
pub fn replay<S: System>(
    exploration: &Exploration,
) -> Result<ReplaySummary, (Vec<Op>, Divergence)> {
    let mut summary = ReplaySummary { paths: 0, ops: 0 };
    for path in &exploration.paths {
        summary.ops += run_sequence::<S>(path).map_err(|divergence| (path.clone(), divergence))?;
        summary.paths += 1;
    }
    Ok(summary)
}

/// Each session's callbacks so far, as its delegate heard them.
type Traces = BTreeMap<SessionId, Vec<Callback>>;

/// A state the search has reached, with how it got there.
struct Reached {
    model: Rc<Model>,
    node: usize,
    traces: Traces,
}

/// The search tree: each state's parent and the op that first reached it, root first. Paths
/// are read off it rather than carried along, so memory grows with states, not paths.
struct Tree {
    parents: Vec<(usize, Option<Op>)>,
    census: Census,
}

/// The ops from the initial state to `node`, then `op`.
fn path_then(parents: &[(usize, Option<Op>)], mut node: usize, op: &Op) -> Vec<Op> {
    let mut path = vec![op.clone()];
    while let (parent, Some(op)) = &parents[node] {
        path.push(op.clone());
        node = *parent;
    }
    path.reverse();
    path
}

/// Append `step`'s callbacks to the traces and check every session's trace (R1, R2): a
/// delegated session that is invalidated must have heard all of its story.
fn hear(traces: &Traces, model: &Model, step: &Step) -> Result<Traces, Violation> {
    let mut traces = traces.clone();
    for callback in &step.callbacks {
        let session = match *callback {
            Callback::BecomeInvalid { session } => session,
            _ => {
                let task = callback.task().expect("a task callback");
                model.task(task).expect("the task exists").session
            }
        };
        traces.entry(session).or_default().push(*callback);
    }
    for (id, trace) in &traces {
        // Once nothing waits in its queue (a slow delegate may still owe it callbacks).
        let finished = model.session(*id).is_some_and(|s| {
            s.state == SessionState::Invalidated
                && s.kind == SessionKind::Delegated
                && s.queued() == 0
        });
        check_trace(trace, finished).map_err(|v| Violation {
            rule: v.rule,
            detail: format!("{id}: {}", v.detail),
        })?;
    }
    Ok(traces)
}

/// The model's invariants at `model`, and that the teardown from there, which lets go of
/// everything (R10), leaves every session holding nothing (R4, R9) with a whole trace.
fn check_state(model: &Model, traces: &Traces) -> Result<(), Violation> {
    check_model(model)?;
    let mut end = model.clone();
    let mut traces = traces.clone();
    for op in teardown_ops(model) {
        let step = end.apply(&op);
        traces = hear(&traces, &end, &step)?;
    }
    check_model(&end)?;
    for (id, session) in end.sessions() {
        let held = end.resources(id);
        if !crate::machine::released_at_teardown(session.kind, held) {
            return Err(Violation {
                rule: Rule::R10,
                detail: format!("{id} ({:?}) holds {held:?} after teardown", session.kind),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use leakproof_model::{Disposition, Op, TaskKind, Timer};

    use super::*;
    use crate::coverage::OpKind;
    use crate::strategies::HTTP_KINDS;

    /// The kinds of op a search of `alphabet` to `depth` tries.
    fn tried(alphabet: &Alphabet, depth: usize) -> BTreeSet<OpKind> {
        let mut kinds = BTreeSet::new();
        search(alphabet, depth, |_, op| {
            kinds.insert(OpKind::of(op));
        })
        .unwrap_or_else(|bug| panic!("{bug}"));
        kinds
    }

    #[test]
    fn every_kind_tries_every_op_of_streams_and_websockets() {
        let one_task = Alphabet {
            tasks: 1,
            ..Alphabet::every_kind()
        };

        let kinds = tried(&one_task, 7);

        for kind in [
            OpKind::CreateTask(TaskKind::Stream),
            OpKind::CreateTask(TaskKind::WebSocket),
            OpKind::ServerHeaders(Disposition::BecomeStream),
            OpKind::Read,
            OpKind::Write,
            OpKind::CloseRead,
            OpKind::CloseWrite,
            OpKind::Receive,
            OpKind::CloseWith,
            OpKind::ServerAnswersUpgrade { accept: true },
            OpKind::ServerAnswersUpgrade { accept: false },
            OpKind::PeerCloses(CloseFrame::Code),
            OpKind::PeerCloses(CloseFrame::NoCode),
            OpKind::PeerCloses(CloseFrame::InvalidCode),
            OpKind::TimePasses(Timer::Close),
        ] {
            assert!(kinds.contains(&kind), "{kind} never tried");
        }
    }

    #[test]
    fn an_alphabet_of_http_kinds_makes_no_stream_and_no_websocket() {
        let alphabet = Alphabet {
            task_kinds: HTTP_KINDS.to_vec(),
            ..Alphabet::every_kind()
        };

        let mut kinds = BTreeSet::new();
        search(&alphabet, 6, |before, op| {
            kinds.insert(OpKind::of(op));
            assert!(
                before.tasks().all(|(_, t)| HTTP_KINDS.contains(&t.kind)),
                "{op:?} after a stream or websocket in {before:?}"
            );
        })
        .unwrap_or_else(|bug| panic!("{bug}"));

        assert!(kinds.contains(&OpKind::ServerHeaders(Disposition::BecomeDownload)));
        assert!(!kinds.contains(&OpKind::ServerHeaders(Disposition::BecomeStream)));
        assert!(!kinds.iter().any(|kind| matches!(
            kind,
            OpKind::Read | OpKind::Receive | OpKind::ServerAnswersUpgrade { .. }
        )));
    }

    #[test]
    fn explore_where_keeps_the_paths_it_is_asked_to() {
        let alphabet = Alphabet::default();
        let all = explore(&alphabet, 4).unwrap_or_else(|bug| panic!("{bug}"));

        let reads = explore_where(&alphabet, 4, |_, op| matches!(op, Op::Read(_)))
            .unwrap_or_else(|bug| panic!("{bug}"));

        assert_eq!(reads.transitions, all.transitions);
        assert!(reads.paths[0].is_empty());
        assert!(reads.paths.len() > 1);
        assert!(
            reads.paths[1..]
                .iter()
                .all(|path| matches!(path.last(), Some(Op::Read(_))))
        );
        let in_all = all
            .paths
            .iter()
            .filter(|path| matches!(path.last(), Some(Op::Read(_))))
            .count();
        assert_eq!(reads.paths.len(), in_all + 1);
    }
}
