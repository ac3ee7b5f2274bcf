//! The `.ops` format: it round-trips every sequence the suite generates and every op there
//! is, names the line of any mistake without panicking, renumbers without changing what a
//! sequence does, and writes `#[test]`s that compile (one is pasted below).

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest_state_machine::ReferenceStateMachine;

use leakproof_check::engine_sut::EngineWorld;
use leakproof_check::machine::run_sequence;
use leakproof_check::ops::{
    Expect, Renumbering, Repro, allowed, line, parse, print, renumber, test_snippet,
};
use leakproof_check::reference::Reference;
use leakproof_check::run::{Failure, Report};
use leakproof_check::strategies::{
    close_frame, disposition, fault, per_host, session_kind, task_kind, timer,
};
use leakproof_model::rules::Rule;
use leakproof_model::{
    Callback, CloseFrame, Disposition, Model, Op, Outcome, Redirect, ResourceId, Returned,
    SessionId, Step, TaskId, TaskKind, Timer,
};

const CASES: u32 = 256;

fn session_id() -> impl Strategy<Value = SessionId> + Clone {
    prop_oneof![0u32..4, any::<u32>()].prop_map(SessionId)
}

fn task_id() -> impl Strategy<Value = TaskId> + Clone {
    prop_oneof![0u32..10, any::<u32>()].prop_map(TaskId)
}

/// Any op at all, with any ids and byte counts, whether or not the model would allow it.
fn any_op() -> impl Strategy<Value = Op> {
    let (s, t) = (session_id(), task_id());
    prop_oneof![
        (s.clone(), session_kind(), per_host()).prop_map(|(session, kind, per_host)| {
            Op::CreateSession {
                session,
                kind,
                per_host,
            }
        }),
        (s.clone(), t.clone(), task_kind()).prop_map(|(session, task, kind)| Op::CreateTask {
            session,
            task,
            kind
        }),
        (s.clone(), t.clone(), task_kind()).prop_map(|(session, task, kind)| Op::Await {
            session,
            task,
            kind
        }),
        s.clone().prop_map(Op::FinishTasksAndInvalidate),
        s.clone().prop_map(Op::InvalidateAndCancel),
        s.clone().prop_map(Op::DropSession),
        s.clone().prop_map(Op::DelegateBlocks),
        s.clone().prop_map(Op::DelegateReturns),
        s.clone().prop_map(Op::DelegateDefers),
        s.clone().prop_map(Op::Reset),
        (s.clone(), t.clone(), 0..3u8).prop_map(|(session, task, r)| Op::Fetch {
            session,
            task,
            resource: ResourceId(r)
        }),
        t.clone().prop_map(Op::Answer),
        t.clone().prop_map(Op::DropResponder),
        s.prop_map(Op::IdleTimeoutPasses),
        t.clone().prop_map(Op::Resume),
        t.clone().prop_map(Op::Suspend),
        t.clone().prop_map(Op::Cancel),
        t.clone().prop_map(Op::DropTask),
        (t.clone(), disposition()).prop_map(|(task, answer)| Op::ServerHeaders { task, answer }),
        (t.clone(), any::<bool>()).prop_map(|(task, follow)| Op::ServerRedirects {
            task,
            answer: if follow {
                Redirect::Follow
            } else {
                Redirect::Refuse
            }
        }),
        (t.clone(), any::<u32>()).prop_map(|(task, bytes)| Op::ServerSends { task, bytes }),
        (t.clone(), any::<bool>()).prop_map(|(task, reusable)| Op::ServerEnds { task, reusable }),
        (t.clone(), fault()).prop_map(|(task, fault)| Op::ServerFails { task, fault }),
        (t.clone(), timer()).prop_map(|(task, timer)| Op::TimePasses { task, timer }),
        t.clone().prop_map(Op::Read),
        t.clone().prop_map(Op::Write),
        t.clone().prop_map(Op::CloseRead),
        t.clone().prop_map(Op::CloseWrite),
        t.clone().prop_map(Op::Receive),
        t.clone().prop_map(Op::CloseWith),
        (t.clone(), any::<bool>())
            .prop_map(|(task, accept)| Op::ServerAnswersUpgrade { task, accept }),
        (t, close_frame()).prop_map(|(task, frame)| Op::PeerCloses { task, frame }),
    ]
}

