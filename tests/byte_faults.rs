//! Faults at any byte, generated: the real client, on a current-thread runtime with a paused
//! clock, fetches bodies from the stage over the simulated network while resets, half-closes,
//! stalls and garbage strike its connections at byte counts drawn by proptest, through pipes as
//! small as one byte (backpressure everywhere). Whatever strikes where, the client keeps its
//! promises, each checked when it is made:
//!
//! - every task ends exactly once: one `did_complete` for a delegate's task (R1), one return
//!   for a convenience, with a typed error or the whole body, byte for byte, when no garbage
//!   could have changed it;
//! - as `did_complete` is delivered, the task's download file is gone (R5);
//! - a stall is ended by the request timeout, on the paused clock (R12): no case waits;
//! - as `invalidated()` resolves, the network counts no client end open, the download directory
//!   is empty, the delegate's `Weak` is dead, and the ledger reads zero (R3, R4).
//!
//! The delegate's callbacks are delivered on the runtime (the client's `test-util` hook).
//! The model's ops strike between ops; these strike inside them. Deterministic: a case runs the
//! same every time (one thread, the paused clock, no randomness in the network). Bounded: 48
//! cases, each within a minute of simulated time (`PROPTEST_CASES` for more).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use leakproof::{Configuration, Delegate, Disposition, Error, Session, TaskId, TaskInfo};
use leakproof_check::simnet::{Buffers, Fault, SimNet};
use leakproof_check::stage::{self, Stage};
use leakproof_check::witness::files_in;
use proptest::prelude::*;

/// Every task's request timeout: a stall ends there.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole case, on the paused clock: far past every timeout, never reached by a case that
/// keeps its promises.
const CASE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// A data task, its body heard by the delegate.
    DelegateData,
    /// A download task: the delegate reads the file in `did_finish_downloading`.
    DelegateDownload,
    /// `Session::data`.
    AwaitData,
    /// `Session::download`.
    AwaitDownload,
}

#[derive(Debug, Clone)]
struct Case {
    /// Each request: how it is made and its body's length.
    requests: Vec<(How, usize)>,
    /// (connection index, server bytes written before it strikes, the fault).
    faults: Vec<(u64, u64, Fault)>,
    to_client: usize,
    to_server: usize,
    per_host: usize,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Reset),
        Just(Fault::HalfClose),
        Just(Fault::Stall),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(Fault::Garbage),
    ]
}

fn buffer() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=64, 1000usize..=20_000, Just(1 << 20)]
}

fn case() -> impl Strategy<Value = Case> {
    let how = prop_oneof![
        Just(How::DelegateData),
        Just(How::DelegateDownload),
        Just(How::AwaitData),
        Just(How::AwaitDownload),
    ];
    let length = prop_oneof![0usize..=100, 1000usize..=70_000, 150_000usize..=300_000];
    (
        proptest::collection::vec((how, length), 1..=5),
        // A fault at any byte of a connection's responses: often in or near its first head
        // (about 100 bytes), anywhere in its bodies, or past them all (it never strikes).
        proptest::collection::vec(
            (0u64..3, prop_oneof![0u64..=400, 0u64..=320_000], fault()),
            0..=3,
        ),
        buffer(),
        buffer(),
        1usize..=3,
    )
        .prop_map(|(requests, faults, to_client, to_server, per_host)| Case {
            requests,
            faults,
            to_client,
            to_server,
            per_host,
        })
}

/// What the delegate heard, per task, and what it saw at each `did_complete`.
#[derive(Default)]
struct Heard {
    completions: HashMap<TaskId, Vec<Result<(), String>>>,
    bodies: HashMap<TaskId, Vec<u8>>,
    files: HashMap<TaskId, Vec<u8>>,
    /// Promises broken at their moment.
    broken: Vec<String>,
}

struct Recorder {
    heard: Arc<Mutex<Heard>>,
    downloads: PathBuf,
}

impl Recorder {
    /// The task's download file, by the session's naming: `<name>-<id>.download`.
    fn file_of(&self, task: TaskId) -> Option<PathBuf> {
        let suffix = format!("-{}.download", task.0);
        files_in(&self.downloads)
            .unwrap_or_default()
            .into_iter()
            .find(|f| f.to_string_lossy().ends_with(&suffix))
    }
}

impl Delegate for Recorder {
    fn did_receive_response(&self, _: &TaskInfo, _: &http::Response<()>) -> Disposition {
        Disposition::Allow
    }

    fn did_receive_data(&self, task: &TaskInfo, data: &Bytes) {
        let mut heard = self.heard.lock().unwrap();
        heard
            .bodies
            .entry(task.id)
            .or_default()
            .extend_from_slice(data);
    }

    fn did_finish_downloading(&self, task: &TaskInfo, location: &Path) {
        let bytes = std::fs::read(location).unwrap_or_default();
        self.heard.lock().unwrap().files.insert(task.id, bytes);
    }

    fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>) {
        let file = self.file_of(task.id);
        let mut heard = self.heard.lock().unwrap();
        if let Some(file) = file {
            let broken = format!(
                "{:?}'s file {} exists at did_complete",
                task.id,
                file.display()
            );
            heard.broken.push(broken);
        }
        let result = result.map_err(|e| {
            // A typed error with a message, whatever broke.
            let message = e.to_string();
            assert!(!message.is_empty(), "{e:?} has no message");
            message
        });
        heard.completions.entry(task.id).or_default().push(result);
    }
}

