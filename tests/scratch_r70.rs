#[global_allocator]
static HEAP: leakproof_check::heap::WorldAllocator = leakproof_check::heap::WorldAllocator;
use leakproof_check::client_sut::SimulatedWorld;
use leakproof_check::machine::run_sequence;
use leakproof_model::*;

#[test]
fn scratch() {
    let ops: Vec<Op> = vec![
        Op::CreateSession {
            session: SessionId(1),
            kind: SessionKind::Delegated,
            per_host: Some(2),
        },
        Op::CreateTask {
            session: SessionId(1),
            task: TaskId(0),
            kind: TaskKind::Data,
        },
        Op::DelegateBlocks(SessionId(1)),
        Op::DelegateReturns(SessionId(1)),
        Op::DelegateBlocks(SessionId(1)),
        Op::CreateTask {
            session: SessionId(1),
            task: TaskId(1),
            kind: TaskKind::Download,
        },
        Op::Resume(TaskId(1)),
        Op::Resume(TaskId(0)),
        Op::CreateTask {
            session: SessionId(1),
            task: TaskId(3),
            kind: TaskKind::Data,
        },
        Op::ServerHeaders {
            task: TaskId(0),
            answer: Disposition::BecomeStream,
        },
        Op::Fetch {
            session: SessionId(1),
            task: TaskId(5),
            resource: ResourceId(0),
        },
        Op::ServerHeaders {
            task: TaskId(1),
            answer: Disposition::Cancel,
        },
        Op::Resume(TaskId(3)),
        Op::DelegateReturns(SessionId(1)),
    ];
    let failure = leakproof_check::run::Failure {
        message: "R12 broken: x\n  first divergence at step 14 (y)".into(),
        ops: ops.clone(),
    };
    let repro = leakproof_check::ops::Repro::from_failure(&failure);
    println!("{}", leakproof_check::ops::print(&repro));
    let _ = run_sequence::<SimulatedWorld>;
}