fn expect() -> impl Strategy<Value = Expect> {
    let rules = Rule::ALL.to_vec();
    prop_oneof![
        Just(Expect::Pass),
        Just(Expect::Fail(None)),
        select(rules).prop_map(|rule| Expect::Fail(Some(rule))),
    ]
}

/// Notes as `Repro` defines them: trimmed lines that are not an expect line.
fn notes() -> impl Strategy<Value = Vec<String>> {
    let note = "[a-zA-Z0-9 ,.:()'#-]{0,30}"
        .prop_map(|note| note.trim().to_string())
        .prop_filter("not an expect line", |note| !note.starts_with("expect:"));
    vec(note, 0..3)
}

fn round_trips(repro: &Repro) -> Result<(), TestCaseError> {
    let text = print(repro);
    let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e} in\n{text}")))?;
    prop_assert_eq!(&parsed, repro);
    prop_assert_eq!(print(&parsed), text);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn generated_sequences_round_trip(
        (_, ops, _) in Reference::sequential_strategy(1..40),
        expect in expect(),
        notes in notes(),
    ) {
        round_trips(&Repro { expect, notes, ops })?;
    }

    #[test]
    fn any_ops_round_trip(ops in vec(any_op(), 0..40), expect in expect(), notes in notes()) {
        round_trips(&Repro { expect, notes, ops })?;
    }

    #[test]
    fn parse_never_panics_on_any_text(text in any::<String>()) {
        let _ = parse(&text);
    }

    /// Text made of the format's own words gets deep into the grammar before it goes wrong.
    #[test]
    fn parse_never_panics_on_near_misses(
        lines in vec(vec(select(WORDS.to_vec()), 0..7), 0..6),
    ) {
        let text: Vec<String> = lines.iter().map(|words| words.join(" ")).collect();
        let _ = parse(&text.join("\n"));
    }

    /// Shrinking removes ops and keeps the ids of the rest; renumbering those ids changes
    /// nothing the model or the engine does, only the names.
    #[test]
    fn renumbering_changes_only_names(
        (_, ops, _) in Reference::sequential_strategy(1..40),
        keep in vec(any::<bool>(), 40),
    ) {
        let shrunk: Vec<Op> = ops
            .iter()
            .zip(&keep)
            .filter(|(_, keep)| **keep)
            .map(|(op, _)| op.clone())
            .collect();

        let renumbering = Renumbering::of(&shrunk);
        let renumbered = renumber(&shrunk);

        let (mut original, mut renamed) = (Model::new(), Model::new());
        for (op, new) in shrunk.iter().zip(&renumbered) {
            prop_assert_eq!(original.allows(op), renamed.allows(new), "{:?} as {:?}", op, new);
            if original.allows(op) {
                let step = original.apply(op);
                prop_assert_eq!(rename(&step, &renumbering), renamed.apply(new));
            }
        }
        for (id, _) in original.sessions() {
            prop_assert_eq!(original.resources(id), renamed.resources(renumbering.session(id)));
        }
        // Whether it held, not how many steps: after a `par`, the teardown depends on the
        // order the two ops took.
        let outcome = |ops: &[Op]| {
            run_sequence::<EngineWorld>(ops)
                .map(drop)
                .map_err(|d| d.violation.rule)
        };
        prop_assert_eq!(outcome(&shrunk), outcome(&renumbered));
        // Dense and in order of appearance already: s0, t0, t1, ...
        prop_assert_eq!(renumber(&renumbered), renumbered);
    }
}

/// `step` as the renamed sequence's step must read.
fn rename(step: &Step, renumbering: &Renumbering) -> Step {
    let t = |task| renumbering.task(task);
    let callbacks = step
        .callbacks
        .iter()
        .map(|callback| match *callback {
            Callback::ReceiveResponse { task } => Callback::ReceiveResponse { task: t(task) },
            Callback::WillRedirect { task } => Callback::WillRedirect { task: t(task) },
            Callback::ReceiveData { task, bytes } => Callback::ReceiveData {
                task: t(task),
                bytes,
            },
            Callback::BecomeDownload { task } => Callback::BecomeDownload { task: t(task) },
            Callback::FinishDownloading { task } => Callback::FinishDownloading { task: t(task) },
            Callback::BecomeStream { task } => Callback::BecomeStream { task: t(task) },
            Callback::Open { task } => Callback::Open { task: t(task) },
            Callback::Close { task } => Callback::Close { task: t(task) },
            Callback::Complete { task, outcome } => Callback::Complete {
                task: t(task),
                outcome,
            },
            Callback::BecomeInvalid { session } => Callback::BecomeInvalid {
                session: renumbering.session(session),
            },
        })
        .collect();
    let awaited = step
        .awaited
        .iter()
        .map(|&(task, outcome)| (t(task), outcome))
        .collect();
    Step {
        refused: step.refused,
        returned: step.returned,
        callbacks,
        awaited,
    }
}

