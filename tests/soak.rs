//! Soak: 2,000 cycles of a session with a delegate, one request (and one download, whose file
//! is dropped), finish_tasks_and_invalidate, `invalidated()`. The heap (a counting allocator, so this binary holds one test) must come
//! back to where it was after the first cycle, every delegate must be gone, and the stage
//! must have seen every socket closed: one session per request must not grow memory (the
//! seed's leak 5).

use std::sync::Arc;
use std::time::Duration;

use leakproof::{Configuration, Delegate, Session};
use leakproof_check::scenario::patiently;
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const CYCLES: usize = 2_000;
const SLACK: usize = 64 * 1024;

struct Quiet;
impl Delegate for Quiet {}

/// One cycle; returns once everything of the session is released.
async fn cycle(stage: &Stage, downloads: &std::path::Path) {
    let delegate = Arc::new(Quiet);
    let weak = Arc::downgrade(&delegate);
    let config = Configuration::builder()
        .download_dir(downloads)
        .build()
        .expect("a valid configuration");
    let session = Session::new(config, Some(delegate));
    let request = http::Request::get(stage.url("/bytes/1024"))
        .body(())
        .unwrap();
    let response = session.data(request).await.expect("the request succeeds");
    assert_eq!(response.body().len(), 1024);
    drop(response);
    let request = http::Request::get(stage.url("/bytes/2048"))
        .body(())
        .unwrap();
    let file = session
        .download(request)
        .await
        .expect("the download succeeds");
    assert_eq!(std::fs::metadata(file.body().path()).unwrap().len(), 2048);
    drop(file);
    session.finish_tasks_and_invalidate();
    assert!(
        patiently(session.invalidated()).await.is_some(),
        "not invalidated"
    );
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    drop(session);
    assert!(
        weak.upgrade().is_none(),
        "R3: a delegate outlived its session"
    );
}

/// The heap once the stage has seen every socket closed and the delegate threads are gone.
async fn settled_heap(stage: &Stage, cycles: u64) -> usize {
    assert!(
        stage
            .wait_until(
                |s| s.accepted() == cycles && s.open() == 0,
                Duration::from_secs(10)
            )
            .await,
        "R4: the stage saw {} of {} sockets closed",
        stage.closed(),
        stage.accepted()
    );
    // Delegate threads exit right after did_become_invalid; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ALLOC.live_bytes()
}

#[test]
fn two_thousand_sessions_return_the_heap_to_its_baseline() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stage = Stage::start().await.unwrap();
        let downloads = tempfile::tempdir().unwrap();
        cycle(&stage, downloads.path()).await;
        let after_first = settled_heap(&stage, 1).await;
        for _ in 1..CYCLES {
            cycle(&stage, downloads.path()).await;
        }
        assert!(
            leakproof_check::witness::empty_dir(downloads.path()).unwrap(),
            "R5: download files left behind"
        );
        let after_last = settled_heap(&stage, CYCLES as u64).await;
        println!(
            "soak: {CYCLES} cycles; live heap after the first {after_first} B, after the last \
             {after_last} B (difference {} B, allowed {SLACK} B); {} sockets accepted, {} closed",
            after_last as isize - after_first as isize,
            stage.accepted(),
            stage.closed()
        );
        assert!(
            after_last.abs_diff(after_first) <= SLACK,
            "the heap grew from {after_first} to {after_last} bytes over {CYCLES} sessions"
        );
    });
}
