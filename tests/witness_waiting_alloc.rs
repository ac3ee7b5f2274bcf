//! Seed 004's shape on a session that lives on: tasks whose handles are gone and which time
//! out while they wait for their host's one connection slot must leave nothing behind, their
//! request and upload body included. The counting allocator counts every thread in the
//! process, so this binary holds a single test.

use std::time::Duration;

use bytes::Bytes;
use leakproof::{Configuration, Session, TaskState, UploadBody};
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Each task's upload body: a leaked one is plain to see.
const BODY: usize = 64 * 1024;
const TASKS: usize = 50;
/// What the session may keep of all of them: far less than one body.
const SLACK: usize = 16 * 1024;

#[test]
fn tasks_that_time_out_while_waiting_for_a_slot_leave_nothing_behind() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let stage = Stage::start().await.unwrap();
        let config = Configuration::builder()
            .max_connections_per_host(1)
            .request_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let session = Session::new(config, None);
        // The host's one slot, held by a suspended task (no timers, R7) whose server stalls.
        let holder = session
            .data_task(
                http::Request::get(stage.url("/bytes/10?stall_headers=1"))
                    .body(())
                    .unwrap(),
            )
            .unwrap();
        holder.resume();
        while session.resources().open_connections == 0 || stage.requests() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        holder.suspend();

        // Resumed, handle dropped (it runs on, R10), waits for the slot, and times out there.
        let wait_out = |n: usize| {
            let session = session.clone();
            let url = stage.url("/bytes/10");
            async move {
                for _ in 0..n {
                    let request = http::Request::post(url.as_str()).body(()).unwrap();
                    let body = UploadBody::Bytes(Bytes::from(vec![7u8; BODY]));
                    let task = session.upload_task(request, body).unwrap();
                    task.resume();
                    let id = task.id();
                    drop(task);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    assert_eq!(session.observer().task_state(id), TaskState::Completed);
                }
            }
        };
        wait_out(1).await; // warm up
        let baseline = ALLOC.live_bytes();
        wait_out(TASKS).await;
        let grown = ALLOC.live_bytes().saturating_sub(baseline);
        println!(
            "{TASKS} tasks timed out while waiting: the heap grew {grown} B ({} B per task)",
            grown / TASKS
        );
        assert!(
            grown <= SLACK,
            "R5: {grown} B left behind by {TASKS} completed tasks ({} B each)",
            grown / TASKS
        );
        holder.cancel();
        session.invalidate_and_cancel();
        session.invalidated().await;
    });
}
