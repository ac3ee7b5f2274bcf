//! Seed 004's shape, witnessed by the heap: on a session that lives on (one that ignores
//! invalidation, as `Session::shared()` does), tasks that have completed leave nothing behind,
//! so N more of them leave the heap where it was. The session, its stage and a simulated
//! network run on one current-thread runtime with a paused clock, and the heap witness
//! (`leakproof_check::heap`) counts what that thread allocated and has not freed.

use std::time::Duration;

use leakproof::{Configuration, Session, UrlCache};
use leakproof_check::heap::{self, WorldAllocator};
use leakproof_check::simnet::SimNet;
use leakproof_check::stage::Stage;

#[global_allocator]
static HEAP: WorldAllocator = WorldAllocator;

/// Tasks run before the heap is first read: the pool's connection, hyper's buffers, the
/// cache's entry, the engine's tables at their working size.
const WARM: usize = 50;
/// Tasks run between the two readings.
const MORE: usize = 500;
/// What MORE tasks may leave live in all: not one byte a task (a task's record, its result
/// kept, its name in a map would be tens of bytes each, thousands in all).
const FLAT: isize = 256;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

#[test]
fn completed_tasks_leave_a_session_that_lives_on_flat() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (before, after) = heap::inside(|| {
        runtime.block_on(async {
            let net = SimNet::new();
            let stage = Stage::builder().network(&net).start().await.unwrap();
            let downloads = tempfile::tempdir().unwrap();
            let config = Configuration::builder()
                .transport(net.clone())
                .download_dir(downloads.path())
                .url_cache(Some(UrlCache::memory(64 * 1024)))
                .build()
                .unwrap();
            let session = Session::builder()
                .configuration(config)
                .ignore_invalidation()
                .build();
            // A data task, a download (its file dropped, so removed), and a cached response
            // fetched again: the three ways a task leaves something in a session.
            let round = || async {
                let data = session.data(get(stage.url("/bytes/100"))).await.unwrap();
                assert_eq!(data.body().len(), 100);
                let file = session
                    .download(get(stage.url("/bytes/300")))
                    .await
                    .unwrap();
                drop(file);
                let cached = session.data(get(stage.url("/bytes/200?max_age=600"))).await;
                assert_eq!(cached.unwrap().body().len(), 200);
                // Idle connections are not due to close: nothing below a second passes.
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            for _ in 0..WARM {
                round().await;
            }
            let before = heap::live().expect("the heap witness is the global allocator");
            for _ in 0..MORE {
                round().await;
            }
            let after = heap::live().unwrap();
            assert!(
                leakproof_check::witness::files_in(downloads.path())
                    .unwrap()
                    .is_empty()
            );
            drop(session);
            (before, after)
        })
    });
    let grown = after - before;
    println!(
        "{} more rounds (3 tasks each) on a session that lives on: the heap grew {grown} bytes \
         ({:.2} a task)",
        MORE,
        grown as f64 / (3 * MORE) as f64
    );
    assert!(grown <= FLAT, "grew {grown} bytes over {MORE} rounds");
}
