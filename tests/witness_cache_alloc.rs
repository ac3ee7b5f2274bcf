//! The seeds' leak 4, the cache half, the figure: a session's response cache goes with it.
//! Each cycle makes a session with a 4 MiB memory cache, fills it with 16 fresh responses of
//! 64 KiB from the stage, measures the heap (a counting allocator, so this binary holds one
//! test), then invalidates the session. While the session lives the heap holds at least what
//! its ledger says is cached; once `invalidated()` resolves the heap is back within 64 KiB of
//! the warmed-up baseline, cycle after cycle (URLSession keeps a session's URLCache memory for
//! minutes after invalidation). `LEAKPROOF_CACHE_CYCLES` sets the measured cycles (50 by
//! default).

use std::time::Duration;

use leakproof::{Configuration, Session, UrlCache};
use leakproof_check::scenario::patiently;
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const DEFAULT_CYCLES: usize = 50;
const WARM_UP: usize = 5;
const SLACK: usize = 64 * 1024;
const ENTRIES: usize = 16;
const ENTRY: usize = 64 * 1024;

/// One cycle: the heap above `baseline` while the cache is full, and what the ledger said.
async fn cycle(stage: &Stage, baseline: usize) -> (isize, u64) {
    let cache = UrlCache::memory(4 << 20).max_entry(ENTRY + 4096);
    let config = Configuration::builder()
        .url_cache(Some(cache))
        .build()
        .expect("a valid configuration");
    let session = Session::new(config, None);
    let store = session.cache_store().expect("a live session's cache");
    for n in 0..ENTRIES {
        let url = stage.url(&format!("/bytes/{ENTRY}?max_age=600&etag=e{n}"));
        let request = http::Request::get(url).body(()).unwrap();
        let response = session.data(request).await.expect("the request succeeds");
        assert_eq!(response.body().len(), ENTRY);
    }
    let cached = session.resources().cached_bytes;
    assert!(cached >= (ENTRIES * ENTRY) as u64, "{cached} bytes cached");
    let held = ALLOC.live_bytes() as isize - baseline as isize;
    session.finish_tasks_and_invalidate();
    assert!(
        patiently(session.invalidated()).await.is_some(),
        "not invalidated"
    );
    assert!(session.resources().is_zero(), "{:?}", session.resources());
    assert!(
        store.upgrade().is_none(),
        "the cache outlived invalidated()"
    );
    (held, cached)
}

/// The heap once the stage has seen every socket closed.
async fn settled(stage: &Stage) -> usize {
    assert!(
        stage
            .wait_until(|s| s.open() == 0, Duration::from_secs(10))
            .await,
        "R4: the stage saw {} of {} sockets closed",
        stage.closed(),
        stage.accepted()
    );
    ALLOC.live_bytes()
}

#[test]
fn a_session_s_cache_leaves_the_heap_at_invalidation() {
    let cycles = std::env::var("LEAKPROOF_CACHE_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CYCLES);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stage = Stage::start().await.unwrap();
        for _ in 0..WARM_UP {
            cycle(&stage, 0).await;
        }
        let baseline = settled(&stage).await;
        let (mut least_held, mut cached) = (isize::MAX, 0);
        for _ in 0..cycles {
            let (held, in_ledger) = cycle(&stage, baseline).await;
            least_held = least_held.min(held);
            cached = in_ledger;
        }
        let after = settled(&stage).await;
        let growth = after as isize - baseline as isize;
        println!(
            "cache witness: {cycles} sessions, each caching {ENTRIES} x {ENTRY} B ({cached} B by \
             its ledger); the heap held at least {least_held} B above the baseline while a \
             session lived, and {growth} B after the last invalidated() ({:.1} B per cycle, \
             allowed {SLACK} B in all)",
            growth as f64 / cycles as f64
        );
        assert!(
            least_held >= cached as isize,
            "the heap ({least_held} B) did not show the cache ({cached} B)"
        );
        assert!(
            after.abs_diff(baseline) <= SLACK,
            "the heap grew from {baseline} to {after} bytes over {cycles} sessions with a cache"
        );
    });
}
