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
use leakproof_check::strategies::{disposition, fault, session_kind, task_kind, timer};
use leakproof_model::rules::Rule;
use leakproof_model::{Callback, Model, Op, SessionId, Step, TaskId};

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
        (s.clone(), session_kind()).prop_map(|(session, kind)| Op::CreateSession { session, kind }),
        (s.clone(), t.clone(), task_kind()).prop_map(|(session, task, kind)| Op::CreateTask {
            session,
            task,
            kind
        }),
        s.clone().prop_map(Op::FinishTasksAndInvalidate),
        s.clone().prop_map(Op::InvalidateAndCancel),
        s.clone().prop_map(Op::DropSession),
        s.prop_map(Op::IdleTimeoutPasses),
        t.clone().prop_map(Op::Resume),
        t.clone().prop_map(Op::Suspend),
        t.clone().prop_map(Op::Cancel),
        t.clone().prop_map(Op::DropTask),
        (t.clone(), disposition()).prop_map(|(task, answer)| Op::ServerHeaders { task, answer }),
        (t.clone(), any::<u32>()).prop_map(|(task, bytes)| Op::ServerSends { task, bytes }),
        (t.clone(), any::<bool>()).prop_map(|(task, reusable)| Op::ServerEnds { task, reusable }),
        (t.clone(), fault()).prop_map(|(task, fault)| Op::ServerFails { task, fault }),
        (t, timer()).prop_map(|(task, timer)| Op::TimePasses { task, timer }),
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
        let outcome = |ops: &[Op]| run_sequence::<EngineWorld>(ops).map_err(|d| d.violation.rule);
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
            Callback::ReceiveData { task, bytes } => Callback::ReceiveData {
                task: t(task),
                bytes,
            },
            Callback::BecomeDownload { task } => Callback::BecomeDownload { task: t(task) },
            Callback::FinishDownloading { task } => Callback::FinishDownloading { task: t(task) },
            Callback::Complete { task, outcome } => Callback::Complete {
                task: t(task),
                outcome,
            },
            Callback::BecomeInvalid { session } => Callback::BecomeInvalid {
                session: renumbering.session(session),
            },
        })
        .collect();
    Step {
        refused: step.refused,
        callbacks,
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

#[test]
fn every_op_file_uses_every_op_and_value_and_is_canonical() {
    let repro = parse(EVERY_OP).expect("every-op.ops parses");

    // The line of each op with its ids and counts blanked: the grammar, one form each.
    let forms: BTreeSet<String> = repro
        .ops
        .iter()
        .map(|op| {
            let words = line(op);
            let words = words.split(' ').map(|word| {
                let number = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
                let id = word.strip_prefix(['s', 't']).is_some_and(number);
                if id || number(word) { "_" } else { word }
            });
            words.collect::<Vec<_>>().join(" ")
        })
        .collect();

    let grammar: BTreeSet<String> = [
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
    ]
    .map(String::from)
    .into();
    assert_eq!(forms, grammar);
    assert!(
        allowed(&repro.ops).iter().all(|ran| *ran),
        "an op is skipped"
    );
    assert_eq!(print(&repro), EVERY_OP);
}

#[test]
fn the_module_docs_show_the_every_op_file() {
    let docs: Vec<&str> = include_str!("../src/ops.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();

    assert!(docs.join("\n").contains(&format!("```text\n{EVERY_OP}```")));
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
    let server = "server TASK head allow|cancel|become-download|sends N|ends|ends and closes|resets|sends garbage";
    let time = "time TASK passes request|resource timeout|time SESSION passes idle timeout";
    let cases = [
        ("server t0 send 10", server),
        ("server t0 head", server),
        ("server t0 sends 4294967296", server),
        ("server t0 sends +1", server),
        (
            "session s0 delegate",
            "session SESSION plain|delegated|shared",
        ),
        (
            "task t0 data s0",
            "task TASK data|download|upload in SESSION",
        ),
        ("resume s0", "resume TASK"),
        ("resume t", "resume TASK"),
        ("drop s0", "drop TASK|drop session SESSION"),
        ("finish s0", "finish tasks and invalidate SESSION"),
        ("time t0 passes idle timeout", time),
        ("time s0 passes request timeout", time),
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
            "# a comment, or an op: session, task, resume, suspend, cancel, drop, finish, invalidate, server, time",
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
        seed: 7,
        ops: 9,
        elapsed: Duration::from_millis(3),
        failure: Some(Failure {
            message: "R5 broken: s2 ledger: idle connections 1, the model says 0\n  first \
                      divergence at step 5 (ServerEnds { task: TaskId(5), reusable: false })"
                .into(),
            ops: shrunk.ops,
        }),
    };

    let shown = report.to_string();

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
