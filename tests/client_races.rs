//! User ops racing each other on two threads, against the real client: whatever the order the
//! threads run in, every rule holds. Each case repeats, since a race shows in some runs only;
//! every wait is bounded.

use std::sync::{Arc, Mutex};

use leakproof::{Configuration, Delegate, Error, Session, TaskId, TaskInfo};
use leakproof_check::scenario::bounded;

/// Runs of each race: the one below lost a did_complete in about one run in six.
const RUNS: usize = 300;

#[derive(Default)]
struct Heard {
    completed: Mutex<Vec<TaskId>>,
    invalid: Mutex<u32>,
}

impl Delegate for Heard {
    fn did_complete(&self, task: &TaskInfo, _: Result<(), Error>) {
        self.completed.lock().unwrap().push(task.id);
    }

    fn did_become_invalid(&self) {
        *self.invalid.lock().unwrap() += 1;
    }
}

/// R1: tasks created on one thread while another calls `invalidate_and_cancel`. Each one the
/// session made (not refused, R8) is cancelled, and its delegate hears its `did_complete`
/// exactly once, before `did_become_invalid` (R2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_task_vs_invalidate_and_cancel() {
    for run in 0..RUNS {
        let heard = Arc::new(Heard::default());
        let session = Session::new(Configuration::default(), Some(heard.clone()));
        let other = session.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::yield_now();
            other.invalidate_and_cancel();
        });
        let mut created = Vec::new();
        // Until the invalidation refuses the next one (R8).
        while let Ok(task) =
            session.data_task(http::Request::get("http://127.0.0.1:9/").body(()).unwrap())
        {
            created.push(task.id());
        }
        canceller.join().unwrap();
        bounded("invalidated", session.invalidated()).await;
        let mut completed = heard.completed.lock().unwrap().clone();
        completed.sort();
        let unheard: Vec<_> = created.iter().filter(|t| !completed.contains(t)).collect();
        assert!(
            unheard.is_empty() && completed.len() == created.len(),
            "run {run}: R1: one did_complete per task the session made; of {} made, {} heard, \
             none for {unheard:?}",
            created.len(),
            completed.len()
        );
        assert_eq!(*heard.invalid.lock().unwrap(), 1, "run {run}: R2");
    }
}
