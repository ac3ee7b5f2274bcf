//! Each promise checked at the moment it is made, with no grace period (DESIGN.md, "The moment
//! of a promise"): once `invalidated()` resolves, and while `did_complete` runs, the kernel
//! lists no client socket of the session's (`witness::client_sockets_of`) and the download
//! directory is empty. Races between the promise and the release show in some runs only, so
//! each test repeats its case; every wait is bounded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use leakproof::{Configuration, Delegate, Disposition, Error, Session, TaskInfo};
use leakproof_check::scenario::{PATIENCE, bounded};
use leakproof_check::stage::{Peers, Stage};
use leakproof_check::witness::{client_sockets_of, files_in};
use tls_ca::TestCa;

#[path = "support/tls_ca.rs"]
mod tls_ca;

/// Runs of each case: the races this catches showed in 10-20 % of runs.
const RUNS: usize = 40;

fn get(url: String) -> http::Request<()> {
    http::Request::get(url).body(()).unwrap()
}

/// What the witnesses show: client sockets open to the stage, files left in the directory.
fn witnessed(stage: &Stage, dir: &std::path::Path) -> (usize, Vec<PathBuf>) {
    (
        client_sockets_of(&stage.peers()).unwrap(),
        files_in(dir).unwrap(),
    )
}

/// One download read whole, one stalled mid-body, and a data task stalled mid-body (at
/// `url(path)` on the stage); then the session ends, in half the runs mid-exchange, in half
/// while the connects are in flight, by `invalidate_and_cancel` or by cancelling the stalled
/// ones and `finish_tasks_and_invalidate`. Returns once `invalidated()` resolves.
async fn three_tasks_until_invalidated(
    run: usize,
    session: &Session,
    stage: &Stage,
    url: impl Fn(&str) -> String,
) {
    let whole = session.download_task(get(url("/bytes/200000"))).unwrap();
    let stalled = session
        .download_task(get(url("/bytes/1000000?stall_after=4096")))
        .unwrap();
    let data = session
        .data_task(get(url("/bytes/1000000?stall_after=4096")))
        .unwrap();
    whole.resume();
    stalled.resume();
    data.resume();
    if run % 4 < 2 {
        let reached = stage.wait_until(|s| s.requests() >= 3, PATIENCE).await;
        assert!(reached, "run {run}: the three requests arrived");
    }
    if run % 2 == 0 {
        session.invalidate_and_cancel();
    } else {
        stalled.cancel();
        data.cancel();
        session.finish_tasks_and_invalidate();
    }
    bounded("invalidated", session.invalidated()).await;
}

/// D2: `invalidated()` resolves once the session holds nothing: every socket closed, every
/// temp file removed (R4), not merely once the driver took its last action off the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_resolves_once_every_socket_and_file_is_gone() {
    for run in 0..RUNS {
        let stage = Stage::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = Configuration::builder()
            .download_dir(dir.path())
            .build()
            .unwrap();
        let session = Session::new(config, None);
        three_tasks_until_invalidated(run, &session, &stage, |path| stage.url(path)).await;
        let (sockets, files) = witnessed(&stage, dir.path());
        assert_eq!(
            (sockets, files),
            (0, vec![]),
            "run {run}: R4 at the moment invalidated() resolved (client sockets, files)"
        );
    }
}

/// D2 over TLS: the same moment for https connections, whose TLS lives inside the socket the
/// driver closes; and the session's TLS state is gone by then too (leak 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_resolves_once_every_tls_socket_and_the_tls_state_are_gone() {
    let ca = TestCa::new("leakproof test CA");
    for run in 0..RUNS {
        let stage = ca.stage().await;
        let dir = tempfile::tempdir().unwrap();
        let config = Configuration::builder()
            .download_dir(dir.path())
            .add_root_certificate(ca.root())
            .build()
            .unwrap();
        let session = Session::new(config, None);
        let tls = session.tls_config().unwrap();
        three_tasks_until_invalidated(run, &session, &stage, |path| stage.https_url(path)).await;
        let (sockets, files) = witnessed(&stage, dir.path());
        assert_eq!(
            (sockets, files, tls.upgrade().is_none()),
            (0, vec![], true),
            "run {run}: R4 at the moment invalidated() resolved (client sockets, files, \
             the TLS state dropped)"
        );
    }
}

/// A task's id and result, with the client sockets open to the stage and the files in the
/// download directory while its `did_complete` ran.
type Seen = (u64, Result<(), Error>, usize, Vec<PathBuf>);

