//! Leak 1's seed against the counting allocator: a stream offered 8 MB and cancelled before
//! any read holds at most its window on the heap (R6), and the server is blocked, not drained.
//! A binary of its own: the allocator counts every thread in the process.
//!
//! The heap a stream holds is measured as a difference between streams of one session made
//! the same way against the same held endpoint: two whose peer sends nothing, then one whose
//! peer offers 8 MB. What the third holds beyond a quiet one is what it read ahead, plus its
//! transport buffer. The stage's own allocations for each connection are the same for all
//! three, so they cancel out.

use std::time::{Duration, Instant};

use leakproof::{Configuration, Session, TaskState};
use leakproof_check::scenario::{PATIENCE, eventually};
use leakproof_check::stage::{RawScript, Stage};
use leakproof_check::witness::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const OFFER: u64 = 8_000_000;
/// The default stream window: every byte a stream holds for its user (R6).
const WINDOW: usize = 64 * 1024;
/// What two connected streams may differ by on the heap besides their buffers: tokio's and
/// the stream IO's own bookkeeping for a socket that is read, against one that is not.
const BOOKKEEPING: usize = 4 * 1024;

/// Waits until `value` has not changed for `quiet`.
async fn settled(value: impl Fn() -> u64, quiet: Duration) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut last = value();
    loop {
        tokio::time::sleep(quiet).await;
        let now = value();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// One test only: a second would allocate on its own thread while this one measures.
#[test]
fn a_stream_offered_8_mb_and_cancelled_unread_holds_at_most_its_window_on_the_heap() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Small socket buffers, so the server's count shows backpressure, not the kernel's
        // buffering (DESIGN.md's pitfall on loopback).
        let stage = Stage::builder()
            .send_buffer(4096)
            .recv_buffer(4096)
            .start()
            .await
            .unwrap();
        let held = stage.listen_raw(RawScript::hold("peer")).await.unwrap();
        let session = Session::new(Configuration::default(), None);
        assert_eq!(session.configuration().stream_window(), WINDOW);
        // A connected stream whose peer (held by the test) has sent nothing yet.
        let connect = async || {
            let stream = session.stream_task("127.0.0.1", held.port()).unwrap();
            stream.resume();
            let peer = stage.held_raw("peer", PATIENCE).await.expect("it connects");
            (stream, peer)
        };

        // Warm up what lives for the process, then measure one quiet stream's cost.
        let warm = connect().await;
        warm.0.cancel();
        drop(warm);
        let first = connect().await;
        let one = settled(|| ALLOC.live_bytes() as u64, Duration::from_millis(50)).await;
        let second = connect().await;
        let two = settled(|| ALLOC.live_bytes() as u64, Duration::from_millis(50)).await;
        let per_stream = two.saturating_sub(one);

        // The seed: a stream offered 8 MB, never read.
        ALLOC.reset_peak();
        let started = Instant::now();
        let (flooded, peer) = connect().await;
        // The peer writes until backpressure stops it; its step gives up when the stream is
        // cancelled.
        let offering = tokio::spawn(async move {
            let _ = peer.send(OFFER).await;
            peer
        });
        let read_ahead = (WINDOW - session.configuration().read_buffer()) as u64;
        eventually("the read-ahead fills", || {
            session.resources().buffered_bytes >= read_ahead
        })
        .await;
        let written = settled(|| stage.raw_bytes_written(), Duration::from_millis(100)).await;
        let three = settled(|| ALLOC.live_bytes() as u64, Duration::from_millis(50)).await;
        let held = three.saturating_sub(two).saturating_sub(per_stream);
        let peak = (ALLOC.peak_bytes() as u64).saturating_sub(two + per_stream);
        let ledger = session.resources();
        flooded.cancel();
        assert_eq!(flooded.state(), TaskState::Completed);
        assert!(
            stage.wait_until(|s| s.raw_closed() == 2, PATIENCE).await,
            "R5: the flooded socket closes at cancel"
        );
        let peer = offering.await.unwrap();
        drop((first, second, flooded, peer));
        session.finish_tasks_and_invalidate();
        tokio::time::timeout(PATIENCE, session.invalidated())
            .await
            .expect("R10: the session reaches Invalidated");
        let to_invalidated = started.elapsed();
        assert!(
            stage.wait_all_closed(PATIENCE).await,
            "R4: every socket closes"
        );

        println!(
            "seed stream (direct, 8 MB offered, cancelled unread): ledger peak {} B, heap held \
             {held} B (peak {peak} B, one quiet stream costs {per_stream} B), server wrote \
             {written} B of {OFFER}, {to_invalidated:.2?} from resume to Invalidated",
            ledger.peak_buffered_bytes
        );
        assert!(ledger.peak_buffered_bytes <= read_ahead, "R6: {ledger:?}");
        assert!(
            held <= (WINDOW + BOOKKEEPING) as u64,
            "R6: the stream holds {held} B on the heap, past its {WINDOW} B window"
        );
        assert!(
            peak <= (WINDOW + BOOKKEEPING) as u64,
            "R6: the heap peaked {peak} B above two quiet streams"
        );
        assert!(
            written < OFFER / 8,
            "R6: the server wrote {written} B: it was drained, not blocked"
        );
    });
}
