//! The delegate contract with a strict mock: the exact callbacks, in order, once each where
//! the rules say once (R1, R2), and the session lets go of the delegate once it is invalid
//! (R3: the test's `Arc` is the last one). Mocks are for this contract only; everything else
//! is tested against real parts.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use leakproof::{Configuration, Delegate, Disposition, Error, Session, TaskInfo};
use leakproof_check::scenario::{PATIENCE, patiently};
use leakproof_check::stage::Stage;
use mockall::{Sequence, mock, predicate::always};

mock! {
    pub Listener {}
    impl Delegate for Listener {
        fn did_receive_response(&self, task: &TaskInfo, response: &http::Response<()>) -> Disposition;
        fn did_receive_data(&self, task: &TaskInfo, data: &Bytes);
        fn did_become_download(&self, task: &TaskInfo);
        fn did_finish_downloading(&self, task: &TaskInfo, location: &Path);
        fn did_complete(&self, task: &TaskInfo, result: Result<(), Error>);
        fn did_become_invalid(&self);
    }
}

/// Run `path` as a data task on a session with `delegate`, then invalidate; return the mock
/// for its checkpoint.
async fn run(delegate: MockListener, path: &str) -> MockListener {
    let stage = Stage::start().await.unwrap();
    let delegate = Arc::new(delegate);
    let session = Session::new(Configuration::default(), Some(delegate.clone()));
    let task = session
        .data_task(http::Request::get(stage.url(path)).body(()).unwrap())
        .unwrap();
    task.resume();
    drop(task);
    session.finish_tasks_and_invalidate();
    assert!(patiently(session.invalidated()).await.is_some());
    assert!(stage.wait_all_closed(PATIENCE).await);
    drop(session);
    // R3: the session dropped its reference right after did_become_invalid.
    Arc::into_inner(delegate).expect("R3: the session still holds the delegate")
}

#[tokio::test]
async fn a_completed_data_task_hears_response_data_complete_then_invalid() {
    let mut delegate = MockListener::new();
    let mut order = Sequence::new();
    delegate
        .expect_did_receive_response()
        .times(1)
        .in_sequence(&mut order)
        .return_const(Disposition::Allow);
    delegate
        .expect_did_receive_data()
        .times(1..)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_complete()
        .withf(|_, result| result.is_ok())
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_become_invalid()
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    run(delegate, "/bytes/50000").await.checkpoint();
}

#[tokio::test]
async fn a_cancel_disposition_hears_no_data() {
    let mut delegate = MockListener::new();
    let mut order = Sequence::new();
    delegate
        .expect_did_receive_response()
        .times(1)
        .in_sequence(&mut order)
        .return_const(Disposition::Cancel);
    delegate.expect_did_receive_data().never();
    delegate
        .expect_did_complete()
        .withf(|_, result| matches!(result, Err(Error::Cancelled)))
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_become_invalid()
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    run(delegate, "/bytes/50000").await.checkpoint();
}

#[tokio::test]
async fn a_download_hands_over_its_file_before_completing() {
    let mut delegate = MockListener::new();
    let mut order = Sequence::new();
    delegate
        .expect_did_receive_response()
        .times(1)
        .in_sequence(&mut order)
        .return_const(Disposition::BecomeDownload);
    delegate
        .expect_did_become_download()
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_finish_downloading()
        .withf(|_, location| std::fs::metadata(location).is_ok_and(|m| m.len() == 3000))
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_complete()
        .with(
            always(),
            mockall::predicate::function(|r: &Result<(), Error>| r.is_ok()),
        )
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_become_invalid()
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate.expect_did_receive_data().never();
    run(delegate, "/bytes/3000").await.checkpoint();
}

#[tokio::test]
async fn a_failing_server_ends_the_task_with_a_typed_error() {
    let mut delegate = MockListener::new();
    let mut order = Sequence::new();
    delegate
        .expect_did_complete()
        .withf(|_, result| matches!(result, Err(Error::MalformedResponse(_))))
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    delegate
        .expect_did_become_invalid()
        .times(1)
        .in_sequence(&mut order)
        .return_const(());
    run(delegate, "/bytes/10?malformed=status")
        .await
        .checkpoint();
}