/// What the delegate saw while `did_complete` ran.
#[derive(Debug)]
struct AtCompletion {
    peers: Peers,
    dir: PathBuf,
    seen: Mutex<Vec<Seen>>,
}

impl Delegate for AtCompletion {
    fn did_receive_response(&self, _: &TaskInfo, _: &http::Response<()>) -> Disposition {
        Disposition::Allow
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let sockets = client_sockets_of(&self.peers).unwrap();
        let files = files_in(&self.dir).unwrap();
        let entry = (task.id.0, result, sockets, files);
        self.seen.lock().unwrap().push(entry);
    }
}

/// D2, per task: a cancelled task's `did_complete` comes once its socket is closed and its temp
/// file removed (R5), as the delegate sees them while the callback runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_complete_comes_once_the_tasks_socket_and_file_are_gone() {
    for run in 0..RUNS {
        let stage = Stage::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = Configuration::builder()
            .download_dir(dir.path())
            .build()
            .unwrap();
        let delegate = Arc::new(AtCompletion {
            peers: stage.peers(),
            dir: dir.path().to_owned(),
            seen: Mutex::default(),
        });
        let weak: Weak<AtCompletion> = Arc::downgrade(&delegate);
        let session = Session::new(config, Some(delegate.clone()));
        let task = if run % 2 == 0 {
            let task = session
                .download_task(get(stage.url("/bytes/1000000?stall_after=4096")))
                .unwrap();
            task.resume();
            Err(task)
        } else {
            let task = session
                .data_task(get(stage.url("/bytes/1000000?stall_after=4096")))
                .unwrap();
            task.resume();
            Ok(task)
        };
        let midway = stage
            .wait_until(|s| s.body_bytes_written() >= 4096, PATIENCE)
            .await;
        assert!(midway, "run {run}: the body began");
        // Let the client read what was sent (and a download create its file).
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        match &task {
            Ok(data) => data.cancel(),
            Err(download) => download.cancel(),
        }
        session.finish_tasks_and_invalidate();
        bounded("invalidated", session.invalidated()).await;
        let seen = std::mem::take(&mut *delegate.seen.lock().unwrap());
        assert_eq!(seen.len(), 1, "run {run}: one did_complete: {seen:?}");
        let (_, result, sockets, files) = &seen[0];
        assert!(
            matches!(result, Err(Error::Cancelled)),
            "run {run}: {result:?}"
        );
        assert_eq!(
            (*sockets, files.clone()),
            (0, vec![]),
            "run {run}: R5 while did_complete ran (client sockets, files)"
        );
        drop(delegate);
        assert!(weak.upgrade().is_none(), "run {run}: R3");
    }
}

/// R4's "no background future of the session left alive", at the moment `invalidated()`
/// resolves: the session runs on a runtime of its own, where nothing else runs, and that
/// runtime's count of live tasks (tokio's metrics, not the session's word) is then zero. The
/// test awaits on its own runtime, with the stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_resolves_once_no_task_of_the_session_is_alive() {
    let sessions = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for run in 0..RUNS {
        let stage = Stage::start().await.unwrap();
        let session = {
            let _on = sessions.enter();
            Session::new(Configuration::default(), None)
        };
        let tasks = [
            session
                .download_task(get(stage.url("/bytes/200000")))
                .unwrap(),
            session
                .download_task(get(stage.url("/bytes/1000000?stall_after=4096")))
                .unwrap(),
        ];
        let data = session
            .data_task(get(stage.url("/bytes/1000000?stall_after=4096")))
            .unwrap();
        tasks.iter().for_each(|t| t.resume());
        data.resume();
        if run % 2 == 0 {
            let began = stage.wait_until(|s| s.requests() >= 3, PATIENCE).await;
            assert!(began, "run {run}: the requests arrived");
        }
        session.invalidate_and_cancel();
        bounded("invalidated", session.invalidated()).await;
        // The session's futures are dropped now. tokio counts a task alive until it has woken
        // its waiters and then released it: that last step of its own may trail by a moment.
        let counted = tokio::time::timeout(Duration::from_millis(200), async {
            while sessions.metrics().num_alive_tasks() > 0 {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        })
        .await;
        let alive = sessions.metrics().num_alive_tasks();
        assert!(
            counted.is_ok(),
            "run {run}: {alive} tasks of the session still alive"
        );
    }
    sessions.shutdown_background();
}