/// Every word of the grammar, and a few that are almost right.
const WORDS: &[&str] = &[
    "#",
    "# expect:",
    "pass",
    "fail",
    "R5",
    "R13",
    "session",
    "task",
    "await",
    "delegate",
    "blocks",
    "returns",
    "in",
    "resume",
    "suspend",
    "cancel",
    "drop",
    "finish",
    "tasks",
    "and",
    "invalidate",
    "server",
    "head",
    "allow",
    "become-download",
    "sends",
    "garbage",
    "ends",
    "closes",
    "resets",
    "time",
    "passes",
    "idle",
    "request",
    "resource",
    "timeout",
    "plain",
    "delegated",
    "shared",
    "data",
    "download",
    "upload",
    "stream",
    "websocket",
    "become-stream",
    "read",
    "write",
    "close",
    "receive",
    "going",
    "away",
    "upgrades",
    "refuses",
    "upgrade",
    "s0",
    "t0",
    "s",
    "t",
    "t-1",
    "s4294967296",
    "0",
    "4096",
    "+1",
    "99999999999",
];

const EVERY_OP: &str = include_str!("repros/every-op.ops");

/// The line of each op with its ids and counts blanked: the grammar, one form each.
fn forms(ops: &[Op]) -> BTreeSet<String> {
    ops.iter()
        .map(|op| {
            let words = line(op);
            let words = words.split(' ').map(|word| {
                let number = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
                let id = word.strip_prefix(['s', 't']).is_some_and(number);
                if id || number(word) { "_" } else { word }
            });
            words.collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// Every form of an op line on data, download and upload tasks.
const HTTP_GRAMMAR: &[&str] = &[
    "session _ plain",
    "session _ delegated",
    "session _ shared",
    "task _ data in _",
    "task _ download in _",
    "task _ upload in _",
    "resume _",
    "suspend _",
    "cancel _",
    "drop _",
    "finish tasks and invalidate _",
    "invalidate and cancel _",
    "drop session _",
    "server _ head allow",
    "server _ head cancel",
    "server _ head become-download",
    "server _ sends _",
    "server _ ends",
    "server _ ends and closes",
    "server _ resets",
    "server _ sends garbage",
    "time _ passes request timeout",
    "time _ passes resource timeout",
    "time _ passes idle timeout",
];

/// Every form of an op line that only streams and websockets have.
const STREAM_AND_WEBSOCKET_GRAMMAR: &[&str] = &[
    "task _ stream in _",
    "task _ websocket in _",
    "server _ head become-stream",
    "read _",
    "write _",
    "close read _",
    "close write _",
    "receive _",
    "close _ going away",
    "server _ upgrades",
    "server _ refuses upgrade",
    "server _ closes websocket",
    "server _ closes websocket without a code",
    "server _ closes websocket with an invalid code",
    "time _ passes close timeout",
];

/// The ```text block of the module docs of `src/ops.rs`.
fn docs_example() -> String {
    let docs: Vec<&str> = include_str!("../src/ops.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    let docs = docs.join("\n");
    let (_, block) = docs.split_once("```text\n").expect("a text block");
    let (block, _) = block.split_once("```").expect("a closed text block");
    block.to_string()
}

#[test]
fn every_op_file_uses_every_http_op_and_value_and_is_canonical() {
    let repro = parse(EVERY_OP).expect("every-op.ops parses");

    let grammar: BTreeSet<String> = HTTP_GRAMMAR.iter().map(|form| form.to_string()).collect();
    assert_eq!(forms(&repro.ops), grammar);
    assert!(
        allowed(&repro.ops).iter().all(|ran| *ran),
        "an op is skipped"
    );
    assert_eq!(print(&repro), EVERY_OP);
}

#[test]
fn the_module_docs_show_every_op_and_value_in_an_allowed_canonical_sequence() {
    let example = docs_example();
    let repro = parse(&example).expect("the docs' example parses");

    let grammar: BTreeSet<String> = HTTP_GRAMMAR
        .iter()
        .chain(STREAM_AND_WEBSOCKET_GRAMMAR)
        .map(|form| form.to_string())
        .collect();
    assert_eq!(forms(&repro.ops), grammar);
    assert!(
        allowed(&repro.ops).iter().all(|ran| *ran),
        "an op is skipped"
    );
    assert_eq!(print(&repro), example);
}

#[test]
fn the_module_docs_extend_the_every_op_file() {
    let file = parse(EVERY_OP).expect("every-op.ops parses");
    let docs = parse(&docs_example()).expect("the docs' example parses");

    // The same notes, and the file's ops in the same order, with the stream and websocket
    // ops among them.
    assert_eq!((docs.expect, &docs.notes), (file.expect, &file.notes));
    let mut rest = docs.ops.iter();
    for op in &file.ops {
        assert!(
            rest.any(|o| o == op),
            "{} is not in the docs, in order",
            line(op)
        );
    }
}

#[test]
fn the_docs_example_does_what_its_comment_says() {
    // `read t9` takes the window, then the rest, then sees the end; the websocket's close
    // times out; the peer's close completes the others, the invalid one with an error.
    let repro = parse(&docs_example()).expect("parses");
    let mut model = Model::new();
    let mut returned = Vec::new();
    let mut heard = Vec::new();
    for op in &repro.ops {
        let step = model.apply(op);
        if matches!(op, Op::Read(TaskId(9))) {
            returned.push(step.returned);
        }
        heard.extend(step.callbacks);
    }
    assert_eq!(
        returned,
        [
            Some(Returned::Read(48 * 1024)),
            Some(Returned::Read(16 * 1024)),
            Some(Returned::Eof)
        ]
    );
    for (task, outcome) in [
        (9, Outcome::Success),
        (10, Outcome::Success),
        (11, Outcome::TimedOut(Timer::Close)),
        (12, Outcome::NoUpgrade),
        (13, Outcome::Success),
        (14, Outcome::Malformed),
        (15, Outcome::Success),
    ] {
        let task = TaskId(task);
        assert!(
            heard.contains(&Callback::Complete { task, outcome }),
            "{task}: {heard:?}"
        );
    }
    assert!(heard.contains(&Callback::BecomeStream { task: TaskId(10) }));
    assert!(heard.contains(&Callback::Close { task: TaskId(13) }));
    // An invalid close code is no close: no did_close; a close without a code is one.
    assert!(!heard.contains(&Callback::Close { task: TaskId(14) }));
    assert!(heard.contains(&Callback::Close { task: TaskId(15) }));
}

#[test]
fn the_stream_and_websocket_lines_read_as_urlsession_does() {
    let (s, t) = (SessionId(0), TaskId(1));
    let lines = [
        (
            Op::CreateTask {
                session: s,
                task: t,
                kind: TaskKind::Stream,
            },
            "task t1 stream in s0",
        ),
        (
            Op::CreateTask {
                session: s,
                task: t,
                kind: TaskKind::WebSocket,
            },
            "task t1 websocket in s0",
        ),
        (
            Op::ServerHeaders {
                task: t,
                answer: Disposition::BecomeStream,
            },
            "server t1 head become-stream",
        ),
        (Op::Read(t), "read t1"),
        (Op::Write(t), "write t1"),
        (Op::CloseRead(t), "close read t1"),
        (Op::CloseWrite(t), "close write t1"),
        (Op::Receive(t), "receive t1"),
        (Op::CloseWith(t), "close t1 going away"),
        (
            Op::ServerAnswersUpgrade {
                task: t,
                accept: true,
            },
            "server t1 upgrades",
        ),
        (
            Op::ServerAnswersUpgrade {
                task: t,
                accept: false,
            },
            "server t1 refuses upgrade",
        ),
        (
            Op::PeerCloses {
                task: t,
                frame: CloseFrame::Code,
            },
            "server t1 closes websocket",
        ),
        (
            Op::PeerCloses {
                task: t,
                frame: CloseFrame::NoCode,
            },
            "server t1 closes websocket without a code",
        ),
        (
            Op::PeerCloses {
                task: t,
                frame: CloseFrame::InvalidCode,
            },
            "server t1 closes websocket with an invalid code",
        ),
        (
            Op::TimePasses {
                task: t,
                timer: Timer::Close,
            },
            "time t1 passes close timeout",
        ),
    ];
    for (op, text) in lines {
        assert_eq!(line(&op), text);
        let parsed = parse(text).expect(text);
        assert_eq!(parsed.ops, [op]);
    }
}

#[test]
fn a_file_without_an_expect_line_expects_a_pass() {
    let repro = parse("\n  resume t0  \n# a note\n\n").expect("parses");

    assert_eq!(repro.expect, Expect::Pass);
    assert_eq!(repro.notes, ["a note"]);
    assert_eq!(repro.ops, [Op::Resume(TaskId(0))]);
}

#[test]
fn malformed_lines_are_named_with_their_number_and_grammar() {
    let server = "server TASK head allow|cancel|become-download|become-stream|sends N|ends|ends and closes|resets|sends garbage|upgrades|refuses upgrade|closes websocket [without a code|with an invalid code]";
    let time = "time TASK passes request|resource|close timeout|time SESSION passes idle timeout";
    let close = "close read TASK|close write TASK|close TASK going away";
    let cases = [
        ("server t0 send 10", server),
        ("server t0 head", server),
        ("server t0 head become-websocket", server),
        ("server t0 sends 4294967296", server),
        ("server t0 sends +1", server),
        ("server t0 upgrade", server),
        ("server t0 refuses", server),
        ("server t0 closes", server),
        ("server s0 closes websocket", server),
        (
            "session s0 delegate",
            "session SESSION plain|delegated|shared",
        ),
        (
            "task t0 data s0",
            "task TASK data|download|upload|stream|websocket in SESSION",
        ),
        (
            "task t0 web-socket in s0",
            "task TASK data|download|upload|stream|websocket in SESSION",
        ),
        ("resume s0", "resume TASK"),
        ("resume t", "resume TASK"),
        ("drop s0", "drop TASK|drop session SESSION"),
        ("finish s0", "finish tasks and invalidate SESSION"),
        ("read s0", "read TASK"),
        ("read t0 4096", "read TASK"),
        ("write", "write TASK"),
        ("receive t0 t1", "receive TASK"),
        ("close t0", close),
        ("close t0 going", close),
        ("close read", close),
        ("close both t0", close),
        ("time t0 passes idle timeout", time),
        ("time s0 passes request timeout", time),
        ("time t0 passes closing timeout", time),
        (
            "# expect: maybe",
            "# expect: pass|fail|fail RULE, with RULE one of R1 to R12",
        ),
        (
            "# expect: fail R13",
            "# expect: pass|fail|fail RULE, with RULE one of R1 to R12",
        ),
        (
            "fly t0",
            "# a comment, or an op: session, task, await, par, resume, suspend, cancel, drop, read, write, close, receive, finish, invalidate, server, time, delegate",
        ),
    ];
    for (bad, expected) in cases {
        let text = format!("session s0 delegated\n\n{bad}\nresume t0\n");

        let error = parse(&text).expect_err(bad);

        assert_eq!(
            error.to_string(),
            format!("line 3: {bad:?}: expected \"{expected}\"")
        );
    }
}

#[test]
fn a_second_expect_line_is_an_error() {
    let error = parse("# expect: pass\n# expect: fail R5\n").expect_err("two expect lines");

    assert_eq!(
        error.to_string(),
        "line 2: \"# expect: fail R5\": expected \"a single # expect: line\""
    );
}

#[test]
fn a_shrunk_sequence_reads_from_s0_and_t0() {
    let shrunk = parse(
        "session s2 delegated\ntask t5 data in s2\ntask t7 upload in s2\nresume t7\nresume t5\n",
    )
    .expect("parses");

    let renumbered = renumber(&shrunk.ops);

    let text: Vec<String> = renumbered.iter().map(line).collect();
    assert_eq!(
        text,
        [
            "session s0 delegated",
            "task t0 data in s0",
            "task t1 upload in s0",
            "resume t1",
            "resume t0",
        ]
    );
}

#[test]
fn a_failure_report_prints_its_repro_and_its_test() {
    let shrunk = parse(
        "session s2 delegated\ntask t5 data in s2\nresume t9\nresume t5\nserver t5 head allow\nserver t5 ends and closes\n",
    )
    .expect("parses");
    let report = Report {
        target: "engine",
        cases: 1,
        runs: 3,
        seed: 7,
        ops: 9,
        elapsed: Duration::from_millis(3),
        traces: None,
        failure: Some(Failure {
            message: "R5 broken: s2 ledger: idle connections 1, the model says 0\n  first \
                      divergence at step 5 (ServerEnds { task: TaskId(5), reusable: false })"
                .into(),
            ops: shrunk.ops,
        }),
    };

    let shown = report.to_string();
    // A failing run counts the sequences it ran, shrinking included, not those it would have.
    assert!(
        shown.contains("cases   3 run of 1, shrinking included (seed 7)"),
        "{shown}"
    );
    assert!(shown.contains("(1000 cases/s"), "{shown}");

    // `resume t9` never ran (there is no t9), so the repro leaves it out and step 5 is the end.
    let repro = "# expect: pass\n\
                 # R5 broken at step 5: server t0 ends and closes\n\
                 \n\
                 session s0 delegated\n\
                 task t0 data in s0\n\
                 resume t0\n\
                 server t0 head allow\n\
                 server t0 ends and closes\n";
    let test = test_snippet("repro_r5", &parse(repro).expect("parses"));
    assert!(shown.contains(repro), "{shown}");
    assert!(shown.contains(&test), "{shown}");
    assert!(test.starts_with("// R5 broken at step 5"), "{test}");
}

// The snippet below was written by `test_snippet("download_cancelled_mid_body", ...)` from
// this repro and pasted as it came; the next test keeps the two in step.
const PASTED: &str = "\
# expect: pass
# a download cancelled mid-body closes its connection and removes its file
session s0 delegated
task t0 download in s0
resume t0
server t0 head allow
server t0 sends 4096
cancel t0
";

#[test]
fn the_pasted_test_is_what_test_snippet_writes() {
    let repro = parse(PASTED).expect("parses");

    let snippet = test_snippet("download_cancelled_mid_body", &repro);

    assert!(
        include_str!("ops_format.rs").contains(&snippet),
        "{snippet}"
    );
}

// a download cancelled mid-body closes its connection and removes its file
#[test]
fn download_cancelled_mid_body() {
    use leakproof_check::engine_sut::EngineWorld;
    use leakproof_check::machine::run_sequence;
    use leakproof_model::*;

    let ops: &[Op] = &[
        Op::CreateSession {
            session: SessionId(0),
            kind: SessionKind::Delegated,
            per_host: None,
        },
        Op::CreateTask {
            session: SessionId(0),
            task: TaskId(0),
            kind: TaskKind::Download,
        },
        Op::Resume(TaskId(0)),
        Op::ServerHeaders {
            task: TaskId(0),
            answer: Disposition::Allow,
        },
        Op::ServerSends {
            task: TaskId(0),
            bytes: 4096,
        },
        Op::Cancel(TaskId(0)),
    ];
    if let Err(divergence) = run_sequence::<EngineWorld>(ops) {
        panic!("{divergence}");
    }
}

// The same for a websocket's close that the peer never answers: written by
// `test_snippet("websocket_close_times_out", ...)` from this repro and pasted as it came.
const PASTED_WEBSOCKET: &str = "\
# expect: pass
# a websocket closed by us completes at the close timeout when the peer never answers (R11)
session s0 delegated
task t0 websocket in s0
resume t0
server t0 upgrades
close t0 going away
time t0 passes close timeout
";

#[test]
fn the_pasted_websocket_test_is_what_test_snippet_writes() {
    let repro = parse(PASTED_WEBSOCKET).expect("parses");

    let snippet = test_snippet("websocket_close_times_out", &repro);

    assert!(
        include_str!("ops_format.rs").contains(&snippet),
        "{snippet}"
    );
}

// a websocket closed by us completes at the close timeout when the peer never answers (R11)
#[test]
fn websocket_close_times_out() {
    use leakproof_check::engine_sut::EngineWorld;
    use leakproof_check::machine::run_sequence;
    use leakproof_model::*;

    let ops: &[Op] = &[
        Op::CreateSession {
            session: SessionId(0),
            kind: SessionKind::Delegated,
            per_host: None,
        },
        Op::CreateTask {
            session: SessionId(0),
            task: TaskId(0),
            kind: TaskKind::WebSocket,
        },
        Op::Resume(TaskId(0)),
        Op::ServerAnswersUpgrade {
            task: TaskId(0),
            accept: true,
        },
        Op::CloseWith(TaskId(0)),
        Op::TimePasses {
            task: TaskId(0),
            timer: Timer::Close,
        },
    ];
    if let Err(divergence) = run_sequence::<EngineWorld>(ops) {
        panic!("{divergence}");
    }
}