/// One request's end, as the user saw it.
#[derive(Debug)]
enum End {
    Delegated(TaskId),
    Awaited(Result<Vec<u8>, String>),
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let net = SimNet::with_buffers(Buffers {
        to_client: case.to_client,
        to_server: case.to_server,
    });
    let stage = Stage::builder().network(&net).start().await.unwrap();
    let uri: http::Uri = stage.url("/").parse().unwrap();
    let (host, port) = (uri.host().unwrap().to_owned(), uri.port_u16().unwrap());
    for (connection, after, fault) in &case.faults {
        net.schedule(&host, port, *connection, *after, fault.clone());
    }
    let garbled = case
        .faults
        .iter()
        .any(|(_, _, f)| matches!(f, Fault::Garbage(_)));

    let downloads = tempfile::tempdir().unwrap();
    let heard = Arc::new(Mutex::new(Heard::default()));
    let delegate: Arc<dyn Delegate> = Arc::new(Recorder {
        heard: heard.clone(),
        downloads: downloads.path().to_owned(),
    });
    let weak = Arc::downgrade(&delegate);
    let config = Configuration::builder()
        .transport(net.clone())
        .download_dir(downloads.path())
        .request_timeout(REQUEST_TIMEOUT)
        .max_connections_per_host(case.per_host)
        .build()
        .unwrap();
    // The callbacks run on the runtime too, so that the paused clock moves only when nothing
    // anywhere can: a thread of their own would let it jump while a callback runs.
    let session = Session::builder()
        .configuration(config)
        .delegate(delegate)
        .deliver_on_runtime(|| async {})
        .build();
    let observer = session.observer();

    // Every request at once: the delegate's tasks resumed, the conveniences spawned.
    let mut handles = Vec::new();
    let mut awaited = Vec::new();
    for (i, (how, len)) in case.requests.iter().enumerate() {
        let url = stage.url(&format!("/bytes/{len}"));
        let request = http::Request::get(url).body(()).unwrap();
        match how {
            How::DelegateData => {
                let task = session.data_task(request).unwrap();
                task.resume();
                handles.push((i, task.id(), Box::new(task) as Box<dyn std::any::Any>));
            }
            How::DelegateDownload => {
                let task = session.download_task(request).unwrap();
                task.resume();
                handles.push((i, task.id(), Box::new(task) as Box<dyn std::any::Any>));
            }
            How::AwaitData => {
                let session = session.clone();
                let future = async move {
                    match session.data(request).await {
                        Ok(response) => Ok(response.into_body().to_vec()),
                        Err(error) => Err(error.to_string()),
                    }
                };
                awaited.push((i, tokio::spawn(future)));
            }
            How::AwaitDownload => {
                let session = session.clone();
                let future = async move {
                    match session.download(request).await {
                        // Read, then dropped: the file goes with it.
                        Ok(response) => Ok(std::fs::read(response.body().path()).unwrap()),
                        Err(error) => Err(error.to_string()),
                    }
                };
                awaited.push((i, tokio::spawn(future)));
            }
        }
    }
    let mut ends: Vec<(usize, End)> = handles
        .iter()
        .map(|(i, id, _)| (*i, End::Delegated(*id)))
        .collect();
    for (i, future) in awaited {
        let result = tokio::time::timeout(CASE, future).await;
        let result = result.map_err(|_| TestCaseError::fail("a convenience never returned"))?;
        ends.push((i, End::Awaited(result.expect("no panic"))));
    }
    // The delegate's tasks run on with their handles held; each ends once.
    let deadline = tokio::time::Instant::now() + CASE;
    loop {
        let done = heard.lock().unwrap().completions.len();
        if done == handles.len() {
            break;
        }
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {} tasks completed",
            handles.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for (i, end) in &ends {
        let (how, len) = case.requests[*i];
        let expected = stage::body(len);
        let got = match end {
            End::Awaited(result) => result.clone(),
            End::Delegated(id) => {
                let heard = heard.lock().unwrap();
                let completions = &heard.completions[id];
                prop_assert_eq!(
                    completions.len(),
                    1,
                    "R1: {:?} completed {:?}",
                    id,
                    completions
                );
                completions[0].clone().map(|()| {
                    let source = match how {
                        How::DelegateDownload => &heard.files,
                        _ => &heard.bodies,
                    };
                    source.get(id).cloned().unwrap_or_default()
                })
            }
        };
        match got {
            Ok(body) if !garbled => prop_assert!(
                body == expected,
                "request {} ({:?}) succeeded with {} bytes of {}",
                i,
                how,
                body.len(),
                len
            ),
            Ok(_) => {}
            Err(_) if case.faults.is_empty() => {
                prop_assert!(false, "request {i} failed with no fault: {got:?}")
            }
            Err(_) => {}
        }
    }

    let broken = heard.lock().unwrap().broken.clone();
    prop_assert!(broken.is_empty(), "{broken:?}");
    drop(handles);
    session.finish_tasks_and_invalidate();
    drop(session);
    let invalidated = tokio::time::timeout(CASE, observer.invalidated()).await;
    prop_assert!(invalidated.is_ok(), "invalidated() never resolved");
    // R4 and R3, at the moment of the promise.
    prop_assert_eq!(net.tally().client_ends_alive(), 0, "client ends open");
    prop_assert_eq!(files_in(downloads.path()).unwrap(), Vec::<PathBuf>::new());
    prop_assert!(weak.upgrade().is_none(), "R3: the delegate is alive");
    let ledger = observer.resources();
    prop_assert_eq!(
        (
            ledger.open_connections,
            ledger.idle_connections,
            ledger.buffered_bytes
        ),
        (0, 0, 0)
    );
    prop_assert_eq!(
        (ledger.live_tasks, ledger.timers, ledger.temp_files),
        (0, 0, 0)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_fault_at_any_byte_ends_each_task_once_and_releases_everything(case in case()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(case))?;
    }
}
