//! A delegate that does not keep up, against the counting allocator: a data task offered
//! 64 MB while its delegate waits in `did_receive_data` holds at most one delegate window plus
//! one read buffer of undelivered body on the heap (R6), and the server is held back.
//! A binary of its own: the allocator counts every thread in the process.
//!
//! Measured as in `witness_stream_alloc.rs`: the heap of data tasks of one session made the
//! same way, two whose response head arrived and whose body is quiet, then one whose server
//! offers 64 MB to a delegate shut at its gate. What the third holds beyond a quiet one is the
//! body it read and has not handed over.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leakproof::{Configuration, Delegate, Error, Session, TaskInfo, TaskState};
use leakproof_check::scenario::{PATIENCE, bounded, eventually};
use leakproof_check::stage::Stage;
use leakproof_check::witness::CountingAllocator;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

const OFFER: u64 = 64_000_000;
const FLOOD: &str = "/bytes/64000000";
/// The default delegate window and read buffer.
const WINDOW: usize = 64 * 1024;
const READ_BUFFER: usize = 16 * 1024;
/// What two data tasks may differ by on the heap besides their bodies: the stage's and the
/// client's bookkeeping for an exchange that is flowing, against one that is quiet.
const BOOKKEEPING: usize = 4 * 1024;

/// Counts what it hears and allocates nothing per callback; `did_receive_data` of the flooded
/// task waits while the gate is shut (at most [`PATIENCE`]).
#[derive(Default)]
struct Lean {
    shut: Mutex<bool>,
    turn: Condvar,
    waiting: AtomicU32,
    responses: AtomicU32,
    completions: AtomicU32,
}

impl Lean {
    fn open(&self) {
        *self.shut.lock().unwrap() = false;
        self.turn.notify_all();
    }
}

impl Delegate for Lean {
    fn did_receive_response(&self, _: &TaskInfo, _: &http::Response<()>) -> leakproof::Disposition {
        self.responses.fetch_add(1, Ordering::SeqCst);
        leakproof::Disposition::Allow
    }

    fn did_receive_data(&self, task: &TaskInfo, _: &Bytes) {
        if task.uri.path() != FLOOD {
            return;
        }
        let deadline = Instant::now() + PATIENCE;
        let mut shut = self.shut.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *shut && Instant::now() < deadline {
            shut = self.turn.wait_timeout(shut, PATIENCE).unwrap().0;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn did_complete(&self, _: &TaskInfo, _: Result<(), Error>) {
        self.completions.fetch_add(1, Ordering::SeqCst);
    }
}

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
fn a_data_task_whose_delegate_is_behind_holds_at_most_its_window_on_the_heap() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stage = Stage::builder()
            .send_buffer(4096)
            .recv_buffer(4096)
            .start()
            .await
            .unwrap();
        let lean = Arc::new(Lean {
            shut: Mutex::new(true),
            ..Lean::default()
        });
        let session = Session::new(Configuration::default(), Some(lean.clone()));
        assert_eq!(session.configuration().read_buffer(), READ_BUFFER);
        let get = |path: &str| http::Request::get(stage.url(path)).body(()).unwrap();
        // A data task whose head arrived and whose chunked body is quiet.
        let quiet = async |key: &str| {
            let task = session.data_task(get(&format!("/hold/{key}"))).unwrap();
            let heads = lean.responses.load(Ordering::SeqCst);
            task.resume();
            let held = stage
                .held(key, PATIENCE)
                .await
                .expect("the request is held");
            held.head(200, true, None).await.unwrap();
            eventually("the delegate hears the head", || {
                lean.responses.load(Ordering::SeqCst) > heads
            })
            .await;
            (task, held)
        };

        // Warm up what lives for the process, then measure one quiet task's cost.
        let warm = session.data_task(get("/bytes/100000")).unwrap();
        warm.resume();
        eventually("the warm-up completes", || {
            lean.completions.load(Ordering::SeqCst) == 1
        })
        .await;
        let warm = (warm, quiet("warm").await);
        warm.0.cancel();
        drop(warm);
        let quiet_ms = Duration::from_millis(50);
        let first = quiet("first").await;
        let one = settled(|| ALLOC.live_bytes() as u64, quiet_ms).await;
        let second = quiet("second").await;
        let two = settled(|| ALLOC.live_bytes() as u64, quiet_ms).await;
        let per_task = two.saturating_sub(one);

        // 64 MB offered to a delegate shut at its gate.
        ALLOC.reset_peak();
        let flooded = session
            .data_task(get(&format!("{FLOOD}?chunked=1")))
            .unwrap();
        flooded.resume();
        eventually("the delegate waits at its gate", || {
            lean.waiting.load(Ordering::SeqCst) == 1
        })
        .await;
        settled(
            || session.resources().buffered_bytes,
            Duration::from_millis(100),
        )
        .await;
        let written = settled(|| stage.body_bytes_written(), Duration::from_millis(100)).await;
        let three = settled(|| ALLOC.live_bytes() as u64, quiet_ms).await;
        let held = three.saturating_sub(two).saturating_sub(per_task);
        let peak = (ALLOC.peak_bytes() as u64).saturating_sub(two + per_task);
        let ledger = session.resources();

        flooded.cancel();
        assert_eq!(flooded.state(), TaskState::Completed);
        lean.open();
        drop((first, second, flooded));
        session.finish_tasks_and_invalidate();
        bounded("R10: the session invalidates", session.invalidated()).await;
        assert!(
            stage.wait_all_closed(PATIENCE).await,
            "R4: every socket closes"
        );

        println!(
            "a delegate shut at its gate, {OFFER} B offered: ledger peak {} B, heap held \
             {held} B (peak {peak} B, one quiet task costs {per_task} B), server wrote \
             {written} B",
            ledger.peak_buffered_bytes
        );
        let bound = (WINDOW + READ_BUFFER + BOOKKEEPING) as u64;
        assert!(
            held <= bound,
            "R6: the task holds {held} B on the heap, past its {WINDOW} B window and one \
             {READ_BUFFER} B read buffer"
        );
        assert!(
            peak <= bound,
            "R6: the heap peaked {peak} B above two quiet tasks"
        );
        assert!(
            written < OFFER / 64,
            "R6: the server wrote {written} B: it was drained, not held back"
        );
    });
}
